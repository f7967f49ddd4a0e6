"""The hiredis packer on asyncio connections sends exactly the bytes redis-py's own packer would."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from eagercache import packing
from eagercache.packing import FastConnection

ARG = st.one_of(
    st.text(),
    st.binary(),
    st.integers(),
    st.floats(allow_nan=False),
    st.binary().map(lambda b: memoryview(b)),
)  # bools are refused by both (test_what_redis_py_refuses_is_refused_alike)
redis_py, fast = Connection(), FastConnection()


def packed(connection: Connection, *args: Any) -> bytes:
    return b"".join(connection.pack_command(*args))


@given(
    st.sampled_from(["SET", "EVALSHA", "CONFIG GET", b"CLIENT SETINFO"]),
    st.lists(ARG, max_size=20),
)
def test_same_bytes_as_redis_py(command: str | bytes, args: list[object]) -> None:
    assert packed(fast, command, *args) == packed(redis_py, command, *args)


@pytest.mark.parametrize("bad", [None, True, object()])
def test_what_redis_py_refuses_is_refused_alike(bad: object) -> None:
    with pytest.raises(DataError):
        packed(redis_py, "SET", "k", bad)
    with pytest.raises(DataError):
        packed(fast, "SET", "k", bad)


def test_a_refresh_write_is_packed_by_hiredis(monkeypatch: pytest.MonkeyPatch) -> None:
    """The arguments of a WRITE script (str, bytes, int) take hiredis's path."""
    calls: list[tuple[object, ...]] = []
    real = packing.hiredis_pack
    assert real is not None

    def spy(args: tuple[object, ...]) -> bytes:
        calls.append(args)
        return real(args)

    monkeypatch.setattr(packing, "hiredis_pack", spy)
    args = ("EVALSHA", "0" * 40, 2, "ns:{b0}:item:f?k=1", "ns:{b0}:due", "f?k=1", b"tag 1 2 3\n{}", 1_795_766_139_535)
    assert packed(fast, *args) == packed(redis_py, *args)
    assert calls == [args]
