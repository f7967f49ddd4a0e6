"""Per-second samples of this process's counters, for the status page's rates, percentiles and charts.

Once a second the sampler flushes the metrics' plain ints (metrics.py) and reads the few prometheus
families it needs through their public `collect()`: the hit path does no work for it. A sample keeps only
what changed in that second and only for fetchers that did something, so an idle fetcher costs nothing
and HISTORY_S of samples for a busy one is a few hundred small tuples. With `--workers` these are the
values of this process alone (prometheus-client's multiprocess files hold one set per process).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

from .metrics import Metrics

# How much history the page can chart, and how often it is sampled.
HISTORY_S = 600
SAMPLE_INTERVAL_S = 1.0
# Rates on the page are over this window; percentiles over PERCENTILE_WINDOW_S (enough observations).
RATE_WINDOW_S = 10
PERCENTILE_WINDOW_S = 60
# Causes of a fetch that are refreshes (a reader's cold fetch is not).
REFRESH_CAUSES = frozenset({"schedule", "event", "admin"})
# Outcomes of a fetch that failed; any other is a successful run (its data changed or not).
FAILED_OUTCOMES = frozenset({"error", "timeout"})


@dataclass(slots=True)
class Activity:
    """What one fetcher did during one sample interval (deltas of its counters)."""

    refreshes: int = 0
    errors: int = 0  # fetches that failed or timed out, whatever their cause
    changes: int = 0
    idle_removed: int = 0
    lag: tuple[int, ...] = ()  # refresh-lag observations per bucket of LAG_BUCKETS_S (+Inf last)
    fetch: tuple[int, ...] = ()  # fetch-time observations per bucket of the fetch histogram

    def add(self, other: Activity) -> None:
        self.refreshes += other.refreshes
        self.errors += other.errors
        self.changes += other.changes
        self.idle_removed += other.idle_removed
        self.lag = _add(self.lag, other.lag)
        self.fetch = _add(self.fetch, other.fetch)


@dataclass(slots=True)
class Sample:
    at_ms: int  # store clock
    fetchers: dict[str, Activity] = field(default_factory=dict)


@dataclass(slots=True)
class _Totals:
    """Cumulative counts as last read, per fetcher, to take the next reading's deltas from."""

    counters: dict[tuple[str, str], float] = field(default_factory=dict)  # (what, fetcher) -> total
    buckets: dict[tuple[str, str], tuple[float, ...]] = field(default_factory=dict)  # cumulative per `le`


