"""Section 2: a 200 ms fetcher, 50 keys, ttl 2 s, steady load: eagercache vs cache-aside vs cashews."""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from typing import Any

import httpx
import redis

from .config import Config
from .fetchers import CALL_TIMES, CALLS_KEY, SLOW_TTL_S
from .hitpath import eagercache_cmd
from .loadgen import SLOW_US, run_load
from .procs import BIN, Cores, Proc, bench_env, free_port

SYSTEMS = ("eagercache", "cache-aside", "cashews")
DESCRIPTIONS = {
    "eagercache": "`eagercache serve` (refresh ahead: events + schedule)",
    "cache-aside": "eagercache's own app with the Refresher never started and each stored item given a Redis TTL "
    "of ttl (PEXPIRE after eagercache's write): a read after expiry misses and waits (bench/aside_app.py)",
    "cashews": "cashews `@cache(ttl=2)` on Redis in a small Starlette app (bench/cashews_app.py)",
}


def _command(system: str, port: int, redis_url: str) -> list[str]:
    if system == "eagercache":
        return eagercache_cmd(port, redis_url, "expiry:", "bench.fetchers:slow")
    module = {"cache-aside": "bench.aside_app", "cashews": "bench.cashews_app"}[system]
    return [str(BIN / "python"), "-m", module, "--port", str(port), "--redis-url", redis_url]


def cashews_available() -> bool:
    try:
        import cashews  # noqa: F401
    except ImportError:
        return False
    return True


def run_expiry(cfg: Config, cores: Cores, redis_url: str) -> dict[str, Any]:
    systems = [s for s in SYSTEMS if s != "cashews" or cashews_available()]
    paths = [f"/data/slow?k=k{i:02d}" for i in range(cfg.expiry_keys)]
    client = redis.Redis.from_url(redis_url)
    rounds: list[dict[str, Any]] = []
    try:
        for r in range(cfg.expiry_rounds):
            order = systems if r % 2 == 0 else systems[::-1]
            rounds.append({name: _one(name, cfg, cores, redis_url, client, paths) for name in order})
    finally:
        client.close()
    return {
        "systems": systems,
        "descriptions": {s: DESCRIPTIONS[s] for s in systems},
        "cashews_available": cashews_available(),
        "keys": cfg.expiry_keys,
        "ttl_s": SLOW_TTL_S,
        "fetch_s": cfg.fetch_seconds,
        "seconds": cfg.expiry_seconds,
        "connections": cfg.expiry_connections,
        "slow_ms": SLOW_US / 1000,
        "rounds": rounds,
    }


def _one(
    system: str, cfg: Config, cores: Cores, redis_url: str, client: redis.Redis, paths: list[str]
) -> dict[str, Any]:
    client.flushdb()
    port = free_port()
    env = bench_env(BENCH_REDIS_URL=redis_url, BENCH_FETCH_S=str(cfg.fetch_seconds))
    proc = Proc(system, _command(system, port, redis_url), core=cores.server, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(base + ("/readyz" if system == "eagercache" else "/healthz"))
        warm = asyncio.run(_warm_up(base, paths))
        misses_before = _misses(base)
        before = int(client.get(CALLS_KEY.format(name="slow")) or 0)
        started, wall_started = time.monotonic(), time.time()
        load = run_load(base, paths, duration_s=cfg.expiry_seconds, connections=cfg.expiry_connections, core=cores.load)
        elapsed, wall_ended = time.monotonic() - started, time.time()
        after = int(client.get(CALLS_KEY.format(name="slow")) or 0)
        misses_after = _misses(base)
        rates = _per_ttl_rates(client, wall_started, wall_ended, cfg.expiry_keys)
        cpu = proc.cpu_seconds()
    finally:
        proc.close()
    calls = after - before
    periods = elapsed / SLOW_TTL_S
    return {
        **load.to_json(),
        "warm_statuses": warm,
        "fetches": calls,
        "fetch_window_s": elapsed,
        "fetches_per_key_per_ttl_count": calls / len(paths) / periods,
        "fetches_per_key_per_ttl": statistics.mean(rates) if rates else math.nan,
        "fetches_per_key_per_ttl_min": min(rates, default=math.nan),
        "fetches_per_key_per_ttl_max": max(rates, default=math.nan),
        "misses": None if misses_before is None or misses_after is None else misses_after - misses_before,
        "slow_share": load.slow / load.requests if load.requests else 0.0,
        "server_cpu_seconds": cpu,
    }


def _misses(base: str) -> float | None:
    """Reads that waited for a fetch, from eagercache's own counter (None for an app without it)."""
    reply = httpx.get(base + "/metrics", timeout=10)
    if reply.status_code != 200:
        return None
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in reply.text.splitlines()
        if line.startswith("eagercache_requests_total{") and 'result="miss"' in line
    )


def _per_ttl_rates(client: redis.Redis, since: float, until: float, keys: int) -> list[float]:
    """Per key: fetches per ttl from the spacing of its fetches in the window, (n - 1) / (last - first) * ttl.

    Unlike a plain count over the window, this does not depend on where the window cuts the refresh cycle.
    """
    rates = []
    for i in range(keys):
        times = [float(t) for t in client.lrange(CALL_TIMES.format(name="slow", key=f"k{i:02d}"), 0, -1)]
        inside = [t for t in times if since <= t <= until]
        if len(inside) >= 2:
            rates.append((len(inside) - 1) / (inside[-1] - inside[0]) * SLOW_TTL_S)
    return rates


async def _warm_up(base: str, paths: list[str]) -> dict[str, int]:
    """One read of every key (each a miss that runs the fetcher), then a moment for the writes to land."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        replies = await asyncio.gather(*(http.get(p) for p in paths))
    statuses: dict[str, int] = {}
    for reply in replies:
        statuses[str(reply.status_code)] = statuses.get(str(reply.status_code), 0) + 1
    await asyncio.sleep(0.2)
    return statuses
