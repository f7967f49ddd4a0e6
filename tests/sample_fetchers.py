"""A fetcher that tests load by spec (`--fetchers tests.sample_fetchers:thing`), as an operator would."""

from __future__ import annotations

from typing import Literal

from eagercache import fetcher


@fetcher(ttl=7, jitter=0.5, timeout=3)
async def thing(size: int = 3, colour: Literal["red", "blue"] = "red") -> dict[str, object]:
    return {"size": size, "colour": colour}
