"""Lookups asked for in the same event-loop iteration go out as one call (auto-pipelining).

A hit that misses the near cache costs one Redis round trip, and with redis-py most of that cost is the
client's per-command work (a pool checkout, a timer, packing, parsing), not the server's. Thirty-two
readers that arrive together pay it once: their keys go out in one MGET, and each gets its own answer.
Nobody waits for a batch to fill: the call goes out as soon as the readers already runnable have asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    """`await get(key)` is `(await run([key]))[0]`, with the keys of one loop iteration sent in one `run`.

    `run` gets at most `max_batch` keys and answers one value per key, in order. If it raises, every
    caller of that batch gets the exception; a caller that was cancelled meanwhile is simply skipped.
    """

    def __init__(self, run: Callable[[list[K]], Awaitable[Sequence[V]]], *, max_batch: int) -> None:
        self._run = run
        self._max_batch = max_batch
        self._waiting: list[tuple[K, asyncio.Future[V]]] = []
        self._batches: set[asyncio.Task[None]] = set()  # referenced until done (the loop keeps weak ones)

    async def get(self, key: K) -> V:
        loop = asyncio.get_running_loop()
        if not self._waiting:
            loop.call_soon(self._flush)  # after the callbacks already scheduled: the other readers of this round
        future: asyncio.Future[V] = loop.create_future()
        self._waiting.append((key, future))
        return await future

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, []
        for start in range(0, len(waiting), self._max_batch):
            task = asyncio.create_task(self._answer(waiting[start : start + self._max_batch]))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _answer(self, batch: list[tuple[K, asyncio.Future[V]]]) -> None:
        try:
            values = await self._run([key for key, _ in batch])
        except BaseException as exc:
            for _, future in batch:
                if future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()  # a future cannot hold a CancelledError as its exception
                else:
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), value in zip(batch, values, strict=True):
            if not future.done():
                future.set_result(value)

    async def aclose(self) -> None:
        """Wait for the batches in flight (their callers are waiting for them)."""
        if self._batches:
            await asyncio.wait(self._batches)
