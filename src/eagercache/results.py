"""What a fetcher may return besides plain data, and what it is told about its previous result.

A fetcher returns its data plain (stored, refreshed every ttl), or decides:

- `Result(data, ttl=..., store=..., validators=...)`: this data, refreshed after `ttl` seconds instead of the
  fetcher's (e.g. the upstream's `max-age`), or answered but not stored (`store=False`), and with the
  upstream's validators (its ETag, Last-Modified) kept for the next fetch;
- `NotModified(...)`: the upstream says the stored data is still current (a conditional request answered
  304): `last_retrieved` moves, `last_modified` and the data do not;
- `Keep(...)`: keep the stored value as it is (the upstream answered with something not worth storing,
  e.g. an empty or partial result). The refresh counts as done for the schedule, not as new data:
  neither `last_retrieved` nor `last_modified` moves.

A fetcher that declares a parameter of type `Previous | None` is given the previous result's validators
and times there (None for a new entry); that parameter is not a query parameter.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Literal, NamedTuple, TypeVar

from .errors import FetchFailed
from .item import Entry, Meta, encode_data, encode_tags, utc

T = TypeVar("T")
# Validators and tags are kept in the entry's stored header, which a refresh's claim reads in full: bounded.
MAX_VALIDATORS_BYTES = 512
MAX_TAGS = 16
MAX_TAG_CHARS = 100
MAX_TAGS_BYTES = 1024


@dataclass(frozen=True, slots=True)
class Result(Generic[T]):
    """The fetched data, and how to keep it."""

    data: T
    ttl: float | None = None
    """Refresh this entry after this many seconds (plus the fetcher's jitter) instead of the fetcher's ttl;
    at most its max_idle, so that an entry nobody reads is still removed in time."""
    store: bool = True
    """False: answer a reader's fetch with this data, but do not store it (a refresh keeps the stored value)."""
    validators: Mapping[str, str] = field(default_factory=dict)
    """Kept with the entry and given back in `Previous.validators` on its next fetch (e.g. the upstream's
    ETag and Last-Modified for a conditional request)."""
    tags: Collection[str] = ()
    """Names to invalidate or refresh this entry by, with others of any fetcher (e.g. "user:42"); the
    fetcher's `indexed` parameters are added to them."""


@dataclass(frozen=True, slots=True)
class NotModified:
    """The stored data is still current: it was retrieved now, and has not changed since `last_modified`."""

    ttl: float | None = None
    validators: Mapping[str, str] | None = None
    """New validators to keep (None: keep the previous ones)."""


@dataclass(frozen=True, slots=True)
class Keep:
    """Keep the stored value untouched (neither retrieved nor modified now); refresh again after `ttl`."""

    ttl: float | None = None


@dataclass(frozen=True, slots=True)
class Previous:
    """The stored entry's previous result, given to a fetcher that declares a `Previous | None` parameter."""

    validators: Mapping[str, str]
    """What the previous `Result` (or `NotModified`) asked to keep; empty if nothing."""
    etag: str
    last_retrieved: datetime
    last_modified: datetime

    @classmethod
    def of(cls, entry: Entry) -> Previous:
        return cls(
            Meta.decode(entry.meta).validators, entry.etag, utc(entry.last_retrieved_ms), utc(entry.last_modified_ms)
        )


class Outcome(NamedTuple):
    """A fetcher's return value, checked: what the engine stores. (A named tuple: one per fetch, made faster
    than a frozen dataclass.)"""

    kind: Literal["data", "not-modified", "keep"]
    data_json: bytes  # b"" unless kind == "data"
    ttl: float | None = None
    store: bool = True
    meta: bytes | None = None  # None: keep the stored entry's (a Result always brings its own, maybe b"")
    tags: tuple[str, ...] | None = None  # None: keep the stored entry's


def outcome_of(returned: Any, fetcher_name: str) -> Outcome:
    """Check what a fetcher returned; FetchFailed (its error, never a 500) for anything that cannot be kept."""
    if isinstance(returned, Result):
        ttl = _ttl(returned.ttl, fetcher_name)
        if type(returned.store) is not bool:
            raise _returned(fetcher_name, f"Result(store=...) must be True or False, got {returned.store!r}")
        meta = _meta(returned.validators, fetcher_name)
        tags = _tags(returned.tags, fetcher_name)
        return Outcome("data", encode_data(returned.data, fetcher_name), ttl, returned.store, meta, tags)
    if isinstance(returned, NotModified):
        kept = None if returned.validators is None else _meta(returned.validators, fetcher_name)
        return Outcome("not-modified", b"", _ttl(returned.ttl, fetcher_name), meta=kept)
    if isinstance(returned, Keep):
        return Outcome("keep", b"", _ttl(returned.ttl, fetcher_name))
    return Outcome("data", encode_data(returned, fetcher_name), meta=b"", tags=())


def _tags(tags: Any, fetcher_name: str) -> tuple[str, ...]:
    if isinstance(tags, (str, bytes)) or not isinstance(tags, Collection):
        raise _returned(fetcher_name, f"tags must be a collection of strings, got {type(tags).__name__}")
    if len(tags) > MAX_TAGS or not all(isinstance(t, str) and 0 < len(t) <= MAX_TAG_CHARS for t in tags):
        raise _returned(
            fetcher_name, f"tags must be at most {MAX_TAGS} non-empty strings of at most {MAX_TAG_CHARS} characters"
        )
    if len(encode_tags(tags)) > MAX_TAGS_BYTES:
        raise _returned(fetcher_name, f"tags take over {MAX_TAGS_BYTES} bytes percent-encoded")
    return tuple(tags)


def _ttl(ttl: Any, fetcher_name: str) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl <= 0:
        raise _returned(fetcher_name, f"a result's ttl must be a positive number of seconds, got {ttl!r}")
    return float(ttl)


def _meta(validators: Any, fetcher_name: str) -> bytes:
    if not isinstance(validators, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in validators.items()
    ):
        raise _returned(fetcher_name, f"validators must map str to str, got {validators!r}"[:300])
    meta = Meta(dict(validators)).encode()
    if len(meta) * 3 // 4 > MAX_VALIDATORS_BYTES:
        raise _returned(fetcher_name, f"validators take over {MAX_VALIDATORS_BYTES} bytes as JSON")
    return meta


def _returned(fetcher_name: str, problem: str) -> FetchFailed:
    # Readers are told what kind of mistake it is; the values themselves go to the log and the admin API.
    detail = f"fetcher {fetcher_name!r} returned a result that cannot be stored"
    return FetchFailed(detail, error=f"{detail}: {problem}")
