"""Fetchers: the `@fetcher` decorator, their validated definitions, and the registry they are loaded into."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, TypeVar, overload

from .errors import ConfigurationError, UnknownFetcher
from .params import Call, Signature

ENTRY_POINT_GROUP = "eagercache.fetchers"
DEFAULT_TTL_S = 60.0
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_IDLE_S = 3600.0
DEFAULT_MAX_ENTRIES = 100_000
# Fetcher names appear in URLs and Redis keys: no '/', '?', ':' or whitespace.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_OPTIONS_ATTR = "__eagercache_options__"

FetcherFunc = Callable[..., Awaitable[Any]]
F = TypeVar("F", bound=FetcherFunc)


@dataclass(frozen=True, slots=True)
class FetcherOptions:
    """What `@fetcher(...)` attaches to a function. Times are in seconds."""

    ttl: float = DEFAULT_TTL_S
    jitter: float = 0.0
    timeout: float = DEFAULT_TIMEOUT_S
    name: str | None = None
    max_stale: float | None = None
    max_idle: float = DEFAULT_MAX_IDLE_S
    max_entries: int = DEFAULT_MAX_ENTRIES
    max_concurrency: int | None = None
    ignore_unknown: bool = False


@overload
def fetcher(func: F, /) -> F: ...
@overload
def fetcher(
    *,
    ttl: float = ...,
    jitter: float = ...,
    timeout: float = ...,
    name: str | None = ...,
    max_stale: float | None = ...,
    max_idle: float = ...,
    max_entries: int = ...,
    max_concurrency: int | None = ...,
    ignore_unknown: bool = ...,
) -> Callable[[F], F]: ...
def fetcher(
    func: F | None = None,
    /,
    *,
    ttl: float = DEFAULT_TTL_S,
    jitter: float = 0.0,
    timeout: float = DEFAULT_TIMEOUT_S,
    name: str | None = None,
    max_stale: float | None = None,
    max_idle: float = DEFAULT_MAX_IDLE_S,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_concurrency: int | None = None,
    ignore_unknown: bool = False,
) -> F | Callable[[F], F]:
    """Mark an async function as a fetcher. Times are in seconds.

    - `ttl` (+ a random `0..jitter`): how often an entry is refreshed; `timeout`: the longest a fetch may take.
    - `max_stale`: while refreshes fail, the last good data is served marked stale for at most this
      long, then reads answer 503 (None: no limit).
    - `max_idle`: an entry nobody reads for this long stops being refreshed and is removed.
    - `max_entries`: past this many entries, new parameter combinations are fetched and answered but
      not cached.
    - `max_concurrency`: fetches of this fetcher running at once in one process (None: only the
      process-wide limit).
    - `ignore_unknown`: query parameters the function does not take are ignored instead of answered
      with 400 (e.g. cache-busting or tracking parameters added by clients).

    The function is returned unchanged, so it stays a plain async function that tests can call.
    """
    options = FetcherOptions(
        ttl=ttl,
        jitter=jitter,
        timeout=timeout,
        name=name,
        max_stale=max_stale,
        max_idle=max_idle,
        max_entries=max_entries,
        max_concurrency=max_concurrency,
        ignore_unknown=ignore_unknown,
    )

    def mark(f: F) -> F:
        setattr(f, _OPTIONS_ATTR, options)
        return f

    return mark(func) if func is not None else mark


@dataclass(frozen=True)
class Fetcher:
    """A registered fetcher: the function, its query signature and its timing."""

    name: str
    func: FetcherFunc
    signature: Signature
    ttl: float
    jitter: float
    timeout: float
    source: str
    max_stale: float | None = None
    max_idle: float = DEFAULT_MAX_IDLE_S
    max_entries: int = DEFAULT_MAX_ENTRIES
    max_concurrency: int | None = None

    @classmethod
    def from_callable(
        cls, func: Any, *, name: str | None = None, source: str = "code", overrides: Mapping[str, Any] | None = None
    ) -> Fetcher:
        options = getattr(func, _OPTIONS_ATTR, None) or FetcherOptions()
        if overrides:
            options = dataclasses.replace(options, **overrides)
        name = str(next((n for n in (name, options.name) if n is not None), getattr(func, "__name__", "")))
        where = f"fetcher {name!r} ({source})"
        if not inspect.iscoroutinefunction(func):
            raise ConfigurationError(f"{where}: must be an async function (async def), got {func!r}")
        if not _NAME.fullmatch(name):
            raise ConfigurationError(f"{where}: name must match {_NAME.pattern}")
        for option in ("ttl", "jitter", "timeout", "max_idle", "max_stale"):
            value = getattr(options, option)
            if value is not None and not math.isfinite(value):
                raise ConfigurationError(f"{where}: {option} must be a finite number of seconds, got {value}")
        if not options.ttl > 0:
            raise ConfigurationError(f"{where}: ttl must be > 0 seconds, got {options.ttl}")
        if not options.jitter >= 0:
            raise ConfigurationError(f"{where}: jitter must be >= 0 seconds, got {options.jitter}")
        if not options.timeout > 0:
            raise ConfigurationError(f"{where}: timeout must be > 0 seconds, got {options.timeout}")
        if options.max_stale is not None and not options.max_stale >= 0:
            raise ConfigurationError(f"{where}: max_stale must be >= 0 seconds or None, got {options.max_stale}")
        if not options.max_idle > 0:
            raise ConfigurationError(f"{where}: max_idle must be > 0 seconds, got {options.max_idle}")
        for option in ("max_entries", "max_concurrency"):
            value = getattr(options, option)
            if value is not None and (type(value) is not int):
                raise ConfigurationError(f"{where}: {option} must be an integer, got {value!r}")
        if not options.max_entries >= 1:
            raise ConfigurationError(f"{where}: max_entries must be >= 1, got {options.max_entries}")
        if options.max_concurrency is not None and not options.max_concurrency >= 1:
            raise ConfigurationError(f"{where}: max_concurrency must be >= 1 or None, got {options.max_concurrency}")
        return cls(
            name,
            func,
            Signature(func, name, ignore_unknown=options.ignore_unknown),
            options.ttl,
            options.jitter,
            options.timeout,
            source,
            max_stale=options.max_stale,
            max_idle=options.max_idle,
            max_entries=options.max_entries,
            max_concurrency=options.max_concurrency,
        )


class Registry(Mapping[str, Fetcher]):
    """Fetchers by name; built once at start-up and shared by serving and refreshing."""

    def __init__(self, fetchers: Iterable[Fetcher] = ()) -> None:
        self._fetchers: dict[str, Fetcher] = {}
        for f in fetchers:
            self.add(f)

    def add(self, f: Fetcher) -> None:
        if (other := self._fetchers.get(f.name)) is not None:
            raise ConfigurationError(f"fetcher name {f.name!r} is registered twice: by {other.source} and {f.source}")
        self._fetchers[f.name] = f

    def replace(self, f: Fetcher) -> None:
        self._fetchers[f.name] = f

    def __getitem__(self, name: str) -> Fetcher:
        return self._fetchers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fetchers)

    def __len__(self) -> int:
        return len(self._fetchers)

    def call(self, name: str, query: bytes | str) -> tuple[Fetcher, Call]:
        """Resolve a request (or a stored entry id's parts) to its fetcher and validated call."""
        f = self._fetchers.get(name)
        if f is None:
            raise UnknownFetcher(f"no fetcher named {name!r}")
        return f, f.signature.call_from_query(query)


def build_registry(
    fetchers: Iterable[Any] | Mapping[str, Any] = (),
    *,
    specs: Iterable[str] = (),
    use_entry_points: bool = False,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Registry:
    """Collect fetchers passed in code, named by `module:attribute` specs, and from entry points.

    `overrides` (from the config file) replace options of fetchers by name, e.g. {"rates": {"ttl": 10}}.
    """
    registry = Registry()
    if isinstance(fetchers, Mapping):
        for name, func in fetchers.items():
            registry.add(_as_fetcher(func, name=name))
    else:
        for func in fetchers:
            registry.add(_as_fetcher(func))
    for spec in specs:
        registry.add(Fetcher.from_callable(load_spec(spec), source=f"--fetchers {spec}"))
    if use_entry_points:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                func = ep.load()
            except Exception as exc:
                raise ConfigurationError(f"entry point {ep.name} = {ep.value} failed to load: {exc!r}") from exc
            registry.add(Fetcher.from_callable(func, name=ep.name, source=f"entry point {ep.name} = {ep.value}"))
    for name, changes in (overrides or {}).items():
        if name not in registry:
            known = ", ".join(sorted(registry)) or "none"
            raise ConfigurationError(f"config: [fetcher.{name}] names no registered fetcher (registered: {known})")
        f = registry[name]
        registry.replace(
            Fetcher.from_callable(
                f.func, name=name, source=f"{f.source}, [fetcher.{name}] in config", overrides=changes
            )
        )
    return registry


def _as_fetcher(obj: Any, name: str | None = None) -> Fetcher:
    return obj if isinstance(obj, Fetcher) and name is None else Fetcher.from_callable(obj, name=name)


def load_spec(spec: str) -> Any:
    """Import `package.module:attribute`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(f"fetcher spec {spec!r} must look like package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigurationError(f"fetcher spec {spec!r}: cannot import {module_name!r}: {exc!r}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigurationError(f"fetcher spec {spec!r}: module {module_name!r} has no {attr!r}") from None
