"""The framework's limit: a bare Starlette app answering one route with fixed bytes from memory.

It runs on uvicorn with the same settings as `eagercache serve` (see eagercache.cli), on the event loop and
HTTP parser it is given (--loop, --http, as `eagercache serve` takes them), and answers with the body and
headers the harness captured from eagercache's own answer, so both send the same bytes.

    python -m bench.bare_app --port 8001 --response response.json --loop uvloop --http httptools
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

LOOPS = ("auto", "uvloop", "asyncio")
HTTPS = ("auto", "httptools", "h11")


def create_bare_app(body: bytes, headers: dict[str, str]) -> Starlette:
    media_type = headers.pop("content-type", "application/json")

    async def data(request: Request) -> Response:
        return Response(body, media_type=media_type, headers=headers)

    return Starlette(routes=[Route("/data/{fetcher:path}", data, methods=["GET", "HEAD"]), healthz_route()])


def healthz_route() -> Route:
    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Route("/healthz", healthz)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=LOOPS, default="auto", help="event loop, as `eagercache serve --loop`")
    parser.add_argument("--http", choices=HTTPS, default="auto", help="HTTP parser, as `eagercache serve --http`")


def serve(app: Starlette, args: argparse.Namespace) -> None:
    """uvicorn with the same settings as `eagercache serve` (eagercache/cli.py), on the loop and parser asked for."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=args.port,
        loop=args.loop,
        http=args.http,
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
    )
    uvicorn.Server(config).run()


def main() -> None:
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    parser.add_argument("--response", type=Path, required=True, help="JSON: {'body': str, 'headers': {...}}")
    args = parser.parse_args()
    captured = json.loads(args.response.read_text())
    serve(create_bare_app(captured["body"].encode(), dict(captured["headers"])), args)


if __name__ == "__main__":
    main()
