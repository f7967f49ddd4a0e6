"""Three fetchers that show what a real one looks like, without needing a network.

- `clock`: data that changes over time (a new value every `resolution` seconds), so
  `last_modified` moves while `last_retrieved` moves on every refresh.
- `greeting`: several typed parameters (str, int, Literal, a repeated list).
- `prices`: a slow "upstream" (it sleeps), the case eagercache exists for.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from typing import Literal

from eagercache import fetcher


@fetcher(ttl=5, jitter=1, timeout=2)
async def clock(resolution: int = 10) -> dict[str, int]:
    """The current time, rounded down to `resolution` seconds: changes once per `resolution`."""
    now = int(time.time())
    return {"epoch": now - now % max(resolution, 1), "resolution": resolution}


@fetcher(ttl=30, jitter=5, timeout=2)
async def greeting(
    name: str = "world",
    times: int = 1,
    style: Literal["plain", "shout"] = "plain",
    tags: list[str] | None = None,
) -> dict[str, object]:
    text = " ".join([f"Hello, {name}!"] * max(1, min(times, 10)))
    return {"text": text.upper() if style == "shout" else text, "tags": sorted(tags or [])}


@fetcher(ttl=10, jitter=2, timeout=5)
async def prices(symbol: str = "EUR", currency: str = "USD") -> dict[str, object]:
    """A stand-in for a slow upstream API: takes 0.5 s, and its price drifts every minute."""
    await asyncio.sleep(0.5)
    minute = int(time.time() // 60)
    price = 1.0 + zlib.crc32(f"{symbol}{currency}{minute}".encode()) % 1000 / 10_000
    return {"symbol": symbol, "currency": currency, "price": round(price, 4)}
