"""The service end to end over HTTP, on a real redis-server and on the memory store."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal

import pytest
from starlette.applications import Starlette

from eagercache import fetcher
from eagercache.item import build_entry
from eagercache.memstore import MemoryStore

from .conftest import AppFactory
from .helpers import RFC3339_MS, Counter


def writes_of(app: Starlette) -> Counter:
    """Counts entries stored by the app (cold fetches and refreshes)."""
    writes = Counter()
    app.state.engine.on_write(writes.hit)
    return writes


async def test_cold_read_then_warm_read(make_app: AppFactory) -> None:
    calls = Counter()

    @fetcher(ttl=60)
    async def rates(base: str = "EUR") -> dict[str, Any]:
        calls.hit()
        return {"base": base, "rate": 1.5}

    _, client = await make_app([rates])
    cold = await client.get("/data/rates?base=USD")
    assert cold.status_code == 200
    assert cold.headers["x-cache"] == "MISS"
    assert cold.headers["content-type"] == "application/json"
    item = cold.json()
    assert item["data"] == {"base": "USD", "rate": 1.5}
    assert RFC3339_MS.fullmatch(item["last_retrieved"])
    assert item["last_modified"] == item["last_retrieved"]

    warm = await client.get("/data/rates?base=USD")
    assert warm.status_code == 200
    assert warm.headers["x-cache"] == "HIT"
    assert warm.content == cold.content
    assert calls.count == 1


async def test_concurrent_cold_reads_fetch_once(make_app: AppFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    calls, misses, gate = Counter(), Counter(), asyncio.Event()

    @fetcher(ttl=60)
    async def slow(n: int = 0) -> dict[str, int]:
        calls.hit()
        await gate.wait()
        return {"n": n, "call": calls.count}

    app, client = await make_app([slow])
    store = app.state.store
    original_get = store.get

    async def counting_get(entry_id: str) -> tuple[bytes | None, Any]:
        body, stale = await original_get(entry_id)
        if body is None:
            misses.hit()
        return body, stale

    monkeypatch.setattr(store, "get", counting_get)
    requests = [asyncio.create_task(client.get("/data/slow?n=7")) for _ in range(50)]
    # Every reader has seen the miss (and so joined the one fetch) before the fetch may finish.
    await misses.reach(50)
    gate.set()
    answers = await asyncio.gather(*requests)
    assert calls.count == 1
    assert {a.status_code for a in answers} == {200}
    assert {a.content for a in answers} == {answers[0].content}
    assert answers[0].json()["data"] == {"n": 7, "call": 1}


async def test_entry_refreshes_itself_without_requests(make_app: AppFactory) -> None:
    calls = Counter()

    @fetcher(ttl=1, jitter=0)
    async def ticking() -> int:
        calls.hit()
        return calls.count

    app, client = await make_app([ticking])
    writes = writes_of(app)
    first = (await client.get("/data/ticking")).json()
    await writes.reach(3, timeout=6)  # the cold write and two refreshes, with no request in between
    assert calls.count >= 3
    later = await client.get("/data/ticking")
    assert later.headers["x-cache"] == "HIT"
    item = later.json()
    assert item["data"] >= 3
    assert item["last_retrieved"] > first["last_retrieved"]


async def test_last_modified_moves_only_when_data_changes(make_app: AppFactory) -> None:
    upstream: dict[str, Any] = {"value": {"a": 1, "b": [1, 2]}}

    @fetcher(ttl=0.3, jitter=0)
    async def source() -> Any:
        return upstream["value"]

    app, client = await make_app([source])
    writes = writes_of(app)
    first = (await client.get("/data/source")).json()

    await writes.reach(2)
    same = (await client.get("/data/source")).json()
    assert same["last_retrieved"] > first["last_retrieved"]
    assert same["last_modified"] == first["last_modified"]

    upstream["value"] = {"b": [1, 2], "a": 1}  # same data, keys in another order: deepdiff sees no change
    await writes.reach(writes.count + 1)
    reordered = (await client.get("/data/source")).json()
    assert reordered["last_modified"] == first["last_modified"]

    upstream["value"] = {"a": 1, "b": [2, 1]}
    await writes.reach(writes.count + 1)
    changed = (await client.get("/data/source")).json()
    assert changed["data"] == {"a": 1, "b": [2, 1]}
    assert changed["last_modified"] > first["last_modified"]
    assert changed["last_modified"] == changed["last_retrieved"]


class Echo:
    """A fetcher (its `fetch` function) that returns its arguments and records every call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

        async def fetch(
            s: str = "x",
            n: int = 1,
            f: float = 1.0,
            b: bool = False,
            mode: Literal["a", "b"] = "a",
            tags: list[str] | None = None,
        ) -> dict[str, Any]:
            kwargs = {"s": s, "n": n, "f": f, "b": b, "mode": mode, "tags": tags}
            self.calls.append(kwargs)
            return kwargs

        self.fetch = fetch


