"""Durations and sizes of a run: the full run (`make bench`, about 21 minutes on 2 cores) or BENCH_QUICK=1.

BENCH_SECTIONS=1,3 runs only those sections (the report marks the others as not run).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Config:
    quick: bool
    sections: tuple[int, ...]
    # 1. hit path
    hit_rounds: int
    hit_seconds: float
    hit_connections: int
    hit_warmup_seconds: float
    profile_seconds: float
    # 6. many keys: warm hits spread over many entries, against one Redis GET per request / a dict
    many_keys: int  # entries on redis:// (seeded through eagercache's Store.write)
    many_memory_keys: int  # entries on memory:// (seeded by HTTP cold fills: a few hundred a second)
    many_samples: int  # ids in each precomputed request sequence (uniform, Zipf)
    many_zipf_s: float
    many_rounds: int
    many_seconds: float
    many_warmup_seconds: float
    many_connections: int
    # 2. eager refresh vs cache-aside
    expiry_rounds: int
    expiry_seconds: float
    expiry_keys: int
    expiry_connections: int
    fetch_seconds: float
    # 3. refresh capacity and lag
    capacity_sizes: tuple[int, ...]
    due_per_second: int
    steady_window_seconds: float
    burst_rounds_small: int
    burst_max_seconds: float
    events_window_seconds: float
    # 4. cold stampede
    stampede_requests: int
    stampede_rounds: int
    stampede_processes: int
    stampede_fetch_seconds: float
    # 5. scaling: standalone vs a Redis Cluster, 1 vs several serve processes
    scaling_entries: int
    scaling_processes: tuple[int, ...]
    scaling_primaries: int
    scaling_warmup_seconds: float
    scaling_window_seconds: float
    # 7. refresh engine of a real serve process: capacity, lag, memory, cold fills (issue 16's figures)
    engine_capacity_entries: int
    engine_capacity_rounds: int
    engine_profile_seconds: float
    engine_due_per_second: int
    engine_lag_sizes: tuple[int, ...]
    engine_lag_window_seconds: float
    engine_cold_seconds: float
    engine_cold_connections: int
    # 8. watchers: SSE streams on one serve process, the versions written by another (issue 11's figures)
    # (watchers, entries they spread over, ttl s: each entry gets a new version this often)
    watch_runs: tuple[tuple[int, int, float], ...]
    watch_window_seconds: float
    watch_clients: int  # client processes holding the streams, on the load core
    # 9. targeted invalidation (issue 13's figures)
    invalidation_entries: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_config() -> Config:
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    sections = tuple(int(s) for s in os.environ.get("BENCH_SECTIONS", "1,2,3,4,5,6,7,8,9,10").split(",") if s.strip())
    return Config(
        quick=quick,
        sections=sections,
        # Section 1 measures both server stacks (fast, plain): 2 x 2 runs a round.
        hit_rounds=2 if quick else 4,
        hit_seconds=3 if quick else 8,
        hit_connections=32,
        hit_warmup_seconds=1 if quick else 3,
        profile_seconds=3 if quick else 8,
        many_keys=30_000 if quick else 100_000,
        # memory:// entries are filled over HTTP, ~500-900 a second per server (both at once, one per core):
        # about 2-3 of section 6's ~6 minutes in a full run.
        many_memory_keys=10_000 if quick else 100_000,
        many_samples=200_000 if quick else 500_000,
        many_zipf_s=1.0,
        many_rounds=1 if quick else 2,
        many_seconds=2 if quick else 4,
        many_warmup_seconds=1 if quick else 2,
        many_connections=32,
        expiry_rounds=1 if quick else 2,
        expiry_seconds=8 if quick else 30,
        expiry_keys=50,
        expiry_connections=16,
        fetch_seconds=0.2,
        capacity_sizes=(10_000,) if quick else (10_000, 100_000),
        due_per_second=2_000,
        steady_window_seconds=6 if quick else 20,
        burst_rounds_small=2 if quick else 3,
        burst_max_seconds=12 if quick else 30,
        events_window_seconds=6 if quick else 20,
        stampede_requests=1_000,
        stampede_rounds=1 if quick else 3,
        stampede_processes=3,
        stampede_fetch_seconds=0.5,
        scaling_entries=5_000 if quick else 30_000,
        scaling_processes=(1, 3),
        scaling_primaries=3,
        scaling_warmup_seconds=3,
        scaling_window_seconds=5 if quick else 15,
        engine_capacity_entries=10_000,
        engine_capacity_rounds=3 if quick else 5,
        engine_profile_seconds=4 if quick else 10,
        engine_due_per_second=10_000,
        # BENCH_ENGINE_LAG_SIZES=100000,1000000 measures the million-entry lag in a quick run too
        engine_lag_sizes=tuple(
            int(n) for n in os.environ.get("BENCH_ENGINE_LAG_SIZES", "100000" if quick else "100000,1000000").split(",")
        ),
        engine_lag_window_seconds=5 if quick else 20,
        engine_cold_seconds=3 if quick else 8,
        engine_cold_connections=32,
        # Over 1,000 entries a version each 5 s: 200 versions/s. The watched process spends 1-2 ms of CPU on a
        # version of 10 watchers (re-read, diff, sends): a version each 1 s would saturate it with that alone.
        watch_runs=((1_000, 1, 1.0), (1_000, 100, 1.0)) if quick else ((10_000, 1, 1.0), (10_000, 1_000, 5.0)),
        watch_window_seconds=6 if quick else 20,
        watch_clients=2 if quick else 4,
        invalidation_entries=20_000 if quick else 100_000,
    )
