"""Conditional upstream fetches: the example `catalogue` fetcher against the example upstream, on a socket."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from eagercache.fetchers import Fetcher
from eagercache.item import decode_item
from eagercache_examples import conditional, upstream

from .conftest import AppFactory
from .helpers import Counter
from .watching import serving

pytestmark = pytest.mark.parametrize("store_url", ["redis"], indirect=True)


@pytest.fixture
async def upstream_url(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    monkeypatch.setattr(upstream, "MAX_AGE_S", 1)  # the entry's ttl, taken from max-age: refreshes every second
    monkeypatch.setattr(upstream, "stats", upstream.Stats())
    monkeypatch.setattr(upstream, "sections", {})
    async with serving(upstream.app) as url:
        monkeypatch.setattr(conditional, "UPSTREAM_URL", url)
        yield url
        await conditional.close()


async def test_unchanged_upstream_sends_its_body_once(make_app: AppFactory, upstream_url: str) -> None:
    catalogue = Fetcher.from_callable(conditional.catalogue, overrides={"jitter": 0})
    app, client = await make_app([catalogue])
    writes = Counter()
    app.state.engine.on_write(writes.hit)
    first = await client.get("/data/catalogue?section=books")
    assert first.status_code == 200
    body_size = len(upstream.sections["books"].body)
    assert upstream.stats.body_bytes == body_size

    await writes.reach(3)  # the cold write, then two refreshes, each a conditional request
    assert upstream.stats.requests >= 3
    assert upstream.stats.not_modified == upstream.stats.requests - 1
    assert upstream.stats.body_bytes == body_size  # the refreshes moved no body at all
    refreshed = decode_item((await app.state.engine.reread("catalogue?")).entry.body)
    cold = decode_item(first.content)
    assert refreshed.data == cold.data
    assert refreshed.last_modified == cold.last_modified
    assert refreshed.last_retrieved > cold.last_retrieved
    metrics = app.state.metrics
    assert (
        metrics.sample("eagercache_fetches_total", fetcher="catalogue", cause="schedule", outcome="not_modified")
        + (metrics.sample("eagercache_fetches_total", fetcher="catalogue", cause="event", outcome="not_modified"))
        >= 2
    )

    # A change upstream: the next refresh brings the new body (once), and the entry's last_modified moves.
    async with httpx.AsyncClient() as http:
        assert (await http.post(f"{upstream_url}/catalogue/books")).json()["version"] == 2
    new_size = len(upstream.sections["books"].body)
    seen = writes.count
    await writes.reach(seen + 2)  # one refresh may have been in flight before the change
    changed = decode_item((await app.state.engine.reread("catalogue?")).entry.body)
    assert changed.data["items"][0]["version"] == 2
    assert changed.last_modified > cold.last_modified
    assert upstream.stats.body_bytes == body_size + new_size
