"""One URL for a Redis Cluster or a Sentinel-managed primary: what the buckets spread, what a failover, a
reshard or a lost script cache must not break.

The behaviour suite runs on the session cluster already (`store_url` "cluster"); these tests look at what
only a cluster or a sentinel shows: entries on every primary, expiry events from every primary, the bucket
count kept by the store, and faults (a killed primary, a live reshard, a sentinel failover) with real
`eagercache serve` processes. Figures (promotion time, gaps between fetches) are printed: run with `-s`.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
from redis.exceptions import TryAgainError

from eagercache import Settings, create_app, fetcher
from eagercache.errors import StoreUnavailable
from eagercache.fetchers import build_registry
from eagercache.item import Entry, build_entry
from eagercache.keys import DEFAULT_NAMESPACE, Keys
from eagercache.store import ClaimRound, Store

from . import fleet
from .helpers import Counter, refreshes_through
from .redis_cluster import LocalCluster, LocalSentinel, keyslot
from .redis_server import RedisServer
from .servers import ServeProcess, run_eagercache
from .test_redis import running

# redis-py's cluster client, when a failover or a reshard changes its node list, drops the old node
# objects and only marks their connections in use for a reconnect that never comes (NodesManager.set_nodes):
# those sockets are closed by the garbage collector, which warns. They are the client's, not eagercache's;
# each test here collects them before it ends (collect_garbage), under this filter, so no later test sees
# the warning.
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")


ADMIN_TOKEN = "cluster-admin-token-0123456789"
CLUSTER_BUCKETS = 256


@pytest.fixture(autouse=True)
def collect_garbage() -> Iterator[None]:
    """Collect after each test: a socket some client left to the garbage collector then warns (an error in
    this suite) in the test that left it, not in whichever later test the collector happens to run."""
    yield
    gc.collect()


class Fetches:
    """Per-entry fetch times (time.monotonic()) of an in-process fetcher, and an awaitable count of them."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.calls = Counter()

    def record(self, k: str) -> None:
        self.times.setdefault(k, []).append(time.monotonic())
        self.calls.hit()

    def since(self, moment: float) -> dict[str, int]:
        return {k: sum(1 for t in ts if t > moment) for k, ts in self.times.items()}

    async def wait(self, done: Any, timeout: float, what: str) -> None:
        """Until `done()` holds, woken by each fetch; fails with `what` after `timeout` s."""
        try:
            async with asyncio.timeout(timeout):
                while not done():
                    await self.calls.reach(self.calls.count + 1, timeout=timeout)
        except TimeoutError:
            raise AssertionError(f"{what}: not within {timeout} s") from None


def primaries_of(cluster: LocalCluster, keys: Iterable[str]) -> dict[str, int]:
    """The primary (port) that holds each key, by the cluster's slot map."""
    return {key: cluster.owner(keyslot(key)) for key in keys}


class ClusterKeys:
    """Commands on single keys of a cluster, each sent to the primary that holds the key's slot, by the slot
    map as read once at the start (redis-py's sync RedisCluster leaves a socket open when it closes)."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("redis://").split("/", 1)[0].rsplit(":", 1)
        with redis.Redis(host=host, port=int(port), socket_timeout=5) as seed:
            ranges: list[Any] = seed.execute_command("CLUSTER", "SLOTS")
        self._owners = [(int(r[0]), int(r[1]), (r[2][0].decode(), int(r[2][1]))) for r in ranges]
        self._clients: dict[tuple[str, int], redis.Redis] = {}

    def __enter__(self) -> ClusterKeys:
        return self

    def __exit__(self, *exc: object) -> None:
        for client in self._clients.values():
            client.close()

    def __getitem__(self, key: str) -> redis.Redis:
        """A client of the primary holding `key`."""
        slot = keyslot(key)
        address = next(node for low, high, node in self._owners if low <= slot <= high)
        if address not in self._clients:
            self._clients[address] = redis.Redis(host=address[0], port=address[1], socket_timeout=5)
        return self._clients[address]


def fleet_entry_id(k: object) -> str:
    """The entry id of tests.fleet:quick?k=<k>."""
    return _fleet_registry.call("quick", f"k={k}".encode())[1].entry_id


def fleet_item_key(k: object) -> str:
    """The item key of tests.fleet:quick?k=<k> on a cluster's default layout (256 buckets)."""
    return Keys(DEFAULT_NAMESPACE, CLUSTER_BUCKETS).item(fleet_entry_id(k))


_fleet_registry = build_registry([fleet.quick])


def fleet_calls(client: redis.Redis, key: object) -> list[float]:
    """Server times of every fetch of one tests.fleet entry, in order."""
    raw: list[bytes] = client.lrange(f"fleet:calls:{key}", 0, -1)  # type: ignore[assignment]
    return sorted(float(entry.split()[0]) for entry in raw)


def gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(stamps)]


# -- the session cluster (3 primaries, no replicas), in-process apps


async def test_one_url_finds_the_cluster_and_names_it(cluster: LocalCluster, cluster_url: str) -> None:
    @fetcher(ttl=60, jitter=0)
    async def spread(k: str) -> dict[str, str]:
        return {"k": k}

    app = create_app([spread], redis_url=cluster_url)
    async with running(app) as client:
        answers = await asyncio.gather(*(client.get(f"/data/spread?k={i}") for i in range(40)))
        assert {a.status_code for a in answers} == {200}
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        status = ready.json()
        metrics = app.state.metrics
        keys = app.state.store.keys
        topology_metric = metrics.sample("eagercache_store_topology", topology="cluster", buckets="256")
        primaries_metric = metrics.sample("eagercache_store_primaries")
        subscribed_metric = metrics.sample("eagercache_expiry_subscribed_nodes")
    ports = set(cluster.primary_ports())
    assert len(ports) == 3
    assert status["topology"] == "cluster with 3 primaries"
    assert status["buckets"] == CLUSTER_BUCKETS
    assert status["refresh_mode"] == "events+schedule"
    assert {int(p.rsplit(":", 1)[1]) for p in status["primaries"]} == ports
    assert {int(p.rsplit(":", 1)[1]) for p in status["subscribed_nodes"]} == ports
    assert (topology_metric, primaries_metric, subscribed_metric) == (1, 3, 3)
    item_keys = [keys.item(f"spread?k={i}") for i in range(40)]
    with ClusterKeys(cluster_url) as nodes:
        assert nodes[keys.layout].get(keys.layout) == b"256"
        stored = [key for key in item_keys if nodes[key].exists(key)]
    assert stored == item_keys  # every entry read is stored ...
    assert set(primaries_of(cluster, stored).values()) == ports  # ... and they sit on every primary


