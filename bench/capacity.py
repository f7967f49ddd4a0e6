"""Section 3: refresh capacity and lag at 10,000 and 100,000 entries, and how late Redis's own expiry events are.

Per size N (ttl = N / 2,000 s, so ~2,000 entries fall due per second):
1. steady: a refresh worker (bench/refresh_worker.py) runs eagercache's Refresher while the harness seeds N
   entries through eagercache's Store.write (a cold write each, as a first request's fetch would); the seeding process
   uses jitter = ttl so that due times spread evenly. Lag is measured for every refresh whose due time
   falls in the window: due time (the entry's score in its bucket's `due` sorted set, `{ns}{b<n>}:due`,
   read right after seeding, then the due time the worker's previous write scheduled) to the moment the
   worker's write was acknowledged by Redis.
2. burst: every entry is made due at once (ZADD on its bucket's `due`) and a fresh worker drains them: capacity.
3. events: on the same server, N plain keys with the same TTL spread, re-armed on each `expired` event
   (what a design driven by expiry events alone gets), and how late each event arrives.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aredis

from eagercache.item import build_entry, encode_data
from eagercache.keys import Keys
from eagercache.store import Store

from .hitpath import summarize_profile
from .procs import BIN, Cores, Proc, bench_env, pyspy_record

NAMESPACE = "cap:"
SEED_BATCH = 512
SEED_LEAD_MS = 1500
BURST_TTL_S = 3600.0
EVENT_GRACE_S = 3.0
STOP_SLACK_S = 1.0


def wall_ms() -> float:
    return time.time() * 1000


def percentiles(values: list[float], qs: tuple[float, ...] = (50, 90, 99, 99.9)) -> dict[str, float]:
    ordered = sorted(values)
    n = len(ordered)
    out = {str(q): ordered[min(n - 1, max(0, math.ceil(q / 100 * n) - 1))] if n else math.nan for q in qs}
    out["max"] = ordered[-1] if n else math.nan
    out["min"] = ordered[0] if n else math.nan
    out["count"] = float(n)
    return out


def run_capacity(cfg: Any, cores: Cores, redis_url: str, workdir: Path) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url)
    info = {k: client.config_get(k).get(k) for k in ("hz", "active-expire-effort", "maxmemory-policy")}
    out: dict[str, Any] = {"server_config": info, "due_per_second": cfg.due_per_second, "sizes": {}}
    try:
        for n in cfg.capacity_sizes:
            out["sizes"][str(n)] = _size(n, cfg, cores, redis_url, client, workdir)
        # The same refresher below its capacity: what lag is made of when it is not queueing.
        small = min(cfg.capacity_sizes)
        light_rate = cfg.due_per_second // 4
        out["light"] = {
            "entries": small,
            "due_per_second": light_rate,
            **_steady_run(small, light_rate, cfg, cores, redis_url, client, workdir),
        }
    finally:
        client.close()
    return out


def _worker(
    redis_url: str, ttl: float, out: Path, core: int | None, stop_after: int = 0, max_seconds: float = 600
) -> Proc:
    cmd = [
        str(BIN / "python"),
        "-m",
        "bench.refresh_worker",
        "--redis-url",
        redis_url,
        "--namespace",
        NAMESPACE,
        "--ttl",
        str(ttl),
        "--out",
        str(out),
        "--stop-after",
        str(stop_after),
        "--max-seconds",
        str(max_seconds),
    ]
    proc = Proc("refresh-worker", cmd, core=core, env=bench_env())
    deadline = time.monotonic() + 30
    while "READY" not in proc.output():
        if proc.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"refresh worker did not start: {proc.output()[-3000:]}")
        time.sleep(0.02)
    return proc


def _used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _steady_run(
    n: int, due_per_second: int, cfg: Any, cores: Cores, redis_url: str, client: redis.Redis, workdir: Path
) -> dict[str, Any]:
    """A worker refreshes N entries that fall due evenly at `due_per_second`, seeded while it runs."""
    ttl = n / due_per_second
    client.flushall()
    time.sleep(0.2)
    mem_empty = _used_memory(client)
    steady_file = workdir / f"steady-{n}-{due_per_second}.json"
    worker = _worker(redis_url, ttl, steady_file, cores.server)
    try:
        start_ms = int(wall_ms()) + SEED_LEAD_MS
        seeding = asyncio.run(seed(redis_url, n, ttl, start_ms))
        mem_seeded = _used_memory(client)
        breakdown = _memory_breakdown(client, n)
        window_from = max(float(start_ms), wall_ms()) + 1000
        window_to = window_from + cfg.steady_window_seconds * 1000
        time.sleep(max(0.0, (window_to - wall_ms()) / 1000 + STOP_SLACK_S))
        mem_steady = _used_memory(client)
        payload = _payload(client, n)
    finally:
        worker.stop(60)
        worker.close()
    steady = analyze_steady(json.loads(steady_file.read_text()), seeding.pop("due"), ttl, window_from, window_to)
    memory = {
        "empty_bytes": mem_empty,
        "seeded_bytes": mem_seeded,
        "steady_bytes": mem_steady,
        **payload,
        **breakdown,
        "per_entry_seeded": (mem_seeded - mem_empty) / n,
        "per_entry_steady": (mem_steady - mem_empty) / n,
        "overhead_seeded": (mem_seeded - mem_empty) / n - payload["body_bytes"],
        "overhead_steady": (mem_steady - mem_empty) / n - payload["body_bytes"],
    }
    return {"ttl_s": ttl, "seeding": seeding, "steady": steady, "memory": memory}


def _size(n: int, cfg: Any, cores: Cores, redis_url: str, client: redis.Redis, workdir: Path) -> dict[str, Any]:
    steady = _steady_run(n, cfg.due_per_second, cfg, cores, redis_url, client, workdir)
    bursts = []
    profile: dict[str, Any] | None = None
    for r in range(cfg.burst_rounds_small if n <= 10_000 else 1):
        _all_due(client, n)
        burst_file = workdir / f"burst-{n}-{r}.json"
        worker = _worker(
            redis_url, BURST_TTL_S, burst_file, cores.server, stop_after=n, max_seconds=cfg.burst_max_seconds
        )
        try:
            if r == 0:
                profile = _profile(worker.pid, cores, workdir / f"burst-{n}-profile.txt", seconds=3)
            worker.process.wait(600)
        finally:
            worker.close()
        bursts.append(analyze_burst(json.loads(burst_file.read_text()), n))
    events = asyncio.run(expiry_events(redis_url, n, steady["ttl_s"], cfg.events_window_seconds))
    return {"entries": n, **steady, "bursts": bursts, "events": events, "burst_profile": profile}


def _profile(pid: int, cores: Cores, raw: Path, seconds: int) -> dict[str, Any]:
    cmd = pyspy_record(pid, seconds, raw)
    if cmd is None:
        return {"error": "py-spy is not installed in the venv"}
    spy = Proc("py-spy", cmd, core=cores.load, env=bench_env())
    try:
        spy.process.wait(seconds + 30)
    finally:
        spy.close()
    if not raw.exists():
        return {"error": "py-spy wrote no profile"}
    return summarize_profile(raw.read_text())


def store_keys(client: redis.Redis, namespace: str) -> Keys:
    """The key names of the store under `namespace`, with the bucket count it keeps in `{ns}layout`."""
    layout = client.get(Keys(namespace).layout)
    return Keys(namespace, int(layout) if layout is not None else 1)


def _memory_breakdown(client: redis.Redis, n: int) -> dict[str, float]:
    """MEMORY USAGE of what one entry is made of (sampled keys; the sorted sets and hash divided by N)."""
    keys = store_keys(client, NAMESPACE)
    step = max(1, n // 50)
    items = [client.memory_usage(keys.item(f"noop?i={i}"), samples=0) for i in range(0, n, step)]
    shadows = [client.memory_usage(keys.shadow(f"noop?i={i}"), samples=0) for i in range(0, n, step)]
    live_shadows = [s for s in shadows if s]

    def per_entry(kind: str) -> float:
        total = sum(client.memory_usage(getattr(b, kind), samples=0) or 0 for b in keys.buckets)
        return total / n

    return {
        "keys": float(client.dbsize()),
        "buckets": float(len(keys.buckets)),
        "item_key_bytes": sum(i or 0 for i in items) / len(items),
        "shadow_key_bytes": sum(live_shadows) / len(live_shadows) if live_shadows else 0.0,
        "due_zset_bytes_per_entry": per_entry("due"),
        "read_zset_bytes_per_entry": per_entry("read"),
        "counts_hash_bytes_per_entry": per_entry("counts"),
    }


async def open_store(redis_url: str, namespace: str) -> Store:
    """eagercache's Store, connected and prepared as `eagercache serve` prepares it (scripts loaded, bucket
    count settled: the first process writes it, 256 buckets on a cluster, 1 on a standalone server)."""
    store = Store(redis_url, namespace=namespace)
    try:
        await store.prepare()
        await store.sync_clock()
    except BaseException:
        await store.aclose()
        raise
    return store


async def seed(redis_url: str, n: int, ttl: float, start_ms: int) -> dict[str, Any]:
    """Write N entries through eagercache's Store.write, entry i due at start_ms + i * ttl / n.

    Entries are written in due order; as long as seeding is faster than entries fall due, every entry is
    written before its due time (those that are not are counted as late).
    """

    store = await open_store(redis_url, NAMESPACE)
    now_ms = store.clock.now_ms  # the store's clock, as the service keeps time
    due: dict[int, float] = {}
    late = 0

    async def one(i: int) -> None:
        nonlocal late
        now = now_ms()
        due_in = start_ms + i * int(ttl * 1000) // n - now
        if due_in < 1:
            late, due_in = late + 1, 1
        value, _ = build_entry(encode_data({"i": i}, "noop"), now, now + due_in)
        await store.write(f"noop?i={i}", "noop", value, now + due_in, mode="cold", max_entries=n)
        due[i] = now + due_in

    started = time.monotonic()
    try:
        for batch in range(0, n, SEED_BATCH):
            await asyncio.gather(*(one(i) for i in range(batch, min(n, batch + SEED_BATCH))))
    finally:
        await store.aclose()
    seconds = time.monotonic() - started
    return {"due": due, "late": late, "seconds": seconds, "rate": n / seconds}


def _payload(client: redis.Redis, n: int) -> dict[str, float]:
    keys = store_keys(client, NAMESPACE)
    sample = [keys.item(f"noop?i={i}") for i in range(0, n, max(1, n // 200))]
    values = [bytes(v) for v in client.mget(sample) if isinstance(v, bytes)]
    bodies = [v if v.startswith(b"{") else v.partition(b"\n")[2] for v in values]
    return {
        "stored_value_bytes": sum(map(len, values)) / len(values),
        "body_bytes": sum(map(len, bodies)) / len(bodies),
        "entry_id_bytes": sum(len(f"noop?i={i}") for i in range(0, n, max(1, n // 200))) / len(sample),
    }


def _all_due(client: redis.Redis, n: int) -> None:
    """Every entry due now: ZADD XX of its member in its bucket's schedule (`{ns}{b<n>}:due`)."""
    keys = store_keys(client, NAMESPACE)
    now = int(wall_ms())
    by_bucket: dict[str, dict[str, int]] = {}
    for i in range(n):
        entry_id = f"noop?i={i}"
        by_bucket.setdefault(keys.bucket_of(entry_id).due, {})[entry_id] = now
    with client.pipeline(transaction=False) as pipe:
        for due_key, members in by_bucket.items():
            ids = list(members)
            for start in range(0, len(ids), 10_000):
                pipe.zadd(due_key, {i: now for i in ids[start : start + 10_000]}, xx=True)
        pipe.execute()


