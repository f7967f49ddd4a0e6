"""Isolation: nothing another client, a background loop or a fetcher does stops a process serving and refreshing.

- Keys of other applications expire on the same server (any bytes, any database): refresh by event goes on.
- A background loop that fails unexpectedly is logged once, counted, reported by /readyz, and restarted.
- Whatever a fetcher raises (SystemExit, KeyboardInterrupt, its own CancelledError, any BaseException) is
  a failed fetch: a 502 for a reader, a STALE entry for a refresh, never the end of the process.
- Only eagercache's own deadline is a timeout (504); a fetcher's own TimeoutError is a failed fetch (502),
  and a fetcher that ignores cancellation cannot hold its reader past the deadline.

Every test runs on a real Redis server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis

from eagercache import create_app, fetcher
from eagercache.metrics import Metrics
from eagercache.settings import Settings
from eagercache.store import ClaimRound

from .helpers import Counter
from .servers import ServeProcess
from .test_redis import running

PROBLEM_JSON = "application/problem+json"
FETCH_FAILED = "urn:eagercache:problem:fetch-failed"
FETCH_TIMEOUT = "urn:eagercache:problem:fetch-timeout"


async def wait_forever() -> None:
    """Stands in for the schedule loop, so that only expiry events can refresh."""
    await asyncio.Event().wait()


def url_of_db(url: str, db: int) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


def expire_now(client: redis.Redis, key: bytes) -> None:
    """Let `key` expire now: SET PX 1, then touch it until Redis deletes it, which publishes `expired` at once."""
    client.set(key, b"foreign", px=1)
    deadline = time.monotonic() + 2
    while client.exists(key):  # one round trip each: the key is gone within a millisecond or so
        assert time.monotonic() < deadline, f"{key!r} never expired"


def errors_in(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- 1. keys that are not ours ---------------------------------------------------------------------------

FOREIGN_KEYS = {
    "non-utf8-name-same-db": (0, b"\xff\xfe-foreign"),
    "non-utf8-name-other-db": (1, b"\xff\xfe-foreign"),
    "non-ascii-under-the-shadow-prefix": (0, b"eagercache:{b0}:shadow:\xff"),
}


@pytest.mark.parametrize(("db", "key"), FOREIGN_KEYS.values(), ids=FOREIGN_KEYS.keys())
async def test_a_foreign_expired_key_does_not_stop_refresh_by_event(
    redis_url: str,
    redis_sync: redis.Redis,
    db: int,
    key: bytes,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    @fetcher(ttl=0.5, jitter=0)
    async def tick(k: str) -> str:
        return k

    app = create_app([tick], redis_url=redis_url)
    refresher, metrics = app.state.refresher, app.state.metrics
    monkeypatch.setattr(refresher, "_follow_schedule", wait_forever)  # an event is the only way to refresh
    writes = Counter()
    app.state.engine.on_write(writes.hit)
    other_client = redis.Redis.from_url(url_of_db(redis_url, db))
    try:
        with caplog.at_level(logging.INFO):
            async with running(app) as client:
                assert refresher.subscribed
                assert (await client.get("/data/tick?k=a")).status_code == 200  # its shadow key expires in 0.5 s
                expire_now(other_client, key)  # its event comes first, well before the entry's own
                try:
                    await writes.reach(2, timeout=5)  # the cold write, then the refresh the shadow key's event caused
                except TimeoutError:
                    pytest.fail(f"no refresh by event after {key!r} expired; subscribed: {refresher.subscribed}")
                assert metrics.sample("eagercache_fetches_total", fetcher="tick", cause="event", outcome="ok") >= 1
                assert refresher.subscribed
                assert refresher.supervisor.down() == []
                ready = await client.get("/readyz")
                assert ready.status_code == 200, ready.text
    finally:
        other_client.close()
    # "stays": not a failure and a restart or a reconnect in between
    assert metrics.sample("eagercache_background_errors_total", component="expiry events") == 0
    assert metrics.sample("eagercache_subscription_reconnects_total") == 0
    assert errors_in(caplog) == []


# -- 2. supervised background loops ----------------------------------------------------------------------


async def test_a_failing_schedule_loop_is_logged_once_counted_reported_and_restarted(
    redis_url: str, redis_sync: redis.Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    @fetcher(ttl=0.2, jitter=0)
    async def tick(k: str) -> str:
        return k

    app = create_app([tick], redis_url=redis_url)
    refresher, store, metrics = app.state.refresher, app.state.store, app.state.metrics
    refresher.uses_events = False  # the schedule alone refreshes: while its loop is down, nothing does
    writes = Counter()
    app.state.engine.on_write(writes.hit)
    failing, failures, claims = {"on": False}, Counter(), Counter()
    claim_due: Callable[[Sequence[int], int, int], Awaitable[ClaimRound]] = store.claim_due

    async def flaky_claim_due(buckets: Sequence[int], lease_ms: int, limit: int) -> ClaimRound:
        if failing["on"]:
            failures.hit()
            raise RuntimeError("injected claim failure")
        claimed = await claim_due(buckets, lease_ms, limit)
        claims.hit()
        return claimed

    monkeypatch.setattr(store, "claim_due", flaky_claim_due)
    with caplog.at_level(logging.INFO):
        async with running(app) as client:
            assert (await client.get("/data/tick?k=a")).status_code == 200
            await writes.reach(2)  # refreshing on the schedule
            failing["on"] = True
            await failures.reach(3)  # it failed on its first two restarts too
            down = await client.get("/readyz")
            assert down.status_code == 503
            assert "schedule: restarting after RuntimeError: injected claim failure" in down.json()["detail"]
            assert metrics.sample("eagercache_background_loops_down") == 1
            failing["on"] = False
            await claims.reach(claims.count + 1)  # restarted, and claiming again
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            await writes.reach(writes.count + 2)  # refreshing again
    assert metrics.sample("eagercache_background_errors_total", component="schedule") >= 3
    logged = errors_in(caplog)
    assert len(logged) == 1, [r.getMessage() for r in logged]  # once for the streak, not once per restart
    record = logged[0]
    assert record.__dict__["loop"] == "schedule"
    assert record.exc_info is not None and record.exc_info[2] is not None  # with its traceback
    assert isinstance(record.exc_info[1], RuntimeError) and str(record.exc_info[1]) == "injected claim failure"


async def test_a_failing_reads_loop_is_restarted_and_records_reads_again(
    redis_url: str, redis_sync: redis.Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    @fetcher(ttl=1, jitter=0)
    async def tick(k: str) -> str:
        return k

    app = create_app([tick], redis_url=redis_url)
    refresher, store, metrics = app.state.refresher, app.state.store, app.state.metrics
    refresher.read_flush_s = 0.05
    failing, failures, touches = {"on": False}, Counter(), Counter()
    touch = store.touch

    async def flaky_touch(entry_ids: list[str]) -> None:
        if failing["on"]:
            failures.hit()
            raise RuntimeError("injected touch failure")
        await touch(entry_ids)
        touches.hit()

    monkeypatch.setattr(store, "touch", flaky_touch)
    with caplog.at_level(logging.INFO):
        async with running(app) as client:
            assert (await client.get("/data/tick?k=a")).status_code == 200
            failing["on"] = True
            await failures.reach(2)
            down = await client.get("/readyz")
            assert down.status_code == 503
            assert "reads: restarting after RuntimeError: injected touch failure" in down.json()["detail"]
            failing["on"] = False
            await touches.reach(touches.count + 1)  # restarted
            await store.client.zadd(store.keys.buckets[0].read, {"tick?k=a": 0})  # as if never read
            assert (await client.get("/data/tick?k=a")).status_code == 200
            await touches.reach(touches.count + 2)  # the second flush surely took that read
            assert (await store.client.zscore(store.keys.buckets[0].read, "tick?k=a") or 0) > 0  # recorded
            assert (await client.get("/readyz")).status_code == 200
    assert metrics.sample("eagercache_background_errors_total", component="reads") >= 2
    logged = errors_in(caplog)
    assert [r.__dict__["loop"] for r in logged] == ["reads"]
    assert logged[0].exc_info is not None and logged[0].exc_info[2] is not None


async def test_a_failing_events_loop_is_restarted_and_refreshes_by_event_again(
    redis_url: str, redis_sync: redis.Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    @fetcher(ttl=0.5, jitter=0)
    async def tick(k: str) -> str:
        return k

    # backstop_interval is also how long the events loop waits for a message: a quiet batch every 0.2 s
    app = create_app([tick], redis_url=redis_url, settings=Settings(backstop_interval=0.2))
    refresher, metrics = app.state.refresher, app.state.metrics
    monkeypatch.setattr(refresher, "_follow_schedule", wait_forever)  # an event is the only way to refresh
    events = refresher.events
    assert events is not None
    writes = Counter()
    app.state.engine.on_write(writes.hit)
    failing, failures, batches_seen = {"on": False}, Counter(), Counter()
    batches = events.batches

    async def flaky_batches() -> AsyncGenerator[list[str], None]:
        async with contextlib.aclosing(batches()) as inner:
            async for due in inner:
                if failing["on"]:
                    failures.hit()
                    raise RuntimeError("injected events failure")
                batches_seen.hit()
                yield due

    monkeypatch.setattr(events, "batches", flaky_batches)
    with caplog.at_level(logging.INFO):
        async with running(app) as client:
            assert refresher.subscribed
            failing["on"] = True
            await failures.reach(2)
            down = await client.get("/readyz")
            assert down.status_code == 503
            assert "expiry events: restarting after RuntimeError: injected events failure" in down.json()["detail"]
            failing["on"] = False
            await batches_seen.reach(batches_seen.count + 1)  # restarted and subscribed
            assert (await client.get("/readyz")).status_code == 200
            assert (await client.get("/data/tick?k=b")).status_code == 200
            await writes.reach(2, timeout=5)  # the cold write, then a refresh that only an event can cause
            assert metrics.sample("eagercache_fetches_total", fetcher="tick", cause="event", outcome="ok") >= 1
    assert metrics.sample("eagercache_background_errors_total", component="expiry events") >= 2
    logged = errors_in(caplog)
    assert [r.__dict__["loop"] for r in logged] == ["expiry events"]
    assert logged[0].exc_info is not None and logged[0].exc_info[2] is not None


# -- 3. whatever a fetcher raises ------------------------------------------------------------------------


class Doom(BaseException):
    """A BaseException of a fetcher's own: neither an Exception nor anything asyncio knows."""