def echo_fetcher(echo: Echo) -> Any:
    return echo.fetch


async def test_equivalent_queries_share_one_entry(make_app: AppFactory) -> None:
    echo = Echo()
    _, client = await make_app({"echo": echo_fetcher(echo)})
    spellings = [
        "",
        "s=x",
        "n=1&f=1",
        "f=1.0&n=1.0",
        "b=false",
        "b=0",
        "mode=a&s=%78",
        "s=x&n=1&f=1.0&b=false&mode=a",
        "mode=a&b=False&f=1e0&n=1&s=x",
    ]
    answers = [await client.get(f"/data/echo?{q}") for q in spellings]
    assert [a.headers["x-cache"] for a in answers] == ["MISS"] + ["HIT"] * (len(spellings) - 1)
    assert len(echo.calls) == 1

    same_pair = ["s=a%20b&tags=x&tags=y", "tags=x&s=a+b&tags=y", "s=a b&tags=%78&tags=y".replace(" ", "%20")]
    pair_answers = [await client.get(f"/data/echo?{q}") for q in same_pair]
    assert [a.headers["x-cache"] for a in pair_answers] == ["MISS", "HIT", "HIT"]
    assert echo.calls[-1] == {"s": "a b", "n": 1, "f": 1.0, "b": False, "mode": "a", "tags": ["x", "y"]}


async def test_different_calls_never_share_an_entry(make_app: AppFactory) -> None:
    echo = Echo()
    _, client = await make_app({"echo": echo_fetcher(echo)})
    distinct: dict[str, dict[str, Any]] = {
        "": {"s": "x"},
        "s=": {"s": ""},
        "s=a%26n%3D2": {"s": "a&n=2"},
        "s=a&n=2": {"s": "a", "n": 2},
        "s=a%3Ab": {"s": "a:b"},
        "s=a%2Bb": {"s": "a+b"},
        "s=a+b": {"s": "a b"},
        "s=%C3%BC": {"s": "ü"},
        "s=u": {"s": "u"},
        "tags=a&tags=b": {"tags": ["a", "b"]},
        "tags=b&tags=a": {"tags": ["b", "a"]},
        "tags=a%26tags%3Db": {"tags": ["a&tags=b"]},
        "tags=": {"tags": [""]},
        "f=1.5": {"f": 1.5},
        "b=true": {"b": True},
        "mode=b": {"mode": "b"},
    }
    for query, expected in distinct.items():
        answer = await client.get(f"/data/echo?{query}")
        assert answer.status_code == 200, query
        assert answer.headers["x-cache"] == "MISS", query
        data = answer.json()["data"]
        assert {k: data[k] for k in expected} == expected, query
    assert len(echo.calls) == len(distinct)


async def test_unknown_fetcher_is_404_problem(make_app: AppFactory) -> None:
    _, client = await make_app({"echo": echo_fetcher(Echo())})
    for path in ["/data/nope", "/data/..%2F..%2Fetc", "/data/echo%3Fs=1"]:
        answer = await client.get(path)
        assert answer.status_code == 404, path
        assert answer.headers["content-type"] == "application/problem+json"
        doc = answer.json()
        assert doc["type"] == "urn:eagercache:problem:unknown-fetcher"
        assert doc["status"] == 404


