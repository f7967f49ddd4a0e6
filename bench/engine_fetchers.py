"""The fetcher that section 7's `eagercache serve` processes refresh: no upstream, no I/O, no Redis call of its own.

Its ttl comes from BENCH_ENGINE_TTL_S, read once at import (each serve process is started with the ttl its run
needs: an hour for the capacity and cold-fill runs, N / due-rate for the lag runs). Kept apart from
bench/fetchers.py so that the serve process imports nothing of the harness.
"""

from __future__ import annotations

import os

from eagercache import fetcher

TTL_ENV = "BENCH_ENGINE_TTL_S"
NAME = "engine"
# Far above any run's entry count (max_entries refuses cold writes past it) and any run's length (max_idle
# removes entries nobody read for that long).
MAX_ENTRIES = 10_000_000
MAX_IDLE_S = 7 * 24 * 3600.0


@fetcher(
    name=NAME,
    ttl=float(os.environ.get(TTL_ENV, "3600")),
    jitter=0,
    timeout=5,
    max_entries=MAX_ENTRIES,
    max_idle=MAX_IDLE_S,
)
async def engine(i: int) -> dict[str, int]:
    return {"i": i}
