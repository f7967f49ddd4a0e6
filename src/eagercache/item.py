"""What an entry holds: `DataItem` as its one JSON encoding, with its validators, and change detection.

The stored value is a one-line header, then the exact response body:

    <etag> <last_retrieved ms> <last_modified ms> <due ms>[ <meta>][ #<tags>]\\n{"data":...,"last_retrieved":...}

so a read sends bytes from Redis without decoding or re-encoding them, and has the ETag, the
Last-Modified date and the time of the next refresh at hand for HTTP caching headers. `meta`, present
only when the fetcher returned any, is what the fetcher asked to keep with the entry (the upstream's
validators, results.py), as base64url of its JSON: no space or newline can end it early. `tags`,
present only when the entry has any, are its tags (`encode_tags`), which the tag index follows.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

import msgspec

from .errors import FetchFailed


class DataItem(msgspec.Struct, frozen=True):
    """A fetched value. `last_retrieved` moves on every fetch, `last_modified` only when the data changed."""

    data: Any
    last_retrieved: datetime
    last_modified: datetime


class _Body(msgspec.Struct):
    # Same fields as DataItem, with the data kept as its encoded JSON: it is copied, never rebuilt.
    data: msgspec.Raw
    last_retrieved: str
    last_modified: str


# Times in a stored header are ms since the epoch; anything past the year 9999 was not written by eagercache.
MAX_TIME_MS = 253_402_300_800_000
_encoder = msgspec.json.Encoder()
# The data is encoded canonically (object keys and sets sorted), so equal data is equal bytes: a change is
# a different ETag, found by hashing, with no decoding and no structural diff on the event loop.
_canonical = msgspec.json.Encoder(order="sorted")
_item_decoder = msgspec.json.Decoder(DataItem)
_body_decoder = msgspec.json.Decoder(_Body)


class Entry(msgspec.Struct, frozen=True, gc=False):
    """A stored entry: validators and the response body.

    (A msgspec Struct, not a frozen dataclass: one or two are made per read from the store and per refresh,
    and a frozen dataclass's __init__, an object.__setattr__ per field, took ~1.8 us against ~0.12. Its
    fields are all atomic, so gc=False is safe, and the garbage collector never walks the entries the near
    cache holds.)"""

    etag: str  # opaque, without the quotes; the same data gives the same tag on every replica
    last_retrieved_ms: int
    last_modified_ms: int
    due_ms: int
    body: bytes
    meta: bytes = b""  # encoded (see `Meta`); decoded only by a refresh that needs it
    tags: bytes = b""  # encoded (see `encode_tags`); read by the scripts that keep the tag index

    @classmethod
    def parse(cls, raw: bytes) -> Entry:
        """The entry in a stored value; ValueError for anything eagercache did not write."""
        head, _, body = raw.partition(b"\n")
        etag, retrieved, modified, due, *extra = head.split(b" ")
        r, m, d = int(retrieved), int(modified), int(due)
        # Spelled out: all() over a generator was a third of the parse (every store read, every refresh).
        if not (0 <= r < MAX_TIME_MS and 0 <= m < MAX_TIME_MS and 0 <= d < MAX_TIME_MS) or len(extra) > 2:
            raise ValueError(f"not a stored header: {head[:100]!r}")
        meta = tags = b""
        for field in extra:  # meta is base64url; tags start with '#', which base64url never has
            if field.startswith(b"#"):
                tags = field[1:]
            else:
                meta = field
        return cls(etag.decode("ascii"), r, m, d, body, meta, tags)

    def encode(self) -> bytes:
        meta = f" {self.meta.decode('ascii')}" if self.meta else ""
        tags = f" #{self.tags.decode('ascii')}" if self.tags else ""
        head = f"{self.etag} {self.last_retrieved_ms} {self.last_modified_ms} {self.due_ms}{meta}{tags}\n"
        return head.encode() + self.body

    @property
    def data_json(self) -> bytes:
        """The data's canonical JSON, as it was fetched (the body's `data` member)."""
        return bytes(_body_decoder.decode(self.body).data)


class Meta(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a fetcher's results keep with the entry, beyond its data (results.py)."""

    validators: dict[str, str] = {}

    def encode(self) -> bytes:
        if self == _NO_META:
            return b""
        return base64.urlsafe_b64encode(_canonical.encode(self)).rstrip(b"=")

    @classmethod
    def decode(cls, raw: bytes) -> Meta:
        """The meta in a stored header; empty for none, or for one cut short (a header read in part)."""
        if not raw:
            return _NO_META
        try:
            return _meta_decoder.decode(base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4)))
        except (ValueError, msgspec.DecodeError):
            return _NO_META


