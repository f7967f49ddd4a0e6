"""eagercache mounted in a FastAPI app (examples/eagercache_examples/fastapi_app.py), its lifespan in the host's."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest
import redis
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.routing import Mount

import eagercache
from eagercache import Settings, create_app, fetcher
from eagercache.item import Entry
from eagercache_examples.fastapi_app import create_service

from .helpers import Counter
from .redis_server import free_port
from .watching import serving, watching

TOKEN = "mount-test-token-0123456789"
FAST = {"clock": {"ttl": 0.3, "jitter": 0}}  # refreshed every 0.3 s, so a test sees the refresher work


def cache_of(host: Starlette) -> Starlette:
    (cache,) = [route.app for route in host.routes if isinstance(route, Mount) and isinstance(route.app, Starlette)]
    return cache


@asynccontextmanager
async def running(host: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """The host's lifespan, as its server runs it, and a client of the host."""
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(host.router.lifespan_context(host))
        transport = httpx.ASGITransport(app=host)
        yield await stack.enter_async_context(httpx.AsyncClient(transport=transport, base_url="http://test"))


async def last_retrieved(cache: Starlette, name: str, query: bytes = b"") -> int | None:
    """The stored entry's last_retrieved, read from the store: no reader, so nothing is recorded as read."""
    _, call = cache.state.registry.call(name, query)
    raw, _ = await cache.state.store.get(call.entry_id)
    return None if raw is None else Entry.parse(raw).last_retrieved_ms


async def test_the_example_serves_the_cache_under_its_prefix_next_to_its_own_routes(local_store_url: str) -> None:
    host = create_service(Settings(redis_url=local_store_url, admin_token=TOKEN))
    async with running(host) as client:
        cold = await client.get("/cache/data/greeting?name=Ada")
        assert (cold.status_code, cold.headers["x-cache"]) == (200, "MISS"), cold.text
        assert cold.json()["data"]["text"] == "Hello, Ada!"
        warm = await client.get("/cache/data/greeting?name=Ada", headers={"If-None-Match": cold.headers["etag"]})
        assert (warm.status_code, warm.headers["x-cache"]) == (304, "HIT")
        # The host's own route, and its own lifespan ran (it set what the route answers).
        hello = await client.get("/hello?name=Bo")
        assert hello.status_code == 200 and hello.json()["hello"] == "Bo"
        assert isinstance(hello.json()["up_since"], float)
        # The rest of eagercache's HTTP surface, under the prefix too.
        assert (await client.get("/cache/readyz")).json()["status"] == "ready"
        assert b"eagercache_requests_total" in (await client.get("/cache/metrics")).content
        page = await client.get("/cache/", headers={"Accept": "text/html"})  # the status page: relative links
        assert page.status_code == 200 and 'src="status/static/status.js"' in page.text
        assert (await client.get("/cache/status")).status_code == 200
        unknown = await client.get("/cache/data/nope")
        assert (unknown.status_code, unknown.json()["type"]) == (404, "urn:eagercache:problem:unknown-fetcher")
        admin = await client.get("/cache/admin/fetchers", headers={"Authorization": f"Bearer {TOKEN}"})
        assert {f["name"] for f in admin.json()["fetchers"]} == {"clock", "greeting", "prices"}
        # The OpenAPI document says where its paths are: under the prefix, which a client prepends.
        spec = (await client.get("/cache/openapi.json")).json()
        assert spec["servers"] == [{"url": "/cache"}]
        answer = await client.get(spec["servers"][0]["url"] + "/data/greeting", params={"name": "Ada"})
        assert answer.status_code == 200 and answer.headers["x-cache"] == "HIT"
    # Served directly (no prefix), the document has no servers: the paths are the server's own.
    direct = create_app([], redis_url="memory://")
    async with running(direct) as client:
        assert "servers" not in (await client.get("/openapi.json")).json()


async def test_the_refresher_runs_in_the_host_lifespan(local_store_url: str) -> None:
    host = create_service(Settings(redis_url=local_store_url, fetcher_overrides=FAST))
    cache = cache_of(host)
    async with running(host) as client:
        assert (await client.get("/cache/data/clock")).status_code == 200
        first = await last_retrieved(cache, "clock")
        assert first is not None
        deadline = time.monotonic() + 10
        while (moved := await last_retrieved(cache, "clock")) == first:  # nobody reads it meanwhile
            assert time.monotonic() < deadline, "the entry was not refreshed"
            await asyncio.sleep(0.05)  # another task's work, seen in the store: no event to await
        assert moved is not None and moved > first
        assert cache.state.metrics.sample("eagercache_fetches_total", fetcher="clock", cause="schedule", outcome="ok")


async def test_a_mount_whose_lifespan_never_ran_answers_503_saying_so(local_store_url: str) -> None:
    runs = Counter()

    @fetcher(ttl=0.2)
    async def clock() -> int:
        runs.hit()
        return runs.count

    cache = create_app([clock], redis_url=local_store_url)
    host = FastAPI()  # no lifespan: nobody enters eagercache's
    host.mount("/cache", cache)

    @host.get("/own")
    async def own() -> str:
        return "ok"

    async with running(host) as client:
        for path in ("/cache/data/clock", "/cache/readyz", "/cache/watch/clock", "/cache/openapi.json"):
            answer = await client.get(path)
            assert answer.status_code == 503, (path, answer.text)  # not a 500, and not served without a refresher
            assert answer.headers["content-type"] == "application/problem+json"
            problem = answer.json()
            assert problem["type"] == "urn:eagercache:problem:not-running"
            assert "eagercache.lifespan(cache_app)" in problem["detail"]
        assert (await client.get("/own")).json() == "ok"
    assert runs.count == 0  # nothing was fetched


