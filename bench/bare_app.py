"""The framework's limit: a bare Starlette app answering one route with fixed bytes from memory.

It runs on uvicorn with the same settings as `eagercache serve` (see eagercache.cli), and answers with
the body and headers the harness captured from eagercache's own answer, so both send the same bytes.

    python -m bench.bare_app --port 8001 --response response.json
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


def create_bare_app(body: bytes, headers: dict[str, str]) -> Starlette:
    media_type = headers.pop("content-type", "application/json")

    async def data(request: Request) -> Response:
        return Response(body, media_type=media_type, headers=headers)

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(routes=[Route("/data/{fetcher:path}", data, methods=["GET", "HEAD"]), Route("/healthz", healthz)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--response", type=Path, required=True, help="JSON: {'body': str, 'headers': {...}}")
    args = parser.parse_args()
    captured = json.loads(args.response.read_text())
    app = create_bare_app(captured["body"].encode(), dict(captured["headers"]))
    # The same uvicorn settings as `eagercache serve` (eagercache/cli.py).
    config = uvicorn.Config(
        app, host="127.0.0.1", port=args.port, log_config=None, access_log=False, lifespan="on", server_header=False
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
