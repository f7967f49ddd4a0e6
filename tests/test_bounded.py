"""Nothing waits without bound: a stalled Redis costs a reader at most its read budget, and shutdown at
most its timeout."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import redis

from eagercache import create_app, fetcher
from eagercache.settings import Settings

from .redis_server import RedisServer
from .servers import ServeProcess
from .test_redis import running

BUDGET_S = 0.2
SLACK_S = 0.3  # scheduling on a busy 2-core machine; a stall would be the whole pause (3 s)


@fetcher(ttl=60, jitter=0)
async def steady(k: str = "a") -> str:
    return k


async def test_a_redis_stall_costs_a_reader_the_read_budget_and_no_more(own_server: RedisServer) -> None:
    app = create_app([steady], settings=Settings(redis_url=own_server.url, read_budget=BUDGET_S))
    app.state.engine.near_cache_ttl_s = 0  # every read asks Redis: what a stall is about
    async with running(app) as client:
        assert (await client.get("/data/steady?k=seen")).headers["x-cache"] == "MISS"
        assert (await client.get("/data/steady?k=seen")).headers["x-cache"] == "HIT"
        pauser = redis.Redis(port=own_server.port)
        pauser.execute_command("CLIENT", "PAUSE", "3000", "ALL")  # type: ignore[no-untyped-call]
        paused_at = time.monotonic()
        try:
            started = time.monotonic()
            seen = await client.get("/data/steady?k=seen")
            seen_s = time.monotonic() - started
            assert (seen.status_code, seen.headers["x-cache"]) == (200, "STALE")  # grace, from memory
            assert seen.json()["data"] == "seen"

            started = time.monotonic()
            unseen = await client.get("/data/steady?k=never-seen")
            unseen_s = time.monotonic() - started
            assert unseen.status_code == 503
            assert unseen.json()["type"] == "urn:eagercache:problem:store-unavailable"

            started = time.monotonic()
            ready = await client.get("/readyz")
            ready_s = time.monotonic() - started
            assert ready.status_code == 503
            assert (await client.get("/healthz")).status_code == 200
            assert time.monotonic() - paused_at < 3  # all of the above happened during the pause
        finally:
            pauser.close()
        print(f"\nduring a 3 s CLIENT PAUSE: grace {seen_s:.3f} s, 503 {unseen_s:.3f} s, /readyz {ready_s:.3f} s")
        assert seen_s < BUDGET_S + SLACK_S
        assert unseen_s < BUDGET_S + SLACK_S
        assert ready_s < 1.0
        async with asyncio.timeout(10):
            while (await client.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.05)  # the pause ends inside Redis: nothing to await here
        assert (await client.get("/data/steady?k=seen")).headers["x-cache"] == "HIT"
        assert (await client.get("/data/steady?k=never-seen")).headers["x-cache"] == "MISS"


@pytest.mark.fault
async def test_shutdown_answers_waiting_readers_503_and_exits_within_its_timeout(
    redis_url: str, redis_sync: redis.Redis
) -> None:
    """A reader waiting for a 20 s cold fetch does not hold shutdown past --shutdown-timeout."""
    server = ServeProcess(
        "--redis-url",
        redis_url,
        "--fetchers",
        "tests.fleet:counted",
        "--shutdown-timeout",
        "2",
        env={"FLEET_REDIS_URL": redis_url, "FLEET_FETCH_S": "20"},
    )
    try:
        server.wait_ready()
        async with httpx.AsyncClient(timeout=30) as client:
            waiting = asyncio.create_task(client.get(f"{server.url}/data/counted?k=slow"))
            async with asyncio.timeout(10):
                while not redis_sync.get("fleet:started"):
                    await asyncio.sleep(0.02)  # the fetch runs in another process
            signalled = time.monotonic()
            server.process.terminate()
            answer = await waiting
            answered_s = time.monotonic() - signalled
        code = await asyncio.to_thread(server.process.wait, 30)
        exited_s = time.monotonic() - signalled
        log = server.stderr()
    finally:
        server.close()
    print(
        f"\nshutdown with a 20 s fetch in flight: reader answered after {answered_s:.2f} s, exit after {exited_s:.2f} s"
    )
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["type"] == "urn:eagercache:problem:shutting-down"
    assert int(answer.headers["retry-after"]) >= 1
    assert 1.5 <= answered_s <= 2 + 1.0
    assert exited_s <= 2 + 4.0, log
    assert code in (0, -15), log


async def test_a_burst_on_a_healthy_redis_is_not_taken_for_a_stall(redis_url: str, redis_sync: redis.Redis) -> None:
    """The budget measures the store, not this process: 300 reads at once, queued for 64 connections on
    one event loop, wait far longer than the 0.2 s budget, but Redis answers all along, so none gets a 503."""
    app = create_app([steady], settings=Settings(redis_url=redis_url, read_budget=0.2, near_cache_ttl=0))
    async with running(app) as client:
        cold = await asyncio.gather(*(client.get(f"/data/steady?k={i}") for i in range(300)))
        warm = await asyncio.gather(*(client.get(f"/data/steady?k={i}") for i in range(300)))
    assert [a.status_code for a in cold + warm] == [200] * 600, [a.text for a in cold + warm if a.status_code != 200][
        :1
    ]
    assert {a.headers["x-cache"] for a in warm} == {"HIT"}
