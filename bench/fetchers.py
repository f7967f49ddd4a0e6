"""Fetchers that the benchmark's `eagercache serve` processes, the cache-aside app and the cashews app serve.

Calls of `slow` and `cold` are counted in Redis outside any cache namespace (`bench:calls:*`, at
BENCH_REDIS_URL), so the harness can count fetches across processes. BENCH_FETCH_S sets how long `slow`
and `cold` take. `noop` touches nothing: section 5 counts its refreshes from eagercache's own metrics.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import redis.asyncio as redis

from eagercache import fetcher

CALLS_KEY = "bench:calls:{name}"
CALLS_BY_KEY = "bench:calls-by-key:{name}"
CALL_TIMES = "bench:call-times:{name}:{key}"  # list of call times, s since the epoch
SLOW_TTL_S = 2.0

# About 200 bytes of JSON: with eagercache's last_retrieved/last_modified envelope the body is ~300 bytes.
QUOTE: dict[str, Any] = {
    "symbol": "EURUSD",
    "bid": 1.08412,
    "ask": 1.08431,
    "open": 1.0822,
    "high": 1.0861,
    "low": 1.08104,
    "volume": 1843920,
    "venue": "bench",
    "tags": ["fx", "spot", "major"],
    "window": {"from": "2026-11-25T00:00:00Z", "to": "2026-11-25T23:59:59Z"},
}

_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
    return _client


async def _count(name: str, key: str) -> None:
    async with _redis().pipeline(transaction=False) as pipe:
        pipe.incr(CALLS_KEY.format(name=name))
        pipe.hincrby(CALLS_BY_KEY.format(name=name), key, 1)
        pipe.rpush(CALL_TIMES.format(name=name, key=key), f"{time.time():.6f}")
        await pipe.execute()


@fetcher(ttl=3600, jitter=0, timeout=5)
async def quote() -> dict[str, Any]:
    """One warm entry for the hit-path benchmark: never due during a run."""
    return QUOTE


async def slow_fetch(k: str) -> dict[str, Any]:
    """The upstream of section 2: takes BENCH_FETCH_S (0.2 s); shared by all three caches."""
    await _count("slow", k)
    await asyncio.sleep(float(os.environ.get("BENCH_FETCH_S", "0.2")))
    return {"k": k, **QUOTE}


@fetcher(ttl=SLOW_TTL_S, jitter=0, timeout=5, name="slow")
async def slow(k: str) -> dict[str, Any]:
    return await slow_fetch(k)


@fetcher(ttl=3600, jitter=0, timeout=10)
async def cold(k: str) -> dict[str, Any]:
    """The stampede's fetcher: one cold key per round, read by many clients at once."""
    await _count("cold", k)
    await asyncio.sleep(float(os.environ.get("BENCH_FETCH_S", "0.5")))
    return {"k": k, **QUOTE}


NOOP_TTL_S = 1.0


@fetcher(ttl=NOOP_TTL_S, jitter=0, timeout=5)
async def noop(i: int) -> dict[str, int]:
    """Section 5's fetcher: no upstream, no Redis call of its own (the harness must count only eagercache's
    commands), and a 1 s ttl, so that every seeded entry is due again long before it can be refreshed."""
    return {"i": i}


# Section 6's entries: the same fields for every id, the id zero-padded, so every body has the same size.
ITEM_WIDTH = 7
ITEM: dict[str, Any] = {
    "kind": "bench-item",
    "price": 104.25,
    "currency": "EUR",
    "stock": 1843,
    "tags": ["a", "b", "c"],
    "updated": "2026-11-25T00:00:00Z",
}


def item_data(id: int) -> dict[str, Any]:
    """What `item` returns for this id, for the harness to seed the store with the same bytes."""
    return {"id": f"{id:0{ITEM_WIDTH}d}", **ITEM}


@fetcher(ttl=3600, jitter=0, timeout=5, max_entries=1_000_000)
async def item(id: int) -> dict[str, Any]:
    """Section 6: one entry per id (100,000 of them), never due during a run."""
    return item_data(id)
