"""`eagercache serve` as a real subprocess, for multi-process and signal tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
EAGERCACHE = str(Path(sys.executable).parent / "eagercache")


class ServeProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()  # a port of its own, or the one a stopped server had (a restart)
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        # A file, not a pipe: a server logging more than a pipe holds must never block on it.
        self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [EAGERCACHE, "serve", "--port", str(self.port), *args],
            env=full_env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,  # its own process group: --workers children are killed with it
        )

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"eagercache serve exited: {self.stderr()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # polling another process: there is no event to await
        raise TimeoutError(f"eagercache serve not ready after {timeout} s")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, as an orchestrator would; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # the server and any worker processes it started
        self.process.wait()

    def close(self) -> None:
        self.kill()
        self._log.close()

    def stderr(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")


def run_eagercache(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`eagercache ARGS` to completion, with only `env` (and PATH) in its environment."""
    return subprocess.run(
        [EAGERCACHE, *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={"PATH": str(Path(sys.executable).parent), **(env or {})},
    )
