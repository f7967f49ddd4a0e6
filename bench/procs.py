"""Processes of a benchmark: CPU pinning, servers started and stopped, their CPU time."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Cores:
    """Which core the measured server gets, and which the load generator, Redis and the harness share."""

    available: tuple[int, ...]
    server: int | None
    load: int | None

    @classmethod
    def detect(cls) -> Cores:
        available = tuple(sorted(os.sched_getaffinity(0)))
        if len(available) >= 2 and shutil.which("taskset") is not None:
            return cls(available, available[0], available[1])
        return cls(available, None, None)

    def describe(self) -> str:
        if self.server is None:
            return f"not pinned ({len(self.available)} core(s), or no taskset)"
        return f"server on core {self.server}; load generator, Redis and harness on core {self.load} (taskset)"


def pinned(cmd: Sequence[str], core: int | None) -> list[str]:
    return ["taskset", "-c", str(core), *cmd] if core is not None else list(cmd)


def bench_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


class Proc:
    """A server subprocess with its stderr in a file (a pipe that fills up would block it)."""

    def __init__(self, name: str, cmd: Sequence[str], *, core: int | None, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.cmd = list(cmd)
        self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            pinned(cmd, core), env=env or bench_env(), cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_http(self, url: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.output()[-3000:]}")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # another process: there is nothing to await but its port
        raise TimeoutError(f"{self.name} not ready at {url} after {timeout} s: {self.output()[-3000:]}")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def close(self) -> None:
        self.stop()
        self._log.close()


def free_port() -> int:
    from tests.redis_server import free_port as _free_port

    return _free_port()


def pyspy_record(pid: int, seconds: float, output: Path, rate_hz: int = 250) -> list[str] | None:
    """The command that samples process `pid` for `seconds` into `output` (py-spy's raw format, one line per
    stack, functions not lines); None if py-spy is not installed in the venv."""
    pyspy = BIN / "py-spy"
    if not pyspy.exists():
        return None
    return [
        str(pyspy),
        "record",
        "--pid",
        str(pid),
        "--function",
        "--rate",
        str(rate_hz),
        "--duration",
        str(round(seconds)),
        "--format",
        "raw",
        "--output",
        str(output),
    ]
