"""Redis `expired` keyevents for shadow keys: a hint that entries are due, as batches of entry ids.

This module owns the subscriptions (one per primary): turning the events on, probing for them where
CONFIG is refused, reconnecting with backoff, following the primaries through failovers and reshards,
and reading key names as bytes. The channel carries every key that expires
in the database, other applications' included, so a name is decoded only once it is known to be one of
our shadow keys (keys.py); any other name, whatever its bytes, is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from redis.exceptions import RedisClusterException, RedisError, ResponseError

from .errors import ConfigurationError, StoreUnavailable
from .metrics import Metrics
from .store import Store, redact
from .supervise import Outage

log = logging.getLogger(__name__)

EVENT_PROBE_TIMEOUT_S = 2.0
# Entry ids waiting to be claimed; past this many (the claims are stalled) events are dropped: they are
# only a hint, and the schedule has every one of those entries.
QUEUE_MAX = 100_000
# Keyspace notification flags: E = keyevent channel, x = expired events; A is an alias that includes x.
_NEEDED_EVENT_FLAGS = "Ex"


class ExpiryEvents:
    """The `expired` keyevents of the store's database, as batches of our entry ids.

    Redis publishes a key's events on the node that holds the key only, so on a cluster there is one
    subscription per primary, each a task of its own feeding one queue; the list of primaries is read
    again after any subscription fails and every few seconds (failovers, reshards), and a new primary
    is subscribed (and its events turned on) as soon as it is seen.
    """

    def __init__(self, store: Store, metrics: Metrics, *, batch: int, idle_s: float) -> None:
        self.store = store
        self.metrics = metrics
        self.batch = batch
        self.idle_s = idle_s  # the longest a batch waits, so a consumer looks at its stop flag this often
        self.subscribed_nodes: set[str] = set()
        self._nodes: tuple[str, ...] = ()
        self._enabled: set[str] = set()  # cluster nodes whose expiry-event setting was checked
        self._said_off = False

    @property
    def channel(self) -> str:
        # One database's channel: a key of the same name expiring in another database is not ours.
        return f"__keyevent@{self.store.db}__:expired"

    @property
    def subscribed(self) -> bool:
        return bool(self._nodes) and all(node in self.subscribed_nodes for node in self._nodes)

    def _clients(self) -> dict[str, Any]:
        """Each node to subscribe to, with a client of its own: the primaries of a cluster, else the one server."""
        topology = self.store.topology
        assert topology is not None
        if topology.is_cluster:
            return {node: topology.node_client(node) for node in topology.primaries()}
        return {(topology.primaries() or ("store",))[0]: topology.events_client or self.store.client}

    async def enable(self) -> None:
        """Make Redis publish `expired` keyevents (notify-keyspace-events must include E and x), on every
        node: replicas too on a cluster, since a promoted replica publishes only what it was set to.

        Only that one setting is ever changed, and only by adding flags to what is already set. Raises
        ConfigurationError when the server neither publishes them nor lets us turn them on.
        """
        topology = self.store.topology
        assert topology is not None
        try:
            await self._may_subscribe()
            if not topology.is_cluster:
                await self._enable_on(topology.events_client or self.store.client)
                return
            primaries = set(topology.primaries())
            for node in topology.all_nodes():
                try:
                    await self._enable_on(topology.node_client(node))
                    self._enabled.add(node)
                except (RedisError, OSError) as exc:
                    if node in primaries:
                        raise
                    # A replica that cannot be reached now is set when it is first subscribed as a primary.
                    log.warning("could not set expiry events on a replica", extra={"node": node, "error": str(exc)})
        except (RedisError, RedisClusterException, OSError) as exc:
            raise StoreUnavailable(f"cannot set up expiry events at {redact(self.store.url)}: {exc}") from exc

    async def _enable_on(self, client: Any) -> None:
        try:
            found = await client.config_get("notify-keyspace-events")
        except ResponseError as exc:
            # CONFIG is disabled or not allowed for this user (managed Redis, ACLs): see for ourselves.
            if await self._arrive():
                return
            raise self._off(_NEEDED_EVENT_FLAGS, exc) from exc
        current = _text(found.get("notify-keyspace-events"))
        if _has_expired_events(current):
            return
        wanted = _merge_flags(current)
        try:
            await client.config_set("notify-keyspace-events", wanted)
        except ResponseError as exc:
            raise self._off(wanted, exc) from exc

    async def batches(self) -> AsyncGenerator[list[str], None]:
        """Entry ids whose shadow keys expired, one batch per burst; an empty batch after `idle_s` of quiet.

        Each node's subscription reconnects by itself, with backoff, logging once per outage;
        `subscribed` says whether every primary is subscribed.
        """
        queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_MAX)
        listeners: dict[str, asyncio.Task[None]] = {}
        rediscover = asyncio.Event()
        topology = self.store.topology
        assert topology is not None
        try:
            while True:
                if rediscover.is_set() or topology.discovery_due():
                    rediscover.clear()
                    await self._discover()
                self._follow_primaries()
                clients = self._clients()
                self._nodes = tuple(clients)
                for node in set(listeners) - set(clients):  # no longer a primary
                    listeners.pop(node).cancel()
                    self._set_subscribed(node, False)
                for node, client in clients.items():
                    if node not in listeners or listeners[node].done():
                        listeners[node] = asyncio.create_task(
                            self._listen(node, client, queue, rediscover), name=f"expiry events {node}"
                        )
                due: list[str] = []
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.idle_s):
                        due.append(await queue.get())
                        # Everything already received goes into one batch: a burst costs one claim.
                        while len(due) < self.batch and not queue.empty():
                            due.append(queue.get_nowait())
                yield due
        finally:
            for task in listeners.values():
                task.cancel()
            await asyncio.gather(*listeners.values(), return_exceptions=True)
            for node in list(self.subscribed_nodes):
                self._set_subscribed(node, False)

    async def _discover(self) -> None:
        topology = self.store.topology
        assert topology is not None
        try:
            await topology.discover()
        except (RedisError, RedisClusterException, OSError) as exc:
            log.debug("could not read the store's nodes", extra={"error": f"{type(exc).__name__}: {exc}"})

    def _follow_primaries(self) -> None:
        topology = self.store.topology
        assert topology is not None
        if topology.primaries_changed():
            self.metrics.failovers.inc()
            log.warning("the store's primaries changed", extra={"primaries": ",".join(topology.primaries())})
        self.metrics.primaries.set(len(topology.primaries()))

    async def _listen(self, node: str, client: Any, queue: asyncio.Queue[str], rediscover: asyncio.Event) -> None:
        """One node's subscription: our entry ids into `queue`, until cancelled; reconnects. A primary
        seen for the first time (promoted, added by a reshard) gets its expiry events turned on first."""
        keys = self.store.keys
        outage = Outage(f"expiry events {node}")
        first = True
        while True:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                if not first or (
                    self.store.topology is not None and self.store.topology.is_cluster and node not in self._enabled
                ):
                    await self._enable_again(client)  # a restarted or promoted server may not publish them
                    self._enabled.add(node)
                await pubsub.subscribe(self.channel)
                if not first:
                    self.metrics.reconnects.inc()
                    rediscover.set()  # back, maybe on another server (a sentinel's promoted replica): look
                first = False
                self._set_subscribed(node, True)
                outage.over()
                connection = pubsub.connection
                _skip_push_logging(connection)
                while True:
                    # Straight off the subscription's connection: PubSub.get_message cost ~18 CPU us a message
                    # (its own timeout, health-check and callback bookkeeping, a dict built), this ~5, and at
                    # 10,000 entries due a second there is an event for each one refreshed late. Without a
                    # health-check interval set, get_message did nothing more for us; a reply that is not a
                    # message (the subscription's confirmation) is skipped as it skipped it.
                    reply = await connection.read_response(timeout=math.inf, push_request=True)
                    if (
                        not isinstance(reply, list)  # on RESP3, hiredis gives a push as a list subclass
                        or len(reply) != 3
                        or reply[0] != b"message"
                        or type(reply[2]) is not bytes
                    ):
                        continue
                    # Only our shadow keys are queued: the channel carries every key of the database.
                    if (entry_id := keys.entry_of_shadow(reply[2])) is None:
                        continue
                    try:
                        queue.put_nowait(entry_id)
                    except asyncio.QueueFull:  # the claims are behind: the schedule has these entries anyway
                        self.metrics.background_errors.labels("events-dropped").inc()
            except (RedisError, OSError) as exc:
                self._set_subscribed(node, False)
                self.metrics.background_errors.labels("subscription").inc()
                rediscover.set()  # a node that fails may have failed over: read the primaries again
                first = False
                await asyncio.sleep(outage.failed(f"{type(exc).__name__}: {exc}"))
            finally:
                self._set_subscribed(node, False)
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    async def _enable_again(self, client: Any) -> None:
        """After a reconnect: the events may be off on the server now; turn them on, or say so once."""
        try:
            await self._enable_on(client)
        except ConfigurationError as exc:
            if not self._said_off:
                self._said_off = True
                log.warning(
                    "expiry events are off on the server; the schedule refreshes alone", extra={"why": exc.detail}
                )
        except (RedisError, OSError):
            pass  # the loop finds out for itself
        else:
            self._said_off = False

    async def _may_subscribe(self) -> None:
        """ConfigurationError if this user may not subscribe to the channel (ACL: `&<channel>`)."""
        pubsub = next(iter(self._clients().values())).pubsub()
        try:
            await pubsub.subscribe(self.channel)
            # The reply (or a NOPERM) only comes with the next read.
            confirmed = await pubsub.get_message(timeout=EVENT_PROBE_TIMEOUT_S)
            if confirmed is None:  # slow, not refused: the subscription loop finds out for itself
                log.warning("no answer to SUBSCRIBE yet; trying anyway", extra={"channel": self.channel})
        except ResponseError as exc:
            raise ConfigurationError(
                f"the Redis user may not subscribe to {self.channel} ({exc}); grant it with "
                f"`&{self.channel}` in its ACL rule for refreshes driven by expiry events"
            ) from exc
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    def _set_subscribed(self, node: str, up: bool) -> None:
        if up:
            self.subscribed_nodes.add(node)
        else:
            self.subscribed_nodes.discard(node)
        self.metrics.subscribed_nodes.set(len(self.subscribed_nodes))
        self.metrics.subscribed.set(1 if self.subscribed else 0)

    def _off(self, wanted: str, exc: Exception) -> ConfigurationError:
        return ConfigurationError(
            f"the Redis server at {redact(self.store.url)} does not publish key expiry events and eagercache "
            f"cannot enable them ({exc}). Set `notify-keyspace-events {wanted}` on the server (redis.conf, or "
            "the parameter group of a managed Redis; every node of a cluster) for refreshes driven by expiry events."
        )

    async def _arrive(self) -> bool:
        """Expire a probe key under the namespace and wait briefly for its `expired` event (on the node
        that holds the key)."""
        client = self.store.client
        probe = f"{self.store.keys.probe_prefix}{uuid.uuid4().hex}".encode()
        topology = self.store.topology
        assert topology is not None
        node_client = topology.node_client(client.get_node_from_key(probe).name) if topology.is_cluster else client
        pubsub = node_client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
            await client.set(probe, b"", px=1)
            deadline = time.monotonic() + EVENT_PROBE_TIMEOUT_S
            while time.monotonic() < deadline:
                # Touching an expired key deletes it at once (lazy expiry), which publishes the event.
                await client.exists(probe)
                message = await pubsub.get_message(timeout=0.05)
                if message is not None and message.get("data") == probe:
                    return True
            return False
        finally:
            await client.delete(probe)
            await pubsub.aclose()


async def _as_it_is(response: Any) -> Any:
    return response


def _skip_push_logging(connection: Any) -> None:
    """Have the connection's RESP3 parser hand a pushed message on as it is. redis-py's default handler
    (redis/_parsers/hiredis.py, `handle_pubsub_push_response`) gets a logger and formats the whole message
    into a debug line for each one, logged or not: ~3 us of a message's ~9 (an event per late refresh,
    to every process). On RESP2, or a parser without the hook, there is nothing to skip."""
    parser = getattr(connection, "_parser", None)
    if parser is not None and hasattr(parser, "pubsub_push_handler_func"):
        parser.pubsub_push_handler_func = _as_it_is


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


def _has_expired_events(flags: str) -> bool:
    return "E" in flags and ("x" in flags or "A" in flags)


def _merge_flags(flags: str) -> str:
    merged = flags
    for flag in _NEEDED_EVENT_FLAGS:
        if flag not in merged and not (flag == "x" and "A" in merged):
            merged += flag
    return merged
