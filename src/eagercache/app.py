"""The Starlette app: routes, the Date header, and the lifespan that runs the refresher."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .access import check_access
from .admin import admin_routes
from .embed import Lifecycle, OpenAPISpec
from .engine import Engine
from .errors import (
    DataTooStale,
    EagerCacheError,
    FetchFailed,
    ShuttingDown,
    StoreUnavailable,
    exception_handlers,
    problem_response,
)
from .fetchers import build_registry
from .memstore import build_store
from .metrics import UNKNOWN_FETCHER_LABEL, Metrics
from .openapi import openapi_document
from .refresher import Refresher
from .representation import Representer, http_date, request_headers
from .sampler import Sampler
from .settings import Settings, load_settings
from .status import StatusPage
from .store import redact
from .stream import SERVER_SEND, WatchStreams
from .watch import WatchHub

log = logging.getLogger(__name__)
# /readyz answers within this, whatever Redis does (an orchestrator's probe has a timeout of its own).
READY_PROBE_TIMEOUT_S = 0.5


class _AsgiEndpoint:
    """Marks a function as a raw ASGI endpoint for Starlette's Route (a plain function would be wrapped)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class DateHeader:
    """Adds `Date` (RFC 9110, 6.6.1) from the store's clock, the one Last-Modified and Age come from, so a
    replica whose own clock is off never sends a Last-Modified later than its Date."""

    def __init__(self, app: ASGIApp, date: Callable[[], bytes]) -> None:
        self.app = app
        self.date = date  # the header's value now (app.create_app: the store clock's second, formatted once)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_date(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"date", self.date())]
            await send(message)

        await self.app(scope, receive, send_with_date)


class DataFastPath:
    """GET and HEAD of /data/... and /watch/... go straight to their endpoints, past Starlette's exception
    middleware and router and the Date middleware (together ~13 % of a warm hit's CPU in a profile; for a
    stream, three wrappers around each event's send); every other request goes the usual way. Placed just
    inside ServerErrorMiddleware, which still turns anything unexpected into the app's 500 problem. Any
    request while the app's lifespan does not run (a mount whose host never entered it) is answered 503
    here (embed.py)."""

    def __init__(
        self,
        app: ASGIApp,
        answer: Callable[[str, Scope], Awaitable[Response]],
        date: Callable[[], bytes] | None,
        lifecycle: Lifecycle,
        watch: ASGIApp,
    ) -> None:
        self.app = app
        self.answer = answer
        self.date = date
        self.lifecycle = lifecycle
        self.watch = watch  # sends its own Date header and problems (stream.py)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if not self.lifecycle.running:
                await self.lifecycle.refuse(scope, receive, send)
                return
            if scope["method"] in ("GET", "HEAD"):
                path = _route_path(scope)
                if path.startswith("/data/"):
                    response = await self.answer(path[len("/data/") :], scope)
                    if self.date is not None:
                        response.raw_headers.append((b"date", self.date()))
                    await response(scope, receive, send)
                    return
                if path.startswith("/watch/"):
                    scope["path_params"] = {"fetcher": path[len("/watch/") :]}
                    await self.watch(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class _App(Starlette):
    """Starlette, which leaves the server's own `send` in each HTTP request's scope before its middleware wraps
    it (ServerErrorMiddleware, always outermost): a /watch stream writes its events under it (stream.py)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        scope[SERVER_SEND] = send
        try:
            await super().__call__(scope, receive, send)
        finally:
            # The server's request cycle holds this scope, and `send` is bound to that cycle: left in place, a
            # reference cycle per request that only the garbage collector frees (its collections then land
            # on the requests of that moment: most of a hit's p99 over many keys).
            del scope[SERVER_SEND]


def _route_path(scope: Scope) -> str:
    """The path below the app's mount point (`root_path`), as Starlette's router matches it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :]
    return path


