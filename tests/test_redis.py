"""What only a real Redis can show: expiry events, server configuration, outages."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio
from starlette.applications import Starlette

from eagercache import create_app, fetcher, roundtrip
from eagercache.item import Entry, build_entry
from eagercache.memstore import FAKEREDIS_URL, build_store
from eagercache.scripts import SHADOW_GRACE_MS
from eagercache.settings import Settings

from .helpers import Counter
from .redis_server import RedisServer


@fetcher(ttl=0.5, jitter=0)
async def stamp(k: str = "a") -> str:
    return f"{k}@{asyncio.get_running_loop().time()}"


@asynccontextmanager
async def running(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client


async def test_expired_events_drive_refresh_of_entries_written_elsewhere(
    redis_url: str, redis_sync: redis.Redis
) -> None:
    """Replica B refreshes an entry that replica A wrote and left, learning of it only from the event."""
    replica_b = create_app([stamp], redis_url=redis_url)
    replica_b.state.refresher.schedule_max_wait_s = 30.0  # B would not look at the schedule in time
    writes_b = Counter()
    replica_b.state.engine.on_write(writes_b.hit)
    async with running(replica_b):
        assert replica_b.state.refresher.subscribed
        replica_a = create_app([stamp], redis_url=redis_url)
        async with running(replica_a) as client_a:
            first = (await client_a.get("/data/stamp?k=z")).json()
        await writes_b.reach(1, timeout=5)
        metrics = replica_b.state.metrics
        assert metrics.sample("eagercache_fetches_total", fetcher="stamp", cause="event", outcome="ok") >= 1
        stored = redis_sync.get("eagercache:{b0}:item:stamp?k=z")
        assert stored is not None and first["last_retrieved"].encode() not in stored


async def test_an_event_for_a_bucket_the_schedule_has_due_costs_no_claim(
    redis_url: str, redis_sync: redis.Redis
) -> None:
    """The schedule loop knows the entry's bucket is due and is in its claim (as when it is behind): the
    entry's expiry event must not add a claim of its own. The schedule's claim refreshes it once let go.
    (A claim held up for longer than `claim_held_up_s`, a node failing, is the next test's case.)"""
    app = create_app([stamp], redis_url=redis_url)
    refresher, store = app.state.refresher, app.state.store
    refresher.claim_held_up_s = 30.0  # this claim is only slow, as behind a backlog
    held, let_go = asyncio.Event(), asyncio.Event()
    claim_due, event_claims = store.claim_due, list[list[str]]()

    async def held_claim_due(*args: object, **kwargs: object) -> object:
        if store.shadow_keys and not let_go.is_set() and redis_sync.exists("eagercache:{b0}:item:stamp?k=e"):
            held.set()
            await let_go.wait()
        return await claim_due(*args, **kwargs)

    async def claim(entry_ids: list[str], lease_ms: int) -> object:
        event_claims.append(entry_ids)
        return await claim_many(entry_ids, lease_ms)

    claim_many = store.claim
    store.claim_due, store.claim = held_claim_due, claim
    event_seen, after_event = asyncio.Event(), asyncio.Event()
    batches = refresher.events.batches

    async def watched_batches() -> AsyncIterator[list[str]]:
        async for batch in batches():
            if event_seen.is_set():
                after_event.set()  # asked for the next batch: the refresher is done with the event's
            yield batch
            if "stamp?k=e" in batch:
                event_seen.set()

    refresher.events.batches = watched_batches
    writes = Counter()
    app.state.engine.on_write(writes.hit)
    async with running(app) as client:
        assert refresher.subscribed
        assert (await client.get("/data/stamp?k=e")).status_code == 200
        await asyncio.wait_for(held.wait(), 5)  # the entry fell due: the schedule loop is in its claim
        await asyncio.wait_for(after_event.wait(), 5)  # the shadow key expired and its event was handled
        assert event_claims == []
        let_go.set()
        await writes.reach(2, timeout=5)
    metrics = app.state.metrics
    assert metrics.sample("eagercache_fetches_total", fetcher="stamp", cause="schedule", outcome="ok") >= 1
    assert metrics.sample("eagercache_fetches_total", fetcher="stamp", cause="event", outcome="ok") == 0


async def test_an_event_is_claimed_on_its_own_while_the_schedule_claim_is_held_up(
    redis_url: str, redis_sync: redis.Redis
) -> None:
    """The schedule loop's claim hangs (a node failing over held it for seconds in a cluster fault test):
    an entry's expiry event is claimed and refreshed on its own meanwhile, not dropped as the schedule's
    (an event comes once: dropped, the entry would wait for that claim)."""
    app = create_app([stamp], redis_url=redis_url)
    refresher, store = app.state.refresher, app.state.store
    held, let_go = asyncio.Event(), asyncio.Event()
    claim_due = store.claim_due

    async def held_claim_due(*args: object, **kwargs: object) -> object:
        if not let_go.is_set() and redis_sync.exists("eagercache:{b0}:item:stamp?k=h"):
            held.set()
            await let_go.wait()
        return await claim_due(*args, **kwargs)

    store.claim_due = held_claim_due
    writes = Counter()
    app.state.engine.on_write(writes.hit)
    async with running(app) as client:
        assert refresher.subscribed
        try:
            assert (await client.get("/data/stamp?k=h")).status_code == 200
            await asyncio.wait_for(held.wait(), 5)  # the entry fell due: the schedule loop is in its claim
            await writes.reach(2, timeout=5)  # refreshed while that claim is still held
            assert not let_go.is_set()
        finally:
            let_go.set()
    metrics = app.state.metrics
    assert metrics.sample("eagercache_fetches_total", fetcher="stamp", cause="event", outcome="ok") >= 1


async def test_expiry_events_are_enabled_by_adding_flags(redis_url: str, redis_sync: redis.Redis) -> None:
    redis_sync.config_set("notify-keyspace-events", "Kg")
    try:
        async with running(create_app([stamp], redis_url=redis_url)):
            flags = redis_sync.config_get("notify-keyspace-events")["notify-keyspace-events"]
        assert set(str(flags)) >= {"K", "g", "E", "x"}
    finally:
        redis_sync.config_set("notify-keyspace-events", "")


async def test_server_without_config_and_without_events_runs_on_the_schedule(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Managed Redis with CONFIG off and no keyspace events: one warning naming the setting, and refresh still works."""
    server = RedisServer("--rename-command", "CONFIG", '""')
    server.start()
    try:
        app = create_app([stamp], redis_url=server.url)
        writes = Counter()
        app.state.engine.on_write(writes.hit)
        with caplog.at_level(logging.WARNING, logger="eagercache"):
            async with running(app) as client:
                assert (await client.get("/data/stamp")).status_code == 200
                await writes.reach(3)  # the cold write and two refreshes, from the schedule alone
                assert (await client.get("/readyz")).status_code == 200
                metrics = (await client.get("/metrics")).text
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "notify-keyspace-events Ex" in warnings[0].__dict__["why"]
        assert 'eagercache_refresh_mode{mode="schedule"} 1.0' in metrics
        assert 'eagercache_fetches_total{cause="schedule",fetcher="stamp",outcome="ok"}' in metrics
        assert not [k for k in server.client().keys("*") if b"probe" in k]
    finally:
        server.stop()


async def test_server_without_config_but_with_events_works() -> None:
    server = RedisServer("--rename-command", "CONFIG", '""', "--notify-keyspace-events", "Ex")
    server.start()
    try:
        app = create_app([stamp], redis_url=server.url)
        writes = Counter()
        app.state.engine.on_write(writes.hit)
        async with running(app) as client:
            assert app.state.refresher.subscribed
            assert (await client.get("/data/stamp")).status_code == 200
            await writes.reach(2)
    finally:
        server.stop()


async def test_store_outage_is_503_for_new_entries_stale_for_served_ones_and_recovers(
    own_server: RedisServer,
) -> None:
    app = create_app([stamp], redis_url=own_server.url)
    app.state.engine.near_cache_ttl_s = 0  # every read goes to the store, which is what this test is about
    async with running(app) as client:
        assert (await client.get("/data/stamp")).status_code == 200
        own_server.stop()
        served = await client.get("/data/stamp")  # served here a moment ago: grace, from memory, said to be old
        assert (served.status_code, served.headers["x-cache"]) == (200, "STALE")
        down = await client.get("/data/stamp?k=never-read")
        assert down.status_code == 503
        assert down.headers["content-type"] == "application/problem+json"
        assert down.json()["type"] == "urn:eagercache:problem:store-unavailable"
        assert "Traceback" not in down.text
        assert (await client.get("/readyz")).status_code == 503

        own_server.start()
        async with asyncio.timeout(10):
            while (await client.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.05)  # polling an outside process: there is no event to await
        back = await client.get("/data/stamp")
        assert (back.status_code, back.headers["x-cache"]) == (200, "MISS")  # the server kept nothing


async def test_fill_locks_taken_together_each_answer_for_their_own_entry(
    redis_url: str, redis_sync: redis.Redis
) -> None:
    """Misses of one loop iteration take their fill locks in one round trip: an entry whose lock another
    replica holds waits for that replica, and the others of the same batch are fetched here at once."""
    calls: list[str] = []

    @fetcher(ttl=60, jitter=0)
    async def filled(k: str) -> str:
        calls.append(k)
        return k

    app = create_app([filled], redis_url=redis_url)
    redis_sync.set("eagercache:{b0}:fill:filled?k=held", b"", px=60_000)  # another replica is fetching it
    async with running(app) as client:
        held = asyncio.create_task(client.get("/data/filled?k=held"))
        free = await asyncio.gather(*(client.get(f"/data/filled?k={i}") for i in range(20)))
        assert [a.json()["data"] for a in free] == [str(i) for i in range(20)]
        assert not held.done() and "held" not in calls  # still waiting for the lock's holder
        redis_sync.delete("eagercache:{b0}:fill:filled?k=held")  # the holder gave up: fetched here
        assert (await held).json()["data"] == "held"
    assert sorted(calls) == sorted([*map(str, range(20)), "held"])


async def test_an_entry_is_stored_whole(redis_url: str, redis_sync: redis.Redis) -> None:
    async with running(create_app([stamp], redis_url=redis_url)) as client:
        body = (await client.get("/data/stamp?k=q")).content
        with redis_sync.pipeline(transaction=True) as pipe:
            pipe.get("eagercache:{b0}:item:stamp?k=q")
            pipe.pttl("eagercache:{b0}:shadow:stamp?k=q")
            pipe.zscore("eagercache:{b0}:due", "stamp?k=q")
            item, shadow_ttl, due = pipe.execute()
    assert Entry.parse(item).body == body
    assert 0 < shadow_ttl <= 500 + SHADOW_GRACE_MS  # due in the ttl (0.5 s), then the grace
    assert due is not None


async def test_without_expiry_events_no_shadow_key_is_kept_and_the_schedule_alone_refreshes(
    redis_url: str, redis_sync: redis.Redis
) -> None:
    """`expiry_events = false`: the ~143 bytes per entry of a shadow key are not spent, no subscription is
    made, and entries are still refreshed on time by the schedule."""
    app = create_app([stamp], settings=Settings(redis_url=redis_url, expiry_events=False))
    writes = Counter()
    app.state.engine.on_write(writes.hit)
    async with running(app) as client:
        first = await client.get("/data/stamp?k=x")
        assert first.headers["x-cache"] == "MISS"
        await writes.reach(3)  # the cold write, then two refreshes of ttl 0.5 s
        ready = (await client.get("/readyz")).json()
        refreshed = await client.get("/data/stamp?k=x")
    assert ready["refresh_mode"] == "schedule"
    assert app.state.refresher.events is None
    assert refreshed.json()["data"] != first.json()["data"]
    assert redis_sync.exists("eagercache:{b0}:item:stamp?k=x")
    assert redis_sync.keys("eagercache:*shadow*") == []


async def test_with_expiry_events_every_stored_entry_has_its_shadow_key(
    redis_url: str, redis_sync: redis.Redis
) -> None:
    """The default: each entry's shadow key expires a grace after it is due (the hint the events give)."""
    app = create_app([stamp], redis_url=redis_url)
    async with running(app) as client:
        await client.get("/data/stamp?k=y")
        assert app.state.refresher.mode == "events+schedule"
        head = redis_sync.getrange("eagercache:{b0}:item:stamp?k=y", 0, 127)
        assert isinstance(head, bytes)
        shadow = "eagercache:{b0}:shadow:stamp?k=y"
        expires_at = redis_sync.execute_command("PEXPIRETIME", shadow)  # type: ignore[no-untyped-call]
        due_ms = Entry.parse(head).due_ms
        assert abs(expires_at - (due_ms + SHADOW_GRACE_MS)) <= 2, (expires_at, due_ms)


async def test_an_entry_refreshed_on_time_sends_no_expiry_event(redis_url: str, redis_sync: redis.Redis) -> None:
    """An entry's claim and write move its shadow key on before it expires: an entry the schedule refreshes
    on time costs no event (was: one per refresh, to every process, each parsing them all). A refresh
    claimed more than the grace late may send one: the count is bounded by the late refreshes."""
    app = create_app([stamp], redis_url=redis_url)
    writes = Counter()
    app.state.engine.on_write(writes.hit)
    pubsub = redis_sync.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.subscribe("__keyevent@0__:expired")
    try:
        events = []
        async with running(app) as client:
            await client.get("/data/stamp?k=on-time")
            await writes.reach(4)  # the cold write, then three refreshes of ttl 0.5 s
            # Read while it runs: each event so far has been sent (before, one at each refresh's due time),
            # and the last write's shadow key has not yet had its time (it would expire once this process,
            # stopped, no longer claims the entry: an event that is then due).
            until = time.monotonic() + 0.3
            while time.monotonic() < until:
                if (message := pubsub.get_message(timeout=0)) is not None:
                    events.append(message["data"])
                await asyncio.sleep(0.01)
    finally:
        pubsub.close()
    metrics = app.state.metrics
    refreshes = metrics.sample("eagercache_refresh_lag_seconds_count", fetcher="stamp")
    on_time = metrics.sample("eagercache_refresh_lag_seconds_bucket", fetcher="stamp", le="0.25")
    assert refreshes >= 3
    ours = [e for e in events if b"shadow:stamp?k=on-time" in e]
    assert len(ours) <= refreshes - on_time, (ours, refreshes, on_time)


async def test_a_claim_whose_holder_is_gone_sends_its_event_when_its_lease_ends(
    redis_url: str, redis_sync: redis.Redis
) -> None:
    """A claim moves the entry's shadow key to its lease's end: if the claimer never writes (it died), the
    event comes once the entry is due again, for another replica to claim it; not before, when a claim
    would find it leased."""
    store = build_store(redis_url)
    await store.prepare()
    pubsub = redis_sync.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.subscribe("__keyevent@0__:expired")
    try:
        now = store.clock.now_ms()
        stored, _ = build_entry(b'"x"', now - 1, now - 1)
        await store.write("stamp?k=gone", "stamp", stored, now - 1, mode="cold", max_entries=10)
        (claim,) = (await store.claim_due([0], 300, 10)).claims
        message = None
        deadline = time.monotonic() + 5
        while message is None and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=1)
        seconds, micros = redis_sync.time()
    finally:
        pubsub.close()
        await store.aclose()
    assert message is not None and message["data"] == b"eagercache:{b0}:shadow:stamp?k=gone"
    assert seconds * 1000 + micros // 1000 >= claim.lease_end_ms + SHADOW_GRACE_MS


async def test_memory_store_keeps_no_shadow_keys() -> None:
    """memory:// sends no expiry events, so it does not pay for their shadow keys (the native store has no
    keys at all: seen on the fakeredis one, which keeps Redis's layout)."""
    assert not create_app([stamp], redis_url="memory://").state.store.shadow_keys
    app = create_app([stamp], redis_url=FAKEREDIS_URL)
    async with running(app) as client:
        await client.get("/data/stamp?k=z")
        keys = await app.state.store.client.keys("*")
    assert b"eagercache:{b0}:item:stamp?k=z" in keys
    assert not [k for k in keys if b"shadow" in k]


@pytest.mark.parametrize("buckets", [1, 2])
@pytest.mark.parametrize("claim", ["schedule", "events"])
async def test_a_claim_whose_reply_is_lost_gets_its_entries_when_sent_again(
    redis_url: str, redis_sync: redis.Redis, monkeypatch: pytest.MonkeyPatch, buckets: int, claim: str
) -> None:
    """A claim ran, and its connection broke before its reply came back (a failover, a cluster client dropping
    its connections on MOVED): the client sends the same command again. That retry gets the entries the first
    run took, with their lease, rather than finding them leased to nobody for a lease's length. One bucket
    sends its claim as one command, two as a pipeline: both retry."""
    store = build_store(redis_url, namespace="lost:", buckets=buckets)
    await store.open()
    try:
        await store.prepare()
        ids = [f"f?i={i}" for i in range(6)]
        for entry_id in ids:
            value, _ = build_entry(b'"x"', store.clock.now_ms(), 0)
            assert await store.write(entry_id, "f", value, 0, mode="cold", max_entries=100) == 1
        lost = {"replies": 0}
        send: Any = redis.asyncio.Redis._send_command_parse_response
        exchange = roundtrip._exchange

        def drop_first(reply: Any, command: tuple[Any, ...]) -> Any:
            if "EVALSHA" in map(str, command) and lost["replies"] == 0:
                lost["replies"] += 1
                raise redis.ConnectionError("injected: the connection broke after the claim ran")
            return reply

        async def sent_once(self: Any, connection: Any, command_name: str, *args: Any, **options: Any) -> Any:
            return drop_first(await send(self, connection, command_name, *args, **options), (command_name, *args))

        async def exchanged_once(connection: Any, packed: list[bytes], count: int) -> list[Any]:
            replies: list[Any] = drop_first(await exchange(connection, packed, count), ("EVALSHA",))
            return replies

        monkeypatch.setattr(redis.asyncio.Redis, "_send_command_parse_response", sent_once)
        monkeypatch.setattr(roundtrip, "_exchange", exchanged_once)
        if claim == "schedule":
            claimed = await store.claim_due(range(buckets), lease_ms=60_000, limit=100)
        else:
            claimed = await store.claim(ids, lease_ms=60_000)
        assert lost["replies"] == 1  # the first reply was lost, and the command sent again
        assert sorted(c.entry_id for c in claimed.claims) == ids
        leases = {c.entry_id: c.lease_end_ms for c in claimed.claims}
        for entry_id in ids:
            bucket = store.keys.bucket_of(entry_id)
            assert redis_sync.zscore(bucket.due, entry_id) == leases[entry_id]  # the lease the reply names
            assert next(c for c in claimed.claims if c.entry_id == entry_id).header  # and its stored header
        assert abs(store.clock.now_ms() - time.time() * 1000) < 1000  # the replayed reply's time is today's
        assert (await store.claim_due(range(buckets), lease_ms=60_000, limit=100)).claims == []  # taken: once
    finally:
        await store.aclose()
