"""A fetcher's upstream budget (`max_rate`): its fetches per second across every replica.

Refresh-ahead multiplies upstream calls: every entry is fetched every ttl whether or not anyone reads
it. A budget caps that. Its tokens live in Redis (scripts.TAKE_BUDGET), shared by every replica, and
refill at `max_rate` per second up to one second's worth. A round of claimed refreshes takes what
tokens there are; the most recently read entries go first, and the rest are given back, due again
when the budget should have room for them (one after another, 1 / max_rate apart), served STALE in
the meantime once overdue (within max_stale). A reader's fetch of a missing entry (and an admin's
refresh) never waits: it takes its token in the background, into debt if need be, so the
refreshes after it wait for it instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from .errors import EagerCacheError
from .keys import split_entry_id
from .logs import Throttle
from .metrics import Metrics
from .store import Claim, Store

log = logging.getLogger(__name__)


class Budget:
    """The budgets of one process's fetchers that have a `max_rate`."""

    def __init__(self, store: Store, rates: Mapping[str, float], metrics: Metrics) -> None:
        self.store = store
        self.rates = dict(rates)
        self.metrics = metrics
        # Per fetcher: refreshes this process has deferred and not yet seen come due (as time passes at
        # max_rate): where the next deferred one goes in the queue, so that deferrals spread out instead
        # of all coming due, and being claimed and deferred again, together.
        self._queued: dict[str, tuple[float, float]] = {}  # fetcher -> (queue length, time.monotonic())
        self._owing: set[asyncio.Task[None]] = set()
        self._errors = Throttle(log, 60.0)

    async def admit(self, claims: list[Claim]) -> list[Claim]:
        """The claims to refresh now. The others, over their fetcher's budget, are given back, due again
        later (see the module's docstring)."""
        if not self.rates:
            return claims
        admitted: list[Claim] = []
        limited: dict[str, list[Claim]] = {}
        for claim in claims:
            name = split_entry_id(claim.entry_id)[0]
            if name in self.rates:
                limited.setdefault(name, []).append(claim)
            else:
                admitted.append(claim)
        for name, group in limited.items():
            # The most recently read first; an entry whose read time was lost counts as never read.
            group.sort(key=lambda c: c.last_read_ms or 0, reverse=True)
            rate = self.rates[name]
            try:
                taken = await self.store.take_budget(name, rate, len(group))
            except EagerCacheError as exc:
                # Without the budget's word nothing runs: the leases run out and the entries are due again.
                self.metrics.background_errors.labels("budget").inc()
                self._errors.warning("budget not available; refreshes wait", name, {"error": exc.detail})
                continue
            admitted += group[:taken]
            if deferred := group[taken:]:
                await self._defer(name, rate, deferred)
        return admitted

    async def _defer(self, name: str, rate: float, deferred: list[Claim]) -> None:
        now = time.monotonic()
        queued, since = self._queued.get(name, (0.0, now))
        queued = max(0.0, queued - (now - since) * rate)  # those that have come due since
        delays = {c.entry_id: int((queued + i + 1) * 1000 / rate) for i, c in enumerate(deferred)}
        self._queued[name] = (queued + len(deferred), now)
        self.metrics.budget_deferred.labels(name).inc(len(deferred))
        try:
            await self.store.release({c.entry_id: c.lease_end_ms for c in deferred}, delays)
        except EagerCacheError as exc:  # the leases run out instead: later, but nothing is lost
            self.metrics.background_errors.labels("budget").inc()
            self._errors.warning("deferred refreshes not given back", name, {"error": exc.detail})

    def owe(self, fetcher: str) -> None:
        """Count a fetch that did not wait for the budget (a cold read, an admin's refresh)."""
        rate = self.rates.get(fetcher)
        if rate is None:
            return
        task = asyncio.create_task(self._owe(fetcher, rate), name=f"budget {fetcher}")
        self._owing.add(task)
        task.add_done_callback(self._owing.discard)

    async def _owe(self, fetcher: str, rate: float) -> None:
        try:
            await self.store.take_budget(fetcher, rate, 1, owe=True)
        except EagerCacheError as exc:
            self.metrics.background_errors.labels("budget").inc()
            self._errors.warning("a fetch could not be counted against the budget", fetcher, {"error": exc.detail})
