"""The exception tree. Each subclass that a reader can hit maps to one RFC 9457 problem type."""

from __future__ import annotations

from typing import Any, ClassVar


class EagerCacheError(Exception):
    """Root of every error eagercache raises on purpose."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def problem(self) -> dict[str, Any]:
        """The RFC 9457 problem document (section 3) for this error."""
        return {
            "type": f"urn:eagercache:problem:{self.slug}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }


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
    """The fetcher raised, or returned something that cannot be encoded as JSON."""

    status = 502
    slug = "fetch-failed"
    title = "Fetcher failed"


class FetchTimeout(FetchFailed):
    status = 504
    slug = "fetch-timeout"
    title = "Fetcher timed out"


class StoreUnavailable(EagerCacheError):
    """Redis cannot be reached or answered with an error."""

    status = 503
    slug = "store-unavailable"
    title = "Store unavailable"


class DataTooStale(EagerCacheError):
    """Refreshes have failed for longer than the fetcher's `max_stale`: the last good data is too old to serve."""

    status = 503
    slug = "data-too-stale"
    title = "Data too stale"
