"""Supervised background loops: a loop that fails unexpectedly is logged, counted and restarted.

A refresher whose loop dies in silence stops refreshing while every probe says it is fine. So each
background loop runs under a Supervisor: an unexpected exception is logged once per streak with its
traceback, counted in `eagercache_background_errors{component=<loop>}`, and the loop restarts after a
backoff; `down()` names the loops that are not running, for /readyz. Expected failures (the store is
unreachable) are each loop's own business: it retries with an `Outage`, which logs once per outage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .metrics import Metrics

log = logging.getLogger(__name__)

RESTART_MIN_S = 0.1
RESTART_MAX_S = 30.0
# A loop that ran this long before failing starts a new streak: its failure is logged again.
STREAK_RESET_S = 60.0
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 5.0

LoopFactory = Callable[[], Awaitable[None]]


@dataclass
class _LoopState:
    name: str
    task: asyncio.Task[None] | None = None
    running: bool = False
    last_error: str = ""
    restarts: int = 0


class Supervisor:
    """Runs named background loops until `stop()`, restarting any that fail."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.stopping = False
        self._loops: dict[str, _LoopState] = {}

    def start(self, name: str, loop: LoopFactory) -> None:
        # Running from now: a loop whose task has not had its first turn yet is not down (on memory:// a
        # lifespan can finish, and /readyz be asked, before the loop gets one).
        state = _LoopState(name, running=True)
        self._loops[name] = state
        state.task = asyncio.create_task(self._run(state, loop), name=f"eagercache: {name}")

    def down(self) -> list[str]:
        """Why each loop that is not running is down, e.g. "schedule: restarting after RuntimeError: ..."."""
        return [f"{s.name}: restarting after {s.last_error}" for s in self._loops.values() if not s.running]

    async def stop(self) -> None:
        """Stop every loop; an error a loop ends with is logged, never dropped."""
        self.stopping = True
        tasks = [s.task for s in self._loops.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        for state, result in zip(
            self._loops.values(), await asyncio.gather(*tasks, return_exceptions=True), strict=True
        ):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("background loop failed while stopping", exc_info=result, extra={"loop": state.name})
        self._loops.clear()

    async def _run(self, state: _LoopState, loop: LoopFactory) -> None:
        delay = 0.0
        while not self.stopping:
            started = time.monotonic()
            try:
                await loop()
                if self.stopping:
                    return
                raise RuntimeError("the loop returned")  # a loop runs until stopped
            except asyncio.CancelledError:
                if self.stopping or _being_cancelled():
                    raise
                error: BaseException = RuntimeError("cancelled from within")  # e.g. raised by a library
            except Exception as exc:
                error = exc
            state.running = False
            self._count_down()
            state.last_error = f"{type(error).__name__}: {error}"
            state.restarts += 1
            self.metrics.background_errors.labels(state.name).inc()
            if delay == 0.0 or time.monotonic() - started > STREAK_RESET_S:
                delay = RESTART_MIN_S
                log.error(
                    "background loop failed; restarting it",
                    exc_info=error,
                    extra={"loop": state.name, "restart_in_s": delay},
                )
            else:
                delay = min(delay * 2, RESTART_MAX_S)
                log.debug("background loop failed again", extra={"loop": state.name, "error": state.last_error})
            await asyncio.sleep(delay)
            state.running = True
            self._count_down()

    def _count_down(self) -> None:
        self.metrics.loops_down.set(sum(not s.running for s in self._loops.values()))


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def check_cancelled() -> None:
    """Raise CancelledError if this task was cancelled and a library swallowed it (a redis-py or fakeredis
    call inside `asyncio.wait_for` whose result came with the cancellation: redis/redis-py#2028). A loop
    that runs until cancelled calls this on each turn, or it runs on for ever."""
    if _being_cancelled():
        raise asyncio.CancelledError


class Outage:
    """Logs a failing background loop once per outage, and paces its retries with exponential backoff."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.delay_s = 0.0

    def failed(self, error: str) -> float:
        if self.delay_s == 0.0:
            log.warning("the store failed; retrying", extra={"loop": self.what, "error": error})
        self.delay_s = min(max(self.delay_s * 2, RECONNECT_MIN_S), RECONNECT_MAX_S)
        return self.delay_s

    def over(self) -> None:
        if self.delay_s:
            log.info("store is back", extra={"loop": self.what})
        self.delay_s = 0.0