_NO_META = Meta()


def encode_tags(tags: Iterable[str]) -> bytes:
    """Tags as the header carries them: each percent-encoded (no ',', '#', space or newline left), sorted,
    joined by ','. The scripts split them without decoding, and name each tag's index key by it."""
    return ",".join(sorted({quote(tag, safe="") for tag in tags})).encode("ascii")


def decode_tags(raw: bytes) -> list[str]:
    return [unquote(tag) for tag in raw.decode("ascii").split(",")] if raw else []


_meta_decoder = msgspec.json.Decoder(Meta)


def encode_data(data: Any, fetcher_name: str) -> bytes:
    """Encode a fetcher's result canonically; a value JSON cannot carry is that fetcher's error."""
    try:
        return _canonical.encode(data)
    except Exception as exc:  # TypeError, OverflowError, RecursionError on deep data, a __str__ that raises...
        raise FetchFailed(
            f"fetcher {fetcher_name!r} returned a value that cannot be encoded as JSON: {type(exc).__name__}: {exc}"
        ) from exc


def build_entry(
    data_json: bytes, now_ms: int, due_at_ms: int, *, previous_header: bytes | None = None
) -> tuple[bytes, bool]:
    """The new stored value and whether its data changed since the previous one (see `new_entry`)."""
    entry, changed = new_entry(data_json, now_ms, due_at_ms, previous_header=previous_header)
    return entry.encode(), changed


def new_entry(
    data_json: bytes,
    now_ms: int,
    due_at_ms: int,
    *,
    previous_header: bytes | None = None,
    previous: Entry | None = None,
    meta: bytes = b"",
    tags: bytes = b"",
) -> tuple[Entry, bool]:
    """The new entry and whether its data changed since the previous one.

    `previous_header` is the start of the stored value (its header line is enough), or `previous` that
    header parsed: if it carries the same ETag, the data is unchanged and keeps its `last_modified`.
    """
    etag = etag_of(data_json)
    if previous is None:
        previous = parse_header(previous_header)
    changed = previous is None or previous.etag != etag
    last_modified_ms = now_ms if changed or previous is None else previous.last_modified_ms
    body = _encoder.encode(_Body(msgspec.Raw(data_json), rfc3339(now_ms), rfc3339(last_modified_ms)))
    return Entry(etag, now_ms, last_modified_ms, due_at_ms, body, meta, tags), changed


def parse_header(raw: bytes | None) -> Entry | None:
    """The validators in a stored value's header line (no body needed); None if there is none to read."""
    if raw is None:
        return None
    try:
        return Entry.parse(raw.split(b"\n", 1)[0] + b"\n")
    except ValueError:
        return None


def etag_of(data_json: bytes) -> str:
    # 96 bits of BLAKE2b: collisions are out of reach, and the tag stays short in every response.
    return base64.urlsafe_b64encode(hashlib.blake2b(data_json, digest_size=12).digest()).decode()


def decode_item(raw: bytes) -> DataItem:
    """The DataItem in a stored value (or in a response body)."""
    return _item_decoder.decode(Entry.parse(raw).body if not raw.startswith(b"{") else raw)


def utc(moment_ms: int) -> datetime:
    return datetime.fromtimestamp(moment_ms / 1000, UTC)


@functools.lru_cache(maxsize=1024)
def rfc3339(moment_ms: int) -> str:
    """UTC with millisecond precision, e.g. 2026-11-24T10:00:00.123Z (RFC 3339, section 5.6)."""
    # Cached too: the refreshes (and fills) of one millisecond share their last_retrieved.
    return f"{_rfc3339_second(moment_ms // 1000)}.{moment_ms % 1000:03d}Z"


@functools.lru_cache(maxsize=1024)
def _rfc3339_second(second: int) -> str:
    # Two per refresh, and the refreshes of one second share them: formatting a datetime was 5 % of a refresh.
    return f"{datetime.fromtimestamp(second, UTC):%Y-%m-%dT%H:%M:%S}"
