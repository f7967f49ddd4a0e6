"""The cache engine: reads (hit, or a single-flight fetch on a miss) and refreshes of claimed entries."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from .errors import EagerCacheError, FetchFailed, FetchTimeout, InvalidParameters, UnknownFetcher
from .fetchers import Fetcher, Registry
from .item import build_body, encode_data
from .keys import split_entry_id
from .metrics import Metrics
from .params import Call
from .store import Store

log = logging.getLogger(__name__)

# An entry whose fetcher this process does not know (a rolling deploy) is left for a replica that does.
UNKNOWN_FETCHER_RETRY_MS = 60_000

Cause = Literal["cold", "schedule", "event"]


@dataclass(frozen=True, slots=True)
class Read:
    body: bytes
    cache: Literal["HIT", "MISS"]


class Engine:
    """Owns the fetch-and-store path, shared by readers and the refresher."""

    def __init__(self, registry: Registry, store: Store, metrics: Metrics) -> None:
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self._inflight: dict[str, asyncio.Task[bytes]] = {}
        self._on_write: list[Callable[[], None]] = []

    def on_write(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every stored entry (the refresher re-reads its schedule)."""
        self._on_write.append(callback)

    async def read(self, fetcher_name: str, query: bytes | str) -> Read:
        fetcher, call = self.registry.call(fetcher_name, query)
        body = await self.store.get(call.entry_id)
        if body is not None:
            return Read(body, "HIT")
        task = self._inflight.get(call.entry_id) or self._start(fetcher, call, "cold")
        # shield: a reader that disconnects must not cancel the fetch the other readers are waiting for
        return Read(await asyncio.shield(task), "MISS")

    async def refresh(self, entry_id: str, cause: Cause) -> None:
        """Refresh an entry this process has claimed. Never raises for a failing fetcher or store."""
        if entry_id in self._inflight:
            return  # a cold read is fetching it right now; its write reschedules the entry
        name, query = split_entry_id(entry_id)
        try:
            fetcher, call = self.registry.call(name, query)
        except UnknownFetcher:
            log.warning("refresh skipped: unknown fetcher", extra={"fetcher": name, "entry": entry_id})
            self.metrics.background_errors.labels("unknown-fetcher").inc()
            await self.store.postpone(entry_id, UNKNOWN_FETCHER_RETRY_MS)
            return
        except InvalidParameters as exc:
            # The fetcher's signature changed: this entry can never be fetched or read again.
            log.warning("entry removed: parameters no longer valid", extra={"entry": entry_id, "error": exc.detail})
            self.metrics.background_errors.labels("stale-signature").inc()
            await self.store.forget(entry_id)
            return
        try:
            await self._start(fetcher, call, cause)
        except FetchFailed:
            # Keep the last good body; try again on the fetcher's normal cadence.
            await self.store.postpone(entry_id, _due_in_ms(fetcher))

    def _start(self, fetcher: Fetcher, call: Call, cause: Cause) -> asyncio.Task[bytes]:
        task = asyncio.create_task(self._fetch_and_store(fetcher, call, cause), name=f"fetch {call.entry_id}")
        self._inflight[call.entry_id] = task
        task.add_done_callback(lambda t: self._finished(call.entry_id, t))
        return task

    def _finished(self, entry_id: str, task: asyncio.Task[bytes]) -> None:
        del self._inflight[entry_id]
        if not task.cancelled():
            task.exception()  # retrieved here: a fetch whose readers all left must not warn "never retrieved"

    async def _fetch_and_store(self, fetcher: Fetcher, call: Call, cause: Cause) -> bytes:
        extra = {"fetcher": fetcher.name, "entry": call.entry_id, "cause": cause}
        started = time.perf_counter()
        try:
            data = await asyncio.wait_for(fetcher.func(**call.kwargs), fetcher.timeout)
            data_json = encode_data(data, fetcher.name)
        except TimeoutError:
            self.metrics.fetches.labels(fetcher.name, cause, "timeout").inc()
            log.warning("fetch timed out", extra={**extra, "timeout_s": fetcher.timeout})
            raise FetchTimeout(f"fetcher {fetcher.name!r} did not answer within {fetcher.timeout} s") from None
        except EagerCacheError as exc:
            self.metrics.fetches.labels(fetcher.name, cause, "error").inc()
            log.warning("fetch failed", extra={**extra, "error": exc.detail})
            raise
        except Exception as exc:
            self.metrics.fetches.labels(fetcher.name, cause, "error").inc()
            log.warning("fetch failed", extra={**extra, "error": repr(exc)})
            raise FetchFailed(f"fetcher {fetcher.name!r} failed: {type(exc).__name__}") from exc
        self.metrics.fetches.labels(fetcher.name, cause, "ok").inc()
        self.metrics.fetch_seconds.labels(fetcher.name).observe(time.perf_counter() - started)
        previous = None if cause == "cold" else await self.store.get(call.entry_id)
        body, changed = build_body(data_json, previous, datetime.now(UTC))
        await self.store.write(call.entry_id, body, _due_in_ms(fetcher))
        if changed and previous is not None:
            self.metrics.changes.labels(fetcher.name).inc()
        for callback in self._on_write:
            callback()
        return body

    async def drain(self, timeout: float) -> None:
        """Wait for in-flight fetches to finish (shutdown), cancelling what is left after `timeout` seconds."""
        tasks = list(self._inflight.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


def _due_in_ms(fetcher: Fetcher) -> int:
    return int((fetcher.ttl + random.uniform(0, fetcher.jitter)) * 1000)
