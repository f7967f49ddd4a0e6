from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
import redis
from starlette.applications import Starlette

from eagercache import create_app
from eagercache.keys import DEFAULT_NAMESPACE

from .redis_cluster import LocalCluster
from .redis_server import RedisServer

AppFactory = Callable[..., Awaitable[tuple[Starlette, httpx.AsyncClient]]]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """One real server per test session (per worker process under pytest-xdist), unless
    EAGERCACHE_TEST_REDIS_URL names one to reuse."""
    if url := os.environ.get("EAGERCACHE_TEST_REDIS_URL"):
        if os.environ.get("PYTEST_XDIST_WORKER"):
            # Tests flush the server's database: workers sharing one would empty each other's.
            raise pytest.UsageError("EAGERCACHE_TEST_REDIS_URL needs the suite in one process (TEST_WORKERS=0)")
        yield url
        return
    server = RedisServer()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_sync(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A server of the test's own, to stop, restart or configure."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """One Redis Cluster of 3 primaries per test session (a cross-slot mistake fails on it)."""
    with LocalCluster(primaries=3) as started:
        yield started


@pytest.fixture
def cluster_url(cluster: LocalCluster) -> str:
    cluster.flushall()
    return cluster.url


@pytest.fixture(params=["redis", "memory", "cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Behaviour tests run on a real Redis, on the memory store and on a Redis Cluster."""
    return _store_url(request, request.param)


@pytest.fixture(params=["redis", "memory"])
def local_store_url(request: pytest.FixtureRequest) -> str:
    """A real Redis and the memory store: for tests to which a cluster adds nothing."""
    return _store_url(request, request.param)


def _store_url(request: pytest.FixtureRequest, kind: str) -> str:
    if kind == "memory":
        return "memory://"
    if kind == "cluster":
        url: str = request.getfixturevalue("cluster_url")
        return url
    request.getfixturevalue("redis_sync")  # flushed before the test
    redis_url: str = request.getfixturevalue("redis_url")
    return redis_url


@pytest.fixture
async def make_app(store_url: str) -> AsyncIterator[AppFactory]:
    """Build an app on the test's store, run its lifespan, and give an HTTP client talking to it."""
    async with AsyncExitStack() as stack:

        async def factory(
            fetchers: Any, prepare: Callable[[Starlette], None] | None = None, **kwargs: Any
        ) -> tuple[Starlette, httpx.AsyncClient]:
            kwargs.setdefault("redis_url", store_url)
            app = create_app(fetchers, **kwargs)
            if prepare is not None:
                prepare(app)  # e.g. tune the refresher before it starts
            await stack.enter_async_context(app.router.lifespan_context(app))
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
            await stack.enter_async_context(client)
            return app, client

        yield factory


@pytest.fixture
def namespace() -> str:
    return DEFAULT_NAMESPACE
