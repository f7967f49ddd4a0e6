"""Fetchers for the status page's screenshots (`make screenshots`): data that moves, and an upstream that fails."""

from __future__ import annotations

import itertools
import math
import time

from eagercache import fetcher

_calls = itertools.count()
_inventory: dict[str, int] = {}


@fetcher(ttl=1, jitter=0.2, timeout=2)
async def quotes(symbol: str, currency: str = "USD") -> dict[str, object]:
    """A price that moves every second."""
    t = time.time()
    price = round(100 + 10 * math.sin(t / 7 + len(symbol)) + (next(_calls) % 7) / 10, 2)
    return {"symbol": symbol, "currency": currency, "price": price}


@fetcher(ttl=2, timeout=2, max_stale=600)
async def inventory(site: str) -> dict[str, object]:
    """Stock per site; the upstream of `lyon` fails after its first answer."""
    n = _inventory[site] = _inventory.get(site, 0) + 1
    if site == "lyon" and n > 1:
        raise ConnectionError("upstream inventory.lyon.example answered 503")
    return {"site": site, "items": 40 + n % 5}