async def test_expiry_events_arrive_from_every_primary(cluster: LocalCluster, cluster_url: str) -> None:
    """With the schedule loop switched off, only expiry events can refresh: every primary's must arrive."""
    log = Fetches()

    @fetcher(ttl=1, jitter=0)
    async def evented(k: str) -> str:
        log.record(k)
        return k

    app = create_app([evented], redis_url=cluster_url)
    never = asyncio.Event()

    async def no_schedule() -> None:
        await never.wait()

    app.state.refresher._follow_schedule = no_schedule  # looked up when the refresher starts its loops
    entries = [str(i) for i in range(30)]
    async with running(app) as client:
        answers = await asyncio.gather(*(client.get(f"/data/evented?k={k}") for k in entries))
        assert {a.status_code for a in answers} == {200}
        cold_done = time.monotonic()
        await log.wait(
            lambda: all(n >= 2 for n in log.since(cold_done).values()) and len(log.since(cold_done)) == len(entries),
            timeout=10,
            what="every entry refreshed twice by events",
        )
        keys = app.state.store.keys
    # The lifespan has ended: every fetch started is counted by now.
    metrics = app.state.metrics
    by_cause = {
        cause: metrics.sample("eagercache_fetches_total", fetcher="evented", cause=cause, outcome="ok")
        for cause in ("cold", "event", "schedule", "admin")
    }
    refreshed = [k for k, n in log.since(cold_done).items() if n >= 2]
    owners = primaries_of(cluster, [keys.item(f"evented?k={k}") for k in refreshed])
    assert set(owners.values()) == set(cluster.primary_ports())
    assert by_cause["cold"] == len(entries)
    assert by_cause["event"] == log.calls.count - len(entries) >= 2 * len(entries)  # every refresh: an event's
    assert by_cause["schedule"] == by_cause["admin"] == 0


async def test_an_event_claim_that_fails_in_one_bucket_still_refreshes_the_others(cluster_url: str) -> None:
    """A slot moving, a node failing: one bucket's claim in a batch of event claims fails while the others'
    succeed. The entries claimed in the others must be refreshed at once, not left leased to nobody."""
    log = Fetches()

    @fetcher(ttl=1, jitter=0, timeout=1)
    async def batched(k: str) -> str:
        log.record(k)
        return k

    app = create_app([batched], redis_url=cluster_url)
    store = app.state.store
    pipelined = store._pipelined
    state: dict[str, Any] = {"failed": None, "others": []}

    async def one_bucket_fails(calls: Sequence[tuple[Any, list[str], list[Any]]]) -> list[Any]:
        results: list[Any] = await pipelined(calls)  # every script ran on its primary
        event_claim = all(script is store._claim_many for script, _, _ in calls)
        if event_claim and state["failed"] is None and len(calls) >= 2:
            # As if the first bucket's reply were lost to its slot moving: the others' claims stand.
            state["failed"] = calls[0][1][0]
            state["others"] = [entry for _, _, args in calls[1:] for entry in args[5:]]  # after the shadow key prefix
            results[0] = TryAgainError("injected: the slot is moving")
        return results

    store._pipelined = one_bucket_fails
    never = asyncio.Event()

    async def no_schedule() -> None:
        await never.wait()

    # Events alone claim here (the schedule would otherwise take some entries first, by chance).
    app.state.refresher._follow_schedule = no_schedule
    entries = [str(i) for i in range(20)]
    async with running(app) as client:
        answers = await asyncio.gather(*(client.get(f"/data/batched?k={k}") for k in entries))
        assert {a.status_code for a in answers} == {200}
        deadline = time.monotonic() + 5
        while state["failed"] is None:
            assert time.monotonic() < deadline, "no event batch spanning two buckets was claimed"
            await log.calls.reach(log.calls.count + 1, timeout=5)
        injected = time.monotonic()
        others = [entry.split("=", 1)[1] for entry in state["others"]]
        await log.wait(
            lambda: all(max(log.times[k]) > injected for k in others), timeout=4, what="the others refreshed"
        )
    assert others


@pytest.mark.fault
async def test_a_retried_write_does_not_take_back_an_entry_claimed_since(cluster_url: str) -> None:
    """A refresh's write fails (a failover, a slot moving) until after the entry's next due time; one attempt
    is stored but its reply is lost; another replica claims the entry, fetches and writes it. The first
    replica's next attempt must not make the entry due again: that cycle has been fetched."""
    fetched: list[float] = []  # this replica's fetches of the entry, by time.monotonic()

    @fetcher(ttl=2, jitter=0, timeout=1)
    async def retried(k: str) -> str:
        fetched.append(time.monotonic())
        return k

    entry = "retried?k=a"
    app = create_app([retried], redis_url=cluster_url)
    store = app.state.store
    other = Store(cluster_url)  # the other replica, played by this test
    write = store.write
    taken: dict[str, Any] = {}

    async def write_lost_then_claimed(entry_id: str, name: str, value: bytes, due_at_ms: int, **kw: Any) -> int:
        if entry_id != entry or kw.get("mode") != "refresh" or "claimed_at" in taken:
            return int(await write(entry_id, name, value, due_at_ms, **kw))
        if store.clock.now_ms() < due_at_ms:
            raise StoreUnavailable("injected: the primary is failing over")
        await write(entry_id, name, value, due_at_ms, **kw)  # stored: due at once (its due time has passed) ...
        claimed: Any = await other.claim([entry], lease_ms=6000)  # ... the other replica claims it ...
        (claim,) = getattr(claimed, "claims", claimed)  # a ClaimRound, or (before it) a list of claims
        taken["claimed_at"] = time.monotonic()
        assert claim.due_ms is not None
        taken["due_ms"] = claim.due_ms + 2000
        value, _ = build_entry(b'"a"', other.clock.now_ms(), taken["due_ms"], previous_header=claim.header)
        await other.write(entry, name, value, taken["due_ms"], mode="refresh", max_entries=100)  # ... and refreshes
        raise StoreUnavailable("injected: the reply of a stored write lost")

    store.write = write_lost_then_claimed
    refreshes_through(store, write_lost_then_claimed)  # a claim round's refreshes write in one batch
    await other.prepare()
    try:
        async with running(app) as client:
            assert (await client.get("/data/retried?k=a")).status_code == 200
            deadline = time.monotonic() + 10
            while "claimed_at" not in taken:
                assert time.monotonic() < deadline, "the write was not retried past the entry's next due time"
                await asyncio.sleep(0.05)  # the refresher's retries: nothing to await from here
            # Until the other replica's refresh is due again, nobody should fetch the entry.
            while other.clock.now_ms() < taken["due_ms"] - 100:
                await asyncio.sleep(0.05)  # the time under measurement
    finally:
        await other.aclose()
    again = [round(t - taken["claimed_at"], 3) for t in fetched if t > taken["claimed_at"]]
    assert again == [], f"fetched again {again} s after another replica had claimed and refreshed it"


