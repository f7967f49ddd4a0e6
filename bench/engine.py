"""Section 7: the refresh engine of a real `eagercache serve` process, on both server stacks (issue 16's figures).

Every figure comes from an `eagercache serve` process (fetcher `bench.engine_fetchers:engine`: no upstream, no
I/O; default settings; the section's redis-server) observed from outside: through Redis (the schedule, the
stored headers, INFO), the process's /metrics and its CPU time (/proc/<pid>/task/*/schedstat, in ns).
Stacks: fast = `--loop uvloop --http httptools` (what `auto` picks where they are installed), plain =
`--loop asyncio --http h11`.

1. Refresh capacity. N = 10,000 entries are seeded due an hour from now and the server is started with the
   fetcher's ttl at an hour (a refreshed entry is not due again during the run). Then every entry is made due
   at once (ZADD XX to now in its bucket's `{ns}{b<n>}:due`), and the harness polls Redis every 10 ms:
   refreshed = schedule members whose score is more than half an hour ahead (a claim moves an entry's score
   to its lease end, seconds ahead; its write to the next due time, an hour ahead). Rate = the middle 80 % of
   the drain (from 10 % to 90 % refreshed) / the time it took, while the process is saturated; CPU per
   refresh = the process's CPU time over the same interval / those refreshes. Both stacks' processes run at
   once, each with its own entries, and the rounds alternate between them (a change in the machine's other
   load then falls on both); /metrics (`eagercache_fetches_total`) confirms each round's count. Then, on the
   fast stack only, py-spy samples the process while it drains further rounds (apart: sampling slows the
   process), which says where a refresh's CPU time goes; and again after 7.2's window, in the backlog.
2. Refresh lag. N entries (100,000; also 1,000,000 in the full run) with ttl = N / 10,000 s, so that 10,000
   fall due per second (fast stack). Seeded due an hour ahead, then, with the server running, re-armed in due
   order: entry i due at start + i * ttl / N in the schedule, its shadow key expiring SHADOW_GRACE_MS after
   that (what the entry's previous write would have left). Window: from 1 s after re-arming is done, at most
   ttl - 4 s long, so that no entry is due twice in it. Lag of each entry due in the window = the
   `last_retrieved` time in its stored header (the refresh's own clock reading, taken after the fetch
   returned, before the write) - its due time.
   Entries not refreshed by the time their header is read count with lag = read time - due (the percentiles
   are then lower bounds). The process's own `eagercache_refresh_lag_seconds` histogram (due to stored) over
   the window is the cross-check.
3. Memory, in each lag run before the server starts: INFO used_memory of the empty store, after seeding N
   entries, and after deleting every shadow key; per entry, less the body a reader gets (the JSON after the
   stored header line). MEMORY USAGE of sampled keys, and of the whole sorted sets and hash, for a breakdown.
4. Cold fills: GETs of ids never requested before (a list of distinct paths, each sent once), 32 connections,
   the fetcher's ttl an hour; misses/s from the process's /metrics (`eagercache_requests_total{result="miss"}`).

Seeding writes pipelined plain commands along the documented key layout (keys.py) - the item (a value
eagercache's item.build_entry makes), the shadow key and its expiry, a member of the bucket's `due` and `read`
sorted sets, the bucket's count - a million entries in seconds where Store.write (a script call and round trip
each) takes minutes. Before any of it, one probe entry written by eagercache's Store.write and one written
this way are compared key by key (names, types, expiries, values, sorted-set members, counts); if they differ
(the layout changed), every entry is written with Store.write instead, and the results say so.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import math
import os
import re
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from eagercache.item import Entry, build_entry, encode_data, etag_of
from eagercache.keys import Bucket, Keys
from eagercache.scripts import SHADOW_GRACE_MS

from .capacity import open_store, percentiles
from .config import Config
from .engine_fetchers import NAME as FETCHER
from .engine_fetchers import TTL_ENV
from .hitpath import eagercache_cmd, summarize_profile
from .loadgen import run_load
from .procs import Cores, Proc, bench_env, free_port, pyspy_record

NAMESPACE = "engine:"
FETCHER_SPEC = "bench.engine_fetchers:engine"
STACKS: dict[str, tuple[str, str]] = {"fast": ("uvloop", "httptools"), "plain": ("asyncio", "h11")}
LAG_STACK = "fast"
# The capacity drain also runs on the fast stack with this many fetch slots (the default is 64): how far more
# refreshes in flight take one process, and where redis-server's own core then stands.
WIDE = "fast, 1024 slots"
WIDE_SLOTS = 1024
FAR_MS = 3_600_000  # seeded entries fall due this far ahead: nothing is due until the harness says so
PROBE_ID = -1  # the probe entry of the layout check; no run uses it
POLL_S = 0.01
DRAIN_TIMEOUT_S = 60.0
SEED_CHUNK = 4_000
LAG_LEAD_MS = 1_000  # re-arming starts this long before the first entry falls due
LAG_WARMUP_MS = 1_000  # the window starts this long after re-arming is done
LAG_SETTLE_MS = 1_000  # headers are read this long after the window (the last entries' refreshes land)
LAG_TTL_MARGIN_S = 4.0  # the window is at most ttl - this: no entry is due twice in it, headers read in time
PROFILE_RATE_HZ = 250
COLD_PATHS_PER_S = 40_000  # distinct paths per second of load: above any miss rate one process reaches
COLD_WARMUP_S = 1.0
MEMORY_SAMPLES = 200
HEADER_LAST_BYTE = 127
# A due time no other field of a value can contain (2100-01-01 + 123 ms): a placeholder in the value template.
TEMPLATE_DUE_MS = 4_102_444_800_123
LAG_GOALS_MS = {100_000: 50.0, 1_000_000: 100.0}
CAPACITY_GOAL = 20_000.0
MEMORY_GOAL_BYTES = 200.0

_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Samples = list[tuple[str, dict[str, str], float]]


def wall_ms() -> int:
    return int(time.time() * 1000)


def entry_id(i: int) -> str:
    return f"{FETCHER}?i={i}"


def _data(i: int) -> bytes:
    return encode_data({"i": i}, FETCHER)


def run_engine(cfg: Config, cores: Cores, redis_url: str, workdir: Path) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url)
    out: dict[str, Any] = {
        "stacks": {name: {"loop": loop, "http": http} for name, (loop, http) in STACKS.items()},
        "lag_stack": LAG_STACK,
        "capacity_entries": cfg.engine_capacity_entries,
        "due_per_second": cfg.engine_due_per_second,
        "lag_sizes": list(cfg.engine_lag_sizes),
        "cold_connections": cfg.engine_cold_connections,
        "cold_seconds": cfg.engine_cold_seconds,
        "goals": {
            "refreshes_per_s": CAPACITY_GOAL,
            "lag_p99_ms": {str(n): ms for n, ms in LAG_GOALS_MS.items()},
            "overhead_bytes": MEMORY_GOAL_BYTES,
        },
        "server_config": {k: client.config_get(k).get(k) for k in ("hz", "maxmemory-policy")},
        "allocator": str(client.info("memory").get("mem_allocator", "?")),
        "phases": {},
        "errors": {},
    }
    try:
        layout = check_layout(redis_url, client)
        out["layout"] = layout.to_json()
        phases: list[tuple[str, Callable[[], Any]]] = [
            ("capacity", lambda: _capacity(cfg, cores, redis_url, client, layout, workdir)),
            *((f"cold/{stack}", lambda s=stack: _cold(s, cfg, cores, redis_url, client)) for stack in STACKS),
            *(
                (f"lag/{n}", lambda n=n: _lag(n, cfg, cores, redis_url, client, layout, workdir))
                for n in cfg.engine_lag_sizes
            ),
        ]
        for name, phase in phases:
            started = time.monotonic()
            print(f"bench: section 7 {name} ...", flush=True)
            kind, _, key = name.partition("/")
            try:
                if key:
                    out.setdefault(kind, {})[key] = phase()
                else:
                    out[kind] = phase()
            except Exception as exc:  # one phase failing (a source change mid-run) leaves the others' figures
                out["errors"][name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
                print(f"bench: section 7 {name} failed: {exc}", flush=True)
            out["phases"][name] = time.monotonic() - started
    finally:
        client.close()
    return out


# -- the server and what it says -------------------------------------------------------------------------------


@contextmanager
def serving(
    redis_url: str, cores: Cores, stack: str, ttl_s: float, namespace: str = NAMESPACE, slots: int | None = None
) -> Iterator[tuple[Proc, int]]:
    """One `eagercache serve` process on the server core, with this stack and fetcher ttl, ready."""
    port = free_port()
    loop, http = STACKS[stack]
    cmd = [*eagercache_cmd(port, redis_url, namespace, FETCHER_SPEC), "--loop", loop, "--http", http]
    if slots is not None:
        cmd += ["--max-concurrent-fetches", str(slots)]
    proc = Proc(f"eagercache ({stack})", cmd, core=cores.server, env=bench_env(**{TTL_ENV: repr(ttl_s)}))
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/readyz", timeout=60)
        yield proc, port
    finally:
        proc.close()


def server_facts(proc: Proc) -> dict[str, Any]:
    """Which of uvloop and httptools the process has loaded (the stack it runs), and any traceback it logged."""
    try:
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
    except OSError:
        maps = ""
    output = proc.output()
    return {
        "uvloop_loaded": "uvloop" in maps,
        "httptools_loaded": "httptools" in maps,
        "traceback": output[-3000:] if "Traceback" in output else None,
    }


def cpu_s(pid: int) -> float:
    """CPU time of the process's live threads (schedstat: ns, not clock ticks)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return math.nan
    for task in tasks:
        try:
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended meanwhile
    return total / 1e9