async def test_invalid_parameters_are_400_naming_each(make_app: AppFactory) -> None:
    echo = Echo()
    _, client = await make_app({"echo": echo_fetcher(echo)})
    answer = await client.get("/data/echo?n=two&f=nan&mode=c&b=maybe&extra=1&s=a&s=b&tags=%FF")
    assert answer.status_code == 400
    assert answer.headers["content-type"] == "application/problem+json"
    doc = answer.json()
    assert doc["type"] == "urn:eagercache:problem:invalid-parameters"
    named = {e["parameter"] for e in doc["errors"]}
    assert named == {"tags"}  # invalid UTF-8 is refused before anything else is looked at

    answer = await client.get("/data/echo?n=two&f=nan&mode=c&b=maybe&extra=1&s=a&s=b")
    doc = answer.json()
    assert {e["parameter"]: e["detail"] for e in doc["errors"]} == {
        "b": "expected a boolean (true/false/1/0), got 'maybe'",
        "extra": "unknown parameter",
        "f": "expected a finite number, got 'nan'",
        "mode": "expected one of 'a', 'b', got 'c'",
        "n": "expected an integer, got 'two'",
        "s": "expected one value, got 2",
    }
    assert echo.calls == []


async def test_required_parameter_missing_is_400(make_app: AppFactory) -> None:
    async def needs(city: str) -> str:
        return city

    _, client = await make_app([needs])
    doc = (await client.get("/data/needs")).json()
    assert doc["status"] == 400
    assert doc["errors"] == [{"parameter": "city", "detail": "required parameter is missing"}]
    assert (await client.get("/data/needs?city=Oslo")).json()["data"] == "Oslo"