RAISED: dict[str, Callable[[], BaseException]] = {
    "SystemExit": lambda: SystemExit(3),
    "KeyboardInterrupt": KeyboardInterrupt,
    "CancelledError": asyncio.CancelledError,  # raised by the fetcher itself: nobody cancelled it
    "BaseException-subclass": lambda: Doom("doom"),
}


@pytest.mark.parametrize("raised", RAISED)
async def test_whatever_a_fetcher_raises_on_a_cold_read_is_a_502_and_the_app_serves_on(
    redis_url: str, redis_sync: redis.Redis, raised: str
) -> None:
    @fetcher(ttl=1, jitter=0)
    async def doomed(k: str) -> str:
        raise RAISED[raised]()

    @fetcher(ttl=0.2, jitter=0)
    async def fine(k: str) -> str:
        return k

    app = create_app([doomed, fine], redis_url=redis_url)
    metrics = app.state.metrics
    writes = Counter()
    app.state.engine.on_write(writes.hit)
    async with running(app) as client:
        for _ in range(2):  # nothing was stored: the second read fetches again, and fails the same way
            failed = await client.get("/data/doomed?k=a")
            assert failed.status_code == 502, failed.text
            assert failed.headers["content-type"] == PROBLEM_JSON
            assert failed.json()["type"] == FETCH_FAILED
        assert (await client.get("/data/fine?k=a")).status_code == 200
        await writes.reach(2)  # and refreshes it
        assert (await client.get("/readyz")).status_code == 200
        assert app.state.refresher.supervisor.down() == []
    assert metrics.sample("eagercache_fetches_total", fetcher="doomed", cause="cold", outcome="error") == 2