@pytest.mark.fault
async def test_a_refresh_claimed_while_the_last_one_finishes_is_not_lost(cluster_url: str) -> None:
    """A refresh's write is slow: it lands after the entry's next due time, and the task takes a moment more
    to finish. The entry, due at once, is claimed again meanwhile: that claim must lead to a refresh."""
    log = Fetches()

    @fetcher(ttl=1, jitter=0, timeout=1)
    async def slow_write(k: str) -> str:
        log.record(k)
        return k

    app = create_app([slow_write], redis_url=cluster_url)
    store = app.state.store
    write = store.write
    slowed: dict[str, float] = {}

    async def late_write(entry_id: str, name: str, value: bytes, due_at_ms: int, **kw: Any) -> int:
        if kw.get("mode") != "refresh" or slowed:
            return int(await write(entry_id, name, value, due_at_ms, **kw))
        while store.clock.now_ms() < due_at_ms + 200:
            await asyncio.sleep(0.02)  # the store is slow: the write lands past the next due time
        stored = int(await write(entry_id, name, value, due_at_ms, **kw))
        slowed["at"] = time.monotonic()
        await asyncio.sleep(0.3)  # and its reply takes a moment: the entry is claimed again meanwhile
        return stored

    store.write = late_write
    refreshes_through(store, late_write)  # a claim round's refreshes write in one batch
    async with running(app) as client:
        assert (await client.get("/data/slow_write?k=a")).status_code == 200
        deadline = time.monotonic() + 5
        while "at" not in slowed:
            assert time.monotonic() < deadline, "no refresh was written late"
            await asyncio.sleep(0.02)  # the refresher's own pace: nothing to await from here
        # Due again since its late write: refreshed within a cycle (plus the 0.3 s the slow write held on).
        deadline = slowed["at"] + 2.0
        while time.monotonic() < deadline and max(log.times["a"]) < slowed["at"]:
            await asyncio.sleep(0.05)  # the time under measurement
    again = [round(t - slowed["at"], 2) for t in log.times["a"] if t > slowed["at"]]
    assert again, "not refreshed again within 2 s of a late write that made it due"


async def test_a_bucket_count_that_differs_from_the_stores_is_refused(cluster: LocalCluster, cluster_url: str) -> None:
    @fetcher(ttl=60)
    async def sixteen(k: str) -> str:
        return k

    app = create_app([sixteen], settings=Settings(redis_url=cluster_url, buckets=16))
    async with running(app) as client:
        assert (await client.get("/data/sixteen?k=a")).status_code == 200
        status = (await client.get("/readyz")).json()
    assert status["buckets"] == 16

    refused = run_eagercache("serve", "--redis-url", cluster_url, "--buckets", "32")
    assert refused.returncode == 2, refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("eagercache:")]
    assert len(errors) == 1, refused.stderr
    assert "keeps 16 buckets" in errors[0] and "--buckets asks for 32" in errors[0], errors[0]
    assert "Traceback" not in refused.stderr
    with ClusterKeys(cluster_url) as nodes:
        layout = f"{DEFAULT_NAMESPACE}layout"
        assert nodes[layout].get(layout) == b"16"  # the refused process changed nothing

    # Left unset, a process takes the store's count.
    app = create_app([sixteen], redis_url=cluster_url)
    async with running(app) as client:
        assert (await client.get("/data/sixteen?k=a")).headers["x-cache"] == "HIT"
        assert (await client.get("/readyz")).json()["buckets"] == 16

    braced = run_eagercache("serve", "--redis-url", cluster_url, "--namespace", "app{1}:")
    assert braced.returncode == 2, braced.stderr
    assert "namespace may not contain '{' or '}'" in braced.stderr, braced.stderr
    assert "Traceback" not in braced.stderr


async def test_scripts_lost_by_every_node_are_loaded_again(cluster: LocalCluster, cluster_url: str) -> None:
    log = Fetches()

    @fetcher(ttl=0.5, jitter=0)
    async def scripted(k: str) -> str:
        log.record(k)
        return k

    app = create_app([scripted], redis_url=cluster_url)
    entries = [str(i) for i in range(30)]
    statuses: list[int] = []
    async with running(app) as client:

        async def read_all() -> None:
            answers = await asyncio.gather(*(client.get(f"/data/scripted?k={k}") for k in entries))
            statuses.extend(a.status_code for a in answers)

        await read_all()
        store = app.state.store
        shas = [script.sha for script in store._scripts.values()]
        owners = set(primaries_of(cluster, [store.keys.item(f"scripted?k={k}") for k in entries]).values())
        assert owners == set(cluster.primary_ports())
        for port in cluster.primary_ports():
            node = cluster.client(port)
            try:
                assert all(node.script_exists(*shas))
                node.script_flush()
                assert not any(node.script_exists(*shas))
            finally:
                node.close()
        flushed, flushed_wall = time.monotonic(), time.time()
        deadline = flushed + 10
        while not (len(log.since(flushed)) == len(entries) and min(log.since(flushed).values()) >= 3):
            assert time.monotonic() < deadline, f"refreshes after SCRIPT FLUSH: {log.since(flushed)}"
            await read_all()
            await asyncio.sleep(0.05)  # a reader's pace
        await read_all()
    assert set(statuses) == {200}
    with ClusterKeys(cluster_url) as nodes:
        for key in (store.keys.item(f"scripted?k={k}") for k in entries):
            raw = nodes[key].get(key)
            assert isinstance(raw, bytes)
            assert Entry.parse(raw).last_retrieved_ms >= flushed_wall * 1000  # written after the flush
    # The scripts a refresh runs (claims, writes) are back on every primary.
    for port in cluster.primary_ports():
        node = cluster.client(port)
        try:
            assert node.script_exists(store._claim_due.sha, store._write.sha) == [True, True]
        finally:
            node.close()


