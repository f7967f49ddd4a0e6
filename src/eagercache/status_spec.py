"""The status page's endpoints (status.py) as OpenAPI 3.1 paths, for /openapi.json."""

from __future__ import annotations

from typing import Any

_PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
_FORBIDDEN = {"description": "An Authorization header whose bearer token is not the admin token", "content": _PROBLEM}
_BAD = {"description": "A parameter out of range, or a cursor this API did not return", "content": _PROBLEM}
_UNKNOWN = {"description": "No fetcher has this name", "content": _PROBLEM}
_TOKEN_NOTE = (
    " Read-only, for anyone; with `Authorization: Bearer <admin token>` fetchers' error texts are included (they "
    "may carry an upstream's secrets), and a token that is not the admin token is refused (403)."
)
_NUMBER = {"type": ["number", "null"]}
_PERCENTILES = {
    "type": "object",
    "required": ["p50", "p99"],
    "properties": {"p50": _NUMBER, "p99": _NUMBER},
}
_STATUS = {
    "type": "object",
    "required": ["service", "fetchers"],
    "properties": {
        "service": {
            "type": "object",
            "required": ["version", "now_ms", "uptime_s", "store", "refresh_mode", "ready", "not_ready_because"],
            "properties": {
                "version": {"type": "string"},
                "now_ms": {"type": "integer", "description": "The store's clock (ms since the epoch)"},
                "uptime_s": {"type": "number"},
                "store": {"type": "object", "description": "URL (password redacted), kind, topology, primaries"},
                "refresh_mode": {"type": "string", "enum": ["events+schedule", "schedule"]},
                "ready": {"type": "boolean"},
                "not_ready_because": {"type": "array", "items": {"type": "string"}},
                "processes": {"type": "object", "description": "This process's pid, and how many serve with it"},
            },
        },
        "fetchers": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "options", "entries", "refresh_lag_s", "fetch_s"],
                "properties": {
                    "name": {"type": "string"},
                    "options": {"type": "object"},
                    "entries": {"type": "integer"},
                    "stale_entries": {"type": ["integer", "null"]},
                    "stale_checked": {"type": "integer", "description": "Entries looked at to count stale ones"},
                    "refreshes_per_s": _NUMBER,
                    "errors_per_s": _NUMBER,
                    "changes_per_s": _NUMBER,
                    "refresh_lag_s": _PERCENTILES,
                    "fetch_s": _PERCENTILES,
                },
            },
        },
    },
}
_ENTRIES = {
    "type": "object",
    "required": ["entries", "next_cursor", "scanned"],
    "properties": {
        "entries": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["fetcher", "query", "state"],
                "properties": {
                    "fetcher": {"type": "string"},
                    "query": {"type": "string", "description": "Canonical query string: /data/{fetcher}?{query}"},
                    "age_s": {"type": "number"},
                    "last_modified_ms": {"type": "integer"},
                    "next_refresh_in_s": _NUMBER,
                    "state": {"type": "string", "enum": ["HIT", "STALE"]},
                    "failures": {"type": "integer"},
                    "stale_since_ms": {"type": ["integer", "null"]},
                    "last_error": {"type": ["string", "null"]},
                },
            },
        },
        "next_cursor": {"type": ["string", "null"]},
        "scanned": {"type": "integer"},
    },
}
_EVENTS = {
    "type": "object",
    "required": ["events", "last_id"],
    "properties": {
        "events": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "at_ms", "kind", "detail"],
                "properties": {
                    "id": {"type": "integer"},
                    "at_ms": {"type": "integer"},
                    "kind": {"type": "string"},
                    "detail": {"type": "string"},
                    "fetcher": {"type": ["string", "null"]},
                    "entry": {"type": ["string", "null"]},
                    "error": {"type": ["string", "null"]},
                },
            },
        },
        "last_id": {"type": "integer"},
    },
}
_HISTORY = {
    "type": "object",
    "required": ["interval_s", "points"],
    "properties": {
        "interval_s": {"type": "number"},
        "fetcher": {"type": ["string", "null"]},
        "points": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "at_ms": {"type": "integer"},
                    "refreshes": {"type": "integer"},
                    "errors": {"type": "integer"},
                    "changes": {"type": "integer"},
                    "lag_p50_s": _NUMBER,
                    "lag_p99_s": _NUMBER,
                },
            },
        },
    },
}


def _query(name: str, schema: dict[str, Any], what: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": what}


def _json(schema: dict[str, Any], what: str) -> dict[str, Any]:
    return {"description": what, "content": {"application/json": {"schema": schema}}}


def status_paths() -> dict[str, Any]:
    """The paths of `/` and /status/..."""
    fetcher = _query("fetcher", {"type": "string"}, "Only this fetcher's")
    return {
        "/": {"get": {
            "operationId": "status_page",
            "summary": "The status page (HTML), or the status document for a client that prefers JSON",
            "description": "Content negotiation by Accept: application/json ranked above text/html gets GET "
            "/status's document; anything else the page." + _TOKEN_NOTE,
            "responses": {
                "200": {"description": "The page, or the status", "content": {
                    "text/html": {"schema": {"type": "string"}}, "application/json": {"schema": _STATUS},
                }},
                "403": _FORBIDDEN,
            },
        }},
        "/status": {"get": {
            "operationId": "status",
            "summary": "The service and its fetchers: options, entries, rates, percentiles (this process's)",
            "description": "Rates over the last 10 s and percentiles over the last 60 s of this process (with "
            "--workers, each worker's own); stale entries counted among each fetcher's first 1,000." + _TOKEN_NOTE,
            "responses": {"200": _json(_STATUS, "The status"), "403": _FORBIDDEN},
        }},
        "/status/entries": {"get": {
            "operationId": "status_entries",
            "summary": "A page of entries, searchable by fetcher and by a substring of the query",
            "description": "At most 2,000 entries are looked at per request: a search that matches little "
            "returns fewer rows and a next_cursor to go on from." + _TOKEN_NOTE,
            "parameters": [
                fetcher,
                _query("q", {"type": "string", "maxLength": 200}, "A substring of the query (any case)"),
                _query("cursor", {"type": "string"}, "next_cursor of the previous page"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}, "Rows wanted"),
            ],
            "responses": {"200": _json(_ENTRIES, "Entries"), "400": _BAD, "403": _FORBIDDEN, "404": _UNKNOWN},
        }},
        "/status/events": {"get": {
            "operationId": "status_events",
            "summary": "Recent events of this process (the last 200): failures, stale entries, removals, failovers",
            "description": "Events whose id is above `after`, oldest first." + _TOKEN_NOTE,
            "parameters": [_query("after", {"type": "integer", "minimum": 0, "default": 0}, "The last id seen")],
            "responses": {"200": _json(_EVENTS, "Events"), "400": _BAD, "403": _FORBIDDEN},
        }},
        "/status/history": {"get": {
            "operationId": "status_history",
            "summary": "Per-second refreshes, errors, changes and refresh lag of the last minutes (this process's)",
            "parameters": [
                _query("seconds", {"type": "integer", "minimum": 1, "maximum": 600, "default": 300}, "How far back"),
                fetcher,
            ],
            "responses": {"200": _json(_HISTORY, "One point per second"), "400": _BAD, "403": _FORBIDDEN,
                          "404": _UNKNOWN},
        }},
    }  # fmt: skip
