"""Fetchers: the `@fetcher` decorator, their validated definitions, and the registry they are loaded into."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, TypeVar, cast, overload

from .errors import ConfigurationError, UnknownFetcher
from .params import Call, Signature

ENTRY_POINT_GROUP = "eagercache.fetchers"
# Fetcher names appear in URLs and Redis keys: no '/', '?', ':' or whitespace.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_OPTIONS_ATTR = "__eagercache_options__"
_NAME_ATTR = "__eagercache_name__"

FetcherFunc = Callable[..., Awaitable[Any]]
F = TypeVar("F", bound=FetcherFunc)


@dataclass(frozen=True, slots=True)
class FetcherOptions:
    """Every option a fetcher has, with its default: the one place each is written.

    `@fetcher(...)`, the config file's `[fetcher.NAME]` tables, the admin listing, `eagercache fetchers`
    and the OpenAPI document all derive from these fields. Times are in seconds.
    """

    ttl: float = 60.0
    """How often an entry is refreshed (plus a random 0..jitter)."""
    jitter: float = 0.0
    timeout: float = 10.0
    """The longest a fetch may take; past it the fetch is cancelled and counts as a timeout."""
    max_stale: float | None = None
    """How long past its due time an entry whose refresh is failing is still served (STALE); then 503."""
    max_idle: float = 3600.0
    """An entry nobody reads (or watches) for this long stops being refreshed and is removed."""
    max_entries: int = 100_000
    """Past this many entries, new parameter combinations are fetched and answered but not cached."""
    max_concurrency: int | None = None
    """Fetches of this fetcher running at once in one process (None: only the process-wide limit)."""
    ignore_unknown: bool = False
    """Ignore query parameters the function does not take, instead of answering 400."""
    max_rate: float | None = None
    """The upstream budget: fetches per second of this fetcher across every replica (None: no budget).
    Past it, refreshes wait (the most recently read entries first) and their entries are served STALE
    within max_stale; a reader's fetch of a missing entry never waits, but counts."""
    indexed: tuple[str, ...] = ()
    """Parameters whose values are indexed, so that entries can be invalidated or refreshed by them
    (e.g. every entry with city=Oslo, whatever its other parameters) without a scan."""

    def check(self, where: str) -> None:
        """Raise ConfigurationError naming `where` for an option that cannot work."""
        for option in ("ttl", "jitter", "timeout", "max_idle", "max_stale", "max_rate"):
            value = getattr(self, option)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigurationError(f"{where}: {option} must be a number of seconds, got {value!r}")
            if value is not None and not math.isfinite(value):
                raise ConfigurationError(f"{where}: {option} must be a finite number of seconds, got {value}")
        if not self.ttl > 0:
            raise ConfigurationError(f"{where}: ttl must be > 0 seconds, got {self.ttl}")
        if not self.jitter >= 0:
            raise ConfigurationError(f"{where}: jitter must be >= 0 seconds, got {self.jitter}")
        if not self.timeout > 0:
            raise ConfigurationError(f"{where}: timeout must be > 0 seconds, got {self.timeout}")
        if self.max_stale is not None and not self.max_stale >= 0:
            raise ConfigurationError(f"{where}: max_stale must be >= 0 seconds or None, got {self.max_stale}")
        if self.max_rate is not None and not self.max_rate > 0:
            raise ConfigurationError(f"{where}: max_rate must be > 0 fetches per second or None, got {self.max_rate}")
        if not self.max_idle > 0:
            raise ConfigurationError(f"{where}: max_idle must be > 0 seconds, got {self.max_idle}")
        for option in ("max_entries", "max_concurrency"):
            value = getattr(self, option)
            if value is not None and (type(value) is not int):
                raise ConfigurationError(f"{where}: {option} must be an integer, got {value!r}")
        if not self.max_entries >= 1:
            raise ConfigurationError(f"{where}: max_entries must be >= 1, got {self.max_entries}")
        if self.max_concurrency is not None and not self.max_concurrency >= 1:
            raise ConfigurationError(f"{where}: max_concurrency must be >= 1 or None, got {self.max_concurrency}")
        if type(self.ignore_unknown) is not bool:
            raise ConfigurationError(f"{where}: ignore_unknown must be true or false, got {self.ignore_unknown!r}")
        if not isinstance(self.indexed, tuple) or not all(isinstance(n, str) for n in self.indexed):
            raise ConfigurationError(f"{where}: indexed must be a list of parameter names, got {self.indexed!r}")
        if len(self.indexed) > MAX_INDEXED:
            raise ConfigurationError(f"{where}: at most {MAX_INDEXED} parameters may be indexed")

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(FetcherOptions)}


OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(FetcherOptions))
# Each indexed parameter adds a tag to every entry's stored header (item.py), which is bounded.
MAX_INDEXED = 8
_DEFAULT = FetcherOptions()


