"""Small awaitable counters, so tests wait for events instead of sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from eagercache.errors import StoreUnavailable
from eagercache.store import RefreshWrite, write_each

RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class Counter:
    """Counts occurrences; `await counter.reach(n)` returns once it has counted n (or times out)."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def hit(self, *_: object) -> None:
        self.count += 1
        self._changed.set()

    async def reach(self, n: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while self.count < n:
                self._changed.clear()
                await self._changed.wait()


def refreshes_through(store: Any, write: Callable[..., Awaitable[int]]) -> None:
    """Send a store's batched refresh writes (Store.write_refreshes) through `write` one by one, as
    `Store.write(..., mode="refresh")` calls: a write a test injects sees every refresh's."""

    async def write_refreshes(writes: Sequence[RefreshWrite]) -> list[int | StoreUnavailable]:
        return await write_each(write, writes)

    store.write_refreshes = write_refreshes


@contextlib.contextmanager
def garbage_made() -> Iterator[list[object]]:
    """What the garbage collector finds unreachable among the objects made in the block, filled in when it ends
    (no collection runs meanwhile): empty when reference counting alone freed them, cycles otherwise."""
    gc.collect()
    gc.disable()
    found: list[object] = []
    try:
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collection finds unreachable stays in gc.garbage
        yield found
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
