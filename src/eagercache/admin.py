"""The admin API under /admin: list, refresh and invalidate entries. Off unless a bearer token is set.

GET    /admin/fetchers                              fetchers, their options and entry counts
GET    /admin/fetchers/{name}/entries?cursor=&limit= one page of entries (age, next refresh, stale, last error)
POST   /admin/fetchers/{name}/refresh?{query}       fetch one stored entry now; answers with the new item
DELETE /admin/fetchers/{name}/entry?{query}         invalidate one entry (the next read fetches it again)
DELETE /admin/fetchers/{name}/entries?{params}      invalidate the fetcher's entries with these parameter
                                                     values (any others; none given: every entry)
POST   /admin/fetchers/{name}/entries/refresh?{params} make the same entries due now (fetched again at once)
DELETE /admin/tags/{tag}                            invalidate every entry that carries the tag
POST   /admin/tags/{tag}/refresh                    make them due now
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .engine import Engine
from .errors import Problem, int_param
from .invalidation import act
from .item import Entry
from .keys import split_entry_id
from .params import query_values

MAX_PAGE = 500
DEFAULT_PAGE = 50
# Entries removed per SCAN round when invalidating a whole fetcher.
INVALIDATE_BATCH = 500

Endpoint = Callable[[Request], Awaitable[Response]]


def admin_routes(engine: Engine, token: str) -> list[Route]:
    """The /admin routes, each behind the bearer token (compared in constant time)."""
    expected = token.encode()

    def guarded(endpoint: Endpoint) -> Endpoint:
        async def check(request: Request) -> Response:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given:
                raise Problem(
                    401,
                    "unauthorized",
                    "Unauthorized",
                    "send Authorization: Bearer <token>",
                    headers={"www-authenticate": 'Bearer realm="eagercache admin"'},
                )
            if not secrets.compare_digest(given.strip().encode(), expected):
                raise Problem(403, "forbidden", "Forbidden", "the token is not valid")
            return await endpoint(request)

        return check

    async def fetchers(request: Request) -> Response:
        out = []
        counts = await engine.store.entry_counts()  # one round trip per node for every fetcher
        for f in engine.registry.values():
            out.append({
                "name": f.name, "source": f.source, **f.options.as_dict(),
                "entries": counts.get(f.name, 0),
                "parameters": [p.name for p in f.signature.params],
            })  # fmt: skip
        return _json({"fetchers": out})

    async def entries(request: Request) -> Response:
        name = _known(engine, request)
        cursor = request.query_params.get("cursor", "")
        limit = int_param(request.query_params.get("limit"), "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        try:
            next_cursor, ids = await engine.store.list_entries(name, cursor, limit)
        except ValueError as exc:
            raise Problem(400, "bad-cursor", "Bad cursor", str(exc)) from None
        now = engine.clock.now_ms()
        described = await engine.store.describe(ids)
        items: list[dict[str, Any]] = []
        for entry_id, (header, due, stale) in zip(ids, described, strict=True):
            if header is None:
                continue  # removed since the scan
            try:
                entry = Entry.parse(header.split(b"\n", 1)[0] + b"\n")
            except ValueError:
                continue  # not a value eagercache wrote: nothing to list
            items.append({
                "entry": entry_id,
                "query": split_entry_id(entry_id)[1],
                "etag": entry.etag,
                "age_s": round((now - entry.last_retrieved_ms) / 1000, 3),
                "last_modified_ms": entry.last_modified_ms,
                "next_refresh_in_s": None if due is None else round((due - now) / 1000, 3),
                "stale": stale is not None,
                "failures": stale.failures if stale else 0,
                "stale_since_ms": stale.since_ms if stale else None,
                "last_error": stale.error if stale else None,
            })  # fmt: skip
        return _json({"entries": items, "next_cursor": next_cursor or None})

    async def refresh(request: Request) -> Response:
        name = _known(engine, request)
        read = await engine.force_refresh(name, request.scope["query_string"])
        if read is None:
            raise Problem(404, "no-such-entry", "No such entry", "that entry is not stored: nothing to refresh")
        return Response(read.entry.body, media_type="application/json")

    async def invalidate_one(request: Request) -> Response:
        name = _known(engine, request)
        _, call = engine.registry.call(name, request.scope["query_string"])
        if not await engine.forget(call.entry_id, name):
            raise Problem(404, "no-such-entry", "No such entry", "that entry is not stored")
        return Response(status_code=204)

    async def invalidate_matching(request: Request) -> Response:
        name = _known(engine, request)
        removed = await act(engine, "forget", fetcher=name, where=query_values(request.scope["query_string"]))
        return _json({"removed": removed})

    async def refresh_matching(request: Request) -> Response:
        name = _known(engine, request)
        return _json(
            {
                "refreshing": await act(
                    engine, "refresh", fetcher=name, where=query_values(request.scope["query_string"])
                )
            }
        )

    async def invalidate_tagged(request: Request) -> Response:
        return _json({"removed": await act(engine, "forget", tag=request.path_params["tag"])})

    async def refresh_tagged(request: Request) -> Response:
        return _json({"refreshing": await act(engine, "refresh", tag=request.path_params["tag"])})

    return [
        Route("/admin/fetchers", guarded(fetchers), methods=["GET"]),
        Route("/admin/fetchers/{name}/entries", guarded(entries), methods=["GET"]),
        Route("/admin/fetchers/{name}/entries", guarded(invalidate_matching), methods=["DELETE"]),
        Route("/admin/fetchers/{name}/entries/refresh", guarded(refresh_matching), methods=["POST"]),
        Route("/admin/tags/{tag:path}", guarded(invalidate_tagged), methods=["DELETE"]),
        Route("/admin/tags/{tag:path}/refresh", guarded(refresh_tagged), methods=["POST"]),
        Route("/admin/fetchers/{name}/refresh", guarded(refresh), methods=["POST"]),
        Route("/admin/fetchers/{name}/entry", guarded(invalidate_one), methods=["DELETE"]),
    ]


def _json(doc: Any) -> Response:
    return Response(msgspec.json.encode(doc), media_type="application/json")


def _known(engine: Engine, request: Request) -> str:
    name: str = request.path_params["name"]
    if name not in engine.registry:
        raise Problem(404, "unknown-fetcher", "Unknown fetcher", f"no fetcher named {name!r}")
    return name
