"""Section 10: memory:// (memstore.py's native store) against redis:// in the same run (issue 17's figures).

1. Cold fills: section 7's method (bench/engine.py `_cold`: GETs of never-seen ids, 32 connections, misses/s
   from the process's /metrics) on an `eagercache serve` process of each store, both stacks.
2. Refresh capacity: each store's serve process, fetcher `bench.engine_fetchers:engine` with ttl 1 s, gets N
   entries by cold fills (40,000 on memory://, 20,000 on redis://; half that when quick); then every entry is
   due once a second, more than one process can refresh. Rate =
   refresh fetches (`eagercache_fetches_total`, causes schedule and event) over a window / its length, with
   the process's CPU time. The same method for both stores (section 7 drains a schedule it arms through Redis,
   which memory:// has not).
3. Memory per entry at 1,000,000 entries (quick: 100,000): a process of its own writes entries through
   `MemoryStore.write` (as cold fills would: values from item.build_entry, ids `engine?i=<n>`); RSS before and
   after (/proc/self/statm), less the stored values (the header line and body), and less only the bodies.

    python -m bench.memstore footprint --entries 1000000   # one footprint process (internal)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from .config import Config
from .engine import COLD_PATHS_PER_S, COLD_WARMUP_S, cpu_s, scrape, server_facts, serving, total
from .engine_fetchers import NAME as FETCHER
from .hitpath import STACKS
from .loadgen import run_load
from .procs import Cores

MEMORY_URL = "memory://"
CAPACITY_TTL_S = 1.0
CAPACITY_SETTLE_S = 2.0  # after the fills, before the window: every entry has been due at least once
GOAL_RATIO = 2.0
FILL_TRIES = 3
GOAL_BYTES_BEYOND_BODY = 200


def run_memstore(cfg: Config, cores: Cores, redis_url: str, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"stores": {"memory": MEMORY_URL, "redis": "the section's redis-server"}}
    entries = 100_000 if cfg.quick else 1_000_000
    out["footprint"] = footprint_in_subprocess(entries)
    # memory:// refreshes about twice as fast: it gets twice the entries, so that it too has more due each
    # second than it can refresh (with 20,000 it kept up, and its rate was only a lower bound).
    entries_of = {"memory": 20_000, "redis": 10_000} if cfg.quick else {"memory": 40_000, "redis": 20_000}
    window = 3.0 if cfg.quick else 6.0
    for stack in STACKS:
        for name, url in (("memory", MEMORY_URL), ("redis", redis_url)):
            flush(url)
            out.setdefault("cold", {}).setdefault(stack, {})[name] = cold(stack, cfg, cores, url)
            flush(url)
            out.setdefault("capacity", {}).setdefault(stack, {})[name] = capacity(
                stack, cfg, cores, url, entries_of[name], window
            )
    return out


def flush(url: str) -> None:
    if url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(url)
        client.flushall()
        client.close()


def cold(stack: str, cfg: Config, cores: Cores, url: str) -> dict[str, Any]:
    seconds = cfg.engine_cold_seconds
    with serving(url, cores, stack, 3600.0) as (proc, port):
        base_url = f"http://127.0.0.1:{port}"
        warm = [f"/data/{FETCHER}?i={1_000_000 + k}" for k in range(int(COLD_PATHS_PER_S * COLD_WARMUP_S))]
        run_load(base_url, warm, duration_s=COLD_WARMUP_S, connections=cfg.engine_cold_connections, core=cores.load)
        paths = [f"/data/{FETCHER}?i={2_000_000 + k}" for k in range(int(COLD_PATHS_PER_S * (seconds + 1)))]
        before, cpu0 = scrape(port), cpu_s(proc.pid)
        load = run_load(base_url, paths, duration_s=seconds, connections=cfg.engine_cold_connections, core=cores.load)
        after, cpu1 = scrape(port), cpu_s(proc.pid)
        facts = server_facts(proc)
    misses = total(after, "eagercache_requests_total", result="miss") - total(
        before, "eagercache_requests_total", result="miss"
    )
    return {
        "misses_per_s": misses / load.duration_s,
        "cpu_util": (cpu1 - cpu0) / load.duration_s,
        "cpu_us_per_miss": (cpu1 - cpu0) / misses * 1e6 if misses else None,
        "paths_reused": load.requests > len(paths),
        "server": facts,
    }


def _refreshes(samples: Any) -> float:
    return sum(
        total(samples, "eagercache_fetches_total", fetcher=FETCHER, cause=cause, outcome="ok")
        for cause in ("schedule", "event")
    )


def capacity(stack: str, cfg: Config, cores: Cores, url: str, n: int, window_s: float) -> dict[str, Any]:
    with serving(url, cores, stack, CAPACITY_TTL_S) as (proc, port):
        base_url = f"http://127.0.0.1:{port}"
        paths = [f"/data/{FETCHER}?i={k}" for k in range(n)]
        started = time.monotonic()
        asyncio.run(_fill(base_url, paths, cfg.engine_cold_connections))
        filled_s = time.monotonic() - started
        time.sleep(CAPACITY_SETTLE_S)
        before, cpu0, t0 = scrape(port), cpu_s(proc.pid), time.monotonic()
        time.sleep(window_s)
        after, cpu1, t1 = scrape(port), cpu_s(proc.pid), time.monotonic()
    refreshed = _refreshes(after) - _refreshes(before)
    return {
        "entries": n,
        "due_per_s": n / CAPACITY_TTL_S,
        "fill_s": filled_s,
        "refreshes_per_s": refreshed / (t1 - t0),
        "cpu_util": (cpu1 - cpu0) / (t1 - t0),
        "cpu_us_per_refresh": (cpu1 - cpu0) / refreshed * 1e6 if refreshed else None,
        "saturated": refreshed / (t1 - t0) < 0.9 * n / CAPACITY_TTL_S,
    }


async def _fill(base_url: str, paths: Sequence[str], connections: int) -> None:
    queue = list(reversed(paths))
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=httpx.Limits(max_connections=connections)) as c:

        async def client() -> None:
            while queue:
                path = queue.pop()
                for attempt in range(FILL_TRIES):
                    try:
                        answer = await c.get(path)
                        break
                    except httpx.TransportError:  # a keep-alive connection the server closed as it was reused
                        if attempt == FILL_TRIES - 1:
                            raise
                if answer.status_code != 200:
                    raise RuntimeError(f"fill: {answer.status_code} {answer.text[:200]}")

        await asyncio.gather(*(client() for _ in range(connections)))


def footprint_in_subprocess(entries: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.memstore", "footprint", "--entries", str(entries)],
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def footprint(entries: int) -> dict[str, Any]:
    from eagercache.item import build_entry
    from eagercache.memstore import MemoryStore

    store = MemoryStore()
    await store.prepare()
    now = store.clock.now_ms()
    due = now + 3_600_000
    gc.collect()
    gc.freeze()
    before = _rss()
    stored_bytes = body_bytes = 0
    started = time.perf_counter()
    for i in range(entries):
        value = build_entry(json.dumps({"i": i}).encode(), now, due)[0]
        stored_bytes += len(value)
        body_bytes += len(value) - value.index(b"\n") - 1
        await store.write(f"{FETCHER}?i={i}", FETCHER, value, due, mode="cold", max_entries=entries)
    write_s = time.perf_counter() - started
    gc.collect()
    delta = _rss() - before
    return {
        "entries": entries,
        "rss_delta_bytes": delta,
        "per_entry": delta / entries,
        "stored_value_per_entry": stored_bytes / entries,
        "body_per_entry": body_bytes / entries,
        "beyond_stored_value": (delta - stored_bytes) / entries,
        "beyond_body": (delta - body_bytes) / entries,
        "writes_per_s": entries / write_s,
        "python": sys.version.split()[0],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memstore")
    sub = parser.add_subparsers(dest="command", required=True)
    fp = sub.add_parser("footprint")
    fp.add_argument("--entries", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(footprint(args.entries))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
