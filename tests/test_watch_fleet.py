"""GET /watch across real `eagercache serve` processes on a real Redis: changes made by either process reach a
watcher of one, patches rebuild /data, Last-Event-ID resumes, status, refills, errors, limits and shutdown.

Changes are made through the admin API of one process or the other (POST .../refresh fetches now), so the test
knows which process refreshed each version.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis

from .servers import ServeProcess
from .watching import Replica, watching

TOKEN = "watch-token-for-the-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FETCHERS = ("--fetchers", "tests.watch_fetchers:valued", "--fetchers", "tests.watch_fetchers:flaky")


def start(redis_url: str, *args: str) -> ServeProcess:
    env = {"FLEET_REDIS_URL": redis_url, "EAGERCACHE_ADMIN_TOKEN": TOKEN}
    server = ServeProcess("--redis-url", redis_url, *FETCHERS, *args, env=env)
    try:
        server.wait_ready()
    except BaseException:
        server.close()
        raise
    return server


@pytest.fixture(scope="module")
def fleet(redis_url: str) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    """Two processes on one Redis: `a` (at most 3 watchers) and `b`."""
    redis.Redis.from_url(redis_url).flushdb()
    a = start(redis_url, "--max-watchers", "3")
    try:
        b = start(redis_url)
        try:
            yield a, b
        finally:
            b.close()
    finally:
        a.close()


@pytest.fixture
def data(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
async def clients(fleet: tuple[ServeProcess, ServeProcess]) -> AsyncIterator[tuple[httpx.AsyncClient, ...]]:
    a, b = fleet
    async with httpx.AsyncClient(base_url=a.url) as on_a, httpx.AsyncClient(base_url=b.url) as on_b:
        yield on_a, on_b


def set_value(data: redis.Redis, k: str, value: Any) -> None:
    data.set(f"watchtest:value:{k}", json.dumps(value))


async def refresh(client: httpx.AsyncClient, k: str) -> None:
    answer = await client.post(f"/admin/fetchers/valued/refresh?k={k}", headers=AUTH)
    assert answer.status_code == 200, answer.text


async def watchers(client: httpx.AsyncClient) -> float:
    """The process's eagercache_watchers gauge."""
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith("eagercache_watchers "):
            return float(line.split()[1])
    return 0.0


async def test_a_watcher_sees_every_change_whichever_process_refreshed_it(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], data: redis.Redis
) -> None:
    on_a, on_b = clients
    set_value(data, "x", 0)
    before = await on_a.get("/data/valued?k=x")
    async with watching(on_a, "/watch/valued?k=x") as stream:
        snapshot = await stream.next_event()
        assert (snapshot.event, snapshot.id, snapshot.data) == ("snapshot", before.headers["etag"], before.text)
        replica = Replica()
        replica.apply(snapshot)
        by = [on_b, on_a, on_b, on_b, on_a]
        for n, client in enumerate(by, start=1):
            set_value(data, "x", {"n": n, "items": list(range(n % 3)), "by": "b" if client is on_b else "a"})
            await refresh(client, "x")
            event = await stream.next_event()
            assert event.event == "patch"
            replica.apply(event)  # checks the patch's base is the version the copy has
            # The process that refreshed answers /data with this very version (it wrote it): the patches rebuilt it.
            now = await client.get("/data/valued?k=x")
            assert now.headers["etag"] == event.id
            assert replica.doc == now.json()
            if n == 3:  # a refresh of unchanged data, on either process, sends nothing:
                await refresh(on_a, "x")  # the next event is the next change's, on this version
                await refresh(on_b, "x")
        assert replica.doc["data"]["value"]["n"] == len(by)
    metrics = (await on_a.get("/metrics")).text
    assert 'eagercache_watch_events_total{event="patch"}' in metrics


