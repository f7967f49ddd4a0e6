"""The installed `eagercache` console script, run as a subprocess the way an operator runs it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from eagercache import Settings
from eagercache.cli import main
from eagercache.item import Entry
from eagercache.settings import NO_FLAG

from .redis_server import free_port

EAGERCACHE = Path(sys.executable).parent / "eagercache"
ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 15.0
EXIT_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05
# A clean stop: exit code 0, or death by the SIGTERM that uvicorn re-raises after its shutdown .
STOPPED_BY_SIGTERM = (0, -signal.SIGTERM)


def cli_env(**extra: str) -> dict[str, str]:
    """This environment without any EAGERCACHE_* setting, with the repository importable (`tests.…` specs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EAGERCACHE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EAGERCACHE), *args],
        env=cli_env() if env is None else env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,
        check=False,
    )


class Server:
    """A running `eagercache serve`; its stderr goes to a file so that a full pipe can never block it."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, stderr_path: Path) -> None:
        self.process = process
        self.base_url = f"http://127.0.0.1:{port}"
        self.stderr_path = stderr_path

    def stderr_lines(self) -> list[str]:
        return self.stderr_path.read_text().splitlines()

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.base_url + path, timeout=EXIT_TIMEOUT_S)

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if self.get("/healthz").status_code == 200:
                    return
            except httpx.ConnectError:  # not listening yet
                pass
            if self.process.poll() is not None:
                pytest.fail(f"exited with {self.process.returncode} before answering:\n{self.stderr_path.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no answer within {START_TIMEOUT_S} s:\n{self.stderr_path.read_text()}")
            time.sleep(POLL_INTERVAL_S)

    def terminate(self) -> int:
        """SIGTERM, as a container runtime sends it; the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(EXIT_TIMEOUT_S)


@contextmanager
def serving(tmp_path: Path, *args: str) -> Iterator[Server]:
    port = free_port()
    stderr_path = tmp_path / "serve.stderr"
    command = [str(EAGERCACHE), "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(command, env=cli_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        server = Server(process, port, stderr_path)
        server.wait_until_up()
        yield server
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(EXIT_TIMEOUT_S)


def test_serve_on_the_memory_store(tmp_path: Path) -> None:
    with serving(tmp_path) as server:
        cold = server.get("/data/greeting?name=Ada")
        warm = server.get("/data/greeting?name=Ada")
        assert (cold.status_code, cold.headers.get("x-cache")) == (200, "MISS"), cold.text
        assert (warm.status_code, warm.headers.get("x-cache")) == (200, "HIT"), warm.text
        assert cold.json()["data"]["text"] == "Hello, Ada!"
        assert warm.content == cold.content
        assert server.terminate() in STOPPED_BY_SIGTERM
    lines = server.stderr_lines()
    assert "memory://" in lines[0]
    assert any(line.endswith("Application shutdown complete.") for line in lines)  # the lifespan ran to its end
    assert "Traceback" not in "\n".join(lines)


def test_serve_on_redis(tmp_path: Path, redis_url: str, redis_sync: redis.Redis) -> None:
    with serving(tmp_path, "--redis-url", redis_url) as server:
        answer = server.get("/data/greeting?name=Ada")
        assert (answer.status_code, answer.headers.get("x-cache")) == (200, "MISS"), answer.text
        assert answer.json()["data"]["text"] == "Hello, Ada!"
        assert redis_sync.keys("eagercache:{b0}:item:*") == [b"eagercache:{b0}:item:greeting?name=Ada"]
        stored = redis_sync.get("eagercache:{b0}:item:greeting?name=Ada")
        assert isinstance(stored, bytes) and Entry.parse(stored).body == answer.content
        assert server.get("/data/greeting?name=Ada").headers.get("x-cache") == "HIT"
        assert server.terminate() in STOPPED_BY_SIGTERM
    lines = server.stderr_lines()
    assert "kind=Redis" in lines[0]
    assert any(line.endswith("Application shutdown complete.") for line in lines)  # the lifespan ran to its end
    assert "Traceback" not in "\n".join(lines)


def test_serve_with_unreachable_redis_exits_2_with_one_line() -> None:
    result = run_cli("serve", "--port", str(free_port()), "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("eagercache: cannot reach the store")
    assert "Traceback" not in result.stderr


def test_serve_with_bad_port_flag_exits_2() -> None:
    result = run_cli("serve", "--port", "0")
    assert result.returncode == 2
    last = result.stderr.splitlines()[-1]
    assert last.startswith("eagercache: ")
    assert "port" in last
    assert "Traceback" not in result.stderr


def test_serve_with_bad_port_variable_exits_2() -> None:
    result = run_cli("serve", env=cli_env(EAGERCACHE_PORT="abc"))
    assert result.returncode == 2
    last = result.stderr.splitlines()[-1]
    assert last.startswith("eagercache: ")
    assert "EAGERCACHE_PORT" in last
    assert "Traceback" not in result.stderr


def test_every_setting_has_a_serve_flag(capsys: pytest.CaptureFixture[str]) -> None:
    # Settings errors name `--<field>` for every field (settings._with_env_name), so each must exist.
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])  # in-process: parsing is all this needs
    assert exited.value.code == 0
    flags = set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))
    fields = set(Settings.__struct_fields__) - NO_FLAG
    assert {f"--{field.replace('_', '-')}" for field in fields} <= flags
    assert not {f"--{field.replace('_', '-')}" for field in NO_FLAG} & flags


