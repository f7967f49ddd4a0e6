"""The refresher: finds entries that are due, claims them, and has the engine refresh them.

Two signals lead here. The schedule (each bucket's `due` sorted set) is the truth: a loop claims what is
due in the buckets whose next due time has come (each claim says when its bucket is next due), sleeps
until the earliest of those, and at least every backstop interval claims in every bucket (another
replica may have scheduled something sooner). Redis `expired` events for shadow keys (events.py) are a
hint that an entry is due and nobody has it (a shadow key expires a grace after its due time or its
claim's lease end: scripts.SHADOW_GRACE_MS); it arrives without polling, late by up to a second or so,
and not at all while disconnected, for evicted keys, or on `memory://`. Whichever comes first, an entry
is refreshed only by whoever claims it in the schedule, so the two never fetch it twice, and neither do
several replicas.

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

from .engine import Engine
from .errors import ConfigurationError, StoreUnavailable
from .events import ExpiryEvents
from .isolation import Cause
from .keys import split_entry_id
from .logs import Throttle
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
# A bucket whose claim failed (its node failing over, its slot moving) is tried again this much later.
BUCKET_RETRY_MS = 250
# A schedule claim out this long is held up (a node failing over or gone, a slot moving; its round trip is
# otherwise a few ms): expiry events, which come once an entry has been due for a grace and nobody has it,
# are then claimed on their own instead of being left to that claim.
SCHEDULE_CLAIM_HELD_UP_S = 0.1
NOTHING_SCHEDULED = 2**62
# Entries a claim round asks of each bucket when slots are short of ready buckets.
CLAIMS_PER_BUCKET = 8
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
            if not store.shadow_keys
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
        self._due_at: list[int] = []  # per bucket: when to claim there next (store clock, ms); 0 = now
        self._schedule_running = False  # the schedule loop is running (it is supervised: it may be restarting)
        # Per bucket being claimed: the earliest due time written there since its claim was sent, which
        # the claim's reply may not include (NOTHING_SCHEDULED: none).
        self._written_during_claim: dict[int, int] = {}
        self.claim_held_up_s = SCHEDULE_CLAIM_HELD_UP_S
        self._claim_sent_at: float | None = None  # time.monotonic() of the schedule claim now out, if any
        self._claim_errors = Throttle(log, 60.0)
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

    def store_status(self) -> dict[str, object]:
        """The store's topology as this process sees it, for /readyz and the start-up log."""
        status: dict[str, object] = {
            "topology": self.store.topology_name(),
            "buckets": len(self.store.keys.buckets),
            "primaries": list(self.store.nodes()),
            "failovers": self.store.topology.failovers if self.store.topology is not None else 0,
            "refresh_mode": self.mode,
        }
        if self.events is not None:
            status["subscribed_nodes"] = sorted(self.events.subscribed_nodes)
        return status

    def problems(self) -> list[str]:
        """What keeps this process from refreshing as it should, for /readyz; empty when all is well."""
        found = [f"background loop {reason}" for reason in self.supervisor.down()]
        # Ready while at least one primary's events arrive: one primary down (a failover under way) must
        # not take every replica out of its load balancer. /readyz names the nodes subscribed.
        if self.uses_events and self.events is not None and not self.events.subscribed_nodes:
            found.append("not subscribed to Redis expiry events")
        return found

    async def start(self) -> None:
        self._due_at = [0] * len(self.store.keys.buckets)
        await self._sync_clock()
        await self.store.bucket_counts()  # what max_entries knows of the other buckets
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
        self.metrics.topology.labels(self.store.kind, str(len(self.store.keys.buckets))).set(1)
        self.metrics.primaries.set(len(self.store.nodes()))
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
            await self.store.touch(self._take_reads())
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

    def _written(self, entry_id: str, next_due_ms: int) -> None:
        if not self._due_at:
            return  # not started
        bucket = self.store.keys.bucket_of(entry_id).index
        self._due_at[bucket] = min(self._due_at[bucket], next_due_ms)
        if bucket in self._written_during_claim:
            self._written_during_claim[bucket] = min(self._written_during_claim[bucket], next_due_ms)
        if next_due_ms < self._sleep_until_ms:
            self._wake.set()  # the schedule loop sleeps past this entry's next refresh

    def _slot_freed(self) -> None:
        if self._waiting_for_slots:
            self._wake.set()

    def _refresh(self, claims: list[Claim], cause: Cause) -> None:
        for claim, fetch in zip(claims, self.engine.refresh(claims, cause), strict=True):
            self._claims[claim.entry_id] = claim.lease_end_ms
            fetch.add_done_callback(functools.partial(self._refreshed, claim.entry_id))

    def _refreshed(self, entry_id: str, task: asyncio.Future[bytes | None]) -> None:
        if not task.cancelled():  # written, postponed or lost: no longer ours to give back
            self._claims.pop(entry_id, None)

    async def _follow_schedule(self) -> None:
        self._schedule_running = True
        try:
            await self._claim_on_schedule()
        finally:
            self._schedule_running = False

    async def _claim_on_schedule(self) -> None:
        outage = Outage("schedule")
        backstop_at = 0.0  # time.monotonic() of the next claim in every bucket
        turn = 0  # the bucket to start with when slots are short, so that every bucket gets its turn
        while not self._stopping:
            self._wake.clear()
            limit = min(self.engine.free_slots, CLAIM_BATCH)
            if limit <= 0:
                self._waiting_for_slots = True
                await self._wake.wait()
                self._waiting_for_slots = False
                continue
            due_at = self._due_at
            if time.monotonic() >= backstop_at:
                backstop_at = time.monotonic() + self.schedule_max_wait_s
                due_at[:] = [0] * len(due_at)
            now = self.store.clock.now_ms()
            ready = [b for b in range(len(due_at)) if due_at[b] <= now]
            if ready:
                turn %= len(ready)
                # Few free slots and many ready buckets (a backlog): claim several entries in each of a
                # few buckets, not one in each of many (a script per refresh); every bucket gets its turn.
                take = (ready[turn:] + ready[:turn])[: max(1, -(-limit // CLAIMS_PER_BUCKET))]
                turn += len(take)
                self._written_during_claim = dict.fromkeys(take, NOTHING_SCHEDULED)
                self._claim_sent_at = time.monotonic()
                try:
                    claimed = await self.store.claim_due(take, self.lease_ms, max(1, limit // len(take)))
                except StoreUnavailable as exc:
                    self._written_during_claim = {}
                    self.metrics.background_errors.labels("schedule-store").inc()
                    if len(take) < len(due_at):
                        # Some buckets only (their primary is gone, their slot moving): those wait, the
                        # other buckets' claims go on at their own times.
                        retry_at = self.store.clock.now_ms() + BUCKET_RETRY_MS
                        for b in take:
                            due_at[b] = retry_at
                        self._claim_errors.warning(
                            "claims failed in some buckets; they are tried again shortly",
                            "claim",
                            {"buckets": len(take), "error": exc.detail},
                        )
                        continue
                    await asyncio.sleep(outage.failed(exc.detail))
                    continue
                finally:
                    self._claim_sent_at = None
                written, self._written_during_claim = self._written_during_claim, {}
                outage.over()
                self._refresh(await self.engine.budget.admit(claimed.claims), "schedule")
                now = self.store.clock.now_ms()
                for b in take:
                    if b in claimed.failed:
                        planned = now + BUCKET_RETRY_MS
                    elif claimed.full.get(b):
                        planned = 0  # more may be due
                    elif (next_due_in := claimed.next_due_in.get(b)) is not None:
                        # A little past the next due time, so that entries falling due together share one claim.
                        planned = now + next_due_in + SCHEDULE_COALESCE_MS
                    else:
                        planned = NOTHING_SCHEDULED  # until a write here, or the backstop, says otherwise
                    due_at[b] = min(planned, written[b])
                if claimed.failed:
                    self.metrics.background_errors.labels("schedule-store").inc(len(claimed.failed))
                    self._claim_errors.warning(
                        "claims failed in some buckets; they are tried again shortly",
                        "claim",
                        {"buckets": len(claimed.failed), "error": next(iter(claimed.failed.values()))},
                    )
                continue  # look again: more buckets may be ready
            now = self.store.clock.now_ms()
            wait_ms = min(min(due_at) - now, int((backstop_at - time.monotonic()) * 1000))
            self._sleep_until_ms = now + max(0, wait_ms)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0, wait_ms) / 1000)
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
                due = self._not_yet_due_in_schedule(due)
                if not due:
                    continue
                try:
                    claimed = await self.store.claim(due[:room], self.lease_ms)
                except StoreUnavailable:
                    self.metrics.background_errors.labels("event-claim").inc()
                    continue  # still due in the schedule: nothing is lost
                if claimed.failed:  # those buckets' entries are still due in the schedule
                    self.metrics.background_errors.labels("event-claim").inc(len(claimed.failed))
                self._refresh(await self.engine.budget.admit(claimed.claims), "event")

    def _not_yet_due_in_schedule(self, entry_ids: list[str]) -> list[str]:
        """The entries of buckets the schedule loop does not take to be due yet: the event is news only there.

        A bucket the loop knows to be due it claims in its next round, as soon as slots are free; a claim
        for the event as well would only find its entries taken or not due. Under a backlog (entries
        refreshed late, so their shadow keys expire first) that was most of the events and a claim round
        trip for each batch of them, which made the backlog longer."""
        due_at = self._due_at
        if not self._schedule_running:
            return entry_ids  # not started, or restarting after a failure: the events are all there is
        sent = self._claim_sent_at
        if sent is not None and time.monotonic() - sent > self.claim_held_up_s:
            # Its claim is held up (a node failing): entries elsewhere must not wait for it. An event comes
            # once, so one filtered out here would be lost to a claim that may take seconds.
            return entry_ids
        now = self.store.clock.now_ms()
        bucket_of = self.store.keys.bucket_of
        return [e for e in entry_ids if due_at[bucket_of(e).index] > now]

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
                await self.store.touch(reads.union(self.engine.watched))  # a watched entry is read
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
        keys = self.store.keys
        while not self._stopping:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                if not await self.store.take_sweep(int(self.sweep_interval_s * 900), self._owner):
                    continue  # another replica sweeps this round
                # Orphans first (scheduled, no item): dropped now, a later refresh has nothing to count out,
                # so the recount below stays right.
                for bucket in range(len(keys.buckets)):
                    cursor = 0
                    while not self._stopping:
                        cursor, ids = await self.store.scan_schedule(bucket, cursor, SWEEP_BATCH)
                        await self.store.prune(bucket, ids)
                        if cursor == 0:
                            break
                before = await self.store.bucket_counts()
                failovers = self.store.failovers
                seen: set[str] = set()  # SCAN may return a key twice (the keyspace was resized meanwhile)
                found: dict[int, Counter[str]] = {}
                repaired = 0
                async with contextlib.aclosing(self.store.stored_entries(None, SWEEP_BATCH)) as batches:
                    async for ids in batches:
                        if self._stopping:
                            return
                        # Counted batch by batch: counting 100,000 ids at the end held the loop ~100 ms.
                        for entry_id in ids:
                            if entry_id not in seen:
                                seen.add(entry_id)
                                bucket = keys.bucket_of(entry_id).index
                                found.setdefault(bucket, Counter())[split_entry_id(entry_id)[0]] += 1
                        repaired += len(await self.store.repair(ids))
                # A key that moved between primaries during the scan may have been missed: no recount then.
                if self.store.failovers == failovers:
                    await self.store.recount(before, {b: dict(c) for b, c in found.items()})
                await self.store.check_layout()
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
