"""`make bench`: run the benchmark sections, keep their raw results, and write docs/benchmarks.md from them.

.venv/bin/python -m bench.run              # full run (~21 minutes on 2 cores)
BENCH_QUICK=1 .venv/bin/python -m bench.run   # smoke run (~3 minutes)
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import redis
from tests.redis_server import RedisServer, server_binary

from .capacity import run_capacity
from .config import Config, load_config
from .engine import run_engine
from .expiry import run_expiry
from .hitpath import run_hit_path
from .invalidation import run_invalidation
from .loadgen import loadgen_name, wrk_version
from .manykeys import run_many_keys
from .memstore import run_memstore
from .procs import ROOT, Cores
from .report import write_report
from .scaling import run_scaling
from .stampede import run_stampede
from .watchers import run_watchers

DOCS = ROOT / "docs"
RESULTS = DOCS / "benchmarks.json"
PACKAGES = (
    "eagercache",
    "starlette",
    "uvicorn",
    "redis",
    "hiredis",
    "msgspec",
    "h11",
    "uvloop",
    "httptools",
    "cashews",
    "py-spy",
    "matplotlib",
)


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = sorted({line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")})
    mem_kb = (
        next(
            (
                int(line.split()[1])
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")
            ),
            0,
        )
        if Path("/proc/meminfo").exists()
        else 0
    )
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_model": ", ".join(models) or platform.processor() or "unknown",
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions(redis_url: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    client = redis.Redis.from_url(redis_url)
    try:
        server = client.info("server")
        out["redis-server"] = (
            f"valkey {server['valkey_version']}" if "valkey_version" in server else f"redis {server['redis_version']}"
        )
        out["redis-server allocator"] = str(client.info("memory").get("mem_allocator", "?"))
    finally:
        client.close()
    out["redis-server binary"] = server_binary()
    out["wrk"] = wrk_version()
    return out


def git_state() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src")
    return f"{commit}" + (" with uncommitted changes in src/" if dirty else "")


def command() -> str:
    knobs = " ".join(
        f"{k}={shlex.quote(v)}"
        for k, v in sorted(os.environ.items())
        if k.startswith("BENCH_") and k != "BENCH_REDIS_URL"
    )
    return f"{knobs} make bench".strip()


def main() -> int:
    cfg = load_config()
    cores = Cores.detect()
    host = machine()
    if cores.load is not None:
        os.sched_setaffinity(0, {cores.load})  # the harness, and the redis-server it starts, stay off the server core
    started = time.time()
    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command(),
        "config": cfg.to_json(),
        "machine": host,
        "cores": {"server": cores.server, "load": cores.load, "describe": cores.describe()},
        "loadgen": loadgen_name(),
        "git": git_state(),
        "sections": {},
    }
    print(
        f"bench: {results['command']} ({'quick' if cfg.quick else 'full'}); load generator: {results['loadgen']}; "
        f"{cores.describe()}",
        flush=True,
    )
    failed = False
    with tempfile.TemporaryDirectory(prefix="eagercache-bench-") as tmp:
        workdir = Path(tmp)
        sections: list[tuple[int, str, Callable[[Config, Cores, str, Path], dict[str, Any]]]] = [
            (1, "hit_path", lambda c, k, u, w: run_hit_path(c, k, u, w)),
            (2, "expiry", lambda c, k, u, w: run_expiry(c, k, u)),
            (3, "capacity", lambda c, k, u, w: run_capacity(c, k, u, w)),
            (4, "stampede", lambda c, k, u, w: run_stampede(c, k, u, w)),
            (5, "scaling", lambda c, k, u, w: run_scaling(c, k, u, w)),
            (6, "many_keys", lambda c, k, u, w: run_many_keys(c, k, u, w)),
            (7, "engine", lambda c, k, u, w: run_engine(c, k, u, w)),
            (8, "watchers", lambda c, k, u, w: run_watchers(c, k, u, w)),
            (9, "invalidation", lambda c, k, u, w: run_invalidation(c, k, u, w)),
            (10, "memstore", lambda c, k, u, w: run_memstore(c, k, u, w)),
        ]
        for number, name, section in sections:
            if number not in cfg.sections:
                continue
            server = RedisServer()  # a fresh server per section, default settings (hz 10), no persistence
            server.start()
            t0 = time.time()
            print(f"bench: section {number} ({name}) ...", flush=True)
            try:
                results.setdefault("versions", versions(server.url))
                results["sections"][name] = section(cfg, cores, server.url, workdir)
            except Exception as exc:
                failed = True
                results["sections"][name] = {
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(),
                }
                print(f"bench: section {number} failed: {exc}", file=sys.stderr, flush=True)
            finally:
                server.stop()
            results["sections"].setdefault(name, {})["elapsed_s"] = time.time() - t0
            print(f"bench: section {number} done in {time.time() - t0:.0f} s", flush=True)
    results["elapsed_s"] = time.time() - started
    DOCS.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    report = write_report(results, DOCS)
    print(f"bench: wrote {report.relative_to(ROOT)} and {RESULTS.relative_to(ROOT)} in {results['elapsed_s']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