@overload
def fetcher(func: F, /) -> F: ...
@overload
def fetcher(
    *,
    name: str | None = ...,
    ttl: float = ...,
    jitter: float = ...,
    timeout: float = ...,
    max_stale: float | None = ...,
    max_idle: float = ...,
    max_entries: int = ...,
    max_concurrency: int | None = ...,
    ignore_unknown: bool = ...,
    max_rate: float | None = ...,
    indexed: Sequence[str] = ...,
) -> Callable[[F], F]: ...
def fetcher(
    func: F | None = None,
    /,
    *,
    name: str | None = None,
    ttl: float = _DEFAULT.ttl,
    jitter: float = _DEFAULT.jitter,
    timeout: float = _DEFAULT.timeout,
    max_stale: float | None = _DEFAULT.max_stale,
    max_idle: float = _DEFAULT.max_idle,
    max_entries: int = _DEFAULT.max_entries,
    max_concurrency: int | None = _DEFAULT.max_concurrency,
    ignore_unknown: bool = _DEFAULT.ignore_unknown,
    max_rate: float | None = _DEFAULT.max_rate,
    indexed: Sequence[str] = _DEFAULT.indexed,
) -> F | Callable[[F], F]:
    """Mark an async function as a fetcher; each option is described on `FetcherOptions`.

    The function is returned unchanged, so it stays a plain async function that tests can call.
    """
    options = FetcherOptions(
        ttl=ttl,
        jitter=jitter,
        timeout=timeout,
        max_stale=max_stale,
        max_idle=max_idle,
        max_entries=max_entries,
        max_concurrency=max_concurrency,
        ignore_unknown=ignore_unknown,
        max_rate=max_rate,
        # a str is refused by check(), not split into one-letter names
        indexed=cast(tuple[str, ...], indexed) if isinstance(indexed, str) else tuple(indexed),
    )

    def mark(f: F) -> F:
        setattr(f, _OPTIONS_ATTR, options)
        setattr(f, _NAME_ATTR, name)
        return f

    return mark(func) if func is not None else mark


@dataclass(frozen=True, slots=True, kw_only=True)
class Fetcher(FetcherOptions):
    """A registered fetcher: the function, its query signature, where it came from, and its options."""

    name: str
    func: FetcherFunc
    signature: Signature
    source: str = "code"

    @property
    def options(self) -> FetcherOptions:
        return FetcherOptions(**{option: getattr(self, option) for option in OPTION_NAMES})

    @classmethod
    def from_callable(
        cls, func: Any, *, name: str | None = None, source: str = "code", overrides: Mapping[str, Any] | None = None
    ) -> Fetcher:
        options = getattr(func, _OPTIONS_ATTR, None) or _DEFAULT
        name = str(
            next((n for n in (name, getattr(func, _NAME_ATTR, None)) if n is not None), getattr(func, "__name__", ""))
        )
        where = f"fetcher {name!r} ({source})"
        if overrides:
            unknown = set(overrides) - OPTION_NAMES
            if unknown:
                raise ConfigurationError(f"{where}: unknown option {sorted(unknown)[0]!r}")
            if isinstance(overrides.get("indexed"), list):  # a TOML array
                overrides = {**overrides, "indexed": tuple(overrides["indexed"])}
            options = dataclasses.replace(options, **overrides)
        if not inspect.iscoroutinefunction(func):
            raise ConfigurationError(f"{where}: must be an async function (async def), got {func!r}")
        if not _NAME.fullmatch(name):
            raise ConfigurationError(f"{where}: name must match {_NAME.pattern}")
        options.check(where)
        signature = Signature(func, name, ignore_unknown=options.ignore_unknown)
        taken = {p.name for p in signature.params}
        for param in options.indexed:
            if param not in taken:
                raise ConfigurationError(f"{where}: indexed names {param!r}, which is not one of its parameters")
        return cls(name=name, func=func, signature=signature, source=source, **options.as_dict())

    def tags_of(self, call: Call, result_tags: tuple[str, ...]) -> list[str]:
        """An entry's tags: its result's, and one per indexed parameter (`param_tag`)."""
        tags = list(result_tags)
        for param in self.signature.params:
            if param.name in self.indexed:
                value = call.kwargs[param.name]
                tags.append(param_tag(self.name, param.name, None if value is None else param.canonical(value)))
        return tags


def param_tag(fetcher_name: str, param: str, spelled: list[str] | None) -> str:
    """The tag an indexed parameter's value gives an entry: of fixed length, whatever the value's."""
    value = "-" if spelled is None else hashlib.blake2b("\0".join(spelled).encode(), digest_size=8).hexdigest()
    return f"{fetcher_name}?{param}={value}"


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
        f = self._known(name)
        return f, f.signature.call_from_query(query)

    def call_of_entry(self, entry_id: str) -> tuple[Fetcher, Call]:
        """A stored entry's fetcher and call (see `Signature.call_of_entry`), raising as `call` does."""
        f = self._known(entry_id.partition("?")[0])
        return f, f.signature.call_of_entry(entry_id)

    def _known(self, name: str) -> Fetcher:
        f = self._fetchers.get(name)
        if f is None:
            raise UnknownFetcher(f"no fetcher named {name!r}")
        return f


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
