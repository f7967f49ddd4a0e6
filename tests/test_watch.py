"""GET /watch in process: snapshot, patches, status, resume, refill, idle, slow clients, limits, the channel.

Streams are read from uvicorn on a real socket (tests/watching.py). Changes are made by the tests themselves
(an admin-style forced refresh of data they changed), so each one is awaited, never slept for.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import httpx
import pytest
import redis
from starlette.applications import Starlette

from eagercache import Settings, changes, create_app, fetcher, load_settings
from eagercache import stream as stream_module
from eagercache import watch as watch_module
from eagercache.watch import WatchHub

from .helpers import Counter, garbage_made
from .test_redis import running
from .watching import Event, EventStream, Replica, serving, watching


def settings(**overrides: Any) -> Settings:
    return load_settings({"redis_url": "memory://", **overrides}, {})


# Makes bodies large enough that a patch is smaller than the new body (else a snapshot is sent instead).
PAD = "x" * 300


class Source:
    """Data a fetcher returns, set by the test; `failing` makes it raise."""

    def __init__(self, value: Any = 0) -> None:
        self.value = value
        self.failing = False
        self.calls = Counter()


def item_fetcher(source: Source, **options: Any) -> Any:
    options = {"ttl": 60, "jitter": 0, "timeout": 2, **options}

    @fetcher(name="item", **options)
    async def item(k: str = "a") -> dict[str, Any]:
        source.calls.hit()
        if source.failing:
            raise ConnectionError("upstream down")
        return {"k": k, "value": source.value, "pad": PAD}

    return item


def exactly(doc: Any) -> str:
    """A document as JSON with sorted keys: `True` and `1`, `1` and `1.0` stay different (unlike ==)."""
    return json.dumps(doc, sort_keys=True)


async def change(app: Starlette, source: Source, value: Any, query: str = "k=a") -> None:
    """Set the data and refresh the entry now, as POST /admin/fetchers/item/refresh would."""
    source.value = value
    assert await app.state.engine.force_refresh("item", query) is not None


async def test_errors_are_problems_before_any_stream() -> None:
    source = Source()
    app = create_app([item_fetcher(source)], settings=settings())
    async with running(app) as client:
        for path, status, slug in [
            ("/watch/nope", 404, "unknown-fetcher"),
            ("/watch/item?zzz=1", 400, "invalid-parameters"),
            ("/watch/item?k=" + "x" * 5000, 414, "query-too-long"),
        ]:
            answer = await client.get(path)
            assert answer.status_code == status, path
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["type"] == f"urn:eagercache:problem:{slug}"
            # the same document /data answers with
            assert answer.json() == (await client.get(path.replace("/watch/", "/data/", 1))).json()
        assert source.calls.count == 0
        assert app.state.watch.count == 0


async def test_a_process_that_is_shutting_down_takes_no_new_watcher() -> None:
    app = create_app([item_fetcher(Source())], settings=settings())
    async with running(app) as client:
        app.state.watch.close()  # what SIGTERM does (with the engine's shutdown)
        answer = await client.get("/watch/item")
        assert (answer.status_code, answer.headers["retry-after"]) == (503, "1")
        assert answer.json()["type"] == "urn:eagercache:problem:shutting-down"
        assert (await client.get("/watch/nope")).status_code == 404  # bad input is still told as such
        assert app.state.watch.count == 0


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_a_watcher_gets_the_snapshot_then_a_patch_for_each_change(http: str) -> None:
    source = Source({"a": 1})
    app = create_app([item_fetcher(source)], settings=settings())
    async with serving(app, http) as url, httpx.AsyncClient(base_url=url) as client:
        before = await client.get("/data/item")
        async with watching(client, "/watch/item") as stream:
            snapshot = await stream.next_event()
            assert snapshot.event == "snapshot"
            # Under httptools the stream writes to the connection itself; under h11, through the ASGI send.
            (watched,) = app.state.watch.entries.values()
            (watcher,) = watched.watchers
            assert (getattr(watcher.outlet, "cycle", None) is not None) == (http == "httptools")
            assert stream.retries == [1000]
            assert snapshot.id == before.headers["etag"]  # the ETag header's value, quotes and all
            assert snapshot.data == before.text  # the exact body /data sends
            replica = Replica()
            replica.apply(snapshot)
            # Objects and arrays growing and shrinking, nesting, and values Python's == confuses.
            values: list[Any] = [
                {"a": 1, "b": [1, 2, 3]},
                {"a": 1, "b": [1, 3], "c": {"d/e~f": None}},
                {"a": True, "b": [3, 1], "c": {"d/e~f": "x"}},
                {"a": 1, "b": [3, 1.0], "c": {}},
                {"a": 1.0, "b": [3, 1.0], "c": {}},
                "now a string",
                ["a", "list", {"of": "things"}],
            ]
            kinds = []
            for value in values:
                await change(app, source, value)
                event = await stream.next_event()
                kinds.append(event.event)
                replica.apply(event)
                now = await client.get("/data/item")
                assert now.headers["etag"] == event.id
                assert exactly(replica.doc) == exactly(now.json())
            assert kinds.count("patch") >= 4, kinds
            assert stream.retries == [1000]  # sent once
    patches = app.state.metrics.sample("eagercache_watch_events_total", event="patch")
    assert patches == kinds.count("patch")


async def test_head_answers_the_stream_headers_without_a_stream() -> None:
    app = create_app([item_fetcher(Source())], settings=settings())
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        answer = await client.head("/watch/item", timeout=5)
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert answer.headers["cache-control"] == "no-store"
        assert answer.content == b""
        assert (await client.head("/watch/nope")).status_code == 404
    assert app.state.watch.count == 0


async def test_refreshes_that_bring_the_same_data_send_nothing() -> None:
    source = Source("same")
    app = create_app([item_fetcher(source, ttl=0.05)], settings=settings())
    writes = Counter()
    app.state.engine.on_write(writes.hit)
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        async with watching(client, "/watch/item") as stream:
            snapshot = await stream.next_event()
            assert snapshot.event == "snapshot"
            await writes.reach(writes.count + 5)  # five scheduled refreshes of unchanged data
            source.value = "changed"
            event = await stream.next_event()  # the first event after the snapshot is the change's
            assert event.event == "patch"
            assert event.json()["base"] == snapshot.id


async def test_a_ping_comment_keeps_the_stream_open() -> None:
    app = create_app([item_fetcher(Source())], settings=settings(watch_ping=0.1))
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        async with watching(client, "/watch/item") as stream:
            assert (await stream.next_event()).event == "snapshot"
            assert await stream.comment(timeout=5) == "ping"
            assert await stream.comment(timeout=5) == "ping"


async def test_status_events_when_the_entry_turns_stale_and_fresh_again() -> None:
    source = Source()
    app = create_app([item_fetcher(source, ttl=0.1)], settings=settings())
    stales = Counter()
    app.state.engine.on_change(lambda change, *_: stales.hit() if change == "stale" else None)
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        async with watching(client, "/watch/item") as stream:
            assert (await stream.next_event()).event == "snapshot"
            source.failing = True
            stale = await stream.next_event()
            assert (stale.event, stale.id, stale.json()) == ("status", None, {"state": "stale"})
            assert (await client.get("/data/item")).headers["x-cache"] == "STALE"
            source.failing = False
            fresh = await stream.next_event()  # the same data again: the hub's check finds the entry fresh
            assert (fresh.event, fresh.json()) == ("status", {"state": "fresh"})
            assert (await client.get("/data/item")).headers["x-cache"] == "HIT"
        # A watcher that comes while the entry is stale is told so right after its snapshot.
        source.failing = True
        await stales.reach(2)
        async with watching(client, "/watch/item") as stream:
            first, second = await stream.next_event(), await stream.next_event()
            assert first.event == "snapshot"
            assert (second.event, second.json()) == ("status", {"state": "stale"})


async def test_last_event_id_resumes_without_a_snapshot_only_at_the_current_version() -> None:
    source = Source(1)
    app = create_app([item_fetcher(source)], settings=settings())
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        async with watching(client, "/watch/item") as stream:
            first = await stream.next_event()
        assert first.id is not None
        async with watching(client, "/watch/item", last_event_id=first.id) as stream:
            await change(app, source, 2)
            resumed = await stream.next_event()  # nothing was missed: no snapshot, the change's patch first
            assert resumed.event == "patch"
            assert resumed.json()["base"] == first.id
        for missed in [first.id, "garbage", '"' + first.id.strip('"') + '-gz"']:
            async with watching(client, "/watch/item", last_event_id=missed) as stream:
                again = await stream.next_event()
                assert again.event == "snapshot", missed
                assert again.id == resumed.id and again.json()["data"]["value"] == 2


async def test_an_invalidated_entry_is_filled_again_at_once_and_its_watchers_get_a_snapshot() -> None:
    source = Source("v")
    app = create_app([item_fetcher(source)], settings=settings())
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        async with watching(client, "/watch/item") as stream:
            first = await stream.next_event()
            calls = source.calls.count
            (entry_id,) = app.state.watch.entries
            assert await app.state.engine.forget(entry_id, "item")  # what DELETE /admin/.../entry does
            again = await stream.next_event()
            assert again.event == "snapshot"
            assert again.id == first.id  # the same data, fetched again
            assert source.calls.count == calls + 1  # by the hub, without any reader
            answer = await client.get("/data/item")
            assert answer.headers["x-cache"] == "HIT" and answer.text == again.data


async def test_a_watched_entry_is_never_removed_as_idle() -> None:
    source = Source()
    app = create_app([item_fetcher(source, ttl=0.05, max_idle=0.2)], settings=settings())
    writes, removed = Counter(), Counter()
    app.state.engine.on_write(writes.hit)
    app.state.engine.on_change(lambda change, *_: removed.hit() if change == "gone" else None)
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        async with watching(client, "/watch/item") as stream:
            assert (await stream.next_event()).event == "snapshot"
            await writes.reach(30)  # 1.5 s of refreshes: over 7 times max_idle, and nobody reads /data
            assert removed.count == 0
        # Unwatched, it is idle again: removed at a refresh once max_idle has passed.
        await removed.reach(1, timeout=5)
    assert app.state.metrics.sample("eagercache_idle_removed_total", fetcher="item") == 1
    assert app.state.watch.entries == {}


async def test_a_slow_client_gets_a_snapshot_instead_of_a_backlog_and_delays_nobody(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watch_module, "BUFFER_EVENTS", 4)
    n = {"calls": 0}

    @fetcher(ttl=60, jitter=0)
    async def blob() -> dict[str, Any]:
        n["calls"] += 1  # 256 KB of new data each time: no patch is smaller, every change is a snapshot
        return {"n": n["calls"], "pad": secrets.token_hex(128 * 1024)}

    app = create_app([blob], settings=settings())
    hub: WatchHub = app.state.watch
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as slow_client:
        async with watching(slow_client, "/watch/blob") as slow, httpx.AsyncClient(base_url=url) as fast_client:
            assert (await slow.next_event()).event == "snapshot"
            (watched,) = hub.entries.values()
            (stalled,) = watched.watchers
            async with watching(fast_client, "/watch/blob") as fast:
                replica = Replica()
                replica.apply(await fast.next_event())
                made = 0
                async with asyncio.timeout(30):
                    while hub.metrics.sample("eagercache_watch_slow_clients_total", action="snapshot") == 0:
                        assert await app.state.engine.force_refresh("blob", "") is not None
                        made += 1
                        replica.apply(await fast.next_event(timeout=5))  # each change reaches this client at once
                        assert replica.doc["data"]["n"] == n["calls"]
                        assert stalled.buffered <= 4  # the stalled client's backlog stays bounded
                latest = replica.id
                # The stalled client reads again: what was on the wire, then the newest version, not a backlog.
                got = await _until(slow, latest)
        assert got[-1].event == "snapshot" and got[-1].id == latest
        assert len(got) < made, (len(got), made)  # the backlog was dropped


async def test_a_client_that_takes_nothing_is_disconnected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_module, "SEND_TIMEOUT_S", 0.5)

    @fetcher(ttl=60, jitter=0)
    async def blob() -> str:
        return secrets.token_hex(128 * 1024)

    app = create_app([blob], settings=settings())
    metrics = app.state.metrics
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        async with watching(client, "/watch/blob") as stalled:
            assert (await stalled.next_event()).event == "snapshot"
            assert app.state.watch.count == 1
            async with asyncio.timeout(30):
                while metrics.sample("eagercache_watch_slow_clients_total", action="disconnect") == 0:
                    assert await app.state.engine.force_refresh("blob", "") is not None  # until its socket is full
                    await asyncio.sleep(0.05)  # paced: the send timeout is what is measured here
            assert app.state.watch.count == 0  # its watcher is gone, and its place under --max-watchers


async def _until(stream: EventStream, event_id: str | None) -> list[Event]:
    got: list[Event] = []
    async with asyncio.timeout(30):
        while not got or got[-1].id != event_id:
            event = await stream.next_event()
            got.append(event)
    return got


async def test_a_stream_that_ends_leaves_no_cycle_of_its_own_for_the_garbage_collector() -> None:
    app = create_app([item_fetcher(Source())], settings=settings())
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        with garbage_made() as garbage:
            async with watching(client, "/watch/item") as stream:
                assert (await stream.next_event()).event == "snapshot"
            async with asyncio.timeout(10):
                while app.state.watch.count:
                    await asyncio.sleep(0.01)  # the server notices the client left; nothing to await
        found = [o for o in garbage if isinstance(o, watch_module.Watcher | stream_module._Stream)]
    assert found == []


async def test_max_watchers_answers_503_with_retry_after() -> None:
    app = create_app([item_fetcher(Source())], settings=settings(max_watchers=2))
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        async with watching(client, "/watch/item?k=1") as one, watching(client, "/watch/item?k=2") as two:
            assert (await one.next_event()).event == (await two.next_event()).event == "snapshot"
            full = await client.get("/watch/item?k=3")
            assert full.status_code == 503
            assert full.headers["content-type"] == "application/problem+json"
            assert full.headers["retry-after"] == "5"
            assert full.json()["type"] == "urn:eagercache:problem:too-many-watchers"
            assert app.state.metrics.sample("eagercache_watchers") == 2
        async with asyncio.timeout(5):
            while app.state.watch.count:
                await asyncio.sleep(0.01)  # the server ends closed streams in its own tasks: nothing to await
        async with watching(client, "/watch/item?k=3") as three:  # room again
            assert (await three.next_event()).event == "snapshot"


def subscribers(url: str, channel: str, cluster: bool) -> int:
    """Subscribers of the channel, on every node (a cluster node counts only its own)."""
    if not cluster:
        with redis.Redis.from_url(url) as server:
            return int(dict(server.pubsub_numsub(channel))[channel.encode()])
    with redis.RedisCluster.from_url(url) as client:
        counts = [client.get_redis_connection(node).pubsub_numsub(channel) for node in client.get_nodes()]
    return sum(int(dict(count)[channel.encode()]) for count in counts)


@pytest.mark.parametrize("topology", ["redis", "cluster"])
async def test_one_subscription_per_process_carries_every_change_to_its_watchers(
    topology: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_url" if topology == "redis" else "cluster_url")
    if topology == "redis":
        request.getfixturevalue("redis_sync")  # flushed
    source = Source("first")
    item = item_fetcher(source)
    watched = create_app([item], settings=settings(redis_url=url))
    other = create_app([item], settings=settings(redis_url=url))
    hub: WatchHub = watched.state.watch
    hub.check_interval_s = 3600  # only the channel can bring the other process's change in time
    async with serving(watched) as base, running(other), httpx.AsyncClient(base_url=base) as client:
        async with asyncio.timeout(10):
            while not (hub.channel.subscribed and other.state.watch.channel.subscribed):
                await asyncio.sleep(0.01)  # subscribing is the hubs' own business: nothing to await
        async with watching(client, "/watch/item") as one, watching(client, "/watch/item") as two:
            snapshots = [await one.next_event(), await two.next_event()]
            async with watching(client, "/watch/item?k=b") as three:
                assert (await three.next_event()).event == "snapshot"
                # Two processes, three watchers: one subscription each.
                assert subscribers(url, hub.channel.channel, topology == "cluster") == 2
                await change(other, source, "second")
                for stream, snapshot in zip((one, two), snapshots, strict=True):
                    event = await stream.next_event()
                    assert event.event == "patch" and event.json()["base"] == snapshot.id
                    assert event.json()["patch"][0] == {"op": "replace", "path": "/data/value", "value": "second"}


async def test_the_check_reads_only_entries_that_may_have_changed_unannounced_until_told_to_sweep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watch_module, "SWEEP_INTERVAL_S", 3600.0)
    app = create_app([item_fetcher(Source())], settings=settings())
    hub: WatchHub = app.state.watch
    hub.check_interval_s = 0.02
    described: list[str] = []
    reads = Counter()
    describe, suspect = hub.store.describe, hub._suspect
    rounds = Counter()  # check rounds that were no sweep: they ask which entries to read

    async def recording(entry_ids: list[str]) -> Any:
        described.extend(entry_ids)
        reads.hit()
        return await describe(entry_ids)

    def counting(watched: Any) -> bool:
        rounds.hit()
        return suspect(watched)

    monkeypatch.setattr(hub.store, "describe", recording)
    monkeypatch.setattr(hub, "_suspect", counting)
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        async with watching(client, "/watch/item") as stream:
            assert (await stream.next_event()).event == "snapshot"
            await rounds.reach(1)
            described.clear()  # a sweep (the subscription confirmed) may have come before
            await rounds.reach(rounds.count + 5)
            assert described == []  # fresh, announced, not overdue: nothing to read
            # A process that lost announcements says so: every watched entry is read at once.
            await hub.store.publish(hub.channel.channel, b"sync - -")
            await reads.reach(reads.count + 1)
            assert described == list(hub.entries)


async def test_openapi_describes_each_watch_stream() -> None:
    app = create_app([item_fetcher(Source())], settings=settings())
    async with running(app) as client:
        spec = (await client.get("/openapi.json")).json()
    operation = spec["paths"]["/watch/item"]["get"]
    assert list(operation["responses"]["200"]["content"]) == ["text/event-stream"]
    assert {(p["name"], p["in"]) for p in operation["parameters"]} == {("k", "query"), ("Last-Event-ID", "header")}
    assert {"400", "404", "414", "502", "503", "504"} <= set(operation["responses"])
    assert "max-watchers" in operation["responses"]["503"]["description"]


def test_the_channel_reads_only_lines_that_are_changes() -> None:
    message = b"data abc item?k=1\nstale - item?k=2\ngone - item?k=3\nhello\nbogus x y\n\xff\xfe - x\ndata e"
    assert changes.decode(message) == [
        changes.Announced("data", "item?k=1", "abc"),
        changes.Announced("stale", "item?k=2", ""),
        changes.Announced("gone", "item?k=3", ""),
    ]
    assert changes.decode(changes.encode("gone", "item?k=3", "")) == [changes.Announced("gone", "item?k=3", "")]
