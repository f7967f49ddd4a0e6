"""Prometheus instruments: one registry per app, or under `--workers` prometheus-client's multiprocess files.

The hot paths (a /data read, a refresh) count in plain ints (`ServedRead.record`, `PlainCounter.inc`,
`PlainHistogram.observe`): a labelled child's inc() and a histogram's observe() each take a lock, and
together cost more than the rest of the bookkeeping of a hit. `Metrics.flush()` adds what was counted to
the prometheus series: before every scrape, and with
`--workers` also every FLUSH_INTERVAL_S, so a scrape answered by one worker shows the other workers' reads
at most that late. The ints are only touched from the app's event loop (`+=` is not atomic across threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

UNKNOWN_FETCHER_LABEL = "(unknown)"
# prometheus-client's own variable: set when it is first imported, it puts every value in per-process files.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Seconds between flushes of a worker's read counts to its files: how late another worker's scrape sees them.
FLUSH_INTERVAL_S = 1.0
AGE_BUCKETS_S = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
LAG_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# eagercache_stale_overdue_seconds is the largest overdue time of the stale reads of the last STALE_WINDOW_S,
# kept in STALE_SLOTS slots: a fetcher whose reads are no longer stale is back to 0 within that window.
STALE_WINDOW_S = 60.0
STALE_SLOTS = 6
log = logging.getLogger(__name__)


def multiprocess_dir() -> str | None:
    """The directory of prometheus-client's multiprocess mode if this process runs in it, else None.

    prometheus_client picks its value class once, at import, by PROMETHEUS_MULTIPROC_DIR: `serve --workers`
    sets it before uvicorn spawns the workers, which import everything afresh.
    """
    if getattr(values.ValueClass, "_multiprocess", False):
        return os.environ.get(MULTIPROC_DIR_ENV)
    return None


class PlainCounter:
    """One counter series, counted in a plain int between flushes."""

    __slots__ = ("_child", "n")

    def __init__(self, child: Counter) -> None:
        self.n = 0
        self._child = child

    def inc(self) -> None:
        self.n += 1

    def flush(self) -> None:
        if self.n:
            self._child.inc(self.n)
            self.n = 0


class PlainHistogram:
    """One histogram series, as plain bucket counts and a sum between flushes."""

    __slots__ = ("_child", "bounds", "counts", "total")

    def __init__(self, child: Histogram) -> None:
        self.bounds: list[float] = child._upper_bounds  # its `le` bounds, +Inf last (pinned like _buckets below)
        self.counts = [0] * len(self.bounds)  # per bucket, not cumulative: what observe() keeps too
        self.total = 0.0
        self._child = child

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value: `le` is inclusive
        self.total += value

    def flush(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        # Histogram has no public "add n to a bucket": add to the values observe() increments, one per bucket
        # (cumulated at collection) and the sum. test_metrics_workers pins this to the installed client.
        for value, n in zip(self._child._buckets, counts, strict=True):
            if n:
                value.inc(n)
        self._child._sum.inc(self.total)
        counts[:] = [0] * len(counts)
        self.total = 0.0


class ServedRead:
    """What an answered read costs the metrics: two int additions and a bisect, no lock, no label lookup."""

    __slots__ = ("_ages", "_count")

    def __init__(self, count: PlainCounter, ages: PlainHistogram) -> None:
        self._count = count
        self._ages = ages

    def record(self, age_s: float) -> None:
        self._count.n += 1
        self._ages.observe(age_s)


class StaleOverdue:
    """The largest overdue time of one fetcher's stale reads in the last window, in slots of window / N
    seconds: a stale read costs a clock reading and a comparison, no lock; a fresh read costs nothing."""

    __slots__ = ("_child", "ids", "maxima", "slot_s")

    def __init__(self, child: Gauge, window_s: float) -> None:
        self.slot_s = window_s / STALE_SLOTS
        self.ids = [-1] * STALE_SLOTS  # the slot number (monotonic time / slot_s) each maximum is of
        self.maxima = [0.0] * STALE_SLOTS
        self._child = child

    def record(self, overdue_s: float) -> None:
        slot = int(time.monotonic() / self.slot_s)
        i = slot % STALE_SLOTS
        if self.ids[i] != slot:
            self.ids[i], self.maxima[i] = slot, overdue_s
        elif overdue_s > self.maxima[i]:
            self.maxima[i] = overdue_s

    def flush(self) -> None:
        oldest = int(time.monotonic() / self.slot_s) - STALE_SLOTS + 1
        self._child.set(max((m for n, m in zip(self.ids, self.maxima, strict=True) if n >= oldest), default=0.0))


def _forget_dead_processes(path: str) -> None:
    """Take the live gauges of processes that died without shutting down (SIGKILL, OOM) out of the sums.

    uvicorn starts a new worker in a dead one's place; the dead one's counters and histograms stay (what it
    counted happened), its in-flight fetches and loops down must not. A killed worker counts as alive until
    uvicorn reaps it, within about half a second.
    """
    pids = {int(f.rsplit("_", 1)[1][: -len(".db")]) for f in glob.glob(os.path.join(path, "gauge_live*_*.db"))}
    for pid in pids:
        if not _alive(pid):
            _mark_process_dead(pid, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 sends nothing: is there such a process (POSIX, like signal handling here)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process has the pid now: ours is gone
    return True


def _mark_process_dead(pid: int, path: str) -> None:
    """Removes the process's files of live gauges (prometheus-client's own bookkeeping for a dead process)."""
    mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


class Metrics:
    """The app's instruments.

    In one process, each app has its own registry, so apps (and tests) never share counters. With
    `--workers`, prometheus-client keeps every value in files per process under `multiprocess_dir`, and a
    scrape merges the files of every worker (values of the same name and labels, whichever app made them):
    counters and histograms are summed, each gauge is merged by its `multiprocess_mode` (commented there).
    """

    def __init__(self) -> None:
        self.multiprocess_dir = multiprocess_dir()
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "eagercache_requests",
            "Reads of /data by fetcher and result (hit, stale, miss, error).",
            ["fetcher", "result"],
            registry=self.registry,
        )
        self.fetches = Counter(
            "eagercache_fetches",
            "Fetcher runs by cause (cold, schedule, event, admin) and outcome "
            "(ok, not_modified, kept, error, timeout).",
            ["fetcher", "cause", "outcome"],
            registry=self.registry,
        )
        self.fetch_seconds = Histogram(
            "eagercache_fetch_seconds", "Fetcher run time, successful runs only.", ["fetcher"], registry=self.registry
        )
        self.changes = Counter(
            "eagercache_data_changes",
            "Refreshes whose data differed from the stored data.",
            ["fetcher"],
            registry=self.registry,
        )
        self.budget_deferred = Counter(
            "eagercache_budget_deferred",
            "Refreshes put off because their fetcher's max_rate budget was spent (each time one is put off).",
            ["fetcher"],
            registry=self.registry,
        )
        self.background_errors = Counter(
            "eagercache_background_errors",
            "Failures in background work, by component (a loop's name for a loop that failed and restarted).",
            ["component"],
            registry=self.registry,
        )
        self.refresh_lag = Histogram(
            "eagercache_refresh_lag_seconds",
            "From an entry's due time to its refreshed value being stored.",
            ["fetcher"],
            buckets=LAG_BUCKETS_S,
            registry=self.registry,
        )
        self.data_age = Histogram(
            "eagercache_served_data_age_seconds",
            "Age of the data in answers (now - last_retrieved).",
            ["fetcher"],
            buckets=AGE_BUCKETS_S,
            registry=self.registry,
        )
        self.entries = Gauge(
            "eagercache_entries",
            "Entries per fetcher in the store (read periodically).",
            ["fetcher"],
            registry=self.registry,
            multiprocess_mode="livemostrecent",  # every worker reads the same store: the latest reading
        )
        self.inflight = Gauge(
            "eagercache_fetches_in_flight",
            "Fetcher runs in progress.",
            registry=self.registry,
            multiprocess_mode="livesum",  # the server's: every worker runs fetches of its own
        )
        self.cache_entries = Gauge(
            "eagercache_process_cache_entries",
            "Entries in this process's memory caches: near (entries), queries (validated query strings), "
            "representations (prepared response headers and bodies).",
            ["cache"],
            registry=self.registry,
            multiprocess_mode="livesum",  # each worker has its own caches: the server's memory is the sum
        )
        self.cache_bytes = Gauge(
            "eagercache_process_cache_bytes",
            "Bytes of response bodies held by this process's near cache and prepared representations (each "
            "bounded at 64 MB; the query cache holds at most 100,000 strings of at most 200 bytes).",
            ["cache"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.abandoned = Gauge(
            "eagercache_fetches_abandoned",
            "Fetcher runs still going after their timeout cancelled them (a fetcher that ignores cancellation).",
            registry=self.registry,
            multiprocess_mode="livesum",  # the server's, as in flight; they end with their process
        )
        self.repaired = Counter(
            "eagercache_schedule_repairs",
            "Stored entries found off the refresh schedule (evicted, deleted by hand) and put back on it.",
            ["found_by"],
            registry=self.registry,
        )
        self.clock_skew = Gauge(
            "eagercache_clock_skew_seconds",
            "This host's wall clock minus the store's (Redis TIME), at the last reading. eagercache keeps time "
            "by the store's clock, so skew changes nothing; it is shown for operators.",
            registry=self.registry,
            multiprocess_mode="livemostrecent",  # one host clock and one store: the latest reading
        )
        self.loops_down = Gauge(
            "eagercache_background_loops_down",
            "Background loops that failed and are waiting to restart.",
            registry=self.registry,
            multiprocess_mode="livesum",  # every worker runs its own loops: all that are down
        )
        self.idle_removed = Counter(
            "eagercache_idle_removed",
            "Entries removed because nobody read them for max_idle.",
            ["fetcher"],
            registry=self.registry,
        )
        self.uncached = Counter(
            "eagercache_uncached",
            "Fetches answered but not stored because the fetcher has max_entries entries.",
            ["fetcher"],
            registry=self.registry,
        )
        self.reconnects = Counter(
            "eagercache_subscription_reconnects",
            "Re-subscriptions to expiry events after the connection was lost.",
            registry=self.registry,
        )
        self.mode = Gauge(
            "eagercache_refresh_mode",
            "1 for the active refresh mode: events+schedule, or schedule (the backstop) alone.",
            ["mode"],
            registry=self.registry,
            multiprocess_mode="livemax",  # 1 for each mode some worker runs in (a sum would count workers)
        )
        self.released_claims = Counter(
            "eagercache_released_claims", "Refresh claims given back at shutdown.", registry=self.registry
        )
        self.subscribed = Gauge(
            "eagercache_expiry_subscription_up",
            "1 while the expired-event subscription is live on every primary.",
            registry=self.registry,
            # Each worker subscribes on its own, and one that lost it is not ready (/readyz): 0 if any is down,
            # so a healthy worker does not hide a broken one.
            multiprocess_mode="livemin",
        )
        self.subscribed_nodes = Gauge(
            "eagercache_expiry_subscribed_nodes",
            "Primaries whose expired events this process is subscribed to.",
            registry=self.registry,
            multiprocess_mode="livemin",  # the worker subscribed to fewest, as for the subscription above
        )
        self.topology = Gauge(
            "eagercache_store_topology",
            "1 for the store's topology (memory, standalone, sentinel, cluster) and its bucket count.",
            ["topology", "buckets"],
            registry=self.registry,
            multiprocess_mode="livemax",  # the same store for every worker: 1, not one per worker
        )
        self.primaries = Gauge(
            "eagercache_store_primaries",
            "Primaries the store has, as last discovered.",
            registry=self.registry,
            multiprocess_mode="livemostrecent",  # one store: the latest discovery of any worker
        )
        self.failovers = Counter(
            "eagercache_store_failovers",
            "Changes of the store's primaries seen (failover, primary added or removed).",
            registry=self.registry,
        )
        self.watchers = Gauge(
            "eagercache_watchers",
            "Open /watch streams.",
            registry=self.registry,
            multiprocess_mode="livesum",  # each worker has its own streams: the server's are the sum
        )
        self.watch_events = Counter(
            "eagercache_watch_events",
            "Events sent to watchers, by event (snapshot, patch, status).",
            ["event"],
            registry=self.registry,
        )
        self.watch_lag = Histogram(
            "eagercache_watch_delivery_lag_seconds",
            "From the write of changed data (its last_modified, by the store's clock) to its event sent to a watcher.",
            ["fetcher"],
            buckets=LAG_BUCKETS_S,
            registry=self.registry,
        )
        self.stale_overdue = Gauge(
            "eagercache_stale_overdue_seconds",
            "Per fetcher, how far past its due time (what max_stale is measured against) the most overdue entry "
            f"read as stale in the last {STALE_WINDOW_S:g} s was: answered STALE, or 503 data-too-stale past "
            f"max_stale. 0 once its reads have not been stale for {STALE_WINDOW_S:g} s.",
            ["fetcher"],
            registry=self.registry,
            multiprocess_mode="livemax",  # the most overdue any live worker served (a sum would add workers)
        )
        self.watch_slow = Counter(
            "eagercache_watch_slow_clients",
            "Watchers that fell behind: their buffer filled up (sent a snapshot instead of the backlog), or a send "
            "stalled past the send timeout (disconnected; the client reconnects).",
            ["action"],
            registry=self.registry,
        )

        self._counters: dict[tuple[str, tuple[str, ...]], PlainCounter] = {}
        self._histograms: dict[tuple[str, tuple[str, ...]], PlainHistogram] = {}
        self._served: dict[tuple[str, str], ServedRead] = {}
        self._stale: dict[str, StaleOverdue] = {}
        self.stale_window_s = STALE_WINDOW_S  # for the fetchers' first stale reads from now on (tests shorten it)
        self.fetching = 0  # fetcher runs in progress: the in-flight gauge, set at each flush
        self._on_flush: list[Callable[[], None]] = []

    def plain_counter(self, family: Counter, *labels: str) -> PlainCounter:
        """A series of `family`, counted in a plain int; look it up once per label set, or keep it."""
        key = (family._name, labels)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = PlainCounter(family.labels(*labels))
        return counter

    def plain_histogram(self, family: Histogram, *labels: str) -> PlainHistogram:
        """A series of `family`, counted in plain ints; look it up once per label set, or keep it."""
        key = (family._name, labels)
        histogram = self._histograms.get(key)
        if histogram is None:
            histogram = self._histograms[key] = PlainHistogram(family.labels(*labels))
        return histogram

    def request_count(self, fetcher: str, result: str) -> PlainCounter:
        """The `eagercache_requests_total` series of a fetcher and a result."""
        return self.plain_counter(self.requests, fetcher, result)

    def served(self, fetcher: str, result: str) -> ServedRead:
        """The request count and the data-age histogram of answered reads of a fetcher with one result."""
        served = self._served.get((fetcher, result))
        if served is None:
            ages = self.plain_histogram(self.data_age, fetcher)
            served = self._served[fetcher, result] = ServedRead(self.request_count(fetcher, result), ages)
        return served

    def stale_read(self, fetcher: str, overdue_ms: float) -> None:
        """A read of a stale entry of `fetcher`, `overdue_ms` past its due time (served STALE, or refused as
        too stale), for eagercache_stale_overdue_seconds. Fresh reads do not call this."""
        overdue = self._stale.get(fetcher)
        if overdue is None:
            overdue = self._stale[fetcher] = StaleOverdue(self.stale_overdue.labels(fetcher), self.stale_window_s)
        overdue.record(max(0.0, overdue_ms / 1000))  # a grace read of an entry not yet due: 0

    def on_flush(self, callback: Callable[[], None]) -> None:
        """Call `callback()` at every flush (before a scrape): for gauges read from live state."""
        self._on_flush.append(callback)

    def flush(self) -> None:
        """Add what was counted in plain ints since the last flush to the prometheus series."""
        for callback in self._on_flush:
            callback()
        for counter in self._counters.values():
            counter.flush()
        for histogram in self._histograms.values():
            histogram.flush()
        for overdue in self._stale.values():
            overdue.flush()
        self.inflight.set(self.fetching)

    @contextlib.asynccontextmanager
    async def flushing(self) -> AsyncIterator[None]:
        """While the app runs. With `--workers`: flush every FLUSH_INTERVAL_S, for the other workers' scrapes;
        at the end flush the last reads and take this process's live gauges out of the merge."""
        if self.multiprocess_dir is None:
            yield  # one process: the scrape flushes, nobody else reads these values
            return
        task = asyncio.create_task(self._flush_every(FLUSH_INTERVAL_S))
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self.flush()
            _mark_process_dead(os.getpid(), self.multiprocess_dir)

    async def _flush_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.flush()
            except Exception:  # a full disk under the directory: keep counting, try again
                log.exception("metrics flush failed")
                self.background_errors.labels("metrics-flush").inc()

    def scrape_registry(self) -> CollectorRegistry:
        """What a scrape reports, flushed: this app's registry, or with `--workers` every worker's files."""
        self.flush()
        if self.multiprocess_dir is None:
            return self.registry
        _forget_dead_processes(self.multiprocess_dir)
        registry = CollectorRegistry()  # new at every scrape: MultiProcessCollector reads the files when collected
        MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return registry

    def exposition(self) -> bytes:
        """The Prometheus text format of a scrape."""
        return generate_latest(self.scrape_registry())

    def sample(self, name: str, **labels: str) -> float:
        """Current value of one series (0 if it was never touched), as a scrape would show it; for tests."""
        return self.scrape_registry().get_sample_value(name, labels) or 0.0
