"""The status page: `/` (an HTML page, or JSON for a client that prefers it) and its JSON under /status.

GET /                 the page (text/html), or the document of GET /status (Accept: application/json)
GET /status           the service (version, store, refresh mode, readiness, uptime, processes) and each fetcher
                      (options, entries, rates and percentiles of the last seconds)
GET /status/entries   a page of entries: ?fetcher= &q= (a substring of the query) &cursor= &limit=
GET /status/events    recent events after ?after=<id>
GET /status/history   one point per second: refreshes, errors, changes, refresh lag (?seconds= &fetcher=)
GET /status/static/*  the page's script, style sheet and icon (package data: no network needed)

Read-only for anyone, like /data: entries' queries and data are what any reader can ask for. A fetcher's
error text is not (it may carry an upstream's secrets; errors.FetchFailed): it is sent only with the admin
token (`Authorization: Bearer`), which the page keeps in the browser's sessionStorage and also uses for the
admin API's actions. Everything is this process's view: with `--workers`, another request may be answered
by another worker, with figures of its own (the page says which process answered).
"""

from __future__ import annotations

import asyncio
import glob
import os
import secrets
import time
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .engine import Engine
from .errors import Problem, int_param, invalid_parameter
from .history import PERCENTILE_WINDOW_S, RATE_WINDOW_S, SAMPLE_INTERVAL_S, Activity, quantile
from .item import parse_header
from .keys import split_entry_id
from .refresher import Refresher
from .sampler import Sampler
from .settings import Settings
from .store import Store, redact
from .watch import WatchHub

# Entries page: at most this many rows, and at most SCAN_BUDGET schedule members looked at per request,
# so a search that matches little costs a bounded scan and says where to go on (`next_cursor`).
MAX_PAGE = 200
DEFAULT_PAGE = 50
SCAN_BUDGET = 2_000
SCAN_STEP = 200
MAX_SEARCH_CHARS = 200
# Stale entries per fetcher are counted over at most this many of its entries, at most every CENSUS_S.
CENSUS_MAX = 1_000
CENSUS_S = 15.0
DESCRIBE_BATCH = 500
# Entry counts (one round trip per primary) are read at most this often, however many pages poll.
COUNTS_S = 1.0
MAX_HISTORY_S = 600
DEFAULT_HISTORY_S = 300

ASSETS = {"status.js": "text/javascript", "status.css": "text/css", "icon.svg": "image/svg+xml"}
# Self only: no inline script or style anywhere (the page has none), nothing from another origin.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
_JSON_HEADERS = {"cache-control": "no-store", "vary": "authorization"}


