"""Fetchers for the /watch tests that run real `eagercache serve` processes: their data is what a test puts in Redis.

The URL comes from FLEET_REDIS_URL. `watchtest:value:<k>` holds the data (JSON) and `watchtest:fail:<k>`, while it
exists, makes the fetch fail; both live outside the service's namespace.
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis.asyncio as redis

from eagercache import fetcher

# Bodies large enough that a change's patch is smaller than the new body (else a snapshot is sent instead).
PAD = "x" * 300
_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["FLEET_REDIS_URL"])
    return _client


async def _value(k: str) -> Any:
    if await _redis().exists(f"watchtest:fail:{k}"):
        raise ConnectionError(f"upstream of {k} is down")
    raw = await _redis().get(f"watchtest:value:{k}")
    return None if raw is None else json.loads(raw)


@fetcher(ttl=60, jitter=0, timeout=5)
async def valued(k: str) -> dict[str, Any]:
    """Refreshed when an admin asks (POST /admin/fetchers/valued/refresh), within the test's time."""
    return {"k": k, "value": await _value(k), "pad": PAD}


@fetcher(ttl=0.2, jitter=0, timeout=2)
async def flaky(k: str) -> dict[str, Any]:
    """Refreshed every 0.2 s by whichever process claims it."""
    return {"k": k, "value": await _value(k)}
