"""GET /openapi.json: every registered fetcher as its own path, typed from its signature (OpenAPI 3.1)."""

from __future__ import annotations

import inspect
import typing
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import msgspec

from .fetchers import Fetcher, Registry
from .params import MAX_ENTRY_ID_CHARS, MAX_QUERY_BYTES
from .status_spec import status_paths

_REF = "#/components/schemas/{name}"
_PROBLEM = {"$ref": "#/components/schemas/Problem"}
_ERRORS = {
    "400": "Invalid parameters: each bad parameter is named in `errors`",
    "404": "No fetcher has this name",
    "414": f"The query string is longer than {MAX_QUERY_BYTES} bytes",
    "502": "The fetcher failed, or returned something JSON cannot carry (only when the entry was missing)",
    "503": "The store is unreachable, or the data is staler than the fetcher's max_stale",
    "504": "The fetcher exceeded its timeout (only when the entry was missing)",
}
_WATCH_STREAM = (
    "`retry:` once; `event: snapshot` (`id:` the ETag, `data:` the /data body); `event: patch` (`id:` the new ETag, "
    '`data:` {"base": previous ETag, "patch": RFC 6902 operations}); `event: status` (`data:` {"state": "stale" '
    'or "fresh"}); a `: ping` comment every watch_ping seconds'
)
_HEADERS = {
    "ETag": "Strong validator of the data; the same data has the same tag on every replica",
    "Last-Modified": "When the data last changed (HTTP-date)",
    "Cache-Control": "max-age until the next refresh, stale-while-revalidate, stale-if-error",
    "Age": "Seconds since the data was fetched",
    "X-Cache": "HIT, STALE (refreshes are failing; last good data) or MISS (this read waited for a fetch)",
}


def openapi_document(registry: Registry) -> dict[str, Any]:
    fetchers = list(registry.values())
    types: list[Any] = []
    for f in fetchers:
        types.extend(p.element for p in f.signature.params)
        types.append(_return_type(f))
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    shapes = iter(schemas)
    paths: dict[str, Any] = {}
    for f in fetchers:
        params = [_parameter(p.name, next(shapes), p.many, p.required, p.default) for p in f.signature.params]
        data = next(shapes)
        item_name = f"Item_{f.name.replace('.', '_').replace('-', '_')}"
        components[item_name] = {
            "type": "object",
            "required": ["data", "last_retrieved", "last_modified"],
            "properties": {
                "data": data,
                "last_retrieved": {"type": "string", "format": "date-time"},
                "last_modified": {"type": "string", "format": "date-time"},
            },
        }
        summary = (inspect.getdoc(f.func) or f"Data from the {f.name} fetcher").splitlines()[0]
        paths[f"/data/{f.name}"] = {
            "get": _operation(f, "get", summary, params, item_name),
            "head": _operation(f, "head", summary, params, None),
        }
        paths[f"/watch/{f.name}"] = {"get": _watch_operation(f, summary, params)}
    components["Problem"] = _problem_schema()
    for path, what in [("/healthz", "The process is alive"), ("/readyz", "The store and the refresher are ready")]:
        paths[path] = {"get": {"summary": what, "responses": {
            "200": {"description": what, "content": {"application/json": {"schema": {"type": "object"}}}},
            "503": {"description": "Not ready", "content": {"application/problem+json": {"schema": _PROBLEM}}},
        }}}  # fmt: skip
    paths["/metrics"] = {"get": {"summary": "Prometheus metrics", "responses": {
        "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
    }}}  # fmt: skip
    paths.update(status_paths())
    return {
        "openapi": "3.1.0",
        "info": {"title": "eagercache", "version": _version(), "description": "Refresh-ahead cache of fetchers."},
        "paths": paths,
        "components": {"schemas": components},
    }


def _operation(f: Fetcher, method: str, summary: str, params: list[Any], item: str | None) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "The entry", "headers": _headers()}
    if item is not None:
        ok["content"] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{item}"}}}
    responses: dict[str, Any] = {"200": ok, "304": {"description": "Not modified", "headers": _headers()}}
    for status, what in _ERRORS.items():
        responses[status] = {"description": what}
        if method == "get":
            responses[status]["content"] = {"application/problem+json": {"schema": _PROBLEM}}
    return {
        "operationId": f"{method}_{f.name}",
        "summary": summary,
        "description": f"Refreshed every {f.ttl:g} s (+ up to {f.jitter:g} s); cache keys hold at most "
        f"{MAX_ENTRY_ID_CHARS} characters.",
        "parameters": params,
        "responses": responses,
    }


def _watch_operation(f: Fetcher, summary: str, params: list[Any]) -> dict[str, Any]:
    last_event_id = {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "description": "The id of the last event received: equal to the entry's current ETag, no snapshot is sent",
        "schema": {"type": "string"},
    }
    stream = {
        "description": _WATCH_STREAM,
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
    responses: dict[str, Any] = {"200": stream}
    for status, what in _ERRORS.items():
        if status == "503":
            what += ", or this process has --max-watchers streams open (with Retry-After)"
        responses[status] = {"description": what, "content": {"application/problem+json": {"schema": _PROBLEM}}}
    return {
        "operationId": f"watch_{f.name}",
        "summary": f"Watch: {summary}",
        "description": "The entry of the same query as /data, as Server-Sent Events: a snapshot, then a patch (or a "
        "snapshot) for each change of its data, whichever replica refreshed it, and its stale/fresh status.",
        "parameters": [*params, last_event_id],
        "responses": responses,
    }


def _parameter(name: str, schema: dict[str, Any], many: bool, required: bool, default: Any) -> dict[str, Any]:
    if many:
        schema = {"type": "array", "items": schema}
    elif not required and isinstance(default, str | int | float | bool):
        schema = {**schema, "default": default}
    # Repeated parameters for lists: ?tags=a&tags=b (OpenAPI style form, explode).
    return {"name": name, "in": "query", "required": required, "schema": schema, "style": "form", "explode": True}


def _headers() -> dict[str, Any]:
    return {name: {"description": what, "schema": {"type": "string"}} for name, what in _HEADERS.items()}


def _problem_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "RFC 9457 problem details",
        "required": ["type", "title", "status"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["parameter", "detail"],
                    "properties": {"parameter": {"type": "string"}, "detail": {"type": "string"}},
                },
            },
        },
    }


def _return_type(f: Fetcher) -> Any:
    """The fetcher's return annotation if msgspec can describe it, else Any."""
    try:
        annotation = typing.get_type_hints(f.func).get("return", Any)
        msgspec.json.schema(annotation)
    except Exception:
        return Any
    return annotation


def _version() -> str:
    try:
        return version("eagercache")
    except PackageNotFoundError:
        return "0"
