"""The fetcher decides (results.py): its own ttl, answered but not stored, keep the stored value, not modified."""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec
import pytest
from starlette.applications import Starlette

from eagercache import ConfigurationError, Keep, NotModified, Previous, Result, fetcher
from eagercache.fetchers import Fetcher
from eagercache.item import Entry, Meta, parse_header

from .conftest import AppFactory
from .helpers import Counter


async def stored(app: Starlette, entry_id: str) -> Entry | None:
    raw, _ = await app.state.store.get(entry_id)
    return None if raw is None else Entry.parse(raw)


def refreshes_of(app: Starlette) -> Counter:
    """Counts the entries the app stores (cold writes and refreshes)."""
    writes = Counter()
    app.state.engine.on_write(writes.hit)
    return writes


async def test_result_ttl_sets_the_next_refresh(make_app: AppFactory) -> None:
    @fetcher(ttl=600, max_idle=3600)
    async def quote(max_age: float = 5) -> Result[str]:
        return Result("q", ttl=max_age)

    app, client = await make_app([quote])
    assert (await client.get("/data/quote")).json()["data"] == "q"
    entry = await stored(app, "quote?")
    assert entry is not None
    assert entry.due_ms - entry.last_retrieved_ms == 5_000
    # A ttl past max_idle is cut to it: the refresh that would find the entry idle must still come.
    await client.get("/data/quote?max_age=99999")
    entry = await stored(app, "quote?max_age=99999.0")
    assert entry is not None
    assert entry.due_ms - entry.last_retrieved_ms == 3_600_000


async def test_result_not_stored_answers_each_reader_with_a_fetch(make_app: AppFactory) -> None:
    calls = Counter()

    async def partial() -> Result[dict[str, int]]:
        calls.hit()
        return Result({"call": calls.count}, store=False)

    app, client = await make_app([partial])
    first = await client.get("/data/partial")
    second = await client.get("/data/partial")
    assert (first.status_code, first.headers["x-cache"], first.json()["data"]) == (200, "MISS", {"call": 1})
    assert second.json()["data"] == {"call": 2}
    assert await stored(app, "partial?") is None


async def test_keep_reschedules_without_touching_the_stored_value(make_app: AppFactory) -> None:
    calls = Counter()

    @fetcher(ttl=0.2, jitter=0)
    async def flaky() -> Any:
        calls.hit()
        return {"full": True} if calls.count == 1 else Keep()

    app, client = await make_app([flaky])
    writes = refreshes_of(app)
    first = await client.get("/data/flaky")
    before = await stored(app, "flaky?")
    await writes.reach(3)  # the cold write, then two kept refreshes
    after = await stored(app, "flaky?")
    assert before is not None and after is not None
    assert after.body == before.body == first.content  # neither retrieved nor modified
    assert after.due_ms > before.due_ms
    metrics = app.state.metrics
    kept = sum(
        metrics.sample("eagercache_fetches_total", fetcher="flaky", cause=cause, outcome="kept")
        for cause in ("schedule", "event")
    )
    assert kept >= 2
    assert metrics.sample("eagercache_data_changes_total", fetcher="flaky") == 0
    answer = await client.get("/data/flaky")
    assert (answer.headers["x-cache"], answer.content) == ("HIT", first.content)


async def test_keep_clears_a_failing_entrys_stale_marker(make_app: AppFactory) -> None:
    calls = Counter()

    @fetcher(ttl=0.2, jitter=0)
    async def recovering() -> Any:
        calls.hit()
        if calls.count == 1:
            return "data"
        if calls.count == 2:
            raise ConnectionError("upstream down")
        return Keep()

    app, client = await make_app([recovering])
    writes = refreshes_of(app)
    await client.get("/data/recovering")
    await writes.reach(2)  # the cold write, then a kept refresh after the failure
    _, stale = await app.state.store.get("recovering?")
    assert stale is None
    assert (await client.get("/data/recovering")).headers["x-cache"] == "HIT"


@pytest.mark.parametrize("answer", [Keep(), NotModified()])
async def test_keep_or_not_modified_without_a_stored_value_is_the_fetchers_error(
    make_app: AppFactory, answer: Any
) -> None:
    async def confused() -> Any:
        return answer

    app, client = await make_app([confused])
    reply = await client.get("/data/confused")
    assert reply.status_code == 502
    assert reply.headers["content-type"] == "application/problem+json"
    assert await stored(app, "confused?") is None


