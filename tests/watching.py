"""Reading /watch streams in tests: an app served on a real socket, a Server-Sent Events reader, and patches replayed.

httpx's ASGITransport runs the app to its end and buffers the whole body, so it cannot read a stream that never
ends: streams are read from uvicorn, running in the test's event loop on a free loopback port.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import jsonpatch
import uvicorn
from starlette.applications import Starlette

from .redis_server import free_port


@asynccontextmanager
async def serving(app: Starlette, http: str = "auto") -> AsyncIterator[str]:
    """Run `app` (its lifespan too) under uvicorn in this event loop, with its `http` protocol ("auto": httptools,
    installed with the package); its base URL while it runs."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=http, log_config=None, timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)  # uvicorn has no event to await for "listening"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@dataclass
class Event:
    """One dispatched event: its type, id (None if the event had no id field) and data."""

    event: str
    id: str | None
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class EventStream:
    """The events of one response, read as an EventSource would (WHATWG HTML, 9.2.6), with what else came."""

    response: httpx.Response
    comments: list[str] = field(default_factory=list)
    retries: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lines = self.response.aiter_lines()

    async def next(self, timeout: float = 10.0) -> Event | None:
        """The next event (comments and `retry:` are recorded, not returned); None once the stream ends."""
        kind, event_id, data = "", None, list[str]()
        async with asyncio.timeout(timeout):
            async for line in self._lines:
                if line == "":
                    if data or kind:
                        return Event(kind or "message", event_id, "\n".join(data))
                    continue
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    kind = value
                elif name == "data":
                    data.append(value)
                elif name == "id":
                    event_id = value
                elif name == "retry":
                    self.retries.append(int(value))
        return None

    async def next_event(self, timeout: float = 10.0) -> Event:
        """The next event; the stream must not end first."""
        event = await self.next(timeout)
        assert event is not None, "the stream ended"
        return event

    async def comment(self, timeout: float = 10.0) -> str:
        """The next comment line's text (events before it are dropped)."""
        async with asyncio.timeout(timeout):
            async for line in self._lines:
                if line.startswith(":"):
                    return line[1:].strip()
        raise AssertionError("the stream ended")


@asynccontextmanager
async def watching(
    client: httpx.AsyncClient, path: str, last_event_id: str | None = None
) -> AsyncIterator[EventStream]:
    """A /watch stream, checked to be one (200, text/event-stream) before it is read."""
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    async with client.stream("GET", path, headers=headers, timeout=httpx.Timeout(10, read=30)) as response:
        if response.status_code != 200:
            raise AssertionError(f"{response.status_code}: {(await response.aread()).decode()}")
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        yield EventStream(response)


class Replica:
    """A watcher's copy of the document, built as a client builds it: a snapshot, then patches on it."""

    def __init__(self) -> None:
        self.doc: Any = None
        self.id: str | None = None

    def apply(self, event: Event) -> None:
        if event.event == "snapshot":
            self.doc = event.json()
        else:
            assert event.event == "patch", event
            data = event.json()
            assert set(data) == {"base", "patch"}
            assert data["base"] == self.id, f"patch on {data['base']}, but the copy is at {self.id}"
            self.doc = jsonpatch.apply_patch(self.doc, data["patch"])
        assert event.id is not None
        self.id = event.id
