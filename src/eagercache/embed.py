"""eagercache inside another ASGI app: its lifespan for the host's, 503 outside it, and the prefix in OpenAPI.

Starlette (so FastAPI) runs the lifespan of the app the server was given, never that of an app mounted in
it. A host that mounts the app `create_app` made enters `eagercache.lifespan(cache_app)` in its own
lifespan: the store is prepared and the refresher started there, and the host's shutdown drains them. A
request that comes while that lifespan does not run is answered 503 `not-running`, not served by an app
whose refresher never started (on `memory://` it would answer, and never refresh).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Literal

import msgspec
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from .errors import EagerCacheError, Problem, ShuttingDown, problem_response

Lifespan = Callable[[Starlette], AbstractAsyncContextManager[None]]
# Encoded OpenAPI documents kept, one per prefix the app is served under (mounts and --root-path are the
# deployment's, not the clients'; the bound is there all the same).
MAX_PREFIXES = 8
# What a request after the lifespan ended is told to wait (another replica, or this one restarted, answers).
ENDED_RETRY_AFTER_S = 1


class Lifecycle:
    """Where an app is in its lifespan, which runs once: requests are served only while it runs."""

    __slots__ = ("lifespan", "running", "state")

    def __init__(self) -> None:
        self.state: Literal["new", "starting", "running", "ended"] = "new"
        self.running = False  # read on every request (app.DataFastPath): one attribute, no comparison
        self.lifespan: Lifespan | None = None  # the app's, as wrapped

    def wrap(self, lifespan: Lifespan) -> Lifespan:
        """`lifespan`, refused a second time (a running or stopped engine cannot start again), and marking
        the app running from the end of its start-up to the start of its shutdown."""

        @asynccontextmanager
        async def once(app: Starlette) -> AsyncIterator[None]:
            if self.state != "new":
                raise RuntimeError(
                    f"this eagercache app's lifespan {'has ended' if self.state == 'ended' else 'is running'}; it "
                    "runs once. Enter it in one place: the server's (the app served directly) or the host's "
                    "lifespan (eagercache.lifespan(app), for a mounted app), not both"
                )
            self.state = "starting"
            try:
                async with lifespan(app):
                    self.state, self.running = "running", True
                    try:
                        yield
                    finally:
                        self.running = False
            finally:
                self.state = "ended"

        self.lifespan = once
        return once

    def error(self) -> EagerCacheError:
        """Why a request is not served now."""
        if self.state == "ended":
            return ShuttingDown(
                "eagercache's lifespan has ended: the server is shutting down",
                headers={"Retry-After": str(ENDED_RETRY_AFTER_S)},
            )
        return Problem(
            503,
            "not-running",
            "Not running",
            "eagercache's lifespan is not running: an app that mounts eagercache must enter "
            "eagercache.lifespan(cache_app) in its own lifespan (Starlette does not run a mounted app's lifespan)"
            if self.state == "new"
            else "eagercache's lifespan is starting",
        )

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await problem_response(self.error())(scope, receive, send)


def lifespan(app: Starlette) -> AbstractAsyncContextManager[None]:
    """The lifespan of `app`, an app made by `create_app`, for a host app that mounts it.

    Starlette and FastAPI do not run a mounted app's lifespan; enter this in the host's own, around the
    `yield` (inside whatever the fetchers use, so that it is open while they run and while the shutdown
    drains them)::

        cache = eagercache.create_app([...])

        @asynccontextmanager
        async def lifespan(app: FastAPI):
            async with eagercache.lifespan(cache):
                yield

        app = FastAPI(lifespan=lifespan)
        app.mount("/cache", cache)

    It prepares the store and starts the refresher; on exit it drains in-flight fetches (up to the
    shutdown timeout), gives back unfinished refresh claims and closes the store. It runs once.
    """
    lifecycle = getattr(getattr(app, "state", None), "lifecycle", None)
    if not isinstance(lifecycle, Lifecycle) or lifecycle.lifespan is None:
        raise TypeError(
            f"eagercache.lifespan() takes the app eagercache.create_app() returned (the one mounted), not {app!r}"
        )
    return lifecycle.lifespan(app)


class OpenAPISpec:
    """/openapi.json as served below a prefix (a mount's, or a proxy's `root_path`): with `servers` set to it,
    so that the paths resolve under the prefix (OpenAPI 3.1, 4.8.5: a server URL may be relative to where
    the document is served; none means `/`). Encoded once per prefix."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self._encoded: dict[str, bytes] = {"": msgspec.json.encode(document)}

    def at(self, root_path: str) -> bytes:
        spec = self._encoded.get(root_path)
        if spec is None:
            spec = msgspec.json.encode({**self.document, "servers": [{"url": root_path}]})
            if len(self._encoded) < MAX_PREFIXES:
                self._encoded[root_path] = spec
        return spec
