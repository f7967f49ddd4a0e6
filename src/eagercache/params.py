"""Query strings ↔ fetcher keyword arguments, and the canonical form that names a cache entry.

The canonical query lists, sorted by name, every parameter whose value differs from its default,
each value in one fixed spelling and percent-encoded with nothing left safe. Two requests for the
same call therefore get the same entry, and no value (``&``, ``=``, ``:``, unicode, empty) can make
two different calls collide: the encoding is injective and decodes back to the same arguments.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union
from urllib.parse import quote, unquote_to_bytes

import msgspec

from .errors import ConfigurationError, InvalidParameters, QueryTooLong
from .results import Previous

_SCALARS = (str, int, float, bool)
# Longer query strings are refused with 414 (RFC 9110, 15.5.15): no legitimate call needs them.
MAX_QUERY_BYTES = 4096
# Redis keys can be 512 MB, but a key this long is a mistake or an attack, and costs memory on every refresh.
MAX_ENTRY_ID_CHARS = 2048
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")  # what quote() leaves as it is, whatever `safe` says


@dataclass(frozen=True, slots=True)
class Param:
    """One keyword parameter of a fetcher, as the query string sees it."""

    name: str
    annotation: Any
    element: Any
    many: bool
    required: bool
    default: Any
    # The default's canonical spelling, so that `?x=1.0` and an omitted `x: float = 1` share one entry.
    default_spelling: list[str] | None = None

    def convert(self, raw: list[str]) -> Any:
        """Convert the query's values for this parameter; raise ValueError with a reader-facing reason."""
        if not self.many and len(raw) > 1:
            raise ValueError(f"expected one value, got {len(raw)}")
        values = [self.convert_one(text) for text in raw]
        return values if self.many else values[0]

    def convert_one(self, text: str) -> Any:
        try:
            value = msgspec.convert(text, self.element, strict=False)
        except msgspec.ValidationError as exc:
            raise ValueError(_describe(exc, self.element, text)) from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {text!r}")
        return value

    def canonical(self, value: Any) -> list[str]:
        return [_spell(v) for v in value] if self.many else [_spell(value)]


class Call(msgspec.Struct, frozen=True):  # one per refresh: a frozen dataclass's __init__ was ~1 us of it
    """A validated call of one fetcher: its arguments and the id of the cache entry that holds its result."""

    fetcher_name: str
    kwargs: dict[str, Any]
    entry_id: str