def create_app(
    fetchers: Iterable[Any] | Mapping[str, Any] = (),
    *,
    redis_url: str | None = None,
    namespace: str | None = None,
    settings: Settings | None = None,
    use_entry_points: bool = False,
    handle_signals: bool = False,
    date_header: bool = False,
) -> Starlette:
    """Build the eagercache ASGI app.

    `fetchers` are async functions (optionally decorated with `@fetcher`), or a mapping of name to
    function; `settings.fetchers` specs and, with `use_entry_points`, the `eagercache.fetchers`
    entry points are added to them. Keyword arguments override the matching settings.
    `handle_signals` (the CLI sets it) starts the shutdown timeout at SIGTERM/SIGINT, not only when the
    server has finished its requests, so a reader waiting for a slow fetch cannot hold shutdown.
    `date_header` sends `Date` from the store's clock; run the server without its own then (uvicorn's
    `date_header=False`), as the CLI does, or there are two.
    """
    settings = settings or load_settings()
    settings = msgspec.structs.replace(
        settings, **{k: v for k, v in {"redis_url": redis_url, "namespace": namespace}.items() if v is not None}
    )
    registry = build_registry(
        fetchers, specs=settings.fetchers, use_entry_points=use_entry_points, overrides=settings.fetcher_overrides
    )
    metrics = Metrics()
    store = build_store(
        settings.redis_url,
        namespace=settings.namespace,
        buckets=settings.buckets,
        max_connections=settings.redis_max_connections,
        read_budget_s=settings.read_budget,
        auth=settings.redis_auth(),
        shadow_keys=settings.expiry_events,
    )
    engine = Engine(registry, store, metrics, settings)
    refresher = Refresher(engine, store, settings)
    hub = WatchHub(engine, store, settings)
    sampler = Sampler(engine, store, lambda: refresher.problems() + hub.problems())  # the status page's
    kind = "in-memory store: this process only, lost on exit" if store.is_memory else "Redis"
    log.info("eagercache", extra={"store": redact(settings.redis_url), "kind": kind, "fetchers": ",".join(registry)})

    representer = Representer()

    def report_cache_sizes() -> None:
        for cache, (entries, size) in {**engine.cache_sizes(), "representations": representer.cache_size()}.items():
            metrics.cache_entries.labels(cache).set(entries)
            if size is not None:
                metrics.cache_bytes.labels(cache).set(size)

    metrics.on_flush(report_cache_sizes)
    # Counted in plain ints, added to the prometheus series at the scrape (metrics.py); looked up once per pair.
    served = functools.cache(lambda name, cache: metrics.served(name, cache.lower()))

    async def data(scope: Scope, receive: Receive, send: Send) -> None:
        # A plain ASGI endpoint: the hit path builds no Request and no Headers, it picks three raw headers.
        response = await answer(scope["path_params"]["fetcher"], scope)
        await response(scope, receive, send)

    async def answer(name: str, scope: Scope) -> Response:
        try:
            read = await engine.read(name, scope["query_string"])
        except EagerCacheError as exc:
            label = name if name in registry else UNKNOWN_FETCHER_LABEL
            metrics.request_count(label, "error").inc()
            if isinstance(exc, (StoreUnavailable, DataTooStale, ShuttingDown)):
                log.warning("read failed", extra={"fetcher": name, "error": exc.detail})
            elif not isinstance(exc, FetchFailed):  # fetch failures were logged once by the fetch itself
                log.debug("bad request", extra={"fetcher": name, "error": exc.detail})
            return problem_response(exc)
        served(name, read.cache).record(max(0, read.now_ms - read.entry.last_retrieved_ms) / 1000)
        return await representer.respond(read, request_headers(scope))

    spec = OpenAPISpec(openapi_document(registry))

    async def openapi(request: Request) -> Response:
        return Response(spec.at(request.scope.get("root_path", "")), media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def readyz(request: Request) -> Response:
        reasons = []
        if engine.shutting_down:
            reasons.append("shutting down")
        try:
            await store.ping(READY_PROBE_TIMEOUT_S)
        except StoreUnavailable as exc:
            reasons.append(exc.detail)
        reasons += refresher.problems() + hub.problems()
        if reasons:
            raise StoreUnavailable("; ".join(reasons))
        return Response(
            msgspec.json.encode({"status": "ready", **refresher.store_status()}), media_type="application/json"
        )

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def shutting_down() -> None:
        engine.begin_shutdown()
        hub.close()  # streams end now, or the server would wait for them (its graceful shutdown)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # metrics last out: their final flush sees everything
        async with metrics.flushing(), serving(app), sampler.running():
            yield

    @asynccontextmanager
    async def serving(app: Starlette) -> AsyncIterator[None]:
        try:
            await check_access(store)  # pings first: one clear error for a user that may not do its work
            await store.prepare()
            await store.ping()
            log.info("store ready", extra=refresher.store_status())
            await store.warm()
            await refresher.start()
            await hub.start()
            if handle_signals:
                _on_shutdown_signals(shutting_down)
            yield
        finally:
            try:
                try:
                    await hub.stop()
                finally:
                    await refresher.stop()
            finally:
                await store.aclose()

    def date() -> bytes:
        return http_date(store.clock.now_ms() // 1000)  # cached per second

    lifecycle = Lifecycle()
    admin = [] if settings.admin_token is None else admin_routes(engine, settings.admin_token)
    watch = WatchStreams(hub, settings.watch_ping, date if date_header else None)
    status = StatusPage(engine, store, refresher, hub, sampler, settings)
    app = _App(
        routes=[
            *admin,
            Route("/data/{fetcher:path}", _AsgiEndpoint(data), methods=["GET", "HEAD"]),
            Route("/watch/{fetcher:path}", _AsgiEndpoint(watch), methods=["GET"]),
            Route("/openapi.json", openapi),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
            *status.routes(),
        ],
        exception_handlers=exception_handlers(),
        lifespan=lifecycle.wrap(lifespan),
    )

    if date_header:
        app.add_middleware(DateHeader, date=date)
    # the outermost
    app.add_middleware(
        DataFastPath, answer=answer, date=date if date_header else None, lifecycle=lifecycle, watch=watch
    )
    app.state.engine = engine
    app.state.lifecycle = lifecycle  # eagercache.lifespan(app) knows the app by it
    app.state.refresher = refresher
    app.state.metrics = metrics
    app.state.registry = registry
    app.state.store = store
    app.state.watch = hub
    return app


def _on_shutdown_signals(callback: Callable[[], None]) -> None:
    """Call `callback` in the event loop on SIGTERM/SIGINT, then the handler that was there (uvicorn's)."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; the server's own timeout still applies
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def chained(signum: int, frame: Any, previous: Callable[[int, Any], Any] = previous) -> None:
            loop.call_soon_threadsafe(callback)
            previous(signum, frame)

        signal.signal(sig, chained)
