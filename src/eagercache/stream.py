"""GET /watch/{fetcher}?{query}: one entry as a stream of Server-Sent Events, written by the hub.

    retry: 1000                                   once, first
    id: "<etag>"  event: snapshot  data: <the DataItem body, as /data sends it>
    id: "<etag>"  event: patch     data: {"base": "<previous etag>", "patch": [<RFC 6902 operations>]}
                  event: status    data: {"state": "stale"} or {"state": "fresh"}
    : ping                                        when nothing else was sent for watch_ping seconds

The events come from the watch hub (watch.py), encoded there once per change. This module opens the watcher
(errors are problem documents, before any stream starts) and gives it a `_Stream`, which the hub drives: a
change's fan-out calls each stream's `ready()`, which writes the event to the server's ASGI `send` at once,
in the hub's loop, with no task, queue or cancel scope per stream or per event. A send the server completes
at once (its buffer has room: nearly always) costs a coroutine step; one that must wait for a full socket is
finished by a task of its own, bounded by SEND_TIMEOUT_S, while the hub goes on and the watcher's bounded
buffer (then a snapshot) takes what comes meanwhile. The endpoint itself only awaits `receive()`, which
returns `http.disconnect` when the client leaves or once the response is complete (the hub ends a stream by
sending its last chunk). One timer for every stream sends the pings and notices a host server stopping.

Under uvicorn's httptools protocol (what `eagercache serve` runs) a stream writes its events to the connection
itself: the app leaves the server's own `send` in the scope (SERVER_SEND), and while the connection is not
paused by flow control, an event goes to its transport as one chunk of the chunked body, framed once per
event for every stream (a fan-out to 10,000 watchers of one entry: ~18 µs of CPU per delivery through the
ASGI `send`, most of it the message dict, two coroutines and the framing, against ~8 µs for the write(2)
itself; bench section 8). Anything else (a paused connection, a stream's first and last messages, another
server or protocol, an app mounted in another) goes through the ASGI `send`.

sse-starlette (EventSourceResponse) sent the events until this design: its task group of four tasks per
stream and a cancel scope per send cost ~75 µs per delivery (bench section 8). Its `AppStatus` is still
what tells the timer that a host's uvicorn is stopping (eagercache mounted in another app).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Generator
from typing import Any

from sse_starlette.sse import AppStatus
from starlette.types import Message, Receive, Scope, Send

from .errors import EagerCacheError, problem_response
from .metrics import PlainCounter
from .watch import Event, EventKind, Watcher, WatchHub

# The protocol whose connections a stream writes to directly (uvicorn's default when httptools is installed;
# without it, every event goes through `send`).
_HTTPTOOLS_CYCLE: type | None = None
with contextlib.suppress(ImportError):
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    _HTTPTOOLS_CYCLE = RequestResponseCycle

# How long a client that reads nothing waits before reconnecting (the EventSource `retry:` field).
RETRY_MS = 1000
# A send to a client that takes nothing for this long ends its stream (the client reconnects): a stalled
# connection does not hold a watcher (and its share of --max-watchers) for ever.
SEND_TIMEOUT_S = 30.0
# The streams' timer looks this often whether a host server is stopping (and pings, each watch_ping / 2).
TICK_S = 0.5
_RETRY = f"retry: {RETRY_MS}\n\n".encode()
_PING = b": ping\n\n"
_END: Message = {"type": "http.response.body", "body": b"", "more_body": False}
_LAST_EVENT_ID = b"last-event-id"
# The scope key under which the app leaves the server's own `send` (app.py), before any middleware wraps it.
SERVER_SEND = "eagercache.server_send"
_HEADERS = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),  # nginx: pass each event on at once
)


class WatchStreams:
    """The ASGI endpoint of /watch/{fetcher}, and the streams it holds open."""

    def __init__(self, hub: WatchHub, ping_s: float, date: Callable[[], bytes] | None = None) -> None:
        self.hub = hub
        self.ping_s = ping_s
        self.date = date  # the Date header's value now, when the app sends it (create_app's date_header)
        self.clock = hub.store.clock
        self.streams: set[_Stream] = set()
        self._framed: tuple[bytes, bytes] = (b"", b"")  # the last chunk written directly, and its framing
        metrics = self.metrics = hub.metrics
        self.sent: dict[EventKind, PlainCounter] = {
            kind: metrics.plain_counter(metrics.watch_events, kind) for kind in ("snapshot", "patch", "status")
        }
        hub.run_also("watch streams", self._timer)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            watcher = await self.hub.open(scope["path_params"]["fetcher"], scope["query_string"], _last_event_id(scope))
        except EagerCacheError as exc:
            response = problem_response(exc)
            if self.date is not None:
                response.raw_headers.append((b"date", self.date()))
            await response(scope, receive, send)
            return
        stream = _Stream(self, watcher, send)
        try:
            headers = [*_HEADERS, (b"date", self.date())] if self.date is not None else list(_HEADERS)
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if scope["method"] == "HEAD":
                await send(_END)
                return
            await send({"type": "http.response.body", "body": _RETRY, "more_body": True})
            stream.cycle = _direct(scope)
            self.streams.add(stream)
            watcher.attach(stream)
            await stream.wait(receive)
        finally:
            stream.end()
            self.streams.discard(stream)
            self.hub.leave(watcher)

    def framed(self, chunk: bytes) -> bytes:
        """`chunk` as one chunk of a chunked body (RFC 9112, 7.1): framed once per event, not per stream (a
        fan-out writes one event to each of its streams in turn)."""
        last, framed = self._framed
        if chunk is not last:
            framed = b"%x\r\n%b\r\n" % (len(chunk), chunk)
            self._framed = (chunk, framed)
        return framed

    async def _timer(self) -> None:
        """Every TICK_S: end the streams if a host server stops; each ping_s / 2: ping the streams that sent
        nothing since the last time (so none goes longer than ping_s without a byte). A supervised loop."""
        ticks_per_ping = max(1, round(self.ping_s / 2 / TICK_S))
        tick_s = min(TICK_S, self.ping_s / 2)
        ticks = 0
        while True:
            await asyncio.sleep(tick_s)
            if not self.hub.closing and _host_server_stopping():
                self.hub.close()
            ticks += 1
            if ticks >= ticks_per_ping:
                ticks = 0
                for stream in list(self.streams):
                    stream.ping()


class _Stream:
    """One watcher's response: what the hub writes to the server's `send`, at once or by a parked send."""

    __slots__ = (
        "_cancelled",
        "_parked",
        "_waiting",
        "active",
        "cycle",
        "done",
        "lag",
        "owner",
        "send",
        "task",
        "watcher",
    )

    def __init__(self, owner: WatchStreams, watcher: Watcher, send: Send) -> None:
        self.owner = owner
        self.watcher = watcher
        self.send = send
        self.task = asyncio.current_task()  # the endpoint's: cancelled to end a stream the hub gives up on
        self.lag = owner.metrics.plain_histogram(owner.metrics.watch_lag, watcher.watched.fetcher.name)
        self.done = False  # nothing more is sent
        self.active = False  # something was sent since the last ping round
        self._parked: asyncio.Task[None] | None = None  # a send waiting for room in the socket
        self._waiting = False  # the endpoint awaits receive()
        self._cancelled = False  # ... and this stream cancelled it
        self.cycle: Any = None  # uvicorn's response cycle, when events may be written to its transport directly

    # -- the hub's side (Outlet) ---------------------------------------------------------------------------

    def ready(self) -> None:
        if self._parked is not None or self.done:
            return  # a parked send takes what is due once it is through
        watcher = self.watcher
        while (event := watcher.take()) is not None:
            if not self._write(event.chunk, event):
                return

    def offer(self, event: Event) -> bool:
        if self._parked is not None or self.done:
            return False
        self._write(event.chunk, event)
        return True

    def close(self) -> None:
        """End the stream: its last chunk, which completes the response (the endpoint's receive() returns)."""
        if self.done:
            return
        self.done = True
        if self._parked is None:
            steps = self.send(_END).__await__()
            try:
                steps.send(None)
            except StopIteration:
                return
            except Exception:
                pass
            else:
                steps.close()  # it would wait for room in a full socket: the connection is closed instead
        self._give_up()

    # -- sending -------------------------------------------------------------------------------------------

    def _write(self, chunk: bytes, event: Event | None) -> bool:
        """Send one chunk now; False if it did not go through at once (parked, or the stream failed)."""
        cycle = self.cycle
        if cycle is not None and not cycle.flow.write_paused and not cycle.disconnected:
            cycle.transport.write(self.owner.framed(chunk))  # what uvicorn's send would write, without the rest
            self._sent(event)
            return True
        steps = self.send({"type": "http.response.body", "body": chunk, "more_body": True}).__await__()
        try:
            pending = steps.send(None)  # the server's send, run to its first wait: most return at once
        except StopIteration:
            self._sent(event)
            return True
        except Exception:
            self.done = True
            self._give_up()
            return False
        self._parked = asyncio.create_task(self._finish(steps, pending, event), name="eagercache: watch send")
        return False

    async def _finish(self, steps: Generator[Any, Any, None], pending: Any, event: Event | None) -> None:
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await _Rest(steps, pending)
        except TimeoutError:  # the client stopped reading: it is disconnected, and will reconnect
            self.owner.metrics.watch_slow.labels("disconnect").inc()
            self.done = True
            self._give_up()
            return
        except Exception:
            self.done = True
            self._give_up()
            return
        self._parked = None
        self._sent(event)
        self.ready()  # what came meanwhile

    def _sent(self, event: Event | None) -> None:
        self.active = True
        if event is None:
            return
        self.owner.sent[event.kind].n += 1
        if event.written_ms is not None:
            self.lag.observe(max(0, self.owner.clock.now_ms() - event.written_ms) / 1000)

    def ping(self) -> None:
        if self.active:
            self.active = False
        elif self._parked is None and not self.done:
            self._write(_PING, None)

    # -- the endpoint's side -------------------------------------------------------------------------------

    async def wait(self, receive: Receive) -> None:
        """Until the client leaves, the response is complete, or the hub gives up on the stream."""
        self._waiting = True
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._cancelled or (task is not None and task.uncancel() > 0):
                raise
        finally:
            self._waiting = False

    def _give_up(self) -> None:
        """End the endpoint's wait: the server closes the connection (the response is incomplete)."""
        if self._parked is not None and self._parked is not asyncio.current_task():
            self._parked.cancel()
        self._parked = None
        if self._waiting and not self._cancelled and self.task is not None:
            self._cancelled = True
            self.task.cancel()

    def end(self) -> None:
        """The endpoint is done: stop what is still under way."""
        self.done = True
        if self._parked is not None:
            self._parked.cancel()
            self._parked = None
        # Its references to the endpoint's task (whose frames hold it) and back from its watcher are cycles:
        # broken here, the stream's own objects go when it ends, not at the next full garbage collection
        # (which they would otherwise wait for in the oldest generation, with every open stream's).
        self.task = self.cycle = None
        self.watcher.outlet = None


class _Rest:
    """Awaits the rest of an awaitable whose first step already ran (`steps`: its `__await__()` iterator) and
    is waiting on `pending`, what that step yielded (an asyncio future): the task that awaits this carries
    it on as if it had awaited it from the start."""

    __slots__ = ("pending", "steps")

    def __init__(self, steps: Generator[Any, Any, None], pending: Any) -> None:
        self.steps = steps
        self.pending = pending

    def __await__(self) -> Generator[Any, Any, None]:
        coro, pending = self.steps, self.pending
        while True:
            try:
                value = yield pending
            except BaseException as exc:  # the awaiting task's cancellation: into the coroutine
                try:
                    pending = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    pending = coro.send(value)
                except StopIteration:
                    return


def _host_server_stopping() -> bool:
    """Whether the uvicorn serving this process is shutting down (sse-starlette's `AppStatus`, set by its patch
    of uvicorn's exit handler; or the server behind the SIGTERM handler): a host app's server, whose signals
    are its own. The CLI's server tells the hub itself (app.py's signal handler)."""
    if AppStatus.should_exit:
        return True
    handler = signal.getsignal(signal.SIGTERM)
    server = getattr(handler, "__self__", None)
    return bool(getattr(server, "should_exit", False))


def _direct(scope: Scope) -> Any:
    """The response cycle of uvicorn's httptools protocol behind the server's `send` (SERVER_SEND, left by the
    app), once its chunked response has started; None (write through `send`) for anything else."""
    send = scope.get(SERVER_SEND)
    cycle: Any = getattr(send, "__self__", None)
    if _HTTPTOOLS_CYCLE is None or type(cycle) is not _HTTPTOOLS_CYCLE:
        return None
    return cycle if _chunked_under_way(cycle) else None


def _chunked_under_way(cycle: Any) -> bool:
    """Its response started with a chunked body (RFC 9112, 7.1), not yet complete: a chunk may follow."""
    return cycle.chunked_encoding is True and not cycle.response_complete


def _last_event_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == _LAST_EVENT_ID:
            text: str = value.decode("latin-1").strip()
            return text
    return None
