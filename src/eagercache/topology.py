"""Which Redis eagercache talks to, and the client that talks to it: one URL, any topology.

- `memory://`: fakeredis in this process.
- `redis://host:port/db`, `rediss://...` (TLS), `unix:///path`: a standalone server, or any node of a Redis
  Cluster: `cluster_enabled` is asked at start-up, and a cluster gets redis-py's `RedisCluster`, which
  routes each command to the primary that holds its slot and follows MOVED/ASK redirections.
- `redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]` (`rediss+sentinel://` for TLS to
  the data nodes): a primary that Sentinel manages; the client asks the sentinels where the primary is
  and asks again after a failover. The password, like --redis-password, is the data nodes'; the
  sentinels are asked without one.

The store (store.py) runs the same commands and scripts on every kind; the key layout (keys.py) keeps
each script on one slot. What differs is here: how to connect, which nodes exist (expiry events are
published per node), and how to say which topology this is.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import fakeredis
import redis.asyncio as redis
from redis import exceptions as redis_exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from . import packing
from .errors import ConfigurationError, StoreUnavailable

MEMORY_URL = "memory://"
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
URL_SCHEMES = (MEMORY_URL, "redis://", "rediss://", "unix://", *SENTINEL_SCHEMES)
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0
# How often the cluster's node list is read again even when nothing failed (a primary added by a
# reshard publishes events we would not hear otherwise).
REDISCOVER_INTERVAL_S = 10.0
DISCOVER_MIN_INTERVAL_S = 0.5
PIPELINE_HEADROOM = 8

Kind = Literal["memory", "standalone", "cluster", "sentinel"]


def redact(url: str) -> str:
    """The URL without its password, for logs and errors: in the user part (even unencoded, with '/' or
    '#' in it), and in a `password=` query parameter. Works on text, so a URL that does not parse is
    redacted too."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    main, qsep, query = rest.partition("?")
    if "@" in main:
        userinfo, _, host = main.rpartition("@")
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        main = f"{userinfo}@{host}"
    if qsep:
        query = "&".join(
            f"{name}=***" if "password" in name.lower() else f"{name}{eq}{value}"
            for name, eq, value in (part.partition("=") for part in query.split("&"))
        )
    return f"{scheme}{sep}{main}{qsep}{query}"


# Errors a client raises while a server restarts, fails over or moves slots: the store is unavailable
# for now, not broken. RedisClusterException is not a RedisError (no slot owner known, too many redirects).
CLIENT_ERRORS = (RedisError, RedisClusterException, OSError)
_UVLOOP_CLOSED = "the handler is closed"


@contextmanager
def store_errors(url: str) -> Iterator[None]:
    """Redis and socket errors as StoreUnavailable, in words an operator can act on."""
    try:
        yield
    except (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError, OSError) as exc:
        hint = ""
        if url.startswith(("rediss://", "rediss+sentinel://")) and ("SSL" in str(exc) or "reset by peer" in str(exc)):
            hint = (
                " (TLS: the server's certificate is checked against --redis-ca-file, or the system's CAs; "
                "a server that requires client certificates needs --redis-cert-file and --redis-key-file)"
            )
        raise StoreUnavailable(f"cannot reach the store at {redact(url)}: {exc}{hint}") from exc
    except (RedisError, RedisClusterException) as exc:
        raise StoreUnavailable(f"store error at {redact(url)}: {type(exc).__name__}: {exc}") from exc
    except RuntimeError as exc:
        # uvloop's transports raise this for a write to a connection already closed (a node restarting, a
        # slot moving), where asyncio's raise ConnectionError (MagicStack/uvloop#506); redis-py lets it through
        # after dropping the connection, so it is the store being unreachable, not a bug here.
        if _UVLOOP_CLOSED not in str(exc):
            raise
        raise StoreUnavailable(f"cannot reach the store at {redact(url)}: the connection was closed") from exc


