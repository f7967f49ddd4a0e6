"""GET /watch/{fetcher}?{query}: one entry as a stream of Server-Sent Events (sse-starlette sends them).

    retry: 1000                                   once, first
    id: "<etag>"  event: snapshot  data: <the DataItem body, as /data sends it>
    id: "<etag>"  event: patch     data: {"base": "<previous etag>", "patch": [<RFC 6902 operations>]}
                  event: status    data: {"state": "stale"} or {"state": "fresh"}
    : ping                                        every watch_ping seconds

The events come from the watch hub (watch.py), encoded there once per change; this module opens the
watcher (errors are problem documents, before any stream starts), sends its events and counts them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import anyio
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from .metrics import PlainCounter
from .watch import EventKind, Watcher, WatchHub

# How long a client that reads nothing waits before reconnecting (the EventSource `retry:` field).
RETRY_MS = 1000
# A send to a client that takes nothing for this long ends its stream (the client reconnects): a stalled
# connection does not hold a watcher (and its share of --max-watchers) for ever.
SEND_TIMEOUT_S = 30.0
# When sse-starlette sees the server shut down (an embedder's uvicorn; the CLI's SIGTERM closes the hub at
# once), it tells _ServerStopping, which ends every stream; they get this long before they are cancelled.
SHUTDOWN_GRACE_S = 1.0
_RETRY = f"retry: {RETRY_MS}\n\n".encode()
_SEP = "\n"
_PING = ServerSentEvent(comment="ping", sep=_SEP)
_LAST_EVENT_ID = b"last-event-id"


class _ServerStopping:
    """Every stream's `shutdown_event`, which sse-starlette sets when it sees the server shut down (a host
    app's uvicorn at SIGTERM: eagercache mounted in another app). Setting it closes the hub, as the CLI's
    SIGTERM handler does: streams end with their response complete, rather than being cancelled after the
    grace period (uvicorn: "ASGI callable returned without completing response"). One object for all
    streams: no event, no task per watcher; sse-starlette only calls its `set()`."""

    def __init__(self, hub: WatchHub) -> None:
        self.hub = hub

    def set(self) -> None:
        self.hub.close()


def watch_endpoint(hub: WatchHub, ping_s: float) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ASGI endpoint of /watch/{fetcher}."""
    metrics, clock = hub.metrics, hub.store.clock
    stopping = cast(anyio.Event, _ServerStopping(hub))
    sent: dict[EventKind, PlainCounter] = {
        kind: metrics.plain_counter(metrics.watch_events, kind) for kind in ("snapshot", "patch", "status")
    }

    async def events(watcher: Watcher) -> AsyncIterator[bytes]:
        yield _RETRY
        lag = metrics.plain_histogram(metrics.watch_lag, watcher.watched.fetcher.name)
        while (event := await watcher.next()) is not None:
            yield event.chunk
            # Resumed once the chunk was sent: counted, and its lag measured, as sent.
            sent[event.kind].inc()
            if event.written_ms is not None:
                lag.observe(max(0, clock.now_ms() - event.written_ms) / 1000)

    async def watch(scope: Scope, receive: Receive, send: Send) -> None:
        watcher = await hub.open(scope["path_params"]["fetcher"], scope["query_string"], _last_event_id(scope))
        try:
            response = EventSourceResponse(
                events(watcher),
                ping=ping_s,
                sep=_SEP,
                ping_message_factory=lambda: _PING,
                send_timeout=SEND_TIMEOUT_S,
                shutdown_event=stopping,
                shutdown_grace_period=SHUTDOWN_GRACE_S,
            )
            await response(scope, receive, send)
        except SendTimeoutError:  # the client stopped reading: it was disconnected, and will reconnect
            metrics.watch_slow.labels("disconnect").inc()
        finally:
            hub.leave(watcher)

    return watch


def _last_event_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == _LAST_EVENT_ID:
            text: str = value.decode("latin-1").strip()
            return text
    return None
