"""A fetcher for `serve --workers` tests of stale data: it fails while the key `fleet:failing` exists in the
Redis at FLEET_REDIS_URL, so a test turns its upstream off for every worker at once."""

from __future__ import annotations

import os

import redis.asyncio as redis

from eagercache import fetcher

_client: redis.Redis | None = None


@fetcher(ttl=0.3, jitter=0, timeout=2)
async def failing() -> int:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["FLEET_REDIS_URL"])
    if await _client.exists("fleet:failing"):
        raise ConnectionError("upstream down")
    return os.getpid()