@dataclass(frozen=True, slots=True)
class Auth:
    """Who eagercache is to Redis, beyond the URL: an ACL user and password, and TLS files (rediss://)."""

    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __repr__(self) -> str:
        return f"Auth(username={self.username!r}, password={'***' if self.password else None})"

    def connection_kwargs(self, url: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if url.startswith(("rediss://", "rediss+sentinel://")):
            kwargs["ssl_check_hostname"] = True  # the certificate must name the URL's host, whatever the default
        if self.username is not None:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password
        if self.ca_file is not None:
            kwargs["ssl_ca_certs"] = self.ca_file
        if self.cert_file is not None:
            kwargs["ssl_certfile"] = self.cert_file
            kwargs["ssl_keyfile"] = self.key_file
        return kwargs


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """What a sentinel URL names: the sentinels, the service, the database, the data nodes' user."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str) -> SentinelTarget:
        parts = urlsplit(url)
        hosts = parts.netloc.rpartition("@")[2]
        sentinels = []
        for address in filter(None, hosts.split(",")):
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigurationError(f"redis_url {redact(url)!r}: sentinel address {address!r} is not host:port")
            sentinels.append((host.strip("[]"), int(port)))
        path = [p for p in parts.path.split("/") if p]
        if not sentinels or not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ConfigurationError(
                f"redis_url {redact(url)!r} is not a sentinel URL: "
                "redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]"
            )
        user, _, password = parts.netloc.rpartition("@")[0].partition(":")
        return cls(
            tuple(sentinels),
            unquote(path[0]),
            int(path[1]) if len(path) == 2 else 0,
            unquote(user) or None,
            unquote(password) or None,
            url.startswith("rediss+"),
        )


class BoundedCluster(RedisCluster):
    """A cluster client whose commands wait for one of `command_slots` (as the standalone client waits
    for a free connection), instead of failing with MaxConnectionsError past the per-node limit under a
    burst of reads."""

    command_slots: asyncio.Semaphore

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.command_slots:
            return await super().execute_command(*args, **kwargs)


class BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """Sentinel's pool (it asks the sentinels where the primary is), waiting for a free connection at
    max_connections like the standalone pool, instead of failing a burst of reads."""


class Topology:
    """The connected client and what is known about the servers behind it."""

    def __init__(
        self,
        url: str,
        client: Any,
        kind: Kind,
        *,
        node_kwargs: dict[str, Any] | None = None,
        events_client: Any = None,
        closing: tuple[Any, ...] = (),
    ) -> None:
        self.url = url
        self.client = client
        # Subscriptions get a client of their own without the command retry: redis-py would otherwise
        # reconnect a broken subscription silently, and eagercache must know (a restarted server may
        # have lost its expiry-event setting). None on a cluster: each primary gets a node client.
        self.events_client = events_client
        self.kind: Kind = kind
        self.version: tuple[int, ...] = (7, 0, 0) if kind == "memory" else (0,)
        self.failovers = 0
        # Node clients never retry by themselves: a pipeline resent whole would run its claims twice, and a
        # subscription reconnected silently would skip turning expiry events on again.
        self._node_kwargs = {**(node_kwargs or {}), "retry": Retry(NoBackoff(), 0)}
        self._closing = closing  # more clients to close with this one (the sentinels)
        self._primaries: tuple[str, ...] = ()
        self._node_clients: dict[str, redis.Redis] = {}
        self._discovered_at = -DISCOVER_MIN_INTERVAL_S
        self._discovering = asyncio.Lock()
        self._seen_primaries: tuple[str, ...] = ()

    @property
    def is_cluster(self) -> bool:
        return self.kind == "cluster"

    @property
    def supports_shebang(self) -> bool:
        """Redis/Valkey 7 read script flags from a `#!lua` first line; older servers and fakeredis do not."""
        return self.kind != "memory" and self.version >= (7,)

    @property
    def db(self) -> int:
        if self.kind == "cluster":
            return 0
        return int(self.client.connection_pool.connection_kwargs.get("db", 0) or 0)

    def primaries(self) -> tuple[str, ...]:
        """The primaries as `host:port` (cluster), or the URL's one server."""
        if self.kind == "cluster":
            return tuple(sorted(node.name for node in self.client.get_primaries()))
        return self._primaries

    def describe(self) -> str:
        if self.kind == "cluster":
            return f"cluster with {len(self.primaries())} primaries"
        return self.kind

    async def discover(self) -> None:
        """Read the server's version and, on a cluster, its nodes again (see `primaries_changed`); at
        most once per DISCOVER_MIN_INTERVAL_S however many callers find a node failing."""
        async with self._discovering:
            if time.monotonic() - self._discovered_at < DISCOVER_MIN_INTERVAL_S:
                return
            try:
                await self._discover()
            finally:
                self._discovered_at = time.monotonic()

    async def _discover(self) -> None:
        if self.kind == "cluster":
            if self._seen_primaries and await self._same_primaries():
                return  # redis-py's initialize() would reconnect every pooled connection for nothing
            await self.client.nodes_manager.initialize()
        elif self.kind == "sentinel":
            host, port = await self.client.connection_pool.get_master_address()
            self._primaries = (f"{host}:{port}",)
        elif self.kind == "standalone":
            kwargs = self.client.connection_pool.connection_kwargs
            self._primaries = (str(kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"),)
        if self.kind != "memory" and self.version == (0,):
            self.version = await _server_version(self.client)

    async def _same_primaries(self) -> bool:
        """Whether a live primary's CLUSTER SLOTS names the primaries the client knows (a reshard that
        moves slots between them needs no new map: the client follows MOVED itself)."""
        for name in self.primaries():
            try:
                slots = await self.node_client(name).execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
            except CLIENT_ERRORS:
                continue
            found = {f"{_text(s[2][0])}:{int(s[2][1])}" for s in slots if len(s) > 2}
            return found == set(self.primaries())
        return False

    def primaries_changed(self) -> bool:
        """True once for each change of the primaries since the last call (a failover, a primary added
        or removed), as the client last learnt them (a discovery, or a cluster client's MOVED)."""
        now = self.primaries()
        changed = bool(self._seen_primaries) and now != self._seen_primaries
        self._seen_primaries = now
        if changed:
            self.failovers += 1
        return changed

    def discovery_due(self) -> bool:
        return time.monotonic() - self._discovered_at >= REDISCOVER_INTERVAL_S

    def node_client(self, name: str) -> redis.Redis:
        """A client of one node (`host:port`) of a cluster, for what is per node: pub/sub, CONFIG and
        the pipelines of scripts. It does not retry: its callers decide what a failure means."""
        if (client := self._node_clients.get(name)) is None:
            host, _, port = name.rpartition(":")
            client = redis.Redis(host=host, port=int(port), **self._node_kwargs)
            self._node_clients[name] = client
        return client

    def all_nodes(self) -> tuple[str, ...]:
        """Every node of a cluster, replicas too (each needs the expiry-event setting a promoted one keeps)."""
        if self.kind != "cluster":
            return self.primaries()
        return tuple(sorted(node.name for node in self.client.get_nodes()))

    async def aclose(self) -> None:
        clients = [*self._node_clients.values(), self.events_client, *self._closing, self.client]
        self._node_clients.clear()
        for client in clients:
            if client is not None:
                with contextlib.suppress(*CLIENT_ERRORS):  # one that fails to close must not keep the rest open
                    await client.aclose()


async def connect(
    url: str, *, max_connections: int, auth: Auth | None = None, on_kind: Callable[[Kind], None] | None = None
) -> Topology:
    """Connect to what `url` names and find out its topology. Raises StoreUnavailable if it cannot be
    reached (the caller retries or gives up), ConfigurationError if the URL cannot be used. `on_kind`
    hears what kind of store it is as soon as that is known (for an error message that follows)."""
    auth = auth or Auth()
    if url.startswith(MEMORY_URL):
        return Topology(url, fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()), "memory")
    common: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": COMMAND_TIMEOUT_S,
        **auth.connection_kwargs(url),
    }
    if url.startswith(SENTINEL_SCHEMES):
        topology = _sentinel(url, common, max_connections)
    else:
        client = build_standalone(url, {**common, "retry": _once()}, max_connections)
        try:
            with store_errors(url):
                info = await client.info("cluster")
        except BaseException:
            await client.aclose()
            raise
        if int(info.get("cluster_enabled", 0) or 0):
            if on_kind is not None:
                on_kind("cluster")
            try:  # what the cluster client needs first: a refusal here names the command (NOPERM)
                with store_errors(url):
                    await client.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
            finally:
                await client.aclose()
            topology = _cluster(url, common, max_connections)
        else:
            topology = Topology(url, client, "standalone", events_client=build_standalone(url, common, 2))
    try:
        with store_errors(url):
            await topology.discover()
        topology.primaries_changed()
    except BaseException:
        await topology.aclose()
        raise
    return topology


def _once() -> Retry:
    """One retry, at once, on a new connection: after a server restarts or fails over, every pooled
    connection is dead, and the first command on each would otherwise fail. A script whose connection
    broke after it ran runs twice: a write or removal finds its work done; a claim is answered with the
    entries its first run took (scripts._REPLAY)."""
    return Retry(NoBackoff(), 1)


def build_standalone(url: str, common: dict[str, Any], max_connections: int) -> redis.Redis:
    try:
        # Blocking: at max_connections a command waits for a free connection (up to the command
        # timeout) instead of failing with "Too many connections" under a burst of reads.
        # As BlockingConnectionPool.from_url, the URL's options winning, with connections that pack with hiredis.
        options: dict[str, Any] = {
            **common,
            "max_connections": max_connections,
            "timeout": COMMAND_TIMEOUT_S,
            **parse_url(url),
        }
        options["connection_class"] = packing.FAST[options.get("connection_class", Connection)]
        pool = redis.BlockingConnectionPool(**options)
    except ValueError as exc:
        raise ConfigurationError(f"redis_url {redact(url)!r} is not a valid Redis URL: {exc}") from exc
    return redis.Redis.from_pool(pool)


def _cluster(url: str, common: dict[str, Any], max_connections: int) -> Topology:
    parts = urlsplit(url)
    if parts.path.strip("/") not in ("", "0"):
        raise ConfigurationError(f"redis_url {redact(url)!r}: a Redis Cluster has only database 0")
    try:
        # Every command and script names keys of one slot, and the client follows MOVED/ASK itself (and
        # rereads the slot map on MOVED). Its per-node limit fails a command at once when reached: the
        # limit that waits is BoundedCluster's; the headroom is for its few pipelines (touch, describe).
        client = BoundedCluster.from_url(url, max_connections=max_connections + PIPELINE_HEADROOM, **common)
        assert isinstance(client, BoundedCluster)
        client.command_slots = asyncio.Semaphore(max_connections)
    except (ValueError, RedisClusterException) as exc:
        raise ConfigurationError(f"redis_url {redact(url)!r} is not a usable cluster URL: {exc}") from exc
    node_kwargs = {**common, "ssl": url.startswith("rediss://")}
    # As in the cluster client (from_url): the URL's user and password win over the settings'.
    if parts.username:
        node_kwargs["username"] = unquote(parts.username)
    if parts.password:
        node_kwargs["password"] = unquote(parts.password)
    return Topology(url, client, "cluster", node_kwargs=node_kwargs)


def _sentinel(url: str, common: dict[str, Any], max_connections: int) -> Topology:
    target = SentinelTarget.parse(url)
    kwargs = dict(common)
    if target.username is not None:
        kwargs["username"] = target.username
    if target.password is not None:
        kwargs["password"] = target.password
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels),
        sentinel_kwargs={
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "socket_timeout": COMMAND_TIMEOUT_S,
            "retry": Retry(NoBackoff(), 0),  # an unreachable sentinel: ask the next one at once
        },
        **kwargs,
    )
    client, events_client = (
        sentinel.master_for(
            target.service,
            connection_pool_class=BlockingSentinelPool,
            connection_class=(
                packing.FastSentinelManagedSSLConnection if target.tls else packing.FastSentinelManagedConnection
            ),
            db=target.db,
            ssl=target.tls,
            max_connections=connections,
            timeout=COMMAND_TIMEOUT_S,
            **extra,
        )
        for connections, extra in ((max_connections, {"retry": _once()}), (2, dict[str, Any]()))
    )
    return Topology(url, client, "sentinel", events_client=events_client, closing=tuple(sentinel.sentinels))


async def _server_version(client: Any) -> tuple[int, ...]:
    info = await client.info("server")
    if isinstance(info, dict) and not ("redis_version" in info or "valkey_version" in info):
        info = next(iter(info.values()), {})  # a cluster answers per node
    raw = str(info.get("valkey_version") or info.get("redis_version") or "0")
    try:
        return tuple(int(part) for part in raw.split(".")[:3])
    except ValueError:
        return (0,)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
