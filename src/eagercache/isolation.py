"""A fetcher's run, isolated: in a task of its own, within its deadline, whatever it raises.

Nothing a fetcher does (raise SystemExit, swallow its cancellation, raise CancelledError on its own, hang
past its timeout) can end the process or hold anyone past the deadline: `guarded` turns every
BaseException into an Exception, `Runner` starts each run in a task of its own and waits for one run
(`done_within`), and `Runs` waits for the runs of one batch of refreshes (Engine._refresh_batch) with one
timer for them all. `Refresh` is one refresh of such a batch.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from .errors import FetchFailed, FetchTimeout, StoreUnavailable
from .fetchers import Fetcher
from .item import Entry
from .logs import Throttle
from .metrics import Metrics
from .params import Call
from .results import Outcome, Previous, outcome_of
from .store import STORED, Claim

# The last error kept with a stale entry, for operators (admin API), is cut to this length.
MAX_ERROR_CHARS = 300
# A fetcher whose runs ignore cancellation gets no new run while this many of its old ones still go on.
MAX_ABANDONED_PER_FETCHER = 16
# What started a fetch: a reader's miss, the schedule, an expiry event, an admin.
Cause = Literal["cold", "schedule", "event", "admin"]
log = logging.getLogger(__name__)


class Refresh:
    """One refresh of a batch (Engine._refresh_batch), from its claim to its write."""

    __slots__ = (
        "call",
        "changed",
        "claim",
        "deadline",
        "due_at",
        "entry",
        "error",
        "fetch",
        "fetcher",
        "inner",
        "outcome",
        "previous",
        "slot",
        "started",
        "timed_out",
        "took_s",
        "value",
        "write_error",
    )

    def __init__(self, claim: Claim, fetcher: Fetcher, call: Call, fetch: asyncio.Future[bytes | None]) -> None:
        self.claim = claim
        self.fetcher = fetcher
        self.call = call
        self.fetch = fetch  # its future in Engine._inflight: the body written, or None
        self.previous: Entry | None = None
        self.slot: asyncio.Semaphore | None = None
        self.inner: asyncio.Task[Any] | None = None  # the fetcher's run, while it runs
        self.error: FetchFailed | None = None  # the run could not start
        self.started = 0.0  # time.perf_counter()
        self.deadline = 0.0  # loop time
        self.timed_out = False
        self.took_s = 0.0
        self.entry: Entry | None = None
        self.changed = False
        self.due_at = 0
        self.value: bytes | None = None
        self.outcome = STORED
        self.write_error: StoreUnavailable | None = None


class Runs:
    """The fetcher runs of one batch of refreshes, each in its own task: one timer for them all (at the
    earliest deadline of those still running), and their slots given back as each one ends or times out."""

    def __init__(self, release: Callable[[Refresh], None], abandon: Callable[[asyncio.Task[Any], str], None]) -> None:
        self.release = release  # the run is over: its slot back (Engine._release_run)
        self.abandon = abandon  # cancel a run and stop waiting for it (Engine._abandon)
        self.loop = asyncio.get_running_loop()
        self.running: list[Refresh] = []
        self.left = 0  # runs started and not over
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf
        self.waiter: asyncio.Future[None] | None = None

    def start(self, r: Refresh, inner: asyncio.Task[Any]) -> None:
        r.inner = inner
        r.started = time.perf_counter()
        r.deadline = self.loop.time() + r.fetcher.timeout
        self.running.append(r)
        self.left += 1
        inner.add_done_callback(functools.partial(self._ended, r))
        if r.deadline < self.timer_at:
            self._arm(r.deadline)

    def _arm(self, at: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(at, self._expire)
        self.timer_at = at

    def _ended(self, r: Refresh, _: object) -> None:
        if r.inner is None or r.timed_out:
            return  # over already (timed out, or the batch cancelled)
        r.took_s = time.perf_counter() - r.started
        self._over(r)

    def _over(self, r: Refresh) -> None:
        self.release(r)
        self.left -= 1
        if self.left == 0 and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _expire(self) -> None:
        self.timer, self.timer_at = None, math.inf
        now, soonest = self.loop.time(), math.inf
        for r in self.running:
            if r.timed_out or r.inner is None or r.inner.done():
                continue
            if r.deadline <= now:
                r.timed_out = True
                self.abandon(r.inner, r.fetcher.name)
                self._over(r)
            else:
                soonest = min(soonest, r.deadline)
        if soonest < math.inf:
            self._arm(soonest)

    async def wait(self) -> None:
        """Until every run started has ended or timed out."""
        if self.left:
            self.waiter = self.loop.create_future()
            await self.waiter
        if self.timer is not None:
            self.timer.cancel()

    def cancel(self) -> None:
        """The batch is cancelled: every run still going is cancelled (and abandoned) with it."""
        if self.timer is not None:
            self.timer.cancel()
        for r in self.running:
            if r.inner is not None and not r.timed_out and not r.inner.done():
                self.abandon(r.inner, r.fetcher.name)
                r.timed_out = True
                self._over(r)


class Runner:
    """Starts each fetcher run in a task of its own, waits for it within the fetcher's timeout, checks
    what it returned, and keeps track of the runs that outlived their timeout (cancelled, still going)."""

    def __init__(self, metrics: Metrics, errors: Throttle) -> None:
        self.metrics = metrics
        self.errors = errors  # warnings that may repeat for every entry: once a minute per kind
        self.abandoned: dict[asyncio.Task[Any], str] = {}  # fetcher runs that outlived their timeout -> fetcher

    async def run(self, fetcher: Fetcher, call: Call, cause: Cause, previous: Entry | None) -> Outcome:
        """What the fetcher returned, checked, or FetchFailed / FetchTimeout (only eagercache's own deadline)."""
        inner = self.start(fetcher, call, cause, previous)
        try:
            done = await done_within(inner, fetcher.timeout)
        except asyncio.CancelledError:  # shutdown: the fetcher is cancelled with us
            self.abandon(inner, fetcher.name)
            raise
        if not done:
            self.abandon(inner, fetcher.name)
            raise self.timed_out(fetcher, call, cause)
        return self.outcome(fetcher, call, cause, previous, inner)

    def timed_out(self, fetcher: Fetcher, call: Call, cause: Cause) -> FetchTimeout:
        self.metrics.fetches.labels(fetcher.name, cause, "timeout").inc()
        extra = {"fetcher": fetcher.name, "entry": call.entry_id, "cause": cause, "timeout_s": fetcher.timeout}
        log.warning("fetch timed out", extra=extra)
        return FetchTimeout(f"fetcher {fetcher.name!r} did not answer within {fetcher.timeout:g} s")

    def start(self, fetcher: Fetcher, call: Call, cause: Cause, previous: Entry | None) -> asyncio.Task[Any]:
        """The fetcher's run started, in a task of its own; FetchFailed if it may not run now."""
        # copies: the Call is remembered for later requests, and a fetcher may change its list arguments
        if fetcher.signature.takes_lists:
            kwargs = {k: list(v) if isinstance(v, list) else v for k, v in call.kwargs.items()}
        else:
            kwargs = dict(call.kwargs)
        if fetcher.signature.previous is not None:
            kwargs[fetcher.signature.previous] = None if previous is None else Previous.of(previous)
        if sum(1 for name in self.abandoned.values() if name == fetcher.name) >= MAX_ABANDONED_PER_FETCHER:
            # Its earlier runs ignored their cancellation and still run: starting more would pile them up.
            self.metrics.fetches.labels(fetcher.name, cause, "error").inc()
            error = (
                f"fetcher {fetcher.name!r} not run: {MAX_ABANDONED_PER_FETCHER} of its earlier runs ignored "
                "cancellation at their timeout and are still running"
            )
            extra = {"fetcher": fetcher.name, "entry": call.entry_id, "cause": cause, "error": error}
            self.errors.warning("fetch not started", f"abandoned {fetcher.name}", extra)
            raise FetchFailed(error)
        return asyncio.create_task(guarded(fetcher.func, kwargs), name=f"fetcher {fetcher.name}")

    def outcome(
        self, fetcher: Fetcher, call: Call, cause: Cause, previous: Entry | None, inner: asyncio.Task[Any]
    ) -> Outcome:
        """What a fetcher's finished run returned, checked; FetchFailed for whatever it raised."""
        extra = {"fetcher": fetcher.name, "entry": call.entry_id, "cause": cause}
        # What the run raised is read, not re-raised here: re-raising it would add this frame, which holds the
        # task that holds the exception, to its traceback, a reference cycle per failed fetch that only the
        # garbage collector frees (collections on the read path while an upstream is down).
        failure = asyncio.CancelledError() if inner.cancelled() else inner.exception()
        if failure is None:
            try:
                result = outcome_of(inner.result(), fetcher.name)
                if result.kind != "data" and previous is None:
                    raise FetchFailed(
                        f"fetcher {fetcher.name!r} returned {type(inner.result()).__name__}, but this entry has "
                        "no stored value to keep"
                    )
                return result
            except FetchFailed as exc:
                self.metrics.fetches.labels(fetcher.name, cause, "error").inc()
                log.warning("fetch failed", extra={**extra, "error": exc.detail})
                raise
            except Exception as exc:
                failure = exc
        # Whatever the fetcher raised, its own TimeoutError included, is its error, with its message.
        self.metrics.fetches.labels(fetcher.name, cause, "error").inc()
        error = f"fetcher {fetcher.name!r} failed: {describe(failure)}"
        log.warning("fetch failed", extra={**extra, "error": error})
        raise FetchFailed(f"fetcher {fetcher.name!r} failed: {kind_of(failure)}", error=error) from failure

    def abandon(self, inner: asyncio.Task[Any], fetcher_name: str) -> None:
        """Cancel a fetcher task and stop waiting for it; one that ignores cancellation is kept track of."""
        inner.cancel()
        if inner.done():
            return
        self.abandoned[inner] = fetcher_name
        self.metrics.abandoned.set(len(self.abandoned))

        def gone(task: asyncio.Task[Any]) -> None:
            self.abandoned.pop(task, None)
            self.metrics.abandoned.set(len(self.abandoned))
            if not task.cancelled():
                task.exception()

        inner.add_done_callback(gone)

    def cancel_abandoned(self) -> None:
        """Shutdown: cancel the abandoned runs again (they ignored it once; nobody waits for them)."""
        for abandoned in self.abandoned:
            abandoned.cancel()


class FetcherRaised(Exception):
    """A fetcher raised a BaseException that is not an Exception (SystemExit, KeyboardInterrupt, ...)."""

    def __init__(self, raised: BaseException) -> None:
        self.kind = type(raised).__name__
        super().__init__(f"{self.kind}: {raised}" if str(raised) else self.kind)


async def done_within(task: asyncio.Task[Any], timeout_s: float) -> bool:
    """Wait until `task` is done (True) or `timeout_s` has passed (False; the task is left running): what
    `asyncio.wait({task}, timeout=...)` does, without its sets and bookkeeping (~15 us of every refresh)."""
    if not task.done():
        await first_done(task, timeout_s=timeout_s)
    return task.done()


async def first_done(*futures: asyncio.Future[Any], timeout_s: float | None = None) -> None:
    """Until one of the futures is done, or `timeout_s` has passed: `asyncio.wait(..., FIRST_COMPLETED)`
    without its sets and results (~6 us of a cold read's wait for its fetch or for shutdown). None of the
    futures is cancelled."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    for future in futures:
        future.add_done_callback(wake)
    timer = None if timeout_s is None else loop.call_later(timeout_s, wake)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        for future in futures:
            future.remove_done_callback(wake)


async def guarded(func: Callable[..., Any], kwargs: Mapping[str, Any]) -> Any:
    """Run a fetcher so that nothing it raises escapes as anything but an Exception.

    asyncio re-raises SystemExit and KeyboardInterrupt out of the event loop, ending the process; and a
    CancelledError a fetcher raises on its own would pass for a cancellation. Our own cancellation
    (timeout, shutdown) still goes through as such.
    """
    try:
        return await func(**kwargs)
    except Exception:
        raise
    except BaseException as exc:
        task = asyncio.current_task()
        if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling() > 0:
            raise
        raise FetcherRaised(exc) from exc


def kind_of(exc: BaseException) -> str:
    """What a reader is told about a fetcher's exception: its type, never its message."""
    if isinstance(exc, FetcherRaised):
        return f"raised {exc.kind}"
    return "was cancelled" if isinstance(exc, asyncio.CancelledError) else type(exc).__name__


def describe(exc: BaseException) -> str:
    if isinstance(exc, FetcherRaised):
        return f"raised {exc}"
    if isinstance(exc, asyncio.CancelledError):
        return "was cancelled"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:MAX_ERROR_CHARS] if text else type(exc).__name__
