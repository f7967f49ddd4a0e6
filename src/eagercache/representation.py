"""An entry as an HTTP representation: validators, caching headers, conditional requests, gzip.

RFC 9110 (semantics: ETag 8.8.3, Last-Modified 8.8.2, conditional requests 13) and RFC 9111
(caching: Cache-Control 5.2, Age 5.1) and RFC 5861 (stale-while-revalidate, stale-if-error).
"""

from __future__ import annotations

import gzip
import time
from collections import OrderedDict
from email.utils import formatdate, parsedate_to_datetime

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .engine import Read

# Bodies smaller than this are sent as they are: gzip would save too little to pay for itself.
GZIP_MIN_BYTES = 1024
# Compressed bodies kept per process, so a hot entry is compressed once per refresh, not per read.
GZIP_CACHE_ENTRIES = 256
GZIP_LEVEL = 6


class EntryResponse(Response):
    """A Response that sends no body for HEAD (RFC 9110, 9.3.2) but keeps the headers a GET would get."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        body = b"" if scope["method"] == "HEAD" else self.body
        await send({"type": "http.response.body", "body": body})


class Representer:
    """Builds the response for a read; owns the per-process cache of compressed bodies."""

    def __init__(self) -> None:
        self._gzipped: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def respond(self, read: Read, request_headers: Headers) -> Response:
        entry, fetcher = read.entry, read.fetcher
        now_ms = int(time.time() * 1000)
        max_age = 0 if read.cache == "STALE" else max(0, (entry.due_ms - now_ms) // 1000)
        cache_control = f"max-age={max_age}, stale-while-revalidate={int(fetcher.ttl + fetcher.jitter + 0.999)}"
        if fetcher.max_stale is not None:
            cache_control += f", stale-if-error={int(fetcher.max_stale)}"
        body, etag = entry.body, f'"{entry.etag}"'
        coding = None
        if len(body) >= GZIP_MIN_BYTES and _accepts_gzip(request_headers.get("accept-encoding", "")):
            # A different content coding is a different representation: it gets its own strong ETag.
            body, etag, coding = self._gzip(read), f'"{entry.etag}-gz"', "gzip"
        headers = {
            "etag": etag,
            "last-modified": formatdate(entry.last_modified_ms / 1000, usegmt=True),
            "cache-control": cache_control,
            "age": str(max(0, (now_ms - entry.last_retrieved_ms) // 1000)),
            "vary": "Accept-Encoding",
            "x-cache": read.cache,
        }
        if _not_modified(request_headers, entry.etag, entry.last_modified_ms):
            return EntryResponse(status_code=304, headers=headers)
        if coding is not None:
            headers["content-encoding"] = coding
        return EntryResponse(body, media_type="application/json", headers=headers)

    def _gzip(self, read: Read) -> bytes:
        key = (read.entry_id, read.entry.last_retrieved_ms)
        compressed = self._gzipped.get(key)
        if compressed is None:
            compressed = gzip.compress(read.entry.body, GZIP_LEVEL, mtime=0)
            self._gzipped[key] = compressed
            if len(self._gzipped) > GZIP_CACHE_ENTRIES:
                self._gzipped.popitem(last=False)
        else:
            self._gzipped.move_to_end(key)
        return compressed


def _accepts_gzip(accept_encoding: str) -> bool:
    """True if gzip (or *) is acceptable with a non-zero quality (RFC 9110, 12.5.3)."""
    for item in accept_encoding.lower().split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip() in ("gzip", "x-gzip", "*"):
            q = params.strip().removeprefix("q=")
            try:
                return not params or float(q) > 0
            except ValueError:
                return False
    return False


def _not_modified(headers: Headers, etag: str, last_modified_ms: int) -> bool:
    """RFC 9110, 13.2.2: If-None-Match first (weak comparison, lists, *); If-Modified-Since only without it."""
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        if if_none_match.strip() == "*":
            return True
        for tag in if_none_match.split(","):
            opaque = tag.strip().removeprefix("W/").strip('"').removesuffix("-gz")
            if opaque == etag:
                return True
        return False
    if_modified_since = headers.get("if-modified-since")
    if if_modified_since is None:
        return False
    try:
        since = parsedate_to_datetime(if_modified_since)
    except (TypeError, ValueError):
        return False  # an invalid date is ignored (RFC 9110, 13.1.3)
    if since.tzinfo is None:
        return False
    return last_modified_ms // 1000 <= since.timestamp()
