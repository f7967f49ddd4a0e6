"""A fetcher that asks its HTTP upstream only for what changed (conditional requests, RFC 9110, 13.1).

    uvicorn eagercache_examples.upstream:app --port 8081 &
    eagercache serve --fetchers eagercache_examples.conditional:catalogue
    curl http://127.0.0.1:8000/data/catalogue?section=books

The first fetch keeps the upstream's ETag and Last-Modified with the entry (`Result(validators=...)`);
every refresh sends them back (`If-None-Match`, `If-Modified-Since`), and on `304 Not Modified`
returns `NotModified()`: no body crosses the network, the entry's `last_retrieved` moves and its
`last_modified` does not. The upstream's `max-age` sets when the entry is refreshed next.
"""

from __future__ import annotations

import asyncio
import os
import re
import weakref
from typing import Any

import httpx

from eagercache import NotModified, Previous, Result, fetcher

UPSTREAM_URL = os.environ.get("CATALOGUE_UPSTREAM_URL", "http://127.0.0.1:8081")
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*(\d+)")
# One connection pool per event loop, reused by every fetch (a client per fetch would open a connection each time).
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()


def _client() -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    if loop not in _clients:
        _clients[loop] = httpx.AsyncClient(base_url=UPSTREAM_URL, timeout=5)
    return _clients[loop]


async def close() -> None:
    """Close this event loop's connection pool (at shutdown, or at the end of a test)."""
    client = _clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.aclose()


def _max_age(response: httpx.Response) -> float | None:
    found = _MAX_AGE.search(response.headers.get("cache-control", ""))
    return float(found.group(1)) if found and int(found.group(1)) > 0 else None  # max-age=0: the fetcher's ttl


@fetcher(ttl=60, jitter=1, timeout=5)
async def catalogue(section: str = "books", previous: Previous | None = None) -> Result[Any] | NotModified:
    headers = {}
    if previous is not None:
        if "etag" in previous.validators:
            headers["if-none-match"] = previous.validators["etag"]
        if "last-modified" in previous.validators:
            headers["if-modified-since"] = previous.validators["last-modified"]
    response = await _client().get(f"/catalogue/{section}", headers=headers)
    if response.status_code == 304:
        return NotModified(ttl=_max_age(response))
    response.raise_for_status()  # an error is the fetcher's: the stored data is served STALE, then retried
    validators = {name: response.headers[name] for name in ("etag", "last-modified") if name in response.headers}
    return Result(response.json(), ttl=_max_age(response), validators=validators)
