"""Every Redis command and Lua script the service runs, behind one class for every topology.

`memory://fakeredis` is fakeredis in this process: the same commands and scripts, no server, nothing
shared or kept (`memory://` is memstore.py's native store, a subclass of this one). It publishes no
`expired` events, which is why the schedule (the `due` sorted sets) and not the events is what the
refresher trusts. Key names and buckets are in keys.py, scripts in scripts.py,
connecting to a standalone server, a cluster or a sentinel-managed primary in topology.py, the
expiry-event subscription in events.py.

Commands for several entries are grouped by bucket, and the groups go out in one pipeline (on a
cluster, one per primary, each on a connection of that node's own: redis-py's cluster pipeline refuses
scripts): a claim round over 256 buckets is a round trip per node.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import fakeredis
import msgspec
from redis.commands.core import AsyncScript
from redis.connection import parse_url
from redis.exceptions import AskError, NoScriptError, TryAgainError

from . import roundtrip, scripts
from .clock import ServerClock
from .coalesce import Coalescer
from .errors import ConfigurationError, StoreTimeout, StoreUnavailable
from .item import encode_tags
from .keys import DEFAULT_NAMESPACE, Bucket, Keys, entry_id_of, glob_escape, split_entry_id
from .topology import (
    CLIENT_ERRORS,
    COMMAND_TIMEOUT_S,
    MEMORY_URL,
    SENTINEL_SCHEMES,
    Auth,
    SentinelTarget,
    Topology,
    connect,
    redact,
    store_errors,
)

__all__ = ["MEMORY_URL", "Auth", "Store", "redact", "store_errors"]

DEFAULT_MAX_CONNECTIONS = 64
# The longest a reader waits for Redis (connection and reply); past it the read is answered from memory
# (grace) or with a 503. Background work has COMMAND_TIMEOUT_S.
DEFAULT_READ_BUDGET_S = 0.2
FILL_BUDGET_S = 1.0
# Connections opened at start-up (see Store.warm).
WARM_CONNECTIONS = 16
# Reads of one loop iteration go out as one MGET of up to this many entries, and writes as one pipeline
# (coalesce.py).
READ_BATCH = 64
WRITE_BATCH = 64
# Read times recorded per command (Store.touch): small enough that Redis serves others between them.
TOUCH_CHUNK = 1000
# A budget's check that runs this much later than planned means the event loop was busy: it looks again.
LOOP_LATE_S = 0.05
# Loop iterations a budget's check waits, once the budget is spent, for replies already received.
CONFIRM_ROUNDS = 2
# The header line of a stored value (item.Entry) fits in this many bytes, validators and tags included
# (results.py and fetchers.py bound them); claims and listings read no more, and get back only the line
# (scripts.header_of).
HEADER_MAX_BYTES = 4096
# Eviction policies that may delete keys without a TTL: the schedule, the read times, the counts.
UNSAFE_EVICTION = ("allkeys-lru", "allkeys-lfu", "allkeys-random")
# Buckets when neither the operator nor the store says: one on a single server (one claim per round, as
# cheap as it gets), and on a cluster enough that the buckets' slots spread evenly over the primaries
# (256 tags put at most 37 % of entries on the busiest of 3 primaries with evenly split slots).
CLUSTER_BUCKETS = 256
# Replies to a script in a pipeline that running it again, alone, puts right (MovedError is an AskError).
_RUN_AGAIN = (NoScriptError, AskError, TryAgainError)
_SCRIPTS = (
    scripts.CLAIM_DUE,
    scripts.CLAIM_MANY,
    scripts.RELEASE,
    scripts.TAKE_BUDGET,
    scripts.WRITE,
    scripts.POSTPONE,
    scripts.FORGET,
    scripts.TARGET,
    scripts.REPAIR,
    scripts.PRUNE,
    scripts.RECOUNT,
)


class Stale(msgspec.Struct, frozen=True, gc=False):
    """An entry whose refreshes fail: since when (ms since the epoch), how many times in a row, the last error."""

    since_ms: int
    failures: int
    error: str = ""

    @classmethod
    def parse(cls, raw: bytes | str | None) -> Stale | None:
        if raw is None:
            return None
        since, failures, error = [*_text(raw).split(" ", 2), "", ""][:3]
        try:
            return cls(int(since), int(failures or 1), error)
        except ValueError:  # not a marker eagercache wrote: still a marker, from now on
            return cls(0, 1, f"unreadable stale marker {_text(raw)[:40]!r}")

    def encode(self) -> str:
        return f"{self.since_ms} {self.failures} {self.error}"


class Claim(NamedTuple):
    """The right to refresh one entry until `lease_end_ms`, with what the schedule knew about it.

    (A named tuple, not a frozen dataclass: one is made per refresh, and a frozen dataclass's __init__,
    an object.__setattr__ per field, was a few % of a refresh's CPU time.)"""

    entry_id: str
    lease_end_ms: int
    last_read_ms: int | None
    due_ms: int | None
    header: bytes | None = None  # the start of the stored value: its validators, without the body


WriteMode = Literal["cold", "refresh"]
# A WRITE script call: its keys and its arguments.
_Write = tuple[list[str], list[str | bytes | int]]
# A refresh's write (Store.write_refreshes): entry id, fetcher, value, next due time, max_entries, lease end.
RefreshWrite = tuple[str, str, bytes, int, int, int]
STORED, OVER_LIMIT, GONE, NOT_OURS = 1, 0, -1, -2


class Store:
    """The cache's storage: entry bodies, shadow keys, the due schedules, read times and entry counts.

    Built without connecting (a URL it cannot use is a ConfigurationError at once); `open()` connects,
    finds the topology and settles the key layout.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        buckets: int | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        read_budget_s: float = DEFAULT_READ_BUDGET_S,
        auth: Auth | None = None,
        shadow_keys: bool = True,
    ) -> None:
        _check_url(url)
        self.url = url
        self.is_memory = url.startswith(MEMORY_URL)
        # A shadow key per entry is only a hint for expiry events, which memory:// never sends.
        self.shadow_keys = shadow_keys and not self.is_memory
        self.requested_buckets = buckets
        self.keys = Keys(namespace, buckets or 1)
        self.read_budget_s = read_budget_s
        self.max_connections = max_connections
        self.auth = auth
        self.topology: Topology | None = None
        self.client: Any = None
        if self.is_memory:  # nothing to wait for: usable before open(), as tests and embedders expect
            self._use(self._memory_topology())
        self._answered_at = time.monotonic()  # when a call last got its answer: the store is answering
        self._wrote_at = self._answered_at  # when a write last got its answer
        # A miss's own calls (fill lock, write) come after Redis has answered its read, and its reader
        # waits for a fetch anyway: they get more room, so a burst of misses on a busy process is not
        # taken for a stall.
        self.fill_budget_s = max(read_budget_s, FILL_BUDGET_S)
        self.clock = ServerClock()
        # Entries per fetcher per bucket as last counted here (plus this process's own changes since):
        # what a write's max_entries check knows of the other buckets.
        self._counts: dict[int, dict[str, int]] = defaultdict(dict)
        self._totals: dict[str, int] = defaultdict(int)  # the same, summed over the buckets
        self._pending: dict[tuple[int, str], int] = defaultdict(int)  # cold writes in flight: (bucket, fetcher)
        self._map_is_stale = False  # a node's pipeline failed: read the cluster's slot map before the next
        # This process's name in its claims' keys, and its claim calls so far (each call's token).
        self._process = uuid.uuid4().hex[:16]
        self._claims_sent = 0
        self._detected_kind = "unknown"
        self._reads = Coalescer(self._get_many, max_batch=READ_BATCH)
        self._fill_locks = Coalescer(self._start_fills, max_batch=WRITE_BATCH)
        # Refreshes that finish together and cold fills that finish together: a write's budget is its mode's.
        self._writes: dict[WriteMode, Coalescer[_Write, int | BaseException]] = {
            "refresh": Coalescer(functools.partial(self._write_many, COMMAND_TIMEOUT_S), max_batch=WRITE_BATCH),
            "cold": Coalescer(functools.partial(self._write_many, self.fill_budget_s), max_batch=WRITE_BATCH),
        }

    def _memory_topology(self) -> Topology:
        """`memory://fakeredis`: fakeredis in this process, running the same scripts (memstore.py is `memory://`)."""
        return Topology(self.url, fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()), "memory")

    @classmethod
    def from_url(
        cls,
        url: str,
        keys: Keys | None = None,
        *,
        buckets: int | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        read_budget_s: float = DEFAULT_READ_BUDGET_S,
        auth: Auth | None = None,
    ) -> Store:
        return cls(
            url,
            namespace=keys.namespace if keys is not None else DEFAULT_NAMESPACE,
            buckets=buckets,
            max_connections=max_connections,
            read_budget_s=read_budget_s,
            auth=auth,
        )

    def _use(self, topology: Topology) -> None:
        self.topology = topology
        self.client = topology.client
        register = (
            (lambda source: topology.client.register_script(scripts.with_shebang(source)))
            if topology.supports_shebang
            else topology.client.register_script
        )
        self._scripts: dict[str, AsyncScript] = {source: register(source) for source in _SCRIPTS}
        self._claim_due = self._scripts[scripts.CLAIM_DUE]
        self._claim_many = self._scripts[scripts.CLAIM_MANY]
        self._release = self._scripts[scripts.RELEASE]
        self._take_budget = self._scripts[scripts.TAKE_BUDGET]
        self._write = self._scripts[scripts.WRITE]
        self._postpone = self._scripts[scripts.POSTPONE]
        self._forget = self._scripts[scripts.FORGET]
        self._target = self._scripts[scripts.TARGET]
        self._repair = self._scripts[scripts.REPAIR]
        self._prune = self._scripts[scripts.PRUNE]
        self._recount = self._scripts[scripts.RECOUNT]

    async def open(self) -> None:
        """Connect and learn the topology (what kind, which nodes, which server version)."""
        if self.topology is None:
            self._use(
                await connect(
                    self.url,
                    max_connections=self.max_connections,
                    auth=self.auth,
                    on_kind=lambda kind: setattr(self, "_detected_kind", kind),
                )
            )

    async def prepare(self) -> None:
        """Load the scripts (into every primary) and settle the bucket count (see `_settle_layout`)."""
        await self.open()
        with self._errors():
            for script in self._scripts.values():
                script.sha = await self.client.script_load(script.script)  # every primary of a cluster
            await self._settle_layout()

    async def _settle_layout(self) -> None:
        """The bucket count is the store's: the first process writes it, every other one uses it. One
        configured differently is refused: it would look for every entry in another bucket (a cold cache
        by surprise, and entries no one refreshes)."""
        assert self.topology is not None
        layout = self.keys.layout
        stored = await self.client.get(layout)
        if stored is None:
            wanted = self.requested_buckets or (CLUSTER_BUCKETS if self.topology.is_cluster else 1)
            await self.client.set(layout, str(wanted), nx=True)
            stored = await self.client.get(layout)
        try:
            buckets = int(stored)
            Keys(self.keys.namespace, buckets)
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"{layout} holds {stored!r}, not a bucket count eagercache wrote: delete the key (the cache "
                "under this namespace is then rebuilt) or choose another --namespace"
            ) from None
        if self.requested_buckets is not None and buckets != self.requested_buckets:
            raise ConfigurationError(
                f"this store keeps {buckets} buckets under {self.keys.namespace!r} and --buckets asks for "
                f"{self.requested_buckets}: every entry would be looked for in the wrong bucket. Leave --buckets "
                f"unset (or set it to {buckets}), or use a new --namespace for the new layout"
            )
        self.keys = Keys(self.keys.namespace, buckets)

    @property
    def kind(self) -> str:
        """memory, standalone, sentinel or cluster; as soon as it is known, even if connecting failed after."""
        return self.topology.kind if self.topology is not None else self._detected_kind

    def topology_name(self) -> str:
        """The topology in words: memory, standalone, sentinel, cluster with N primaries."""
        return self.topology.describe() if self.topology is not None else "not connected"

    @property
    def failovers(self) -> int:
        """Changes of the primaries seen so far (a failover, a primary added or removed)."""
        return self.topology.failovers if self.topology is not None else 0

    async def check_layout(self) -> None:
        """Write the layout again if it is gone (evicted, deleted by hand), so that a process started
        later finds it; ConfigurationError-worthy news (another count) is logged by the caller."""
        with self._errors(write=True):
            await self.client.set(self.keys.layout, str(len(self.keys.buckets)), nx=True)
            stored = await self.client.get(self.keys.layout)
        if stored is not None and stored != str(len(self.keys.buckets)).encode():
            raise StoreUnavailable(
                f"{self.keys.layout} says {stored!r} buckets but this process uses {len(self.keys.buckets)}: "
                "restart every process of this namespace with one bucket count"
            )

    def nodes(self) -> tuple[str, ...]:
        """The primaries (host:port) this process writes to, as last discovered."""
        return self.topology.primaries() if self.topology is not None else ()

    @property
    def db(self) -> int:
        """The database number the client uses (expiry events are published per database)."""
        if self.topology is not None:
            return self.topology.db
        if self.url.startswith(SENTINEL_SCHEMES):
            return SentinelTarget.parse(self.url).db
        return int(parse_url(self.url).get("db", 0) or 0)  # type: ignore[no-untyped-call]

    async def aclose(self) -> None:
        await self._reads.aclose()
        await self._fill_locks.aclose()
        for writes in self._writes.values():
            await writes.aclose()
        if self.topology is not None:
            await self.topology.aclose()

    async def ping(self, timeout_s: float = COMMAND_TIMEOUT_S) -> None:
        """PING, answered within `timeout_s` by the clock, however busy the store is (a probe's deadline)."""
        try:
            async with asyncio.timeout(timeout_s):
                with self._errors():
                    if self.client is None:
                        raise StoreUnavailable(f"not connected to the store at {redact(self.url)} yet")
                    await self.client.ping()
        except TimeoutError:
            raise StoreTimeout(f"the store at {redact(self.url)} did not answer within {timeout_s:g} s") from None

    async def warm(self, connections: int = WARM_CONNECTIONS) -> None:
        """Open some connections now, so that the first burst of reads finds the store answering on them
        while more connections are opened (a cold pool answers nothing until its first connections are up,
        which a read budget cannot tell from a stall)."""
        if self.is_memory or self.topology is None or self.topology.is_cluster:
            return  # a cluster client opens its connections per node, on demand
        pool = self.client.connection_pool
        n = min(connections, pool.max_connections - 1)
        with self._errors():
            opened = await asyncio.gather(*(pool.get_connection() for _ in range(n)))
            for connection in opened:
                await pool.release(connection)

    async def sync_clock(self) -> None:
        """Read the server's clock (TIME) into `self.clock`."""
        async with self._within(COMMAND_TIMEOUT_S):
            sent = time.monotonic()
            reply = await self.client.time()
            if isinstance(reply, dict):  # a cluster asks one node; redis-py may answer per node
                reply = next(iter(reply.values()))
            seconds, micros = reply
            self.clock.observe(seconds * 1000 + micros / 1000, sent, time.monotonic())

    @contextmanager
    def _errors(self, *, write: bool = False) -> Iterator[None]:
        """Redis errors as StoreUnavailable; a call that gets its answer shows the store is answering
        (a write, that it is taking writes: a server can take reads and hold writes, as a failover does)."""
        with store_errors(self.url):
            try:
                yield
            except AttributeError as exc:
                if self.kind != "cluster":
                    raise
                # redis-py's cluster client follows an ASK to a node it does not know yet (a primary added
                # by a reshard) into None.execute_command: the slot is moving, the store is unavailable.
                self._map_is_stale = True
                raise StoreUnavailable(f"store error at {redact(self.url)}: a slot is moving ({exc})") from exc
        self._answered_at = time.monotonic()
        if write:
            self._wrote_at = self._answered_at

    @asynccontextmanager
    async def _within(self, budget_s: float, *, write: bool = False) -> AsyncIterator[None]:
        """Redis errors as StoreUnavailable, and no wait past `budget_s` while the store answers nobody.

        A budget measures the store, not this process: when it runs out but the store has answered other
        calls within it (a burst of reads queued for connections on a busy event loop), the call waits
        on, up to COMMAND_TIMEOUT_S. Only a store that answered nothing for `budget_s` (stalled, paused,
        failing over) cuts the call short. A command cut short closes its connection (redis-py
        disconnects on cancellation), so a late reply can never be read as the answer to the next one.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(None) as deadline:
                handle: asyncio.TimerHandle

                def check(planned: float, rounds_left: int, again: Callable[[float, int, Any], None]) -> None:
                    nonlocal handle
                    now = loop.time()
                    silent_s = time.monotonic() - (self._wrote_at if write else self._answered_at)
                    if now - started >= COMMAND_TIMEOUT_S:
                        deadline.reschedule(now)
                    elif now - planned > LOOP_LATE_S:
                        # This loop was busy, not the store: replies may be waiting in sockets. Look again.
                        handle = loop.call_at(now + LOOP_LATE_S, again, now + LOOP_LATE_S, CONFIRM_ROUNDS, again)
                    elif silent_s < budget_s:
                        handle = loop.call_at(
                            now + budget_s - silent_s, again, now + budget_s - silent_s, CONFIRM_ROUNDS, again
                        )
                    elif rounds_left:
                        # Replies that arrived with this timer are only read by tasks that run after it: let
                        # them run before calling the store silent (a burst of requests can take a whole
                        # budget's worth of loop time before the first reply is read).
                        handle = loop.call_at(now, again, now, rounds_left - 1, again)
                    else:
                        deadline.reschedule(now)  # the store answered nobody for the whole budget

                # `check` is handed itself (`again`) to reschedule: naming itself from its closure would make a
                # reference cycle per call that only the garbage collector frees; here cancelling the timer frees all.
                handle = loop.call_at(started + budget_s, check, started + budget_s, CONFIRM_ROUNDS, check)
                try:
                    with self._errors(write=write):
                        yield
                finally:
                    handle.cancel()
        except TimeoutError:
            raise StoreTimeout(f"the store at {redact(self.url)} did not answer within {budget_s:g} s") from None

    def _read(self) -> AbstractAsyncContextManager[None]:
        return self._within(self.read_budget_s)

    def _fill(self, *, write: bool = True) -> AbstractAsyncContextManager[None]:
        return self._within(self.fill_budget_s, write=write)

    async def _pipelined(self, calls: Sequence[tuple[AsyncScript, list[str], list[Any]]]) -> list[Any]:
        """Run several scripts in one round trip (per node); each result, or the exception it raised.

        A script the server does not have (a promoted replica, a restarted server: NOSCRIPT) is loaded
        and run again; on a cluster, so is one whose slot moved (MOVED, ASK, TRYAGAIN), through the
        cluster client, which follows the redirection.
        """
        errors = self._client_errors
        if len(calls) == 1:
            script, keys, args = calls[0]
            try:
                return [await script(keys=keys, args=args)]
            except errors as exc:
                return [exc]
        if self.topology is not None and self.topology.is_cluster:
            results = await self._pipelined_per_node(calls)
        else:
            results = await self._run_scripts(self.client, calls)
        for i, result in enumerate(results):
            if isinstance(result, _RUN_AGAIN):
                script, keys, args = calls[i]
                try:
                    results[i] = await script(keys=keys, args=args)
                except errors as exc:
                    results[i] = exc
        return results

    async def _run_scripts(self, client: Any, calls: Sequence[tuple[AsyncScript, list[str], list[Any]]]) -> list[Any]:
        """The scripts in one round trip on one of the client's connections; each reply, or its error."""
        commands = [("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args in calls]
        return await self._round_trip(client, commands)

    async def _round_trip(self, client: Any, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """The commands in one round trip on one of the client's connections; each reply, or its error."""
        if self.kind == "memory":  # fakeredis: no socket to read from; its pipeline runs them
            pipe = client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return list(await pipe.execute(raise_on_error=False))
        return await roundtrip.run(client, commands)

    @property
    def _client_errors(self) -> tuple[type[BaseException], ...]:
        # On a cluster, AttributeError too: see _errors.
        return (*CLIENT_ERRORS, AttributeError) if self.kind == "cluster" else CLIENT_ERRORS

    async def _pipelined_per_node(self, calls: Sequence[tuple[AsyncScript, list[str], list[Any]]]) -> list[Any]:
        """One pipeline per primary, each on a connection of its own to that node (redis-py's cluster
        pipeline refuses scripts), by the slot map the cluster client holds; all nodes at once."""
        assert self.topology is not None
        topology = self.topology
        results: list[Any] = [None] * len(calls)
        by_node: dict[str, list[int]] = defaultdict(list)
        for i, (_, keys, _) in enumerate(calls):
            try:
                by_node[self.client.get_node_from_key(keys[0]).name].append(i)
            except self._client_errors as exc:  # no node holds the slot (yet): that call fails, not the round
                self._map_is_stale = True
                results[i] = exc

        async def run(node: str, indexes: list[int]) -> None:
            try:
                replies = await self._run_scripts(topology.node_client(node), [calls[i] for i in indexes])
            except CLIENT_ERRORS as exc:  # the node is gone or failing over: its slots are elsewhere soon
                self._map_is_stale = True
                replies = [exc] * len(indexes)
            for i, reply in zip(indexes, replies, strict=True):
                results[i] = reply

        if self._map_is_stale:
            self._map_is_stale = False
            with contextlib.suppress(*self._client_errors):
                await topology.discover()
        # Each node's failure is in its calls' results; anything else is raised after every node is done.
        for outcome in await asyncio.gather(*(run(n, i) for n, i in by_node.items()), return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome
        return results

    @staticmethod
    def _all(results: list[Any]) -> list[Any]:
        """The results, or the first error among them raised (as StoreUnavailable, by `_errors`)."""
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    def _by_bucket(self, entry_ids: Iterable[str]) -> dict[Bucket, list[str]]:
        grouped: dict[Bucket, list[str]] = defaultdict(list)
        for entry_id in entry_ids:
            grouped[self.keys.bucket_of(entry_id)].append(entry_id)
        return grouped

    async def get(self, entry_id: str) -> tuple[bytes | None, Stale | None]:
        """The entry's body and, if its refreshes are failing, its stale marker: one round trip, within the budget.

        On one server, the reads of one loop iteration share that round trip (one MGET). A cluster's keys
        are spread over 256 buckets' slots, so there reads of one iteration rarely share a slot: each
        entry is read on its own.
        """
        if self.topology is not None and self.topology.is_cluster:
            ((body, stale),) = await self._get_many([entry_id])
        else:
            body, stale = await self._reads.get(entry_id)
        assert body is None or isinstance(body, bytes)  # the client is built without decode_responses
        return body, Stale.parse(stale)

    async def _get_many(self, entry_ids: list[str]) -> list[tuple[bytes | None, bytes | None]]:
        keys: list[str] = []
        for entry_id in entry_ids:
            bucket = self.keys.bucket_of(entry_id)
            keys += (bucket.item(entry_id), bucket.stale(entry_id))
        async with self._read():
            values = await self.client.mget(keys)
        return list(zip(values[::2], values[1::2], strict=True))

    async def header(self, entry_id: str) -> bytes | None:
        """The start of the stored value (its header line), without the body; None if it is not stored."""
        with self._errors():
            head = await self.client.getrange(self.keys.item(entry_id), 0, HEADER_MAX_BYTES - 1)
        assert head is None or isinstance(head, bytes)
        return _header_line(head) if head else None

    async def write(
        self,
        entry_id: str,
        fetcher: str,
        value: bytes,
        due_at_ms: int,
        *,
        mode: WriteMode,
        max_entries: int,
        lease_end_ms: int | None = None,
    ) -> int:
        """Store the value and schedule the next refresh atomically; STORED, OVER_LIMIT, GONE or NOT_OURS
        (a refresh given `lease_end_ms` whose claim someone else has taken over since).

        A cold write is a reader's: it is bounded like the reader's other calls on a miss. max_entries
        holds across buckets as far as this process knows the other buckets' counts (see `entry_counts`)
        and its own cold writes in flight: exactly on one bucket; on several, other replicas' new entries
        since the last count can take a fetcher past it by that many, until the next count.
        """
        bucket = self.keys.bucket_of(entry_id)
        # Only a cold write can add an entry; a refresh's room is never looked at.
        room = max_entries - self._counted_elsewhere(bucket, fetcher) if mode == "cold" else max_entries
        call = self._write_call(bucket, entry_id, fetcher, value, due_at_ms, room, mode, lease_end_ms)
        pending = (bucket.index, fetcher)
        if mode == "cold":  # counted as taken while in flight, so this process's other cold writes see it
            self._pending[pending] += 1
        try:
            result = await self._writes[mode].get(call)
        finally:
            if mode == "cold":
                self._pending[pending] -= 1
        if isinstance(result, BaseException):  # this write's own error (the others of its batch may be fine)
            with self._errors(write=True):
                raise result
        if result == STORED and mode == "cold":
            self._count(bucket, fetcher, +1)  # at most one too many (a refill): recounted soon
        return result

    def _write_call(
        self,
        bucket: Bucket,
        entry_id: str,
        fetcher: str,
        value: bytes,
        due_at_ms: int,
        room: int,
        mode: WriteMode,
        lease_end_ms: int | None,
    ) -> _Write:
        """The WRITE script's keys and arguments (scripts.WRITE says what each is)."""
        keys = [*self._entry_keys(bucket, entry_id), bucket.fill(entry_id)]
        lease = "" if lease_end_ms is None else lease_end_ms
        shadow = "1" if self.shadow_keys else ""
        args: list[str | bytes | int] = [entry_id, value, due_at_ms, fetcher, room, mode, lease, shadow]
        args += (bucket.tag_prefix, HEADER_MAX_BYTES - 1)
        return keys, args

    async def write_refreshes(self, writes: Sequence[RefreshWrite]) -> list[int | StoreUnavailable]:
        """The writes of a batch of refreshes (`write(..., mode="refresh")` each) in one round trip (per
        node); each one's outcome, or its own error. A store that cannot be reached fails them all."""
        calls = []
        for entry_id, fetcher, value, due_at_ms, max_entries, lease_end_ms in writes:
            bucket = self.keys.bucket_of(entry_id)
            keys, args = self._write_call(
                bucket, entry_id, fetcher, value, due_at_ms, max_entries, "refresh", lease_end_ms
            )
            calls.append((self._write, keys, args))
        try:
            async with self._within(COMMAND_TIMEOUT_S, write=True):
                results = await self._pipelined(calls)
        except StoreUnavailable as exc:
            return [exc] * len(writes)
        return [self._unavailable(result) if isinstance(result, BaseException) else result for result in results]

    def _unavailable(self, error: BaseException) -> StoreUnavailable:
        """One call's error in a pipeline, as `_errors` would raise it."""
        try:
            with self._errors(write=True):
                raise error
        except StoreUnavailable as exc:
            return exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _write_many(self, budget_s: float, writes: list[_Write]) -> list[int | BaseException]:
        """Several WRITE scripts in one round trip (per node), each with its own result or error."""
        async with self._within(budget_s, write=True):
            results: list[int | BaseException] = await self._pipelined(
                [(self._write, keys, args) for keys, args in writes]
            )
        return results

    def _counted_elsewhere(self, bucket: Bucket, fetcher: str) -> int:
        """The fetcher's entries in the other buckets, counted or being written by this process."""
        if len(self.keys.buckets) == 1:
            return 0
        pending = sum(n for (b, name), n in self._pending.items() if name == fetcher and b != bucket.index)
        return self._totals[fetcher] - self._counts[bucket.index].get(fetcher, 0) + pending

    def _count(self, bucket: Bucket, fetcher: str, change: int) -> None:
        counts = self._counts[bucket.index]
        if counts.get(fetcher, 0) + change >= 0:
            counts[fetcher] = counts.get(fetcher, 0) + change
            self._totals[fetcher] += change

    async def start_fill(self, entry_id: str, lock_ms: int) -> bool:
        """Take the right to fetch a missing entry across replicas; False if another replica has it.

        On one server the locks asked for in one loop iteration are taken in one round trip, as reads
        and writes are: a burst of misses paid a pool checkout, a send and a reply read for each (a
        third of a cold read's CPU time in a profile of 6,000 misses, 32 at a time). A cluster's fill keys
        are spread over the buckets' slots: there each lock is taken on its own."""
        async with self._fill():
            if self.topology is not None and self.topology.is_cluster:
                return bool(await self.client.set(self.keys.fill(entry_id), b"", nx=True, px=lock_ms))
            taken = await self._fill_locks.get((self.keys.fill(entry_id), lock_ms))
            if isinstance(taken, BaseException):  # this lock's own error (the others of its batch may be fine)
                raise taken
            return taken is not None

    async def _start_fills(self, locks: list[tuple[str, int]]) -> list[Any]:
        return await self._round_trip(self.client, [("SET", key, b"", "NX", "PX", ms) for key, ms in locks])

    async def end_fill(self, entry_id: str) -> None:
        """Let go of the cold-fill lock without storing (the fetch failed)."""
        async with self._fill():
            await self.client.delete(self.keys.fill(entry_id))

    async def filling(self, entry_id: str) -> tuple[bytes | None, bool]:
        """The entry's body if stored by now, and whether a replica still holds its fill lock."""
        bucket = self.keys.bucket_of(entry_id)
        async with self._fill(write=False):
            body, lock = await self.client.mget(bucket.item(entry_id), bucket.fill(entry_id))
        assert body is None or isinstance(body, bytes)
        return body, lock is not None

    async def publish(self, channel: str, message: bytes) -> int:
        """PUBLISH (changes.py); how many subscribers got it. On a cluster any node takes it: the cluster
        bus carries it to the subscribers of every node."""
        with self._errors():
            received: int = await self.client.publish(channel, message)
        return received

    async def stale(self, entry_id: str) -> Stale | None:
        with self._errors():
            return Stale.parse(await self.client.get(self.keys.stale(entry_id)))

    async def postpone(self, entry_id: str, fetcher: str, retry_in_ms: int, stale: Stale | None) -> bool:
        """Keep the body, mark the entry stale (unless `stale` is None), try again later; False if it is gone."""
        b = self.keys.bucket_of(entry_id)
        keys = [b.item(entry_id), b.shadow(entry_id), b.due, b.stale(entry_id), b.read, b.counts]
        marker = stale.encode() if stale is not None else ""
        args: list[str | int] = [entry_id, max(1, retry_in_ms), marker, fetcher, "1" if self.shadow_keys else ""]
        with self._errors(write=True):
            kept: int = await self._postpone(keys=keys, args=args)
        return bool(kept)

    async def forget(self, entry_id: str, fetcher: str) -> bool:
        """Remove an entry and everything about it; False if it had no stored item."""
        bucket = self.keys.bucket_of(entry_id)
        with self._errors(write=True):
            existed = await self._forget(
                keys=self._entry_keys(bucket, entry_id),
                args=[entry_id, fetcher, bucket.tag_prefix, HEADER_MAX_BYTES - 1],
            )
        if existed:
            self._count(bucket, fetcher, -1)
        return bool(existed)

    async def tagged(self, tag: str, count: int) -> AsyncGenerator[tuple[int, list[str]], None]:
        """The entries in each bucket's index set of `tag`, as (bucket, ids) batches of about `count`
        (SSCAN: an id may come twice; one removed meanwhile may not come at all)."""
        encoded = encode_tags([tag]).decode("ascii")
        with self._errors():
            for bucket in self.keys.buckets:
                batch: list[str] = []
                async for member in self.client.sscan_iter(bucket.tag_prefix + encoded, count=count):
                    if (entry_id := entry_id_of(member)) is not None:
                        batch.append(entry_id)
                    if len(batch) >= count:
                        yield bucket.index, batch
                        batch = []
                if batch:
                    yield bucket.index, batch

    async def target(
        self, bucket_index: int, entry_ids: list[str], action: Literal["forget", "refresh"], tag: str | None
    ) -> list[str]:
        """Remove the entries of one bucket, or make them due now, if they carry `tag` (any, for None); the
        ids acted on. One script call: atomic per bucket, a few ms of the server's time per 1,000 ids."""
        b = self.keys.buckets[bucket_index]
        encoded = "" if tag is None else encode_tags([tag]).decode("ascii")
        prefixes = (b.item_prefix, b.shadow_prefix, b.stale_prefix, b.tag_prefix)
        with self._errors(write=True):
            done = await self._target(
                keys=[b.due, b.read, b.counts], args=[action, encoded, *prefixes, HEADER_MAX_BYTES - 1, *entry_ids]
            )
        acted = _entry_ids(done)
        if action == "forget":
            for entry_id in acted:
                self._count(b, split_entry_id(entry_id)[0], -1)
        return acted

    async def list_entries(self, fetcher: str, cursor: str, count: int) -> tuple[str, list[str]]:
        """One page of a fetcher's entries, from the buckets' schedules in bucket order; the next cursor
        ('' when done). The cursor is `<bucket>.<position>`: it stays valid across a failover or a
        reshard, which move whole buckets (an entry may then be listed twice, as with SCAN). '' or '0'
        starts at the beginning."""
        bucket_index, _, position = cursor.partition(".")
        try:
            b, at = (int(bucket_index), int(position)) if cursor not in ("", "0") else (0, 0)
        except ValueError:
            raise ValueError(f"cursor {cursor!r} is not one this API returned") from None
        if not 0 <= b < len(self.keys.buckets) or at < 0:
            raise ValueError(f"cursor {cursor!r} is not one this API returned")
        match = glob_escape(f"{fetcher}?") + "*"
        found: list[str] = []
        with self._errors():
            while b < len(self.keys.buckets) and len(found) < count:
                at, members = await self.client.zscan(self.keys.buckets[b].due, at, match=match, count=count)
                found += _entry_ids(member for member, _ in members)
                if at == 0:
                    b += 1
        return ("" if b >= len(self.keys.buckets) else f"{b}.{at}"), found

    async def stored_entries(self, fetcher: str | None, count: int) -> AsyncGenerator[list[str], None]:
        """Every stored item's entry id (of one fetcher, or all), in batches: a SCAN of every primary.

        Keys under the namespace that are not eagercache's (not ASCII, not in the layout) are skipped,
        never decoded. SCAN may return a key twice.
        """
        batch: list[str] = []
        with self._errors():
            async for key in self.client.scan_iter(match=self.keys.item_pattern(fetcher), count=count):
                if (entry_id := self.keys.entry_of_item(key)) is not None:
                    batch.append(entry_id)
                    if len(batch) >= count:
                        yield batch
                        batch = []
        if batch:
            yield batch

    async def describe(self, entry_ids: list[str]) -> list[tuple[bytes | None, float | None, Stale | None]]:
        """For each entry: its stored header line (not the body), its due score, its stale marker."""
        pipe = self.client.pipeline(transaction=False)
        for entry_id in entry_ids:
            bucket = self.keys.bucket_of(entry_id)
            pipe.getrange(bucket.item(entry_id), 0, HEADER_MAX_BYTES - 1)
            pipe.zscore(bucket.due, entry_id)
            pipe.get(bucket.stale(entry_id))
        with self._errors():
            flat = await pipe.execute() if entry_ids else []
        return [(_header_line(flat[i]) or None, flat[i + 1], Stale.parse(flat[i + 2])) for i in range(0, len(flat), 3)]

    @staticmethod
    def _entry_keys(bucket: Bucket, entry_id: str) -> list[str]:
        b = bucket
        return [b.item(entry_id), b.shadow(entry_id), b.due, b.read, b.stale(entry_id), b.counts]

    def _shadow_prefix(self, bucket: Bucket) -> str:
        """For a claim's script: where its entries' shadow keys are, '' when there are none."""
        return bucket.shadow_prefix if self.shadow_keys else ""

    async def claim_due(self, buckets: Sequence[int], lease_ms: int, limit: int) -> ClaimRound:
        """Claim up to `limit` entries due now in each of these buckets, each for `lease_ms`; with each
        bucket's next due time. A bucket whose claim failed is named in the round, with the error."""
        calls = []
        token = self._claim_token()
        for index in buckets:
            b = self.keys.buckets[index]
            keys = [b.due, b.read, b.claim(self._process)]
            args = [token, lease_ms, limit, b.item_prefix, HEADER_MAX_BYTES - 1, self._shadow_prefix(b)]
            calls.append((self._claim_due, keys, args))
        with self._errors(write=True):
            sent = time.monotonic()
            results = await self._pipelined(calls)
        round_ = ClaimRound()
        for index, result in zip(buckets, results, strict=True):
            if isinstance(result, BaseException):
                round_.failed[index] = f"{type(result).__name__}: {result}"
                continue
            round_.claims += self._claims(result, sent)
            # As a delay from the server's own time in the reply: cluster nodes' clocks may disagree.
            next_due = _ms(result[2])
            round_.next_due_in[index] = None if next_due is None else next_due - int(result[0])
            round_.full[index] = (len(result) - 3) // 4 >= limit
        if round_.failed and len(round_.failed) == len(buckets):
            with self._errors():
                raise next(r for r in results if isinstance(r, BaseException))
        return round_

    async def claim(self, entry_ids: list[str], lease_ms: int) -> ClaimRound:
        """Claim those of these entries that are due (refreshed already, or claimed elsewhere: not). A
        bucket whose claim failed is named in the round; the other buckets' claims stand (they are taken
        on the server: dropping them would leave those entries leased to nobody)."""
        calls, buckets = [], []
        token = self._claim_token()
        for b, ids in self._by_bucket(entry_ids).items():
            keys = [b.due, b.read, b.claim(self._process)]
            args = [token, lease_ms, b.item_prefix, HEADER_MAX_BYTES - 1, self._shadow_prefix(b), *ids]
            calls.append((self._claim_many, keys, args))
            buckets.append(b.index)
        with self._errors(write=True):
            sent = time.monotonic()
            results = await self._pipelined(calls)
        round_ = ClaimRound()
        for index, result in zip(buckets, results, strict=True):
            if isinstance(result, BaseException):
                round_.failed[index] = f"{type(result).__name__}: {result}"
            else:
                round_.claims += self._claims(result, sent)
        if round_.failed and len(round_.failed) == len(buckets):
            with self._errors():
                raise next(r for r in results if isinstance(r, BaseException))
        return round_

    def _claim_token(self) -> str:
        """A token of its own for each claim call: a retry of that call (the same command sent again) is
        answered with its first run's claims (scripts._REPLAY)."""
        self._claims_sent += 1
        return str(self._claims_sent)

    def _claims(self, flat: list[bytes], sent: float) -> list[Claim]:
        # Every claim reply starts with the server's time: a free reading for the clock.
        self.clock.observe(int(flat[0]), sent, time.monotonic())
        lease_end_ms = int(flat[1])
        return [
            Claim(flat[i].decode(), lease_end_ms, _ms(flat[i + 1]), _ms(flat[i + 2]), flat[i + 3] or None)
            for i in range(3, len(flat), 4)
        ]

    async def release(self, claims: dict[str, int], delays_ms: dict[str, int] | None = None) -> int:
        """Give back claims still held (id -> lease end): those entries are due again, for any replica, at
        once (shutdown) or after their delay (deferred by a budget)."""
        delays_ms = delays_ms or {}
        calls = []
        for b, ids in self._by_bucket(claims).items():
            args = [value for i in ids for value in (i, claims[i], delays_ms.get(i, 0))]
            calls.append((self._release, [b.due], args))
        with self._errors(write=True):
            return sum(self._all(await self._pipelined(calls)))

    async def take_budget(self, fetcher: str, rate: float, wanted: int, *, owe: bool = False) -> int:
        """Take up to `wanted` of the fetcher's budget tokens (every replica shares them); how many were
        taken. `owe`: take them all even if the budget is spent (scripts.TAKE_BUDGET)."""
        burst = max(1.0, rate)  # one second's worth
        with self._errors(write=True):
            taken: int = await self._take_budget(
                keys=[self.keys.budget(fetcher)], args=[rate, burst, wanted, "1" if owe else ""]
            )
        return taken

    async def touch(self, entry_ids: Iterable[str]) -> None:
        """Record reads: only for entries that exist, never moving a time back.

        At most TOUCH_CHUNK entries per command, one round trip each: one ZADD of the 40,000 entries a busy
        process reads in an interval held Redis (and every reader waiting on it) for tens of ms.
        """
        now = self.clock.now_ms()

        async def record(bucket: Bucket, ids: list[str]) -> None:
            for start in range(0, len(ids), TOUCH_CHUNK):
                with self._errors(write=True):
                    await self.client.zadd(
                        bucket.read, dict.fromkeys(ids[start : start + TOUCH_CHUNK], now), xx=True, gt=True
                    )

        await asyncio.gather(*(record(b, ids) for b, ids in self._by_bucket(entry_ids).items()))

    async def repair(self, entry_ids: list[str]) -> list[str]:
        """Put stored entries that are missing from the schedule back on it (due now); returns those."""
        calls = [
            (self._repair, [b.due, b.read], [b.item_prefix, *ids]) for b, ids in self._by_bucket(entry_ids).items()
        ]
        if not calls:
            return []
        with self._errors(write=True):
            results = self._all(await self._pipelined(calls))
        return [entry_id.decode() for repaired in results for entry_id in repaired]

    async def scan_schedule(self, bucket: int, cursor: int, count: int) -> tuple[int, list[str]]:
        """One page of a bucket's schedule (ZSCAN semantics: a cursor, 0 when done)."""
        with self._errors():
            cursor, pairs = await self.client.zscan(self.keys.buckets[bucket].due, cursor, count=count)
        return int(cursor), _entry_ids(member for member, _ in pairs)

    async def prune(self, bucket: int, entry_ids: list[str]) -> int:
        """Drop schedule members whose item is gone; how many were dropped (counted out of the bucket)."""
        if not entry_ids:
            return 0
        b = self.keys.buckets[bucket]
        args = [b.item_prefix, b.shadow_prefix, b.stale_prefix, *entry_ids]
        with self._errors(write=True):
            dropped: int = await self._prune(keys=[b.due, b.read, b.counts], args=args)
        return dropped

    async def take_sweep(self, interval_ms: int, owner: str) -> bool:
        """The right to sweep the store for this interval; one replica sweeps at a time."""
        with self._errors(write=True):
            return bool(await self.client.set(self.keys.sweep, owner, nx=True, px=interval_ms))

    async def recount(self, before: dict[int, dict[str, int]], found: dict[int, dict[str, int]]) -> int:
        """Set each bucket's count of each fetcher to what a sweep `found`, where it is still what it was
        `before` the sweep (a write or removal meanwhile: left for the next sweep); how many were set."""
        calls = []
        for index in sorted(set(before) | set(found)):
            was, now = before.get(index, {}), found.get(index, {})
            args: list[Any] = []
            for fetcher in sorted(set(was) | set(now)):
                args += [fetcher, was.get(fetcher, 0), now.get(fetcher, 0)]
            if args:
                calls.append((self._recount, [self.keys.buckets[index].counts], args))
        if not calls:
            return 0
        with self._errors(write=True):
            return sum(self._all(await self._pipelined(calls)))

    async def bucket_counts(self) -> dict[int, dict[str, int]]:
        """Entries per fetcher in each bucket (one round trip per node); remembered for max_entries."""
        pipe = self.client.pipeline(transaction=False)
        for b in self.keys.buckets:
            pipe.hgetall(b.counts)
        with self._errors():
            replies = await pipe.execute()
        counts = {
            b.index: {_text(name): int(n) for name, n in reply.items()}
            for b, reply in zip(self.keys.buckets, replies, strict=True)
        }
        self._counts = defaultdict(dict, counts)
        totals: dict[str, int] = defaultdict(int)
        for per_fetcher in counts.values():
            for name, n in per_fetcher.items():
                totals[name] += n
        self._totals = totals
        return counts

    async def entry_counts(self) -> dict[str, int]:
        """Entries per fetcher, summed over the buckets."""
        await self.bucket_counts()
        return dict(self._totals)

    async def entry_count(self, fetcher: str) -> int:
        return (await self.entry_counts()).get(fetcher, 0)

    async def eviction_policy(self) -> str | None:
        """The server's maxmemory-policy, or None where CONFIG is not allowed (or on memory://)."""
        if self.is_memory:
            return None
        try:
            with self._errors():
                found = await self.client.config_get("maxmemory-policy")
        except StoreUnavailable:
            return None
        if found and isinstance(next(iter(found.values())), dict):
            found = next(iter(found.values()))  # in case a client answers per node
        return _text(found.get("maxmemory-policy")) or None


@dataclass
class ClaimRound:
    """What one claim over several buckets brought: the claims, how long until each bucket's next due
    time (ms; None: its schedule is empty), the buckets that may have more due now, and the buckets whose
    claim failed."""

    claims: list[Claim] = field(default_factory=list)
    next_due_in: dict[int, int | None] = field(default_factory=dict)
    full: dict[int, bool] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)


def _check_url(url: str) -> None:
    """A URL the store cannot use is a ConfigurationError now, not a connection error later."""
    if url.startswith(MEMORY_URL):
        return
    if url.startswith(SENTINEL_SCHEMES):
        SentinelTarget.parse(url)
        return
    try:
        parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigurationError(f"redis_url {redact(url)!r} is not a valid Redis URL: {exc}") from exc


def _entry_ids(raw: Iterable[object]) -> list[str]:
    """The entry ids among these (key name tails, schedule members); anything not eagercache's is skipped."""
    ids = []
    for value in raw:
        assert isinstance(value, bytes)  # the client is built without decode_responses
        if (entry_id := entry_id_of(value)) is not None:
            ids.append(entry_id)
    return ids


async def write_each(
    write: Callable[..., Awaitable[int]], writes: Sequence[RefreshWrite]
) -> list[int | StoreUnavailable]:
    """`Store.write_refreshes` one write at a time through `write` (a `Store.write`): for a store with no round
    trip to share, and for tests that put a write of their own in the store's place."""
    outcomes: list[int | StoreUnavailable] = []
    for entry_id, fetcher, value, due_at_ms, max_entries, lease_end_ms in writes:
        try:
            outcomes.append(
                await write(
                    entry_id,
                    fetcher,
                    value,
                    due_at_ms,
                    mode="refresh",
                    max_entries=max_entries,
                    lease_end_ms=lease_end_ms,
                )
            )
        except StoreUnavailable as exc:
            outcomes.append(exc)
    return outcomes


def _header_line(start: bytes) -> bytes:
    """The header line (with its newline) at the start of a stored value, without the body that follows."""
    end = start.find(b"\n")
    return start if end < 0 else start[: end + 1]


def _ms(raw: bytes | str) -> int | None:
    value = int(float(raw))
    return None if value < 0 else value


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")
