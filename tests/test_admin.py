"""The admin API: bearer auth, listing, forced refresh, invalidation."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from eagercache import ConfigurationError, fetcher, load_settings

from .conftest import AppFactory
from .helpers import Counter

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
calls = Counter()


@fetcher(ttl=60)
async def item(k: str = "a") -> dict[str, int | str]:
    calls.hit()
    return {"k": k, "call": calls.count}


async def admin_app(make_app: AppFactory, store_url: str) -> httpx.AsyncClient:
    settings = load_settings({"admin_token": TOKEN, "redis_url": store_url}, {})
    _, client = await make_app([item], settings=settings)
    return client


async def test_admin_is_off_without_a_token(make_app: AppFactory) -> None:
    _, client = await make_app([item])
    answer = await client.get("/admin/fetchers", headers=AUTH)
    assert answer.status_code == 404


async def test_bearer_token_is_required(make_app: AppFactory, store_url: str) -> None:
    client = await admin_app(make_app, store_url)
    missing = await client.get("/admin/fetchers")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.headers["content-type"] == "application/problem+json"
    for wrong in ["Bearer nope", f"Bearer {TOKEN}x", f"Basic {TOKEN}"]:
        answer = await client.get("/admin/fetchers", headers={"Authorization": wrong})
        assert answer.status_code in (401, 403), wrong
    assert (await client.get("/admin/fetchers", headers={"Authorization": "Bearer nope"})).status_code == 403
    right = await client.get("/admin/fetchers", headers=AUTH)
    assert right.status_code == 200
    assert right.json()["fetchers"][0]["name"] == "item"


async def test_entries_are_listed_page_by_page(make_app: AppFactory, store_url: str) -> None:
    client = await admin_app(make_app, store_url)
    for i in range(7):
        assert (await client.get(f"/data/item?k={i}")).status_code == 200
    seen: set[str] = set()
    cursor: int | None = 0
    pages = 0
    while cursor is not None and pages < 50:
        page = (await client.get(f"/admin/fetchers/item/entries?limit=3&cursor={cursor}", headers=AUTH)).json()
        for entry in page["entries"]:
            assert entry["stale"] is False
            assert 0 <= entry["age_s"] < 60
            assert 0 < entry["next_refresh_in_s"] <= 60
            seen.add(entry["query"])
        cursor, pages = page["next_cursor"], pages + 1
    assert seen == {f"k={i}" for i in range(7)}
    counts = (await client.get("/admin/fetchers", headers=AUTH)).json()["fetchers"][0]
    assert counts["entries"] == 7
    bad = await client.get("/admin/fetchers/item/entries?limit=0", headers=AUTH)
    assert bad.status_code == 400
    unknown = await client.get("/admin/fetchers/nope/entries", headers=AUTH)
    assert unknown.status_code == 404


async def test_stale_entries_show_their_last_error(make_app: AppFactory, store_url: str) -> None:
    failing = {"on": False}

    @fetcher(ttl=0.2, jitter=0)
    async def flaky() -> str:
        if failing["on"]:
            raise ConnectionError("upstream refused: 10.0.0.1:443")
        return "ok"

    settings = load_settings({"admin_token": TOKEN, "redis_url": store_url}, {})
    _, client = await make_app([flaky], settings=settings)
    await client.get("/data/flaky")
    failing["on"] = True
    async with asyncio.timeout(5):
        while True:
            page = (await client.get("/admin/fetchers/flaky/entries", headers=AUTH)).json()
            if page["entries"] and page["entries"][0]["stale"]:
                break
            await asyncio.sleep(0.05)  # the refresh fails in the background
    entry = page["entries"][0]
    assert entry["failures"] >= 1
    assert "ConnectionError" in entry["last_error"] and "upstream refused" in entry["last_error"]


async def test_forced_refresh_fetches_now(make_app: AppFactory, store_url: str) -> None:
    client = await admin_app(make_app, store_url)
    first = (await client.get("/data/item?k=x")).json()
    forced = await client.post("/admin/fetchers/item/refresh?k=x", headers=AUTH)
    assert forced.status_code == 200
    assert forced.json()["data"]["call"] == first["data"]["call"] + 1
    after = await client.get("/data/item?k=x")
    assert (after.headers["x-cache"], after.json()["data"]) == ("HIT", forced.json()["data"])
    absent = await client.post("/admin/fetchers/item/refresh?k=never-read", headers=AUTH)
    assert absent.status_code == 404
    invalid = await client.post("/admin/fetchers/item/refresh?zzz=1", headers=AUTH)
    assert invalid.status_code == 400


async def test_invalidate_one_and_all(make_app: AppFactory, store_url: str) -> None:
    client = await admin_app(make_app, store_url)
    for k in "abc":
        await client.get(f"/data/item?k={k}")
    gone = await client.delete("/admin/fetchers/item/entry?k=a", headers=AUTH)
    assert gone.status_code == 204
    assert (await client.get("/data/item?k=a")).headers["x-cache"] == "MISS"
    assert (await client.delete("/admin/fetchers/item/entry?k=zz", headers=AUTH)).status_code == 404
    everything = await client.delete("/admin/fetchers/item/entries", headers=AUTH)
    assert everything.json() == {"removed": 3}
    for k in "abc":
        assert (await client.get(f"/data/item?k={k}")).headers["x-cache"] == "MISS"
    listing = (await client.get("/admin/fetchers", headers=AUTH)).json()
    assert listing["fetchers"][0]["entries"] == 3


async def test_listing_and_invalidating_stay_within_the_fetcher(make_app: AppFactory, store_url: str) -> None:
    @fetcher(ttl=60, name="item2")
    async def other(k: str = "a") -> str:
        return k

    settings = load_settings({"admin_token": TOKEN, "redis_url": store_url}, {})
    _, client = await make_app([item, other], settings=settings)
    await client.get("/data/item?k=1")
    await client.get("/data/item2?k=1")
    page = (await client.get("/admin/fetchers/item/entries", headers=AUTH)).json()
    assert [e["entry"] for e in page["entries"]] == ["item?k=1"]
    assert (await client.delete("/admin/fetchers/item/entries", headers=AUTH)).json() == {"removed": 1}
    assert (await client.get("/data/item2?k=1")).headers["x-cache"] == "HIT"


def test_a_short_or_empty_admin_token_is_refused() -> None:
    for token in ["", "short", "sixteen chars ok"]:
        with pytest.raises(ConfigurationError, match="admin_token must be at least 16 characters"):
            load_settings({"admin_token": token}, {})
