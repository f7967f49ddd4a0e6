"""The refresher: finds entries that are due, claims them, and has the engine refresh them.

Two signals lead here. The schedule (the `due` sorted set) is the truth: a loop sleeps until the
earliest due time and claims what is due. Redis `expired` events for shadow keys are a hint that
arrives without polling (entries written by other replicas), late by up to a second or so because
Redis expires keys by sampling, and not at all while disconnected or on `memory://`. Either way an
entry is refreshed only by whoever claims it in the schedule, so the two never fetch it twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from redis.exceptions import RedisError

from .engine import Cause, Engine
from .errors import StoreUnavailable
from .store import EXPIRED_CHANNEL, Store, now_ms

log = logging.getLogger(__name__)

# The schedule is re-read at least this often, to see entries other replicas scheduled.
SCHEDULE_MAX_WAIT_S = 1.0
CLAIM_BATCH = 256
# A claim outlives the slowest fetch by this much; a claimer that died frees its entries then.
LEASE_MARGIN_MS = 5_000
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 5.0
DRAIN_TIMEOUT_S = 10.0
FIRST_SUBSCRIPTION_TIMEOUT_S = 5.0


class Refresher:
    """One per process; started and stopped by the app's lifespan."""

    def __init__(self, engine: Engine, store: Store, *, max_concurrent: int = 64) -> None:
        self.engine = engine
        self.store = store
        self.max_concurrent = max_concurrent
        slowest_s = max((f.timeout for f in engine.registry.values()), default=0.0)
        self.lease_ms = int(slowest_s * 1000) + LEASE_MARGIN_MS
        self._subscribed = asyncio.Event()
        self.schedule_max_wait_s = SCHEDULE_MAX_WAIT_S
        self.uses_events = not store.is_memory
        self._wake = asyncio.Event()
        # Loops also stop on this flag: a CancelledError that lands inside a redis-py call can be
        # swallowed there (it drops the connection instead), and the loop would then run on.
        self._stopping = False
        self._loops: list[asyncio.Task[None]] = []
        self._running: set[asyncio.Task[None]] = set()
        engine.on_write(self._wake.set)

    async def start(self) -> None:
        if self.uses_events:
            await self.store.enable_expiry_events()
            self._loops.append(self._loop(self._follow_events(), "expiry events"))
            # Ready means subscribed; a failure here is retried by the loop (and /readyz says so).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), FIRST_SUBSCRIPTION_TIMEOUT_S)
        self._loops.append(self._loop(self._follow_schedule(), "schedule"))

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()
        await self.engine.drain(DRAIN_TIMEOUT_S)
        await asyncio.gather(*self._running, return_exceptions=True)

    def _loop(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.create_task(coro, name=f"eagercache refresher: {name}")

    @property
    def _capacity(self) -> int:
        return self.max_concurrent - len(self._running)

    def _spawn(self, entry_id: str, cause: Cause, *, claimed: bool) -> None:
        task = asyncio.create_task(self._refresh(entry_id, cause, claimed=claimed), name=f"refresh {entry_id}")
        self._running.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wake.set()  # a slot is free

    async def _refresh(self, entry_id: str, cause: Cause, *, claimed: bool) -> None:
        try:
            if not claimed and not await self.store.claim(entry_id, self.lease_ms):
                return  # refreshed already, or another replica has it
            await self.engine.refresh(entry_id, cause)
        except StoreUnavailable as exc:
            # The claim's lease runs out and the entry is due again: nothing is lost.
            self.engine.metrics.background_errors.labels("refresh").inc()
            log.warning("refresh could not reach the store", extra={"entry": entry_id, "error": exc.detail})
        except Exception:
            self.engine.metrics.background_errors.labels("refresh").inc()
            log.exception("refresh crashed", extra={"entry": entry_id})

    async def _follow_schedule(self) -> None:
        outage = _Outage("schedule")
        while not self._stopping:
            self._wake.clear()
            try:
                claimed = await self.store.claim_due(self.lease_ms, min(self._capacity, CLAIM_BATCH))
                next_due = await self.store.next_due_ms()
            except StoreUnavailable as exc:
                self.engine.metrics.background_errors.labels("schedule").inc()
                await asyncio.sleep(outage.failed(exc.detail))
                continue
            outage.over()
            for entry_id in claimed:
                self._spawn(entry_id, "schedule", claimed=True)
            if self._capacity <= 0:
                await self._wake.wait()
                continue
            max_wait_s = self.schedule_max_wait_s
            wait_s = max_wait_s if next_due is None else (next_due - now_ms()) / 1000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, min(wait_s, max_wait_s)))

    async def _follow_events(self) -> None:
        outage = _Outage("expiry events")
        keys = self.store.keys
        while not self._stopping:
            pubsub = self.store.pubsub()
            try:
                await pubsub.psubscribe(EXPIRED_CHANNEL)
                self._set_subscribed(True)
                outage.over()
                while not self._stopping:
                    message = await pubsub.get_message(timeout=SCHEDULE_MAX_WAIT_S)
                    if message is None:
                        continue
                    entry_id = keys.entry_of_shadow(message["data"].decode())
                    # At capacity the entry stays due in the schedule, which picks it up when a slot frees.
                    if entry_id is not None and self._capacity > 0:
                        self._spawn(entry_id, "event", claimed=False)
            except (RedisError, OSError) as exc:
                self._set_subscribed(False)
                self.engine.metrics.background_errors.labels("subscription").inc()
                await asyncio.sleep(outage.failed(f"{type(exc).__name__}: {exc}"))
            finally:
                self._set_subscribed(False)
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    def _set_subscribed(self, up: bool) -> None:
        if up:
            self._subscribed.set()
        else:
            self._subscribed.clear()
        self.engine.metrics.subscribed.set(1 if up else 0)


class _Outage:
    """Logs a failing background loop once per outage, and paces its retries with exponential backoff."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.delay_s = 0.0

    def failed(self, error: str) -> float:
        if self.delay_s == 0.0:
            log.warning("lost the store; retrying", extra={"loop": self.what, "error": error})
        self.delay_s = min(max(self.delay_s * 2, RECONNECT_MIN_S), RECONNECT_MAX_S)
        return self.delay_s

    def over(self) -> None:
        if self.delay_s:
            log.info("store is back", extra={"loop": self.what})
        self.delay_s = 0.0
