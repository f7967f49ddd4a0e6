"""Pub/sub inside one process: what `memory://` offers the change channel (changes.py) in place of Redis's.

It speaks the part of redis-py's asyncio PubSub that the channel uses (`subscribe`, `get_message`,
`aclose`), so the channel holds one subscription per process whatever the store. Like Redis, it keeps
nothing for a channel nobody listens to, and drops a subscriber that falls too far behind (Redis's
`client-output-buffer-limit pubsub`): that subscriber's next `get_message` raises ConnectionError, and the
channel subscribes again (and the watch hub reads what it may have missed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

# Messages a subscriber may have waiting; one more and it is dropped, as Redis drops a slow subscriber.
MAX_PENDING_MESSAGES = 10_000


class LocalBus:
    """Channels and their subscriptions, in this process. Also the `client` a memory store's topology holds."""

    def __init__(self) -> None:
        self._channels: dict[bytes, set[Subscription]] = {}

    def pubsub(self) -> Subscription:
        return Subscription(self)

    def publish(self, channel: str | bytes, message: bytes) -> int:
        """Hand the message to every subscriber of the channel; how many got it (PUBLISH's answer)."""
        name = _name(channel)
        subscribers = self._channels.get(name)
        if not subscribers:
            return 0
        received = 0
        for subscription in list(subscribers):
            if subscription.deliver(name, message):
                received += 1
        return received

    def subscribers(self, channel: str | bytes) -> int:
        return len(self._channels.get(_name(channel), ()))

    def _join(self, channel: bytes, subscription: Subscription) -> None:
        self._channels.setdefault(channel, set()).add(subscription)

    def _leave(self, channel: bytes, subscription: Subscription) -> None:
        subscribers = self._channels.get(channel)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._channels[channel]

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        for subscribers in list(self._channels.values()):
            for subscription in list(subscribers):
                subscription.drop("the store was closed")


class Subscription:
    """One subscriber's channels and the messages waiting for it (redis-py's PubSub, the part we use)."""

    def __init__(self, bus: LocalBus) -> None:
        self._bus = bus
        self._channels: set[bytes] = set()
        self._messages: deque[dict[str, Any]] = deque()
        self._arrived = asyncio.Event()
        self._dropped: str | None = None

    async def subscribe(self, *channels: str | bytes) -> None:
        self._check()
        for channel in map(_name, channels):
            self._channels.add(channel)
            self._bus._join(channel, self)
            self._put({"type": b"subscribe", "pattern": None, "channel": channel, "data": len(self._channels)})

    async def unsubscribe(self, *channels: str | bytes) -> None:
        for channel in map(_name, channels) if channels else list(self._channels):
            self._channels.discard(channel)
            self._bus._leave(channel, self)
            self._put({"type": b"unsubscribe", "pattern": None, "channel": channel, "data": len(self._channels)})

    async def get_message(self, ignore_subscribe_messages: bool = False, timeout: float | None = 0.0) -> Any:
        """The next message, or None if none comes within `timeout` seconds (None: wait for one)."""
        while True:
            self._check()
            if self._messages:
                message = self._messages.popleft()
                if ignore_subscribe_messages and message["type"] != b"message":
                    continue
                return message
            if timeout is not None and timeout <= 0:
                return None
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
            if not self._messages:
                self._check()
                return None
            timeout = 0.0  # one wait per call, as redis-py's

    def deliver(self, channel: bytes, message: bytes) -> bool:
        if self._dropped is not None:
            return False
        if len(self._messages) >= MAX_PENDING_MESSAGES:
            self.drop(f"subscriber dropped: more than {MAX_PENDING_MESSAGES} messages waiting")
            return False
        self._put({"type": b"message", "pattern": None, "channel": channel, "data": message})
        return True

    def drop(self, why: str) -> None:
        """Disconnect this subscriber: its next read raises, as a connection Redis closed would."""
        self._dropped = why
        self._leave_all()
        self._messages.clear()
        self._arrived.set()

    async def aclose(self) -> None:
        self._leave_all()
        self._messages.clear()

    def _leave_all(self) -> None:
        for channel in self._channels:
            self._bus._leave(channel, self)
        self._channels.clear()

    def _put(self, message: dict[str, Any]) -> None:
        self._messages.append(message)
        self._arrived.set()

    def _check(self) -> None:
        if self._dropped is not None:
            raise RedisConnectionError(self._dropped)


def _name(channel: str | bytes) -> bytes:
    return channel.encode() if isinstance(channel, str) else channel
