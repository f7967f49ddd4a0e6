"""Redis `expired` keyevents for shadow keys: a hint that entries are due, as batches of entry ids.

This module owns the subscription: turning the events on, probing for them where CONFIG is refused,
reconnecting with backoff, and reading key names as bytes. The channel carries every key that expires
in the database, other applications' included, so a name is decoded only once it is known to be one of
our shadow keys (keys.py); any other name, whatever its bytes, is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator

from redis.exceptions import RedisError, ResponseError

from .errors import ConfigurationError, StoreUnavailable
from .metrics import Metrics
from .store import Store, redact
from .supervise import Outage

log = logging.getLogger(__name__)

EVENT_PROBE_TIMEOUT_S = 2.0
# Keyspace notification flags: E = keyevent channel, x = expired events; A is an alias that includes x.
_NEEDED_EVENT_FLAGS = "Ex"


class ExpiryEvents:
    """The `expired` keyevents of the store's database, as batches of our entry ids."""

    def __init__(self, store: Store, metrics: Metrics, *, batch: int, idle_s: float) -> None:
        self.store = store
        self.metrics = metrics
        self.batch = batch
        self.idle_s = idle_s  # the longest get_message waits, so a consumer looks at its stop flag this often
        # One database's channel: a key of the same name expiring in another database is not ours.
        self.channel = f"__keyevent@{store.db}__:expired"
        self.subscribed = False
        self._said_off = False

    async def enable(self) -> None:
        """Make Redis publish `expired` keyevents (notify-keyspace-events must include E and x).

        Only that one setting is ever changed, and only by adding flags to what is already set. Raises
        ConfigurationError when the server neither publishes them nor lets us turn them on.
        """
        client = self.store.client
        try:
            await self._may_subscribe()
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
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"cannot set up expiry events at {redact(self.store.url)}: {exc}") from exc

    async def batches(self) -> AsyncGenerator[list[str], None]:
        """Entry ids whose shadow keys expired, one batch per burst; an empty batch after `idle_s` of quiet.

        Reconnects by itself, with backoff, logging once per outage; `subscribed` says whether it is live.
        """
        outage = Outage("expiry events")
        first = True
        keys = self.store.keys
        while True:
            pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                if not first:
                    self.metrics.reconnects.inc()
                    await self._enable_again()  # a restarted or promoted server may not publish them
                first = False
                self._set_subscribed(True)
                outage.over()
                while True:
                    message = await pubsub.get_message(timeout=self.idle_s)
                    due: list[str] = []
                    while message is not None:
                        # Everything already received goes into one batch: a burst costs one claim.
                        data = message.get("data")
                        if isinstance(data, bytes) and (entry_id := keys.entry_of_shadow(data)) is not None:
                            due.append(entry_id)
                        if len(due) >= self.batch:
                            break  # the rest waits in the connection for the next batch
                        message = await pubsub.get_message(timeout=0)
                    yield due
            except (RedisError, OSError) as exc:
                self._set_subscribed(False)
                self.metrics.background_errors.labels("subscription").inc()
                delay = outage.failed(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(delay)
            finally:
                self._set_subscribed(False)
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _enable_again(self) -> None:
        """After a reconnect: the events may be off on the server now; turn them on, or say so once."""
        try:
            await self.enable()
        except ConfigurationError as exc:
            if not self._said_off:
                self._said_off = True
                log.warning(
                    "expiry events are off on the server; the schedule refreshes alone", extra={"why": exc.detail}
                )
        except StoreUnavailable:
            pass  # the loop finds out for itself
        else:
            self._said_off = False

    async def _may_subscribe(self) -> None:
        """ConfigurationError if this user may not subscribe to the channel (ACL: `&<channel>`)."""
        pubsub = self.store.client.pubsub()
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
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _set_subscribed(self, up: bool) -> None:
        self.subscribed = up
        self.metrics.subscribed.set(1 if up else 0)

    def _off(self, wanted: str, exc: Exception) -> ConfigurationError:
        return ConfigurationError(
            f"the Redis server at {redact(self.store.url)} does not publish key expiry events and eagercache "
            f"cannot enable them ({exc}). Set `notify-keyspace-events {wanted}` on the server (redis.conf, or "
            "the parameter group of a managed Redis) for refreshes driven by expiry events."
        )

    async def _arrive(self) -> bool:
        """Expire a probe key under the namespace and wait briefly for its `expired` event."""
        client = self.store.client
        probe = f"{self.store.keys.namespace}probe:{uuid.uuid4().hex}".encode()
        pubsub = client.pubsub(ignore_subscribe_messages=True)
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
            await pubsub.aclose()  # type: ignore[no-untyped-call]


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
