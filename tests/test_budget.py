"""A fetcher's upstream budget (max_rate): held across replicas, cold reads first, recent reads first."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from eagercache import fetcher
from eagercache.budget import Budget
from eagercache.metrics import Metrics
from eagercache.store import Claim

from .conftest import AppFactory
from .helpers import Counter

on_redis = pytest.mark.parametrize("store_url", ["redis"], indirect=True)

RATE = 5.0
ENTRIES = 10


def budgeted(*counters: Counter) -> Any:
    @fetcher(ttl=0.1, jitter=0, max_rate=RATE, timeout=2)
    async def upstream(n: int) -> int:
        for counter in counters:
            counter.hit()
        return n

    return upstream


@on_redis
async def test_the_budget_holds_across_two_replicas(make_app: AppFactory) -> None:
    one_calls, other_calls, total = Counter(), Counter(), Counter()
    _, one = await make_app([budgeted(one_calls, total)])
    await make_app([budgeted(other_calls, total)])
    started = time.monotonic()
    for n in range(ENTRIES):  # cold reads: answered at once, their tokens owed
        assert (await one.get(f"/data/upstream?n={n}")).status_code == 200
    # Unbudgeted, 10 entries with a ttl of 0.1 s would be fetched 100 times a second.
    await total.reach(ENTRIES + 15, timeout=30)
    elapsed = time.monotonic() - started
    allowed = max(1.0, RATE) + RATE * elapsed  # one second's worth at once, then max_rate
    assert total.count <= allowed + 1, f"{total.count} fetches in {elapsed:.2f} s at max_rate {RATE}"
    assert other_calls.count > 0  # the other replica refreshed too, from the same budget


@on_redis
async def test_cold_reads_are_answered_while_the_budget_is_spent(make_app: AppFactory, redis_url: str) -> None:
    app, client = await make_app([budgeted(Counter())])
    for n in range(ENTRIES * 2):  # twice the burst: the budget is in debt
        answer = await client.get(f"/data/upstream?n={n}")
        assert (answer.status_code, answer.headers["x-cache"]) == (200, "MISS")
    await _owed(app)
    tokens = redis.Redis.from_url(redis_url).hget("eagercache:budget:upstream", "tokens")
    assert tokens is not None and float(tokens) < 0


@on_redis
async def test_refreshes_over_the_budget_are_put_off_and_served_stale(make_app: AppFactory) -> None:
    calls = Counter()

    @fetcher(ttl=0.1, jitter=0, max_rate=2, timeout=0.5)
    async def slow_budget(n: int) -> int:
        calls.hit()
        return n

    app, client = await make_app([slow_budget])
    for n in range(ENTRIES):
        await client.get(f"/data/slow_budget?n={n}")
    metrics = app.state.metrics
    while metrics.sample("eagercache_budget_deferred_total", fetcher="slow_budget") < ENTRIES:
        await calls.reach(calls.count + 1, timeout=15)  # a refresh at max_rate; deferrals come with each round
    states = {(await client.get(f"/data/slow_budget?n={n}")).headers["x-cache"] for n in range(ENTRIES)}
    assert "STALE" in states  # overdue, waiting for the budget: still answered
    assert all(s in ("HIT", "STALE") for s in states)


async def _owed(app: Any) -> None:
    """Wait for the budget's background debits (cold reads) to land."""
    budget: Budget = app.state.engine.budget
    while budget._owing:
        await next(iter(budget._owing))


class _Store:
    def __init__(self, grant: int) -> None:
        self.grant = grant
        self.released: dict[str, int] = {}

    async def take_budget(self, fetcher: str, rate: float, wanted: int, *, owe: bool = False) -> int:
        return min(self.grant, wanted)

    async def release(self, claims: dict[str, int], delays_ms: dict[str, int] | None = None) -> int:
        self.released.update(delays_ms or {})
        return len(claims)


async def test_the_most_recently_read_are_refreshed_first() -> None:
    store = _Store(grant=2)
    budget = Budget(store, {"f": 10.0}, Metrics())  # type: ignore[arg-type]
    claims = [
        Claim("f?n=old", 1, 1_000, 0),
        Claim("f?n=newest", 1, 9_000, 0),
        Claim("f?n=never", 1, None, 0),
        Claim("f?n=newer", 1, 8_000, 0),
        Claim("g?n=unbudgeted", 1, 1, 0),
    ]
    admitted = [c.entry_id for c in await budget.admit(claims)]
    assert admitted == ["g?n=unbudgeted", "f?n=newest", "f?n=newer"]
    # The rest come due one after another at max_rate, the more recently read first.
    assert store.released == {"f?n=old": 100, "f?n=never": 200}
