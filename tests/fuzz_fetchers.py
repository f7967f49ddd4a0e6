"""Fetchers with every supported parameter type, for fuzzing the live server against its OpenAPI spec."""

from __future__ import annotations

import enum
from typing import Any, Literal

from eagercache import fetcher


class Mode(enum.Enum):
    FAST = "fast"
    SAFE = "safe"


@fetcher(ttl=60)
async def kinds(
    s: str = "",
    n: int = 0,
    f: float = 0.0,
    b: bool = False,
    lit: Literal["x", "y"] = "x",
    mode: Mode = Mode.FAST,
    tags: list[str] | None = None,
    ids: list[int] | None = None,
) -> dict[str, Any]:
    """Echoes its arguments."""
    return {"s": s, "n": n, "f": f, "b": b, "lit": lit, "mode": mode.value, "tags": tags, "ids": ids}


@fetcher(ttl=60)
async def required(city: str, days: int) -> list[int]:
    """Two required parameters; a typed list back."""
    return [len(city), days]
