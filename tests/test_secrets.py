"""Secrets stay secret: the Redis password and the admin token come from files or the environment, never
need a flag, and show up nowhere (logs, problem documents, /metrics, `eagercache fetchers`)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from eagercache.access import acl_rule
from eagercache.errors import ConfigurationError, StoreUnavailable
from eagercache.keys import Keys
from eagercache.settings import load_settings, to_environ
from eagercache.store import Store, redact, store_errors

from .servers import EAGERCACHE, ROOT, ServeProcess, run_eagercache


@pytest.fixture
def acl_user(redis_sync: redis.Redis) -> Iterator[tuple[str, str]]:
    name, password = f"ec-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    redis_sync.execute_command("ACL", "SETUSER", name, "reset", f">{password}", *acl_rule("eagercache:").split())  # type: ignore[no-untyped-call]
    try:
        yield name, password
    finally:
        redis_sync.execute_command("ACL", "DELUSER", name)  # type: ignore[no-untyped-call]


def secret_file(tmp_path: Path, name: str, value: str) -> str:
    path = tmp_path / name
    path.write_text(value + "\n")  # as `echo secret > file` writes it
    return str(path)


def test_secrets_come_from_files_named_by_file_variables(tmp_path: Path) -> None:
    environ = {
        "EAGERCACHE_REDIS_PASSWORD_FILE": secret_file(tmp_path, "pw", "from-a-file"),
        "EAGERCACHE_ADMIN_TOKEN_FILE": secret_file(tmp_path, "token", "token-from-a-file-0123"),
    }
    settings = load_settings(environ=environ)
    assert settings.redis_password == "from-a-file"
    assert settings.admin_token == "token-from-a-file-0123"
    shown = repr(settings)
    assert "from-a-file" not in shown and "token-from-a-file" not in shown


def test_a_secret_given_twice_or_unreadable_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="EAGERCACHE_REDIS_PASSWORD or EAGERCACHE_REDIS_PASSWORD_FILE"):
        load_settings(
            environ={
                "EAGERCACHE_REDIS_PASSWORD": "x",
                "EAGERCACHE_REDIS_PASSWORD_FILE": secret_file(tmp_path, "pw", "y"),
            }
        )
    with pytest.raises(ConfigurationError, match="EAGERCACHE_ADMIN_TOKEN_FILE: cannot read"):
        load_settings(environ={"EAGERCACHE_ADMIN_TOKEN_FILE": str(tmp_path / "missing")})


def test_the_password_has_no_flag() -> None:
    answer = run_eagercache("serve", "--redis-password", "x")
    assert answer.returncode == 2
    assert "unrecognized arguments" in answer.stderr


@pytest.mark.fault
def test_secrets_show_up_nowhere(
    redis_url: str, acl_user: tuple[str, str], tmp_path: Path, redis_sync: redis.Redis
) -> None:
    user, password = acl_user
    token = f"tok-{uuid.uuid4().hex}"
    env = {
        "EAGERCACHE_REDIS_USERNAME": user,
        "EAGERCACHE_REDIS_PASSWORD_FILE": secret_file(tmp_path, "pw", password),
        "EAGERCACHE_ADMIN_TOKEN_FILE": secret_file(tmp_path, "token", token),
        "FLEET_REDIS_URL": redis_url,
    }
    server = ServeProcess(
        "--redis-url",
        redis_url,
        "--fetchers",
        "tests.fleet:always_exits",
        "--log-level",
        "DEBUG",
        "--access-log",
        env=env,
    )
    seen: list[str] = []
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for path in ("/data/always_exits", "/data/nope", "/data/always_exits?x=1", "/metrics", "/readyz",
                         "/openapi.json", "/admin/fetchers", "/"):  # fmt: skip
                seen.append(client.get(path).text)
            seen.append(client.get("/admin/fetchers", headers={"authorization": "Bearer wrong-token-0000"}).text)
            seen.append(client.get("/admin/fetchers", headers={"authorization": f"Bearer {token}"}).text)
        server.terminate()
        seen.append(server.stderr())
    finally:
        server.close()
    listing = subprocess.run(
        [EAGERCACHE, "fetchers", "--fetchers", "tests.fleet:always_exits"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)},
    )
    seen += [listing.stdout, listing.stderr]
    everything = "\n".join(seen)
    assert "always_exits" in everything and "Application startup complete" in everything  # it did run
    assert password not in everything
    assert token not in everything


def test_a_wrong_password_is_a_start_up_error_without_the_password(
    redis_url: str, acl_user: tuple[str, str], tmp_path: Path
) -> None:
    user, _ = acl_user
    wrong = f"wrong-{uuid.uuid4().hex}"
    answer = run_eagercache(
        "serve",
        "--redis-url",
        redis_url,
        env={"EAGERCACHE_REDIS_USERNAME": user, "EAGERCACHE_REDIS_PASSWORD_FILE": secret_file(tmp_path, "pw", wrong)},
    )
    assert answer.returncode == 2
    last = answer.stderr.strip().splitlines()[-1]
    assert last.startswith("eagercache: ") and "invalid username-password pair" in last
    assert "Traceback" not in answer.stderr
    assert wrong not in answer.stderr


def test_workers_get_a_secret_read_from_a_file_by_its_file_not_its_value(tmp_path: Path) -> None:
    """`--workers N` hands settings to the workers through the environment: a secret read from a file
    travels as its _FILE variable, so it is never copied into the environment, and the worker starts."""
    environ = {"EAGERCACHE_REDIS_PASSWORD_FILE": secret_file(tmp_path, "pw", "from-a-file")}
    handed = to_environ(load_settings(environ=environ), environ)
    assert "EAGERCACHE_REDIS_PASSWORD" not in handed
    worker = load_settings(environ={**environ, **handed})  # what each worker process reads
    assert worker.redis_password == "from-a-file"


@pytest.mark.parametrize(
    ("url", "hidden"),
    [
        ("redis://:TopSecret@127.0.0.1:6379/0", "TopSecret"),
        ("redis://user:TopSecret@127.0.0.1:6379/0", "TopSecret"),
        ("redis://127.0.0.1:6379/0?password=TopSecret&db=1", "TopSecret"),
        ("unix:///run/redis.sock?password=TopSecret", "TopSecret"),
        ("redis://:Zm9v/YmFy+cXV4@127.0.0.1:6379/0", "Zm9v/YmFy+cXV4"),  # unencoded: '/' in the password
        ("redis://:TopSecret@127.0.0.1:99999/0", "TopSecret"),  # a port out of range: no traceback either
    ],
)
def test_a_password_in_the_url_is_hidden_wherever_the_url_is_shown(url: str, hidden: str) -> None:
    assert hidden not in redact(url)
    with pytest.raises(StoreUnavailable) as unreachable, store_errors(url):
        raise redis.ConnectionError("Connection refused")
    assert hidden not in unreachable.value.detail  # what /readyz and a 503 would say
    try:
        Store.from_url(url, Keys())  # builds no connection yet; a URL it cannot use is a clear error
    except ConfigurationError as exc:
        assert hidden not in exc.detail