def refresh_errors(metrics: Metrics, name: str) -> float:
    """Failed refreshes of a fetcher, whichever signal (schedule or event) led to them."""
    return sum(
        metrics.sample("eagercache_fetches_total", fetcher=name, cause=cause, outcome="error")
        for cause in ("schedule", "event")
    )


@pytest.mark.parametrize("raised", RAISED)
async def test_whatever_a_fetcher_raises_on_refresh_leaves_its_entry_stale_and_others_refreshing(
    redis_url: str, redis_sync: redis.Redis, raised: str
) -> None:
    raising, attempts, steady_calls = {"on": False}, Counter(), Counter()

    @fetcher(ttl=0.2, jitter=0)
    async def doomed() -> str:
        if raising["on"]:
            attempts.hit()
            raise RAISED[raised]()
        return "last good"

    @fetcher(ttl=0.2, jitter=0)
    async def steady() -> int:
        steady_calls.hit()
        return steady_calls.count

    app = create_app([doomed, steady], redis_url=redis_url)
    async with running(app) as client:
        assert (await client.get("/data/doomed")).status_code == 200
        assert (await client.get("/data/steady")).status_code == 200
        raising["on"] = True
        await attempts.reach(3)  # a retry starts only once the failure before it was recorded
        stale = await client.get("/data/doomed")
        assert (stale.status_code, stale.headers["x-cache"], stale.json()["data"]) == (200, "STALE", "last good")
        await steady_calls.reach(steady_calls.count + 2)  # the other fetcher refreshes on
        assert (await client.get("/readyz")).status_code == 200
        assert app.state.refresher.supervisor.down() == []
    assert refresh_errors(app.state.metrics, "doomed") >= 3


