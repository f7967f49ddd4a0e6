"""eagercache: a refresh-ahead cache server. Fetchers run before entries expire, so readers never wait."""

from .app import create_app
from .embed import lifespan
from .errors import (
    ConfigurationError,
    DataTooStale,
    EagerCacheError,
    FetchFailed,
    FetchTimeout,
    InvalidParameters,
    QueryTooLong,
    StoreUnavailable,
    UnknownFetcher,
)
from .fetchers import Fetcher, Registry, fetcher
from .invalidation import invalidate, refresh
from .item import DataItem, decode_item
from .results import Keep, NotModified, Previous, Result
from .settings import Settings, load_settings

__all__ = [
    "ConfigurationError",
    "DataItem",
    "DataTooStale",
    "EagerCacheError",
    "FetchFailed",
    "FetchTimeout",
    "Fetcher",
    "InvalidParameters",
    "Keep",
    "NotModified",
    "Previous",
    "QueryTooLong",
    "Registry",
    "Result",
    "Settings",
    "StoreUnavailable",
    "UnknownFetcher",
    "create_app",
    "decode_item",
    "fetcher",
    "invalidate",
    "lifespan",
    "load_settings",
    "refresh",
]