def _between(samples: list[list[float]], t: float) -> float:
    """Linear interpolation of (time, value) samples at time t."""
    for (t0, v0), (t1, v1) in itertools.pairwise(samples):
        if t0 <= t <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
    return samples[-1][1] if t > samples[-1][0] else samples[0][1]


def analyze_steady(
    doc: dict[str, Any], seed_due: dict[int, float], ttl: float, window_from: float, window_to: float
) -> dict[str, Any]:
    ttl_ms = ttl * 1000
    due_now = dict(seed_due)
    lag: list[float] = []
    to_fetch: list[float] = []
    fetch_to_stored: list[float] = []
    write_rtt: list[float] = []
    for i, fetch_started, sent, done, next_due in sorted(doc["writes"], key=lambda w: w[2]):
        due = due_now.get(i)
        if due is not None and window_from <= due < window_to:
            lag.append(done - due)
            if not math.isnan(fetch_started):
                to_fetch.append(fetch_started - due)
                fetch_to_stored.append(done - fetch_started)
            write_rtt.append(done - sent)
        # The due time the write scheduled (one ttl after the previous due time, or after the write if late).
        due_now[i] = next_due if not math.isnan(next_due) else sent + ttl_ms
    # Entries due in the window that were not refreshed by the time the worker stopped: their lag is at least
    # (stop - due). Counting them keeps a backlog from hiding; percentiles are then lower bounds.
    stopped = doc["cpu"][-1][0]
    censored = [stopped - d for d in due_now.values() if window_from <= d < window_to]
    missed = len(censored)
    lag += censored
    done_in_window = sum(1 for w in doc["writes"] if window_from <= w[3] < window_to)
    seconds = (window_to - window_from) / 1000
    cpu = _between(doc["cpu"], window_to) - _between(doc["cpu"], window_from)
    claims = [c for c in doc["schedule_claims"] if window_from <= c[0] < window_to]
    events = [c for c in doc["event_claims"] if window_from <= c[0] < window_to]
    loop_lag = [v for t, v in doc["loop_lag"] if window_from <= t < window_to]
    return {
        "window_s": seconds,
        "refreshes_per_s": done_in_window / seconds,
        "lag_ms": percentiles(lag),
        "due_to_fetch_ms": percentiles(to_fetch),
        "fetch_to_stored_ms": percentiles(fetch_to_stored),
        "write_rtt_ms": percentiles(write_rtt),
        "not_refreshed_by_stop": missed,
        "lag_is_lower_bound": missed > 0,
        "cpu_s": cpu,
        "cpu_util": cpu / seconds,
        "cpu_s_per_1000": cpu / done_in_window * 1000 if done_in_window else math.nan,
        "schedule_claims_per_s": len(claims) / seconds,
        "entries_per_schedule_claim": sum(c[2] for c in claims) / len(claims) if claims else 0.0,
        "empty_schedule_claims_share": sum(1 for c in claims if c[2] == 0) / len(claims) if claims else 0.0,
        "schedule_claim_rtt_ms": percentiles([c[1] - c[0] for c in claims]),
        "event_claims_per_s": len(events) / seconds,
        "event_claim_rtt_ms": percentiles([c[1] - c[0] for c in events]),
        "loop_lag_ms": percentiles(loop_lag),
    }


