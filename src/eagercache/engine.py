"""The cache engine: reads (hit, stale, or a single-flight fetch on a miss) and refreshes of claimed entries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

from .errors import DataTooStale, EagerCacheError, FetchFailed, FetchTimeout, InvalidParameters, UnknownFetcher
from .fetchers import Fetcher, Registry
from .item import Entry, build_entry, encode_data, unchanged_since
from .keys import split_entry_id
from .metrics import Metrics
from .params import Call
from .store import GONE, OVER_LIMIT, STORED, Claim, Stale, Store, now_ms

log = logging.getLogger(__name__)

# An entry whose fetcher this process does not know (a rolling deploy) is left for a replica that does.
UNKNOWN_FETCHER_RETRY_MS = 60_000
# A failing refresh is retried after 0.5 s, 1 s, 2 s, ... but never later than the fetcher's ttl.
RETRY_BASE_MS = 500
# A replica waiting for another's fetch of a missing entry looks for its write this often.
FILL_POLL_S = 0.01
FILL_MARGIN_MS = 1_000
# The last error kept with a stale entry, for operators (admin API), is cut to this length.
MAX_ERROR_CHARS = 300
# "Over max_entries" is logged at most this often per fetcher; the metric counts every time.
OVER_LIMIT_LOG_INTERVAL_S = 60.0

# The near cache: an entry read from Redis is served from this process's memory for this long. A write
# by this process replaces it at once; one by another replica (or an invalidation there) is seen at
# most this late. 0 turns it off: every read then goes to Redis.
DEFAULT_NEAR_CACHE_TTL_S = 0.25
NEAR_CACHE_ENTRIES = 10_000
CALL_CACHE_ENTRIES = 10_000

Cause = Literal["cold", "schedule", "event", "admin"]


@dataclass(frozen=True, slots=True)
class _Near:
    until: float  # time.monotonic()
    entry: Entry
    stale: Stale | None


@dataclass(frozen=True, slots=True)
class Read:
    fetcher: Fetcher
    entry_id: str
    entry: Entry
    cache: Literal["HIT", "MISS", "STALE"]


class Engine:
    """Owns the fetch-and-store path, shared by readers and the refresher."""

    def __init__(
        self,
        registry: Registry,
        store: Store,
        metrics: Metrics,
        *,
        max_concurrent_fetches: int = 64,
        near_cache_ttl_s: float = DEFAULT_NEAR_CACHE_TTL_S,
    ) -> None:
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self._inflight: dict[str, asyncio.Task[bytes]] = {}
        self._on_write: list[Callable[[int], None]] = []
        self._fetch_slots = asyncio.Semaphore(max_concurrent_fetches)
        self._fetcher_slots = {
            f.name: asyncio.Semaphore(f.max_concurrency) for f in registry.values() if f.max_concurrency is not None
        }
        # Entries read since the refresher last recorded reads in the store (batched: no write per hit).
        self.reads: set[str] = set()
        self._over_limit_logged: dict[str, float] = {}
        # Validated calls by query string, and entries read lately: a hit needs neither msgspec nor Redis.
        self._calls: dict[tuple[str, bytes | str], tuple[Fetcher, Call]] = {}
        self.near_cache_ttl_s = near_cache_ttl_s
        self._near: dict[str, _Near] = {}

    def on_write(self, callback: Callable[[int], None]) -> None:
        """Call `callback(next_due_ms)` after every stored entry (the refresher may need to wake sooner)."""
        self._on_write.append(callback)

    async def read(self, fetcher_name: str, query: bytes | str) -> Read:
        fetcher, call = self._resolve(fetcher_name, query)
        near = self._near.get(call.entry_id)
        entry: Entry | None
        if near is not None and near.until > time.monotonic():
            entry, stale = near.entry, near.stale
        else:
            raw, stale = await self.store.get(call.entry_id)
            entry = None if raw is None else Entry.parse(raw)
            if entry is not None:
                self._remember(call.entry_id, entry, stale)
        if entry is not None:
            self.reads.add(call.entry_id)
            if stale is None:
                return Read(fetcher, call.entry_id, entry, "HIT")
            if fetcher.max_stale is not None and now_ms() - stale.since_ms > fetcher.max_stale * 1000:
                raise DataTooStale(
                    f"refreshes of this entry have failed for over {fetcher.max_stale:g} s (its max_stale)"
                )
            return Read(fetcher, call.entry_id, entry, "STALE")
        task = self._inflight.get(call.entry_id) or self._start(fetcher, call, "cold")
        # shield: a reader that disconnects must not cancel the fetch the other readers are waiting for
        return Read(fetcher, call.entry_id, Entry.parse(await asyncio.shield(task)), "MISS")

    def _resolve(self, fetcher_name: str, query: bytes | str) -> tuple[Fetcher, Call]:
        """Validate a request, remembering the result for the next identical query string."""
        key = (fetcher_name, query)
        resolved = self._calls.get(key)
        if resolved is None:
            resolved = self.registry.call(fetcher_name, query)  # raises for bad input: never remembered
            self._calls[key] = resolved
            if len(self._calls) > CALL_CACHE_ENTRIES:
                del self._calls[next(iter(self._calls))]  # the oldest
        return resolved

    def _remember(self, entry_id: str, entry: Entry, stale: Stale | None) -> None:
        if self.near_cache_ttl_s > 0:
            self._near[entry_id] = _Near(time.monotonic() + self.near_cache_ttl_s, entry, stale)
            if len(self._near) > NEAR_CACHE_ENTRIES:
                del self._near[next(iter(self._near))]

    async def forget(self, entry_id: str, fetcher_name: str) -> bool:
        """Remove an entry (it is no longer served here at once; other replicas within the near-cache ttl)."""
        self._near.pop(entry_id, None)
        return await self.store.forget(entry_id, fetcher_name)

    async def refresh(self, claim: Claim, cause: Cause) -> None:
        """Refresh an entry this process has claimed. Never raises for a failing fetcher."""
        entry_id = claim.entry_id
        if entry_id in self._inflight:
            return  # a cold read is fetching it right now; its write reschedules the entry
        name, query = split_entry_id(entry_id)
        try:
            fetcher, call = self._resolve(name, query)
        except UnknownFetcher:
            log.warning("refresh skipped: unknown fetcher", extra={"fetcher": name, "entry": entry_id})
            self.metrics.background_errors.labels("unknown-fetcher").inc()
            await self.store.postpone(entry_id, name, UNKNOWN_FETCHER_RETRY_MS, None)
            return
        except InvalidParameters as exc:
            # The fetcher's signature changed: this entry can never be fetched or read again.
            log.warning("entry removed: parameters no longer valid", extra={"entry": entry_id, "error": exc.detail})
            self.metrics.background_errors.labels("stale-signature").inc()
            await self.forget(entry_id, name)
            return
        if self._idle(fetcher, entry_id, claim.last_read_ms):
            log.debug("entry removed: idle", extra={"entry": entry_id, "max_idle_s": fetcher.max_idle})
            self.metrics.idle_removed.labels(fetcher.name).inc()
            await self.forget(entry_id, fetcher.name)
            return
        try:
            await self._start(fetcher, call, cause, claim)
        except FetchFailed as exc:
            await self._postpone_failed(fetcher, entry_id, exc)

    async def force_refresh(self, fetcher_name: str, query: bytes | str) -> Read | None:
        """Fetch a stored entry now (admin); None if it is not stored. A failing fetch raises, and changes nothing."""
        fetcher, call = self.registry.call(fetcher_name, query)
        raw, _ = await self.store.get(call.entry_id)
        if raw is None:
            return None
        task = self._inflight.get(call.entry_id) or self._start(fetcher, call, "admin")
        return Read(fetcher, call.entry_id, Entry.parse(await asyncio.shield(task)), "MISS")

    def _idle(self, fetcher: Fetcher, entry_id: str, last_read_ms: int | None) -> bool:
        if last_read_ms is None or entry_id in self.reads:
            return False
        return now_ms() - last_read_ms > fetcher.max_idle * 1000

    async def _postpone_failed(self, fetcher: Fetcher, entry_id: str, exc: FetchFailed) -> None:
        """Keep the last good body, mark it stale, and retry with exponential backoff bounded by the ttl."""
        previous = await self.store.stale(entry_id)
        error = exc.detail if exc.__cause__ is None else f"{exc.detail}: {exc.__cause__!r}"
        error = " ".join(error.split())[:MAX_ERROR_CHARS]
        if previous is None:
            stale = Stale(now_ms(), 1, error)
        else:
            stale = Stale(previous.since_ms, previous.failures + 1, error)
        delay_ms = min(int(fetcher.ttl * 1000), RETRY_BASE_MS * 2 ** min(stale.failures - 1, 30))
        self._near.pop(entry_id, None)  # readers here see the stale marker at once
        await self.store.postpone(entry_id, fetcher.name, delay_ms, stale)

    def _start(self, fetcher: Fetcher, call: Call, cause: Cause, claim: Claim | None = None) -> asyncio.Task[bytes]:
        coro = self._fetch_and_store(fetcher, call, cause, claim)
        task = asyncio.create_task(coro, name=f"fetch {call.entry_id}")
        self._inflight[call.entry_id] = task
        task.add_done_callback(lambda t: self._finished(call.entry_id, t))
        return task

    def _finished(self, entry_id: str, task: asyncio.Task[bytes]) -> None:
        del self._inflight[entry_id]
        if not task.cancelled():
            task.exception()  # retrieved here: a fetch whose readers all left must not warn "never retrieved"

    @contextlib.asynccontextmanager
    async def _slot(self, fetcher: Fetcher) -> AsyncIterator[None]:
        """Bound concurrent fetches per process and per fetcher; extra fetches wait their turn."""
        # The fetcher's own slot first: one backed up on max_concurrency must not hold process-wide slots.
        per_fetcher = self._fetcher_slots.get(fetcher.name)
        if per_fetcher is None:
            async with self._fetch_slots:
                yield
        else:
            async with per_fetcher, self._fetch_slots:
                yield

    async def _fetch_and_store(self, fetcher: Fetcher, call: Call, cause: Cause, claim: Claim | None) -> bytes:
        if cause == "cold" and not self.store.is_memory:
            filled = await self._fill_elsewhere(fetcher, call.entry_id)
            if filled is not None:
                return filled
        try:
            return await self._fetch_and_store_here(fetcher, call, cause, claim)
        except BaseException:
            if cause == "cold" and not self.store.is_memory:
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
            if body is not None:
                return body
            if not locked:
                break  # its fetch failed or was not stored: fetch here
        return None

    async def _fetch_and_store_here(self, fetcher: Fetcher, call: Call, cause: Cause, claim: Claim | None) -> bytes:
        extra = {"fetcher": fetcher.name, "entry": call.entry_id, "cause": cause}
        async with self._slot(fetcher):
            self.metrics.inflight.inc()
            started = time.perf_counter()
            try:
                # copies: the Call is remembered for later requests, and a fetcher may change its list arguments
                kwargs = {k: list(v) if isinstance(v, list) else v for k, v in call.kwargs.items()}
                async with asyncio.timeout(fetcher.timeout):  # unlike wait_for, no extra task per fetch
                    data = await fetcher.func(**kwargs)
                data_json = encode_data(data, fetcher.name)
            except TimeoutError:
                self.metrics.fetches.labels(fetcher.name, cause, "timeout").inc()
                log.warning("fetch timed out", extra={**extra, "timeout_s": fetcher.timeout})
                raise FetchTimeout(f"fetcher {fetcher.name!r} did not answer within {fetcher.timeout} s") from None
            except EagerCacheError as exc:
                self.metrics.fetches.labels(fetcher.name, cause, "error").inc()
                log.warning("fetch failed", extra={**extra, "error": exc.detail})
                raise
            except Exception as exc:
                self.metrics.fetches.labels(fetcher.name, cause, "error").inc()
                log.warning("fetch failed", extra={**extra, "error": repr(exc)})
                raise FetchFailed(f"fetcher {fetcher.name!r} failed: {type(exc).__name__}") from exc
            finally:
                self.metrics.inflight.dec()
        self.metrics.fetches.labels(fetcher.name, cause, "ok").inc()
        self.metrics.fetch_seconds.labels(fetcher.name).observe(time.perf_counter() - started)
        previous, since = None, None
        if cause != "cold":
            since = unchanged_since(data_json, None if claim is None else claim.header)
            if since is None:  # other bytes (or no header at hand): read the old value, deepdiff decides
                previous = (await self.store.get(call.entry_id))[0]
        now = now_ms()
        due_at = _next_due(fetcher, now, None if claim is None else claim.due_ms)
        value, changed = build_entry(data_json, now, due_at, previous_value=previous, unchanged_since_ms=since)
        mode: Literal["cold", "refresh"] = "cold" if cause == "cold" else "refresh"  # admin: stored entries only
        outcome = await self.store.write(
            call.entry_id, fetcher.name, value, now, due_at, mode=mode, max_entries=fetcher.max_entries
        )
        if claim is not None and claim.due_ms is not None:
            self.metrics.refresh_lag.labels(fetcher.name).observe(max(0, now_ms() - claim.due_ms) / 1000)
        if outcome == STORED:
            self._remember(call.entry_id, Entry.parse(value), None)
        else:
            self._near.pop(call.entry_id, None)
        if outcome == OVER_LIMIT:
            self._over_limit(fetcher)
        elif outcome == GONE:
            log.debug("refreshed entry was removed meanwhile; not stored", extra=extra)
        elif changed and cause != "cold":
            self.metrics.changes.labels(fetcher.name).inc()
        for callback in self._on_write:
            callback(due_at)
        return value

    def _over_limit(self, fetcher: Fetcher) -> None:
        self.metrics.uncached.labels(fetcher.name).inc()
        last = self._over_limit_logged.get(fetcher.name, 0.0)
        if time.monotonic() - last > OVER_LIMIT_LOG_INTERVAL_S:
            self._over_limit_logged[fetcher.name] = time.monotonic()
            log.warning(
                "fetcher has max_entries entries: new parameter combinations are answered but not cached",
                extra={"fetcher": fetcher.name, "max_entries": fetcher.max_entries},
            )

    async def drain(self, timeout: float) -> None:
        """Wait for in-flight fetches to finish (shutdown), cancelling what is left after `timeout` seconds."""
        tasks = list(self._inflight.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


def _next_due(fetcher: Fetcher, now: int, due_ms: int | None) -> int:
    """When to refresh next: one interval after the refresh was due, so that an entry costs one fetch per
    ttl however long fetches take; one interval from now for a new entry, or one that fell behind."""
    interval = int((fetcher.ttl + random.uniform(0, fetcher.jitter)) * 1000)
    if due_ms is not None and due_ms + interval > now:
        return due_ms + interval
    return now + interval
