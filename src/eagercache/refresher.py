"""The refresher: finds entries that are due, claims them, and has the engine refresh them.

Two signals lead here. The schedule (the `due` sorted set) is the truth: a loop sleeps until the
earliest due time, or at most the backstop interval, and claims what is due. Redis `expired` events
for shadow keys (events.py) are a hint that arrives without polling, late by up to a second or so,
and not at all while disconnected, for evicted keys, or on `memory://`. Whichever comes first, an
entry is refreshed only by whoever claims it in the schedule, so the two never fetch it twice, and
neither do several replicas.

Each loop runs supervised (supervise.py): whatever it raises, it is logged, counted and restarted,
and /readyz says so while it is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import Counter

from .engine import Cause, Engine
from .errors import ConfigurationError, StoreUnavailable
from .events import ExpiryEvents
from .keys import split_entry_id
from .settings import Settings
from .store import UNSAFE_EVICTION, Claim, Store
from .supervise import Outage, Supervisor

log = logging.getLogger(__name__)

CLAIM_BATCH = 256
# A claim outlives the slowest fetch by this much; a claimer that died frees its entries then.
LEASE_MARGIN_MS = 5_000
FIRST_SUBSCRIPTION_TIMEOUT_S = 5.0
# Reads are recorded in the store at most this often, and at least 4 times per shortest max_idle.
READ_FLUSH_MAX_S = 5.0
READ_FLUSH_MIN_S = 0.05
# The schedule loop wakes this long after the next due time, to claim what falls due meanwhile in one go.
SCHEDULE_COALESCE_MS = 10
ENTRY_COUNT_INTERVAL_S = 10.0
CLOCK_SYNC_INTERVAL_S = 10.0
CLOCK_SKEW_WARNING_MS = 1_000
# Every this often one replica sweeps the store: schedule members whose item is gone are dropped, stored
# entries that lost their place in the schedule (evicted, deleted by hand) are put back on it, and the
# per-fetcher counts are recounted from the items.
SWEEP_INTERVAL_S = 60.0
SWEEP_BATCH = 1000


class Refresher:
    """One per process; started and stopped by the app's lifespan.

    The loops never claim more entries than the engine has free fetch slots, so a claimed entry starts
    its fetch at once and its lease does not run out while it waits.
    """

    def __init__(self, engine: Engine, store: Store, settings: Settings) -> None:
        self.engine = engine
        self.store = store
        self.metrics = engine.metrics
        self.schedule_max_wait_s = settings.backstop_interval
        self.sweep_interval_s = SWEEP_INTERVAL_S
        fetchers = engine.registry.values()
        self.lease_ms = int(max((f.timeout for f in fetchers), default=0.0) * 1000) + LEASE_MARGIN_MS
        shortest_idle = min((f.max_idle for f in fetchers), default=READ_FLUSH_MAX_S * 4)
        self.read_flush_s = max(READ_FLUSH_MIN_S, min(READ_FLUSH_MAX_S, shortest_idle / 4))
        self.events = (
            None
            if store.is_memory
            else ExpiryEvents(store, self.metrics, batch=CLAIM_BATCH, idle_s=settings.backstop_interval)
        )
        self.uses_events = self.events is not None
        self.supervisor = Supervisor(self.metrics)
        self._wake = asyncio.Event()
        # Loops also stop on this flag: a CancelledError that lands inside a redis-py call can be
        # swallowed there (redis/redis-py#2028), and the loop would then run on.
        self._stopping = False
        self._claims: dict[str, int] = {}  # entry id -> lease end (ms), while this process holds the claim
        self._sleep_until_ms = 0  # when the schedule loop looks next; a write due sooner wakes it
        self._waiting_for_slots = False
        self._owner = uuid.uuid4().hex
        engine.on_write(self._written)
        engine.on_fetch_done(self._slot_freed)

    @property
    def subscribed(self) -> bool:
        return self.events is not None and self.events.subscribed

    @property
    def mode(self) -> str:
        return "events+schedule" if self.uses_events else "schedule"

    def problems(self) -> list[str]:
        """What keeps this process from refreshing as it should, for /readyz; empty when all is well."""
        found = [f"background loop {reason}" for reason in self.supervisor.down()]
        if self.uses_events and not self.subscribed:
            found.append("not subscribed to Redis expiry events")
        return found

    async def start(self) -> None:
        await self._sync_clock()
        if abs(skew := self.store.clock.skew_ms()) > CLOCK_SKEW_WARNING_MS:
            log.warning(
                "this host's clock is off the store's; eagercache keeps time by the store's clock",
                extra={"skew_s": round(skew / 1000, 3)},
            )
        policy = await self.store.eviction_policy()
        if policy in UNSAFE_EVICTION:
            log.warning(
                "the server's maxmemory-policy can evict the refresh schedule; entries are then found again "
                "only by reads and the periodic sweep. Use noeviction or a volatile-* policy",
                extra={"maxmemory_policy": policy},
            )
        if self.events is not None:
            try:
                await self.events.enable()
            except ConfigurationError as exc:
                self.uses_events = False
                log.warning("no expiry events: refreshing on the schedule alone", extra={"why": exc.detail})
        self.metrics.mode.labels(self.mode).set(1)
        self.supervisor.start("schedule", self._follow_schedule)
        self.supervisor.start("reads", self._record_reads)
        self.supervisor.start("sweep", self._sweep)
        if self.uses_events:
            self.supervisor.start("expiry events", self._follow_events)
            # Ready means subscribed; a failure here is retried by the loop (and /readyz says so).
            deadline = time.monotonic() + FIRST_SUBSCRIPTION_TIMEOUT_S
            while not self.subscribed and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # the subscription is another task's; it has no event to await

    async def stop(self) -> None:
        """Stop claiming, let in-flight fetches finish (up to the shutdown timeout), give back what is left."""
        self._stopping = True
        self._wake.set()
        await self.supervisor.stop()
        await self.engine.drain()
        # Each step on its own: one that fails must not skip the others.
        try:
            await self.store.touch(sorted(self._take_reads()))
        except Exception as exc:
            log.warning("could not record the last reads", extra={"error": _error(exc)})
        if self._claims:
            try:
                released = await self.store.release(self._claims)
            except Exception as exc:
                log.warning("could not give back refresh claims; they expire", extra={"error": _error(exc)})
            else:
                self.metrics.released_claims.inc(released)
                log.info("gave back refresh claims", extra={"claims": released})
            self._claims.clear()

    def _written(self, next_due_ms: int) -> None:
        if next_due_ms < self._sleep_until_ms:
            self._wake.set()  # the schedule loop sleeps past this entry's next refresh

    def _slot_freed(self) -> None:
        if self._waiting_for_slots:
            self._wake.set()

    def _refresh(self, claims: list[Claim], cause: Cause) -> None:
        for claim in claims:
            task = self.engine.spawn_refresh(claim, cause)
            self._claims[claim.entry_id] = claim.lease_end_ms
            task.add_done_callback(functools.partial(self._refreshed, claim.entry_id))

    def _refreshed(self, entry_id: str, task: asyncio.Task[bytes | None]) -> None:
        if not task.cancelled():  # written, postponed or lost: no longer ours to give back
            self._claims.pop(entry_id, None)

    async def _follow_schedule(self) -> None:
        outage = Outage("schedule")
        while not self._stopping:
            self._wake.clear()
            limit = min(self.engine.free_slots, CLAIM_BATCH)
            if limit <= 0:
                self._waiting_for_slots = True
                await self._wake.wait()
                self._waiting_for_slots = False
                continue
            try:
                claimed = await self.store.claim_due(self.lease_ms, limit)
                next_due = None if len(claimed) == limit else await self.store.next_due_ms()
            except StoreUnavailable as exc:
                self.metrics.background_errors.labels("schedule-store").inc()
                await asyncio.sleep(outage.failed(exc.detail))
                continue
            outage.over()
            self._refresh(claimed, "schedule")
            if len(claimed) == limit:
                continue  # more may be due
            now = self.store.clock.now_ms()
            wait_ms = self.schedule_max_wait_s * 1000
            if next_due is not None:
                # A little past the next due time, so that entries falling due together share one claim.
                wait_ms = min(wait_ms, max(0, next_due - now) + SCHEDULE_COALESCE_MS)
            self._sleep_until_ms = now + int(wait_ms)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait_ms / 1000)
            self._sleep_until_ms = 0

    async def _follow_events(self) -> None:
        assert self.events is not None
        batches = self.events.batches()
        async with contextlib.aclosing(batches):
            async for due in batches:
                if self._stopping:
                    return
                # At capacity the entries stay due in the schedule, which takes them when slots free up.
                room = self.engine.free_slots
                if not due or room <= 0:
                    continue
                try:
                    claimed = await self.store.claim(due[:room], self.lease_ms)
                except StoreUnavailable:
                    self.metrics.background_errors.labels("event-claim").inc()
                    continue  # still due in the schedule: nothing is lost
                self._refresh(claimed, "event")

    async def _record_reads(self) -> None:
        """Write the entries read lately to the store in one command per interval, not one per hit; put
        entries read while overdue back on the schedule if they fell off it; keep the clock and the
        entries-per-fetcher gauge current (a scrape cannot ask Redis for itself)."""
        counted_at, synced_at = 0.0, time.monotonic()
        outage = Outage("reads")
        while not self._stopping:
            await asyncio.sleep(self.read_flush_s)
            reads, overdue = self._take_reads(), self._take_overdue()
            try:
                await self.store.touch(sorted(reads))
                if repaired := await self.store.repair(sorted(overdue)):
                    self.metrics.repaired.labels("read").inc(len(repaired))
                    log.info("entries off the schedule put back on it", extra={"entries": len(repaired)})
                if time.monotonic() - synced_at >= CLOCK_SYNC_INTERVAL_S:
                    synced_at = time.monotonic()
                    await self._sync_clock()
                if time.monotonic() - counted_at >= ENTRY_COUNT_INTERVAL_S:
                    counted_at = time.monotonic()
                    counts = await self.store.entry_counts()
                    for name in self.engine.registry:
                        self.metrics.entries.labels(name).set(counts.get(name, 0))
            except StoreUnavailable as exc:
                self._put_back(reads, overdue)
                self.metrics.background_errors.labels("reads-store").inc()
                await asyncio.sleep(outage.failed(exc.detail))
            except BaseException:
                self._put_back(reads, overdue)  # not lost: the supervisor restarts this loop
                raise
            else:
                outage.over()

    async def _sweep(self) -> None:
        """Every sweep interval, one replica scans the stored items: entries missing from the schedule
        go back on it (due now), and the entry counts are recounted from what is really stored."""
        outage = Outage("sweep")
        while not self._stopping:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                if not await self.store.take_sweep(int(self.sweep_interval_s * 900), self._owner):
                    continue  # another replica sweeps this round
                # Orphans first (scheduled, no item): dropped now, a later refresh has nothing to count out,
                # so the recount below stays right.
                cursor = 0
                while not self._stopping:
                    cursor, ids = await self.store.scan_schedule(cursor, SWEEP_BATCH)
                    await self.store.prune(ids)
                    if cursor == 0:
                        break
                before = await self.store.entry_counts()
                seen: set[str] = set()  # SCAN may return a key twice (the keyspace was resized meanwhile)
                repaired, cursor = 0, 0
                while not self._stopping:
                    cursor, ids = await self.store.scan_entries(None, cursor, SWEEP_BATCH)
                    seen.update(ids)
                    repaired += len(await self.store.repair(ids))
                    if cursor == 0:
                        await self.store.recount(before, dict(Counter(split_entry_id(i)[0] for i in seen)))
                        break
            except StoreUnavailable as exc:
                self.metrics.background_errors.labels("sweep-store").inc()
                outage.failed(exc.detail)
                continue
            outage.over()
            if repaired:
                self.metrics.repaired.labels("sweep").inc(repaired)
                log.warning("entries off the schedule put back on it by the sweep", extra={"entries": repaired})

    async def _sync_clock(self) -> None:
        await self.store.sync_clock()
        self.metrics.clock_skew.set(self.store.clock.skew_ms() / 1000)

    def _put_back(self, reads: set[str], overdue: set[str]) -> None:
        """Reads not yet recorded go back, to be tried again next time."""
        self.engine.reads |= reads
        self.engine.overdue |= overdue

    def _take_reads(self) -> set[str]:
        reads, self.engine.reads = self.engine.reads, set()
        return reads

    def _take_overdue(self) -> set[str]:
        overdue, self.engine.overdue = self.engine.overdue, set()
        return overdue


def _error(exc: Exception) -> str:
    return exc.detail if isinstance(exc, StoreUnavailable) else f"{type(exc).__name__}: {exc}"