class StatusPage:
    """The page's routes and what they read: the sampler's history, events and readiness, and the store."""

    def __init__(
        self, engine: Engine, store: Store, refresher: Refresher, hub: WatchHub, sampler: Sampler, settings: Settings
    ) -> None:
        self.engine = engine
        self.hub = hub
        self.store = store
        self.refresher = refresher
        self.sampler = sampler
        self.settings = settings
        self._token = None if settings.admin_token is None else settings.admin_token.encode()
        self._version = _package_version()
        self._counts: tuple[float, dict[str, int]] = (-COUNTS_S, {})
        self._census: tuple[float, dict[str, tuple[int, int]]] = (-CENSUS_S, {})  # fetcher -> (stale, checked)
        self._census_lock = asyncio.Lock()
        static = resources.files("eagercache") / "static"
        self._page = (static / "status.html").read_bytes()
        self._assets = {name: (static / name).read_bytes() for name in ASSETS}

    def routes(self) -> list[Route]:
        return [
            Route("/", self.root, methods=["GET"]),
            Route("/status", self.status, methods=["GET"]),
            Route("/status/entries", self.entries, methods=["GET"]),
            Route("/status/events", self.events, methods=["GET"]),
            Route("/status/history", self.history, methods=["GET"]),
            Route("/status/static/{name}", self.asset, methods=["GET"]),
        ]

    # -- endpoints -----------------------------------------------------------------------------------

    async def root(self, request: Request) -> Response:
        """Content negotiation (RFC 9110, 12.5.1): JSON for a client that prefers it, else the page."""
        if _prefers_json(request.headers.get("accept", "")):
            response = await self.status(request)
        else:
            response = Response(self._page, media_type="text/html; charset=utf-8", headers=_SECURITY_HEADERS)
        response.headers["vary"] = "accept, authorization"
        return response

    async def asset(self, request: Request) -> Response:
        name: str = request.path_params["name"]
        if name not in ASSETS:
            raise Problem(404, "not-found", "Not found", "no such file")
        return Response(self._assets[name], media_type=ASSETS[name], headers=_SECURITY_HEADERS)

    async def status(self, request: Request) -> Response:
        self._viewer(request)
        counts = await self._entry_counts()
        census = await self._stale_census()
        return _json(
            {"service": self._service(), "fetchers": [self._fetcher(n, counts, census) for n in self._names()]}
        )

    async def entries(self, request: Request) -> Response:
        admin = self._viewer(request)
        params = request.query_params
        fetcher = params.get("fetcher") or None
        if fetcher is not None and fetcher not in self.engine.registry:
            raise Problem(404, "unknown-fetcher", "Unknown fetcher", f"no fetcher named {fetcher!r}")
        needle = params.get("q", "")
        if len(needle) > MAX_SEARCH_CHARS:
            raise invalid_parameter("q", f"at most {MAX_SEARCH_CHARS} characters")
        limit = int_param(params.get("limit"), "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        names = [fetcher] if fetcher is not None else self._names()
        index, cursor = _parse_cursor(params.get("cursor", ""), len(names))
        found: list[str] = []
        scanned, seen = 0, set()
        needle = needle.lower()
        while index < len(names) and len(found) < limit and scanned < SCAN_BUDGET:
            try:
                next_cursor, ids = await self.store.list_entries(
                    names[index], cursor, min(SCAN_STEP, limit - len(found))
                )
            except ValueError as exc:
                raise Problem(400, "bad-cursor", "Bad cursor", str(exc)) from None
            scanned += len(ids)
            for entry_id in ids:
                if entry_id not in seen and needle in split_entry_id(entry_id)[1].lower():
                    seen.add(entry_id)
                    found.append(entry_id)
            if next_cursor:
                cursor = next_cursor
            else:
                index, cursor = index + 1, ""
        rows = await self._rows(found, admin)
        more = f"{index}~{cursor}" if index < len(names) else None
        return _json({"entries": rows, "next_cursor": more, "scanned": scanned, "errors_shown": admin})

    async def events(self, request: Request) -> Response:
        admin = self._viewer(request)
        after = int_param(request.query_params.get("after"), "after", 0, 0, 2**53)
        events = self.sampler.recent.after(after)
        last = self.sampler.recent.events[-1].id if self.sampler.recent.events else 0
        docs = [msgspec.structs.asdict(e) | ({} if admin else {"error": None}) for e in events]
        return _json({"events": docs, "last_id": last, "errors_shown": admin})

    async def history(self, request: Request) -> Response:
        self._viewer(request)
        params = request.query_params
        seconds = int_param(params.get("seconds"), "seconds", DEFAULT_HISTORY_S, 1, MAX_HISTORY_S)
        fetcher = params.get("fetcher") or None
        if fetcher is not None and fetcher not in self.engine.registry:
            raise Problem(404, "unknown-fetcher", "Unknown fetcher", f"no fetcher named {fetcher!r}")
        points = self.sampler.history.series(seconds, fetcher)
        return _json({"interval_s": SAMPLE_INTERVAL_S, "fetcher": fetcher, "points": points})

    # -- documents -----------------------------------------------------------------------------------

    def _names(self) -> list[str]:
        return list(self.engine.registry)

    def _service(self) -> dict[str, Any]:
        readiness = self.sampler.readiness
        workers = _worker_count(self.engine.metrics.multiprocess_dir)
        return {
            "version": self._version,
            "now_ms": self.engine.clock.now_ms(),
            "uptime_s": round(time.monotonic() - self.sampler.started_at, 1),
            "store": {"url": redact(self.settings.redis_url), "kind": self.store.kind, **self.refresher.store_status()},
            "refresh_mode": self.refresher.mode,
            "ready": readiness.ready,
            "not_ready_because": readiness.reasons,
            "readiness_checked_ms": readiness.checked_ms,
            "processes": {
                "pid": os.getpid(),
                "workers": workers,
                "note": "figures are this process's; with --workers each worker counts its own"
                if workers > 1
                else "one process",
            },
            "admin_api": self._token is not None,
            "fetches_in_flight": self.engine.metrics.fetching,
            "watchers": self.hub.count,
        }

    def _fetcher(self, name: str, counts: dict[str, int], census: dict[str, tuple[int, int]]) -> dict[str, Any]:
        f = self.engine.registry[name]
        history = self.sampler.history
        rate, rate_s = history.window(RATE_WINDOW_S, name)
        spread, _ = history.window(PERCENTILE_WINDOW_S, name)
        stale, checked = census.get(name, (None, 0))

        def per_s(n: int) -> float | None:
            return round(n / rate_s, 3) if rate_s else None

        return {
            "name": name,
            "options": {k: v for k, v in f.options.as_dict().items()},
            "entries": counts.get(name, 0),
            "stale_entries": stale,
            "stale_checked": checked,
            "refreshes_per_s": per_s(rate.refreshes),
            "errors_per_s": per_s(rate.errors),
            "changes_per_s": per_s(rate.changes),
            "refresh_lag_s": _percentiles(spread, "lag", history.lag_bounds),
            "fetch_s": _percentiles(spread, "fetch", history.fetch_bounds),
        }

    async def _rows(self, entry_ids: list[str], admin: bool) -> list[dict[str, Any]]:
        if not entry_ids:
            return []
        described = await self.store.describe(entry_ids)
        now = self.engine.clock.now_ms()
        rows = []
        for entry_id, (header, due, stale) in zip(entry_ids, described, strict=True):
            entry = parse_header(header)
            if entry is None:
                continue  # removed since the scan, or not a value eagercache wrote
            name, query = split_entry_id(entry_id)
            fetcher = self.engine.registry[name]
            rows.append({
                "fetcher": name,
                "query": query,
                "age_s": round((now - entry.last_retrieved_ms) / 1000, 3),
                "last_modified_ms": entry.last_modified_ms,
                "next_refresh_in_s": None if due is None else round((due - now) / 1000, 3),
                "state": "STALE" if self.engine.is_stale(fetcher, entry, stale) else "HIT",
                "failures": stale.failures if stale else 0,
                "stale_since_ms": stale.since_ms if stale else None,
                "last_error": stale.error if stale and admin else None,
            })  # fmt: skip
        return rows

    async def _entry_counts(self) -> dict[str, int]:
        at, counts = self._counts
        if time.monotonic() - at >= COUNTS_S:
            counts = await self.store.entry_counts()
            self._counts = (time.monotonic(), counts)
        return counts

    async def _stale_census(self) -> dict[str, tuple[int, int]]:
        """Stale entries per fetcher among its first CENSUS_MAX on the schedule: read at most every CENSUS_S
        (while a page asks), so a store of 100,000 entries costs a bounded read, not a scan of everything."""
        async with self._census_lock:  # pages polling at once share one census
            at, census = self._census
            if time.monotonic() - at < CENSUS_S:
                return census
            census = {}
            for name in self._names():
                stale = checked = 0
                cursor = ""
                while checked < CENSUS_MAX:
                    cursor, ids = await self.store.list_entries(name, cursor, min(DESCRIBE_BATCH, CENSUS_MAX - checked))
                    ids = ids[: CENSUS_MAX - checked]
                    fetcher = self.engine.registry[name]
                    for header, _, marker in await self.store.describe(ids) if ids else []:
                        entry = parse_header(header)
                        if entry is not None:
                            checked += 1
                            stale += self.engine.is_stale(fetcher, entry, marker)
                    if not cursor:
                        break
                census[name] = (stale, checked)
            self._census = (time.monotonic(), census)
            return census

    def _viewer(self, request: Request) -> bool:
        """True with the admin token; a token that is not it is refused (the page tells its user)."""
        header = request.headers.get("authorization")
        if header is None:
            return False
        scheme, _, given = header.partition(" ")
        if self._token is None or scheme.lower() != "bearer" or not given.strip():
            raise Problem(403, "forbidden", "Forbidden", "the token is not valid (or the admin API is off)")
        if not secrets.compare_digest(given.strip().encode(), self._token):
            raise Problem(403, "forbidden", "Forbidden", "the token is not valid")
        return True


def _percentiles(activity: Activity, what: str, bounds: tuple[float, ...]) -> dict[str, float | None]:
    counts = activity.lag if what == "lag" else activity.fetch
    return {f"p{round(q * 100)}": _round(quantile(q, counts, bounds)) for q in (0.5, 0.99)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _prefers_json(accept: str) -> bool:
    """Whether `accept` ranks application/json above text/html (the most specific range that matches each
    gives its weight; a tie, an absent or an unparseable header: the page)."""
    weights = {"application/json": (-1, 0.0), "text/html": (-1, 0.0)}  # (specificity, q)
    for part in accept.split(","):
        media, *params = [p.strip() for p in part.split(";")]
        media = media.lower()
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        for wanted, (specificity, _) in list(weights.items()):
            kind = wanted.split("/")[0]
            level = 2 if media == wanted else 1 if media == f"{kind}/*" else 0 if media == "*/*" else -1
            if level > specificity:
                weights[wanted] = (level, q)
    return weights["application/json"][1] > weights["text/html"][1]


def _parse_cursor(raw: str, names: int) -> tuple[int, str]:
    """`<fetcher index>~<store cursor>`, as the entries endpoint returns it; '' starts at the beginning."""
    if not raw:
        return 0, ""
    index, sep, cursor = raw.partition("~")
    if not sep or not index.isdigit() or not int(index) < names or len(cursor) > 40:
        raise Problem(400, "bad-cursor", "Bad cursor", f"cursor {raw[:60]!r} is not one this API returned")
    return int(index), cursor


def _json(doc: Any) -> Response:
    return Response(msgspec.json.encode(doc), media_type="application/json", headers=_JSON_HEADERS)


def _worker_count(directory: str | None) -> int:
    """Processes serving with this one: 1, or under `--workers` those with live files in the metrics'
    multiprocess directory (one set per worker pid, removed when a worker stops)."""
    if directory is None:
        return 1
    pids = {path.rsplit("_", 1)[1] for path in glob.glob(os.path.join(directory, "gauge_live*_*.db"))}
    return max(1, len(pids))


def _package_version() -> str:
    try:
        return version("eagercache")
    except PackageNotFoundError:
        return "0"
