"""The hit path's and the refresh path's batching and caches: what they must never change.

Reads of one loop iteration share one MGET, and refresh writes that finish together share one pipeline:
each caller still gets exactly its own answer, a failure reaches exactly the callers it concerns, and
nothing is lost, written twice or written out of order. The per-process caches are bounded, evict the
least recently used, and are reported in /metrics.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
from typing import Any

import pytest
import redis

from eagercache import create_app, fetcher
from eagercache import engine as engine_module
from eagercache.coalesce import Coalescer
from eagercache.errors import StoreUnavailable
from eagercache.item import Entry
from eagercache.lru import LRU
from eagercache.memstore import build_store
from eagercache.settings import load_settings

from .conftest import AppFactory
from .helpers import Counter, garbage_made
from .watching import serving


def test_lru_keeps_a_hot_key_however_many_cold_ones_pass() -> None:
    """An insertion-order FIFO would evict the key inserted first after `max_entries` insertions."""
    cache: LRU[str, int] = LRU(100)
    cache.put("hot", 0)
    for i in range(10_000):
        cache.put(f"cold{i}", i)
        assert cache.get("hot") == 0  # read as often as the cold ones arrive
    assert len(cache) == 100
    assert cache.get("cold0") is None  # the least recently used went


async def test_coalescer_answers_each_caller_its_own_value_in_one_call_per_iteration() -> None:
    batches: list[list[int]] = []

    async def run(keys: list[int]) -> list[int]:
        batches.append(keys)
        return [k * 10 for k in keys]

    coalescer: Coalescer[int, int] = Coalescer(run, max_batch=8)
    answers = await asyncio.gather(*(coalescer.get(k) for k in range(20)))
    assert answers == [k * 10 for k in range(20)]
    assert [len(b) for b in batches] == [8, 8, 4]  # one iteration's 20 callers, in batches of at most 8


async def test_coalescer_failure_reaches_its_batch_and_a_cancelled_caller_does_not_stop_the_others() -> None:
    release = asyncio.Event()

    async def run(keys: list[str]) -> list[str]:
        await release.wait()
        if "bad" in keys:
            raise StoreUnavailable("down")
        return keys

    coalescer: Coalescer[str, str] = Coalescer(run, max_batch=64)
    leaving = asyncio.create_task(coalescer.get("a"))
    staying = asyncio.create_task(coalescer.get("b"))
    await asyncio.sleep(0)  # both asked in this iteration: one batch
    leaving.cancel()
    release.set()
    assert await staying == "b"
    assert leaving.cancelled()
    failing = [asyncio.create_task(coalescer.get(k)) for k in ("bad", "c")]
    results = await asyncio.gather(*failing, return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)
    ok = await coalescer.get("d")  # the next batch is unaffected
    assert ok == "d"


@pytest.mark.parametrize("store_url", ["redis"], indirect=True)
async def test_concurrent_reads_of_many_entries_share_round_trips_and_get_their_own_bodies(
    make_app: AppFactory,
) -> None:
    @fetcher(ttl=3600, jitter=0)
    async def item(i: int) -> dict[str, int]:
        return {"i": i}

    app, client = await make_app([item])
    for i in range(40):
        assert (await client.get(f"/data/item?i={i}")).status_code == 200
    engine = app.state.engine
    for i in range(40):
        engine._forget_near(f"item?i={i}")  # the next reads go to Redis
    store = app.state.store
    calls = Counter()
    real = store._get_many

    async def counted(ids: list[str]) -> Any:
        calls.hit()
        return await real(ids)

    store._reads._run = counted
    responses = await asyncio.gather(*(client.get(f"/data/item?i={i}") for i in range(40)))
    assert [r.json()["data"] for r in responses] == [{"i": i} for i in range(40)]
    assert all(r.headers["x-cache"] == "HIT" for r in responses)
    assert calls.count < 40  # shared: without coalescing, one MGET per read


@pytest.mark.parametrize("store_url", ["redis"], indirect=True)
async def test_pipelined_refresh_writes_lose_nothing_and_write_nothing_twice(
    make_app: AppFactory, redis_sync: redis.Redis
) -> None:
    """300 entries refreshed every 0.5 s, their writes pipelined together: each fetch is written once
    (writes per entry = fetches per entry), each stored value is its entry's latest fetch, and a value
    is never replaced by an older one."""
    fetched: dict[int, int] = {}
    written: dict[str, int] = {}
    every_entry_refreshed = asyncio.Event()

    @fetcher(ttl=0.5, jitter=0, max_idle=3600)
    async def tick(i: int) -> dict[str, int]:
        fetched[i] = fetched.get(i, 0) + 1
        if len(fetched) == 300 and min(fetched.values()) >= 4:
            every_entry_refreshed.set()
        return {"i": i, "run": fetched[i]}

    def wrote(entry_id: str, _due: int) -> None:
        written[entry_id] = written.get(entry_id, 0) + 1

    app, client = await make_app([tick])
    app.state.engine.on_write(wrote)
    for i in range(300):
        assert (await client.get(f"/data/tick?i={i}")).status_code == 200
    seen: dict[int, int] = {}
    async with asyncio.timeout(30):
        while not every_entry_refreshed.is_set():
            for i in range(0, 300, 7):  # meanwhile: what is stored only ever moves forward
                raw = redis_sync.get(f"eagercache:{{b0}}:item:tick?i={i}")
                assert isinstance(raw, bytes)
                retrieved = Entry.parse(raw).last_retrieved_ms
                assert retrieved >= seen.get(i, 0)
                seen[i] = retrieved
            await asyncio.sleep(0.05)
    for i in range(300):
        raw = redis_sync.get(f"eagercache:{{b0}}:item:tick?i={i}")
        assert isinstance(raw, bytes)
        run = json.loads(Entry.parse(raw).body)["data"]["run"]
        assert fetched[i] - 1 <= run <= fetched[i]  # its latest fetch, or the one before while that is written
        assert fetched[i] - 1 <= written[f"tick?i={i}"] <= fetched[i]  # one write per fetch, none twice


async def test_process_caches_are_bounded_and_reported(make_app: AppFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "QUERY_CACHE_ENTRIES", 5)
    monkeypatch.setattr(engine_module, "NEAR_CACHE_ENTRIES", 3)

    @fetcher(ttl=3600, jitter=0)
    async def item(i: int, note: str = "") -> int:
        return i

    _, client = await make_app([item])
    for i in range(12):
        assert (await client.get(f"/data/item?i={i}")).status_code == 200
    long_query = "i=1&note=" + "x" * engine_module.QUERY_CACHE_MAX_BYTES
    assert (await client.get(f"/data/item?{long_query}")).status_code == 200
    text = (await client.get("/metrics")).text

    def sample(cache: str, kind: str = "entries") -> float:
        found = re.search(rf'eagercache_process_cache_{kind}{{cache="{cache}"}} (\S+)', text)
        assert found is not None, (cache, kind)
        return float(found.group(1))

    assert sample("queries") == 5  # bounded, and the long query string was not kept
    assert sample("near") == 3
    assert sample("near", "bytes") > 0
    assert sample("representations") >= 3
    assert sample("representations", "bytes") > 0


async def _status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, path: str) -> int:
    """One request on a kept-alive connection (a raw one: an HTTP client's own cycles are not the server's)."""
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower().split("\r\n")
    length = next(int(line.split(":")[1]) for line in head if line.startswith("content-length:"))
    if method != "HEAD":
        await reader.readexactly(length)
    return int(head[0].split()[1])


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_served_requests_leave_no_cycle_for_the_garbage_collector(http: str, local_store_url: str) -> None:
    """Requests are freed by reference counting alone: a cycle per request makes the collector run every few
    hundred requests, and its pauses land on the requests of that moment (the p99 of a hit)."""

    @fetcher(ttl=3600, jitter=0)
    async def item(i: int) -> int:
        return i

    app = create_app([item], settings=load_settings({"redis_url": local_store_url}, {}))
    paths = ["/data/item?i=1", "/data/item?i=2", "/data/item?i=x", "/data/nope", "/healthz", "/metrics"]
    async with serving(app, http=http) as url:
        reader, writer = await asyncio.open_connection(*url.removeprefix("http://").split(":"))
        try:
            for path in paths:  # warm: first-use caches and lazily built objects are not what is looked for
                await _status(reader, writer, "GET", path)
            with garbage_made() as garbage:
                statuses = {path: await _status(reader, writer, "GET", path) for path in paths * 20}
                head = await _status(reader, writer, "HEAD", "/data/item?i=1")
            found = collections.Counter(type(o).__qualname__ for o in garbage)
        finally:
            writer.close()
    assert statuses == dict(zip(paths, [200, 200, 400, 404, 200, 200], strict=True))
    assert head == 200
    assert found == {}


async def test_store_calls_leave_no_cycle_for_the_garbage_collector(redis_url: str, redis_sync: redis.Redis) -> None:
    """A store call's budget timer is freed with the call (reads and refresh writes make one per round trip)."""
    store = build_store(redis_url, namespace="gc:")
    await store.open()
    try:
        await store.prepare()
        assert await store.get("entry") == (None, None)  # warm: the connection and the scripts
        with garbage_made() as garbage:
            replies = [await store.get("entry") for _ in range(20)]
        found = collections.Counter(type(o).__qualname__ for o in garbage)
    finally:
        await store.aclose()
    assert replies == [(None, None)] * 20
    assert found == {}