def scrape(port: int) -> Samples:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: Samples = []
    for line in text.splitlines():
        if line and not line.startswith("#") and (found := _METRIC.match(line)):
            out.append((found.group(1), dict(_LABEL.findall(found.group(2) or "")), float(found.group(3))))
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == want for k, want in labels.items()))


def fetches(before: Samples, after: Samples) -> dict[str, float]:
    """The change in eagercache_fetches_total, by cause/outcome (over fetchers)."""
    out: dict[str, float] = defaultdict(float)
    for sign, samples in ((-1, before), (1, after)):
        for name, labels, value in samples:
            if name == "eagercache_fetches_total":
                out[f"{labels.get('cause')}/{labels.get('outcome')}"] += sign * value
    return {k: v for k, v in sorted(out.items()) if v}


def lag_histogram(before: Samples, after: Samples) -> list[tuple[float, float]]:
    """The change in eagercache_refresh_lag_seconds over a window: (upper bound s, cumulative count)."""
    counts: dict[float, float] = defaultdict(float)
    for sign, samples in ((-1, before), (1, after)):
        for name, labels, value in samples:
            if name == "eagercache_refresh_lag_seconds_bucket":
                counts[float(labels["le"])] += sign * value
    return sorted(counts.items())


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus's estimate (linear within the bucket), in ms; nan with no observations."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower * 1000
            inside = cumulative - below
            return (lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)) * 1000
        lower, below = bound, cumulative
    return lower * 1000


