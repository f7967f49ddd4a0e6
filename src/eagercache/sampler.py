"""The status page's once-a-second loop: counters into the history, readings into recent events, readiness.

Everything the page shows that changes over time is read here, once a second, whoever looks (and however
many pages are open): the page's requests read what the last tick found. What the engine reports between
ticks (an entry turned stale, was removed) is only put aside by its callback and turned into events at the
next tick, where removals can be told apart by the idle counter and a burst becomes one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from .changes import Change
from .engine import Engine
from .errors import EagerCacheError, StoreUnavailable
from .history import SAMPLE_INTERVAL_S, History, Sample
from .keys import split_entry_id
from .recent import MAX_LOOKUPS, Recent
from .store import Store
from .supervise import check_cancelled

log = logging.getLogger(__name__)

# A failing fetcher is "recovered" after this many seconds without a failed fetch.
RECOVERED_AFTER_S = 10
# The store's ping at each tick gets this long (as /readyz's does).
PING_TIMEOUT_S = 0.5


@dataclass
class Readiness:
    ready: bool = False
    reasons: list[str] = field(default_factory=lambda: ["starting"])
    checked_ms: int | None = None


@dataclass
class _Removals:
    count: int = 0
    first: str = ""  # an entry id, named in the event when it is the only one


@dataclass
class _Failing:
    failures: int  # failed fetches since it began to fail
    quiet_s: int = 0  # seconds since the last one


class Sampler:
    """Samples the metrics, the store's topology and readiness every SAMPLE_INTERVAL_S into `history`,
    `recent` and `readiness`. `problems` gives the reasons this process is not ready beyond the store's
    ping (the refresher's and the watch hub's, as for /readyz)."""

    def __init__(self, engine: Engine, store: Store, problems: Callable[[], list[str]]) -> None:
        self.engine = engine
        self.store = store
        self.problems = problems
        self.history = History(engine.metrics)
        self.recent = Recent()
        self.readiness = Readiness()
        self.started_at = time.monotonic()
        self._stale: list[str] = []  # entries marked stale since the last tick (at most MAX_LOOKUPS)
        self._more_stale: dict[str, int] = {}  # fetcher -> stale transitions beyond those
        self._removed: dict[str, _Removals] = {}
        self._failing: dict[str, _Failing] = {}
        self._failovers = 0
        engine.on_change(self._changed)

    def _changed(self, change: Change, entry_id: str, etag: str) -> None:
        """The engine's callback: put aside, for the next tick (nothing is read or written here)."""
        if change == "stale":
            if len(self._stale) < MAX_LOOKUPS:
                self._stale.append(entry_id)
            else:
                name = split_entry_id(entry_id)[0]
                self._more_stale[name] = self._more_stale.get(name, 0) + 1
        elif change == "gone":
            removals = self._removed.setdefault(split_entry_id(entry_id)[0], _Removals())
            removals.count += 1
            removals.first = removals.first or entry_id

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        self.started_at = time.monotonic()
        self._failovers = self.store.failovers
        task = asyncio.create_task(self._run(), name="eagercache: status sampler")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            check_cancelled()  # a store call may swallow the cancellation (supervise.check_cancelled)
            started = time.monotonic()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # the page must never take anything down: log, count, go on next second
                log.exception("status sampler failed")
                self.engine.metrics.background_errors.labels("status-sampler").inc()
            await asyncio.sleep(max(0.0, SAMPLE_INTERVAL_S - (time.monotonic() - started)))

    async def tick(self) -> None:
        now = self.engine.clock.now_ms()
        sample = self.history.sample(now)
        self._fetcher_events(now, sample)
        self._removal_events(now, sample)
        self._failover_event(now)
        await self._readiness(now)
        await self._stale_events(now)

    def _fetcher_events(self, now: int, sample: Sample) -> None:
        """A fetcher whose fetches begin to fail, and one that has had none fail for RECOVERED_AFTER_S."""
        for name, activity in sample.fetchers.items():
            if not activity.errors:
                continue
            failing = self._failing.get(name)
            if failing is None:
                self._failing[name] = _Failing(activity.errors)
                detail = f"fetches of {name} fail ({activity.errors} in the last second)"
                self.recent.add(now, "failing", detail, fetcher=name)
            else:
                failing.failures += activity.errors
                failing.quiet_s = 0
        for name, failing in list(self._failing.items()):
            if name in sample.fetchers and sample.fetchers[name].errors:
                continue
            failing.quiet_s += 1
            if failing.quiet_s >= RECOVERED_AFTER_S:
                del self._failing[name]
                detail = f"no failed fetch of {name} for {RECOVERED_AFTER_S} s ({failing.failures} failed before)"
                self.recent.add(now, "recovered", detail, fetcher=name)

    def _removal_events(self, now: int, sample: Sample) -> None:
        """Removals seen since the last tick, told apart by the idle counter (which the engine counts just
        before it removes an idle entry): one event per fetcher and kind, naming the entry when alone."""
        removed, self._removed = self._removed, {}
        for name in {*removed, *(n for n, a in sample.fetchers.items() if a.idle_removed)}:
            seen = removed.get(name, _Removals())
            idle = sample.fetchers[name].idle_removed if name in sample.fetchers else 0
            entry = seen.first if seen.count == 1 else None
            if idle:
                what = "an entry" if idle == 1 else f"{idle} entries"
                self.recent.add(
                    now, "idle", f"{what} of {name} removed: nobody read them for max_idle", fetcher=name, entry=entry
                )
            if (other := seen.count - idle) > 0:
                what = "an entry" if other == 1 else f"{other} entries"
                self.recent.add(
                    now, "removed", f"{what} of {name} removed (invalidated, or no longer valid)", fetcher=name,
                    entry=entry if not idle else None,
                )  # fmt: skip

    def _failover_event(self, now: int) -> None:
        failovers = self.store.failovers
        if failovers != self._failovers:
            primaries = ", ".join(self.store.nodes()) or "none known"
            self.recent.add(now, "failover", f"the store's primaries changed; now {primaries}")
            self._failovers = failovers

    async def _readiness(self, now: int) -> None:
        reasons = ["shutting down"] if self.engine.shutting_down else []
        try:
            await self.store.ping(PING_TIMEOUT_S)
        except StoreUnavailable as exc:
            reasons.append(exc.detail)
        reasons += self.problems()
        was = self.readiness
        self.readiness = Readiness(not reasons, reasons, now)
        if was.checked_ms is None:
            return  # the first reading: no transition to tell
        if was.ready and reasons:
            self.recent.add(now, "not-ready", "not ready: " + "; ".join(reasons))
        elif not was.ready and not reasons:
            self.recent.add(now, "ready", "ready again")

    async def _stale_events(self, now: int) -> None:
        """One event per entry that turned stale here, with its error from its stale marker (one
        pipelined read for the batch); a burst beyond MAX_LOOKUPS is one event per fetcher."""
        stale, self._stale = self._stale, []
        more, self._more_stale = self._more_stale, {}
        for name, n in more.items():
            self.recent.add(now, "stale", f"{n} more entries of {name} turned stale", fetcher=name)
        if not stale:
            return
        try:
            described = await self.store.describe(stale)
        except EagerCacheError:
            described = [(None, None, None)] * len(stale)
        for entry_id, (_, _, marker) in zip(stale, described, strict=True):
            name = split_entry_id(entry_id)[0]
            self.recent.add(
                now,
                "stale",
                "refresh failed; serving the last good data as STALE",
                fetcher=name,
                entry=entry_id,
                error=marker.error if marker is not None else None,
            )