async def test_failing_fetcher_is_502_logged_once_and_not_cached(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    broken = {"yes": True}

    async def flaky() -> str:
        if broken["yes"]:
            raise RuntimeError("upstream said: token=hunter2")
        return "fine"

    _, client = await make_app([flaky])
    with caplog.at_level(logging.INFO, logger="eagercache"):
        answer = await client.get("/data/flaky")
    assert answer.status_code == 502
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["type"] == "urn:eagercache:problem:fetch-failed"
    assert "hunter2" not in answer.text and "Traceback" not in answer.text
    failures = [r for r in caplog.records if r.getMessage() == "fetch failed"]
    assert len(failures) == 1
    assert failures[0].__dict__["fetcher"] == "flaky"

    broken["yes"] = False
    recovered = await client.get("/data/flaky")
    assert (recovered.status_code, recovered.headers["x-cache"]) == (200, "MISS")


async def test_hanging_fetcher_is_504(make_app: AppFactory) -> None:
    @fetcher(timeout=0.2)
    async def hangs() -> str:
        await asyncio.Event().wait()
        return "never"

    _, client = await make_app([hangs])
    answer = await client.get("/data/hangs")
    assert answer.status_code == 504
    assert answer.json()["type"] == "urn:eagercache:problem:fetch-timeout"


async def test_unencodable_result_is_502(make_app: AppFactory) -> None:
    async def weird() -> object:
        return object()

    _, client = await make_app([weird])
    answer = await client.get("/data/weird")
    assert answer.status_code == 502
    assert "cannot be encoded as JSON" in answer.json()["detail"]


async def test_failed_refresh_keeps_the_stored_item(make_app: AppFactory) -> None:
    calls = Counter()

    @fetcher(ttl=0.3, jitter=0)
    async def fragile() -> str:
        calls.hit()
        if calls.count == 2:
            raise ConnectionError("upstream down")
        return f"good {calls.count}"

    app, client = await make_app([fragile])
    writes = writes_of(app)
    first = await client.get("/data/fragile")
    await calls.reach(2)  # the failing refresh
    after_failure = await client.get("/data/fragile")
    assert after_failure.status_code == 200
    assert after_failure.json()["data"] == "good 1"
    assert after_failure.json()["last_retrieved"] == first.json()["last_retrieved"]
    await writes.reach(2)  # the cold write, then the refresher survived and retried
    assert (await client.get("/data/fragile")).json()["data"] == "good 3"
    metrics = app.state.metrics
    assert sum(  # the failed refresh was counted, whichever signal claimed it
        metrics.sample("eagercache_fetches_total", fetcher="fragile", cause=cause, outcome="error")
        for cause in ("schedule", "event")
    )


async def test_only_keys_under_the_namespace_are_touched(make_app: AppFactory) -> None:
    @fetcher(ttl=0.3, jitter=0)
    async def thing(k: str = "v") -> str:
        return k

    app, client = await make_app([thing], namespace="ns-under-test:")
    if isinstance(app.state.store, MemoryStore):
        pytest.skip("memory:// keeps no keys: there is no keyspace to share")
    redis = app.state.store.client
    foreign = {b"other:item:thing?": b"keep", b"ns-under-test": b"keep", b"eagercache:{b0}:due": b"keep"}
    for key, value in foreign.items():
        await redis.set(key, value, px=60_000)
    writes = writes_of(app)
    for k in ["a", "b", "c"]:
        assert (await client.get(f"/data/thing?k={k}")).status_code == 200
    await writes.reach(6)  # every entry refreshed at least once
    keys = set(await redis.keys("*"))
    for key, value in foreign.items():
        assert await redis.get(key) == value
        assert 0 < await redis.pttl(key) <= 60_000
    assert {k for k in keys if k not in foreign and not k.startswith(b"ns-under-test:")} == set()


async def test_health_and_readiness(make_app: AppFactory) -> None:
    _, client = await make_app([])
    assert (await client.get("/healthz")).status_code == 200
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text


async def test_unknown_route_and_method_are_problems(make_app: AppFactory) -> None:
    _, client = await make_app({"echo": echo_fetcher(Echo())})
    missing = await client.get("/nothing-here")
    assert (missing.status_code, missing.headers["content-type"]) == (404, "application/problem+json")
    post = await client.post("/data/echo")
    assert (post.status_code, post.headers["content-type"]) == (405, "application/problem+json")
    assert "GET" in post.headers["allow"]


async def test_metrics_count_hits_misses_and_fetches(make_app: AppFactory) -> None:
    _, client = await make_app({"echo": echo_fetcher(Echo())})
    await client.get("/data/echo")
    await client.get("/data/echo")
    text = (await client.get("/metrics")).text
    assert 'eagercache_requests_total{fetcher="echo",result="miss"} 1.0' in text
    assert 'eagercache_requests_total{fetcher="echo",result="hit"} 1.0' in text
    assert 'eagercache_fetches_total{cause="cold",fetcher="echo",outcome="ok"} 1.0' in text


async def test_near_cache_serves_hits_without_redis_and_sees_other_writes_in_time(make_app: AppFactory) -> None:
    """A hit within near_cache_ttl costs no store read; a write by another replica shows within that bound."""
    version = {"n": 1}

    @fetcher(ttl=60)
    async def shared() -> int:
        return version["n"]

    app, client = await make_app([shared])
    store = app.state.store
    reads = Counter()
    original_get = store.get

    async def counting_get(entry_id: str) -> tuple[bytes | None, Any]:
        reads.hit()
        return await original_get(entry_id)  # type: ignore[no-any-return]

    store.get = counting_get
    assert (await client.get("/data/shared")).json()["data"] == 1
    before = reads.count
    for _ in range(20):
        assert (await client.get("/data/shared")).headers["x-cache"] == "HIT"
    assert reads.count - before <= 1  # near_cache_ttl is 0.25 s: these came from process memory
    # Another replica stores a new version behind this process's back.
    value = (await original_get("shared?"))[0]
    assert value is not None
    now = int(time.time() * 1000)
    new_value, _ = build_entry(b"2", now, now + 60_000, previous_header=value)
    await store.write("shared?", "shared", new_value, now + 60_000, mode="refresh", max_entries=10)
    changed_at = time.monotonic()
    async with asyncio.timeout(5):
        while (await client.get("/data/shared")).json()["data"] != 2:
            await asyncio.sleep(0.01)  # a reader's pace
    assert time.monotonic() - changed_at <= app.state.engine.near_cache_ttl_s + 0.1
