"""The status page's JSON (status.py), its history (history.py) and events (sampler.py, recent.py), in process."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from eagercache import fetcher, sampler, status
from eagercache.history import quantile
from eagercache.settings import load_settings

from .conftest import AppFactory

TOKEN = "status-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
WAIT_S = 10.0


@pytest.fixture
def store_url(local_store_url: str) -> str:
    """Memory and a real Redis (the cluster's listing is the admin API's, tested there)."""
    return local_store_url


class Upstream:
    """What the fetchers return, and whether they fail."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.failing: set[str] = set()


def fetchers(upstream: Upstream) -> list[Any]:
    @fetcher(ttl=0.2, timeout=2)
    async def ticking(k: str = "a") -> dict[str, object]:
        if k in upstream.failing:
            raise ConnectionError(f"secret-token-in-url for {k}")
        return {"k": k, "v": upstream.values.get(k, 0)}

    @fetcher(ttl=0.2, max_idle=0.3)
    async def idle(k: str = "a") -> str:
        return k

    @fetcher(ttl=60)
    async def plain(k: str = "a") -> str:
        return k

    return [ticking, idle, plain]


async def started(make_app: AppFactory, upstream: Upstream) -> tuple[Starlette, httpx.AsyncClient]:
    return await make_app(fetchers(upstream), settings=load_settings({"admin_token": TOKEN}, {}))


