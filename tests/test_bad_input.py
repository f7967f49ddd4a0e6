"""Bad input gets a precise problem document, is never cached, and never reaches the fetcher."""

from __future__ import annotations

from typing import Any

import pytest

from eagercache import fetcher

from .conftest import AppFactory
from .helpers import Counter

calls = Counter()


async def echo(s: str = "", n: int = 0) -> dict[str, Any]:
    calls.hit()
    return {"s": s, "n": n}


@pytest.mark.parametrize(
    ("query", "status", "slug", "named"),
    [
        ("s=" + "x" * 5000, 414, "query-too-long", None),
        ("s=" + "%C3%BC" * 600, 400, "invalid-parameters", "(query)"),
        ("n=1&n=2", 400, "invalid-parameters", "n"),
        ("n=abc", 400, "invalid-parameters", "n"),
        ("zzz=1", 400, "invalid-parameters", "zzz"),
        ("s=%FF%FE", 400, "invalid-parameters", "s"),
        ("s=50%", 400, "invalid-parameters", "s"),
        ("s=%G1", 400, "invalid-parameters", "s"),
    ],
)
async def test_bad_queries(make_app: AppFactory, query: str, status: int, slug: str, named: str | None) -> None:
    _, client = await make_app([echo])
    before = calls.count
    answer = await client.get(f"/data/echo?{query}")
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/problem+json"
    doc = answer.json()
    assert doc["type"] == f"urn:eagercache:problem:{slug}"
    assert doc["status"] == status
    if named is not None:
        assert [e["parameter"] for e in doc["errors"]] == [named]
    assert calls.count == before  # never reached the fetcher
    again = await client.get(f"/data/echo?{query}")
    assert again.status_code == status  # and nothing was cached


async def test_unknown_parameters_can_be_ignored_per_fetcher(make_app: AppFactory) -> None:
    @fetcher(ignore_unknown=True)
    async def lenient(s: str = "") -> str:
        return s

    _, client = await make_app([lenient])
    first = await client.get("/data/lenient?s=a&utm_source=x")
    second = await client.get("/data/lenient?_=123&s=a")
    assert (first.status_code, first.json()["data"]) == (200, "a")
    assert second.headers["x-cache"] == "HIT"  # ignored parameters are not part of the entry
    assert (await client.get("/data/lenient?s=%ZZ")).status_code == 400  # still well-formed or refused


@pytest.mark.parametrize(
    "path", ["/data/..%2F..%2Fetc%2Fpasswd", "/data/../admin", "/data/echo%00", "/data/%2e%2e", "/data/e%20cho"]
)
async def test_path_tricks_are_unknown_fetchers(make_app: AppFactory, path: str) -> None:
    _, client = await make_app([echo])
    answer = await client.get(path)
    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/problem+json"
