"""The Starlette app: routes, problem documents, and the lifespan that runs the refresher."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .admin import admin_routes
from .engine import Engine
from .errors import DataTooStale, EagerCacheError, FetchFailed, StoreUnavailable
from .fetchers import build_registry
from .keys import Keys
from .metrics import UNKNOWN_FETCHER_LABEL, Metrics
from .openapi import openapi_document
from .refresher import Refresher
from .representation import Representer, request_headers
from .settings import Settings, load_settings
from .store import Store, now_ms, redact

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"


def problem_response(doc: dict[str, Any], headers: Mapping[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(doc), status_code=doc["status"], media_type=PROBLEM_JSON, headers=headers)


class _AsgiEndpoint:
    """Marks a function as a raw ASGI endpoint for Starlette's Route (a plain function would be wrapped)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def problem_of(error: EagerCacheError) -> Response:
    return problem_response(error.problem())


def create_app(
    fetchers: Iterable[Any] | Mapping[str, Any] = (),
    *,
    redis_url: str | None = None,
    namespace: str | None = None,
    settings: Settings | None = None,
    use_entry_points: bool = False,
) -> Starlette:
    """Build the eagercache ASGI app.

    `fetchers` are async functions (optionally decorated with `@fetcher`), or a mapping of name to
    function; `settings.fetchers` specs and, with `use_entry_points`, the `eagercache.fetchers`
    entry points are added to them. Keyword arguments override the matching settings.
    """
    settings = settings or load_settings()
    settings = msgspec.structs.replace(
        settings, **{k: v for k, v in {"redis_url": redis_url, "namespace": namespace}.items() if v is not None}
    )
    registry = build_registry(
        fetchers,
        specs=settings.fetchers,
        use_entry_points=use_entry_points,
        overrides={name: o.changes() for name, o in settings.fetcher_overrides.items()},
    )
    metrics = Metrics()
    store = Store.from_url(settings.redis_url, Keys(settings.namespace), max_connections=settings.redis_max_connections)
    engine = Engine(
        registry,
        store,
        metrics,
        max_concurrent_fetches=settings.max_concurrent_fetches,
        near_cache_ttl_s=settings.near_cache_ttl,
    )
    refresher = Refresher(
        engine,
        store,
        max_concurrent=settings.max_concurrent_fetches,
        backstop_interval_s=settings.backstop_interval,
        shutdown_timeout_s=settings.shutdown_timeout,
    )
    kind = "in-memory store: this process only, lost on exit" if store.is_memory else "Redis"
    log.info("eagercache", extra={"store": redact(settings.redis_url), "kind": kind, "fetchers": ",".join(registry)})

    representer = Representer()
    # prometheus-client's labels() takes a lock and builds a key on every call: look each child up once.
    read_metrics = functools.cache(
        lambda name, cache: (metrics.requests.labels(name, cache.lower()), metrics.data_age.labels(name))
    )

    async def data(scope: Scope, receive: Receive, send: Send) -> None:
        # A plain ASGI endpoint: the hit path builds no Request and no Headers, it picks three raw headers.
        response = await answer(scope["path_params"]["fetcher"], scope)
        await response(scope, receive, send)

    async def answer(name: str, scope: Scope) -> Response:
        try:
            read = await engine.read(name, scope["query_string"])
        except EagerCacheError as exc:
            label = name if name in registry else UNKNOWN_FETCHER_LABEL
            metrics.requests.labels(label, "error").inc()
            if isinstance(exc, (StoreUnavailable, DataTooStale)):
                log.warning("read failed", extra={"fetcher": name, "error": exc.detail})
            elif not isinstance(exc, FetchFailed):  # fetch failures were logged once by the fetch itself
                log.debug("bad request", extra={"fetcher": name, "error": exc.detail})
            return problem_of(exc)
        request_counter, age_histogram = read_metrics(name, read.cache)
        request_counter.inc()
        age_histogram.observe(max(0, now_ms() - read.entry.last_retrieved_ms) / 1000)
        return representer.respond(read, request_headers(scope))

    spec = msgspec.json.encode(openapi_document(registry))

    async def openapi(request: Request) -> Response:
        return Response(spec, media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def readyz(request: Request) -> Response:
        reasons = []
        try:
            await store.ping()
        except StoreUnavailable as exc:
            reasons.append(exc.detail)
        if refresher.uses_events and not refresher.subscribed:
            reasons.append("not subscribed to Redis expiry events")
        if reasons:
            return problem_response(StoreUnavailable("; ".join(reasons)).problem())
        return Response(b'{"status":"ready"}', media_type="application/json")

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        doc = {"type": "about:blank", "title": exc.detail, "status": exc.status_code}
        return problem_response(doc, headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
        doc = {
            "type": "urn:eagercache:problem:internal-error",
            "title": "Internal error",
            "status": 500,
            "detail": "the server failed to answer; the error is in its log",
        }
        return problem_response(doc)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            await store.ping()
            await refresher.start()
            yield
        finally:
            await refresher.stop()
            await store.aclose()

    admin = [] if settings.admin_token is None else admin_routes(engine, settings.admin_token, problem_of)
    app = Starlette(
        routes=[
            *admin,
            Route("/data/{fetcher:path}", _AsgiEndpoint(data), methods=["GET", "HEAD"]),
            Route("/openapi.json", openapi),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.refresher = refresher
    app.state.metrics = metrics
    app.state.registry = registry
    app.state.store = store
    return app
