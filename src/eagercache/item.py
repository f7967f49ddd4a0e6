"""`DataItem`: what an entry holds, its one JSON encoding, and change detection between fetches.

The stored value is the exact response body, so a read returns bytes from Redis without decoding
or re-encoding them.
"""

from __future__ import annotations

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


def encode_data(data: Any, fetcher_name: str) -> bytes:
    """Encode a fetcher's result; a value JSON cannot carry is that fetcher's error."""
    try:
        return _encoder.encode(data)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise FetchFailed(f"fetcher {fetcher_name!r} returned a value that cannot be encoded as JSON: {exc}") from exc


def build_body(data_json: bytes, previous: bytes | None, now: datetime) -> tuple[bytes, bool]:
    """The new entry body and whether its data changed since `previous` (the stored body, if any)."""
    stamp = rfc3339(now)
    last_modified = stamp
    changed = True
    if previous is not None:
        try:
            old = _body_decoder.decode(previous)
        except msgspec.DecodeError:
            old = None  # an unreadable body is replaced as if the data changed
        if old is not None and not data_changed(bytes(old.data), data_json):
            last_modified, changed = old.last_modified, False
    return _encoder.encode(_Body(msgspec.Raw(data_json), stamp, last_modified)), changed


def data_changed(old_json: bytes, new_json: bytes) -> bool:
    """Equal bytes are equal data; otherwise deepdiff decides (so reordered object keys are no change)."""
    if old_json == new_json:
        return False
    return bool(DeepDiff(msgspec.json.decode(old_json), msgspec.json.decode(new_json)))


def decode_item(body: bytes) -> DataItem:
    return _item_decoder.decode(body)


def rfc3339(moment: datetime) -> str:
    """UTC with millisecond precision, e.g. 2026-11-24T10:00:00.123Z (RFC 3339, section 5.6)."""
    moment = moment.astimezone(UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"
