"""Real Redis Cluster and Sentinel deployments on loopback, for tests and benchmarks.

Built from the same server binary as `RedisServer` (redis-server 7+, or the bundled valkey-server), with no
Docker and no redis-cli: the cluster is assembled and resharded with plain CLUSTER commands, as redis-cli does.
Every wait polls another process with a deadline: there is no event to await across processes.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
from redis.crc import key_slot

from .redis_server import RedisServer, free_port

HOST = "127.0.0.1"
SLOTS = 16384
BUS_PORT_OFFSET = 10000  # a node's cluster bus listens on port + 10000 unless told otherwise
MASTER_NAME = "mymaster"
_POLL = 0.05
# A primary waits 5 s by default before a diskless full sync, for more replicas to join the same transfer;
# here that is only a slower start (and a slower re-sync after a failover).
FAST_SYNC = ("--repl-diskless-sync-delay", "0")
# Flags of a node that is not (yet, or any more) a healthy member of the cluster.
_UNHEALTHY = frozenset({"fail", "fail?", "pfail", "handshake", "noaddr"})


def keyslot(key: bytes | str) -> int:
    """The cluster slot of a key (CRC16 with the {hash tag} rule), to place test keys on chosen nodes."""
    return key_slot(key.encode() if isinstance(key, str) else key)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def cluster_port() -> int:
    """A free port whose bus port (port + 10000) is free too: a cluster node listens on both."""
    for _ in range(200):
        port = free_port()
        if port + BUS_PORT_OFFSET < 65536 and _bindable(port + BUS_PORT_OFFSET):
            return port
    raise RuntimeError("no free port with a free cluster bus port (port + 10000)")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; a Redis error counts as "not yet" (nodes come and go meanwhile)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            if condition():
                return
        except redis.RedisError as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached after {timeout} s") from last_error
        time.sleep(_POLL)  # another process converging: there is nothing to await


def _alive(server: RedisServer) -> bool:
    return server.process is not None and server.process.poll() is None


def _kill(server: RedisServer) -> None:
    """SIGKILL, as a crash would (no shutdown, no goodbye to peers); reaped so no zombie or warning is left."""
    if server.process is not None:
        server.process.kill()
        server.process.wait()
        server.process = None


def _admin_client(port: int) -> redis.Redis:
    """A long-lived client of one process for the commands here: decoded, and timing out rather than hanging
    on a node that is being killed."""
    return redis.Redis(host=HOST, port=port, socket_connect_timeout=1, socket_timeout=5, decode_responses=True)


def _command(client: redis.Redis, *args: Any) -> Any:
    """A raw command: the reply as the server sent it, decoded. One typed door to redis-py's untyped call."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _info_field(info: str, field: str) -> str | None:
    for line in info.splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return None


def _fields(reply: Any) -> dict[str, Any]:
    """A SENTINEL REPLICAS/SENTINELS entry: a flat [field, value, ...] list (RESP2), or a map (RESP3, which
    redis-py 8 negotiates by default)."""
    if isinstance(reply, dict):
        return {_text(k): v for k, v in reply.items()}
    return {_text(k): v for k, v in zip(reply[::2], reply[1::2], strict=True)}


@dataclass(frozen=True)
class NodeEntry:
    """One line of CLUSTER NODES: how one node sees another (or itself)."""

    id: str
    port: int
    flags: frozenset[str]
    primary_id: str | None
    slots: frozenset[int]

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def healthy(self) -> bool:
        return not self.flags & _UNHEALTHY


