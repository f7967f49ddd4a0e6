"""eagercache inside a FastAPI service: the cache mounted at /cache, its refresher run by the service's lifespan.

    pip install fastapi
    uvicorn eagercache_examples.fastapi_app:app

GET /cache/data/prices?symbol=GBP (and every other route of `eagercache serve`: /cache/watch/...,
/cache/openapi.json, /cache/metrics, ...) is eagercache's; GET /hello is the service's own. Settings come
from the EAGERCACHE_* variables as for `eagercache serve` (EAGERCACHE_REDIS_URL, default memory://).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import eagercache
from eagercache import Settings

from .fetchers import clock, greeting, prices


def create_service(settings: Settings | None = None) -> FastAPI:
    cache = eagercache.create_app([clock, greeting, prices], settings=settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.started = time.time()  # the service's own start-up: what its fetchers need, opened first
        # Starlette runs no mounted app's lifespan: this one prepares the store and starts the refresher,
        # and at shutdown drains the fetches in flight and closes the store, before the service's own teardown.
        async with eagercache.lifespan(cache):
            yield

    app = FastAPI(lifespan=lifespan)
    app.mount("/cache", cache)

    @app.get("/hello")
    async def hello(name: str = "world") -> dict[str, object]:
        return {"hello": name, "up_since": app.state.started}

    return app


app = create_service()
