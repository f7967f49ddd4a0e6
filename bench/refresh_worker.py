"""One refreshing process for section 3: eagercache's own app and Refresher, with no HTTP server.

It runs `create_app`'s lifespan (the Refresher, exactly as `eagercache serve` runs it) over entries
that the harness seeded, and records from outside the code, by wrapping the store's and the fetcher's
functions on this one instance: when each fetch starts, when each write is sent and acknowledged,
every claim of the schedule and of expiry events, the process's CPU time and the event loop's lag.
On SIGTERM, or after `--stop-after` writes, it writes all of that as JSON to `--out`.

    python -m bench.refresh_worker --redis-url redis://127.0.0.1:6379/0 --namespace cap: --ttl 5 --out w.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import time
from pathlib import Path
from typing import Any

from eagercache import create_app, fetcher

LOOP_PROBE_S = 0.01
CPU_SAMPLE_S = 0.2


def wall_ms() -> float:
    return time.time() * 1000


async def run(args: argparse.Namespace) -> dict[str, Any]:
    fetch_started: dict[int, float] = {}

    async def noop(i: int) -> dict[str, int]:
        fetch_started[i] = wall_ms()
        return {"i": i}

    app = create_app(
        {"noop": fetcher(ttl=args.ttl, jitter=0, timeout=5)(noop)}, redis_url=args.redis_url, namespace=args.namespace
    )
    store = app.state.store
    stop = asyncio.Event()
    # (i, fetch started, write sent, write acknowledged, next due) in ms since the epoch; one row per stored refresh.
    writes: list[tuple[int, float, float, float, float]] = []
    schedule_claims: list[tuple[float, float, int]] = []  # (sent, answered, entries claimed)
    event_claims: list[tuple[float, float]] = []

    original_write, original_claim_due, original_claim = store.write, store.claim_due, store.claim

    async def write(entry_id: str, *rest: Any, **kwargs: Any) -> Any:
        sent = wall_ms()
        result = await original_write(entry_id, *rest, **kwargs)
        i = int(entry_id.rpartition("=")[2])
        # Store.write(entry_id, fetcher, value, due_at, ...): the next due time the write schedules
        next_due = float(rest[2]) if len(rest) > 2 else math.nan
        writes.append((i, fetch_started.pop(i, math.nan), sent, wall_ms(), next_due))
        if args.stop_after and len(writes) >= args.stop_after:
            stop.set()
        return result

    async def claim_due(*a: Any, **kw: Any) -> Any:
        sent = wall_ms()
        claimed = await original_claim_due(*a, **kw)
        schedule_claims.append((sent, wall_ms(), len(claimed.claims)))
        return claimed

    async def claim(*a: Any, **kw: Any) -> Any:
        sent = wall_ms()
        result = await original_claim(*a, **kw)
        event_claims.append((sent, wall_ms()))
        return result

    store.write, store.claim_due, store.claim = write, claim_due, claim

    cpu: list[tuple[float, float]] = []
    loop_lag: list[tuple[float, float]] = []

    async def sample_cpu() -> None:
        while True:
            cpu.append((wall_ms(), time.process_time()))
            await asyncio.sleep(CPU_SAMPLE_S)

    async def probe_loop() -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(LOOP_PROBE_S)
            loop_lag.append((wall_ms(), (time.perf_counter() - started - LOOP_PROBE_S) * 1000))

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    samplers = [asyncio.create_task(sample_cpu()), asyncio.create_task(probe_loop())]
    started = wall_ms()
    cpu.append((started, time.process_time()))
    async with app.router.lifespan_context(app):
        print("READY", flush=True)
        try:
            await asyncio.wait_for(stop.wait(), args.max_seconds)
        except TimeoutError:
            pass
        cpu.append((wall_ms(), time.process_time()))
    for task in samplers:
        task.cancel()
    return {
        "started_ms": started,
        "writes": writes,
        "schedule_claims": schedule_claims,
        "event_claims": event_claims,
        "cpu": cpu,
        "loop_lag": loop_lag,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--ttl", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stop-after", type=int, default=0, help="stop after this many refreshes (0: on SIGTERM)")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
