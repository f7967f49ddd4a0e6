"""Commands in one round trip (roundtrip.run) on a real redis-server: replies in order, an error in its
command's place, and a connection that failed part way never reused with replies still unread."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from eagercache import roundtrip
from eagercache.packing import FastConnection

# A script that holds the server (Redis runs one script at a time) for as long as ARGV[1] ms says.
BUSY = """
local stop_at = tonumber(redis.call('TIME')[1]) * 1000000 + tonumber(redis.call('TIME')[2]) + ARGV[1] * 1000
while tonumber(redis.call('TIME')[1]) * 1000000 + tonumber(redis.call('TIME')[2]) < stop_at do end
return ARGV[2]
"""


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    pool = aioredis.BlockingConnectionPool.from_url(
        # As the store's standalone client: one retry, at once, on a new connection.
        redis_url,
        max_connections=1,
        connection_class=FastConnection,
        socket_timeout=0.2,
        retry=Retry(NoBackoff(), 1),
    )
    client = aioredis.Redis(connection_pool=pool)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose(close_connection_pool=True)


async def test_replies_come_back_in_order_with_each_error_in_its_place(client: aioredis.Redis) -> None:
    echo = await client.script_load("return ARGV[1]")
    commands: list[tuple[object, ...]] = [("EVALSHA", echo, 0, f"reply {i}") for i in range(300)]
    commands[7] = ("EVALSHA", "0" * 40, 0, "never")
    commands[9] = ("INCR", "not-a-number-key")
    await client.set("not-a-number-key", "x")

    replies = await roundtrip.run(client, commands)

    assert len(replies) == 300
    assert isinstance(replies[7], NoScriptError)
    assert isinstance(replies[9], ResponseError)
    assert [r for i, r in enumerate(replies) if i not in (7, 9)] == [
        f"reply {i}".encode() for i in range(300) if i not in (7, 9)
    ]


async def test_a_timed_out_round_trip_leaves_no_reply_behind_for_the_next(client: aioredis.Redis) -> None:
    busy = await client.script_load(BUSY)
    with pytest.raises(RedisTimeoutError):
        # The retry runs it again on a new connection, which times out too: two 300 ms holds, both late.
        await roundtrip.run(client, [("EVALSHA", busy, 0, 300, "late")])

    # The pool has one connection: had the timed-out one gone back with "late" unread, this would read it.
    assert await roundtrip.run(client, [("PING",), ("ECHO", "next")]) == [b"PONG", b"next"]


async def test_a_connection_the_server_closed_is_replaced_once(client: aioredis.Redis, redis_url: str) -> None:
    assert await roundtrip.run(client, [("CLIENT", "SETNAME", "victim")]) == [b"OK"]
    killer = aioredis.Redis.from_url(redis_url)
    try:
        victim = next(c["id"] for c in await killer.client_list() if c["name"] == "victim")
        assert await killer.client_kill_filter(_id=victim) == 1
    finally:
        await killer.aclose()

    assert await roundtrip.run(client, [("ECHO", "after"), ("ECHO", "kill")]) == [b"after", b"kill"]
