"""The change channel: what each process does to entries, told to every process through Redis pub/sub.

One channel per namespace (`<namespace>watch`). A process announces each entry it stores with new data
(its new ETag), marks stale, or removes; the announcements of one event-loop iteration go out as one
PUBLISH, one line each: `<change> <etag or -> <entry id>`. Each process holds one subscription to the
channel, whatever its number of watchers, and hands each batch of changes to its watch hub (watch.py).

Pub/sub, not a stream: nothing is stored, and a process that misses messages (its subscription was down,
a PUBLISH failed) loses nothing it cannot find again: the hub reads the ETags of its watched entries
every few seconds, and a watcher that missed a version is sent a snapshot. A process whose announcements
were lost (a PUBLISH failed, or too many waited) says so once it can publish again (a `sync` line): every
hub then compares all its watched entries with the store at once. On a cluster a PUBLISH to
any node reaches the subscribers of every node (the cluster bus carries it), so one subscription to one
primary hears them all; memory:// is fakeredis' pub/sub inside the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from redis.exceptions import RedisError

from .errors import StoreUnavailable
from .logs import Throttle
from .metrics import Metrics
from .store import Store
from .supervise import Outage, check_cancelled

log = logging.getLogger(__name__)

CHANNEL_SUFFIX = "watch"
# Announcements waiting for their PUBLISH; past this many (Redis is stalled) more are dropped: the hubs'
# periodic check finds those changes anyway.
MAX_PENDING = 10_000
# Lines per PUBLISH.
PUBLISH_BATCH = 1_000
# The subscription waits this long for a message before looking again (it is cancelled at shutdown).
LISTEN_IDLE_S = 1.0
# What a process did to an entry: stored new data (a new ETag), marked it stale (its first failed refresh
# in a row), or removed it (an admin's invalidation, idle).
Change = Literal["data", "stale", "gone"]
# What a hub hears: the changes, and `sync` (the announcing process lost some: compare everything now).
Heard = Literal["data", "stale", "gone", "sync"]
_HEARD = frozenset(get_args(Heard))
_SYNC = b"sync - -"


@dataclass(frozen=True, slots=True)
class Announced:
    """One change to one entry, as announced on the channel."""

    change: Heard
    entry_id: str
    etag: str  # the new ETag for "data", else ""


def encode(change: Change, entry_id: str, etag: str) -> bytes:
    return f"{change} {etag or '-'} {entry_id}".encode()


def decode(message: bytes) -> list[Announced]:
    """The changes in one message; a line that is not one (another application's, garbled) is skipped."""
    found = []
    for line in message.split(b"\n"):
        parts = line.split(b" ", 2)
        if len(parts) != 3:
            continue
        try:
            change, etag, entry_id = (part.decode("ascii") for part in parts)
        except UnicodeDecodeError:
            continue
        if change in _HEARD:
            found.append(Announced(change, entry_id, "" if etag == "-" else etag))  # type: ignore[arg-type]
    return found


class ChangeChannel:
    """This process's side of the channel: `announce` (batched PUBLISH) and `listen` (the one subscription)."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self.subscribed = False
        self.lost = False  # announcements of this process were lost since it last published one
        self._pending: list[bytes] = []
        self._ready = asyncio.Event()
        self._errors = Throttle(log, 60.0)

    @property
    def channel(self) -> str:
        return f"{self.store.keys.namespace}{CHANNEL_SUFFIX}"

    def announce(self, change: Change, entry_id: str, etag: str) -> None:
        """Queue one change for the next PUBLISH (an engine callback: never blocks, never raises)."""
        if len(self._pending) >= MAX_PENDING:
            self.metrics.background_errors.labels("watch-announce-dropped").inc()
            self.lost = True
            return
        self._pending.append(encode(change, entry_id, etag))
        self._ready.set()

    async def publish(self) -> None:
        """Send what was announced, one PUBLISH per batch, until cancelled (a supervised loop)."""
        while True:
            check_cancelled()
            await self._ready.wait()
            self._ready.clear()
            while self._pending:
                lines, self._pending = self._pending[:PUBLISH_BATCH], self._pending[PUBLISH_BATCH:]
                lost, self.lost = self.lost, False
                try:
                    await self.store.publish(self.channel, b"\n".join([_SYNC, *lines] if lost else lines))
                except StoreUnavailable as exc:  # lost: the hubs find these changes by their check
                    self.lost = True
                    self.metrics.background_errors.labels("watch-publish").inc()
                    self._errors.warning("changes could not be announced", "publish", {"error": exc.detail})

    async def listen(self, deliver: Callable[[list[Announced]], None], subscribed: Callable[[], None]) -> None:
        """Hand each message's changes to `deliver`, until cancelled; reconnects with backoff. `subscribed()`
        is called each time the subscription is confirmed: what was published before that was not heard."""
        outage = Outage("watch changes")
        turn = 0
        while True:
            pubsub = self._client(turn).pubsub()
            try:
                await pubsub.subscribe(self.channel)
                while True:
                    message = await pubsub.get_message(timeout=LISTEN_IDLE_S)
                    check_cancelled()
                    if message is None:
                        continue
                    if message.get("type") == b"subscribe" or message.get("type") == "subscribe":
                        self.subscribed = True
                        outage.over()
                        subscribed()
                    elif isinstance(data := message.get("data"), bytes) and (changes := decode(data)):
                        deliver(changes)
            except (RedisError, OSError) as exc:
                self.metrics.background_errors.labels("watch-subscription").inc()
                turn += 1  # on a cluster, another primary next time
                self.subscribed = False
                await asyncio.sleep(outage.failed(f"{type(exc).__name__}: {exc}"))
                check_cancelled()
            finally:
                self.subscribed = False
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    def _client(self, turn: int) -> Any:
        """A client to subscribe with: one of a cluster's primaries (any will do), else the one server's."""
        topology = self.store.topology
        assert topology is not None
        if topology.is_cluster:
            primaries = topology.primaries()
            return topology.node_client(primaries[turn % len(primaries)])
        return topology.events_client or self.store.client
