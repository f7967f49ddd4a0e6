"""Section 6's baselines: a plain Starlette app answering `/data/item?id=N` with the bytes eagercache serves.

    python -m bench.redis_get_app --port 8002 --redis-url redis://... --prefix rg: --headers headers.json
    python -m bench.redis_get_app --port 8003 --redis-url redis://... --prefix rg: --headers headers.json --dict \
        --count 100000

Without --dict, every request does one `GET <prefix><id>` with redis.asyncio (hiredis parser when installed) and
answers its bytes: what a hand-written Redis-backed endpoint costs. With --dict, the app reads every
`<prefix><id>` key once at start-up into a Python dict and answers from it without Redis: the limit of an
in-process store (ids 0..count-1). Either way the stored value is `<ETag>\\n<body>` (the harness writes the same body
eagercache stores for that id), and the answer carries eagercache's other headers as the harness captured them
(Content-Type, Last-Modified, Vary, Cache-Control, Age, X-Cache), so both send the same bytes as eagercache.
It runs on the same uvicorn settings as `eagercache serve`, on the loop and parser given (--loop, --http).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import redis
import redis.asyncio as aredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .bare_app import add_server_args, healthz_route, serve

LOAD_BATCH = 5_000


def split_value(value: bytes) -> tuple[str, bytes]:
    """`<ETag>\\n<body>` -> (ETag, body)."""
    etag, _, body = value.partition(b"\n")
    return etag.decode("ascii"), body


def create_redis_get_app(redis_url: str, prefix: str, headers: dict[str, str]) -> Starlette:
    """One Redis GET per request, on a connection pool shared by all requests."""
    media_type = headers.pop("content-type", "application/json")
    clients: list[aredis.Redis] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        clients.append(aredis.Redis.from_url(redis_url, max_connections=64))
        try:
            yield
        finally:
            await clients[0].aclose()

    async def data(request: Request) -> Response:
        value = await clients[0].get(prefix + request.query_params.get("id", ""))
        if not isinstance(value, bytes):
            return Response(b'{"error":"not found"}', status_code=404, media_type="application/json")
        etag, body = split_value(value)
        return Response(body, media_type=media_type, headers={**headers, "etag": etag})

    return Starlette(routes=[Route("/data/item", data, methods=["GET", "HEAD"]), healthz_route()], lifespan=lifespan)


def load_dict(redis_url: str, prefix: str, count: int) -> dict[str, tuple[str, bytes]]:
    """The `<prefix><id>` keys of ids 0..count-1, by id (as the query string spells it)."""
    client = redis.Redis.from_url(redis_url)
    out: dict[str, tuple[str, bytes]] = {}
    try:
        for start in range(0, count, LOAD_BATCH):
            ids = [str(i) for i in range(start, min(count, start + LOAD_BATCH))]
            for i, value in zip(ids, client.mget([prefix + i for i in ids]), strict=True):
                if not isinstance(value, bytes):
                    raise SystemExit(f"{prefix}{i} is not stored")
                out[i] = split_value(value)
    finally:
        client.close()
    return out


def create_dict_app(entries: dict[str, tuple[str, bytes]], headers: dict[str, str]) -> Starlette:
    """The same answers from a Python dict: no Redis at all."""
    media_type = headers.pop("content-type", "application/json")

    async def data(request: Request) -> Response:
        found = entries.get(request.query_params.get("id", ""))
        if found is None:
            return Response(b'{"error":"not found"}', status_code=404, media_type="application/json")
        etag, body = found
        return Response(body, media_type=media_type, headers={**headers, "etag": etag})

    return Starlette(routes=[Route("/data/item", data, methods=["GET", "HEAD"]), healthz_route()])


def main() -> None:
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", required=True, help="the keys' prefix: <prefix><id> holds <ETag>\\n<body>")
    parser.add_argument("--headers", type=Path, required=True, help="JSON: the other headers to send")
    parser.add_argument("--dict", action="store_true", help="read the keys once at start-up, answer from a dict")
    parser.add_argument("--count", type=int, default=0, help="with --dict: ids 0..count-1")
    args = parser.parse_args()
    headers = dict(json.loads(args.headers.read_text()))
    if args.dict:
        app = create_dict_app(load_dict(args.redis_url, args.prefix, args.count), headers)
    else:
        app = create_redis_get_app(args.redis_url, args.prefix, headers)
    serve(app, args)


if __name__ == "__main__":
    main()
