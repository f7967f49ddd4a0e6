"""One clock for the fleet: a replica whose own clock is off changes nothing that replicas compare.

The skewed replica is a real `eagercache serve` under libfaketime (LD_PRELOAD, from the `libfaketime`
package), so its wall clock, and only its, is off; fetch times are logged by the server's clock.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from email.utils import parsedate_to_datetime

import httpx
import libfaketime
import pytest
import redis

from eagercache.clock import ServerClock

from .servers import ServeProcess
from .test_reliability import fleet_calls, most_within

ENTRIES = 30
TTL_S = 1.0
# A claim's lease: the slowest registered fetcher's timeout + the refresher's 5 s margin. `eagercache serve`
# also loads the examples' entry points, and their slowest (prices) has a timeout of 5 s.
LEASE_S = 5.0 + 5.0


def skewed(offset: str) -> dict[str, str]:
    """Environment that makes a process's wall clock run `offset` (e.g. '+5s') off; monotonic untouched."""
    _, env = libfaketime.get_reload_information()
    return {**env, "FAKETIME": offset, "DONT_FAKE_MONOTONIC": "1"}


def server_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found is not None, name
    return float(found.group(1))


def test_the_clock_follows_the_server_not_the_host() -> None:
    clock = ServerClock()
    sent = time.monotonic()
    clock.observe(server_ms=time.time() * 1000 - 5_000, sent=sent, received=sent + 0.001)
    assert clock.synced
    assert abs(clock.skew_ms() - 5_000) < 50
    before = clock.now_ms()
    # A slow reading (the reply sat in a queue) does not move a synced clock.
    clock.observe(server_ms=time.time() * 1000 + 60_000, sent=sent, received=sent + 1.0)
    assert abs(clock.now_ms() - before) < 50


@pytest.mark.fault
@pytest.mark.parametrize("offset", ["+5s", "-5s"], ids=["ahead", "behind"])
async def test_a_skewed_replica_changes_neither_fetch_count_nor_takeover(
    redis_url: str, redis_sync: redis.Redis, offset: str
) -> None:
    env = {"FLEET_REDIS_URL": redis_url}
    args = ("--redis-url", redis_url, "--fetchers", "tests.fleet:quick")
    normal = ServeProcess(*args, env=env)
    off = ServeProcess(*args, env={**env, **skewed(offset)})
    try:
        normal.wait_ready()
        off.wait_ready()
        async with httpx.AsyncClient(timeout=10) as client:
            skew = metric((await client.get(f"{off.url}/metrics")).text, "eagercache_clock_skew_seconds")
            assert abs(skew - float(offset.removesuffix("s"))) < 0.5  # libfaketime took: that host's clock is off
            # New entries written by both replicas, half each: the skewed one's writes must not be due early.
            answers = await asyncio.gather(
                *(client.get(f"{(normal, off)[i % 2].url}/data/quick?k={i}") for i in range(ENTRIES))
            )
            assert {a.status_code for a in answers} == {200}
            # Date, Last-Modified and Age on the skewed replica come from the store's clock.
            answer = await client.get(f"{off.url}/data/quick?k=1")
            date = parsedate_to_datetime(answer.headers["date"]).timestamp()
            modified = parsedate_to_datetime(answer.headers["last-modified"]).timestamp()
            assert modified <= date
            assert abs(date - time.time()) < 2
        started = server_now(redis_sync)
        await asyncio.sleep(6)  # six refresh cycles: the time under measurement
        ended = server_now(redis_sync)
        # Takeover: the skewed replica dies holding claims; the other refreshes its entries after the lease.
        os.killpg(off.process.pid, signal.SIGKILL)
        killed = server_now(redis_sync)
        deadline = killed + LEASE_S + TTL_S + 1.5
        async with asyncio.timeout(deadline - killed + 5):
            while True:
                last = {i: max(t for t, _ in fleet_calls(redis_sync, i)) for i in range(ENTRIES)}
                if min(last.values()) > killed + 0.5:
                    break
                await asyncio.sleep(0.1)  # another process: there is no event to await
        taken_over = max(min(t for t, _ in fleet_calls(redis_sync, i) if t > killed + 0.5) for i in range(ENTRIES))
    finally:
        normal.close()
        off.close()
    total = 0
    busiest = 0
    for i in range(ENTRIES):
        stamps = [t for t, _ in fleet_calls(redis_sync, i)]
        total += sum(1 for t in stamps if started <= t < ended)
        busiest = max(busiest, most_within([t for t in stamps if t < killed], 0.9))
    per_cycle = total / ENTRIES / ((ended - started) / TTL_S)
    print(
        f"\nreplica {offset}: fetches per entry per ttl {per_cycle:.3f}; most fetches of one entry within "
        f"0.9 s: {busiest}; every entry refreshed by the survivor {taken_over - killed:.2f} s after kill -9"
    )
    assert 0.9 <= per_cycle <= 1.1
    assert busiest == 1
    assert taken_over - killed <= LEASE_S + TTL_S + 1.5
