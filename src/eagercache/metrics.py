"""Prometheus instruments, one registry per app so that apps (and tests) never share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

UNKNOWN_FETCHER_LABEL = "(unknown)"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "eagercache_requests",
            "Reads of /data by fetcher and result (hit, miss, error).",
            ["fetcher", "result"],
            registry=self.registry,
        )
        self.fetches = Counter(
            "eagercache_fetches",
            "Fetcher runs by cause (cold, schedule, event) and outcome (ok, error, timeout).",
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
        self.background_errors = Counter(
            "eagercache_background_errors",
            "Failures in background work, by component.",
            ["component"],
            registry=self.registry,
        )
        self.subscribed = Gauge(
            "eagercache_expiry_subscription_up",
            "1 while the expired-event subscription is live.",
            registry=self.registry,
        )

    def sample(self, name: str, **labels: str) -> float:
        """Current value of one series (0 if it was never touched); for tests and the CLI."""
        return self.registry.get_sample_value(name, labels) or 0.0