async def test_many_more_refreshes_raising_cancelled_error_than_fetch_slots_do_not_stop_refreshing(
    redis_url: str, redis_sync: redis.Redis
) -> None:
    entries, slots = 110, 4
    quitting, attempts, steady_calls = {"on": False}, Counter(), Counter()

    @fetcher(ttl=0.3, jitter=0)
    async def quitter(k: int) -> int:
        if quitting["on"]:
            attempts.hit()
            raise asyncio.CancelledError  # its own, not a cancellation: it must not cost a slot or a worker
        return k

    @fetcher(ttl=0.2, jitter=0)
    async def steady() -> int:
        steady_calls.hit()
        return steady_calls.count

    app = create_app([quitter, steady], redis_url=redis_url, settings=Settings(max_concurrent_fetches=slots))
    async with running(app) as client:
        for first in range(0, entries, 10):  # in small bursts: within the read budget even on a busy machine
            answers = await asyncio.gather(*(client.get(f"/data/quitter?k={i}") for i in range(first, first + 10)))
            assert {a.status_code for a in answers} == {200}, [a.text for a in answers if a.status_code != 200]
        assert (await client.get("/data/steady")).status_code == 200
        quitting["on"] = True
        await attempts.reach(entries)  # over 25 times as many as there are fetch slots
        await steady_calls.reach(steady_calls.count + 2)
        assert (await client.get("/readyz")).status_code == 200
        stale = await client.get("/data/quitter?k=7")
        assert (stale.status_code, stale.headers["x-cache"]) == (200, "STALE")
    assert refresh_errors(app.state.metrics, "quitter") >= entries


