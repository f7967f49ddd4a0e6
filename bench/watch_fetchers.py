"""The fetcher that section 8's `eagercache serve` processes serve to watchers: a new version on every fetch.

Each version carries a counter and the role of the process that fetched it (BENCH_WATCH_ROLE, else its pid),
so the harness can tell which process wrote each change its watchers received. The ttl and jitter come from
BENCH_WATCH_TTL_S and BENCH_WATCH_JITTER_S, read once at import. Kept apart from bench/fetchers.py so that
the serve process imports nothing of the harness.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from eagercache import fetcher

NAME = "tick"
TTL_ENV = "BENCH_WATCH_TTL_S"
JITTER_ENV = "BENCH_WATCH_JITTER_S"
ROLE_ENV = "BENCH_WATCH_ROLE"
ROLE = os.environ.get(ROLE_ENV) or str(os.getpid())
MAX_ENTRIES = 1_000_000
MAX_IDLE_S = 7 * 24 * 3600.0  # nothing a run does is idle for long; watched entries never are anyway

# About 200 bytes of JSON that never change: the body is ~330 bytes with the envelope, a patch ~250.
PAYLOAD: dict[str, Any] = {
    "symbol": "EURUSD",
    "bid": 1.08412,
    "ask": 1.08431,
    "venue": "bench",
    "tags": ["fx", "spot", "major"],
    "window": {"from": "2026-11-25T00:00:00Z", "to": "2026-11-25T23:59:59Z"},
}
_versions = itertools.count(1)


@fetcher(
    name=NAME,
    ttl=float(os.environ.get(TTL_ENV, "1")),
    jitter=float(os.environ.get(JITTER_ENV, "0")),
    timeout=5,
    max_entries=MAX_ENTRIES,
    max_idle=MAX_IDLE_S,
)
async def tick(id: int) -> dict[str, Any]:
    return {"id": id, "version": next(_versions), "by": ROLE, **PAYLOAD}