async def test_the_lifespan_runs_once_and_only_for_an_eagercache_app() -> None:
    cache = create_app([], redis_url="memory://")
    with pytest.raises(TypeError, match="create_app"):
        eagercache.lifespan(FastAPI())  # the host, not the mounted app
    host = FastAPI(lifespan=eagercache.lifespan)  # the same mistake, made by Starlette at start-up
    host.mount("/cache", cache)
    with pytest.raises(TypeError, match="create_app"):
        async with host.router.lifespan_context(host):
            pass
    async with eagercache.lifespan(cache):
        with pytest.raises(RuntimeError, match="is running"):
            async with cache.router.lifespan_context(cache):  # e.g. the server runs it as well
                pass
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=cache), base_url="http://test") as client:
            assert (await client.get("/healthz")).status_code == 200
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=cache), base_url="http://test") as client:
        ended = await client.get("/healthz")
    assert (ended.status_code, ended.json()["type"]) == (503, "urn:eagercache:problem:shutting-down")
    with pytest.raises(RuntimeError, match="has ended"):
        async with eagercache.lifespan(cache):
            pass


async def test_watch_streams_under_the_prefix_on_a_real_server(local_store_url: str) -> None:
    host = create_service(Settings(redis_url=local_store_url, fetcher_overrides=FAST))
    async with serving(host) as base, httpx.AsyncClient(base_url=base) as client:
        for path in ("/cache/data/clock?resolution=1", "/hello"):
            answer = await client.get(path)
            assert answer.status_code == 200
            assert len(answer.headers.get_list("date")) == 1  # the server's; create_app's date_header is off
        async with watching(client, "/cache/watch/clock?resolution=1") as stream:
            first = await stream.next_event()
            assert first.event == "snapshot"
            # The epoch changes once a second and the entry is refreshed every 0.3 s: a new version comes.
            changed = await stream.next_event(timeout=10)
            assert changed.event in ("snapshot", "patch") and changed.id != first.id


def test_sigterm_to_the_host_server_ends_open_streams_and_runs_the_drain(
    redis_url: str, redis_sync: redis.Redis, tmp_path: Path
) -> None:
    """The example under a real uvicorn process: SIGTERM is the host server's to handle, and a /watch
    stream left open must not hold its shutdown; eagercache's lifespan exit (the drain) runs in the host's."""
    config = tmp_path / "eagercache.toml"
    config.write_text("[fetcher.clock]\nttl = 0.3\njitter = 0\n")
    port = free_port()
    env = {**os.environ, "EAGERCACHE_REDIS_URL": redis_url, "EAGERCACHE_CONFIG": str(config)}
    log = tmp_path / "uvicorn.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "eagercache_examples.fastapi_app:app", "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            assert server.poll() is None, log.read_text()
            try:
                if httpx.get(f"{base}/cache/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)  # another process: no event to await
        assert httpx.get(f"{base}/hello").json()["hello"] == "world"
        with httpx.stream("GET", f"{base}/cache/watch/clock", timeout=httpx.Timeout(10, read=30)) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("event:")) == "event: snapshot"
            server.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            for _ in lines:  # the stream ends, complete (an incomplete one raises here), not at the read timeout
                pass
        server.wait(timeout=15)
        assert time.monotonic() - signalled < 3  # ended at once, not after the 1 s grace and a cancellation
    finally:
        server.kill()
        server.wait()
    output = log.read_text()
    assert "Application shutdown complete" in output, output  # the host's lifespan, eagercache's inside it, ended
    assert "Traceback" not in output and "without completing response" not in output, output


async def test_the_host_shutdown_drains_a_refresh_in_flight_before_its_own_teardown(local_store_url: str) -> None:
    events: list[str] = []
    started, gate = Counter(), asyncio.Event()
    gate.set()

    @fetcher(ttl=0.2, jitter=0, timeout=10)
    async def gated() -> int:
        started.hit()
        await gate.wait()
        return started.count

    cache = create_app([gated], redis_url=local_store_url)
    engine = cache.state.engine
    engine.on_write(lambda *_: events.append("stored"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append("host up")
        async with eagercache.lifespan(cache):
            yield
        events.append("host down")

    host = FastAPI(lifespan=lifespan)
    host.mount("/cache", cache)
    stop = asyncio.Event()

    async def serve() -> None:
        async with running(host) as client:
            assert (await client.get("/cache/data/gated")).status_code == 200
            gate.clear()
            await stop.wait()

    task = asyncio.create_task(serve())
    await started.reach(2)  # the cold fetch, then the refresher's, which now waits at the gate
    stop.set()  # the host shuts down while that refresh is in flight
    async with asyncio.timeout(5):
        while not engine.shutting_down:
            await asyncio.sleep(0.01)  # the lifespan's exit runs in another task
    assert events == ["host up", "stored"]  # the shutdown waits for the refresh
    gate.set()
    await asyncio.wait_for(task, 10)
    # Drained: the refresh finished and was stored before eagercache's lifespan, then the host's, ended.
    assert events == ["host up", "stored", "stored", "host down"]
    assert started.count == 2
    assert cache.state.metrics.sample("eagercache_released_claims_total") == 0  # nothing left to give back
