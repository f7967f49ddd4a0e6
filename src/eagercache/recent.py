"""Recent events for the status page: a bounded ring of what an operator would want to have seen.

Fed from hooks that exist anyway: the engine's change callbacks (an entry turned stale, was removed) and
the status sampler's once-a-second readings (fetches of a fetcher began or stopped failing, entries
removed as idle, the store's primaries changed, readiness lost or regained). Nothing here runs on a read.
Only this process's events: with `--workers`, each worker has its own.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Literal

import msgspec

# Events kept; the oldest go first.
MAX_EVENTS = 200
# Entries marked stale whose last error is looked up per sampler tick (each is one pipelined read).
MAX_LOOKUPS = 50

Kind = Literal["stale", "removed", "idle", "failing", "recovered", "failover", "not-ready", "ready"]


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One event. `error` is a fetcher's own error text (it may carry an upstream's secrets): shown only
    to a caller with the admin token, as the admin API does."""

    id: int
    at_ms: int  # the store's clock
    kind: Kind
    detail: str
    fetcher: str | None = None
    entry: str | None = None
    error: str | None = None


class Recent:
    """The last MAX_EVENTS events, each with an increasing id (a page asks for those after the last it has)."""

    def __init__(self, size: int = MAX_EVENTS) -> None:
        self.events: deque[Event] = deque(maxlen=size)
        self._ids = itertools.count(1)
        # Entries marked stale here whose error is still to be read (by the sampler, in one batch).
        self.pending_errors: dict[str, int] = {}  # entry id -> event id

    def add(
        self,
        at_ms: int,
        kind: Kind,
        detail: str,
        *,
        fetcher: str | None = None,
        entry: str | None = None,
        error: str | None = None,
    ) -> Event:
        event = Event(
            id=next(self._ids), at_ms=at_ms, kind=kind, detail=detail, fetcher=fetcher, entry=entry, error=error
        )
        self.events.append(event)
        return event

    def with_error(self, event_id: int, error: str) -> None:
        """Add the error text to an event still in the ring (looked up after the event was recorded)."""
        for i, event in enumerate(self.events):
            if event.id == event_id:
                self.events[i] = msgspec.structs.replace(event, error=error)
                return

    def after(self, last_id: int) -> list[Event]:
        """Events newer than `last_id`, oldest first."""
        return [e for e in self.events if e.id > last_id]
