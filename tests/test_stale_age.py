"""eagercache_stale_overdue_seconds: how far past its due time the most overdue stale data read lately was."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest
from starlette.applications import Starlette

from eagercache import create_app, fetcher
from eagercache.item import Entry
from eagercache.metrics import StaleOverdue

from .test_redis import running

GAUGE = "eagercache_stale_overdue_seconds"
WINDOW_S = 1.0  # the tests' window (the server's is 60 s): the gauge decays within it


def upstream(ttl: float, max_stale: float | None) -> tuple[Callable[..., Awaitable[int]], dict[str, bool]]:
    """A fetcher that fails while `state["failing"]`."""
    state = {"failing": False}
    calls = [0]

    @fetcher(ttl=ttl, jitter=0, timeout=1, max_stale=max_stale)
    async def flaky() -> int:
        if state["failing"]:
            raise ConnectionError("upstream down")
        calls[0] += 1
        return calls[0]

    return flaky, state


async def overdue_s(app: Starlette) -> float:
    """How far past its due time the stored entry is now, by the store's clock (what max_stale is measured in)."""
    raw, _ = await app.state.store.get("flaky?")
    assert raw is not None
    return float(app.state.store.clock.now_ms() - Entry.parse(raw).due_ms) / 1000


async def read_until(client: httpx.AsyncClient, cache: str, status: int = 200, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        answer = await client.get("/data/flaky")
        if answer.status_code == status and answer.headers.get("x-cache", "") == cache:
            return
        assert time.monotonic() < deadline, f"no {status} {cache} read within {timeout} s: {answer.status_code}"
        await asyncio.sleep(0.05)  # the refresher's work, seen through reads


async def test_the_gauge_rises_with_stale_reads_and_returns_to_0_after_recovery(local_store_url: str) -> None:
    flaky, state = upstream(ttl=0.3, max_stale=60)
    app = create_app([flaky], redis_url=local_store_url)
    metrics = app.state.metrics
    metrics.stale_window_s = WINDOW_S
    async with running(app) as client:
        await read_until(client, "MISS")
        await read_until(client, "HIT")
        assert metrics.sample(GAUGE, fetcher="flaky") == 0
        state["failing"] = True
        await read_until(client, "STALE")  # its refresh failed: the last good data, marked
        first = metrics.sample(GAUGE, fetcher="flaky")
        assert 0 < first <= await overdue_s(app)
        await asyncio.sleep(0.5)  # the data gets older; the gauge shows it once a stale read sees it
        await read_until(client, "STALE")
        later = metrics.sample(GAUGE, fetcher="flaky")
        # It reflects the age: the overdue time of that read, so at least 0.5 s more, at most now's.
        assert first + 0.5 <= later <= await overdue_s(app)
        state["failing"] = False
        await read_until(client, "HIT")  # refreshed: fresh reads again, which record nothing
        deadline = time.monotonic() + 3 * WINDOW_S
        while metrics.sample(GAUGE, fetcher="flaky") > 0:
            assert time.monotonic() < deadline, "the gauge did not return to 0"
            assert (await client.get("/data/flaky")).headers["x-cache"] == "HIT"
            await asyncio.sleep(0.05)  # the window passing
        assert metrics.sample(GAUGE, fetcher="flaky") == 0


async def test_reads_refused_as_too_stale_keep_the_gauge_above_max_stale(local_store_url: str) -> None:
    """The alert must not clear when the 503s start: a read refused past max_stale counts its overdue time."""
    flaky, state = upstream(ttl=0.3, max_stale=0.5)
    app = create_app([flaky], redis_url=local_store_url)
    app.state.metrics.stale_window_s = WINDOW_S
    async with running(app) as client:
        await read_until(client, "MISS")
        state["failing"] = True
        await read_until(client, "", status=503)  # data-too-stale
        assert (await client.get("/data/flaky")).json()["type"] == "urn:eagercache:problem:data-too-stale"
        await asyncio.sleep(WINDOW_S)  # only the reads refused since then are in the window
        assert (await client.get("/data/flaky")).status_code == 503
        assert app.state.metrics.sample(GAUGE, fetcher="flaky") > 0.5


async def test_fresh_reads_do_no_stale_bookkeeping(local_store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    flaky, state = upstream(ttl=0.3, max_stale=None)
    app = create_app([flaky], redis_url=local_store_url)
    recorded: list[float] = []
    monkeypatch.setattr(StaleOverdue, "record", lambda self, overdue_s: recorded.append(overdue_s))
    async with running(app) as client:
        await read_until(client, "MISS")
        hits = 0
        while hits < 50:  # over several refreshes
            answer = await client.get("/data/flaky")
            assert answer.headers["x-cache"] == "HIT"
            hits += 1
            await asyncio.sleep(0.01)
        assert recorded == []
        assert GAUGE.encode() + b"{" not in app.state.metrics.exposition()  # no series for a fetcher never stale
        state["failing"] = True  # the same reads, stale, do record: the spy sees what fresh reads skipped
        await read_until(client, "STALE")
        assert recorded and all(overdue >= 0 for overdue in recorded)
