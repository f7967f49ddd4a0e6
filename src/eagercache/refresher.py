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
ENTRY_COUNT_INTERVAL_S = 10.0


class Refresher:
    """One per process; started and stopped by the app's lifespan."""

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
        self._running: set[asyncio.Task[None]] = set()
        self._claims: dict[str, int] = {}  # entry id -> lease end (ms), while this process holds the claim
        engine.on_write(self._wake.set)

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
                log.warning(
                    "no expiry events: refreshing on the schedule alone", extra={"why": exc.detail, "mode": self.mode}
                )
        self.metrics.mode.labels(self.mode).set(1)
        self._loops.append(self._loop(self._follow_schedule(), "schedule"))
        self._loops.append(self._loop(self._record_reads(), "reads"))
        if self.uses_events:
            self._loops.append(self._loop(self._follow_events(), "expiry events"))
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
        await self.engine.drain(self.shutdown_timeout_s)
        await asyncio.gather(*self._running, return_exceptions=True)
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

    def _loop(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.create_task(coro, name=f"eagercache refresher: {name}")

    @property
    def _capacity(self) -> int:
        return self.max_concurrent - len(self._running)

    def _lease_end(self) -> int:
        return now_ms() + self.lease_ms

    def _spawn(self, entry_id: str, cause: Cause, claim: Claim | None) -> None:
        task = asyncio.create_task(self._refresh(entry_id, cause, claim), name=f"refresh {entry_id}")
        self._running.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wake.set()  # a slot is free

    async def _refresh(self, entry_id: str, cause: Cause, claim: Claim | None) -> None:
        """Refresh one entry, claiming it first unless the schedule already did."""
        try:
            if claim is None:
                claim = await self.store.claim(entry_id, self._lease_end())
                if claim is None:
                    return  # refreshed already, or another replica has it
            self._claims[entry_id] = claim.lease_end_ms
            await self.engine.refresh(claim, cause)
            del self._claims[entry_id]  # a write or postpone has rescheduled it: no longer ours
        except StoreUnavailable as exc:
            # The claim's lease runs out and the entry is due again: nothing is lost.
            self._claims.pop(entry_id, None)
            self.metrics.background_errors.labels("refresh").inc()
            log.warning("refresh could not reach the store", extra={"entry": entry_id, "error": exc.detail})
        except Exception:
            self._claims.pop(entry_id, None)
            self.metrics.background_errors.labels("refresh").inc()
            log.exception("refresh crashed", extra={"entry": entry_id})

    async def _follow_schedule(self) -> None:
        outage = _Outage("schedule")
        while not self._stopping:
            self._wake.clear()
            try:
                lease_end = self._lease_end()
                claimed = await self.store.claim_due(lease_end, min(self._capacity, CLAIM_BATCH))
                next_due = await self.store.next_due_ms()
            except StoreUnavailable as exc:
                self.metrics.background_errors.labels("schedule").inc()
                await asyncio.sleep(outage.failed(exc.detail))
                continue
            outage.over()
            for claim in claimed:
                self._spawn(claim.entry_id, "schedule", claim)
            if self._capacity <= 0:
                await self._wake.wait()
                continue
            max_wait_s = self.schedule_max_wait_s
            wait_s = max_wait_s if next_due is None else (next_due - now_ms()) / 1000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, min(wait_s, max_wait_s)))

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
                    if message is None:
                        continue
                    entry_id = keys.entry_of_shadow(message["data"].decode())
                    # At capacity the entry stays due in the schedule, which picks it up when a slot frees.
                    if entry_id is not None and self._capacity > 0:
                        self._spawn(entry_id, "event", None)
            except (RedisError, OSError) as exc:
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