def analyze_burst(doc: dict[str, Any], n: int) -> dict[str, Any]:
    writes = doc["writes"]
    started = doc["started_ms"]
    last = max(w[3] for w in writes)
    first_claim = min((c[0] for c in doc["schedule_claims"]), default=started)
    seconds = (last - started) / 1000
    cpu = _between(doc["cpu"], last) - _between(doc["cpu"], started)
    return {
        "refreshed": len(writes),
        "seconds": seconds,
        "refreshes_per_s": len(writes) / seconds,
        "refreshes_per_s_after_start": len(writes) / ((last - first_claim) / 1000),
        "cpu_s": cpu,
        "cpu_s_per_1000": cpu / len(writes) * 1000,
        "cpu_util": cpu / seconds,
        "write_rtt_ms": percentiles([w[3] - w[2] for w in writes]),
        "loop_lag_ms": percentiles([v for _, v in doc["loop_lag"]]),
        "schedule_claims": len(doc["schedule_claims"]),
        "event_claims": len(doc["event_claims"]),
    }


async def expiry_events(redis_url: str, n: int, ttl: float, window_s: float) -> dict[str, Any]:
    """N keys expiring evenly over ttl, each re-armed (SET PXAT now + ttl) when its `expired` event arrives."""
    client = aredis.Redis.from_url(redis_url)
    prefix = "probe:{b0}:shadow:noop?i="
    ttl_ms = int(ttl * 1000)
    scheduled: dict[bytes, int] = {}
    late: list[float] = []
    try:
        await client.flushdb()
        flags = str((await client.config_get("notify-keyspace-events")).get("notify-keyspace-events") or "")
        if not ("E" in flags and ("x" in flags or "A" in flags)):
            await client.config_set("notify-keyspace-events", flags + "Ex")
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        await pubsub.psubscribe("__keyevent@*__:expired")
        start = int(wall_ms()) + 1000
        window_from, window_to = start, start + int(window_s * 1000)
        async with client.pipeline(transaction=False) as pipe:
            for i in range(n):
                key = f"{prefix}{i}".encode()
                at = start + i * ttl_ms // n
                scheduled[key] = at
                pipe.set(key, b"", pxat=at)
                if i % 5000 == 4999:
                    await pipe.execute()
            await pipe.execute()
        rearm: list[bytes] = []
        deadline = window_to + EVENT_GRACE_S * 1000
        while wall_ms() < deadline:
            message = await pubsub.get_message(timeout=0.05)
            now = wall_ms()
            if message is not None:
                key = message["data"]
                expires = scheduled.get(key)
                if expires is not None:
                    if window_from <= expires < window_to:
                        late.append(now - expires)
                    rearm.append(key)
            if rearm and (message is None or len(rearm) >= 64):
                async with client.pipeline(transaction=False) as pipe:
                    for key in rearm:
                        scheduled[key] = int(now) + ttl_ms
                        pipe.set(key, b"", pxat=int(now) + ttl_ms)
                    await pipe.execute()
                rearm.clear()
        pending = sum(1 for at in scheduled.values() if window_from <= at < window_to)
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()
    return {
        "window_s": window_s,
        "lateness_ms": percentiles(late),
        "no_event_within_grace": pending,
        "grace_s": EVENT_GRACE_S,
    }