def pids_in(client: redis.Redis, key: str) -> list[str]:
    """The pids the raising fetchers of tests.fleet logged under `key`, one per raise."""
    raw: list[bytes] = client.lrange(key, 0, -1)  # type: ignore[assignment]
    return [pid.decode() for pid in raw]


@pytest.mark.fault
async def test_a_fetcher_raising_system_exit_ends_no_process_of_a_fleet(
    redis_url: str, redis_sync: redis.Redis
) -> None:
    specs = [
        "--fetchers",
        "tests.fleet:exits_on_refresh",
        "--fetchers",
        "tests.fleet:always_exits",
    ]
    env = {"FLEET_REDIS_URL": redis_url}
    fleet = [ServeProcess("--redis-url", redis_url, *specs, env=env) for _ in range(2)]
    try:
        for server in fleet:
            server.wait_ready()
        pids = {str(server.process.pid) for server in fleet}
        async with httpx.AsyncClient(timeout=10) as client:
            for i, server in enumerate(fleet):
                assert (await client.get(f"{server.url}/data/exits_on_refresh?k={i}")).status_code == 200
            async with asyncio.timeout(15):  # refresh cycles of ttl 0.3 s, until each process has run into one
                while not (len(exits := pids_in(redis_sync, "raising:refresh-exits")) >= 8 and set(exits) == pids):
                    for server in fleet:
                        assert server.process.poll() is None, server.stderr()
                    await asyncio.sleep(0.05)  # polling other processes through Redis: nothing to await
            for server in fleet:
                assert server.process.poll() is None, server.stderr()
                assert (await client.get(f"{server.url}/healthz")).status_code == 200
                assert (await client.get(f"{server.url}/readyz")).status_code == 200
                stale = await client.get(f"{server.url}/data/exits_on_refresh?k=0")
                assert (stale.status_code, stale.headers["x-cache"]) == (200, "STALE")
                cold = await client.get(f"{server.url}/data/always_exits")  # a reader's fetch raises it too
                assert cold.status_code == 502, cold.text
                assert cold.json()["type"] == FETCH_FAILED
                assert (await client.get(f"{server.url}/healthz")).status_code == 200
                assert server.process.poll() is None, server.stderr()
    finally:
        for server in fleet:
            server.close()
    assert set(pids_in(redis_sync, "raising:cold-exits")) == pids


# -- 4. timeouts -----------------------------------------------------------------------------------------


