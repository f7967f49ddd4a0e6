"""HTTP semantics of /data: validators, conditional requests, caching headers, HEAD, gzip."""

from __future__ import annotations

import asyncio
import gzip
from email.utils import parsedate_to_datetime
from typing import Any

from eagercache import fetcher

from .conftest import AppFactory
from .helpers import Counter


def big() -> dict[str, Any]:
    return {"rows": [{"id": i, "name": f"row {i}", "tags": ["a", "b"]} for i in range(100)]}


async def test_validators_and_caching_headers(make_app: AppFactory) -> None:
    @fetcher(ttl=30, jitter=0, max_stale=600)
    async def rates(base: str = "EUR") -> dict[str, Any]:
        return {"base": base}

    _, client = await make_app([rates])
    cold = await client.get("/data/rates")
    etag = cold.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and not etag.startswith("W/")
    item = cold.json()
    assert _iso(cold.headers["last-modified"]) == item["last_modified"][:19]
    # max-age counts from retrieval (RFC 9111, 4.2.3 adds Age): the refresh is ttl after it
    assert cold.headers["cache-control"] == "max-age=30, stale-while-revalidate=30, stale-if-error=600"
    assert cold.headers["age"] == "0"
    assert cold.headers["vary"] == "Accept-Encoding"
    warm = await client.get("/data/rates?base=EUR")
    assert warm.headers["etag"] == etag  # the same data, the same tag
    assert item["last_modified"][:19] == _iso(warm.headers["last-modified"])
    other = await client.get("/data/rates?base=USD")
    assert other.headers["etag"] != etag


def _iso(http_date: str) -> str:
    return parsedate_to_datetime(http_date).strftime("%Y-%m-%dT%H:%M:%S")


async def test_etag_is_the_same_on_every_replica(make_app: AppFactory) -> None:
    async def same() -> list[int]:
        return [1, 2, 3]

    _, one = await make_app([same], namespace="replica-a:")
    _, two = await make_app([same], namespace="replica-b:")
    assert (await one.get("/data/same")).headers["etag"] == (await two.get("/data/same")).headers["etag"]


async def test_if_none_match_gives_304(make_app: AppFactory) -> None:
    async def thing() -> str:
        return "x"

    _, client = await make_app([thing])
    etag = (await client.get("/data/thing")).headers["etag"]
    for header in [etag, f"W/{etag}", f'"other", {etag}', "*"]:
        answer = await client.get("/data/thing", headers={"If-None-Match": header})
        assert answer.status_code == 304, header
        assert answer.content == b""
        assert answer.headers["etag"] == etag
        assert "cache-control" in answer.headers and "last-modified" in answer.headers
    changed = await client.get("/data/thing", headers={"If-None-Match": '"nope", W/"other"'})
    assert changed.status_code == 200


async def test_if_modified_since_gives_304(make_app: AppFactory) -> None:
    async def thing() -> str:
        return "x"

    _, client = await make_app([thing])
    last_modified = (await client.get("/data/thing")).headers["last-modified"]
    same = await client.get("/data/thing", headers={"If-Modified-Since": last_modified})
    assert (same.status_code, same.content) == (304, b"")
    older = await client.get("/data/thing", headers={"If-Modified-Since": "Sat, 01 Jan 2000 00:00:00 GMT"})
    assert older.status_code == 200
    garbage = await client.get("/data/thing", headers={"If-Modified-Since": "yesterday"})
    assert garbage.status_code == 200
    # If-None-Match wins over If-Modified-Since (RFC 9110, 13.2.2)
    both = await client.get("/data/thing", headers={"If-None-Match": '"nope"', "If-Modified-Since": last_modified})
    assert both.status_code == 200


async def test_head_is_get_without_a_body(make_app: AppFactory) -> None:
    async def thing() -> str:
        return "x"

    _, client = await make_app([thing])
    get = await client.get("/data/thing")
    head = await client.head("/data/thing")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["etag"] == get.headers["etag"]
    assert head.headers["content-length"] == str(len(get.content))
    assert head.headers["x-cache"] == "HIT"


async def test_other_methods_are_405(make_app: AppFactory) -> None:
    async def thing() -> str:
        return "x"

    _, client = await make_app([thing])
    for method in ["POST", "PUT", "DELETE", "PATCH"]:
        answer = await client.request(method, "/data/thing")
        assert answer.status_code == 405, method
        assert answer.headers["content-type"] == "application/problem+json"
        assert set(answer.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}


async def test_gzip_above_the_threshold(make_app: AppFactory) -> None:
    async def large() -> dict[str, Any]:
        return big()

    async def small() -> str:
        return "x"

    _, client = await make_app([large, small])
    plain = await client.get("/data/large", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    zipped = await client.get("/data/large", headers={"Accept-Encoding": "br;q=1, gzip;q=0.5"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.json() == plain.json()  # httpx decodes it
    assert int(zipped.headers["content-length"]) < len(plain.content) / 3
    assert zipped.headers["etag"] != plain.headers["etag"]  # another representation, another strong tag
    refused = await client.get("/data/large", headers={"Accept-Encoding": "gzip;q=0"})
    assert "content-encoding" not in refused.headers
    tiny = await client.get("/data/small", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in tiny.headers
    again = await client.get(
        "/data/large", headers={"Accept-Encoding": "gzip", "If-None-Match": zipped.headers["etag"]}
    )
    assert again.status_code == 304


async def test_gzip_bytes_are_valid_gzip(make_app: AppFactory) -> None:
    async def large() -> dict[str, Any]:
        return big()

    _, client = await make_app([large])
    async with client.stream("GET", "/data/large", headers={"Accept-Encoding": "gzip"}) as answer:
        raw = b"".join([chunk async for chunk in answer.aiter_raw()])
    assert gzip.decompress(raw).startswith(b'{"data":{"rows":')


async def test_client_no_cache_does_not_force_a_fetch(make_app: AppFactory) -> None:
    calls = Counter()

    async def counted() -> int:
        calls.hit()
        return calls.count

    _, client = await make_app([counted])
    await client.get("/data/counted")
    for header in ["no-cache", "no-store", "max-age=0"]:
        answer = await client.get("/data/counted", headers={"Cache-Control": header, "Pragma": "no-cache"})
        assert answer.headers["x-cache"] == "HIT"
    assert calls.count == 1


async def test_stale_answers_have_max_age_0(make_app: AppFactory) -> None:
    calls = Counter()

    @fetcher(ttl=0.2, jitter=0)
    async def failing() -> int:
        calls.hit()
        if calls.count > 1:
            raise RuntimeError("down")
        return 1

    _, client = await make_app([failing])
    await client.get("/data/failing")
    await calls.reach(2)
    for _ in range(200):
        answer = await client.get("/data/failing")
        if answer.headers["x-cache"] == "STALE":
            break
        await asyncio.sleep(0.01)  # a reader's pace, while the failure is recorded
    assert answer.headers["x-cache"] == "STALE"
    assert answer.headers["cache-control"].startswith("max-age=0, ")
