"""The exception tree, and the one place problem documents (RFC 9457) are rendered.

Each subclass a reader can hit maps to one problem type. Endpoints raise; the handlers registered by
`exception_handlers()` render, so no endpoint builds a problem document by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"


class EagerCacheError(Exception):
    """Root of every error eagercache raises on purpose."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})

    def problem(self) -> dict[str, Any]:
        """The RFC 9457 problem document (section 3) for this error."""
        return {
            "type": f"urn:eagercache:problem:{self.slug}" if self.slug else "about:blank",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }


class Problem(EagerCacheError):
    """An error whose status and type are chosen where it is raised (admin, auth)."""

    def __init__(
        self, status: int, slug: str, title: str, detail: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail, headers=headers)
        self.status, self.slug, self.title = status, slug, title  # type: ignore[misc]


def int_param(raw: str | None, name: str, default: int, low: int, high: int) -> int:
    """A query parameter of the admin and status routes that takes an integer in low..high; `default` if
    absent, a 400 problem for anything else."""
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise invalid_parameter(name, f"must be an integer {low}..{high}")
    return value


def invalid_parameter(name: str, detail: str) -> Problem:
    """The 400 problem for one bad query parameter of the admin and status routes."""
    return Problem(400, "invalid-parameters", "Invalid parameters", f"{name} {detail}")


class ConfigurationError(EagerCacheError):
    """Settings or fetcher definitions that cannot work; raised at start-up, never while serving."""

    slug = "configuration"
    title = "Invalid configuration"


class UnknownFetcher(EagerCacheError):
    status = 404
    slug = "unknown-fetcher"
    title = "Unknown fetcher"


class InvalidParameters(EagerCacheError):
    """The query string does not match the fetcher's signature; `errors` names each bad parameter."""

    status = 400
    slug = "invalid-parameters"
    title = "Invalid parameters"

    def __init__(self, errors: dict[str, str]) -> None:
        self.errors = errors
        names = ", ".join(sorted(errors))
        super().__init__(f"{len(errors)} invalid parameter{'s' if len(errors) != 1 else ''}: {names}")

    def problem(self) -> dict[str, Any]:
        doc = super().problem()
        doc["errors"] = [{"parameter": name, "detail": detail} for name, detail in sorted(self.errors.items())]
        return doc


class QueryTooLong(EagerCacheError):
    status = 414
    slug = "query-too-long"
    title = "Query string too long"


class FetchFailed(EagerCacheError):
    """The fetcher raised (anything at all), or returned something that cannot be encoded as JSON.

    `detail` (what a reader sees) names the exception's type only: its message may carry an upstream's
    secrets. `error` is the whole story, for the log and the stale marker (admin API).
    """

    status = 502
    slug = "fetch-failed"
    title = "Fetcher failed"

    def __init__(self, detail: str, *, error: str | None = None) -> None:
        super().__init__(detail)
        self.error = error or detail


class FetchTimeout(FetchFailed):
    """The fetcher did not answer within its `timeout` (eagercache's own deadline, nothing else)."""

    status = 504
    slug = "fetch-timeout"
    title = "Fetcher timed out"


class StoreUnavailable(EagerCacheError):
    """Redis cannot be reached or answered with an error."""

    status = 503
    slug = "store-unavailable"
    title = "Store unavailable"


class StoreTimeout(StoreUnavailable):
    """Redis did not answer within the budget of the caller (a reader's, or a probe's)."""


class DataTooStale(EagerCacheError):
    """The entry's refresh is overdue by more than the fetcher's `max_stale`: too old to serve."""

    status = 503
    slug = "data-too-stale"
    title = "Data too stale"


class ShuttingDown(EagerCacheError):
    """The process is stopping and the answer was not ready within the shutdown timeout."""

    status = 503
    slug = "shutting-down"
    title = "Shutting down"


class TooManyWatchers(EagerCacheError):
    """This process has `max_watchers` /watch streams open; another replica, or a later try, takes the watch."""

    status = 503
    slug = "too-many-watchers"
    title = "Too many watchers"


def problem_response(error: EagerCacheError) -> Response:
    """The problem+json response for an error, with its headers (Retry-After, WWW-Authenticate)."""
    doc = error.problem()
    return Response(msgspec.json.encode(doc), status_code=error.status, media_type=PROBLEM_JSON, headers=error.headers)


async def _eagercache_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EagerCacheError)
    return problem_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return problem_response(Problem(exc.status_code, "", exc.detail, exc.detail, headers=exc.headers))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    return problem_response(EagerCacheError("the server failed to answer; the error is in its log"))


def exception_handlers() -> dict[Any, Any]:
    """Starlette's `exception_handlers`: every error becomes a problem document, a 500 without a trace."""
    return {EagerCacheError: _eagercache_error, HTTPException: _http_error, Exception: _unexpected}
