"""`make screenshots`: the status page in headless Chromium, at a desktop's and a phone's width, into docs/.

Starts `eagercache serve` on the in-memory store with the demo fetchers (tests/demo_fetchers.py), reads a few
entries, lets the charts fill for a while, watches one entry with the admin token entered, and writes
docs/status-page.png and docs/status-page-phone.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx

from .browser import chromium_page
from .servers import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "screenshot-admin-token-0123"
FILL_S = 40  # seconds of history in the charts


def main() -> int:
    fetchers = ("--fetchers", "tests.demo_fetchers:quotes", "--fetchers", "tests.demo_fetchers:inventory")
    server = ServeProcess(*fetchers, env={"EAGERCACHE_ADMIN_TOKEN": TOKEN})
    try:
        server.wait_ready()
        for path in [
            *(f"/data/quotes?symbol={s}" for s in ("ACME", "GLOBEX", "INITECH", "UMBRELLA")),
            "/data/quotes?symbol=ACME&currency=EUR",
            *(f"/data/inventory?site={s}" for s in ("berlin", "lyon", "oslo")),
        ]:
            httpx.get(f"{server.url}{path}", timeout=10).raise_for_status()
        time.sleep(FILL_S)  # the charts show the last minutes: give them some
        with chromium_page() as (page, console):
            page.set_viewport_size({"width": 1280, "height": 900})
            page.goto(f"{server.url}/")
            page.wait_for_selector('#entries tbody tr[data-key="inventory?site=lyon"] td.state-STALE')
            page.fill("#token", TOKEN)
            page.click("#token-form button[type=submit]")
            page.wait_for_selector('#entries tbody tr[data-key="quotes?symbol=ACME"] button[data-action=refresh]')
            page.click('#entries tbody tr[data-key="quotes?symbol=ACME"] button[data-action=watch]')
            page.wait_for_function("() => document.querySelector('#watch-data').textContent.includes('price')")
            time.sleep(2.5)  # a change or two, and a poll of every section
            page.screenshot(path=str(ROOT / "docs" / "status-page.png"), full_page=True)
            page.set_viewport_size({"width": 390, "height": 844})
            page.evaluate("window.scrollTo(0, 0)")
            time.sleep(0.5)
            page.screenshot(path=str(ROOT / "docs" / "status-page-phone.png"))
            if console.errors:
                print("console errors:", console.errors, file=sys.stderr)
                return 1
    finally:
        server.close()
    print("wrote docs/status-page.png and docs/status-page-phone.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
