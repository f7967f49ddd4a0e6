"""eagercache: a refresh-ahead cache server. Fetchers run before entries expire, so readers never wait."""

from .app import create_app
from .errors import (
    ConfigurationError,
    EagerCacheError,
    FetchFailed,
    FetchTimeout,
    InvalidParameters,
    StoreUnavailable,
    UnknownFetcher,
)
from .fetchers import Fetcher, Registry, fetcher
from .item import DataItem, decode_item
from .settings import Settings, load_settings

__all__ = [
    "ConfigurationError",
    "DataItem",
    "EagerCacheError",
    "FetchFailed",
    "FetchTimeout",
    "Fetcher",
    "InvalidParameters",
    "Registry",
    "Settings",
    "StoreUnavailable",
    "UnknownFetcher",
    "create_app",
    "decode_item",
    "fetcher",
    "load_settings",
]