class Signature:
    """The query-facing signature of a fetcher function. `previous` names the parameter that is given the
    previous result (results.Previous), not taken from the query; None if the function has none."""

    def __init__(self, func: Callable[..., Any], fetcher_name: str, *, ignore_unknown: bool = False) -> None:
        self.fetcher_name = fetcher_name
        self.ignore_unknown = ignore_unknown
        self.params, self.previous = _params_of(func, fetcher_name)
        self._by_name = {p.name: p for p in self.params}
        self._defaults = {p.name: p.default for p in self.params if not p.required}
        self._quoted_names = {p.name: _quote(p.name) for p in self.params}
        self.takes_lists = any(p.many for p in self.params)

    def call_from_query(self, query: bytes | str) -> Call:
        """Validate a raw query string (bytes as received, or the canonical text) into a Call."""
        pairs = parse_query(query)
        errors: dict[str, str] = {}
        grouped: dict[str, list[str]] = {}
        for name, value in pairs:
            if name not in self._by_name:
                if not self.ignore_unknown:
                    errors[name] = "unknown parameter"
            else:
                grouped.setdefault(name, []).append(value)
        kwargs: dict[str, Any] = {}
        for param in self.params:
            raw = grouped.get(param.name)
            if raw is None:
                if param.required:
                    errors[param.name] = "required parameter is missing"
                else:
                    kwargs[param.name] = param.default
                continue
            try:
                kwargs[param.name] = param.convert(raw)
            except ValueError as exc:
                errors[param.name] = str(exc)
        if errors:
            raise InvalidParameters(errors)
        entry_id = f"{self.fetcher_name}?{self._canonical(kwargs)}"
        if len(entry_id) > MAX_ENTRY_ID_CHARS:
            raise InvalidParameters(
                {
                    "(query)": f"the parameters make a cache key of {len(entry_id)} characters; at most "
                    f"{MAX_ENTRY_ID_CHARS} are accepted"
                }
            )
        return Call(self.fetcher_name, kwargs, entry_id)

    def call_of_entry(self, entry_id: str) -> Call:
        """The call a stored entry id names (`fetcher?canonical-query`, as `call_from_query` made it), for a
        refresh. A plain canonical query (one value per parameter, nothing percent-encoded) is read without
        being validated and spelled again: that was ~8 us of every refresh's ~60. Anything else, and any
        value that no longer converts, goes through `call_from_query`, which raises for what is invalid now.
        The call keeps the stored id even where today's canonical spelling differs (a default changed
        since): it is that entry that is refreshed."""
        query = entry_id.partition("?")[2]
        if "%" in query or "+" in query:
            return self._call_named(query, entry_id)
        kwargs = dict(self._defaults)
        last = ""  # canonical names come sorted, each once
        if query:
            for pair in query.split("&"):
                name, _, text = pair.partition("=")
                param = self._by_name.get(name)
                if param is None or param.many or name <= last:
                    return self._call_named(query, entry_id)
                try:
                    kwargs[name] = param.convert_one(text)
                except ValueError:
                    return self._call_named(query, entry_id)
                last = name
        if len(kwargs) != len(self.params):  # a required parameter is missing
            return self._call_named(query, entry_id)
        return Call(self.fetcher_name, kwargs, entry_id)

    def _call_named(self, query: str, entry_id: str) -> Call:
        call = self.call_from_query(query)
        return call if call.entry_id == entry_id else Call(call.fetcher_name, call.kwargs, entry_id)

    def spellings(self, given: Mapping[str, Any]) -> dict[str, list[str] | None]:
        """Canonical spellings of some parameters' values, as an entry id has them: values as text (from a
        query string) or typed (from Python), a list for a repeated parameter. InvalidParameters names
        each unknown parameter or bad value."""
        errors: dict[str, str] = {}
        spelled: dict[str, list[str] | None] = {}
        for name, value in given.items():
            param = self._by_name.get(name)
            if param is None:
                errors[name] = "unknown parameter"
                continue
            if value is None:
                spelled[name] = None  # only a default can be None: entries that left it out
                continue
            texts = [v if isinstance(v, str) else _spell(v) for v in (value if isinstance(value, list) else [value])]
            try:
                spelled[name] = param.canonical(param.convert(texts))
            except ValueError as exc:
                errors[name] = str(exc)
        if errors:
            raise InvalidParameters(errors)
        return spelled

    def spellings_of(self, canonical_query: str) -> dict[str, list[str] | None]:
        """Every parameter's spelling in a stored entry's canonical query (its default's where it is left out)."""
        grouped = query_values(canonical_query)
        return {p.name: grouped.get(p.name, p.default_spelling) for p in self.params}

    def _canonical(self, kwargs: dict[str, Any]) -> str:
        parts: list[str] = []
        for param in self.params:  # already sorted by name
            value = kwargs[param.name]
            if value is None:  # only a default can be None: the query string has no spelling for it
                continue
            spelled = param.canonical(value)
            if not param.required and spelled == param.default_spelling:
                continue
            name = self._quoted_names[param.name]
            parts.extend(f"{name}={_quote(text)}" for text in spelled)
        return "&".join(parts)


def parse_query(query: bytes | str) -> list[tuple[str, str]]:
    """Split a query string into decoded (name, value) pairs.

    Unlike urllib's parse_qsl this refuses invalid UTF-8 instead of replacing it with U+FFFD, which
    would silently merge distinct requests into one entry.
    """
    raw = query.encode("ascii") if isinstance(query, str) else query
    if len(raw) > MAX_QUERY_BYTES:
        raise QueryTooLong(f"the query string has {len(raw)} bytes; at most {MAX_QUERY_BYTES} are accepted")
    pairs: list[tuple[str, str]] = []
    for chunk in raw.split(b"&"):
        if not chunk:
            continue
        name, _, value = chunk.partition(b"=")
        escaped = b"%" in chunk or b"+" in chunk  # else the text is as sent: only decoded (most queries)
        if escaped and _BAD_ESCAPE.search(chunk):
            raise InvalidParameters(
                {
                    _unquote(name, errors="replace"): "invalid percent-encoding (% must be followed "
                    "by two hex digits; send a literal % as %25)"
                }
            )
        try:
            pairs.append((_unquote(name), _unquote(value)) if escaped else (name.decode(), value.decode()))
        except UnicodeDecodeError:
            raise InvalidParameters({_unquote(name, errors="replace"): "not valid UTF-8"}) from None
    return pairs