class History:
    """The last HISTORY_S seconds of samples, taken by `sample()` (the status page's loop calls it)."""

    def __init__(self, metrics: Metrics, history_s: int = HISTORY_S) -> None:
        self.metrics = metrics
        self.samples: deque[Sample] = deque(maxlen=history_s)
        self._totals = _Totals()
        self.lag_bounds = _bounds(metrics.refresh_lag)
        self.fetch_bounds = _bounds(metrics.fetch_seconds)
        self._primed = False

    def sample(self, now_ms: int) -> Sample:
        """Read the counters, append the second's deltas, return them (the first reading only primes)."""
        self.metrics.flush()
        m, seen = self.metrics, _Totals()
        deltas: dict[str, Activity] = {}

        def activity(name: str) -> Activity:
            found = deltas.get(name)
            if found is None:
                found = deltas[name] = Activity()
            return found

        for labels, value in _counter_values(m.fetches):
            name, cause, outcome = labels["fetcher"], labels["cause"], labels["outcome"]
            failed = outcome in FAILED_OUTCOMES
            if failed or cause in REFRESH_CAUSES:
                what = "errors" if failed else "refreshes"
                key = (f"fetches {cause} {outcome}", name)
                seen.counters[key] = value
                if n := int(value - self._totals.counters.get(key, 0.0)):
                    a = activity(name)
                    if what == "refreshes":
                        a.refreshes += n
                    else:
                        a.errors += n
        for family, what in ((m.changes, "changes"), (m.idle_removed, "idle_removed")):
            for labels, value in _counter_values(family):
                key = (what, labels["fetcher"])
                seen.counters[key] = value
                if n := int(value - self._totals.counters.get(key, 0.0)):
                    setattr(activity(labels["fetcher"]), what, getattr(activity(labels["fetcher"]), what) + n)
        for histogram, what in ((m.refresh_lag, "lag"), (m.fetch_seconds, "fetch")):
            for name, cumulative in _histogram_buckets(histogram).items():
                key = (what, name)
                seen.buckets[key] = cumulative
                before = self._totals.buckets.get(key, (0.0,) * len(cumulative))
                per_bucket = _per_bucket(cumulative, before)
                if any(per_bucket):
                    setattr(activity(name), what, per_bucket)
        self._totals = seen
        sample = Sample(now_ms, {k: v for k, v in deltas.items() if _active(v)})
        if self._primed:  # the first reading has everything since start-up: no second's worth
            self.samples.append(sample)
        self._primed = True
        return sample

    def window(self, seconds: int, fetcher: str | None = None) -> tuple[Activity, float]:
        """What happened over the last `seconds` samples (one fetcher's, or every fetcher's), and the span
        in seconds they cover (0 before the first)."""
        recent = list(self.samples)[-seconds:]
        total = Activity()
        for sample in recent:
            for name, activity in sample.fetchers.items():
                if fetcher is None or name == fetcher:
                    total.add(activity)
        return total, len(recent) * SAMPLE_INTERVAL_S

    def series(self, seconds: int, fetcher: str | None = None, smooth_s: int = 5) -> list[dict[str, float | None]]:
        """One point per sample over the last `seconds`: refreshes/s, errors/s, changes/s of that second,
        and the refresh lag's p50/p99 over the `smooth_s` seconds up to it (one second holds few)."""
        samples = list(self.samples)
        start = max(0, len(samples) - seconds)
        points: list[dict[str, float | None]] = []
        for i in range(start, len(samples)):
            this, lag = Activity(), Activity()
            for j in range(max(0, i - smooth_s + 1), i + 1):
                for name, activity in samples[j].fetchers.items():
                    if fetcher is None or name == fetcher:
                        lag.add(activity)
                        if j == i:
                            this.add(activity)
            points.append({
                "at_ms": samples[i].at_ms,
                "refreshes": this.refreshes,
                "errors": this.errors,
                "changes": this.changes,
                "lag_p50_s": _round(quantile(0.5, lag.lag, self.lag_bounds)),
                "lag_p99_s": _round(quantile(0.99, lag.lag, self.lag_bounds)),
            })  # fmt: skip
        return points


def quantile(q: float, counts: Sequence[int], bounds: Sequence[float]) -> float | None:
    """The q-quantile of observations counted per bucket (`le` bounds, +Inf last), interpolated within its
    bucket as Prometheus's histogram_quantile does; the highest finite bound if it falls in +Inf; None
    without observations."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            upper = bounds[i]
            if math.isinf(upper):
                return bounds[i - 1] if i else None
            lower = bounds[i - 1] if i else 0.0
            return lower + (upper - lower) * (rank - seen) / n
        seen += n
    return bounds[-2] if len(bounds) > 1 else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _bounds(family: Histogram) -> tuple[float, ...]:
    return tuple(family._upper_bounds)  # the `le` bounds, +Inf last (as PlainHistogram reads them)


def _counter_values(family: Counter) -> Iterable[tuple[dict[str, str], float]]:
    for metric in family.collect():
        for s in metric.samples:
            if s.name.endswith("_total"):
                yield s.labels, s.value


def _histogram_buckets(family: Histogram) -> dict[str, tuple[float, ...]]:
    """Per fetcher, the cumulative count of each bucket in `le` order."""
    found: dict[str, list[float]] = {}
    for metric in family.collect():
        for s in metric.samples:
            if s.name.endswith("_bucket"):
                found.setdefault(s.labels["fetcher"], []).append(s.value)
    return {name: tuple(values) for name, values in found.items()}


def _per_bucket(cumulative: tuple[float, ...], before: tuple[float, ...]) -> tuple[int, ...]:
    """Observations per bucket since `before` (both cumulative over `le`)."""
    if len(before) != len(cumulative):
        before = (0.0,) * len(cumulative)
    grown = [int(now - was) for now, was in zip(cumulative, before, strict=True)]
    return tuple(n - (grown[i - 1] if i else 0) for i, n in enumerate(grown))


def _add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    if not a:
        return b
    if not b:
        return a
    return tuple(x + y for x, y in zip(a, b, strict=True))


def _active(a: Activity) -> bool:
    return bool(a.refreshes or a.errors or a.changes or a.idle_removed or a.lag or a.fetch)
