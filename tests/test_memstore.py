"""The native memory store (memstore.py): the scripts' semantics, checked against fakeredis running the real
scripts, and what is its own (the schedule's slots, memory per entry, reads that never suspend, the local bus).

The behaviour suite runs on memory:// already (`store_url` "memory"); these look at the store directly.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from eagercache import create_app
from eagercache.item import encode_tags, new_entry
from eagercache.localbus import MAX_PENDING_MESSAGES, LocalBus
from eagercache.memstore import FAKEREDIS_URL, HEAP_SLACK, HEAP_SLACK_PAIRS, MemoryStore, build_store
from eagercache.store import GONE, NOT_OURS, OVER_LIMIT, STORED, Stale, Store

LEASE_MS = 30_000


def value(data: str, due_ms: int, tags: Sequence[str] = ()) -> bytes:
    now = int(time.time() * 1000)
    return new_entry(f'"{data}"'.encode(), now, due_ms, tags=encode_tags(tags))[0].encode()


def test_memory_url_is_the_native_store_and_fakeredis_stays_reachable() -> None:
    assert type(build_store("memory://")) is MemoryStore
    assert type(build_store(FAKEREDIS_URL)) is Store
    assert type(build_store("redis://127.0.0.1:1/0")) is Store
    assert type(create_app([], redis_url="memory://").state.store) is MemoryStore


def test_start_up_says_memory_is_one_process_only(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="eagercache.app"):
        create_app([], redis_url="memory://")
    assert any("this process only" in str(r.__dict__.get("kind", "")) for r in caplog.records)


async def test_a_read_returns_without_suspending() -> None:
    """No task, no future, no turn of the loop: the coroutine finishes on its first step."""
    store = MemoryStore()
    await store.prepare()
    due = store.clock.now_ms() + 60_000
    assert await store.write("f?k=1", "f", value("a", due), due, mode="cold", max_entries=10) == STORED
    for entry_id in ("f?k=1", "f?k=missing"):
        step = store.get(entry_id)
        with pytest.raises(StopIteration) as done:
            step.send(None)
        assert done.value.value == (await store.get(entry_id))


async def test_claims_come_in_due_order_and_a_lease_hides_an_entry_until_it_ends() -> None:
    store = MemoryStore()
    await store.prepare()
    now = store.clock.now_ms()
    dues = {"f?k=3": now - 100, "f?k=1": now - 300, "f?k=2": now - 200, "f?k=later": now + 60_000}
    for entry_id, due in dues.items():
        await store.write(entry_id, "f", value(entry_id, due), due, mode="cold", max_entries=10)
    first = await store.claim_due([0], 80, 2)
    assert [c.entry_id for c in first.claims] == ["f?k=1", "f?k=2"]  # the longest overdue first
    assert [c.due_ms for c in first.claims] == [dues["f?k=1"], dues["f?k=2"]]
    assert first.full[0] and first.claims[0].header is not None and first.claims[0].header.endswith(b"\n")
    second = await store.claim_due([0], 80, 10)
    assert [c.entry_id for c in second.claims] == ["f?k=3"]  # the claimed ones are leased, not due
    assert not second.full[0]
    assert second.next_due_in[0] is not None and 0 < second.next_due_in[0] <= 80  # the first lease's end
    assert (await store.claim_due([0], 80, 10)).claims == []
    await asyncio.sleep(0.1)  # the leases run out: due again, for anyone
    again = await store.claim_due([0], LEASE_MS, 10)
    assert sorted(c.entry_id for c in again.claims) == ["f?k=1", "f?k=2", "f?k=3"]
    assert again.next_due_in[0] == LEASE_MS  # these new leases end before the later entry is due


async def test_a_refresh_write_is_the_claim_holders_only() -> None:
    store = MemoryStore()
    await store.prepare()
    now = store.clock.now_ms()
    await store.write("f?", "f", value("a", now - 1), now - 1, mode="cold", max_entries=10)
    (claim,) = (await store.claim_due([0], LEASE_MS, 10)).claims
    due = now + 60_000
    args: dict[str, Any] = {"mode": "refresh", "max_entries": 10}
    refreshed = value("b", due)  # one value: a retry sends the very bytes (their header's times included)
    assert await store.write("f?", "f", refreshed, due, lease_end_ms=claim.lease_end_ms + 1, **args) == NOT_OURS
    assert await store.write("f?", "f", refreshed, due, lease_end_ms=claim.lease_end_ms, **args) == STORED
    # the same write again (its reply lost, say): done already
    assert await store.write("f?", "f", refreshed, due, lease_end_ms=claim.lease_end_ms, **args) == STORED
    assert await store.release({"f?": claim.lease_end_ms}) == 0  # no longer held: the write ended the lease
    assert await store.forget("f?", "f")
    assert await store.write("f?", "f", value("c", due), due, lease_end_ms=claim.lease_end_ms, **args) == GONE
    assert await store.entry_counts() == {}


@pytest.mark.parametrize("kind", ["memory", "fakeredis", "redis"])
async def test_a_refresh_due_when_its_lease_ends_is_written(kind: str, request: pytest.FixtureRequest) -> None:
    """A refresh whose next due time is its claim's lease end to the ms (claimed at its due time, with a
    lease as long as its ttl: a fetcher of ttl = timeout + 5 s) is stored, not taken for a retry of a write
    applied already (was: the score alone said so; the entry went unrefreshed for a whole ttl, 0.75 % of
    the entries in a lag run at 10,000 due per second). A true retry still answers STORED, changing nothing."""
    if kind == "redis":
        request.getfixturevalue("redis_sync")  # flushed
    url = {"memory": "memory://", "fakeredis": FAKEREDIS_URL}.get(kind) or request.getfixturevalue("redis_url")
    store = build_store(url)
    await store.prepare()
    try:
        now = store.clock.now_ms()
        await store.write("f?", "f", value("a", now - 1), now - 1, mode="cold", max_entries=10)
        (claim,) = (await store.claim_due([0], LEASE_MS, 10)).claims
        due = claim.lease_end_ms  # the collision
        refreshed = value("b", due)
        args: dict[str, Any] = {"mode": "refresh", "max_entries": 10, "lease_end_ms": claim.lease_end_ms}
        assert await store.write("f?", "f", refreshed, due, **args) == STORED
        assert (await store.get("f?"))[0] == refreshed
        assert await store.write("f?", "f", refreshed, due, **args) == STORED  # its reply lost: sent again
        assert (await store.get("f?"))[0] == refreshed
        # another write with that due time, not this claim's own: not ours to overwrite (the lease is over)
        assert await store.write("f?", "f", value("c", due), due, **{**args, "lease_end_ms": due - 1}) == NOT_OURS
        assert (await store.get("f?"))[0] == refreshed
    finally:
        await store.aclose()


async def test_release_with_a_delay_and_postpone_move_the_schedule() -> None:
    store = MemoryStore()
    await store.prepare()
    now = store.clock.now_ms()
    await store.write("f?", "f", value("a", now - 1), now - 1, mode="cold", max_entries=10)
    (claim,) = (await store.claim_due([0], LEASE_MS, 10)).claims
    assert await store.release({"f?": claim.lease_end_ms}, {"f?": 60}) == 1
    assert (await store.claim_due([0], LEASE_MS, 10)).claims == []
    await asyncio.sleep(0.08)
    (claim,) = (await store.claim_due([0], LEASE_MS, 10)).claims
    marker = Stale(now, 1, "down")
    assert await store.postpone("f?", "f", 50, marker)
    assert (await store.get("f?"))[1] == marker
    assert (await store.describe(["f?"]))[0][2] == marker
    assert not await store.postpone("f?k=gone", "f", 50, marker)
    await asyncio.sleep(0.07)
    assert [c.entry_id for c in (await store.claim_due([0], LEASE_MS, 10)).claims] == ["f?"]


async def test_max_entries_counts_every_bucket_exactly() -> None:
    store = MemoryStore(buckets=8)
    await store.prepare()
    due = store.clock.now_ms() + 60_000
    outcomes = [
        await store.write(f"f?k={i}", "f", value(str(i), due), due, mode="cold", max_entries=5) for i in range(20)
    ]
    assert outcomes.count(STORED) == 5 and outcomes.count(OVER_LIMIT) == 15
    assert await store.entry_counts() == {"f": 5}
    assert sum(c.get("f", 0) for c in (await store.bucket_counts()).values()) == 5
    listed, cursor = [], ""
    while True:
        cursor, page = await store.list_entries("f", cursor, 2)
        listed += page
        if not cursor:
            break
    assert sorted(listed) == sorted(f"f?k={i}" for i, o in enumerate(outcomes) if o == STORED)


async def test_the_schedule_stays_bounded_however_often_an_entry_moves() -> None:
    store = MemoryStore()
    await store.prepare()
    now = store.clock.now_ms()
    for i in range(10):
        await store.write(f"f?k={i}", "f", value("a", now + 60_000), now + 60_000, mode="cold", max_entries=10)
    for n in range(20_000):
        entry_id = f"f?k={n % 10}"
        await store.write(entry_id, "f", value("a", now + n), now + 60_000 + n, mode="refresh", max_entries=10)
    bucket = store._buckets[0]
    assert bucket.pairs == sum(len(ids) for ids in bucket.ids.values())
    assert bucket.pairs <= HEAP_SLACK * 10 + HEAP_SLACK_PAIRS + 1
    assert len(bucket.order) == len(bucket.ids)


async def test_memory_per_entry_beyond_its_value_is_bounded() -> None:
    """What the store keeps per entry besides the stored value itself (the id, the record, the schedule)."""
    store = MemoryStore()
    await store.prepare()
    n, due = 20_000, store.clock.now_ms() + 3_600_000
    ids = [f"item?id={i}" for i in range(n)]
    values = [value(str(i), due) for i in range(n)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for entry_id, stored in zip(ids, values, strict=True):
            await store.write(entry_id, "item", stored, due, mode="cold", max_entries=n)
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    # the record (64 B), the id's place in its schedule slot (8 B), the dict slot (~50 B)
    assert per_entry <= 200, per_entry


async def test_the_local_bus_delivers_and_drops_a_subscriber_that_falls_behind() -> None:
    bus = LocalBus()
    assert bus.publish("ch", b"nobody") == 0
    sub = bus.pubsub()
    await sub.subscribe("ch")
    assert (await sub.get_message(timeout=0.01))["type"] == b"subscribe"
    assert await sub.get_message(timeout=0.01) is None
    later = asyncio.get_running_loop().call_later(0.02, bus.publish, "ch", b"hello")
    message = await sub.get_message(timeout=1)
    later.cancel()
    assert (message["type"], message["data"]) == (b"message", b"hello")
    for _ in range(MAX_PENDING_MESSAGES + 1):
        bus.publish("ch", b"x")
    with pytest.raises(RedisConnectionError):
        await sub.get_message(timeout=0.01)
    assert bus.subscribers("ch") == 0
    await sub.aclose()


# -- the same operations on the native store and on fakeredis running the real scripts ----------------


async def test_every_operation_answers_as_the_scripts_do() -> None:
    """A seeded random run of writes, claims, releases, postpones, removals, targeted invalidation and
    budget takes on both stores: the same answers, the same entries, counts, tags and markers. Every time
    that matters is far from the moment of the call (or now itself), so the stores' few ms apart do not."""
    rng = random.Random(20261127)
    stores: list[Store] = [MemoryStore(buckets=4), Store(FAKEREDIS_URL, buckets=4)]
    for store in stores:
        await store.prepare()
    leases: list[dict[str, int]] = [{}, {}]
    ids = [f"{f}?k={i}" for f in ("a", "b") for i in range(6)]
    tags = ["red", "blue", "x y"]
    ops = ["cold", "refresh", "leased", "claim", "claim_many", "release", "postpone"] * 2 + [
        "forget",
        "target",
        "budget",
    ]
    for step in range(600):
        op, entry_id = rng.choice(ops), rng.choice(ids)
        fetcher = entry_id.partition("?")[0]
        due = int(time.time() * 1000) + rng.choice([-5_000, 60_000, 90_000, 150_000])
        stored = value(str(step), due, rng.sample(tags, rng.randint(0, 2)))
        some = rng.sample(ids, 4)
        action, tag = rng.choice(["forget", "refresh"]), rng.choice([None, *tags])
        delay = rng.choice([0, 60_000])
        answers: list[Any] = []
        for n, store in enumerate(stores):
            if op in ("cold", "refresh"):
                # Store.write knows other buckets' counts as last read: read now, it is exact (no other replica)
                await store.bucket_counts()
                answers.append(await store.write(entry_id, fetcher, stored, due, mode=op, max_entries=4))  # type: ignore[arg-type]
            elif op == "leased":
                lease = leases[n].get(entry_id, 0)
                answers.append(
                    await store.write(entry_id, fetcher, stored, due, mode="refresh", max_entries=4, lease_end_ms=lease)
                )
            elif op in ("claim", "claim_many"):
                round_ = (
                    await store.claim_due(range(4), LEASE_MS, 3) if op == "claim" else await store.claim(some, LEASE_MS)
                )
                for claim in round_.claims:
                    leases[n][claim.entry_id] = claim.lease_end_ms
                claimed = [
                    (c.entry_id, c.header, c.last_read_ms is not None, c.due_ms is not None) for c in round_.claims
                ]
                answers.append((sorted(claimed), sorted(round_.full.items())))
            elif op == "release":
                answers.append(await store.release(dict(leases[n]), dict.fromkeys(leases[n], delay)))
            elif op == "postpone":
                marker = Stale(1, step, "e") if step % 2 else None
                answers.append(await store.postpone(entry_id, fetcher, 60_000, marker))
            elif op == "forget":
                answers.append(await store.forget(entry_id, fetcher))
            elif op == "target":
                bucket = store.keys.bucket_of(entry_id).index
                answers.append(sorted(await store.target(bucket, [entry_id, some[0]], action, tag)))  # type: ignore[arg-type]
            else:
                answers.append(await store.take_budget(fetcher, 0.01, 2, owe=step % 3 == 0))
        assert answers[0] == answers[1], (step, op, entry_id, answers)
        if step % 50 == 0:
            await compare_contents(stores, ids, tags)
    await compare_contents(stores, ids, tags)
    for store in stores:
        await store.aclose()


async def compare_contents(stores: list[Store], ids: list[str], tags: list[str]) -> None:
    seen = []
    for store in stores:
        described = await store.describe(ids)
        tagged = {
            tag: sorted(i for _, batch in [b async for b in store.tagged(tag, 100)] for i in batch) for tag in tags
        }
        counts = {b: {f: n for f, n in c.items() if n} for b, c in (await store.bucket_counts()).items()}
        seen.append(
            (
                [(header, due is not None, marker) for header, due, marker in described],
                [await store.get(i) for i in ids],
                {f: n for f, n in (await store.entry_counts()).items() if n},
                {b: c for b, c in counts.items() if c},
                tagged,
                sorted(i for batch in [b async for b in store.stored_entries(None, 100)] for i in batch),
            )
        )
    assert seen[0] == seen[1]
