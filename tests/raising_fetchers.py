"""Fetchers that raise what no fetcher should, for tests that run real `eagercache serve` processes.

Every call is logged in Redis outside the service's namespace (`raising:*`), with the pid of the process
that made it, so a test can see which processes ran into the raise. The URL comes from FLEET_REDIS_URL.
"""

from __future__ import annotations

import os

import redis.asyncio as redis

from eagercache import fetcher

_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["FLEET_REDIS_URL"])
    return _client


@fetcher(ttl=0.3, jitter=0, timeout=5)
async def exits_on_refresh(k: str) -> str:
    """Answers the first (cold) fetch of each entry; every later one, a refresh, raises SystemExit."""
    if await _redis().incr(f"raising:calls:{k}") == 1:
        return f"first {k}"
    await _redis().rpush("raising:refresh-exits", str(os.getpid()))
    raise SystemExit(3)


@fetcher(ttl=1, jitter=0, timeout=5)
async def always_exits() -> str:
    """Raises SystemExit on every fetch, the cold one of a reader included."""
    await _redis().rpush("raising:cold-exits", str(os.getpid()))
    raise SystemExit(4)
