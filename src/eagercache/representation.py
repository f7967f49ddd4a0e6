"""An entry as an HTTP representation: validators, caching headers, conditional requests, gzip.

RFC 9110 (semantics: ETag 8.8.3, Last-Modified 8.8.2, conditional requests 13) and RFC 9111
(caching: Cache-Control 5.2, Age 5.1) and RFC 5861 (stale-while-revalidate, stale-if-error).
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .engine import Read
from .lru import LRU

# Bodies smaller than this are sent as they are: gzip would save too little to pay for itself.
GZIP_MIN_BYTES = 1024
# Representations (headers, compressed bodies) kept per process, so a hot entry's are built once per
# refresh, not per read; the least recently read go first, and the bodies they hold stay under the bytes.
PREPARED_ENTRIES = 4096
PREPARED_BYTES = 64 * 1024 * 1024
GZIP_LEVEL = 6
# Larger bodies are compressed in a thread (zlib lets go of the GIL): a 2 MB body takes ~100 ms to
# compress, which on the event loop would stall every other request.
GZIP_IN_THREAD_BYTES = 64 * 1024


# A prepared representation's key: the entry, its version (ETag, retrieved when), and gzipped or not.
_Key = tuple[str, str, int, bool]


class EntryResponse(Response):
    """A response from ready-made raw headers, with no body for HEAD (RFC 9110, 9.3.2) but a GET's headers."""

    def __init__(self, status_code: int, raw_headers: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
        # Response.__init__ is skipped on purpose: it would re-encode headers that are already bytes.
        self.status_code = status_code
        self.raw_headers = raw_headers
        self.body = body
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        body = b"" if scope["method"] == "HEAD" else self.body
        await send({"type": "http.response.body", "body": body})


class _Prepared:
    """What a representation's responses share for as long as the entry does: encoded once, used per read.

    One object of atomic fields, the header pairs built per response: a prepared representation lives
    about as long as the entry is read, and each container it held (lists, a dict, a tuple per header:
    ~17 per entry) sat in the garbage collector's youngest generation until the next collection, which
    then walked all of them at once: ~70,000 objects, a 50-90 ms pause every few seconds under reads
    spread over many entries. The pairs of a response die with it, before any collection sees them."""

    __slots__ = (
        "age",
        "age_value",
        "body",
        "cache",
        "cache_control",
        "cache_value",
        "coding",
        "etag",
        "last_modified",
        "length",
    )

    def __init__(self, body: bytes, etag: str, last_modified_ms: int, coding: str | None) -> None:
        self.body = body
        self.etag = etag.encode()
        self.last_modified = http_date(last_modified_ms // 1000)
        self.length = str(len(body)).encode()
        self.coding = None if coding is None else coding.encode()
        # The headers that vary between reads, for the latest (age, X-Cache) they were built for.
        self.age = -1
        self.age_value = b""
        self.cache = ""
        self.cache_value = b""
        self.cache_control = b""

    def headers(self, status: int) -> list[tuple[bytes, bytes]]:
        """The response's headers: a 304's are the validators (RFC 9110, 15.4.5) and the per-read ones.

        Two literals that repeat six pairs, on purpose: one per request, and one literal took 0.65 µs
        where building the shared pairs once and adding the body's two took 0.9 (634708f)."""
        if status == 304:
            return [
                (b"etag", self.etag),
                (b"last-modified", self.last_modified),
                (b"vary", b"Accept-Encoding"),
                (b"cache-control", self.cache_control),
                (b"age", self.age_value),
                (b"x-cache", self.cache_value),
            ]
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", self.length),
            (b"etag", self.etag),
            (b"last-modified", self.last_modified),
            (b"vary", b"Accept-Encoding"),
            (b"cache-control", self.cache_control),
            (b"age", self.age_value),
            (b"x-cache", self.cache_value),
        ]
        if self.coding is not None:
            headers.insert(5, (b"content-encoding", self.coding))
        return headers


class Representer:
    """Builds the response for a read; keeps prepared headers and compressed bodies of recent entries."""

    def __init__(self) -> None:
        self._prepared: LRU[_Key, _Prepared] = LRU(PREPARED_ENTRIES)
        self._prepared_bytes = 0
        self._compressing: dict[_Key, asyncio.Future[_Prepared]] = {}

    def cache_size(self) -> tuple[int, int | None]:
        """Prepared representations and the bytes of their bodies."""
        return len(self._prepared), self._prepared_bytes

    async def respond(self, read: Read, request_headers: Mapping[str, str]) -> Response:
        entry, fetcher = read.entry, read.fetcher
        zipped = len(entry.body) >= GZIP_MIN_BYTES and _accepts_gzip(request_headers.get("accept-encoding", ""))
        # The ETag too: two fetches answered but not stored (over max_entries, Result(store=False)) can be
        # retrieved in the same millisecond with different data.
        key = (read.entry_id, entry.etag, entry.last_retrieved_ms, zipped)
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = await self._prepare(key, read, zipped)
        age = max(0, (read.now_ms - entry.last_retrieved_ms) // 1000)
        if prepared.age != age or prepared.cache != read.cache:
            # The headers that vary between reads change once a second at most: build them then.
            # RFC 9111, 4.2: a cache counts max-age from the response's generation, which Age says was
            # last_retrieved; so max-age spans retrieval -> next refresh, and max-age - Age is what is left.
            max_age = 0 if read.cache == "STALE" else max(0, (entry.due_ms - entry.last_retrieved_ms) // 1000)
            cache_control = f"max-age={max_age}, stale-while-revalidate={int(fetcher.ttl + fetcher.jitter + 0.999)}"
            if fetcher.max_stale is not None:
                cache_control += f", stale-if-error={int(fetcher.max_stale)}"
            prepared.cache_control = cache_control.encode()
            prepared.age, prepared.age_value = age, str(age).encode()
            prepared.cache, prepared.cache_value = read.cache, read.cache.encode()
        if _not_modified(request_headers, entry.etag, entry.last_modified_ms):
            return EntryResponse(304, prepared.headers(304))
        return EntryResponse(200, prepared.headers(200), prepared.body)

    async def _prepare(self, key: _Key, read: Read, zipped: bool) -> _Prepared:
        entry = read.entry
        if not zipped:
            prepared = _Prepared(entry.body, f'"{entry.etag}"', entry.last_modified_ms, None)
        elif len(entry.body) < GZIP_IN_THREAD_BYTES:
            prepared = _zipped(entry.body, entry.etag, entry.last_modified_ms)
        elif (pending := self._compressing.get(key)) is not None:
            return await asyncio.shield(pending)  # another reader is compressing this very version
        else:
            future: asyncio.Future[_Prepared] = asyncio.get_running_loop().create_future()
            self._compressing[key] = future
            try:
                prepared = await asyncio.to_thread(_zipped, entry.body, entry.etag, entry.last_modified_ms)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # retrieved: nobody else may be waiting
                raise
            else:
                future.set_result(prepared)
            finally:
                del self._compressing[key]
        replaced = self._prepared.pop(key)  # two readers prepared the same version at once
        evicted = self._prepared.put(key, prepared)
        self._prepared_bytes += len(prepared.body)
        if replaced is not None:
            self._prepared_bytes -= len(replaced.body)
        if evicted is not None:
            self._prepared_bytes -= len(evicted.body)
        while self._prepared_bytes > PREPARED_BYTES and (oldest := self._prepared.pop_oldest()) is not None:
            self._prepared_bytes -= len(oldest.body)
        return prepared


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@functools.lru_cache(maxsize=4096)
def http_date(seconds: int) -> bytes:
    """An IMF-fixdate (RFC 9110, 5.6.7), e.g. b"Sun, 06 Nov 1994 08:49:37 GMT"; email.utils.formatdate
    took most of the time of preparing a representation, and entries' dates repeat (refreshed together)."""
    t = time.gmtime(seconds)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    ).encode()


def _zipped(body: bytes, etag: str, last_modified_ms: int) -> _Prepared:
    # A different content coding is a different representation: it gets its own strong ETag.
    return _Prepared(gzip.compress(body, GZIP_LEVEL, mtime=0), f'"{etag}-gz"', last_modified_ms, "gzip")


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


_WANTED = {b"accept-encoding": "accept-encoding", b"if-none-match": "if-none-match",
           b"if-modified-since": "if-modified-since"}  # fmt: skip


def request_headers(scope: Scope) -> dict[str, str]:
    """The request headers a representation depends on, straight from the ASGI scope (names are lower case)."""
    picked: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = _WANTED.get(name)
        if key is not None:
            picked[key] = f"{picked[key]}, {value.decode('latin-1')}" if key in picked else value.decode("latin-1")
    return picked


def _not_modified(headers: Mapping[str, str], etag: str, last_modified_ms: int) -> bool:
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