async def test_a_fetchers_own_timeout_error_is_a_failed_fetch_not_a_timeout(
    redis_url: str, redis_sync: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    @fetcher(ttl=1, timeout=5)
    async def upstream() -> str:
        raise TimeoutError("upstream timed out")

    app = create_app([upstream], redis_url=redis_url)
    metrics = app.state.metrics
    with caplog.at_level(logging.INFO):
        async with running(app) as client:
            answer = await client.get("/data/upstream")
    assert answer.status_code == 502, answer.text
    assert answer.headers["content-type"] == PROBLEM_JSON
    assert answer.json()["type"] == FETCH_FAILED
    assert metrics.sample("eagercache_fetches_total", fetcher="upstream", cause="cold", outcome="error") == 1
    assert metrics.sample("eagercache_fetches_total", fetcher="upstream", cause="cold", outcome="timeout") == 0
    logged = [r for r in caplog.records if r.__dict__.get("fetcher") == "upstream" and r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in logged] == ["fetch failed"]
    assert "upstream timed out" in logged[0].__dict__["error"]


async def test_a_fetcher_that_swallows_cancellation_cannot_hold_its_reader_past_the_timeout(
    redis_url: str, redis_sync: redis.Redis
) -> None:
    timeout = 1.0
    release, swallowed = asyncio.Event(), Counter()

    @fetcher(ttl=1, timeout=timeout)
    async def stubborn() -> str:
        while True:
            try:
                await release.wait()
                return "too late"
            except asyncio.CancelledError:
                swallowed.hit()  # and waits on, as a badly written fetcher does

    app = create_app([stubborn], redis_url=redis_url)
    engine, metrics = app.state.engine, app.state.metrics
    async with running(app) as client:
        try:
            started = time.monotonic()
            async with asyncio.timeout(timeout + 5):  # a bound on a broken build, not part of the measure
                answer = await client.get("/data/stubborn")
            elapsed = time.monotonic() - started
            assert answer.status_code == 504, answer.text
            assert answer.headers["content-type"] == PROBLEM_JSON
            assert answer.json()["type"] == FETCH_TIMEOUT
            assert timeout - 0.05 <= elapsed < timeout + 1.5, elapsed
            assert swallowed.count >= 1  # it was cancelled, and went on
            assert metrics.sample("eagercache_fetches_abandoned") == 1  # still running, and known to be
            assert metrics.sample("eagercache_fetches_total", fetcher="stubborn", cause="cold", outcome="timeout") == 1
        finally:
            release.set()
        abandoned = set(engine.runner.abandoned)
        assert abandoned
        await asyncio.wait(abandoned, timeout=5)
        assert metrics.sample("eagercache_fetches_abandoned") == 0


async def test_eagercaches_own_deadline_is_a_504_counted_as_a_timeout(redis_url: str, redis_sync: redis.Redis) -> None:
    @fetcher(ttl=1, timeout=0.3)
    async def hangs() -> str:
        await asyncio.Event().wait()
        return "never"

    app = create_app([hangs], redis_url=redis_url)
    metrics = app.state.metrics
    async with running(app) as client:
        started = time.monotonic()
        answer = await client.get("/data/hangs")
        elapsed = time.monotonic() - started
    assert answer.status_code == 504, answer.text
    assert answer.headers["content-type"] == PROBLEM_JSON
    assert answer.json()["type"] == FETCH_TIMEOUT
    assert 0.25 <= elapsed < 0.3 + 1.5, elapsed
    assert metrics.sample("eagercache_fetches_total", fetcher="hangs", cause="cold", outcome="timeout") == 1
    assert metrics.sample("eagercache_fetches_total", fetcher="hangs", cause="cold", outcome="error") == 0


async def test_runs_of_a_fetcher_that_ignores_cancellation_do_not_pile_up(
    redis_url: str, redis_sync: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_ABANDONED_PER_FETCHER runs still going after their timeout, the fetcher is not run again
    (a 502 at once) until they end; other fetchers are not affected."""
    from eagercache import isolation

    monkeypatch.setattr(isolation, "MAX_ABANDONED_PER_FETCHER", 2)
    release = asyncio.Event()
    runs: list[str] = []

    @fetcher(ttl=60, timeout=0.1)
    async def stubborn(k: str) -> str:
        runs.append(k)
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()
        return k

    @fetcher(ttl=60)
    async def fine() -> str:
        return "fine"

    app = create_app([stubborn, fine], redis_url=redis_url)
    metrics = app.state.metrics
    async with running(app) as client:
        try:
            assert (await client.get("/data/stubborn?k=1")).status_code == 504
            assert (await client.get("/data/stubborn?k=2")).status_code == 504
            assert metrics.sample("eagercache_fetches_abandoned") == 2
            refused = await client.get("/data/stubborn?k=3")
            assert refused.status_code == 502, refused.text
            assert runs == ["1", "2"]  # not run at all (so no timeout of its own was waited either)
            assert metrics.sample("eagercache_fetches_abandoned") == 2
            assert (await client.get("/data/fine")).status_code == 200
        finally:
            release.set()
        async with asyncio.timeout(5):
            while metrics.sample("eagercache_fetches_abandoned"):
                await asyncio.sleep(0.01)  # the abandoned runs end in their own tasks
        assert (await client.get("/data/stubborn?k=3")).status_code == 200  # run again once they ended