def _listing(stdout: str) -> dict[str, str]:
    return {line.split("(", 1)[0]: line for line in stdout.splitlines()}


def test_fetchers_lists_the_entry_points() -> None:
    result = run_cli("fetchers")
    assert result.returncode == 0, result.stderr
    listing = _listing(result.stdout)
    assert set(listing) == {"clock", "greeting", "prices"}
    assert "resolution: int = 10" in listing["clock"]
    assert "ttl=5s jitter=1s timeout=2s" in listing["clock"]
    assert listing["clock"].endswith("[entry point clock = eagercache_examples.fetchers:clock]")
    for param in ["name: str = 'world'", "times: int = 1", "style: Literal['plain', 'shout'] = 'plain'", "tags: "]:
        assert param in listing["greeting"]
    assert "ttl=30s" in listing["greeting"]
    assert listing["greeting"].endswith("[entry point greeting = eagercache_examples.fetchers:greeting]")
    assert "symbol: str = 'EUR'" in listing["prices"] and "currency: str = 'USD'" in listing["prices"]
    assert "ttl=10s" in listing["prices"]
    assert listing["prices"].endswith("[entry point prices = eagercache_examples.fetchers:prices]")


THING = (
    "thing(colour: Literal['red', 'blue'] = 'red', size: int = 3)  ttl=7s jitter=0.5s timeout=3s "
    "max_idle=3600s max_entries=100000  "
    "[--fetchers tests.sample_fetchers:thing]"
)


def test_fetchers_flag_adds_a_fetcher() -> None:
    result = run_cli("fetchers", "--fetchers", "tests.sample_fetchers:thing")
    assert result.returncode == 0, result.stderr
    listing = _listing(result.stdout)
    assert set(listing) == {"clock", "greeting", "prices", "thing"}
    assert listing["thing"] == THING


def test_fetchers_variable_adds_a_fetcher() -> None:
    result = run_cli("fetchers", env=cli_env(EAGERCACHE_FETCHERS="tests.sample_fetchers:thing"))
    assert result.returncode == 0, result.stderr
    assert _listing(result.stdout)["thing"] == THING


def test_fetchers_with_a_bad_spec_exits_2() -> None:
    result = run_cli("fetchers", "--fetchers", "nope.module:x")
    assert result.returncode == 2
    assert result.stdout == ""
    last = result.stderr.splitlines()[-1]
    assert last.startswith("eagercache: ")
    assert "'nope.module:x'" in last
    assert "Traceback" not in result.stderr
