"""The refresher: finds entries that are due, claims them, and has the engine refresh them.

Two signals lead here. The schedule (the `due` sorted set) is the truth: a loop sleeps until the
earliest due time, or at most the backstop interval, and claims what is due. Redis `expired` events
for shadow keys are a hint that arrives without polling (entries written by other replicas), late
by up to a second or so because Redis expires keys by sampling, and not at all while disconnected,
for evicted keys, or on `memory://`. Whichever comes first, an entry is refreshed only by whoever
claims it in the schedule, so the two never fetch it twice, and neither do several replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

from redis.exceptions import RedisError

from .engine import Cause, Engine
from .errors import ConfigurationError, StoreUnavailable
from .store import EXPIRED_CHANNEL, Claim, Store, now_ms

log = logging.getLogger(__name__)

DEFAULT_BACKSTOP_INTERVAL_S = 1.0
CLAIM_BATCH = 256
# A claim outlives the slowest fetch by this much; a claimer that died frees its entries then.
LEASE_MARGIN_MS = 5_000
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 5.0
DEFAULT_SHUTDOWN_TIMEOUT_S = 10.0
FIRST_SUBSCRIPTION_TIMEOUT_S = 5.0
# Reads are recorded in the store at most this often, and at least 4 times per shortest max_idle.
READ_FLUSH_MAX_S = 5.0
READ_FLUSH_MIN_S = 0.05
# The schedule loop wakes this long after the next due time, to claim what falls due meanwhile in one go.
SCHEDULE_COALESCE_MS = 10
ENTRY_COUNT_INTERVAL_S = 10.0


class Refresher:
    """One per process; started and stopped by the app's lifespan.

    Claimed entries go to a queue that `max_concurrent` worker tasks drain; the loops never claim more
    than there are free workers, so nothing waits long enough in the queue for its lease to run out.
    """

    def __init__(
        self,
        engine: Engine,
        store: Store,
        *,
        max_concurrent: int = 64,
        backstop_interval_s: float = DEFAULT_BACKSTOP_INTERVAL_S,
        shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
    ) -> None:
        self.engine = engine
        self.store = store
        self.metrics = engine.metrics
        self.max_concurrent = max_concurrent
        self.schedule_max_wait_s = backstop_interval_s
        self.shutdown_timeout_s = shutdown_timeout_s
        fetchers = engine.registry.values()
        self.lease_ms = int(max((f.timeout for f in fetchers), default=0.0) * 1000) + LEASE_MARGIN_MS
        shortest_idle = min((f.max_idle for f in fetchers), default=READ_FLUSH_MAX_S * 4)
        self.read_flush_s = max(READ_FLUSH_MIN_S, min(READ_FLUSH_MAX_S, shortest_idle / 4))
        self.uses_events = not store.is_memory
        self._subscribed = asyncio.Event()
        self._wake = asyncio.Event()
        # Loops also stop on this flag: a CancelledError that lands inside a redis-py call can be
        # swallowed there (redis/redis-py#2028), and the loop would then run on.
        self._stopping = False
        self._loops: list[asyncio.Task[None]] = []
        self._workers: list[asyncio.Task[None]] = []
        self._queue: asyncio.Queue[tuple[Claim, Cause] | None] = asyncio.Queue()  # None: a worker stops
        self._busy = 0
        self._claims: dict[str, int] = {}  # entry id -> lease end (ms), while this process holds the claim
        self._sleep_until_ms = 0  # when the schedule loop looks next; a write due sooner wakes it
        self._waiting_for_workers = False
        engine.on_write(self._written)

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    @property
    def mode(self) -> str:
        return "events+schedule" if self.uses_events else "schedule"

    async def start(self) -> None:
        if self.uses_events:
            try:
                await self.store.enable_expiry_events()
            except ConfigurationError as exc:
                self.uses_events = False
                log.warning("no expiry events: refreshing on the schedule alone", extra={"why": exc.detail})
        self.metrics.mode.labels(self.mode).set(1)
        self._workers = [self._task(self._work(), f"worker {i}") for i in range(self.max_concurrent)]
        self._loops.append(self._task(self._follow_schedule(), "schedule"))
        self._loops.append(self._task(self._record_reads(), "reads"))
        if self.uses_events:
            self._loops.append(self._task(self._follow_events(), "expiry events"))
            # Ready means subscribed; a failure here is retried by the loop (and /readyz says so).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), FIRST_SUBSCRIPTION_TIMEOUT_S)

    async def stop(self) -> None:
        """Stop claiming, let in-flight fetches finish (up to the shutdown timeout), give back what is left."""
        self._stopping = True
        self._wake.set()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()
        while not self._queue.empty():  # claimed, not started: given back below
            self._queue.get_nowait()
        for _ in self._workers:
            self._queue.put_nowait(None)  # not cancel(): redis-py may swallow it mid-command (see _stopping)
        await self.engine.drain(self.shutdown_timeout_s)
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        with contextlib.suppress(StoreUnavailable):
            await self.store.touch(sorted(self._take_reads()))
        if self._claims:
            try:
                released = await self.store.release(self._claims)
            except StoreUnavailable as exc:
                log.warning("could not give back refresh claims; they expire", extra={"error": exc.detail})
            else:
                self.metrics.released_claims.inc(released)
                log.info("gave back refresh claims", extra={"claims": released})
            self._claims.clear()

    def _task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.create_task(coro, name=f"eagercache refresher: {name}")

    @property
    def _capacity(self) -> int:
        return self.max_concurrent - self._busy - self._queue.qsize()

    def _lease_end(self) -> int:
        return now_ms() + self.lease_ms

    def _written(self, next_due_ms: int) -> None:
        if next_due_ms < self._sleep_until_ms:
            self._wake.set()  # the schedule loop sleeps past this entry's next refresh

    def _enqueue(self, claims: list[Claim], cause: Cause) -> None:
        for claim in claims:
            self._claims[claim.entry_id] = claim.lease_end_ms
            self._queue.put_nowait((claim, cause))

    async def _work(self) -> None:
        while (item := await self._queue.get()) is not None:
            claim, cause = item
            self._busy += 1
            try:
                await self._refresh(claim, cause)
            finally:
                self._busy -= 1
                if self._waiting_for_workers:
                    self._wake.set()

    async def _refresh(self, claim: Claim, cause: Cause) -> None:
        try:
            await self.engine.refresh(claim, cause)
        except StoreUnavailable as exc:
            # The claim's lease runs out and the entry is due again: nothing is lost.
            self.metrics.background_errors.labels("refresh").inc()
            log.warning("refresh could not reach the store", extra={"entry": claim.entry_id, "error": exc.detail})
        except Exception:
            self.metrics.background_errors.labels("refresh").inc()
            log.exception("refresh crashed", extra={"entry": claim.entry_id})
        self._claims.pop(claim.entry_id, None)  # written, postponed or lost: no longer ours to give back

    async def _follow_schedule(self) -> None:
        outage = _Outage("schedule")
        while not self._stopping:
            self._wake.clear()
            limit = min(self._capacity, CLAIM_BATCH)
            if limit <= 0:
                self._waiting_for_workers = True
                await self._wake.wait()
                self._waiting_for_workers = False
                continue
            try:
                claimed = await self.store.claim_due(self._lease_end(), limit)
                next_due = None if len(claimed) == limit else await self.store.next_due_ms()
            except StoreUnavailable as exc:
                self.metrics.background_errors.labels("schedule").inc()
                await asyncio.sleep(outage.failed(exc.detail))
                continue
            outage.over()
            self._enqueue(claimed, "schedule")
            if len(claimed) == limit:
                continue  # more may be due
            now = now_ms()
            wait_ms = self.schedule_max_wait_s * 1000
            if next_due is not None:
                # A little past the next due time, so that entries falling due together share one claim.
                wait_ms = min(wait_ms, max(0, next_due - now) + SCHEDULE_COALESCE_MS)
            self._sleep_until_ms = now + int(wait_ms)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait_ms / 1000)
            self._sleep_until_ms = 0

    async def _follow_events(self) -> None:
        outage = _Outage("expiry events")
        keys = self.store.keys
        first = True
        while not self._stopping:
            pubsub = self.store.pubsub()
            try:
                await pubsub.psubscribe(EXPIRED_CHANNEL)
                if not first:
                    self.metrics.reconnects.inc()
                first = False
                self._set_subscribed(True)
                outage.over()
                while not self._stopping:
                    message = await pubsub.get_message(timeout=self.schedule_max_wait_s)
                    due: list[str] = []
                    while message is not None and len(due) < CLAIM_BATCH:
                        # Everything already received goes into one claim: a burst costs one round trip.
                        entry_id = keys.entry_of_shadow(_text(message["data"]))
                        if entry_id is not None:
                            due.append(entry_id)
                        message = await pubsub.get_message(timeout=0)
                    # At capacity the entries stay due in the schedule, which takes them when workers free up.
                    room = self._capacity
                    if due and room > 0:
                        self._enqueue(await self.store.claim(due[:room], self._lease_end()), "event")
            except (RedisError, OSError, StoreUnavailable) as exc:
                self._set_subscribed(False)
                self.metrics.background_errors.labels("subscription").inc()
                await asyncio.sleep(outage.failed(f"{type(exc).__name__}: {exc}"))
            finally:
                self._set_subscribed(False)
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _record_reads(self) -> None:
        """Write the entries read lately to the store in one command per interval, not one per hit.

        Also keeps the entries-per-fetcher gauge current, which a scrape cannot ask Redis for itself.
        """
        counted_at = 0.0
        while not self._stopping:
            await asyncio.sleep(self.read_flush_s)
            reads = self._take_reads()
            try:
                await self.store.touch(sorted(reads))
                if time.monotonic() - counted_at >= ENTRY_COUNT_INTERVAL_S:
                    counted_at = time.monotonic()
                    counts = await self.store.entry_counts()
                    for name in self.engine.registry:
                        self.metrics.entries.labels(name).set(counts.get(name, 0))
            except StoreUnavailable:
                self.engine.reads |= reads  # try again next time
                self.metrics.background_errors.labels("reads").inc()

    def _take_reads(self) -> set[str]:
        reads, self.engine.reads = self.engine.reads, set()
        return reads

    def _set_subscribed(self, up: bool) -> None:
        if up:
            self._subscribed.set()
        else:
            self._subscribed.clear()
        self.metrics.subscribed.set(1 if up else 0)


class _Outage:
    """Logs a failing background loop once per outage, and paces its retries with exponential backoff."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.delay_s = 0.0

    def failed(self, error: str) -> float:
        if self.delay_s == 0.0:
            log.warning("lost the store; retrying", extra={"loop": self.what, "error": error})
        self.delay_s = min(max(self.delay_s * 2, RECONNECT_MIN_S), RECONNECT_MAX_S)
        return self.delay_s

    def over(self) -> None:
        if self.delay_s:
            log.info("store is back", extra={"loop": self.what})
        self.delay_s = 0.0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
