"""The status page in a real browser: headless Chromium against a real `eagercache serve` process.

The fetchers (tests.watch_fetchers) serve what the test puts in Redis: `flaky` is refreshed every 0.2 s,
and fails while `watchtest:fail:<k>` exists. Each test watches the page's own console: any error there
(a script error, a blocked resource, a refused Content-Security-Policy) fails it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest
import redis

from .browser import chromium_page, require_chromium
from .servers import ServeProcess

if TYPE_CHECKING:
    from playwright.sync_api import Page

TOKEN = "status-page-token-0123456789"
FETCHERS = ("--fetchers", "tests.watch_fetchers:flaky", "--fetchers", "tests.watch_fetchers:valued")
WAIT_MS = 15_000
ERROR_TEXT = "upstream of one is down"  # what the fetcher raises while failing: its error text


@pytest.fixture(autouse=True)
def chromium() -> str:
    return require_chromium()


@pytest.fixture
def server(redis_url: str, redis_sync: redis.Redis) -> Iterator[ServeProcess]:
    env = {"FLEET_REDIS_URL": redis_url, "EAGERCACHE_ADMIN_TOKEN": TOKEN}
    started = ServeProcess("--redis-url", redis_url, *FETCHERS, "--shutdown-timeout", "3", env=env)
    try:
        started.wait_ready()
        yield started
    finally:
        started.close()


def put(client: redis.Redis, k: str, value: object) -> None:
    client.set(f"watchtest:value:{k}", json.dumps(value))


def read(server: ServeProcess, k: str) -> httpx.Response:
    answer = httpx.get(f"{server.url}/data/flaky?k={k}", timeout=10)
    assert answer.status_code == 200, answer.text
    return answer


def row(k: str) -> str:
    return f'#entries tbody tr[data-key="flaky?k={k}"]'


def wait_text(page: Page, selector: str, text: str) -> None:
    page.wait_for_function(
        "([selector, text]) => document.querySelector(selector)?.textContent.includes(text)",
        arg=[selector, text],
        timeout=WAIT_MS,
    )


@pytest.mark.timeout(120)
def test_the_page_lists_fetchers_and_entries_and_follows_a_change_live(
    server: ServeProcess, redis_sync: redis.Redis
) -> None:
    put(redis_sync, "one", {"v": 1})
    read(server, "one")
    with chromium_page() as (page, console):
        page.goto(f"{server.url}/")
        page.wait_for_selector('#fetchers tbody tr[data-key="flaky"]', timeout=WAIT_MS)
        page.wait_for_selector('#fetchers tbody tr[data-key="valued"]', timeout=WAIT_MS)
        wait_text(page, "#service", "ready")
        # The entry read through /data is listed, with a link to that /data.
        page.wait_for_selector(row("one"), timeout=WAIT_MS)
        link = page.locator(f"{row('one')} a").first
        assert link.get_attribute("href") == f"{server.url}/data/flaky?k=one"
        assert page.locator(f"{row('one')} td").nth(5).text_content() == "HIT"
        # Its data, live: a snapshot first, then the change, on the same page (no reload).
        page.evaluate("window.__sameDocument = true")
        page.locator(f"{row('one')} button[data-action=watch]").click()
        wait_text(page, "#watch-data", '"v": 1')
        put(redis_sync, "one", {"v": 2})
        wait_text(page, "#watch-data", '"v": 2')
        assert page.evaluate("window.__sameDocument") is True
        assert '"v": 1' not in (page.text_content("#watch-data") or "")
        # The charts have been drawn from the history (refreshes every 0.2 s).
        page.wait_for_function(
            "() => document.querySelector('#rate-chart polyline')?.getAttribute('points')?.includes(' ')",
            timeout=WAIT_MS,
        )
        # A failing upstream: the entry turns STALE, and the events say so, without the error's text.
        redis_sync.set("watchtest:fail:one", 1)
        page.wait_for_selector(f"{row('one')} td.state-STALE", timeout=WAIT_MS)
        wait_text(page, "#events", "fetches of flaky fail")
        wait_text(page, "#events", "refresh failed; serving the last good data as STALE")
        wait_text(page, "#watch-state", "STALE")
        assert ERROR_TEXT not in (page.text_content("body") or "")
        assert console.errors == []


@pytest.mark.timeout(120)
def test_admin_actions_need_the_token(server: ServeProcess, redis_sync: redis.Redis) -> None:
    for k in ("one", "two"):
        put(redis_sync, k, {"k": k})
        read(server, k)
    redis_sync.set("watchtest:fail:one", 1)
    with chromium_page() as (page, console):
        page.goto(f"{server.url}/")
        page.wait_for_selector(row("two"), timeout=WAIT_MS)
        page.wait_for_selector(f"{row('one')} td.state-STALE", timeout=WAIT_MS)
        # Read-only: no action is offered, the error text is not shown, and the admin API refuses the page.
        assert not page.locator(f"{row('two')} button[data-action=invalidate]").is_visible()
        assert ERROR_TEXT not in (page.text_content("#entries") or "")
        refused = page.evaluate(
            "async () => (await fetch('admin/fetchers/flaky/entry?k=two', {method: 'DELETE'})).status"
        )
        assert refused == 401
        # A wrong token is refused and not kept.
        page.fill("#token", "not-the-token-at-all")
        page.click("#token-form button[type=submit]")
        wait_text(page, "#admin-status", "not valid")
        assert page.evaluate("sessionStorage.length") == 0
        assert not page.locator(f"{row('two')} button[data-action=invalidate]").is_visible()
        # The token: the actions appear, the error text too; it is kept for the tab's session only.
        page.fill("#token", TOKEN)
        page.click("#token-form button[type=submit]")
        wait_text(page, "#admin-status", "Token accepted")
        assert page.evaluate("Object.values(sessionStorage)") == [TOKEN]
        assert page.evaluate("localStorage.length") == 0
        wait_text(page, row("one"), ERROR_TEXT)
        page.locator(f"{row('two')} button[data-action=invalidate]").click()
        wait_text(page, "#admin-status", "Invalidated flaky?k=two")
        page.wait_for_selector(row("two"), state="detached", timeout=WAIT_MS)
        assert httpx.get(f"{server.url}/data/flaky?k=two", timeout=10).headers["x-cache"] == "MISS"
        # Refresh now: the failing entry's upstream is back; a refresh makes it fresh at once.
        redis_sync.delete("watchtest:fail:one")
        page.locator(f"{row('one')} button[data-action=refresh]").click()
        wait_text(page, "#admin-status", "Refreshed flaky?k=one")
        page.wait_for_selector(f"{row('one')} td.state-HIT", timeout=WAIT_MS)
        # Forgotten: read-only again.
        page.click("#token-forget")
        assert page.evaluate("sessionStorage.length") == 0
        assert not page.locator(f"{row('one')} button[data-action=refresh]").is_visible()
        # Chromium logs each refused request as a failed load: the two refusals above, and nothing else.
        assert len(console.errors) == 2, console.errors
        assert "401" in console.errors[0] and "/admin/fetchers/flaky/entry?k=two" in console.errors[0]
        assert "403" in console.errors[1] and "/status)" in console.errors[1]


@pytest.mark.timeout(120)
def test_the_page_fits_a_phone_and_every_control_has_a_label(server: ServeProcess, redis_sync: redis.Redis) -> None:
    put(redis_sync, "one", {"v": 1})
    read(server, "one")
    with chromium_page() as (page, console):
        page.set_viewport_size({"width": 375, "height": 740})
        page.goto(f"{server.url}/")
        page.wait_for_selector(row("one"), timeout=WAIT_MS)
        # Wide tables scroll in their own box; the page itself does not scroll sideways.
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        unlabelled = page.evaluate(
            "() => [...document.querySelectorAll('input, select')].filter((e) => !e.labels.length).map((e) => e.id)"
        )
        assert unlabelled == []
        # Keyboard: the first Tab reaches the skip link, and the search form works from the keyboard.
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.className") == "skip"
        page.focus("#search-query")
        page.keyboard.type("nothing-matches-this")
        page.keyboard.press("Enter")
        wait_text(page, "#entries-status", "0 entries matching")
        assert page.locator("#entries tbody tr").count() == 0
        assert console.errors == []