async def test_last_event_id_resumes_on_another_process(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], data: redis.Redis
) -> None:
    on_a, on_b = clients
    set_value(data, "r", "first")
    async with watching(on_a, "/watch/valued?k=r") as stream:
        first = await stream.next_event()
    # Nothing changed: resuming elsewhere sends no snapshot; the change's patch comes first.
    async with watching(on_b, "/watch/valued?k=r", last_event_id=first.id) as stream:
        set_value(data, "r", "second")
        await refresh(on_a, "r")
        resumed = await stream.next_event()
        assert resumed.event == "patch" and resumed.json()["base"] == first.id
    # A change was missed: a snapshot of the current version first.
    async with watching(on_a, "/watch/valued?k=r", last_event_id=first.id) as stream:
        again = await stream.next_event()
        assert (again.event, again.id) == ("snapshot", resumed.id)
        assert again.json()["data"]["value"] == "second"


async def test_status_and_refill_reach_watchers_of_another_process(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], data: redis.Redis
) -> None:
    on_a, on_b = clients
    set_value(data, "s", "ok")
    async with watching(on_a, "/watch/flaky?k=s") as stream:
        assert (await stream.next_event()).event == "snapshot"
        data.set("watchtest:fail:s", 1)  # the next refresh fails, on whichever process claims it
        stale = await stream.next_event()
        assert (stale.event, stale.id, stale.json()) == ("status", None, {"state": "stale"})
        data.delete("watchtest:fail:s")
        fresh = await stream.next_event()
        assert (fresh.event, fresh.json()) == ("status", {"state": "fresh"})
    set_value(data, "i", 1)
    async with watching(on_a, "/watch/valued?k=i") as stream:
        first = await stream.next_event()
        gone = await on_b.delete("/admin/fetchers/valued/entry?k=i", headers=AUTH)
        assert gone.status_code == 204
        again = await stream.next_event()  # filled again at once, as a cold read: a snapshot
        assert (again.event, again.id) == ("snapshot", first.id)
        assert data.exists("eagercache:{b0}:item:valued?k=i")


async def test_errors_before_the_stream_and_the_watcher_limit(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], data: redis.Redis
) -> None:
    on_a, _ = clients
    for path, status in [("/watch/nope", 404), ("/watch/valued", 400), ("/watch/valued?k=1&zzz=2", 400)]:
        answer = await on_a.get(path)
        assert (answer.status_code, answer.headers["content-type"]) == (status, "application/problem+json"), path
    set_value(data, "m", 1)
    async with asyncio.timeout(5):  # the earlier tests' streams, closed by their clients, are ended by the server
        while await watchers(on_a) > 0:
            await asyncio.sleep(0.02)  # in its own time: there is nothing to await from here
    async with (
        watching(on_a, "/watch/valued?k=m") as one,
        watching(on_a, "/watch/valued?k=m") as two,
        watching(on_a, "/watch/valued?k=m") as three,
    ):
        for stream in (one, two, three):
            assert (await stream.next_event()).event == "snapshot"
        full = await on_a.get("/watch/valued?k=m")
        assert full.status_code == 503 and full.headers["retry-after"] == "5"
        assert full.json()["type"] == "urn:eagercache:problem:too-many-watchers"
        assert await watchers(on_a) == 3


async def test_sigterm_ends_open_streams_and_the_process_promptly(redis_url: str, data: redis.Redis) -> None:
    server = start(redis_url)
    try:
        set_value(data, "t", 1)
        async with httpx.AsyncClient(base_url=server.url) as client, watching(client, "/watch/valued?k=t") as stream:
            assert (await stream.next_event()).event == "snapshot"
            started = time.monotonic()
            server.process.send_signal(15)
            assert await stream.next(timeout=5) is None  # the stream ended cleanly: no error reading it
        code = server.process.wait(10)
        took = time.monotonic() - started
        assert code in (0, -15), server.stderr()  # uvicorn re-raises SIGTERM after a clean shutdown
        assert took < 3, f"{took:.1f} s (the shutdown timeout is 10 s: the stream must not hold it)"
    finally:
        server.close()