@pytest.mark.parametrize("store_url", ["redis", "memory"], indirect=True)
@pytest.mark.parametrize("held", ["made", "written"])
async def test_claims_go_on_while_fetched_entries_are_made_and_written(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch, held: str
) -> None:
    """A refresh whose fetcher run is over holds no fetch slot while its entry is made and written: further
    claim rounds are taken meanwhile (this process's work overlaps the store's), up to IN_FLIGHT_PER_SLOT
    times the slots in flight; once they go on, every refresh is stored, once."""
    slots, entries = 4, 40
    bound = slots * engine_module.IN_FLIGHT_PER_SLOT
    refreshing = False
    fetches: dict[int, int] = {}
    bound_reached = asyncio.Event()

    @fetcher(ttl=1, jitter=0, max_idle=3600)
    async def tick(i: int) -> dict[str, int]:
        fetches[i] = fetches.get(i, 0) + 1
        if refreshing and sum(fetches.values()) - entries == bound:
            bound_reached.set()
        return {"i": i, "run": fetches[i]}

    settings = load_settings({"max_concurrent_fetches": slots}, {})
    app, client = await make_app([tick], settings=settings)
    engine = app.state.engine
    for i in range(entries):
        assert (await client.get(f"/data/tick?i={i}")).status_code == 200
    gate = asyncio.Event()
    target, name = (engine, "_entry_from") if held == "made" else (engine.store, "write_refreshes")
    step = getattr(target, name)

    async def gated(*args: Any) -> Any:
        await gate.wait()
        return await step(*args)

    monkeypatch.setattr(target, name, gated)
    refreshing = True
    async with asyncio.timeout(20):  # the entries fall due a second after their fill
        await bound_reached.wait()
    assert engine.free_slots == 0  # nothing more is taken while they wait
    assert sum(fetches.values()) - entries == bound
    gate.set()
    async with asyncio.timeout(20):
        while min(fetches.values()) < 2 or engine.free_slots < slots:
            await asyncio.sleep(0.01)  # the writes' ends have no event of their own to await
    for i in range(entries):
        body = (await client.get(f"/data/tick?i={i}")).json()
        assert body["data"]["run"] >= 2  # a refresh of each entry was stored


