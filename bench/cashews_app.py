"""The same fetcher behind cashews (a well-known Python cache library) on Redis: cache-aside, for section 2.

`@cache(ttl=...)` is cashews' basic decorator: on a miss the function runs (concurrent callers in one process
share that run: cashews' default thunder protection) and the result is stored with a Redis TTL. The route
answers the same envelope as eagercache's body.

    python -m bench.cashews_app --port 8003 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import msgspec
import uvicorn
from cashews import cache
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .fetchers import SLOW_TTL_S, slow_fetch

_encoder = msgspec.json.Encoder()


def create_cashews_app(redis_url: str) -> Starlette:
    cache.setup(redis_url)
    cached = cache(ttl=SLOW_TTL_S, key="slow:{k}")(_stamped)

    async def data(request: Request) -> Response:
        k = request.query_params.get("k")
        if k is None:
            return Response(b'{"title":"k is required"}', status_code=400, media_type="application/problem+json")
        return Response(_encoder.encode(await cached(k)), media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await cache.close()

    return Starlette(routes=[Route("/data/slow", data, methods=["GET"]), Route("/healthz", healthz)], lifespan=lifespan)


async def _stamped(k: str) -> dict[str, Any]:
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"data": await slow_fetch(k), "last_retrieved": stamp, "last_modified": stamp}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()
    app = create_cashews_app(args.redis_url)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=args.port, log_config=None, access_log=False, lifespan="on", server_header=False
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
