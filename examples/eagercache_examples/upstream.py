"""A small HTTP upstream that answers conditional requests, for the `catalogue` example fetcher.

    uvicorn eagercache_examples.upstream:app --port 8081

GET /catalogue/{section} answers JSON with a strong ETag, Last-Modified and `Cache-Control: max-age`;
with a matching `If-None-Match` (or, without one, an `If-Modified-Since` not older than the data) it
answers 304 with no body (RFC 9110, 13.1.1-13.1.3). POST /catalogue/{section} changes a section's
data. GET /stats says how many requests it answered and how many body bytes it sent: what a
conditional fetcher saves.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# How long clients may keep an answer (the fetcher takes it as the entry's ttl).
MAX_AGE_S = int(os.environ.get("UPSTREAM_MAX_AGE", "5"))
ITEMS_PER_SECTION = 200


class Section:
    def __init__(self, name: str) -> None:
        self.name = name
        self.version = 0
        self.changed()

    def changed(self) -> None:
        self.version += 1
        items = [{"id": i, "title": f"{self.name} {i}", "version": self.version} for i in range(ITEMS_PER_SECTION)]
        self.body = json.dumps({"section": self.name, "items": items}).encode()
        self.etag = '"' + hashlib.blake2b(self.body, digest_size=8).hexdigest() + '"'
        # HTTP dates have whole seconds: a change within the same second must still be seen (the ETag is).
        self.modified = datetime.fromtimestamp(int(time.time()), UTC)


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.not_modified = 0
        self.body_bytes = 0


sections: dict[str, Section] = {}
stats = Stats()


def _section(name: str) -> Section:
    if name not in sections:
        sections[name] = Section(name)
    return sections[name]


def _not_modified(request: Request, section: Section) -> bool:
    if (tags := request.headers.get("if-none-match")) is not None:  # it takes precedence (RFC 9110, 13.2.2)
        return section.etag in [tag.strip() for tag in tags.split(",")] or tags.strip() == "*"
    if (since := request.headers.get("if-modified-since")) is not None:
        try:
            return section.modified <= parsedate_to_datetime(since)
        except (TypeError, ValueError):
            return False
    return False


async def catalogue(request: Request) -> Response:
    section = _section(request.path_params["section"])
    headers = {
        "etag": section.etag,
        "last-modified": format_datetime(section.modified, usegmt=True),
        "cache-control": f"max-age={MAX_AGE_S}",
    }
    if _not_modified(request, section):
        stats.not_modified += 1
        return Response(status_code=304, headers=headers)
    return Response(section.body, media_type="application/json", headers=headers)


async def change(request: Request) -> Response:
    section = _section(request.path_params["section"])
    section.changed()
    return JSONResponse({"section": section.name, "version": section.version})


async def stats_endpoint(request: Request) -> Response:
    return JSONResponse(vars(stats))


class CountBytes:
    """Counts the GET requests of data and the response body bytes sent for them, as they leave the app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] == "/stats":
            await self.app(scope, receive, send)
            return
        stats.requests += 1

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.body":
                stats.body_bytes += len(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, counting)


app = Starlette(
    routes=[
        Route("/catalogue/{section}", catalogue, methods=["GET"]),
        Route("/catalogue/{section}", change, methods=["POST"]),
        Route("/stats", stats_endpoint),
    ]
)
app.add_middleware(CountBytes)