@pytest.mark.parametrize("store_url", ["redis", "memory"], indirect=True)
async def test_no_entry_is_claimed_to_wait_for_a_fetch_slot(make_app: AppFactory) -> None:
    """While fetcher runs hold every fetch slot, nothing more is claimed: a claimed entry's lease runs from its
    claim, so one left waiting behind slow runs for a slot could see its lease end before its own run does
    (and another replica fetch it again). Once the runs end, the rest are claimed and refreshed."""
    slots, entries = 4, 20
    refreshing = False
    running = 0
    all_running = asyncio.Event()
    go_on = asyncio.Event()
    fetches: dict[int, int] = {}

    @fetcher(ttl=1, jitter=0, max_idle=3600, timeout=30)
    async def slow(i: int) -> dict[str, int]:
        nonlocal running
        fetches[i] = fetches.get(i, 0) + 1
        if refreshing and not go_on.is_set():
            running += 1
            if running == slots:
                all_running.set()
            await go_on.wait()
        return {"i": i, "run": fetches[i]}

    settings = load_settings({"max_concurrent_fetches": slots}, {})
    app, client = await make_app([slow], settings=settings)
    engine = app.state.engine
    refresher = app.state.refresher
    for i in range(entries):
        assert (await client.get(f"/data/slow?i={i}")).status_code == 200
    refreshing = True
    async with asyncio.timeout(20):  # the entries fall due a second after their fill
        await all_running.wait()
        while not refresher._waiting_for_slots:  # the schedule loop has come round to wait for a slot
            await asyncio.sleep(0.01)
    assert len(engine._inflight) == slots  # the entries whose runs hold the slots, and no more
    assert engine.free_slots == 0
    go_on.set()
    async with asyncio.timeout(20):
        while min(fetches.values()) < 2:
            await asyncio.sleep(0.01)
    assert running == slots


@pytest.mark.parametrize("store_url", ["redis", "memory"], indirect=True)
async def test_failed_refreshes_leave_no_cycle_for_the_garbage_collector(make_app: AppFactory) -> None:
    """A failing fetcher's refreshes are freed by reference counting: while an upstream is down, every refresh
    fails, and a cycle each would run the collector on the read path."""
    failures = 0
    enough = asyncio.Event()
    down = False

    @fetcher(ttl=0.2, jitter=0, timeout=1)
    async def item(i: int) -> int:
        nonlocal failures
        if down:
            failures += 1
            if failures == 40:
                enough.set()
            raise ConnectionError("upstream down")
        return i

    _, client = await make_app([item])
    for i in range(20):
        assert (await client.get(f"/data/item?i={i}")).status_code == 200
    with garbage_made() as garbage:
        down = True
        async with asyncio.timeout(20):
            await enough.wait()
    found = collections.Counter(type(o).__qualname__ for o in garbage)
    assert failures >= 40
    assert found == {}
