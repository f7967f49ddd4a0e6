"""Fetchers for tests that run real `eagercache serve` processes.

Each call is logged in Redis outside the service's namespace (`fleet:*`), so a test can count fetches
across processes. The URL comes from FLEET_REDIS_URL; FLEET_FETCH_S makes every fetch take that long.
"""

from __future__ import annotations

import asyncio
import os
import time

import redis.asyncio as redis

from eagercache import fetcher

_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["FLEET_REDIS_URL"])
    return _client


@fetcher(ttl=1, jitter=0, timeout=30)
async def counted(k: str) -> dict[str, str]:
    await _redis().rpush(f"fleet:calls:{k}", f"{time.time():.6f} {os.getpid()}")
    pause = float(os.environ.get("FLEET_FETCH_S", "0"))
    if pause:
        await _redis().incr("fleet:started")
        await asyncio.sleep(pause)
        await _redis().incr("fleet:finished")
    return {"k": k, "pid": str(os.getpid())}


# The server's clock, not this process's: a test may run this fetcher in a process whose clock is skewed.
_LOG_BY_SERVER_TIME = """
local t = redis.call('TIME')
redis.call('RPUSH', KEYS[1], t[1] .. '.' .. string.format('%06d', tonumber(t[2])) .. ' ' .. ARGV[1])
return 1
"""


@fetcher(ttl=1, jitter=0, timeout=1)
async def quick(k: str) -> dict[str, str]:
    """Logs each call under fleet:calls:<k> as '<server time> <pid>'; a short timeout keeps leases short."""
    await _redis().eval(_LOG_BY_SERVER_TIME, 1, f"fleet:calls:{k}", str(os.getpid()))
    return {"k": k}


# Fetchers that raise what no fetcher should: each call is logged under `raising:*` with its process's pid,
# so a test can see which processes ran into the raise.


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


@fetcher(ttl=60, jitter=0, timeout=60)
async def held(k: str) -> str:
    """Logs its process's pid under fleet:held, then runs until that process dies (or a minute passes)."""
    await _redis().rpush("fleet:held", str(os.getpid()))
    await asyncio.sleep(60)
    return k


# What no version of `ticking` changes: its body outweighs a patch, so the server sends patches, not snapshots.
_TEXT = "Text that stays the same from one version to the next. " * 12


@fetcher(ttl=0.3, jitter=0, timeout=5)
async def ticking(k: str) -> dict[str, object]:
    """Data that changes on every fetch (a counter, fleet:tick:<k>) until a test sets fleet:tick:<k>:frozen.

    Its list grows and shrinks and a member comes and goes, so the patches between versions add, remove and
    replace, in arrays and objects; a key with '/' and '~' needs JSON Pointer's escapes (RFC 6901, section 3).
    """
    client = _redis()
    if await client.exists(f"fleet:tick:{k}:frozen"):
        n = int(await client.get(f"fleet:tick:{k}") or 0)
    else:
        n = int(await client.incr(f"fleet:tick:{k}"))
    odd = {"odd": True} if n % 2 else {}
    return {"k": k, "n": n, "items": [f"i{j}" for j in range(n % 4)], "nested": {"a/b~c": n, **odd}, "text": _TEXT}