async def test_not_modified_moves_last_retrieved_and_keeps_validators(make_app: AppFactory) -> None:
    seen: list[Previous | None] = []
    refreshed = Counter()

    @fetcher(ttl=0.2, jitter=0)
    async def conditional(previous: Previous | None) -> Any:
        seen.append(previous)
        if previous is None:
            return Result({"v": 1}, validators={"etag": '"abc"', "last-modified": "Wed, 21 Oct 2026 07:28:00 GMT"})
        refreshed.hit()
        return NotModified()

    app, client = await make_app([conditional])
    first = (await client.get("/data/conditional")).json()
    before = await stored(app, "conditional?")
    await refreshed.reach(2)
    await refreshes_of(app).reach(1)  # the second not-modified refresh has been written
    after = await stored(app, "conditional?")
    assert before is not None and after is not None
    later = (await app.state.engine.reread("conditional?")).entry
    assert later.etag == before.etag
    assert later.last_modified_ms == before.last_modified_ms
    assert later.last_retrieved_ms > before.last_retrieved_ms
    body = msgspec_decode(later.body)
    assert body["data"] == first["data"] == {"v": 1}
    assert body["last_modified"] == first["last_modified"]
    assert body["last_retrieved"] != first["last_retrieved"]
    assert seen[0] is None
    previous = seen[1]
    assert previous is not None
    assert dict(previous.validators) == {"etag": '"abc"', "last-modified": "Wed, 21 Oct 2026 07:28:00 GMT"}
    assert previous.etag == before.etag
    assert dict(Meta.decode(after.meta).validators) == dict(previous.validators)  # kept for the next one


async def test_long_validators_reach_the_next_refresh_whole(make_app: AppFactory) -> None:
    """The header a claim reads is cut at its newline, not at a byte count: 400 bytes of validators arrive."""
    token = "x" * 400
    seen: list[Previous | None] = []
    refreshed = Counter()

    @fetcher(ttl=0.2, jitter=0)
    async def big(previous: Previous | None) -> Result[str]:
        seen.append(previous)
        if previous is not None:
            refreshed.hit()
        return Result("d", validators={"token": token})

    _, client = await make_app([big])
    assert (await client.get("/data/big")).status_code == 200
    await refreshed.reach(1)
    previous = seen[-1]
    assert previous is not None
    assert dict(previous.validators) == {"token": token}


@pytest.mark.parametrize(
    "returned",
    [
        Result("d", ttl=0),
        Result("d", ttl=-1),
        Result("d", ttl=math.nan),
        Result("d", ttl=math.inf),
        Result("d", ttl="5"),  # type: ignore[arg-type]
        Result("d", ttl=True),
        Result("d", store="no"),  # type: ignore[arg-type]
        Result("d", validators={"etag": 1}),  # type: ignore[dict-item]
        Result("d", validators={"etag": "x" * 600}),
        Result(object()),
    ],
    # Stable across processes (pytest-xdist compares the ids its workers collect): no object addresses.
    ids=lambda returned: re.sub(r" at 0x[0-9a-f]+", "", repr(returned))[:80],
)
async def test_a_result_that_cannot_be_kept_is_the_fetchers_error(make_app: AppFactory, returned: Any) -> None:
    async def odd() -> Any:
        return returned

    app, client = await make_app([odd])
    reply = await client.get("/data/odd")
    assert reply.status_code == 502
    assert reply.json()["type"] == "urn:eagercache:problem:fetch-failed"
    assert "x" * 100 not in reply.text  # the values stay in the log, not in the answer
    assert await stored(app, "odd?") is None


async def test_previous_is_not_a_query_parameter(make_app: AppFactory) -> None:
    async def cond(city: str, previous: Previous | None = None) -> str:
        return city

    _, client = await make_app([cond])
    assert (await client.get("/data/cond?city=Oslo")).json()["data"] == "Oslo"
    reply = await client.get("/data/cond?city=Oslo&previous=x")
    assert reply.status_code == 400
    assert [e["parameter"] for e in reply.json()["errors"]] == ["previous"]
    spec = (await client.get("/openapi.json")).json()
    names = [p["name"] for p in spec["paths"]["/data/cond"]["get"]["parameters"]]
    assert "previous" not in names and "city" in names


@pytest.mark.parametrize("annotation", ["Previous", "Previous | int | None"])
def test_previous_must_be_optional(annotation: str) -> None:
    namespace: dict[str, Any] = {"Previous": Previous}
    exec(f"async def f(previous: {annotation}) -> str:\n    return ''", namespace)
    with pytest.raises(ConfigurationError, match=r"Previous \| None"):
        Fetcher.from_callable(namespace["f"])


def test_meta_round_trips_through_the_header() -> None:
    meta = Meta({"etag": '"a b"', "note": "new\nline"}).encode()
    assert b" " not in meta and b"\n" not in meta
    entry = Entry("tag", 1, 2, 3, b'{"data":1}', meta)
    parsed = parse_header(entry.encode())
    assert parsed is not None
    assert Meta.decode(parsed.meta).validators == {"etag": '"a b"', "note": "new\nline"}
    assert Entry.parse(entry.encode()) == entry
    assert Meta.decode(meta[:5]) == Meta()  # a header cut short has no validators, and no error


def msgspec_decode(body: bytes) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.json.decode(body)
    return decoded


async def test_unstored_results_of_one_millisecond_are_each_answered(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two fetches answered but not stored, retrieved in the same millisecond, are two versions: the second
    reader gets its own data, not the first one's prepared answer."""
    calls = Counter()

    async def unstored() -> Result[int]:
        calls.hit()
        return Result(calls.count, store=False)

    app, client = await make_app([unstored])

    class OneMillisecond:
        def now_ms(self) -> int:
            return 1_800_000_000_000

    monkeypatch.setattr(app.state.engine, "clock", OneMillisecond())
    assert [(await client.get("/data/unstored")).json()["data"] for _ in range(2)] == [1, 2]