def histogram_share_within(buckets: list[tuple[float, float]], bound_s: float) -> float:
    """The share of observations at or below `bound_s` (exact when it is a bucket bound)."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    within = max((c for b, c in buckets if b <= bound_s + 1e-9), default=0.0)
    return within / buckets[-1][1]


# -- seeding ---------------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """What Store.write leaves for one cold entry (learned from a probe), and whether plain commands match it."""

    buckets: int
    shadows: bool
    reads: bool
    counted: bool
    bulk: bool
    values_exact: bool
    differences: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Values:
    """The value item.build_entry makes for data {"i": i} written at `now_ms`, due at `due_ms`.

    Made by substitution in one value build_entry made (its ETag, data and due time replaced), as building
    each costs ~10 µs of a seeding that writes a million; checked against build_entry for a sample, and
    built by build_entry itself if the check fails.
    """

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms
        data = _data(0)
        ref, _ = build_entry(data, now_ms, TEMPLATE_DUE_MS)
        tokens = {"etag": etag_of(data).encode(), "data": data, "due": str(TEMPLATE_DUE_MS).encode()}
        self.pieces: list[bytes] = []
        self.slots: list[str] = []
        if all(ref.count(token) == 1 for token in tokens.values()):
            at = 0
            for position, slot in sorted((ref.index(token), slot) for slot, token in tokens.items()):
                self.pieces.append(ref[at:position])
                self.slots.append(slot)
                at = position + len(tokens[slot])
            self.pieces.append(ref[at:])
        samples = [(i, now_ms + d) for i in (0, 7, 99, 12_345, 999_999, 1_000_000) for d in (1, 10_000, FAR_MS)]
        self.exact = bool(self.slots) and all(
            self._substituted(i, due) == build_entry(_data(i), now_ms, due)[0] for i, due in samples
        )

    def _substituted(self, i: int, due_ms: int) -> bytes:
        data = _data(i)
        fill = {"etag": etag_of(data).encode(), "data": data, "due": b"%d" % due_ms}
        out = [self.pieces[0]]
        for slot, piece in zip(self.slots, self.pieces[1:], strict=True):
            out += (fill[slot], piece)
        return b"".join(out)

    def make(self, i: int, due_ms: int) -> bytes:
        return self._substituted(i, due_ms) if self.exact else build_entry(_data(i), self.now_ms, due_ms)[0]


def _command(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def run_packed(client: redis.Redis, commands: Sequence[bytes]) -> list[Any]:
    """Send RESP commands in one write on one connection and read every reply (a pipeline without redis-py's
    per-command packing, which costs more than Redis running the command)."""
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        connection.send_packed_command([b"".join(commands)], check_health=False)  # type: ignore[no-untyped-call]
        return [connection.read_response() for _ in commands]
    except BaseException:
        connection.disconnect()  # type: ignore[no-untyped-call]  # replies may be left unread: never hand this connection out again as it is
        raise
    finally:
        pool.release(connection)


def settle_keys(redis_url: str, namespace: str = NAMESPACE) -> Keys:
    """Connect as `eagercache serve` does (scripts loaded, bucket count settled) and return the key names."""

    async def keys() -> Keys:
        store = await open_store(redis_url, namespace)
        await store.aclose()
        return store.keys

    return asyncio.run(keys())


def _fingerprint(client: redis.Redis, eid: str) -> dict[str, Any]:
    """Every key in the database, with what it holds of one entry (the entry id in key names as <id>)."""
    out: dict[str, Any] = {}
    for key in sorted(client.scan_iter(count=1000)):
        name = key.decode(errors="replace")
        kind_raw = client.type(key)
        kind = kind_raw.decode() if isinstance(kind_raw, bytes) else str(kind_raw)
        label = name.replace(eid, "<id>")
        if eid in name:
            value = client.get(key) if kind == "string" else None
            out[label] = (kind, client.pttl(key) > 0, value)
        elif kind == "zset":
            out[label] = (kind, client.zscore(key, eid) is not None)
        elif kind == "hash":
            out[label] = (kind, sorted(client.hgetall(key).items()))
        else:
            out[label] = (kind,)
    return out


async def _store_call(redis_url: str, action: str, eid: str, value: bytes = b"", due_ms: int = 0) -> None:
    store = await open_store(redis_url, NAMESPACE)
    try:
        if action == "write":
            await store.write(eid, FETCHER, value, due_ms, mode="cold", max_entries=10**9)
        else:
            await store.forget(eid, FETCHER)
    finally:
        await store.aclose()


def check_layout(redis_url: str, client: redis.Redis) -> Layout:
    """Write a probe entry with Store.write, then with plain commands; compare what each left in Redis."""
    client.flushall()
    keys = settle_keys(redis_url)
    eid = entry_id(PROBE_ID)
    now = wall_ms()
    due = now + FAR_MS
    values = Values(now)
    asyncio.run(_store_call(redis_url, "write", eid, build_entry(_data(PROBE_ID), now, due)[0], due))
    by_store = _fingerprint(client, eid)
    asyncio.run(_store_call(redis_url, "forget", eid))
    bucket = keys.bucket_of(eid)
    shadow = bucket.shadow(eid).replace(eid, "<id>")
    layout = Layout(
        buckets=len(keys.buckets),
        shadows=shadow in by_store,
        reads=by_store.get(bucket.read) == ("zset", True),
        counted=by_store.get(bucket.counts, ("", []))[1] == [(FETCHER.encode(), b"1")],
        bulk=False,
        values_exact=values.exact,
        differences=[],
    )
    write_entries(client, keys, layout, [PROBE_ID], now, lambda i: due, values)
    by_bulk = _fingerprint(client, eid)
    asyncio.run(_store_call(redis_url, "forget", eid))
    layout.differences = [
        f"{key}: Store.write {by_store.get(key)!r}, plain commands {by_bulk.get(key)!r}"[:300]
        for key in sorted(set(by_store) | set(by_bulk))
        if by_store.get(key) != by_bulk.get(key)
    ]
    layout.bulk = not layout.differences
    return layout


def write_entries(
    client: redis.Redis,
    keys: Keys,
    layout: Layout,
    ids: Sequence[int],
    now_ms: int,
    due_of: Callable[[int], int],
    values: Values,
) -> None:
    """Cold entries as Store.write leaves them (see check_layout), in pipelined chunks."""
    fetcher = FETCHER.encode()
    now = b"%d" % now_ms
    for start in range(0, len(ids), SEED_CHUNK):
        commands: list[bytes] = []
        members: dict[Bucket, list[bytes]] = defaultdict(list)
        for i in ids[start : start + SEED_CHUNK]:
            eid = entry_id(i)
            bucket = keys.bucket_of(eid)
            due = due_of(i)
            commands.append(_command(b"SET", bucket.item(eid).encode(), values.make(i, due)))
            if layout.shadows:
                expires = b"%d" % (due + SHADOW_GRACE_MS)
                commands.append(_command(b"SET", bucket.shadow(eid).encode(), b"", b"PXAT", expires))
            members[bucket] += (b"%d" % due, eid.encode())
        for bucket, scored in members.items():
            commands.append(_command(b"ZADD", bucket.due.encode(), *scored))
            if layout.reads:
                ids_only = scored[1::2]
                commands.append(_command(b"ZADD", bucket.read.encode(), *(x for e in ids_only for x in (now, e))))
            if layout.counted:
                commands.append(_command(b"HINCRBY", bucket.counts.encode(), fetcher, b"%d" % (len(scored) // 2)))
        run_packed(client, commands)


async def _write_with_store(redis_url: str, namespace: str, n: int, due_of: Callable[[int], int]) -> None:
    store = await open_store(redis_url, namespace)

    async def one(i: int) -> None:
        now = store.clock.now_ms()
        value, _ = build_entry(_data(i), now, due_of(i))
        await store.write(entry_id(i), FETCHER, value, due_of(i), mode="cold", max_entries=10**9)

    try:
        for batch in range(0, n, 512):
            await asyncio.gather(*(one(i) for i in range(batch, min(n, batch + 512))))
    finally:
        await store.aclose()


def seed(redis_url: str, client: redis.Redis, keys: Keys, layout: Layout, n: int) -> dict[str, Any]:
    """N cold entries, all due FAR_MS from now."""
    started = time.monotonic()
    now = wall_ms()
    if layout.bulk:
        write_entries(client, keys, layout, range(n), now, lambda i: now + FAR_MS, Values(now))
    else:
        asyncio.run(_write_with_store(redis_url, keys.namespace, n, lambda i: now + FAR_MS))
    seconds = time.monotonic() - started
    return {"entries": n, "seconds": seconds, "rate": n / seconds, "method": "bulk" if layout.bulk else "Store.write"}


def fresh_store(redis_url: str, client: redis.Redis) -> Keys:
    client.flushall()
    return settle_keys(redis_url)


# -- 1. capacity -----------------------------------------------------------------------------------------------


def _arm_all(client: redis.Redis, keys: Keys, n: int) -> int:
    """Every entry due now (ZADD XX in its bucket's schedule); returns now (ms)."""
    now = wall_ms()
    by_bucket: dict[Bucket, list[bytes]] = defaultdict(list)
    for i in range(n):
        eid = entry_id(i)
        by_bucket[keys.bucket_of(eid)] += (b"%d" % now, eid.encode())
    commands = [
        _command(b"ZADD", bucket.due.encode(), b"XX", *scored[start : start + 20_000])
        for bucket, scored in by_bucket.items()
        for start in range(0, len(scored), 20_000)
    ]
    run_packed(client, commands)
    return now


def _refreshed(client: redis.Redis, keys: Keys, threshold_ms: int) -> int:
    replies = run_packed(
        client, [_command(b"ZCOUNT", b.due.encode(), b"%d" % threshold_ms, b"+inf") for b in keys.buckets]
    )
    return sum(int(r) for r in replies)


def _at(series: list[tuple[float, float, float]], count: float) -> tuple[float, float]:
    """(time ms, CPU s) when `count` entries were refreshed, interpolated between polls."""
    for (t0, r0, c0), (t1, r1, c1) in itertools.pairwise(series):
        if r0 <= count <= r1 and r1 > r0:
            f = (count - r0) / (r1 - r0)
            return t0 + f * (t1 - t0), c0 + f * (c1 - c0)
    return math.nan, math.nan


def drain(client: redis.Redis, keys: Keys, pid: int, n: int) -> dict[str, Any]:
    """Make every entry due at once and watch the process refresh them all."""
    redis_pid = int(client.info("server")["process_id"])  # the harness's own redis-server, on this machine
    armed = _arm_all(client, keys, n)
    threshold = armed + FAR_MS // 2
    series: list[tuple[float, float, float]] = [(0.0, 0.0, cpu_s(pid))]
    redis_cpu = [cpu_s(redis_pid)]
    while True:
        refreshed = _refreshed(client, keys, threshold)
        series.append((time.time() * 1000 - armed, float(refreshed), cpu_s(pid)))
        redis_cpu.append(cpu_s(redis_pid))
        if refreshed >= n or series[-1][0] > DRAIN_TIMEOUT_S * 1000:
            break
        time.sleep(POLL_S)
    result = analyze_drain(series, n)
    # Redis's side of the same window (the harness's polls included: one ZCOUNT per bucket every POLL_S).
    redis_series = [(t, r, c) for (t, r, _), c in zip(series, redis_cpu, strict=True)]
    result.update(_redis_side(redis_series, n))
    return result


def _redis_side(series: list[tuple[float, float, float]], n: int) -> dict[str, Any]:
    """redis-server's CPU per refresh and its utilisation between 10 % and 90 % refreshed (as analyze_drain)."""
    t10, c10 = _at(series, 0.1 * n)
    t90, c90 = _at(series, 0.9 * n)
    return {
        "redis_cpu_us_per_refresh": (c90 - c10) / (0.8 * n) * 1e6,
        "redis_cpu_util": (c90 - c10) / ((t90 - t10) / 1000) if t90 > t10 else math.nan,
    }


def analyze_drain(series: list[tuple[float, float, float]], n: int) -> dict[str, Any]:
    refreshed = series[-1][1]
    t10, c10 = _at(series, 0.1 * n)
    t90, c90 = _at(series, 0.9 * n)
    started = next((t for t, r, _ in series if r > 0), math.nan)
    done = series[-1][0]
    mid = 0.8 * n
    return {
        "refreshed": refreshed,
        "complete": refreshed >= n,
        "first_seen_ms": started,  # the schedule loop wakes at most one backstop interval after the arming
        "done_ms": done,
        "refreshes_per_s": mid / ((t90 - t10) / 1000) if t90 > t10 else math.nan,
        "cpu_us_per_refresh": (c90 - c10) / mid * 1e6,
        "cpu_util": (c90 - c10) / ((t90 - t10) / 1000) if t90 > t10 else math.nan,
        "whole_drain_per_s": refreshed / ((done - started) / 1000) if done > started else math.nan,
        "whole_drain_cpu_us_per_refresh": (series[-1][2] - series[0][2]) / refreshed * 1e6 if refreshed else math.nan,
        "polls": len(series),
        # refreshed over time, for the chart: (ms since armed, refreshed)
        "series": [[round(t, 1), r] for t, r, _ in series[:: max(1, len(series) // 200)]]
        + [[round(done, 1), refreshed]],
    }


def _capacity(
    cfg: Config, cores: Cores, redis_url: str, client: redis.Redis, layout: Layout, workdir: Path
) -> dict[str, Any]:
    """One process per stack, each with its own N entries (namespace `engine-<stack>:`), all started at once
    (the one not draining only wakes once per backstop interval); rounds alternate between them, so that a
    change in the machine's other load does not fall on one stack only."""
    n = cfg.engine_capacity_entries
    client.flushall()
    # name -> (stack, fetch slots): both stacks on the default, and the fast one with WIDE_SLOTS
    variants: dict[str, tuple[str, int | None]] = {
        **{stack: (stack, None) for stack in STACKS},
        WIDE: (LAG_STACK, WIDE_SLOTS),
    }
    keys = {
        name: settle_keys(redis_url, f"engine-{name.split(',')[0]}{'-wide' if name == WIDE else ''}:")
        for name in variants
    }
    seeding = {name: seed(redis_url, client, keys[name], layout, n) for name in variants}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    profile: dict[str, Any] | None = None
    with contextlib.ExitStack() as running:
        servers = {
            name: running.enter_context(
                serving(redis_url, cores, stack, FAR_MS / 1000, keys[name].namespace, slots=slots)
            )
            for name, (stack, slots) in variants.items()
        }
        for r in range(cfg.engine_capacity_rounds):
            for stack in list(variants)[:: 1 if r % 2 == 0 else -1]:
                proc, port = servers[stack]
                before = scrape(port)
                result = drain(client, keys[stack], proc.pid, n)
                result["fetches"] = fetches(before, scrape(port))
                result["round"] = r
                rounds[stack].append(result)
        proc, port = servers[LAG_STACK]
        raw = workdir / f"engine-profile-{LAG_STACK}.txt"
        profile = _profile(
            proc, port, cores, cfg.engine_profile_seconds, raw, _draining(client, keys[LAG_STACK], proc.pid, n)
        )
        facts = {stack: server_facts(proc) for stack, (proc, _) in servers.items()}
    return {
        name: {
            "entries": n,
            "namespace": keys[name].namespace,
            "slots": slots,
            "seeding": seeding[name],
            "rounds": rounds[name],
            "profile": profile if name == LAG_STACK else None,
            "server": facts[name],
        }
        for name, (_, slots) in variants.items()
    }


def _profile(
    proc: Proc, port: int, cores: Cores, seconds: float, raw: Path, meanwhile: Callable[[float], int]
) -> dict[str, Any]:
    """py-spy samples the process for `seconds` while `meanwhile(deadline)` runs (it returns how many rounds
    it made the process drain); with the process's refreshes and CPU time over the same time."""
    cmd = pyspy_record(proc.pid, seconds, raw, PROFILE_RATE_HZ)
    if cmd is None:
        return {"error": "py-spy is not installed in the venv"}
    before = scrape(port)
    cpu0 = cpu_s(proc.pid)
    spy = Proc("py-spy", cmd, core=cores.load, env=bench_env())
    try:
        drains = meanwhile(time.monotonic() + seconds)
        spy.process.wait(seconds + 30)
        output = spy.output()
    finally:
        spy.close()
    cpu = cpu_s(proc.pid) - cpu0
    counted = fetches(before, scrape(port))
    refreshes = sum(v for k, v in counted.items() if k.endswith("/ok"))
    if not raw.exists():
        return {"error": f"py-spy wrote no profile: {output[-2000:]}"}
    text = raw.read_text()
    summary = summarize_profile(text)
    summary["groups"] = group_profile(text)
    summary["rate_hz"] = PROFILE_RATE_HZ
    summary["seconds"] = seconds
    summary["drains"] = drains
    summary["refreshes"] = refreshes
    summary["fetches"] = counted
    summary["cpu_us_per_refresh_while_profiled"] = cpu / refreshes * 1e6 if refreshes else math.nan
    summary["command"] = f"py-spy record --pid <eagercache serve> --function --rate {PROFILE_RATE_HZ} --format raw"
    return summary


def _draining(client: redis.Redis, keys: Keys, pid: int, n: int) -> Callable[[float], int]:
    def run(deadline: float) -> int:
        drains = 0
        while time.monotonic() < deadline:
            drain(client, keys, pid, n)
            drains += 1
        return drains

    return run


def _waiting(deadline: float) -> int:
    time.sleep(max(0.0, deadline - time.monotonic()))
    return 0


# Where a sample's time goes: by the deepest eagercache operation on its stack, and by the code it was in.
GROUPS = (
    "fetcher call",
    "encode/hash",
    "Redis client (redis-py, reply parsing)",
    "scripts (Store: script calls, replies)",
    "scheduling (Refresher, events)",
    "engine (refresh task, bookkeeping)",
    "metrics",
    "asyncio / uvloop",
    "HTTP server",
    "other",
)


def _where(path: str) -> str:
    if "eagercache/" in path:
        return "eagercache/" + path.rsplit("eagercache/", 1)[1]
    if "bench/" in path:
        return "bench"
    for marker, place in (
        ("redis/", "redis"),
        ("hiredis", "redis"),
        ("prometheus_client", "metrics"),
        ("msgspec", "encode"),
        ("hashlib", "encode"),
        ("base64", "encode"),
        ("uvloop", "asyncio"),
        ("asyncio/", "asyncio"),
        ("uvicorn", "http"),
        ("starlette", "http"),
        ("h11", "http"),
        ("httptools", "http"),
    ):
        if marker in path:
            return place
    return "other"


def _frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for frame in stack.split(";"):
        func, _, where = frame.partition(" (")
        out.append((func.strip(), _where(where.rstrip(")").rsplit(":", 1)[0])))
    return out


def _operation(frames: list[tuple[str, str]]) -> str:
    """The deepest eagercache step a sample is in: claim, write, fetcher call, encode/hash, ..."""
    op = "no eagercache frame"
    for func, where in frames:  # root to leaf: a deeper step overrides
        name = func.rsplit(".", 1)[-1]
        if where == "bench":
            op = "fetcher call"
        elif where == "eagercache/item.py":
            op = "encode/hash"
        elif where == "eagercache/store.py":
            if "claim" in name:
                op = "claim"
            elif name == "write":
                op = "write"
            elif op not in ("claim", "write"):
                op = "store, other"
        elif where in ("eagercache/refresher.py", "eagercache/events.py", "eagercache/supervise.py"):
            op = "scheduling"
        elif where == "eagercache/engine.py":
            op = "fetcher call" if name in ("_run_fetcher", "_guarded") else "engine"
        elif where in ("eagercache/metrics.py", "metrics"):
            op = "metrics"
    return op


def _group(op: str, leaf: str) -> str:
    """A sample's group: the fetcher's and encoding's whole subtrees each count as one; otherwise the library
    the sample was in (redis-py, asyncio, prometheus-client, the HTTP server), and eagercache's own code or
    generic stdlib helpers (contextlib, dataclass __init__) count to the operation they ran for."""
    if op in ("fetcher call", "encode/hash"):
        return op
    by_leaf = {"redis": GROUPS[2], "encode": GROUPS[1], "metrics": GROUPS[6], "asyncio": GROUPS[7], "http": GROUPS[8]}
    if leaf in by_leaf:
        return by_leaf[leaf]
    by_op = {
        "claim": GROUPS[3],
        "write": GROUPS[3],
        "store, other": GROUPS[3],
        "scheduling": GROUPS[4],
        "engine": GROUPS[5],
        "metrics": GROUPS[6],
    }
    return by_op.get(op, GROUPS[9])


def group_profile(text: str) -> dict[str, Any]:
    """Shares of the samples by group (the code a sample was in, with the fetcher's and encoding's whole
    subtree each counted as one), by operation, and by operation x the code the sample was in."""
    groups: Counter[str] = Counter()
    operations: Counter[str] = Counter()
    matrix: Counter[tuple[str, str]] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = _frames(stack)
        op = _operation(frames)
        leaf = frames[-1][1]
        samples += count
        groups[_group(op, leaf)] += count
        operations[op] += count
        matrix[(op, leaf if not leaf.startswith("eagercache/") else "eagercache")] += count
    share = (lambda c: c / samples) if samples else (lambda c: math.nan)
    return {
        "samples": samples,
        "groups": [(name, share(groups[name])) for name in GROUPS if groups[name]],
        "operations": [(name, share(c)) for name, c in operations.most_common()],
        "matrix": [[op, where, share(c)] for (op, where), c in matrix.most_common()],
    }


# -- 2 and 3. lag and memory -----------------------------------------------------------------------------------


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _payload(client: redis.Redis, keys: Keys, n: int) -> dict[str, float]:
    step = max(1, n // MEMORY_SAMPLES)
    values = [v for v in client.mget([keys.item(entry_id(i)) for i in range(0, n, step)]) if isinstance(v, bytes)]
    bodies = [v if v.startswith(b"{") else v.partition(b"\n")[2] for v in values]
    return {
        "stored_value_bytes": sum(map(len, values)) / len(values),
        "body_bytes": sum(map(len, bodies)) / len(bodies),
        "entry_id_bytes": sum(len(entry_id(i)) for i in range(0, n, step)) / len(range(0, n, step)),
    }


def _breakdown(client: redis.Redis, keys: Keys, n: int) -> dict[str, float]:
    """MEMORY USAGE per entry: sampled item and shadow keys; the sorted sets and hashes whole, divided by N."""
    step = max(1, n // 50)
    items = [client.memory_usage(keys.item(entry_id(i)), samples=0) or 0 for i in range(0, n, step)]
    shadows = [client.memory_usage(keys.shadow(entry_id(i)), samples=0) or 0 for i in range(0, n, step)]

    def whole(kind: str) -> float:
        return sum(client.memory_usage(getattr(b, kind), samples=0) or 0 for b in keys.buckets) / n

    return {
        "keys": float(client.dbsize()),
        "item_key": sum(items) / len(items),
        "shadow_key": sum(shadows) / len(shadows),
        "due_zset": whole("due"),
        "read_zset": whole("read"),
        "counts_hash": whole("counts"),
    }


def _memory(client: redis.Redis, keys: Keys, layout: Layout, n: int, empty: int) -> dict[str, Any]:
    """Used memory after seeding, and again after deleting every shadow key (what they cost)."""
    seeded = used_memory(client)
    payload = _payload(client, keys, n)
    breakdown = _breakdown(client, keys, n)
    deleted = 0
    if layout.shadows:
        for start in range(0, n, SEED_CHUNK):
            names = [keys.shadow(entry_id(i)).encode() for i in range(start, min(n, start + SEED_CHUNK))]
            deleted += int(run_packed(client, [_command(b"DEL", *names)])[0])
    without_shadows = used_memory(client)
    body = payload["body_bytes"]
    per_entry = (seeded - empty) / n
    per_entry_no_shadow = (without_shadows - empty) / n
    return {
        "entries": n,
        "empty_bytes": empty,
        "seeded_bytes": seeded,
        "without_shadows_bytes": without_shadows,
        "shadows_deleted": deleted,
        **payload,
        "breakdown": breakdown,
        "per_entry": per_entry,
        "overhead": per_entry - body,
        "per_entry_without_shadow": per_entry_no_shadow,
        "overhead_without_shadow": per_entry_no_shadow - body,
        "shadow_bytes_per_entry": (seeded - without_shadows) / n,
    }


def _rearm(client: redis.Redis, keys: Keys, layout: Layout, n: int, due_of: Callable[[int], int]) -> int:
    """Entry i due at due_of(i), in due order: its schedule score and its shadow key's expiry (recreated).
    Returns how many chunks went out after their first entry's due time."""
    late = 0
    for start in range(0, n, SEED_CHUNK):
        ids = range(start, min(n, start + SEED_CHUNK))
        by_bucket: dict[Bucket, list[bytes]] = defaultdict(list)
        commands = []
        for i in ids:
            eid = entry_id(i)
            bucket = keys.bucket_of(eid)
            by_bucket[bucket] += (b"%d" % due_of(i), eid.encode())
            if layout.shadows:
                expires = b"%d" % (due_of(i) + SHADOW_GRACE_MS)
                commands.append(_command(b"SET", bucket.shadow(eid).encode(), b"", b"PXAT", expires))
        commands += [_command(b"ZADD", b.due.encode(), b"XX", *scored) for b, scored in by_bucket.items()]
        late += wall_ms() > due_of(start)
        run_packed(client, commands)
    return late


def _read_retrieved(client: redis.Redis, keys: Keys, ids: Sequence[int]) -> list[tuple[int, int]]:
    """(last_retrieved ms in the stored header, when it was read) for each entry; -1 when unreadable."""
    out: list[tuple[int, int]] = []
    last = b"%d" % HEADER_LAST_BYTE
    for start in range(0, len(ids), SEED_CHUNK):
        chunk = ids[start : start + SEED_CHUNK]
        replies = run_packed(
            client, [_command(b"GETRANGE", keys.item(entry_id(i)).encode(), b"0", last) for i in chunk]
        )
        read_at = wall_ms()
        for raw in replies:
            try:
                retrieved = Entry.parse(bytes(raw).split(b"\n", 1)[0] + b"\n").last_retrieved_ms
            except ValueError:
                retrieved = -1
            out.append((retrieved, read_at))
    return out


def _lag(
    n: int, cfg: Config, cores: Cores, redis_url: str, client: redis.Redis, layout: Layout, workdir: Path
) -> dict[str, Any]:
    rate = cfg.engine_due_per_second
    ttl_s = n / rate
    ttl_ms = int(ttl_s * 1000)
    keys = fresh_store(redis_url, client)
    time.sleep(0.2)
    empty = used_memory(client)
    seeding = seed(redis_url, client, keys, layout, n)
    memory = _memory(client, keys, layout, n, empty)
    with serving(redis_url, cores, LAG_STACK, ttl_s) as (proc, port):
        start = wall_ms() + LAG_LEAD_MS

        def due_of(i: int) -> int:
            return start + i * ttl_ms // n

        began = wall_ms()
        late_chunks = _rearm(client, keys, layout, n, due_of)
        rearm_s = (wall_ms() - began) / 1000
        window_s = min(cfg.engine_lag_window_seconds, ttl_s - LAG_TTL_MARGIN_S)
        window_from = max(start, wall_ms()) + LAG_WARMUP_MS
        window_to = window_from + int(window_s * 1000)
        time.sleep(max(0.0, (window_from - wall_ms()) / 1000))
        before, cpu0 = scrape(port), cpu_s(proc.pid)
        time.sleep(max(0.0, (window_to - wall_ms()) / 1000))
        after, cpu1 = scrape(port), cpu_s(proc.pid)
        time.sleep(LAG_SETTLE_MS / 1000)
        dues = [due_of(i) for i in range(n)]
        ids = range(bisect.bisect_left(dues, window_from), bisect.bisect_left(dues, window_to))
        retrieved = _read_retrieved(client, keys, ids)
        steady = used_memory(client)
        profile = None
        if n == min(cfg.engine_lag_sizes):  # the process as it refreshes with a backlog, events arriving
            raw = workdir / f"engine-lag-profile-{n}.txt"
            profile = _profile(proc, port, cores, cfg.engine_profile_seconds, raw, _waiting)
        facts = server_facts(proc)
    lags: list[float] = []
    missed = 0
    for i, (last_retrieved, read_at) in zip(ids, retrieved, strict=True):
        if last_retrieved >= began:
            lags.append(float(last_retrieved - dues[i]))
        else:  # not refreshed yet: at least this late
            missed += 1
            lags.append(float(read_at - dues[i]))
    histogram = lag_histogram(before, after)
    counted = fetches(before, after)
    refreshes = sum(v for k, v in counted.items() if k.endswith("/ok"))
    goal = LAG_GOALS_MS.get(n)
    return {
        "entries": n,
        "ttl_s": ttl_s,
        "due_per_second": rate,
        "seeding": seeding,
        "memory": {**memory, "steady_bytes": steady, "per_entry_steady": (steady - empty) / n},
        "rearm_s": rearm_s,
        "rearm_late_chunks": late_chunks,
        "window_s": (window_to - window_from) / 1000,
        "lag_ms": percentiles(lags),
        "not_refreshed": missed,
        "lag_is_lower_bound": missed > 0,
        "refreshes_per_s": refreshes / ((window_to - window_from) / 1000),
        "fetches": counted,
        "cpu_util": (cpu1 - cpu0) / ((window_to - window_from) / 1000),
        "cpu_us_per_refresh": (cpu1 - cpu0) / refreshes * 1e6 if refreshes else math.nan,
        "server_histogram": {
            "buckets": histogram,
            "p50_ms": histogram_quantile(histogram, 0.5),
            "p99_ms": histogram_quantile(histogram, 0.99),
            "share_within_goal": histogram_share_within(histogram, goal / 1000) if goal else math.nan,
        },
        "goal_ms": goal,
        "profile": profile,
        "server": facts,
    }


# -- 4. cold fills ---------------------------------------------------------------------------------------------


def _cold(stack: str, cfg: Config, cores: Cores, redis_url: str, client: redis.Redis) -> dict[str, Any]:
    fresh_store(redis_url, client)
    offset = {"fast": 10_000_000, "plain": 20_000_000}.get(stack, 30_000_000)
    seconds = cfg.engine_cold_seconds
    with serving(redis_url, cores, stack, FAR_MS / 1000) as (proc, port):
        url = f"http://127.0.0.1:{port}"
        first = httpx.get(f"{url}/data/{FETCHER}?i={offset - 1}", timeout=10)
        if first.status_code != 200 or first.headers.get("x-cache") != "MISS":
            raise RuntimeError(f"a never-seen id was not a 200 MISS: {first.status_code} {dict(first.headers)}")
        warm = [f"/data/{FETCHER}?i={offset + k}" for k in range(int(COLD_PATHS_PER_S * COLD_WARMUP_S))]
        run_load(url, warm, duration_s=COLD_WARMUP_S, connections=cfg.engine_cold_connections, core=cores.load)
        base = offset + len(warm)
        paths = [f"/data/{FETCHER}?i={base + k}" for k in range(int(COLD_PATHS_PER_S * (seconds + 1)))]
        before, cpu0 = scrape(port), cpu_s(proc.pid)
        load = run_load(url, paths, duration_s=seconds, connections=cfg.engine_cold_connections, core=cores.load)
        after, cpu1 = scrape(port), cpu_s(proc.pid)
        facts = server_facts(proc)
    results = {
        result: total(after, "eagercache_requests_total", result=result)
        - total(before, "eagercache_requests_total", result=result)
        for result in ("miss", "hit", "stale", "error")
    }
    misses = results["miss"]
    return {
        "paths": len(paths),
        "requests": load.requests,
        "paths_reused": load.requests > len(paths),
        "by_result": results,
        "fetches": fetches(before, after),
        "misses_per_s": misses / load.duration_s,
        "cpu_util": (cpu1 - cpu0) / load.duration_s,
        "cpu_us_per_miss": (cpu1 - cpu0) / misses * 1e6 if misses else math.nan,
        "load": load.to_json(),
        "server": facts,
    }
