"""Prometheus instruments, one registry per app so that apps (and tests) never share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

UNKNOWN_FETCHER_LABEL = "(unknown)"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "eagercache_requests",
            "Reads of /data by fetcher and result (hit, stale, miss, error).",
            ["fetcher", "result"],
            registry=self.registry,
        )
        self.fetches = Counter(
            "eagercache_fetches",
            "Fetcher runs by cause (cold, schedule, event, admin) and outcome (ok, error, timeout).",
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
            "Failures in background work, by component (a loop's name for a loop that failed and restarted).",
            ["component"],
            registry=self.registry,
        )
        self.refresh_lag = Histogram(
            "eagercache_refresh_lag_seconds",
            "From an entry's due time to its refreshed value being stored.",
            ["fetcher"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.data_age = Histogram(
            "eagercache_served_data_age_seconds",
            "Age of the data in answers (now - last_retrieved).",
            ["fetcher"],
            buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
            registry=self.registry,
        )
        self.entries = Gauge(
            "eagercache_entries",
            "Entries per fetcher in the store (read periodically).",
            ["fetcher"],
            registry=self.registry,
        )
        self.inflight = Gauge("eagercache_fetches_in_flight", "Fetcher runs in progress.", registry=self.registry)
        self.abandoned = Gauge(
            "eagercache_fetches_abandoned",
            "Fetcher runs still going after their timeout cancelled them (a fetcher that ignores cancellation).",
            registry=self.registry,
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
        )
        self.loops_down = Gauge(
            "eagercache_background_loops_down",
            "Background loops that failed and are waiting to restart.",
            registry=self.registry,
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
        )
        self.released_claims = Counter(
            "eagercache_released_claims", "Refresh claims given back at shutdown.", registry=self.registry
        )
        self.subscribed = Gauge(
            "eagercache_expiry_subscription_up",
            "1 while the expired-event subscription is live on every primary.",
            registry=self.registry,
        )
        self.subscribed_nodes = Gauge(
            "eagercache_expiry_subscribed_nodes",
            "Primaries whose expired events this process is subscribed to.",
            registry=self.registry,
        )
        self.topology = Gauge(
            "eagercache_store_topology",
            "1 for the store's topology (memory, standalone, sentinel, cluster) and its bucket count.",
            ["topology", "buckets"],
            registry=self.registry,
        )
        self.primaries = Gauge(
            "eagercache_store_primaries", "Primaries the store has, as last discovered.", registry=self.registry
        )
        self.failovers = Counter(
            "eagercache_store_failovers",
            "Changes of the store's primaries seen (failover, primary added or removed).",
            registry=self.registry,
        )

    def sample(self, name: str, **labels: str) -> float:
        """Current value of one series (0 if it was never touched); for tests and the CLI."""
        return self.registry.get_sample_value(name, labels) or 0.0