def query_values(query: bytes | str) -> dict[str, list[str]]:
    """A query string's values by parameter name, in the order given (`parse_query`'s errors)."""
    grouped: dict[str, list[str]] = {}
    for name, value in parse_query(query):
        grouped.setdefault(name, []).append(value)
    return grouped


def _quote(text: str) -> str:
    """Percent-encoded with nothing left safe but what quote() never encodes (letters, digits, `_.-~`)."""
    if text.isascii() and (text.isalnum() or _UNRESERVED.fullmatch(text) is not None):
        return text  # the usual value: quote() would return it as it is, ~0.6 us later
    return quote(text, safe="")


def _unquote(text: bytes, errors: str = "strict") -> str:
    # application/x-www-form-urlencoded: '+' is a space (WHATWG URL standard, section 5.1).
    return unquote_to_bytes(text.replace(b"+", b" ")).decode("utf-8", errors)


def _spell(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _describe(exc: msgspec.ValidationError, element: Any, text: str) -> str:
    if typing.get_origin(element) is Literal:
        allowed = ", ".join(repr(choice) for choice in typing.get_args(element))
        return f"expected one of {allowed}, got {text!r}"
    if isinstance(element, type) and issubclass(element, enum.Enum):
        allowed = ", ".join(repr(member.value) for member in element)
        return f"expected one of {allowed}, got {text!r}"
    names = {bool: "a boolean (true/false/1/0)", int: "an integer", float: "a number", str: "a string"}
    return f"expected {names.get(element, getattr(element, '__name__', str(element)))}, got {text!r}"


def _params_of(func: Callable[..., Any], fetcher_name: str) -> tuple[tuple[Param, ...], str | None]:
    try:
        hints = typing.get_type_hints(func)
    except Exception as exc:
        raise ConfigurationError(f"fetcher {fetcher_name!r}: cannot resolve type hints: {exc}") from exc
    params = []
    previous: str | None = None
    for p in inspect.signature(func).parameters.values():
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            raise ConfigurationError(
                f"fetcher {fetcher_name!r}: parameter {p.name!r} must be a keyword parameter (no *args, **kwargs, "
                "positional-only)"
            )
        annotation = hints.get(p.name, str)
        if _mentions_previous(annotation):
            if annotation != Previous | None or previous is not None:
                raise ConfigurationError(
                    f"fetcher {fetcher_name!r}: parameter {p.name!r} must be typed `Previous | None` (a new "
                    "entry has no previous result), and only one parameter may take it"
                )
            previous = p.name
            continue
        element, many = _shape(annotation, fetcher_name, p.name)
        required = p.default is inspect.Parameter.empty
        param = Param(p.name, annotation, element, many, required, None if required else p.default)
        if not required and p.default is not None:
            try:
                # Through the query path and back: `x: float = 1` then passes 1.0 whether or not `x` was given.
                default = param.convert(param.canonical(p.default))
                spelling = param.canonical(default)
            except (ValueError, TypeError) as exc:
                raise ConfigurationError(
                    f"fetcher {fetcher_name!r}: default {p.default!r} of parameter {p.name!r} does not fit its type "
                    f"{annotation!r}: {exc}"
                ) from exc
            param = dataclasses.replace(param, default=default, default_spelling=spelling)
        params.append(param)
    return tuple(sorted(params, key=lambda param: param.name)), previous


def _mentions_previous(annotation: Any) -> bool:
    return annotation is Previous or Previous in typing.get_args(annotation)


def _shape(annotation: Any, fetcher_name: str, name: str) -> tuple[Any, bool]:
    """Return (element type, is-a-list) for a supported annotation, or refuse it at registration."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _shape(rest[0], fetcher_name, name)
    if typing.get_origin(annotation) is list and len(args) == 1 and _is_scalar(args[0]):
        return args[0], True
    if _is_scalar(annotation):
        return annotation, False
    raise ConfigurationError(
        f"fetcher {fetcher_name!r}: parameter {name!r} has type {annotation!r}; supported are str, int, float, bool, "
        "Literal, Enum, list[...] of those, and X | None"
    )


def _is_scalar(annotation: Any) -> bool:
    if annotation in _SCALARS:
        return True
    if typing.get_origin(annotation) is Literal:
        return all(isinstance(choice, (str, int)) for choice in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        # msgspec converts query text only to enums whose values are all str or all int
        values = [member.value for member in annotation]
        return all(type(v) is str for v in values) or all(type(v) is int for v in values)
    return False
