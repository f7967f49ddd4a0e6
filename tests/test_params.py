"""The canonical cache key: stable under re-spelling, injective across different calls."""

from __future__ import annotations

import enum
from typing import Any, Literal
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eagercache.errors import InvalidParameters
from eagercache.params import Signature, parse_query


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


async def sample(
    s: str = "x",
    n: int = 1,
    f: float = 1,
    b: bool = False,
    mode: Literal["a", "b"] = "a",
    color: Color = Color.RED,
    tags: list[str] | None = None,
) -> None:
    return None


SIG = Signature(sample, "sample")
text = st.text(st.characters(codec="utf-8"), max_size=8)
calls = st.fixed_dictionaries(
    {},
    optional={
        "s": text,
        "n": st.integers(-(10**12), 10**12),
        "f": st.floats(allow_nan=False, allow_infinity=False),
        "b": st.booleans(),
        "mode": st.sampled_from(["a", "b"]),
        "color": st.sampled_from(list(Color)),
        "tags": st.lists(text, min_size=1, max_size=3),
    },
)


def spell(kwargs: dict[str, Any], data: st.DataObject) -> str:
    """A query string for `kwargs`, in a randomly chosen one of its many spellings."""
    pairs: list[tuple[str, str]] = []
    for name, value in kwargs.items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, bool):
                word = data.draw(st.sampled_from(["true", "True", "1"] if v else ["false", "False", "0"]))
            elif isinstance(v, Color):
                word = v.value
            elif isinstance(v, float):
                word = data.draw(st.sampled_from([repr(v), f"{v:.17g}"]))
            else:
                word = str(v)
            pairs.append((name, word))
    # Shuffle, but keep each parameter's own values in order: list order is part of the call.
    shuffled = [pairs[i][0] for i in data.draw(st.permutations(range(len(pairs))))]
    values = {name: iter([v for n, v in pairs if n == name]) for name in shuffled}
    safe = data.draw(st.sampled_from(["", "-._~", "-._~:@!$'()*,"]))
    encoded = [f"{quote(name)}={quote(next(values[name]), safe=safe)}" for name in shuffled]
    query = "&".join(encoded)
    if data.draw(st.booleans()):
        query = query.replace("%20", "+")
    return query


@given(calls, st.data())
def test_any_spelling_of_a_call_gives_its_canonical_entry(kwargs: dict[str, Any], data: st.DataObject) -> None:
    call = SIG.call_from_query(spell(kwargs, data).encode())
    for name, value in kwargs.items():
        assert call.kwargs[name] == value
    name, _, canonical = call.entry_id.partition("?")
    assert name == "sample"
    again = SIG.call_from_query(canonical)
    assert again.entry_id == call.entry_id
    assert again.kwargs == call.kwargs
    refreshed = SIG.call_of_entry(call.entry_id)  # the refresher rebuilds calls from the stored id
    assert refreshed.entry_id == call.entry_id
    assert refreshed.kwargs == call.kwargs
    assert [type(v) for v in refreshed.kwargs.values()] == [type(call.kwargs[k]) for k in refreshed.kwargs]


async def two(a: int, b: str = "x") -> None:
    return None


BAD_ESCAPE = "invalid percent-encoding (% must be followed by two hex digits; send a literal % as %25)"


@pytest.mark.parametrize(
    ("entry_id", "error"),
    [
        ("two?", {"a": "required parameter is missing"}),
        ("two?b=y", {"a": "required parameter is missing"}),
        ("two?a=1&c=2", {"c": "unknown parameter"}),
        ("two?a=one", {"a": "expected an integer, got 'one'"}),
        ("two?a=1&a=2", {"a": "expected one value, got 2"}),
        ("two?a=%zz", {"a": BAD_ESCAPE}),
    ],
)
def test_a_stored_id_no_longer_valid_is_refused_as_a_query_would_be(entry_id: str, error: dict[str, str]) -> None:
    with pytest.raises(InvalidParameters) as raised:
        Signature(two, "two").call_of_entry(entry_id)
    assert raised.value.errors == error


def test_a_stored_id_spelled_otherwise_today_keeps_its_own_id() -> None:
    """A refresh writes the entry it claimed: an id stored before a default changed (today `b=x` is left
    out) or with its names out of order is refreshed under that id, with the call it names."""
    sig = Signature(two, "two")
    for entry_id, kwargs in [
        ("two?a=1&b=x", {"a": 1, "b": "x"}),
        ("two?b=y&a=1", {"a": 1, "b": "y"}),
        ("two?a=1&b=a%20b", {"a": 1, "b": "a b"}),
    ]:
        call = sig.call_of_entry(entry_id)
        assert (call.entry_id, call.kwargs) == (entry_id, kwargs)


@given(calls, calls)
def test_different_calls_never_share_an_entry(one: dict[str, Any], other: dict[str, Any]) -> None:
    a = SIG.call_from_query(_plain(one))
    b = SIG.call_from_query(_plain(other))
    if a.entry_id == b.entry_id:
        assert a.kwargs == b.kwargs


def _plain(kwargs: dict[str, Any]) -> bytes:
    pairs = []
    for name, value in kwargs.items():
        for v in value if isinstance(value, list) else [value]:
            word = v.value if isinstance(v, Color) else ("true" if v is True else "false" if v is False else str(v))
            pairs.append(f"{name}={quote(repr(v) if isinstance(v, float) else word, safe='')}")
    return "&".join(pairs).encode()


def test_defaults_left_out_or_spelled_out_are_one_entry() -> None:
    omitted = SIG.call_from_query(b"")
    spelled = SIG.call_from_query(b"s=x&n=1&f=1&b=false&mode=a&color=red")
    assert omitted.entry_id == spelled.entry_id == "sample?"
    assert omitted.kwargs == spelled.kwargs
    assert isinstance(omitted.kwargs["f"], float)  # the int default 1 of a float parameter arrives as 1.0


def test_canonical_id_is_readable_and_fully_escaped() -> None:
    call = SIG.call_from_query(b"tags=b%26c&s=%C3%BC%20%3D&tags=a")
    assert call.entry_id == "sample?s=%C3%BC%20%3D&tags=b%26c&tags=a"


@pytest.mark.parametrize(
    ("query", "bad"),
    [
        (b"n=1&n=2", {"n": "expected one value, got 2"}),
        (b"f=inf", {"f": "expected a finite number, got 'inf'"}),
        (b"color=green", {"color": "expected one of 'red', 'blue', got 'green'"}),
        (b"s=%25ZZ&x=1", {"x": "unknown parameter"}),
        (b"n=", {"n": "expected an integer, got ''"}),
    ],
)
def test_bad_values_are_named(query: bytes, bad: dict[str, str]) -> None:
    with pytest.raises(InvalidParameters) as caught:
        SIG.call_from_query(query)
    assert caught.value.errors == bad


def test_invalid_utf8_is_refused_not_replaced() -> None:
    with pytest.raises(InvalidParameters) as caught:
        parse_query(b"s=%C3%28")
    assert caught.value.errors == {"s": "not valid UTF-8"}
    with pytest.raises(InvalidParameters):
        parse_query(b"s=\xff")


@pytest.mark.parametrize("query", [b"s=100%", b"s=%2", b"s=%ZZ", b"s%=1"])
def test_malformed_percent_escapes_are_refused(query: bytes) -> None:
    # A stray '%' has no meaning (RFC 3986, 2.1); guessing would let two spellings share an entry or not.
    with pytest.raises(InvalidParameters, match="1 invalid parameter") as caught:
        parse_query(query)
    assert "invalid percent-encoding" in next(iter(caught.value.errors.values()))
