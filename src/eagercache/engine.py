"""The cache engine: reads (hit, stale, or a single-flight fetch on a miss) and refreshes of claimed entries.

Every fetch (a reader's, the refresher's, an admin's) is one future in `_inflight` (single flight), under
one limit (`max_concurrent_fetches`) and one shutdown path (`begin_shutdown`, then `drain`). A reader's or
an admin's fetch is a task of its own; the refreshes of one claim round share one task (`_refresh_batch`:
one timer for their fetches, their writes in one round trip), each with its own future. The fetcher itself
always runs in a task of its own (isolation.py), so nothing it does (raise SystemExit, swallow cancellation, raise
CancelledError on its own) can end the process or hold anyone past its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Literal, TypeVar

import msgspec
from redis.exceptions import OutOfMemoryError

from .budget import Budget
from .changes import Change
from .errors import (
    DataTooStale,
    EagerCacheError,
    FetchFailed,
    InvalidParameters,
    ShuttingDown,
    StoreUnavailable,
    UnknownFetcher,
)
from .fetchers import Fetcher, Registry
from .isolation import MAX_ERROR_CHARS, Cause, Refresh, Runner, Runs, first_done
from .item import Entry, encode_tags, new_entry, parse_header
from .keys import split_entry_id
from .logs import Throttle
from .lru import LRU
from .metrics import Metrics
from .params import Call
from .results import Outcome
from .settings import Settings
from .store import GONE, NOT_OURS, OVER_LIMIT, STORED, Claim, RefreshWrite, Stale, Store, WriteMode

log = logging.getLogger(__name__)

# An entry whose fetcher this process does not know (a rolling deploy) is left for a replica that does.
UNKNOWN_FETCHER_RETRY_MS = 60_000
# ... unless nobody read it for this long: then its fetcher is taken to be gone for good and it is removed.
# (A replica cannot know the max_idle of a fetcher it does not have; this is longer than any sensible one.)
UNKNOWN_FETCHER_MAX_IDLE_MS = 7 * 24 * 3600 * 1000
# A failing refresh is retried after 0.5 s, 1 s, 2 s, ... but never later than the fetcher's ttl.
RETRY_BASE_MS = 500
# A replica waiting for another's fetch of a missing entry looks for its write this often.
FILL_POLL_S = 0.01
FILL_MARGIN_MS = 1_000
# "Over max_entries" is logged at most this often per fetcher; the metric counts every time.
OVER_LIMIT_LOG_INTERVAL_S = 60.0
# A refresh may be this late (beyond min(timeout, ttl), the time a fetch may take) before its entry is
# served STALE: the header's due time says how late it is, whatever stopped the refresh.
OVERDUE_GRACE_MS = 1_000
# What a reader is told to wait before asking again when the process is shutting down.
SHUTDOWN_RETRY_AFTER_S = 1
# After the shutdown timeout, cancelled fetches get this long to unwind before the process goes on.
CANCEL_GRACE_S = 1.0
T = TypeVar("T")
# A refresh whose write fails tries again, these far apart, until this long before its lease ends.
WRITE_RETRY_FIRST_S = 0.1
WRITE_RETRY_MAX_S = 1.0
WRITE_RETRY_MARGIN_MS = 1_000
# A claim round takes as many entries as there are fetch slots neither held by a fetcher run nor promised
# to an entry claimed before and not started yet. A refresh whose run is over holds none while its entry is
# made and written, so the next round is claimed meanwhile: this process's work on one round overlaps the
# store's on the next. A claimed entry never waits for a slot (its lease runs from its claim). Counted by
# entries in flight instead (fetches not yet written), a round waited for the whole last one to be made:
# 7,200-8,600 against 8,200-9,600 refreshes/s (in-process, 30,000 entries of ttl 1, runs alternated), and
# in bench section 7's drain the process went from 66-68 % to 76-79 % CPU (9b8de6a).
# Entries in flight in all (fetching, being made, being written) stay within this many times the slots.
IN_FLIGHT_PER_SLOT = 4

# The near cache: an entry read from Redis is served from this process's memory for near_cache_ttl.
# A write by this process replaces it at once; one by another replica is seen at most that late. The
# copy stays (up to these bounds) after that as the grace copy: if Redis does not answer within the
# read budget, it is what a reader gets, marked STALE.
NEAR_CACHE_ENTRIES = 10_000
NEAR_CACHE_BYTES = 64 * 1024 * 1024
# Validated query strings, so a hit needs no validation: enough for 100,000 entries read at random
# (about 25 MB when full). A query longer than QUERY_CACHE_MAX_BYTES is validated on every read, which
# bounds the cache at ~50 MB whatever clients send.
QUERY_CACHE_ENTRIES = 100_000
QUERY_CACHE_MAX_BYTES = 200

# The `result` label of a successful fetch, by what the fetcher returned (results.py).
_RESULT_LABELS = {"data": "ok", "not-modified": "not_modified", "keep": "kept"}
CacheState = Literal["HIT", "MISS", "STALE"]


class _Near(msgspec.Struct, frozen=True, gc=False):  # as item.Entry: fast to make, nothing for the GC to walk
    until: float  # time.monotonic(): served without asking Redis until then
    entry: Entry
    stale: Stale | None


class Read(msgspec.Struct, frozen=True):  # one per request: a frozen dataclass's __init__ was ~1.5 us of it
    fetcher: Fetcher
    entry_id: str
    entry: Entry
    cache: CacheState
    now_ms: int  # when it was answered, by the store's clock: Age is counted from this


class Engine:
    """Owns the fetch-and-store path, shared by readers and the refresher."""

    def __init__(self, registry: Registry, store: Store, metrics: Metrics, settings: Settings) -> None:
        self.registry = registry
        self.store = store
        self.clock = store.clock
        self.metrics = metrics
        self.max_concurrent = settings.max_concurrent_fetches
        self.shutdown_timeout_s = settings.shutdown_timeout
        self.near_cache_ttl_s = settings.near_cache_ttl
        self._inflight: dict[str, asyncio.Future[bytes | None]] = {}
        self._slots_held = 0  # process fetch slots taken (`_slot`) and not given back (`_free`)
        self._starting = 0  # entries of claim rounds (`refresh`) that have not taken their slot yet
        self._batches: set[asyncio.Task[None]] = set()  # refreshes of a claim round, one task each
        self._on_write: list[Callable[[str, int], None]] = []
        self._on_done: list[Callable[[], None]] = []
        self._on_change: list[Callable[[Change, str, str], None]] = []
        rates = {f.name: f.max_rate for f in registry.values() if f.max_rate is not None}
        self.budget = Budget(store, rates, metrics)
        self._fetch_slots = asyncio.Semaphore(self.max_concurrent)
        self._fetcher_slots = {
            f.name: asyncio.Semaphore(f.max_concurrency) for f in registry.values() if f.max_concurrency is not None
        }
        # Entries read since the refresher last recorded reads in the store (batched: no write per hit),
        # and entries read while overdue (their schedule may be lost: the refresher repairs it).
        self.reads: set[str] = set()
        self.overdue: set[str] = set()
        # Entries someone watches in this process (watch.py): read by definition, so never removed as idle.
        self.watched: Collection[str] = ()
        self._over_limit_logged: dict[str, float] = {}
        self._refresh_errors = Throttle(log, 60.0)
        self.runner = Runner(metrics, self._refresh_errors)
        # The entry a query string names, by fetcher and query string, as validated (least recently used go).
        # Strings only: the garbage collector does not track them, so a full cache costs no collection time.
        self._entry_ids: LRU[tuple[str, bytes | str], str] = LRU(QUERY_CACHE_ENTRIES)
        self._near: LRU[str, _Near] = LRU(NEAR_CACHE_ENTRIES)
        self._near_bytes = 0
        self._shutdown_at: float | None = None  # time.monotonic() when the shutdown timeout ends
        self._closed: asyncio.Future[None] | None = None  # done once readers stop waiting for fetches

    def on_write(self, callback: Callable[[str, int], None]) -> None:
        """Call `callback(entry_id, next_due_ms)` after every stored entry (the refresher may need to wake sooner)."""
        self._on_write.append(callback)

    def on_change(self, callback: Callable[[Change, str, str], None]) -> None:
        """Call `callback(change, entry_id, etag)` when this process stores an entry's new data (`etag` is
        the new one), marks it stale, or removes it (`etag` is "" for those two)."""
        self._on_change.append(callback)

    def on_fetch_done(self, callback: Callable[[], None]) -> None:
        """Call `callback()` whenever a fetch ends (a slot is free again)."""
        self._on_done.append(callback)

    @property
    def free_slots(self) -> int:
        """How many more entries to take for refresh now: fetch slots neither held nor promised to an entry
        claimed already, within IN_FLIGHT_PER_SLOT times the slots for entries in flight."""
        return min(
            self.max_concurrent - self._slots_held - self._starting,
            self.max_concurrent * IN_FLIGHT_PER_SLOT - len(self._inflight),
        )

    # -- reads ---------------------------------------------------------------------------------------

    async def read(self, fetcher_name: str, query: bytes | str) -> Read:
        fetcher, entry_id, call = self._entry_of(fetcher_name, query)
        near = self._near.get(entry_id)
        if near is not None and near.until > time.monotonic():
            return self._answer(fetcher, entry_id, near.entry, near.stale)
        try:
            raw, stale = await self.store.get(entry_id)
        except StoreUnavailable:
            if near is None:
                raise
            # Grace: Redis is slow or gone, and this process served the entry lately. Old data, said so.
            return self._answer(fetcher, entry_id, near.entry, near.stale, grace=True)
        entry = _parse(raw)
        if entry is not None:
            self._remember(entry_id, entry, stale)
            return self._answer(fetcher, entry_id, entry, stale)
        return await self._fill(fetcher, call or self.registry.call(fetcher_name, query)[1])

    def _answer(self, fetcher: Fetcher, entry_id: str, entry: Entry, stale: Stale | None, grace: bool = False) -> Read:
        self.reads.add(entry_id)
        now = self.clock.now_ms()
        overdue_ms = now - entry.due_ms
        late = overdue_ms > _allowed_lateness_ms(fetcher)
        if late and not grace:
            self.overdue.add(entry_id)  # its refresh should have happened: make sure it is on the schedule
        if stale is None and not late and not grace:
            return Read(fetcher, entry_id, entry, "HIT", now)
        self.metrics.stale_read(fetcher.name, overdue_ms)  # after the HIT return: a fresh read records nothing
        if fetcher.max_stale is not None and overdue_ms > fetcher.max_stale * 1000:
            raise DataTooStale(
                f"this entry's refresh is {overdue_ms / 1000:.1f} s overdue, "
                f"over its max_stale of {fetcher.max_stale:g} s"
            )
        return Read(fetcher, entry_id, entry, "STALE", now)

    async def reread(self, entry_id: str) -> Read:
        """The entry as stored now, past this process's near cache (filled as a cold read if it is
        missing): what a watcher is sent after a change elsewhere."""
        self._forget_near(entry_id)
        name, query = split_entry_id(entry_id)
        return await self.read(name, query)

    def is_stale(self, fetcher: Fetcher, entry: Entry, stale: Stale | None) -> bool:
        """Whether a read of this entry now is STALE (its refreshes fail, or its refresh is overdue)."""
        return stale is not None or self.clock.now_ms() - entry.due_ms > _allowed_lateness_ms(fetcher)

    async def _fill(self, fetcher: Fetcher, call: Call) -> Read:
        """A missing entry: join the fetch in flight for it, or start one (single flight)."""
        read = await self._join_or_fetch(fetcher, call, "cold")
        if read is None:
            raise FetchFailed(f"the entry of fetcher {fetcher.name!r} was removed while it was being fetched")
        return read

    async def _join_or_fetch(self, fetcher: Fetcher, call: Call, cause: Cause) -> Read | None:
        """The body of the fetch in flight for this entry, or of one started now (single flight). A refresh
        in flight may end without a body (it failed, or the entry was removed): then fetch once more here."""
        for _ in range(2):
            task = self._inflight.get(call.entry_id) or self._start(self._fetch_and_store(fetcher, call, cause), call)
            body = await self._wait(task)
            if body is not None:
                return Read(fetcher, call.entry_id, Entry.parse(body), "MISS", self.clock.now_ms())
        return None

    async def _wait(self, task: asyncio.Future[bytes | None]) -> bytes | None:
        """The fetch's result, unless the shutdown timeout passes first. The fetch is never cancelled by a
        reader leaving: others may be waiting for it too."""
        if not task.done():
            await first_done(task, self._closed_future())
        if not task.done():
            raise ShuttingDown(
                "the server is shutting down and the answer was not ready in time; ask again",
                headers={"Retry-After": str(SHUTDOWN_RETRY_AFTER_S)},
            )
        return task.result()

    def _entry_of(self, fetcher_name: str, query: bytes | str) -> tuple[Fetcher, str, Call | None]:
        """Validate a request (raises for bad input, never remembered); the answer is kept for the next
        identical query string. The call too when it was validated now (a miss then needs no second parse)."""
        key = (fetcher_name, query)
        entry_id = self._entry_ids.get(key)
        if entry_id is None:
            fetcher, call = self.registry.call(fetcher_name, query)
            if len(query) <= QUERY_CACHE_MAX_BYTES:
                self._entry_ids.put(key, call.entry_id)
            return fetcher, call.entry_id, call
        return self.registry[fetcher_name], entry_id, None

    def cache_sizes(self) -> dict[str, tuple[int, int | None]]:
        """Entries and body bytes (None: holds no bodies) of the near cache and the query cache, for the metrics."""
        return {"near": (len(self._near), self._near_bytes), "queries": (len(self._entry_ids), None)}

    def _remember(self, entry_id: str, entry: Entry, stale: Stale | None) -> None:
        replaced = self._near.pop(entry_id)
        if replaced is not None:
            self._near_bytes -= len(replaced.entry.body)
        evicted = self._near.put(entry_id, _Near(time.monotonic() + self.near_cache_ttl_s, entry, stale))
        self._near_bytes += len(entry.body) - (0 if evicted is None else len(evicted.entry.body))
        while self._near_bytes > NEAR_CACHE_BYTES and (oldest := self._near.pop_oldest()) is not None:
            self._near_bytes -= len(oldest.entry.body)

    def _forget_near(self, entry_id: str) -> None:
        old = self._near.pop(entry_id)
        if old is not None:
            self._near_bytes -= len(old.entry.body)

    async def forget(self, entry_id: str, fetcher_name: str) -> bool:
        """Remove an entry (it is no longer served here at once; other replicas within the near-cache ttl)."""
        self._forget_near(entry_id)
        existed = await self.store.forget(entry_id, fetcher_name)
        if existed:
            self._changed("gone", entry_id, "")
        return existed

    def forgotten(self, entry_ids: list[str]) -> None:
        """Entries removed from the store by a targeted invalidation (invalidation.py)."""
        for entry_id in entry_ids:
            self._forget_near(entry_id)
            self._changed("gone", entry_id, "")

    def made_due(self, entry_ids: list[str]) -> None:
        """Entries made due now by a targeted refresh (invalidation.py): the refresher wakes for them."""
        now = self.clock.now_ms()
        for entry_id in entry_ids:
            for callback in self._on_write:
                callback(entry_id, now)

    def _changed(self, change: Change, entry_id: str, etag: str) -> None:
        for callback in self._on_change:
            callback(change, entry_id, etag)

    # -- refreshes -----------------------------------------------------------------------------------

    def spawn_refresh(self, claim: Claim, cause: Cause) -> asyncio.Task[bytes | None]:
        """Start refreshing a claimed entry. The task never raises for a failing fetcher or store: it
        logs and counts. If a fetch of the entry is running here already (a reader's, an admin's), the
        task follows that one instead: its write reschedules the entry, and its failure is postponed
        like a refresh's, so the claim is never left to run out its lease."""
        running = self._inflight.get(claim.entry_id)
        if running is not None:
            return asyncio.create_task(self._follow(running, claim), name=f"follow {claim.entry_id}")
        return self._start(self._refresh(claim, cause), claim)

    def refresh(self, claims: list[Claim], cause: Cause) -> list[asyncio.Future[bytes | None]]:
        """Start refreshing claimed entries (a claim round); a future per claim, in order, which never
        raises for a failing fetcher or store (cancelled only by shutdown: the claim is then still held).

        The usual refresh (a known fetcher, parameters still valid, read lately, the stored header in the
        claim, no fetch of it running here) goes in one task with the round's others; any other goes
        alone through `spawn_refresh`, which follows a fetch in flight or removes or postpones the entry.
        """
        loop = asyncio.get_running_loop()
        fetches: list[asyncio.Future[bytes | None]] = []
        batch: list[Refresh] = []
        for claim in claims:
            entry_id = claim.entry_id
            if entry_id in self._inflight or not claim.header:
                fetches.append(self.spawn_refresh(claim, cause))
                continue
            try:
                fetcher, call = self.registry.call_of_entry(entry_id)
            except EagerCacheError:  # unknown fetcher, parameters no longer valid
                fetches.append(self.spawn_refresh(claim, cause))
                continue
            if self._idle(fetcher, entry_id, claim.last_read_ms):
                fetches.append(self.spawn_refresh(claim, cause))
                continue
            fetch: asyncio.Future[bytes | None] = loop.create_future()
            self._track(entry_id, fetch)
            batch.append(Refresh(claim, fetcher, call, fetch))
            fetches.append(fetch)
        if batch:
            self._starting += len(batch)
            task = loop.create_task(self._refresh_batch(batch, cause), name=f"refresh {len(batch)} entries")
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
        return fetches

    async def _refresh_batch(self, batch: list[Refresh], cause: Cause) -> None:
        """Fetch every entry of the batch (each fetcher run in its own task, under the fetch slots), then
        write what they returned in one round trip; failures are postponed one by one."""
        runs = Runs(self._release_run, self.runner.abandon)
        starting = len(batch)
        try:
            for r in batch:
                r.previous = parse_header(r.claim.header)
                r.slot = await self._slot(r.fetcher)
                starting -= 1
                self._starting -= 1
                try:
                    inner = self.runner.start(r.fetcher, r.call, cause, r.previous)
                except FetchFailed as exc:
                    self._free(r.slot)
                    r.error = exc
                    continue
                self.metrics.fetching += 1
                runs.start(r, inner)
            await runs.wait()
            written: list[Refresh] = []
            for r in batch:
                if await self._settle(r, cause, self._fetched(r, cause)):
                    written.append(r)
            if written:
                await self._write_batch(written, cause)
        except BaseException:
            # Shutdown (or a bug): no fetcher run is left behind, and no claim is taken for done.
            self._starting -= starting
            runs.cancel()
            for r in batch:
                if not r.fetch.done():
                    r.fetch.cancel()
            raise

    async def _settle(self, r: Refresh, cause: Cause, step: Awaitable[bool]) -> bool:
        """Run one refresh's step; False once the refresh is over (its future has its result)."""
        extra = {"fetcher": r.fetcher.name, "entry": r.claim.entry_id, "cause": cause}
        try:
            try:
                if await step:
                    return True
            except FetchFailed as exc:
                await self._postpone_failed(r.fetcher, r.claim.entry_id, exc)
        except StoreUnavailable as exc:
            # Not written: the claim's lease runs out and the entry is due again (see `_refresh`).
            self.metrics.background_errors.labels("refresh").inc()
            self._refresh_errors.warning("refresh could not be stored", "store", {**extra, "error": exc.detail})
        except Exception:
            self.metrics.background_errors.labels("refresh").inc()
            log.exception("refresh failed unexpectedly", extra=extra)
        if not r.fetch.done():
            r.fetch.set_result(r.value)
        return False

    async def _fetched(self, r: Refresh, cause: Cause) -> bool:
        """The entry to write from what the fetcher returned; FetchFailed for a failed or timed-out run."""
        if r.error is not None:
            raise r.error
        assert r.inner is not None
        fetcher, call = r.fetcher, r.call
        if r.timed_out:
            raise self.runner.timed_out(fetcher, call, cause)
        result = self.runner.outcome(fetcher, call, cause, r.previous, r.inner)
        r.entry, r.changed, r.due_at = await self._entry_from(
            fetcher, call, cause, result, r.took_s, r.claim.due_ms, r.previous
        )
        r.value = r.entry.encode()
        return True

    async def _entry_from(
        self,
        fetcher: Fetcher,
        call: Call,
        cause: Cause,
        result: Outcome,
        took_s: float,
        due_ms: int | None,
        previous: Entry | None,
    ) -> tuple[Entry, bool, int]:
        """Count a finished fetch, and make the entry to store from what it returned: its new data (a cold
        read's even when the result is not to be stored: the reader is answered with it), or the stored
        value kept. With whether the data changed, and the entry's next due time."""
        metrics = self.metrics
        metrics.plain_counter(metrics.fetches, fetcher.name, cause, _RESULT_LABELS[result.kind]).inc()
        metrics.plain_histogram(metrics.fetch_seconds, fetcher.name).observe(took_s)
        now = self.clock.now_ms()
        due_at = _next_due(fetcher, now, due_ms, result.ttl)
        if result.kind == "data" and (result.store or cause == "cold"):
            tags = encode_tags(fetcher.tags_of(call, result.tags or ())) if result.tags or fetcher.indexed else b""
            entry, changed = new_entry(
                result.data_json, now, due_at, previous=previous, meta=result.meta or b"", tags=tags
            )
            return entry, changed, due_at
        # the stored value stays: kept as it is, or retrieved now (not modified)
        return await self._kept(fetcher, call.entry_id, result, now, due_at), False, due_at

    async def _write_batch(self, batch: list[Refresh], cause: Cause) -> None:
        """Write the refreshed entries in one round trip; those whose write failed for want of the store
        are tried again as `_retrying` does, together. Each refresh is over as soon as its own write is
        (one whose node is failing over must not hold up the others: their next claims follow them)."""
        pause_s = WRITE_RETRY_FIRST_S
        while True:
            writes: list[RefreshWrite] = [
                (
                    r.claim.entry_id,
                    r.fetcher.name,
                    r.value or b"",
                    r.due_at,
                    r.fetcher.max_entries,
                    r.claim.lease_end_ms,
                )
                for r in batch
            ]
            retry: list[Refresh] = []
            for r, outcome in zip(batch, await self.store.write_refreshes(writes), strict=True):
                if isinstance(outcome, StoreUnavailable) and self._may_retry(outcome, r.claim, pause_s):
                    retry.append(r)
                    continue
                if isinstance(outcome, StoreUnavailable):
                    r.write_error = outcome
                else:
                    r.outcome = outcome
                await self._settle(r, cause, self._written_one(r, cause))
            if not retry:
                return
            self.metrics.background_errors.labels("refresh-write-retry").inc(len(retry))
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, WRITE_RETRY_MAX_S)
            batch = retry

    async def _written_one(self, r: Refresh, cause: Cause) -> bool:
        if r.write_error is not None:
            r.value = None
            raise r.write_error
        assert r.entry is not None
        self._stored(r.fetcher, r.claim.entry_id, cause, r.claim, r.entry, r.changed, r.due_at, r.outcome)
        return False

    async def _follow(self, running: asyncio.Future[bytes | None], claim: Claim) -> bytes | None:
        await asyncio.wait({running})
        if running.cancelled():  # shutdown: the claim is given back, not marked as a failure
            raise asyncio.CancelledError
        error = running.exception()
        if error is None and (body := running.result()) is not None:
            # That fetch's write may have come before this claim (a late write makes the entry due at
            # once): then this claim is the live one, and nobody would refresh the entry until its lease
            # ran out. Give it back if it is still ours: due now, for whoever claims next.
            try:
                await self._retrying(lambda: self.store.release({claim.entry_id: claim.lease_end_ms}), claim)
            except EagerCacheError as exc:  # the lease runs out
                self._refresh_errors.warning("refresh claim could not be given back", "follow", {"error": exc.detail})
            return body
        name, query = split_entry_id(claim.entry_id)
        failed = error if isinstance(error, FetchFailed) else FetchFailed(f"the fetch of {name!r} did not finish")
        try:
            fetcher, _ = self.registry.call(name, query)
            await self._postpone_failed(fetcher, claim.entry_id, failed)
        except EagerCacheError as exc:  # unknown fetcher, bad parameters, the store: the lease runs out
            self._refresh_errors.warning("refresh could not be postponed", "follow", {"error": exc.detail})
        return None

    async def _refresh(self, claim: Claim, cause: Cause) -> bytes | None:
        entry_id = claim.entry_id
        name = split_entry_id(entry_id)[0]
        extra = {"fetcher": name, "entry": entry_id, "cause": cause}
        try:
            try:
                fetcher, call = self.registry.call_of_entry(entry_id)
            except UnknownFetcher:
                self.metrics.background_errors.labels("unknown-fetcher").inc()
                last_read = claim.last_read_ms
                if last_read is not None and self.clock.now_ms() - last_read > UNKNOWN_FETCHER_MAX_IDLE_MS:
                    # A fetcher removed for good: its entries go once nobody has read them for a week.
                    self._refresh_errors.warning("entry of an unknown fetcher removed: idle", name, extra)
                    await self.forget(entry_id, name)
                else:  # a rolling deploy: left for a replica that knows the fetcher
                    self._refresh_errors.warning("refresh skipped: unknown fetcher", name, extra)
                    await self.store.postpone(entry_id, name, UNKNOWN_FETCHER_RETRY_MS, None)
                return None
            except InvalidParameters as exc:
                # The fetcher's signature changed: this entry can never be fetched or read again.
                log.warning("entry removed: parameters no longer valid", extra={**extra, "error": exc.detail})
                self.metrics.background_errors.labels("stale-signature").inc()
                await self.forget(entry_id, name)
                return None
            if self._idle(fetcher, entry_id, claim.last_read_ms):
                log.debug("entry removed: idle", extra={**extra, "max_idle_s": fetcher.max_idle})
                self.metrics.idle_removed.labels(fetcher.name).inc()
                await self.forget(entry_id, fetcher.name)
                return None
            try:
                return await self._fetch_and_store(fetcher, call, cause, claim)
            except FetchFailed as exc:
                await self._postpone_failed(fetcher, entry_id, exc)
                return None
        except StoreUnavailable as exc:
            # Not written: the claim's lease runs out and the entry is due again, and readers see it STALE
            # once it is overdue. Nothing is lost.
            self.metrics.background_errors.labels("refresh").inc()
            self._refresh_errors.warning("refresh could not be stored", "store", {**extra, "error": exc.detail})
            return None
        except Exception:
            self.metrics.background_errors.labels("refresh").inc()
            log.exception("refresh failed unexpectedly", extra=extra)
            return None

    async def force_refresh(self, fetcher_name: str, query: bytes | str) -> Read | None:
        """Fetch a stored entry now (admin); None if it is not stored. A failing fetch raises, and changes nothing."""
        fetcher, call = self.registry.call(fetcher_name, query)
        if await self.store.header(call.entry_id) is None:
            return None
        return await self._join_or_fetch(fetcher, call, "admin")

    def _idle(self, fetcher: Fetcher, entry_id: str, last_read_ms: int | None) -> bool:
        if last_read_ms is None or entry_id in self.reads or entry_id in self.watched:
            return False
        return self.clock.now_ms() - last_read_ms > fetcher.max_idle * 1000

    async def _postpone_failed(self, fetcher: Fetcher, entry_id: str, exc: FetchFailed) -> None:
        """Keep the last good body, mark it stale, and retry with exponential backoff bounded by the ttl."""
        previous = await self.store.stale(entry_id)
        error = " ".join(exc.error.split())[:MAX_ERROR_CHARS]
        if previous is None:
            stale = Stale(self.clock.now_ms(), 1, error)
        else:
            stale = Stale(previous.since_ms, previous.failures + 1, error)
        delay_ms = min(int(fetcher.ttl * 1000), RETRY_BASE_MS * 2 ** min(stale.failures - 1, 30))
        self._forget_near(entry_id)  # readers here see the stale marker at once
        await self.store.postpone(entry_id, fetcher.name, delay_ms, stale)
        if previous is None:  # fresh until now
            self._changed("stale", entry_id, "")

    # -- fetching ------------------------------------------------------------------------------------

    def _start(self, coro: Any, claim_or_call: Claim | Call) -> asyncio.Task[bytes | None]:
        entry_id = claim_or_call.entry_id
        task: asyncio.Task[bytes | None] = asyncio.create_task(coro, name=f"fetch {entry_id}")
        self._track(entry_id, task)
        return task

    def _track(self, entry_id: str, fetch: asyncio.Future[bytes | None]) -> None:
        self._inflight[entry_id] = fetch
        fetch.add_done_callback(functools.partial(self._finished, entry_id))

    def _finished(self, entry_id: str, task: asyncio.Future[bytes | None]) -> None:
        if self._inflight.get(entry_id) is task:
            del self._inflight[entry_id]
        if not task.cancelled():
            task.exception()  # retrieved here: a fetch whose readers all left must not warn "never retrieved"
        self._slots_freed()

    def _slots_freed(self) -> None:
        for callback in self._on_done:
            callback()

    async def _slot(self, fetcher: Fetcher) -> asyncio.Semaphore | None:
        """Take a fetch slot: the fetcher's own first (one backed up on max_concurrency must not hold
        process-wide slots), then the process's. Give them back with `_free`. (Plain calls, not a context
        manager: a generator-based one was ~3 % of a refresh's CPU.)"""
        per_fetcher = self._fetcher_slots.get(fetcher.name)
        if per_fetcher is not None:
            await per_fetcher.acquire()
        try:
            await self._fetch_slots.acquire()
        except BaseException:
            if per_fetcher is not None:
                per_fetcher.release()
            raise
        self._slots_held += 1
        return per_fetcher

    def _release_run(self, r: Refresh) -> None:
        """A batch's fetcher run is over (ended or timed out): its slots back."""
        self.metrics.fetching -= 1
        self._free(r.slot)

    def _free(self, per_fetcher: asyncio.Semaphore | None) -> None:
        self._fetch_slots.release()
        self._slots_held -= 1
        if per_fetcher is not None:
            per_fetcher.release()
        self._slots_freed()  # the next claim round may be taken

    async def _fetch_and_store(self, fetcher: Fetcher, call: Call, cause: Cause, claim: Claim | None = None) -> bytes:
        shared_fill = cause == "cold" and not self.store.is_memory
        if shared_fill:
            filled = await self._fill_elsewhere(fetcher, call.entry_id)
            if filled is not None:
                return filled
        try:
            return await self._fetch_and_store_here(fetcher, call, cause, claim)
        except BaseException:
            if shared_fill:
                with contextlib.suppress(EagerCacheError):
                    await self.store.end_fill(call.entry_id)
            raise

    async def _fill_elsewhere(self, fetcher: Fetcher, entry_id: str) -> bytes | None:
        """Single flight across replicas for a missing entry: take the fill lock, or wait for its holder's write.

        None means this process should fetch (it holds the lock, or the holder gave up or took too long).
        """
        lock_ms = int(fetcher.timeout * 1000) + FILL_MARGIN_MS
        if await self.store.start_fill(entry_id, lock_ms):
            return None
        deadline = time.monotonic() + lock_ms / 1000
        while time.monotonic() < deadline:
            await asyncio.sleep(FILL_POLL_S)  # another process is fetching; Redis has nothing to await
            body, locked = await self.store.filling(entry_id)
            if _parse(body) is not None:
                return body  # not a foreign value at the item's key: the holder's write
            if not locked:
                break  # its fetch failed or was not stored: fetch here
        return None

    async def _fetch_and_store_here(self, fetcher: Fetcher, call: Call, cause: Cause, claim: Claim | None) -> bytes:
        metrics = self.metrics
        previous = None
        if cause != "cold":  # the stored header says whether these are the same data (and since when)
            # A claim brings the header, unless its script could not read it (a key mid-reshard): read it here.
            previous = claim.header if claim is not None and claim.header else await self.store.header(call.entry_id)
        if cause in ("cold", "admin"):
            self.budget.owe(fetcher.name)  # never waits for the budget: a reader (or an admin) is waiting
        previous_entry = parse_header(previous)
        per_fetcher = await self._slot(fetcher)
        metrics.fetching += 1
        started = time.perf_counter()
        try:
            result = await self.runner.run(fetcher, call, cause, previous_entry)
        finally:
            metrics.fetching -= 1
            self._free(per_fetcher)
        entry, changed, due_at = await self._entry_from(
            fetcher,
            call,
            cause,
            result,
            time.perf_counter() - started,
            None if claim is None else claim.due_ms,
            previous_entry,
        )
        if cause == "cold" and result.kind == "data" and not result.store:
            # The reader's answer, never stored: the next read fetches again.
            if not self.store.is_memory:
                with contextlib.suppress(EagerCacheError):
                    await self.store.end_fill(call.entry_id)  # other replicas fetch now, not at the lock's end
            return entry.encode()
        value = entry.encode()
        mode: Literal["cold", "refresh"] = "cold" if cause == "cold" else "refresh"  # admin: stored entries only
        try:
            outcome = await self._write(call.entry_id, fetcher, value, due_at, mode, claim)
        except StoreUnavailable as exc:
            if cause != "cold":
                raise
            # The reader paid for this fetch: it gets the data, unstored (the next read fetches again).
            self.metrics.background_errors.labels("cold-write").inc()
            if not self.store.is_memory:
                with contextlib.suppress(EagerCacheError):
                    await self.store.end_fill(call.entry_id)  # other replicas fetch now, not at the lock's end
            self._refresh_errors.warning("fetched entry could not be stored", "cold", {"error": exc.detail})
            return value
        self._stored(fetcher, call.entry_id, cause, claim, entry, changed, due_at, outcome)
        return value

    def _stored(
        self,
        fetcher: Fetcher,
        entry_id: str,
        cause: Cause,
        claim: Claim | None,
        entry: Entry,
        changed: bool,
        due_at: int,
        outcome: int,
    ) -> None:
        """What follows a fetched entry's write: metrics, the near cache, change callbacks, `on_write`."""
        metrics = self.metrics
        if claim is not None and claim.due_ms is not None:
            lag_s = max(0, self.clock.now_ms() - claim.due_ms) / 1000
            metrics.plain_histogram(metrics.refresh_lag, fetcher.name).observe(lag_s)
        if outcome == STORED:
            # A reader's fill is read now; a refresh replaces the copy this process serves, if it has one,
            # and adds none: an entry nobody here reads would only push out one that is read.
            if cause == "cold" or entry_id in self._near:
                self._remember(entry_id, entry, None)
            if changed:
                self._changed("data", entry_id, entry.etag)
        else:
            self._forget_near(entry_id)
        if outcome == OVER_LIMIT:
            self._over_limit(fetcher)
        elif outcome == GONE:
            log.debug("refreshed entry was removed meanwhile; not stored", extra={"entry": entry_id})
        elif outcome == NOT_OURS:
            # Claimed again since (this refresh overran its lease, or its write was retried after a lost
            # reply): the newer claim's value stands.
            metrics.background_errors.labels("refresh-overtaken").inc()
            log.debug("refreshed entry was claimed again meanwhile; not stored", extra={"entry": entry_id})
        elif changed and cause != "cold":
            metrics.plain_counter(metrics.changes, fetcher.name).inc()
        for callback in self._on_write:
            callback(entry_id, due_at)

    async def _kept(self, fetcher: Fetcher, entry_id: str, result: Outcome, now: int, due_at: int) -> Entry:
        """The stored entry, due again at `due_at`: as it is (Keep, or a refresh's unstored Result), or
        retrieved `now` with its data unchanged (NotModified)."""
        raw, _ = await self.store.get(entry_id)
        stored = _parse(raw)
        if stored is None:  # removed since the refresh began: nothing to keep (and nothing to write)
            raise FetchFailed(f"the entry of fetcher {fetcher.name!r} was removed while it was being fetched")
        meta = stored.meta if result.meta is None else result.meta
        if result.kind == "not-modified":
            return new_entry(stored.data_json, now, due_at, previous_header=raw, meta=meta, tags=stored.tags)[0]
        return Entry(
            stored.etag, stored.last_retrieved_ms, stored.last_modified_ms, due_at, stored.body, meta, stored.tags
        )

    async def _write(
        self, entry_id: str, fetcher: Fetcher, value: bytes, due_at: int, mode: WriteMode, claim: Claim | None
    ) -> int:
        """Store a fetched value. A refresh's write that fails (its primary failing over, a slot moving)
        is tried again while its claim lasts: the fetch is paid for, and the entry is otherwise left
        for the lease to run out, long after a failover is over."""
        return await self._retrying(
            lambda: self.store.write(
                entry_id,
                fetcher.name,
                value,
                due_at,
                mode=mode,
                max_entries=fetcher.max_entries,
                lease_end_ms=claim.lease_end_ms if claim is not None else None,
            ),
            claim,
        )

    async def _retrying(self, call: Callable[[], Awaitable[T]], claim: Claim | None) -> T:
        """`call()`, tried again while it fails for want of the store (0.1 s apart, doubling to 1 s)
        until 1 s before the claim's lease ends; once without a claim."""
        pause_s = WRITE_RETRY_FIRST_S
        while True:
            try:
                return await call()
            except StoreUnavailable as exc:
                if not self._may_retry(exc, claim, pause_s):
                    raise
                self.metrics.background_errors.labels("refresh-write-retry").inc()
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, WRITE_RETRY_MAX_S)

    def _may_retry(self, exc: StoreUnavailable, claim: Claim | None, pause_s: float) -> bool:
        """Whether a failed write is tried again `pause_s` from now (see `_retrying`)."""
        deadline_ms = claim.lease_end_ms - WRITE_RETRY_MARGIN_MS if claim is not None else 0
        # Out of memory is an answer, not an outage: the next write is refused the same way.
        out_of_memory = isinstance(exc.__cause__, OutOfMemoryError) or "OOM" in str(exc.__cause__)
        return not (out_of_memory or self.clock.now_ms() + pause_s * 1000 >= deadline_ms or self.shutting_down)

    def _over_limit(self, fetcher: Fetcher) -> None:
        self.metrics.uncached.labels(fetcher.name).inc()
        last = self._over_limit_logged.get(fetcher.name, 0.0)
        if time.monotonic() - last > OVER_LIMIT_LOG_INTERVAL_S:
            self._over_limit_logged[fetcher.name] = time.monotonic()
            log.warning(
                "fetcher has max_entries entries: new parameter combinations are answered but not cached",
                extra={"fetcher": fetcher.name, "max_entries": fetcher.max_entries},
            )

    # -- shutdown ------------------------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Start the shutdown clock (on SIGTERM, or when the app stops): after `shutdown_timeout`,
        readers still waiting for a fetch are answered 503 and fetches still running are cancelled."""
        if self._shutdown_at is not None:
            return
        self._shutdown_at = time.monotonic() + self.shutdown_timeout_s
        closed = self._closed_future()

        def close() -> None:
            if not closed.done():
                closed.set_result(None)

        asyncio.get_running_loop().call_later(self.shutdown_timeout_s, close)

    @property
    def shutting_down(self) -> bool:
        return self._shutdown_at is not None

    async def drain(self) -> None:
        """Wait for fetches to finish until the shutdown timeout, then cancel what is left."""
        self.begin_shutdown()
        assert self._shutdown_at is not None
        self.runner.cancel_abandoned()
        tasks = list(self._inflight.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, self._shutdown_at - time.monotonic()))
        for task in pending:
            task.cancel()
        left: set[asyncio.Future[Any]] = {*pending, *self._batches}
        for batch in self._batches:  # their refreshes' futures are cancelled above: the batches stop too
            batch.cancel()
        if left:
            # Bounded: a fetcher that swallows cancellation must not hold the process forever.
            await asyncio.wait(left, timeout=CANCEL_GRACE_S)

    def _closed_future(self) -> asyncio.Future[None]:
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        return self._closed


def _parse(raw: bytes | None) -> Entry | None:
    if raw is None:
        return None
    try:
        return Entry.parse(raw)
    except ValueError:
        return None  # not a value eagercache wrote: treated as missing, and replaced by the next fetch


def _allowed_lateness_ms(fetcher: Fetcher) -> float:
    """How far past its due time an entry may be before it is STALE: a fetch's time, and a little."""
    return min(fetcher.timeout, fetcher.ttl) * 1000 + OVERDUE_GRACE_MS


def _next_due(fetcher: Fetcher, now: int, due_ms: int | None, ttl: float | None = None) -> int:
    """When to refresh next: one interval after the refresh was due, so that an entry costs one fetch per
    ttl however long fetches take; one interval from now for a new entry, or one that fell behind.
    `ttl` is the fetcher's result's own (results.Result), at most max_idle: an idle entry is removed when
    its refresh comes, so a longer one would keep it past its max_idle."""
    ttl = fetcher.ttl if ttl is None else min(ttl, fetcher.max_idle)
    interval = int((ttl + random.uniform(0, fetcher.jitter)) * 1000)
    if due_ms is not None and due_ms + interval > now:
        return due_ms + interval
    return now + interval