async def test_max_entries_holds_across_buckets_within_its_stated_softness(
    cluster: LocalCluster, cluster_url: str
) -> None:
    @fetcher(ttl=60, jitter=0, max_entries=20)
    async def limited(k: str) -> str:
        return k

    app = create_app([limited], redis_url=cluster_url)
    async with running(app) as client:
        answers = [await client.get(f"/data/limited?k={i}") for i in range(100)]
        assert {a.status_code for a in answers} == {200}
        assert [a.json()["data"] for a in answers] == [str(i) for i in range(100)]
        store = app.state.store
        counted = await store.entry_count("limited")
        uncached = app.state.metrics.sample("eagercache_uncached_total", fetcher="limited")
        again = await client.get("/data/limited?k=99")  # over the limit: answered, not stored
        assert again.status_code == 200 and again.json()["data"] == "99"
        assert again.headers["x-cache"] == "MISS"
    with ClusterKeys(cluster_url) as nodes:
        stored = [i for i in range(100) if nodes[key := store.keys.item(f"limited?k={i}")].exists(key)]
        buckets = {store.keys.bucket_of(f"limited?k={i}").index for i in stored}
    print(f"\nmax_entries 20 over {CLUSTER_BUCKETS} buckets, 100 reads one at a time: {len(stored)} stored")
    # One process, reads one after another: this process knows every count (Store.write), so the limit is exact.
    assert len(stored) == 20 == counted
    assert stored == list(range(20))  # the first ones, in order: later reads were refused room
    assert len(buckets) > 1  # the limit held across buckets, not in one
    assert uncached == 80


async def test_max_entries_under_a_burst_of_reads(cluster: LocalCluster, cluster_url: str) -> None:
    """The same limit, read by 100 readers at once in one process: by Store.write's docstring only other
    replicas' entries can take a fetcher past max_entries, so one process must stop at 20 here too (its cold
    writes in flight count against it)."""

    @fetcher(ttl=60, jitter=0, max_entries=20)
    async def burst(k: str) -> str:
        await asyncio.sleep(0.01)
        return k

    app = create_app([burst], redis_url=cluster_url)
    async with running(app) as client:
        answers = await asyncio.gather(*(client.get(f"/data/burst?k={i}") for i in range(100)))
        assert {a.status_code for a in answers} == {200}
        store = app.state.store
    with ClusterKeys(cluster_url) as nodes:
        stored = [i for i in range(100) if nodes[key := store.keys.item(f"burst?k={i}")].exists(key)]
    print(f"\nmax_entries 20 over {CLUSTER_BUCKETS} buckets, 100 concurrent reads: {len(stored)} stored")
    assert len(stored) == 20


async def test_admin_lists_and_invalidates_across_buckets(cluster: LocalCluster, cluster_url: str) -> None:
    @fetcher(ttl=60, jitter=0)
    async def listed(k: str) -> str:
        return k

    @fetcher(ttl=60, jitter=0)
    async def kept(k: str) -> str:
        return k

    app = create_app([listed, kept], settings=Settings(redis_url=cluster_url, admin_token=ADMIN_TOKEN))
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    entries = {f"listed?k={i}" for i in range(30)}
    async with running(app) as client:
        answers = await asyncio.gather(
            *(client.get(f"/data/listed?k={i}") for i in range(30)),
            *(client.get(f"/data/kept?k={i}") for i in range(5)),
        )
        assert {a.status_code for a in answers} == {200}
        store = app.state.store
        owners = set(primaries_of(cluster, [store.keys.item(e) for e in entries]).values())
        assert owners == set(cluster.primary_ports())

        listed_ids: list[str] = []
        cursor: str | None = ""
        pages = 0
        while cursor is not None:
            pages += 1
            assert pages <= 300, "paging did not end"
            page = await client.get(f"/admin/fetchers/listed/entries?limit=7&cursor={cursor}", headers=auth)
            assert page.status_code == 200, page.text
            body = page.json()
            listed_ids += [item["entry"] for item in body["entries"]]
            cursor = body["next_cursor"]
        assert sorted(listed_ids) == sorted(entries)  # each entry exactly once, none of `kept`
        assert pages >= 30 // 7

        removed = await client.delete("/admin/fetchers/listed/entries", headers=auth)
        assert removed.status_code == 200, removed.text
        assert removed.json() == {"removed": 30}
        after = await client.get("/admin/fetchers/listed/entries?limit=500", headers=auth)
        assert after.json() == {"entries": [], "next_cursor": None}
        counts = {
            f["name"]: f["entries"] for f in (await client.get("/admin/fetchers", headers=auth)).json()["fetchers"]
        }
        assert counts == {"listed": 0, "kept": 5}
        gone = await client.get("/data/listed?k=3")
        assert (gone.status_code, gone.headers["x-cache"]) == (200, "MISS")
        await client.delete("/admin/fetchers/listed/entry?k=3", headers=auth)
    left: list[bytes] = []
    kept_items = 0
    for port in cluster.primary_ports():
        node = cluster.client(port)
        try:
            left += list(node.scan_iter(match="*:listed[?]*", count=1000))
            kept_items += sum(1 for _ in node.scan_iter(match="*:item:kept[?]*", count=1000))
        finally:
            node.close()
    with ClusterKeys(cluster_url) as nodes:
        for bucket in store.keys.buckets:
            for schedule in (bucket.due, bucket.read):
                members: list[bytes] = nodes[schedule].zrange(schedule, 0, -1)  # type: ignore[assignment]
                left += [m for m in members if m.startswith(b"listed?")]
            counts_left = nodes[bucket.counts].hget(bucket.counts, "listed")
            assert counts_left in (None, b"0"), (bucket.counts, counts_left)
    assert not left, left[:5]  # no item, shadow, stale key or schedule member of `listed` on any primary
    assert kept_items == 5


# -- faults, with real `eagercache serve` processes; the fleet log lives on a standalone server of its own

TTL_S = 1.0  # tests.fleet:quick's ttl (jitter 0, timeout 1 s)
# A fetch is claimed only once its entry is due by the store's clock, and logged after its claim; the log
# server and the store read this host's clock. A fetch earlier than its entry's due time is a second fetch
# of a cycle; 50 ms covers the timestamps' rounding and nothing else.
EARLY_TOLERANCE_S = 0.05
# One ttl, then an expiry event lost and the schedule taking over (it claims at each bucket's next due
# time, and at least every backstop interval of 1 s), plus scheduling noise on 2 busy cores.
MAX_GAP_S = TTL_S + 1.5


