"""Fetcher registration: the `@fetcher` decorator, validation at start-up, and the registry."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Literal

import pytest

from eagercache import ConfigurationError, Fetcher, UnknownFetcher, fetcher
from eagercache.fetchers import build_registry, load_spec

from . import sample_fetchers


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Ratio(enum.Enum):
    """Float values: msgspec converts only str and int enums."""

    HALF = 0.5
    WHOLE = 1.0


class Point:
    x: int
    y: int


async def plain(city: str, days: int = 3) -> dict[str, Any]:
    return {"city": city, "days": days}


async def test_bare_decorator_returns_the_function_unchanged() -> None:
    async def rates(base: str = "EUR") -> str:
        return f"rates for {base}"

    decorated = fetcher(rates)
    assert decorated is rates
    assert decorated.__name__ == "rates"
    assert await decorated(base="USD") == "rates for USD"
    registered = Fetcher.from_callable(decorated)
    assert (registered.name, registered.ttl, registered.jitter, registered.timeout) == ("rates", 60.0, 0.0, 10.0)


async def test_decorator_with_options_returns_the_function_unchanged() -> None:
    async def rates(base: str = "EUR") -> str:
        return f"rates for {base}"

    decorated = fetcher(ttl=5, jitter=1.5, timeout=2, name="fx")(rates)
    assert decorated is rates
    assert await decorated() == "rates for EUR"
    registered = Fetcher.from_callable(decorated)
    assert registered.func is rates
    assert (registered.name, registered.ttl, registered.jitter, registered.timeout) == ("fx", 5, 1.5, 2)


def test_undecorated_function_gets_defaults() -> None:
    registered = Fetcher.from_callable(plain)
    assert registered.name == "plain"
    assert registered.func is plain
    assert (registered.ttl, registered.jitter, registered.timeout) == (60.0, 0.0, 10.0)
    assert registered.source == "code"
    params = {p.name: (p.required, p.default) for p in registered.signature.params}
    assert params == {"city": (True, None), "days": (False, 3)}


def test_every_supported_annotation_is_accepted() -> None:
    async def everything(
        s: str,
        n: int = 1,
        f: float = 1,
        b: bool = False,
        mode: Literal["a", "b"] = "a",
        colour: Colour = Colour.RED,
        ids: list[int] | None = None,
        maybe: str | None = None,
    ) -> None:
        return None

    registered = Fetcher.from_callable(everything)
    by_name = {p.name: p for p in registered.signature.params}
    assert sorted(by_name) == ["b", "colour", "f", "ids", "maybe", "mode", "n", "s"]
    assert by_name["f"].default == 1.0 and isinstance(by_name["f"].default, float)
    assert (by_name["ids"].element, by_name["ids"].many) == (int, True)
    assert (by_name["maybe"].element, by_name["maybe"].many) == (str, False)


def test_sync_function_is_refused() -> None:
    def sync(city: str = "Oslo") -> str:
        return city

    with pytest.raises(ConfigurationError, match="async"):
        Fetcher.from_callable(sync)
    with pytest.raises(ConfigurationError, match="async"):
        Fetcher.from_callable(fetcher(ttl=5)(sync))  # type: ignore[type-var]


@pytest.mark.parametrize("name", ["a/b", "a?b", "a:b", "a b", "a\tb", ".hidden", "-x", "x" * 101])
def test_invalid_name_is_refused(name: str) -> None:
    with pytest.raises(ConfigurationError, match="name must match"):
        Fetcher.from_callable(plain, name=name)
    with pytest.raises(ConfigurationError, match="name must match"):
        build_registry([fetcher(name=name)(_copy_of_plain())])


def test_function_without_a_name_is_refused() -> None:
    nameless = _copy_of_plain()
    nameless.__name__ = ""
    with pytest.raises(ConfigurationError, match="name must match"):
        Fetcher.from_callable(nameless)


@pytest.mark.parametrize("how", ["decorator", "mapping"])
def test_explicit_empty_name_is_refused(how: str) -> None:
    with pytest.raises(ConfigurationError, match="name must match"):
        if how == "decorator":
            build_registry([fetcher(name="")(_copy_of_plain())])
        else:
            build_registry({"": plain})


@pytest.mark.parametrize("name", ["a", "clock", "fx.rates", "v2-prices", "_private", "x" * 100])
def test_valid_names_are_accepted(name: str) -> None:
    assert Fetcher.from_callable(plain, name=name).name == name


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ttl": 0}, "ttl must be > 0"),
        ({"ttl": -1}, "ttl must be > 0"),
        ({"ttl": float("nan")}, "ttl must be a finite number"),
        ({"jitter": -0.1}, "jitter must be >= 0"),
        ({"jitter": float("nan")}, "jitter must be a finite number"),
        ({"max_idle": 0}, "max_idle must be > 0"),
        ({"max_stale": -1}, "max_stale must be >= 0"),
        ({"max_entries": 0}, "max_entries must be >= 1"),
        ({"max_concurrency": 0}, "max_concurrency must be >= 1"),
        ({"timeout": 0}, "timeout must be > 0"),
        ({"timeout": -5}, "timeout must be > 0"),
    ],
)
def test_bad_timing_is_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        Fetcher.from_callable(fetcher(**options)(_copy_of_plain()))
    assert "'plain'" in caught.value.detail


@pytest.mark.parametrize("option", ["ttl", "jitter", "timeout", "max_idle", "max_stale"])
def test_infinite_time_is_refused(option: str) -> None:
    options: dict[str, Any] = {option: float("inf")}
    with pytest.raises(ConfigurationError, match=option):
        Fetcher.from_callable(fetcher(**options)(_copy_of_plain()))


async def _star_args(*cities: str) -> None:
    return None


async def _star_kwargs(**filters: str) -> None:
    return None


async def _positional_only(city: str, /) -> None:
    return None


@pytest.mark.parametrize("func", [_star_args, _star_kwargs, _positional_only])
def test_non_keyword_parameter_is_refused(func: Callable[..., Any]) -> None:
    with pytest.raises(ConfigurationError, match="must be a keyword parameter"):
        Fetcher.from_callable(func)


async def _takes_dict(x: dict[str, int]) -> None:
    return None


async def _takes_nested_list(x: list[list[int]]) -> None:
    return None


async def _takes_class(x: Point) -> None:
    return None


async def _takes_union(x: int | str) -> None:
    return None


async def _takes_tuple(x: tuple[int, int]) -> None:
    return None


async def _takes_list_of_optional(x: list[int | None]) -> None:
    return None


@pytest.mark.parametrize(
    "func", [_takes_dict, _takes_nested_list, _takes_class, _takes_union, _takes_tuple, _takes_list_of_optional]
)
def test_unsupported_annotation_is_refused(func: Callable[..., Any]) -> None:
    with pytest.raises(ConfigurationError, match="parameter 'x' has type"):
        Fetcher.from_callable(func)


async def _takes_ratio(r: Ratio) -> float:
    return r.value


def test_enum_of_unconvertible_values_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="'r'"):
        Fetcher.from_callable(_takes_ratio)


async def _literal_default_outside(mode: Literal["a"] = "b") -> None:  # type: ignore[assignment]
    return None


async def _int_default_text(n: int = "many") -> None:  # type: ignore[assignment]
    return None


async def _enum_default_unknown(colour: Colour = "purple") -> None:  # type: ignore[assignment]
    return None


async def _list_default_wrong(ids: list[int] = ["x"]) -> None:  # type: ignore[list-item]  # noqa: B006
    return None


@pytest.mark.parametrize(
    ("func", "param"),
    [
        (_literal_default_outside, "mode"),
        (_int_default_text, "n"),
        (_enum_default_unknown, "colour"),
        (_list_default_wrong, "ids"),
    ],
)
def test_default_that_does_not_fit_its_type_is_refused(func: Callable[..., Any], param: str) -> None:
    with pytest.raises(ConfigurationError, match=f"parameter '{param}' does not fit its type"):
        Fetcher.from_callable(func)


def test_duplicate_names_are_refused() -> None:
    @fetcher(name="plain")
    async def impostor() -> None:
        return None

    with pytest.raises(ConfigurationError, match="'plain' is registered twice"):
        build_registry([plain, impostor])
    with pytest.raises(ConfigurationError, match="'plain' is registered twice"):
        build_registry([plain], specs=["tests.test_fetchers:plain"])


def test_name_taken_by_an_entry_point_is_refused() -> None:
    with pytest.raises(ConfigurationError) as caught:
        build_registry({"clock": plain}, use_entry_points=True)
    assert "'clock' is registered twice" in caught.value.detail
    assert "entry point clock = eagercache_examples.fetchers:clock" in caught.value.detail


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nocolon", "must look like package.module:function"),
        (":plain", "must look like package.module:function"),
        ("tests.test_fetchers:", "must look like package.module:function"),
        ("missing.module:x", "cannot import 'missing.module'"),
        ("os:nope", "module 'os' has no 'nope'"),
    ],
)
def test_bad_spec_is_refused(spec: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        build_registry(specs=[spec])
    assert repr(spec) in caught.value.detail
    with pytest.raises(ConfigurationError, match=message):
        load_spec(spec)


def test_spec_naming_a_non_fetcher_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="async") as caught:
        build_registry(specs=["os:getcwd"])
    assert "--fetchers os:getcwd" in caught.value.detail


def test_spec_loads_the_fetcher_with_its_options() -> None:
    registry = build_registry(specs=["tests.sample_fetchers:thing"])
    thing = registry["thing"]
    assert thing.func is sample_fetchers.thing
    assert (thing.ttl, thing.jitter, thing.timeout) == (7, 0.5, 3)
    assert thing.source == "--fetchers tests.sample_fetchers:thing"


def test_entry_points_are_loaded_only_when_asked() -> None:
    assert len(build_registry()) == 0
    registry = build_registry(use_entry_points=True)
    assert {"clock", "greeting", "prices"} <= set(registry)
    for name in ("clock", "greeting", "prices"):
        assert registry[name].source == f"entry point {name} = eagercache_examples.fetchers:{name}"
        assert registry[name].func.__module__ == "eagercache_examples.fetchers"
    assert (registry["clock"].ttl, registry["clock"].jitter, registry["clock"].timeout) == (5, 1, 2)
    assert [p.name for p in registry["greeting"].signature.params] == ["name", "style", "tags", "times"]


def test_mapping_keys_are_the_names() -> None:
    @fetcher(name="ignored")
    async def decorated() -> str:
        return "x"

    registry = build_registry({"weather": plain, "forecast": plain, "renamed": decorated})
    assert list(registry) == ["weather", "forecast", "renamed"]
    assert registry["weather"].func is plain
    assert registry["forecast"].func is plain
    assert registry["renamed"].func is decorated
    assert "plain" not in registry
    assert "ignored" not in registry


def test_registered_fetcher_objects_are_kept_as_they_are() -> None:
    registered = Fetcher.from_callable(plain, name="kept", source="somewhere")
    registry = build_registry([registered])
    assert registry["kept"] is registered


def test_call_resolves_a_known_fetcher_and_refuses_an_unknown_one() -> None:
    registry = build_registry([plain])
    found, call = registry.call("plain", "city=Oslo")
    assert found is registry["plain"]
    assert call.kwargs == {"city": "Oslo", "days": 3}
    assert call.entry_id == "plain?city=Oslo"
    with pytest.raises(UnknownFetcher, match="'x'") as caught:
        registry.call("x", "city=Oslo")
    assert caught.value.status == 404
    with pytest.raises(UnknownFetcher):
        registry.call("Plain", "")


def _copy_of_plain() -> Callable[..., Any]:
    """A fresh function like `plain`, so decorating it never marks the module-level one."""

    async def plain(city: str, days: int = 3) -> dict[str, Any]:
        return {"city": city, "days": days}

    return plain
