"""Targeted invalidation and refresh: by tag, by parameter values (indexed or scanned), on every store."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette

from eagercache import ConfigurationError, Result, fetcher, invalidate, load_settings, refresh
from eagercache.fetchers import Fetcher

from .conftest import AppFactory
from .helpers import Counter

TOKEN = "s3cret-token-for-tests"


def fetchers(calls: Counter, tags_of: dict[str, list[str]]) -> list[Any]:
    @fetcher(ttl=600, indexed=("city",))
    async def weather(city: str, days: int = 1) -> dict[str, Any]:
        calls.hit()
        return {"city": city, "days": days}

    async def profile(user: int) -> Result[dict[str, int]]:
        calls.hit()
        return Result({"user": user}, tags=tags_of.get(str(user), [f"user:{user}"]))

    async def orders(user: int) -> Result[list[int]]:
        calls.hit()
        return Result([user], tags=[f"user:{user}", "orders"])

    return [weather, profile, orders]


async def is_stored(app: Starlette, entry_id: str) -> bool:
    raw, _ = await app.state.store.get(entry_id)
    return raw is not None


async def fill(client: Any, *paths: str) -> None:
    for path in paths:
        assert (await client.get(path)).status_code == 200


async def test_invalidate_by_tag_takes_every_fetchers_entries_and_no_others(make_app: AppFactory) -> None:
    calls = Counter()
    app, client = await make_app(fetchers(calls, {}))
    await fill(client, "/data/profile?user=1", "/data/profile?user=2", "/data/orders?user=1", "/data/orders?user=2")
    assert await invalidate(app, tag="user:1") == 2
    assert not await is_stored(app, "profile?user=1")
    assert not await is_stored(app, "orders?user=1")
    assert await is_stored(app, "profile?user=2") and await is_stored(app, "orders?user=2")
    assert await invalidate(app, tag="user:1") == 0  # its index is empty now
    assert await invalidate(app, tag="orders") == 1
    again = await client.get("/data/profile?user=1")
    assert again.headers["x-cache"] == "MISS"


async def test_indexed_parameter_matches_whatever_the_other_parameters(make_app: AppFactory) -> None:
    calls = Counter()
    app, client = await make_app(fetchers(calls, {}))
    await fill(client, "/data/weather?city=Oslo", "/data/weather?city=Oslo&days=2", "/data/weather?city=Bergen&days=2")
    assert await invalidate(app, fetcher="weather", where={"city": "Oslo", "days": 2}) == 1  # index, then filter
    assert await is_stored(app, "weather?city=Oslo")
    assert await invalidate(app, fetcher="weather", where={"city": "Oslo"}) == 1
    assert not await is_stored(app, "weather?city=Oslo")
    assert await is_stored(app, "weather?city=Bergen&days=2")


async def test_parameters_without_an_index_are_matched_by_a_scan(make_app: AppFactory) -> None:
    calls = Counter()
    app, client = await make_app(fetchers(calls, {}))
    await fill(client, "/data/weather?city=Oslo", "/data/weather?city=Oslo&days=2", "/data/weather?city=Bergen")
    # days=1 is the default: the entries that left it out of their query have it too
    assert await invalidate(app, fetcher="weather", where={"days": "1"}) == 2
    assert await is_stored(app, "weather?city=Oslo&days=2")
    assert await invalidate(app, fetcher="weather") == 1  # no parameters: every entry of the fetcher


async def test_the_index_follows_a_results_tags(make_app: AppFactory) -> None:
    calls, tags_of = Counter(), {"7": ["old"]}
    app, client = await make_app(fetchers(calls, tags_of))
    await fill(client, "/data/profile?user=7")
    tags_of["7"] = ["new"]
    written = Counter()
    app.state.engine.on_write(written.hit)
    assert await refresh(app, tag="old") == 1
    await written.reach(2)  # made due, then stored with its new tag (not only fetched)
    refreshed = await app.state.engine.reread("profile?user=7")
    assert refreshed.cache == "HIT"  # refreshed, not removed
    assert await invalidate(app, tag="old") == 0  # the refresh took it out of the old tag's index
    assert await invalidate(app, tag="new") == 1


async def test_removal_by_any_path_leaves_the_tag_index(make_app: AppFactory) -> None:
    calls = Counter()
    app, client = await make_app(fetchers(calls, {}))
    await fill(client, "/data/profile?user=5")
    assert await app.state.engine.forget("profile?user=5", "profile")
    batches = [ids async for _, ids in app.state.store.tagged("user:5", 100)]
    assert batches == []


async def test_refresh_by_parameter_fetches_again_and_keeps_serving(make_app: AppFactory) -> None:
    calls = Counter()
    app, client = await make_app(fetchers(calls, {}))
    await fill(client, "/data/weather?city=Oslo", "/data/weather?city=Oslo&days=3", "/data/weather?city=Rome")
    assert await refresh(app, fetcher="weather", where={"city": "Oslo"}) == 2
    await calls.reach(5)  # three cold fetches, then the two refreshed
    answer = await client.get("/data/weather?city=Oslo&days=3")
    assert answer.status_code == 200


async def test_bad_targets_are_clear_errors(make_app: AppFactory, store_url: str) -> None:
    calls = Counter()
    settings = load_settings({"admin_token": TOKEN, "redis_url": store_url}, {})
    _, client = await make_app(fetchers(calls, {}), settings=settings)
    auth = {"authorization": f"Bearer {TOKEN}"}
    unknown = await client.delete("/admin/fetchers/weather/entries?planet=Mars", headers=auth)
    assert unknown.status_code == 400
    assert [e["parameter"] for e in unknown.json()["errors"]] == ["planet"]
    bad = await client.delete("/admin/fetchers/weather/entries?days=soon", headers=auth)
    assert bad.status_code == 400
    assert (await client.delete("/admin/fetchers/nope/entries", headers=auth)).status_code == 404
    assert (await client.delete("/admin/tags/user:1")).status_code == 401


async def test_admin_api_invalidates_and_refreshes(make_app: AppFactory, store_url: str) -> None:
    calls = Counter()
    settings = load_settings({"admin_token": TOKEN, "redis_url": store_url}, {})
    app, client = await make_app(fetchers(calls, {}), settings=settings)
    auth = {"authorization": f"Bearer {TOKEN}"}
    await fill(client, "/data/weather?city=Oslo", "/data/weather?city=Bergen", "/data/orders?user=3")
    answer = await client.delete("/admin/fetchers/weather/entries?city=Oslo", headers=auth)
    assert answer.json() == {"removed": 1}
    answer = await client.post("/admin/tags/user:3/refresh", headers=auth)
    assert answer.json() == {"refreshing": 1}
    await calls.reach(4)
    answer = await client.post("/admin/fetchers/weather/entries/refresh?city=Bergen", headers=auth)
    assert answer.json() == {"refreshing": 1}
    await calls.reach(5)
    answer = await client.delete("/admin/tags/user:3", headers=auth)
    assert answer.json() == {"removed": 1}
    assert not await is_stored(app, "orders?user=3")


async def test_an_entry_written_by_one_replica_is_invalidated_by_another(make_app: AppFactory, store_url: str) -> None:
    if store_url.startswith("memory"):
        pytest.skip("memory:// is one process's store")
    calls = Counter()
    one, one_client = await make_app(fetchers(calls, {}))
    other, _ = await make_app(fetchers(calls, {}))
    await fill(one_client, "/data/orders?user=9", "/data/weather?city=Oslo")
    assert await invalidate(other, tag="user:9") == 1
    assert await invalidate(other, fetcher="weather", where={"city": "Oslo"}) == 1
    assert not await is_stored(one, "orders?user=9")
    assert not await is_stored(one, "weather?city=Oslo")


@pytest.mark.parametrize("tags", ["one-string", ["x" * 101], [""], [f"t{i}" for i in range(17)], [1]])
async def test_tags_that_cannot_be_kept_are_the_fetchers_error(make_app: AppFactory, tags: Any) -> None:
    async def tagged() -> Result[str]:
        return Result("d", tags=tags)

    app, client = await make_app([tagged])
    assert (await client.get("/data/tagged")).status_code == 502
    assert not await is_stored(app, "tagged?")


def test_indexed_names_a_parameter() -> None:
    async def weather(city: str) -> str:
        return city

    with pytest.raises(ConfigurationError, match="'town', which is not one of its parameters"):
        Fetcher.from_callable(weather, overrides={"indexed": ["town"]})
    with pytest.raises(ConfigurationError, match="indexed must be a list"):
        Fetcher.from_callable(weather, overrides={"indexed": "city"})