class Fleet:
    """`eagercache serve` processes running tests.fleet:quick on one store, and the standalone server that
    logs their fetches (by its own clock, the one every time in these tests is read from)."""

    def __init__(self, store_url: str, processes: int) -> None:
        self.log_server = RedisServer()
        self.log_server.start()
        self.log = redis.Redis(port=self.log_server.port, socket_timeout=5)
        env = {"FLEET_REDIS_URL": self.log_server.url}
        args = ("--redis-url", store_url, "--fetchers", "tests.fleet:quick")
        self.processes = [ServeProcess(*args, env=env) for _ in range(processes)]
        try:
            for process in self.processes:
                try:
                    process.wait_ready(timeout=30)
                except TimeoutError as exc:
                    raise TimeoutError(f"{exc}; its log: {process.stderr()[-3000:]}") from None
        except BaseException:
            self.close()
            raise

    def now(self) -> float:
        seconds, micros = self.log.time()
        return seconds + micros / 1e6

    def calls(self, entries: Iterable[int]) -> dict[int, list[float]]:
        return {i: fleet_calls(self.log, i) for i in entries}

    def problems(self) -> list[str]:
        """The warnings and errors the processes logged (first line of each), for the printed figures."""
        return [
            f"{process.port}: {line[20:200]}"
            for process in self.processes
            for line in process.stderr().splitlines()
            if " WARNING " in line or " ERROR " in line
        ]

    def background_errors(self) -> dict[str, float]:
        """eagercache_background_errors_total by component, summed over the processes."""
        found: dict[str, float] = {}
        prefix = 'eagercache_background_errors_total{component="'
        for process in self.processes:
            for line in httpx.get(f"{process.url}/metrics", timeout=5).text.splitlines():
                if line.startswith(prefix):
                    component, _, value = line[len(prefix) :].partition('"} ')
                    found[component] = found.get(component, 0.0) + float(value)
        return found

    def close(self) -> None:
        for process in self.processes:
            process.close()
        self.log.close()
        self.log_server.stop()


