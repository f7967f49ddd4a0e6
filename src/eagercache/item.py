"""What an entry holds: `DataItem` as its one JSON encoding, with its validators, and change detection.

The stored value is a one-line header, then the exact response body:

    <etag> <last_retrieved ms> <last_modified ms> <due ms>\\n{"data":...,"last_retrieved":...,"last_modified":...}

so a read sends bytes from Redis without decoding or re-encoding them, and has the ETag, the
Last-Modified date and the time of the next refresh at hand for HTTP caching headers.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from deepdiff import DeepDiff

from .errors import FetchFailed


class DataItem(msgspec.Struct, frozen=True):
    """A fetched value. `last_retrieved` moves on every fetch, `last_modified` only when the data changed."""

    data: Any
    last_retrieved: datetime
    last_modified: datetime


class _Body(msgspec.Struct):
    # Same fields as DataItem, with the data kept as its encoded JSON: it is compared and copied, never rebuilt.
    data: msgspec.Raw
    last_retrieved: str
    last_modified: str


_encoder = msgspec.json.Encoder()
_body_decoder = msgspec.json.Decoder(_Body)
_item_decoder = msgspec.json.Decoder(DataItem)


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored entry: validators and the response body."""

    etag: str  # opaque, without the quotes; the same data gives the same tag on every replica
    last_retrieved_ms: int
    last_modified_ms: int
    due_ms: int
    body: bytes

    @classmethod
    def parse(cls, raw: bytes) -> Entry:
        head, _, body = raw.partition(b"\n")
        etag, retrieved, modified, due = head.split(b" ")
        return cls(etag.decode(), int(retrieved), int(modified), int(due), body)

    def encode(self) -> bytes:
        head = f"{self.etag} {self.last_retrieved_ms} {self.last_modified_ms} {self.due_ms}\n"
        return head.encode() + self.body


def encode_data(data: Any, fetcher_name: str) -> bytes:
    """Encode a fetcher's result; a value JSON cannot carry is that fetcher's error."""
    try:
        return _encoder.encode(data)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise FetchFailed(f"fetcher {fetcher_name!r} returned a value that cannot be encoded as JSON: {exc}") from exc


def build_entry(
    data_json: bytes,
    now_ms: int,
    due_at_ms: int,
    *,
    previous_value: bytes | None = None,
    unchanged_since_ms: int | None = None,
) -> tuple[bytes, bool]:
    """The new stored value and whether its data changed since the previous one.

    `unchanged_since_ms` (from `unchanged_since`: the stored header shows the same bytes) settles the
    common case without the old value; otherwise `previous_value` is compared with deepdiff.
    Unchanged data keeps its previous bytes (and so its ETag) even if the fetcher reordered object keys.
    """
    etag = etag_of(data_json)
    last_modified_ms, changed = now_ms, True
    last_modified = stamp = rfc3339(now_ms)
    if unchanged_since_ms is not None:
        last_modified_ms, changed = unchanged_since_ms, False
        last_modified = rfc3339(last_modified_ms)
    elif previous_value is not None:
        try:
            stored = Entry.parse(previous_value)
            old = _body_decoder.decode(stored.body)
        except (ValueError, msgspec.DecodeError):
            pass  # an unreadable value is replaced as if the data changed
        else:
            if not data_changed(bytes(old.data), data_json):
                data_json, etag, changed = bytes(old.data), stored.etag, False
                last_modified, last_modified_ms = old.last_modified, stored.last_modified_ms
    body = _encoder.encode(_Body(msgspec.Raw(data_json), stamp, last_modified))
    return Entry(etag, now_ms, last_modified_ms, due_at_ms, body).encode(), changed


def unchanged_since(data_json: bytes, previous_header: bytes | None) -> int | None:
    """The stored last_modified (ms) if the stored value's header shows these very data bytes, else None."""
    if previous_header is None:
        return None
    try:
        before = Entry.parse(previous_header.split(b"\n", 1)[0] + b"\n")
    except ValueError:
        return None
    return before.last_modified_ms if before.etag == etag_of(data_json) else None


def etag_of(data_json: bytes) -> str:
    # 96 bits of BLAKE2b: collisions are out of reach, and the tag stays short in every response.
    return base64.urlsafe_b64encode(hashlib.blake2b(data_json, digest_size=12).digest()).decode()


def data_changed(old_json: bytes, new_json: bytes) -> bool:
    """Equal bytes are equal data; otherwise deepdiff decides (so reordered object keys are no change)."""
    if old_json == new_json:
        return False
    return bool(DeepDiff(msgspec.json.decode(old_json), msgspec.json.decode(new_json)))


def decode_item(raw: bytes) -> DataItem:
    """The DataItem in a stored value (or in a response body)."""
    return _item_decoder.decode(Entry.parse(raw).body if not raw.startswith(b"{") else raw)


def rfc3339(moment_ms: int) -> str:
    """UTC with millisecond precision, e.g. 2026-11-24T10:00:00.123Z (RFC 3339, section 5.6)."""
    moment = datetime.fromtimestamp(moment_ms / 1000, UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment_ms % 1000:03d}Z"
