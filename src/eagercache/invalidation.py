"""Targeted invalidation: remove, or refresh now, every entry that carries a tag, or every entry of a fetcher
whose parameters match (e.g. all `weather` entries with city=Oslo, whatever their other parameters).

Tags come from the fetcher's results (`Result(tags=...)`) and from its `indexed` parameters, each value of
which is a tag of its own. Every bucket keeps an index set per tag (keys.py), which the WRITE and FORGET
scripts keep in step with the stored headers, so a tag is looked up, never scanned for. Parameters that
are not indexed are matched by a scan of the fetcher's stored entries.

Removal is the store's (every replica reads the same keys); other replicas' near caches serve a removed
entry for at most `near_cache_ttl` more, as after any invalidation. Refreshing makes the entries due now:
whichever replica claims them first fetches them, within the usual concurrency limits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from starlette.applications import Starlette

from .engine import Engine
from .errors import InvalidParameters, UnknownFetcher
from .fetchers import Fetcher, param_tag
from .keys import split_entry_id

Action = Literal["forget", "refresh"]
# Entries per script call: each bucket's batch runs atomically in Redis, a few ms per 1,000.
BATCH = 500


async def act(
    engine: Engine,
    action: Action,
    *,
    tag: str | None = None,
    fetcher: str | None = None,
    where: Mapping[str, Any] | None = None,
) -> int:
    """Remove (`forget`) or refresh now every entry that carries `tag` and/or belongs to `fetcher` and has
    the parameter values `where`; how many. At least a tag or a fetcher must be given."""
    if tag is None and fetcher is None:
        raise InvalidParameters({"(target)": "name a tag, a fetcher, or both"})
    if where and fetcher is None:
        raise InvalidParameters({"(target)": "parameters can only be matched within one fetcher"})
    f = None if fetcher is None else _fetcher(engine, fetcher)
    wanted = {} if f is None or not where else f.signature.spellings(where)
    indexed = [name for name in wanted if f is not None and name in f.indexed]
    store = engine.store
    if tag is None and f is not None and indexed:
        tag = param_tag(f.name, indexed[0], wanted[indexed[0]])  # look up one, match the rest below

    def matches(entry_id: str) -> bool:
        if f is None:
            return True
        name, query = split_entry_id(entry_id)
        if name != f.name:
            return False
        if not wanted:
            return True
        try:
            stored = f.signature.spellings_of(query)
        except InvalidParameters:  # a stale entry of an older signature: not ours to match
            return False
        return all(stored.get(param) == spelled for param, spelled in wanted.items())

    acted = 0
    if tag is not None:
        async for bucket, ids in store.tagged(tag, BATCH):
            acted += await _apply(engine, bucket, [i for i in ids if matches(i)], action, tag)
    else:
        assert f is not None
        async for ids in store.stored_entries(f.name, BATCH):
            for bucket, grouped in _by_bucket(engine, [i for i in ids if matches(i)]).items():
                acted += await _apply(engine, bucket, grouped, action, None)
    return acted


def _fetcher(engine: Engine, name: str) -> Fetcher:
    if name not in engine.registry:
        raise UnknownFetcher(f"no fetcher named {name!r}")
    return engine.registry[name]


def _by_bucket(engine: Engine, entry_ids: list[str]) -> dict[int, list[str]]:
    grouped: dict[int, list[str]] = {}
    for entry_id in entry_ids:
        grouped.setdefault(engine.store.keys.bucket_of(entry_id).index, []).append(entry_id)
    return grouped


async def _apply(engine: Engine, bucket: int, entry_ids: list[str], action: Action, tag: str | None) -> int:
    if not entry_ids:
        return 0
    done = await engine.store.target(bucket, entry_ids, action, tag)
    if action == "forget":
        engine.forgotten(done)
    else:
        engine.made_due(done)
    return len(done)


async def invalidate(
    app: Starlette, *, tag: str | None = None, fetcher: str | None = None, where: Mapping[str, Any] | None = None
) -> int:
    """Remove every entry of the eagercache `app` that carries `tag` and/or belongs to `fetcher` with the
    parameter values `where` (typed, or as query text); how many. The next read of one fetches it again.

        await invalidate(cache, tag="user:42")
        await invalidate(cache, fetcher="weather", where={"city": "Oslo"})
    """
    return await act(app.state.engine, "forget", tag=tag, fetcher=fetcher, where=where)


async def refresh(
    app: Starlette, *, tag: str | None = None, fetcher: str | None = None, where: Mapping[str, Any] | None = None
) -> int:
    """Make the same entries as `invalidate` would remove due now, so they are fetched again at once while
    readers keep getting the stored data; how many."""
    return await act(app.state.engine, "refresh", tag=tag, fetcher=fetcher, where=where)