class Readers:
    """Reads every entry again and again, through every process, recording what it got."""

    def __init__(self, fleet: Fleet, entries: Iterable[int]) -> None:
        self.fleet = fleet
        self.entries = list(entries)
        self.statuses: dict[int, int] = {}
        self.caches: dict[str, int] = {}
        self.errors: list[str] = []
        self.rounds = 0

    async def once(self, client: httpx.AsyncClient, processes: list[ServeProcess] | None = None) -> None:
        async def read(url: str, i: int) -> None:
            try:
                answer = await client.get(f"{url}/data/quick?k={i}")
            except httpx.HTTPError as exc:
                self.errors.append(f"{url} k={i}: {type(exc).__name__}: {exc}")
                return
            self.statuses[answer.status_code] = self.statuses.get(answer.status_code, 0) + 1
            cache = answer.headers.get("x-cache", "-")
            self.caches[cache] = self.caches.get(cache, 0) + 1
            if answer.status_code != 200:
                self.errors.append(f"{url} k={i}: {answer.status_code} {answer.text[:200]}")

        targets = self.fleet.processes if processes is None else processes
        await asyncio.gather(*(read(p.url, i) for p in targets for i in self.entries))
        self.rounds += 1

    async def warm_up(self, client: httpx.AsyncClient, cycles: int) -> None:
        """Cold reads through one process (so each entry has one cold fetch), then reads through every
        process (each keeps a copy to answer from while the store cannot), then `cycles` refreshes."""
        await self.once(client, self.fleet.processes[:1])
        await self.once(client)
        assert self.errors == [], self.errors[:3]
        await self.until(
            client,
            lambda: min(len(c) for c in self.fleet.calls(self.entries).values()) >= 1 + cycles,
            timeout=5 + 2 * cycles,
            what=f"{cycles} refresh cycles",
        )

    async def until(self, client: httpx.AsyncClient, done: Any, timeout: float, what: str) -> None:
        """Read rounds until `done()` holds (checked between rounds), for at most `timeout` s."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s")
            await self.once(client)
            await asyncio.sleep(0.1)  # a reader's pace

    async def for_seconds(self, client: httpx.AsyncClient, seconds: float) -> None:
        end = time.monotonic() + seconds
        await self.until(client, lambda: time.monotonic() >= end, seconds + 30, f"reading for {seconds} s")


def longest_gap(calls: dict[int, list[float]], end: float) -> tuple[int, float]:
    """The entry with the longest time between consecutive fetches, and that time; the last fetch counts up
    to `end`, so an entry that stopped being refreshed shows."""
    return max(((i, max(gaps([*stamps, end]))) for i, stamps in calls.items()), key=lambda found: found[1])


def early_fetches(calls: dict[int, list[float]]) -> dict[int, list[float]]:
    """Fetches that came before their entry was due: each cycle fetched twice shows as one (the times are
    given relative to the due time they came before).

    The due times are followed as the engine sets them (engine._next_due, jitter 0): one ttl after a cold
    fetch; then one ttl after the previous due time, or one ttl after the fetch if that was more than a ttl
    late. A late refresh followed by an on-time one (a catch-up) is two cycles, not a duplicate.
    """
    early: dict[int, list[float]] = {}
    for i, stamps in calls.items():
        due: float | None = None
        for t in stamps:
            if due is not None and t < due - EARLY_TOLERANCE_S:
                early.setdefault(i, []).append(round(t - due, 3))
                continue  # a second fetch of a served cycle: the entry stays due when it was
            due = t + TTL_S if due is None or due + TTL_S <= t else due + TTL_S
    return early


def test_the_fetch_log_model_tells_a_second_fetch_from_a_catch_up() -> None:
    """early_fetches, on made-up logs (ttl 1 s): what the fault tests below count as a cycle fetched twice."""
    on_time = [0.0, 1.01, 2.02, 3.01]
    catch_up = [0.0, 1.7, 2.02, 3.0]  # a refresh 0.7 s late, then the next one on time: two cycles
    re_anchored = [0.0, 3.5, 4.5]  # more than a ttl late: the next one is due a ttl after it
    twice = [0.0, 1.0, 1.03, 2.0]  # the cycle due at 1.0 fetched by two claimers
    lost_replication = [0.0, 1.0, 1.6]  # a write the new primary never got: the cycle due at 1.0 again
    early = early_fetches({0: on_time, 1: catch_up, 2: re_anchored, 3: twice, 4: lost_replication})
    assert early == {3: [-0.97], 4: [-0.4]}


def leased_to_nobody(url: str, entries: Iterable[int]) -> list[int]:
    """Entries whose schedule score lies more than 2 s ahead: a claim's lease (the slowest fetcher's timeout
    + 5 s), not a due time (at most a ttl ahead), and no fetch takes that long here. Claimed, not refreshed."""
    keys = Keys(DEFAULT_NAMESPACE, CLUSTER_BUCKETS)
    found = []
    with ClusterKeys(url) as nodes:
        now_ms = time.time() * 1000  # the servers' clock: this host's
        for i in entries:
            entry_id = fleet_entry_id(i)
            due = keys.bucket_of(entry_id).due
            score = nodes[due].zscore(due, entry_id)
            if score is not None and score > now_ms + 2000:
                found.append(i)
    return found


def missing_items(url: str, entries: Iterable[int]) -> list[int]:
    with ClusterKeys(url) as nodes:
        return [i for i in entries if nodes[key := fleet_item_key(i)].get(key) is None]


async def readyz(client: httpx.AsyncClient, process: ServeProcess) -> tuple[int, dict[str, Any]]:
    answer = await client.get(f"{process.url}/readyz")
    return answer.status_code, answer.json()


def allow_partial_service(cluster: LocalCluster) -> None:
    """cluster-require-full-coverage no, on every node: by default a cluster refuses every command on every
    primary from the moment it marks a primary failed until a replica takes over (about a second here), which
    no client can refresh through. Caches run with it off, and then the other primaries keep serving: what
    eagercache does with that is what these tests measure."""
    for node in cluster.nodes:
        with cluster.client(node.port) as admin:
            admin.config_set("cluster-require-full-coverage", "no")


@dataclass
class FailoverRun:
    victim: int
    promoted: int
    victims: list[int]  # entries on the killed primary
    others: list[int]
    killed_at: float
    promoted_at: float
    end: float
    calls: dict[int, list[float]]
    readers: Readers
    ready: list[tuple[int, dict[str, Any]]]
    missing: list[int]
    problems: list[str]
    errors: dict[str, float]  # background errors by component
    orphaned: list[int]  # entries left leased to nobody at the end (see leased_to_nobody)
    node_timeout_s: float

    @property
    def promotion_s(self) -> float:
        return self.promoted_at - self.killed_at

    def back_after(self) -> dict[int, float]:
        """For each entry of the killed primary: its first fetch once it is served again, in seconds after the
        kill. A fetch in the first half second was claimed before the kill (and logged a little after it);
        none can come later until a replica serves the entry (the kill is noticed after node_timeout, 1 s)."""
        return {
            i: min((t for t in self.calls[i] if t > self.killed_at + 0.5), default=float("inf")) - self.killed_at
            for i in self.victims
        }


async def _fail_over() -> FailoverRun:
    entries = list(range(60))
    with LocalCluster(primaries=3, replicas=1, node_timeout_ms=1000) as cluster:
        allow_partial_service(cluster)
        fleet = Fleet(cluster.url, processes=2)
        try:
            owner = {i: cluster.owner(keyslot(fleet_item_key(i))) for i in entries}
            assert set(owner.values()) == set(cluster.primary_ports())
            victim = cluster.primary_ports()[0]
            readers = Readers(fleet, entries)
            async with httpx.AsyncClient(timeout=15) as client:
                await readers.warm_up(client, cycles=3)
                killed_at = fleet.now()
                cluster.kill(victim)
                promotion = asyncio.create_task(asyncio.to_thread(cluster.wait_promoted, victim, 20.0))
                await readers.until(client, promotion.done, timeout=25, what="a replica promoted")
                promoted = await promotion
                promoted_at = fleet.now()
                await readers.for_seconds(client, 5.0)
                ready = [await readyz(client, p) for p in fleet.processes]
                end = fleet.now()
            calls = fleet.calls(entries)
            errors = fleet.background_errors()
            orphaned = leased_to_nobody(cluster.url, entries)
            problems = fleet.problems()
        finally:
            fleet.close()
        missing = missing_items(cluster.url, entries)
    run = FailoverRun(
        victim=victim,
        promoted=promoted,
        victims=[i for i in entries if owner[i] == victim],
        others=[i for i in entries if owner[i] != victim],
        killed_at=killed_at,
        promoted_at=promoted_at,
        end=end,
        calls=calls,
        readers=readers,
        ready=ready,
        missing=missing,
        problems=problems,
        errors=errors,
        orphaned=orphaned,
        node_timeout_s=cluster.node_timeout_ms / 1000,
    )
    back = run.back_after().values()
    worst, gap = longest_gap({i: calls[i] for i in run.others}, end)
    print(
        f"\ncluster failover: {len(run.victims)} of {len(entries)} entries on the killed primary; replica promoted "
        f"{run.promotion_s:.2f} s after the kill; its entries fetched again {min(back):.2f}-{max(back):.2f} s after "
        f"the kill; other primaries' entries: longest gap {gap:.2f} s (k={worst}, times after the kill "
        f"{[round(t - killed_at, 2) for t in calls[worst]]}); fetches before their due time: {early_fetches(calls)}; "
        f"shortest gap {min(g for c in calls.values() for g in gaps(c)):.3f} s; reads {readers.statuses} "
        f"{readers.caches} in {readers.rounds} rounds; background errors {errors}; leased to nobody at the end: "
        f"{orphaned}; logged: {problems[:6]}"
    )
    return run


@pytest.fixture(scope="module")
def failover() -> FailoverRun:
    """One failover, looked at by several tests: a cluster of 3 primaries with a replica each, 2 processes,
    60 entries on every primary, read all along; one primary killed with SIGKILL."""
    return asyncio.run(_fail_over())


@pytest.mark.fault
@pytest.mark.timeout(150)
def test_failover_loses_nothing_and_fetches_once_per_cycle(failover: FailoverRun) -> None:
    run = failover
    assert run.victims and run.others
    # (d) every entry is stored at the end: the replica had them all.
    assert run.missing == []
    # Each process says where it stands: ready, on 3 primaries, the new one instead of the dead one.
    for code, status in run.ready:
        assert code == 200, status
        assert status["topology"] == "cluster with 3 primaries"
        assert f"127.0.0.1:{run.promoted}" in status["primaries"]
        assert f"127.0.0.1:{run.victim}" not in status["primaries"]
        assert status["failovers"] >= 1
    # Every read answered 200: from the store, or (the dead primary's entries) from memory, marked STALE.
    assert run.readers.errors == [], run.readers.errors[:5]
    assert set(run.readers.statuses) == {200}
    # (b) the dead primary's entries are refreshed again once its replica serves them: the kill is
    # noticed within node_timeout, the promotion is measured, and 2 s cover a claim retry and a fetch ...
    bound_s = run.node_timeout_s + run.promotion_s + 2.0
    back = run.back_after()
    after = {i: [t for t in run.calls[i] if t >= run.killed_at + back[i]] for i in run.victims}
    worst, gap = longest_gap(after, run.end)
    assert max(back.values()) <= bound_s, ({i: round(t, 2) for i, t in back.items() if t > bound_s}, run.orphaned)
    # ... and from then on every cycle, like the others.
    assert gap <= MAX_GAP_S, (worst, [round(t - run.killed_at, 2) for t in run.calls[worst]], run.orphaned)
    # (c) no cycle fetched twice, by one process or by both, before, during or after the failover.
    assert early_fetches(run.calls) == {}


@pytest.mark.fault
@pytest.mark.timeout(150)
def test_failover_leaves_the_other_primaries_entries_on_time(failover: FailoverRun) -> None:
    """(a) The primaries that did not fail go on serving (see allow_partial_service): their entries are
    refreshed every cycle throughout, as if nothing happened."""
    worst, gap = longest_gap({i: failover.calls[i] for i in failover.others}, failover.end)
    times = [round(t - failover.killed_at, 2) for t in failover.calls[worst]]
    assert gap <= MAX_GAP_S, f"k={worst}: a gap of {gap:.2f} s; fetches at {times} s after the kill"


@dataclass
class DeadPrimaryRun:
    mode: str
    slowest_round_s: float  # the slowest claim round after the kill
    worst: int
    gap: float  # the longest gap between fetches of an entry on a primary that did not die
    times: list[float]  # that entry's fetches, in seconds after the kill


async def _dead_primary() -> DeadPrimaryRun:
    log = Fetches()

    @fetcher(ttl=TTL_S, jitter=0, timeout=1)
    async def scheduled(k: str) -> str:
        log.record(k)
        return k

    entries = [str(i) for i in range(30)]
    rounds: list[tuple[float, float]] = []  # claim rounds: (start, seconds taken), by time.monotonic()
    with LocalCluster(primaries=3) as cluster:
        allow_partial_service(cluster)
        app = create_app([scheduled], redis_url=cluster.url)
        refresher, store = app.state.refresher, app.state.store
        refresher.uses_events = False  # read when the refresher starts: the schedule alone
        claim_due = store.claim_due

        async def timed_claim_due(buckets: Sequence[int], lease_ms: int, limit: int) -> ClaimRound:
            started = time.monotonic()
            try:
                claimed: ClaimRound = await claim_due(buckets, lease_ms, limit)
                return claimed
            finally:
                rounds.append((started, time.monotonic() - started))

        store.claim_due = timed_claim_due
        async with running(app) as client:
            answers = await asyncio.gather(*(client.get(f"/data/scheduled?k={k}") for k in entries))
            assert {a.status_code for a in answers} == {200}
            owner = primaries_of(cluster, [store.keys.item(f"scheduled?k={k}") for k in entries])
            dead = cluster.primary_ports()[0]
            healthy = [k for k in entries if owner[store.keys.item(f"scheduled?k={k}")] != dead]
            await log.wait(lambda: min(len(log.times[k]) for k in entries) >= 3, timeout=8, what="two refreshes")
            killed_at = time.monotonic()
            cluster.kill(dead)
            # Not read meanwhile: the refresher alone is watched (reads of the dead slots are another matter).
            await asyncio.sleep(4)  # four refresh cycles: the time under measurement
            end = time.monotonic()
            mode = refresher.mode
    worst, gap = longest_gap({int(k): log.times[k] for k in healthy}, end)
    slowest = max(taken for started, taken in rounds if started + taken > killed_at)
    run = DeadPrimaryRun(mode, slowest, worst, gap, [round(t - killed_at, 2) for t in log.times[str(worst)]])
    print(
        f"\nschedule alone, one primary of 3 dead: slowest claim round {slowest:.2f} s; the others' entries' "
        f"longest gap {gap:.2f} s (k={worst}: {run.times} s after the kill)"
    )
    return run


@pytest.fixture(scope="module")
def dead_primary() -> DeadPrimaryRun:
    """The schedule alone (no expiry events: a cluster whose operator left them off and refuses CONFIG), in
    one process, 30 entries on 3 primaries; one primary killed for good (no replica), the others serving."""
    return asyncio.run(_dead_primary())


@pytest.mark.fault
def test_a_dead_primary_does_not_hold_up_the_schedule_of_the_others(dead_primary: DeadPrimaryRun) -> None:
    run = dead_primary
    assert run.mode == "schedule"
    # A dead node refuses connections at once: a claim round (all nodes at once) needs no more than a second.
    assert run.slowest_round_s <= 1.0
    assert run.gap <= MAX_GAP_S, (run.worst, run.times)


@pytest.mark.fault
def test_a_dead_primarys_failed_claims_do_not_delay_the_others(dead_primary: DeadPrimaryRun) -> None:
    """The entries of the primaries that answer are claimed when due: a cycle, plus a claim's round trip and
    scheduling noise (0.5 s), between fetches."""
    assert dead_primary.gap <= TTL_S + 0.5, (dead_primary.worst, dead_primary.times)


@dataclass
class ReshardRun:
    added: int
    moving: list[int]  # entries in the buckets whose slots moved
    moved_buckets: int
    move_started: float
    moved_at: float
    end: float
    calls: dict[int, list[float]]
    owners: dict[int, int]
    readers: Readers
    missing: list[int]
    problems: list[str]
    errors: dict[str, float]  # background errors by component
    orphaned: list[int]  # entries left leased to nobody at the end (see leased_to_nobody)


async def _reshard() -> ReshardRun:
    entries = list(range(60))
    keys = Keys(DEFAULT_NAMESPACE, CLUSTER_BUCKETS)
    bucket_of = {i: keys.bucket_of(fleet_entry_id(i)).index for i in entries}
    bucket_slot = {n: keyslot(keys.buckets[n].due) for n in range(CLUSTER_BUCKETS)}
    with LocalCluster(primaries=3) as cluster:
        fleet = Fleet(cluster.url, processes=2)
        try:
            source = cluster.primary_ports()[1]  # not the URL's node: any primary may give slots away
            # Every bucket whose slot the source serves moves: the ones holding entries, and empty ones.
            moving_buckets = {n for n, slot in bucket_slot.items() if cluster.owner(slot) == source}
            moving = [i for i in entries if bucket_of[i] in moving_buckets]
            assert len({bucket_of[i] for i in moving}) >= 5, "too few buckets with entries to move"
            readers = Readers(fleet, entries)
            async with httpx.AsyncClient(timeout=15) as client:
                await readers.warm_up(client, cycles=2)
                added = cluster.add_primary().port
                move_started = fleet.now()
                slots = sorted({bucket_slot[n] for n in moving_buckets})
                move = asyncio.create_task(asyncio.to_thread(cluster.move_slots, slots, added))
                await readers.until(client, move.done, timeout=30, what="the slots moved")
                await move
                moved_at = fleet.now()
                await readers.for_seconds(client, 4.0)
                end = fleet.now()
            calls = fleet.calls(entries)
            errors = fleet.background_errors()
            orphaned = leased_to_nobody(cluster.url, entries)
            problems = fleet.problems()
            owners = {i: cluster.owner(keyslot(fleet_item_key(i))) for i in entries}
        finally:
            fleet.close()
        missing = missing_items(cluster.url, entries)
    run = ReshardRun(
        added=added,
        moving=moving,
        moved_buckets=len(moving_buckets),
        move_started=move_started,
        moved_at=moved_at,
        end=end,
        calls=calls,
        owners=owners,
        readers=readers,
        missing=missing,
        problems=problems,
        errors=errors,
        orphaned=orphaned,
    )
    worst, gap = longest_gap(calls, end)
    print(
        f"\nlive reshard: {len(moving_buckets)} buckets' slots ({len(moving)} of {len(entries)} entries) moved to a "
        f"new primary in {moved_at - move_started:.2f} s; longest gap {gap:.2f} s (k={worst}, times after the "
        f"move began {[round(t - move_started, 2) for t in calls[worst]]}); fetches before their due time: "
        f"{early_fetches(calls)}; shortest gap {min(g for c in calls.values() for g in gaps(c)):.3f} s; reads "
        f"{readers.statuses} {readers.caches} in {readers.rounds} rounds; read errors {readers.errors[:2]}; "
        f"background errors {errors}; leased to nobody at the end: {orphaned}; logged: {problems[:6]}"
    )
    return run


@pytest.fixture(scope="module")
def reshard() -> ReshardRun:
    """One live reshard, looked at by several tests: 3 primaries, 2 processes, 60 entries; a fourth primary
    joins and takes over every bucket slot of one primary while the entries are read and refreshed."""
    return asyncio.run(_reshard())


@pytest.mark.fault
@pytest.mark.timeout(150)
def test_live_reshard_loses_no_entry_and_fetches_once(reshard: ReshardRun) -> None:
    run = reshard
    assert run.missing == []
    assert {run.owners[i] for i in run.moving} == {run.added}  # the moved entries live on the new primary
    assert early_fetches(run.calls) == {}  # no cycle fetched twice, by one process or by both


@pytest.mark.fault
@pytest.mark.timeout(150)
def test_live_reshard_keeps_answering_and_refreshing_on_time(reshard: ReshardRun) -> None:
    run = reshard
    assert run.readers.errors == [], run.readers.errors[:5]
    assert set(run.readers.statuses) == {200}
    after_move = {i: sum(1 for t in run.calls[i] if t > run.moved_at) for i in run.moving}
    late = {i for i, stamps in run.calls.items() if max(gaps([*stamps, run.end])) > MAX_GAP_S}
    late |= {i for i, n in after_move.items() if n < 2}
    # Every entry refreshed every cycle, before, during and after the move; the moved ones on the new primary.
    # A claim whose reply is lost after it ran (redis-py's cluster client drops its connections on MOVED and
    # CLUSTERDOWN) is run again and answered with the entries it took (scripts._REPLAY). Except one case the
    # design accepts: a claim whose reply is lost and that is not sent again; its entries wait for the lease
    # to run out (the slowest fetcher's timeout + 5 s: longer than this test watches) and are still leased at
    # the end (run.orphaned).
    unexplained = late - set(run.orphaned)
    detail = {i: [round(t - run.move_started, 2) for t in run.calls[i]] for i in sorted(late)}
    assert not unexplained, (detail, run.orphaned)
    assert len(late) <= 2, (detail, run.orphaned)


@pytest.mark.fault
@pytest.mark.timeout(120)
async def test_sentinel_failover_resumes_writes_and_loses_nothing() -> None:
    """A primary, a replica and 3 sentinels; one process, 20 entries read all along; the primary killed with
    SIGKILL once the replica has every entry."""
    entries = list(range(20))
    keys = Keys(DEFAULT_NAMESPACE, 1)  # one server: one bucket
    item = {i: keys.item(fleet_entry_id(i)) for i in entries}
    with LocalSentinel(replicas=1) as deployment:
        fleet = Fleet(deployment.url, processes=1)
        try:
            readers = Readers(fleet, entries)
            async with httpx.AsyncClient(timeout=15) as client:
                await readers.warm_up(client, cycles=2)
                code, before = await readyz(client, fleet.processes[0])
                old = deployment.primary_port()
                with redis.Redis(port=old, socket_timeout=5) as primary:
                    # A write on this connection, then WAIT: the replica has every write made before it.
                    primary.set("test:replicated", b"1")
                    assert primary.wait(1, 1000) == 1
                killed_at = fleet.now()
                assert deployment.kill_primary() == old
                promotion = asyncio.create_task(asyncio.to_thread(deployment.wait_promoted, old, 20.0))
                await readers.until(client, promotion.done, timeout=25, what="a replica promoted")
                new = await promotion
                promoted_at = fleet.now()

                def resumed() -> bool:
                    """Every entry fetched since the promotion, and its new value stored on the new primary."""
                    calls = fleet.calls(entries)
                    if any(max(calls[i]) <= promoted_at for i in entries):
                        return False
                    with redis.Redis(port=new, socket_timeout=5) as primary:
                        values = primary.mget([item[i] for i in entries])
                    return all(
                        raw is not None and Entry.parse(raw).last_retrieved_ms >= promoted_at * 1000 for raw in values
                    )

                await readers.until(client, resumed, timeout=15, what="refreshes written to the new primary")
                resumed_at = fleet.now()
                await readers.for_seconds(client, 1.0)
                code_after, after = await readyz(client, fleet.processes[0])
            calls = fleet.calls(entries)
            problems = fleet.problems()
        finally:
            fleet.close()
    back = [min(t for t in calls[i] if t > killed_at) - killed_at for i in entries]
    print(
        f"\nsentinel failover: new primary named {promoted_at - killed_at:.2f} s after the kill; every entry "
        f"fetched again {min(back):.2f}-{max(back):.2f} s after the kill and stored on the new primary by "
        f"{resumed_at - killed_at:.2f} s; /readyz 1 s later: {code_after} {after}; "
        f"fetches before their due time: {early_fetches(calls)}; reads {readers.statuses} {readers.caches} in "
        f"{readers.rounds} rounds; logged: {problems[:6]}"
    )
    assert code == 200
    assert (before["topology"], before["buckets"], before["primaries"]) == ("sentinel", 1, [f"127.0.0.1:{old}"])
    assert new != old
    # Nothing lost in between: every read answered, every cycle fetched once, and (waited for above) every
    # entry's new value written on the new primary, which had them all as a replica.
    assert readers.errors == [], readers.errors[:5]
    assert set(readers.statuses) == {200}
    assert early_fetches(calls) == {}
    # Ready again, on Sentinel, naming the new primary (read again once the subscription came back there).
    assert code_after == 200, after
    assert after["topology"] == "sentinel"
    assert after["primaries"] == after["subscribed_nodes"] == [f"127.0.0.1:{new}"]
    assert after["failovers"] >= 1