async def until(check: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Poll `check()` (the sampler ticks once a second) until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while True:
        if found := await check():
            return found
        assert asyncio.get_running_loop().time() < deadline, f"no {what} within {WAIT_S} s"
        await asyncio.sleep(0.1)  # the sampler's second: nothing to await


async def test_accept_chooses_the_page_or_json(make_app: AppFactory) -> None:
    _, client = await started(make_app, Upstream())
    page = await client.get("/", headers={"accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "accept" in page.headers["vary"]
    # Nothing inline: every script and style sheet comes from the package, by URL, under the policy.
    assert not re.search(r"<script(?![^>]*\bsrc=)", page.text) and "style=" not in page.text
    assert "<style" not in page.text and "http" not in page.text.replace('"https://', "")
    for accept in ("", "*/*", "application/json;q=0.5, text/html", "text/*, application/json;q=0.9"):
        assert (await client.get("/", headers={"accept": accept})).headers["content-type"].startswith("text/html")
    for accept in ("application/json", "application/*", "text/html;q=0.1, application/json"):
        answer = await client.get("/", headers={"accept": accept})
        assert answer.headers["content-type"] == "application/json", accept
        assert {"service", "fetchers"} <= answer.json().keys()


async def test_the_page_s_files_are_package_data(make_app: AppFactory) -> None:
    _, client = await started(make_app, Upstream())
    for name, kind in status.ASSETS.items():
        answer = await client.get(f"/status/static/{name}")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind)
        assert answer.content == (resources.files("eagercache") / "static" / name).read_bytes()
    missing = await client.get("/status/static/nothing.js")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"


def test_a_built_wheel_holds_the_page(tmp_path: Path) -> None:
    """What a non-editable install gets: the wheel setuptools builds from pyproject.toml (from a copy of the
    sources, so the build leaves nothing in the working tree; `pip wheel .` gives the same files)."""
    root = Path(__file__).resolve().parent.parent
    source = tmp_path / "source"
    shutil.copytree(root / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    # The project's own configuration, but for `license = "..."` (an SPDX string, setuptools >= 77): the build
    # runs offline with the setuptools installed here, which may be older; package data is configured the same.
    config = (root / "pyproject.toml").read_text()
    (source / "pyproject.toml").write_text(re.sub(r"(?m)^license = .*$", "", config))
    shutil.copy(root / "README.md", source / "README.md")
    # build_py: the step of a wheel's build that copies the packages and their package data.
    build = tmp_path / "build"
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", "from setuptools import setup; setup()", "build_py", "-d", str(build)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    names = {str(p.relative_to(build)) for p in build.rglob("*")}
    assert {f"eagercache/static/{name}" for name in (*status.ASSETS, "status.html")} <= names


async def test_status_has_the_service_and_each_fetcher_s_rates(make_app: AppFactory) -> None:
    _, client = await started(make_app, Upstream())
    for k in ("a", "b"):
        assert (await client.get(f"/data/ticking?k={k}")).status_code == 200

    async def refreshing() -> dict[str, Any] | None:
        doc: dict[str, Any] = (await client.get("/status")).json()
        ticking = next(f for f in doc["fetchers"] if f["name"] == "ticking")
        return doc if ticking["refreshes_per_s"] and ticking["refresh_lag_s"]["p99"] is not None else None

    doc = await until(refreshing, "refreshes counted")
    service = doc["service"]
    assert service["ready"] is True and service["not_ready_because"] == []
    assert service["refresh_mode"] in ("events+schedule", "schedule")
    assert service["processes"]["workers"] == 1 and service["admin_api"] is True
    assert "password" not in str(service["store"])
    ticking = next(f for f in doc["fetchers"] if f["name"] == "ticking")
    assert ticking["options"]["ttl"] == 0.2 and ticking["options"]["max_entries"] == 100_000
    assert ticking["entries"] == 2 and ticking["stale_entries"] == 0 and ticking["stale_checked"] == 2
    # Two entries refreshed every 0.2 s: about 10 refreshes a second (a loaded machine may fall behind).
    assert 2 <= ticking["refreshes_per_s"] <= 15
    assert ticking["errors_per_s"] == 0
    assert 0 <= ticking["fetch_s"]["p50"] <= ticking["fetch_s"]["p99"]
    history = (await client.get("/status/history?seconds=60&fetcher=ticking")).json()
    assert history["points"] and sum(p["refreshes"] for p in history["points"]) > 0


async def test_entries_are_listed_searched_and_paged(make_app: AppFactory) -> None:
    _, client = await started(make_app, Upstream())
    keys = [f"key{i:02d}" for i in range(12)]
    for k in keys:
        assert (await client.get(f"/data/ticking?k={k}")).status_code == 200
    listed = (await client.get("/status/entries?fetcher=ticking&q=KEY03")).json()
    assert [e["query"] for e in listed["entries"]] == ["k=key03"]
    entry = listed["entries"][0]
    assert entry["state"] == "HIT" and entry["fetcher"] == "ticking" and entry["last_error"] is None
    # Pages of 5 by cursor: every entry once.
    seen: list[str] = []
    cursor = ""
    while True:
        page = (await client.get("/status/entries", params={"fetcher": "ticking", "limit": 5, "cursor": cursor})).json()
        seen += [e["query"] for e in page["entries"]]
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
    assert sorted(set(seen)) == sorted(f"k={k}" for k in keys)
    # Every fetcher: the other fetcher's entry too.
    assert (await client.get("/data/plain?k=z")).status_code == 200
    everything = (await client.get("/status/entries?limit=200")).json()
    assert {e["fetcher"] for e in everything["entries"]} == {"ticking", "plain"}


async def test_a_search_looks_at_a_bounded_number_of_entries(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 100,000 entries a search that matches nothing looks at SCAN_BUDGET of them per request and
    says where to go on; here the budget is made small instead of the store large."""
    monkeypatch.setattr(status, "SCAN_BUDGET", 10)
    monkeypatch.setattr(status, "SCAN_STEP", 5)
    _, client = await started(make_app, Upstream())
    for i in range(200):  # over Redis's listpack size (128): the schedule is scanned in steps
        assert (await client.get(f"/data/plain?k=n{i}")).status_code == 200
    requests, scanned, cursor = 0, 0, ""
    while True:
        page = (
            await client.get("/status/entries", params={"fetcher": "plain", "q": "absent", "cursor": cursor})
        ).json()
        requests += 1
        assert page["entries"] == []
        scanned += page["scanned"]
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
    assert scanned >= 200 and requests >= 2


@pytest.mark.parametrize(
    ("path", "status_code"),
    [
        ("/status/entries?limit=0", 400),
        ("/status/entries?limit=abc", 400),
        ("/status/entries?cursor=garbage", 400),
        ("/status/entries?cursor=0~9.x", 400),
        ("/status/entries?cursor=7~0", 400),
        ("/status/entries?fetcher=nope", 404),
        (f"/status/entries?q={'x' * 201}", 400),
        ("/status/events?after=-1", 400),
        ("/status/history?seconds=0", 400),
        ("/status/history?seconds=601", 400),
        ("/status/history?fetcher=nope", 404),
    ],
)
async def test_bad_input_is_a_problem(make_app: AppFactory, path: str, status_code: int) -> None:
    _, client = await started(make_app, Upstream())
    answer = await client.get(path)
    assert answer.status_code == status_code, answer.text
    assert answer.headers["content-type"] == "application/problem+json"


async def test_a_wrong_token_is_refused_and_errors_need_the_right_one(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sampler, "RECOVERED_AFTER_S", 2)
    upstream = Upstream()
    _, client = await started(make_app, upstream)
    assert (await client.get("/data/ticking?k=f")).status_code == 200
    upstream.failing.add("f")
    wrong = {"authorization": "Bearer wrong-token-123456", "accept": "application/json"}
    for path in ("/status", "/status/entries", "/status/events", "/status/history", "/"):
        refused = await client.get(path, headers=wrong)
        assert refused.status_code == 403 and refused.headers["content-type"] == "application/problem+json"

    async def stale_event() -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = (await client.get("/status/events", headers=AUTH)).json()["events"]
        return [e for e in events if e["kind"] == "stale" and e["error"]]

    [event] = await until(stale_event, "stale event with its error")
    assert event["entry"] == "ticking?k=f" and "secret-token-in-url" in event["error"]
    kinds = {e["kind"] for e in (await client.get("/status/events")).json()["events"]}
    assert {"failing", "stale"} <= kinds
    # Without the token: the same events and rows, never the fetcher's error text.
    anonymous = await client.get("/status/events")
    assert "secret-token-in-url" not in anonymous.text
    rows = (await client.get("/status/entries?fetcher=ticking")).json()["entries"]
    assert rows[0]["state"] == "STALE" and rows[0]["failures"] >= 1 and rows[0]["last_error"] is None
    with_token = (await client.get("/status/entries?fetcher=ticking", headers=AUTH)).json()["entries"]
    assert "secret-token-in-url" in with_token[0]["last_error"]
    # Once the upstream is back and stays so, the fetcher has recovered.
    upstream.failing.clear()

    async def recovered() -> bool:
        events = (await client.get("/status/events")).json()["events"]
        return any(e["kind"] == "recovered" and e["fetcher"] == "ticking" for e in events)

    await until(recovered, "recovered event")


async def test_idle_and_invalidated_removals_are_events(make_app: AppFactory) -> None:
    _, client = await started(make_app, Upstream())
    assert (await client.get("/data/idle?k=gone")).status_code == 200  # nobody reads it again: removed as idle
    assert (await client.get("/data/ticking?k=x")).status_code == 200
    assert (await client.delete("/admin/fetchers/ticking/entry?k=x", headers=AUTH)).status_code == 204

    async def both() -> list[dict[str, Any]] | None:
        events: list[dict[str, Any]] = (await client.get("/status/events")).json()["events"]
        kinds = {(e["kind"], e["entry"]) for e in events}
        return events if {("idle", "idle?k=gone"), ("removed", "ticking?k=x")} <= kinds else None

    events = await until(both, "idle and removed events")
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    later = (await client.get(f"/status/events?after={events[-1]['id']}")).json()
    assert later["events"] == [] or later["events"][0]["id"] > events[-1]["id"]


def test_quantiles_interpolate_within_buckets() -> None:
    bounds = (0.1, 0.5, 1.0, float("inf"))
    assert quantile(0.5, [0, 0, 0, 0], bounds) is None
    assert quantile(0.5, [10, 0, 0, 0], bounds) == pytest.approx(0.05)
    assert quantile(0.99, [0, 0, 0, 5], bounds) == 1.0  # in +Inf: the highest finite bound
    assert quantile(0.5, [5, 5, 0, 0], bounds) == pytest.approx(0.1)
    assert quantile(0.75, [5, 5, 0, 0], bounds) == pytest.approx(0.3)