def _parse_nodes(text: str) -> list[NodeEntry]:
    """Raw CLUSTER NODES; bracketed slots (a migration under way) are not owned and are skipped."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        address = fields[1].split(",", 1)[0].split("@", 1)[0]  # ip:port@bus[,hostname]
        port = int(address.rsplit(":", 1)[1] or 0)
        slots: set[int] = set()
        for item in fields[8:]:
            if item.startswith("["):
                continue
            low, _, high = item.partition("-")
            slots.update(range(int(low), int(high or low) + 1))
        entries.append(
            NodeEntry(
                id=fields[0],
                port=port,
                flags=frozenset(fields[2].split(",")),
                primary_id=None if fields[3] == "-" else fields[3],
                slots=frozenset(slots),
            )
        )
    return entries


@dataclass(frozen=True)
class SlotRange:
    """One entry of CLUSTER SLOTS: who serves a slot range, as one node believes."""

    start: int
    end: int
    primary_port: int
    replica_ports: tuple[int, ...]


def _parse_slots(reply: Sequence[Any]) -> list[SlotRange]:
    return [
        SlotRange(int(entry[0]), int(entry[1]), int(entry[2][1]), tuple(int(node[1]) for node in entry[3:]))
        for entry in reply
    ]


class ClusterNodeServer(RedisServer):
    """A server with cluster mode on; its nodes.conf lives in its own directory, and it emits expiry events."""

    def __init__(self, *extra_args: str, node_timeout_ms: int = 1000) -> None:
        super().__init__(port=cluster_port())
        self.extra_args = (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(Path(self.dir) / "nodes.conf"),
            "--cluster-node-timeout",
            str(node_timeout_ms),
            "--notify-keyspace-events",
            "Ex",
            # A primary PINGs its replicas this often (10 s by default). Until the replication offset moves
            # off 0, CLUSTER SLOTS leaves the replica out (Redis 7+), so an idle new cluster would look
            # replica-less for 10 s.
            "--repl-ping-replica-period",
            "1",
            *FAST_SYNC,
            *extra_args,
        )  # RedisServer adds --appendonly no --save "" itself


class _LocalServers:
    """What a cluster and a sentinel setup share: admin clients by port, and stopping every server (in
    `_stop_order`) with its directory, also as a context manager."""

    _admins: dict[int, redis.Redis]

    def start(self, timeout: float = 30.0) -> None:
        raise NotImplementedError

    def _stop_order(self) -> list[RedisServer]:
        raise NotImplementedError

    def stop(self) -> None:
        for admin in self._admins.values():
            admin.close()
        self._admins.clear()
        for server in self._stop_order():
            server.stop()
            shutil.rmtree(server.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class LocalCluster(_LocalServers):
    """A Redis Cluster of `primaries` primaries with `replicas` replicas each (as redis-cli's --cluster-replicas).

    Automatic failover needs a majority of the slot-serving primaries alive to vote, so a cluster that must
    survive losing a primary needs at least 3 of them.
    """

    def __init__(self, primaries: int = 3, replicas: int = 0, node_timeout_ms: int = 1000) -> None:
        if primaries < 1 or replicas < 0:
            raise ValueError("a cluster needs at least one primary, and no negative number of replicas")
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[ClusterNodeServer] = []
        self._ids: dict[int, str] = {}
        self._admins: dict[int, redis.Redis] = {}
        self._orphans: dict[int, list[int]] = {}  # killed primary -> its replicas when it was killed

    # -- life cycle

    def start(self, timeout: float = 30.0) -> None:
        """Start the nodes, give the primaries even slot ranges, join everyone, attach replicas, and wait
        until every node agrees the cluster is whole: a test then starts from a settled cluster."""
        try:
            primaries = [self._start_node() for _ in range(self.primaries)]
            replicas = [self._start_node() for _ in range(self.primaries * self.replicas)]
            base, extra = divmod(SLOTS, self.primaries)
            low = 0
            for index, node in enumerate(primaries):
                high = low + base + (1 if index < extra else 0) - 1
                admin = self._admin(node.port)
                # Distinct epochs up front, as redis-cli does, so no epoch collision has to be resolved later.
                _command(admin, "CLUSTER", "SET-CONFIG-EPOCH", index + 1)
                _command(admin, "CLUSTER", "ADDSLOTSRANGE", low, high)
                low = high + 1
            for node in self.nodes[1:]:
                _command(self._admin(node.port), "CLUSTER", "MEET", HOST, primaries[0].port)
            for index, replica in enumerate(replicas):
                primary_id = self._ids[primaries[index % self.primaries].port]
                # REPLICATE is refused until the replica knows the primary (and knows it as a primary).
                wait_for(
                    partial(self._knows_primary, replica.port, primary_id),
                    timeout,
                    f"node {replica.port} meeting its primary",
                )
                _command(self._admin(replica.port), "CLUSTER", "REPLICATE", primary_id)
            wait_for(lambda: self._settled(self.replicas), timeout, "cluster start")
        except BaseException:
            self.stop()
            raise

    def _stop_order(self) -> list[RedisServer]:
        """Every node (its directory, nodes.conf, goes too: a stopped cluster is not restarted)."""
        return list(self.nodes)

    # -- what is there

    @property
    def url(self) -> str:
        """The first primary, or the first node still running once it is gone: a client's seed node."""
        node = next((n for n in self.nodes if _alive(n)), self.nodes[0])
        return f"redis://{HOST}:{node.port}/0"

    def client(self, port: int) -> redis.Redis:
        """A plain (non-cluster) client of one node, the caller's to close: for per-node commands."""
        return redis.Redis(host=HOST, port=port, socket_connect_timeout=1)

    def node_id(self, port: int) -> str:
        """The node's cluster id (what CLUSTER REPLICATE and SETSLOT name it by)."""
        return self._ids[port]

    def primary_ports(self) -> list[int]:
        """The primaries now, as the cluster sees them, that are still running (a failed one may still be
        listed as a primary without slots), in start order."""
        primary_ids = {entry.id for entry in self._view(self._live_port()) if entry.is_primary and entry.healthy}
        return [n.port for n in self.nodes if _alive(n) and self._ids[n.port] in primary_ids]

    def slots_of(self, port: int) -> list[int]:
        """The slots a node serves, by its own account (the one that answers a request or redirects it)."""
        mine = next(entry for entry in self._view(port) if "myself" in entry.flags)
        return sorted(mine.slots)

    def owner(self, slot: int) -> int:
        """The port of the primary serving `slot`, as a running node sees it."""
        for entry in self._slots(self._live_port()):
            if entry.start <= slot <= entry.end:
                return entry.primary_port
        raise LookupError(f"slot {slot} is not served")

    def flushall(self) -> None:
        """Empty every primary between tests; replicas follow their primary."""
        for port in self.primary_ports():
            self._admin(port).flushall()

    # -- faults and changes

    def kill(self, port: int) -> None:
        """SIGKILL one node. Its replicas are noted first, for `wait_promoted` to know who may take over."""
        node = self._node(port)
        dead_id = self._ids[port]
        others = [n for n in self.nodes if _alive(n) and n is not node]
        if others:
            view = self._view(others[0].port)
            ids = {entry.id: entry.port for entry in view}
            self._orphans[port] = [ids[e.id] for e in view if e.primary_id == dead_id and e.id in ids]
        _kill(node)

    def wait_promoted(self, dead_port: int, timeout: float = 15.0) -> int:
        """Wait until a replica of the killed primary is a primary serving slots and every running node
        reports `cluster_state:ok` with all slots served by running primaries; returns the new primary's port."""
        dead_id = self._ids[dead_port]
        candidates = self._orphans.get(dead_port)
        if candidates is None:  # killed by someone else: its replicas still name it as their primary
            candidates = [e.port for e in self._view(self._live_port()) if e.primary_id == dead_id]
        if not candidates:
            raise RuntimeError(f"node {dead_port} had no replica to promote")
        promoted: list[int] = []

        def done() -> bool:
            for port in candidates:
                if not _alive(self._node(port)):
                    continue
                mine = next(entry for entry in self._view(port) if "myself" in entry.flags)
                if mine.is_primary and mine.slots:
                    promoted[:] = [port]
                    return self._settled(None)
            return False

        wait_for(done, timeout, f"a replica of {dead_port} promoted")
        return promoted[0]

    def add_primary(self, timeout: float = 15.0) -> ClusterNodeServer:
        """Start an empty node and join it; returns once every node knows it and it sees the whole cluster,
        so slots can be moved to it at once."""
        seed = self._live_port()
        node = self._start_node()
        try:
            _command(self._admin(node.port), "CLUSTER", "MEET", HOST, seed)
            wait_for(lambda: self._settled(None), timeout, f"node {node.port} joining")
        except BaseException:
            _kill(node)
            raise
        return node

    def move_slots(self, slots: Iterable[int], target_port: int, timeout: float = 15.0) -> None:
        """Reshard live, the way redis-cli does: mark each slot importing and migrating, MIGRATE its keys in
        batches, then assign it to the target on target, source and every other primary. Returns once every
        running node sees the target serving them."""
        target_id = self._ids[target_port]
        target = self._admin(target_port)
        moved = sorted(set(slots))
        ranges = self._slots(target_port)
        for slot in moved:
            source_port = next((r.primary_port for r in ranges if r.start <= slot <= r.end), None)
            if source_port is None:
                raise LookupError(f"slot {slot} is not served, so it cannot be moved")
            if source_port == target_port:
                continue
            source = self._admin(source_port)
            _command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", self._ids[source_port])
            _command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := _command(source, "CLUSTER", "GETKEYSINSLOT", slot, 100):
                _command(source, "MIGRATE", HOST, target_port, "", 0, 5000, "KEYS", *keys)
            others = [p for p in self.primary_ports() if p not in (target_port, source_port)]
            for port in (target_port, source_port, *others):
                _command(self._admin(port), "CLUSTER", "SETSLOT", slot, "NODE", target_id)

        def everyone_agrees() -> bool:
            for node in self.nodes:
                if not _alive(node):
                    continue
                owners = self._slots(node.port)
                for slot in moved:
                    if not any(r.start <= slot <= r.end and r.primary_port == target_port for r in owners):
                        return False
            return self._settled(None)

        wait_for(everyone_agrees, timeout, f"slots moved to {target_port}")

    # -- internals

    def _start_node(self) -> ClusterNodeServer:
        node = ClusterNodeServer(node_timeout_ms=self.node_timeout_ms)
        self.nodes.append(node)  # before start: stop() cleans up after a failed start too
        node.start()
        self._ids[node.port] = _text(_command(self._admin(node.port), "CLUSTER", "MYID"))
        return node

    def _admin(self, port: int) -> redis.Redis:
        if port not in self._admins:
            self._admins[port] = _admin_client(port)
        return self._admins[port]

    def _node(self, port: int) -> ClusterNodeServer:
        return next(n for n in self.nodes if n.port == port)

    def _live_port(self) -> int:
        for node in self.nodes:
            if _alive(node):
                return node.port
        raise RuntimeError("no cluster node is running")

    def _knows_primary(self, port: int, primary_id: str) -> bool:
        return any(e.id == primary_id and e.is_primary and e.healthy for e in self._view(port))

    def _view(self, port: int) -> list[NodeEntry]:
        # "CLUSTER", "NODES" as two arguments: redis-py applies its own parser to "CLUSTER NODES" only.
        return _parse_nodes(_command(self._admin(port), "CLUSTER", "NODES"))

    def _slots(self, port: int) -> list[SlotRange]:
        return _parse_slots(_command(self._admin(port), "CLUSTER", "SLOTS"))

    def _settled(self, replicas: int | None) -> bool:
        """Every running node: cluster_state:ok, knows exactly the running nodes as healthy, and sees all
        slots served by running primaries (each with `replicas` replicas, unless None); every running
        replica has its link to its primary up."""
        live = [n for n in self.nodes if _alive(n)]
        live_ports = {n.port for n in live}
        live_ids = {self._ids[n.port] for n in live}
        for node in live:
            admin = self._admin(node.port)
            if _info_field(_command(admin, "CLUSTER", "INFO"), "cluster_state") != "ok":
                return False
            if {entry.id for entry in self._view(node.port) if entry.healthy} != live_ids:
                return False
            ranges = sorted(self._slots(node.port), key=lambda r: r.start)
            covered = 0
            for entry in ranges:
                if entry.start != covered or entry.primary_port not in live_ports:
                    return False
                if replicas is not None and len(entry.replica_ports) != replicas:
                    return False
                covered = entry.end + 1
            if covered != SLOTS:
                return False
            role = _command(admin, "ROLE")
            if role[0] == "slave" and role[3] != "connected":
                return False
        return True


class SentinelServer(RedisServer):
    """A sentinel: the same binary in sentinel mode, with a config file of its own that it rewrites."""

    def __init__(self, primary_port: int, name: str = MASTER_NAME) -> None:
        super().__init__()
        self.config = Path(self.dir) / "sentinel.conf"
        self.config.write_text(
            f"port {self.port}\n"
            f"bind {HOST}\n"
            f"sentinel monitor {name} {HOST} {primary_port} 2\n"
            f"sentinel down-after-milliseconds {name} 1000\n"
            f"sentinel failover-timeout {name} 3000\n"
            f"sentinel parallel-syncs {name} 1\n"
            f"dir {self.dir}\n"
        )

    def listen_args(self) -> list[str]:
        """The config file must be the first argument (the port is in it); `--sentinel` switches the mode."""
        return [str(self.config), "--sentinel"]


class LocalSentinel(_LocalServers):
    """One primary, `replicas` replicas and 3 sentinels (quorum 2) watching them as `mymaster`."""

    def __init__(self, replicas: int = 1) -> None:
        if replicas < 1:
            raise ValueError("a failover needs at least one replica")
        self.replicas = replicas
        self.servers: list[RedisServer] = []  # primary first, then replicas, in start order
        self.sentinels: list[SentinelServer] = []
        self._admins: dict[int, redis.Redis] = {}

    def start(self, timeout: float = 30.0) -> None:
        """Start the data servers and wait until the replicas are in sync, then the sentinels, and wait until
        each knows every replica and the 2 other sentinels: only then can a failover be counted on."""
        try:
            primary = RedisServer("--notify-keyspace-events", "Ex", *FAST_SYNC)
            self.servers.append(primary)
            primary.start()
            for _ in range(self.replicas):
                # FAST_SYNC for replicas too: one of them may be promoted and then serve the others.
                replica = RedisServer(
                    "--notify-keyspace-events", "Ex", *FAST_SYNC, "--replicaof", HOST, str(primary.port)
                )
                self.servers.append(replica)
                replica.start()
            # Before the sentinels: a sentinel reads the primary's replicas at once, then only every 10 s.
            wait_for(self._replicas_synced, timeout, "replicas in sync")
            for _ in range(3):
                sentinel = SentinelServer(primary.port)
                self.sentinels.append(sentinel)
                sentinel.start()
            replica_ports = {s.port for s in self.servers[1:]}
            wait_for(lambda: self._sentinels_ready(replica_ports), timeout, "sentinels discovering each other")
        except BaseException:
            self.stop()
            raise

    def _stop_order(self) -> list[RedisServer]:
        """Sentinels first, so none starts a failover while the servers go down."""
        return [*self.sentinels, *self.servers]

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [(HOST, s.port) for s in self.sentinels]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinel_addresses)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def primary_port(self) -> int:
        """The primary according to the first running sentinel."""
        sentinel = next(s for s in self.sentinels if _alive(s))
        return self._primary_by(sentinel.port)

    def kill_primary(self) -> int:
        """SIGKILL the current primary; returns its port."""
        port = self.primary_port()
        _kill(next(s for s in self.servers if s.port == port))
        return port

    def wait_promoted(self, old_port: int, timeout: float = 20.0) -> int:
        """Wait until a sentinel names another primary and that server says it is a master; also until every
        running sentinel names it, so any client asking any sentinel finds it. Returns its port."""
        found: list[int] = []

        def done() -> bool:
            ports = {self._primary_by(s.port) for s in self.sentinels if _alive(s)}
            if len(ports) != 1 or old_port in ports:
                return False
            (port,) = ports
            if _command(self._admin(port), "ROLE")[0] != "master":
                return False
            found[:] = [port]
            return True

        wait_for(done, timeout, f"a new primary instead of {old_port}")
        return found[0]

    def _admin(self, port: int) -> redis.Redis:
        if port not in self._admins:
            self._admins[port] = _admin_client(port)
        return self._admins[port]

    def _primary_by(self, sentinel_port: int) -> int:
        reply = _command(self._admin(sentinel_port), "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        return int(reply[1])

    def _replicas_synced(self) -> bool:
        for replica in self.servers[1:]:
            role = _command(self._admin(replica.port), "ROLE")
            if role[0] != "slave" or role[3] != "connected":
                return False
        return len(_command(self._admin(self.servers[0].port), "ROLE")[2]) == self.replicas

    def _sentinels_ready(self, replica_ports: set[int]) -> bool:
        for sentinel in self.sentinels:
            admin = self._admin(sentinel.port)
            known = _command(admin, "SENTINEL", "REPLICAS", MASTER_NAME)
            ports = {int(_fields(r)["port"]) for r in known}
            if not replica_ports <= ports:
                return False
            if len(_command(admin, "SENTINEL", "SENTINELS", MASTER_NAME)) < 2:
                return False
        return True
