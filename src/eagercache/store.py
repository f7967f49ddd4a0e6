"""Every Redis command and Lua script the service runs, behind one class for `redis://` and `memory://`.

`memory://` is fakeredis in this process: the same commands and scripts, no server, nothing shared or
kept. It publishes no `expired` events, which is why the schedule (the `due` sorted set) and not
the events is what the refresher trusts.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fakeredis
import redis.asyncio as redis
from redis import exceptions as redis_exceptions
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError, ResponseError

from .errors import ConfigurationError, StoreUnavailable
from .keys import Keys

MEMORY_URL = "memory://"
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0
EXPIRED_CHANNEL = "__keyevent@*__:expired"
EVENT_PROBE_TIMEOUT_S = 2.0
# Keyspace notification flags: E = keyevent channel, x = expired events; A is an alias that includes x.
_NEEDED_EVENT_FLAGS = "Ex"

# Claim the entries due by ARGV[1] (ms) by moving them to ARGV[2] (the lease end): whoever claims
# an entry owns its refresh; if it dies, the lease runs out and the entry is due again.
_CLAIM_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""
# Claim one entry (an expired shadow key says it is due). An entry missing from the schedule but
# still stored is claimed too, so a damaged schedule heals instead of orphaning the entry.
_CLAIM_ONE = """
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (due and tonumber(due) <= tonumber(ARGV[2])) or (not due and redis.call('EXISTS', KEYS[2]) == 1) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
return 0
"""


def now_ms() -> int:
    return int(time.time() * 1000)


def redact(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@contextmanager
def _redis_errors(url: str) -> Iterator[None]:
    try:
        yield
    except (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError, OSError) as exc:
        raise StoreUnavailable(f"cannot reach the store at {redact(url)}: {exc}") from exc
    except RedisError as exc:
        raise StoreUnavailable(f"store error at {redact(url)}: {type(exc).__name__}: {exc}") from exc


class Store:
    """The cache's storage: entry bodies, shadow keys and the due schedule."""

    def __init__(self, client: redis.Redis, keys: Keys, *, url: str) -> None:
        self.client = client
        self.keys = keys
        self.url = url
        self.is_memory = url.startswith(MEMORY_URL)
        self._claim_due = client.register_script(_CLAIM_DUE)
        self._claim_one = client.register_script(_CLAIM_ONE)

    @classmethod
    def from_url(cls, url: str, keys: Keys) -> Store:
        if url.startswith(MEMORY_URL):
            client: redis.Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        else:
            try:
                client = redis.Redis.from_url(
                    url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=COMMAND_TIMEOUT_S
                )
            except ValueError as exc:
                raise ConfigurationError(f"redis_url {redact(url)!r} is not a valid Redis URL: {exc}") from exc
        return cls(client, keys, url=url)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def ping(self) -> None:
        with _redis_errors(self.url):
            await self.client.ping()

    async def get(self, entry_id: str) -> bytes | None:
        with _redis_errors(self.url):
            body = await self.client.get(self.keys.item(entry_id))
        assert body is None or isinstance(body, bytes)  # the client is built without decode_responses
        return body

    async def write(self, entry_id: str, body: bytes, due_in_ms: int) -> None:
        """Store the body and schedule the next refresh, in one transaction (never half-written)."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.item(entry_id), body)
            pipe.set(self.keys.shadow(entry_id), b"", px=due_in_ms)
            pipe.zadd(self.keys.due, {entry_id: now_ms() + due_in_ms})
            with _redis_errors(self.url):
                await pipe.execute()

    async def postpone(self, entry_id: str, due_in_ms: int) -> None:
        """Leave the stored body as it is and try again later (after a failed refresh)."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.shadow(entry_id), b"", px=due_in_ms)
            pipe.zadd(self.keys.due, {entry_id: now_ms() + due_in_ms})
            with _redis_errors(self.url):
                await pipe.execute()

    async def forget(self, entry_id: str) -> None:
        """Remove an entry and its schedule."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.item(entry_id), self.keys.shadow(entry_id))
            pipe.zrem(self.keys.due, entry_id)
            with _redis_errors(self.url):
                await pipe.execute()

    async def claim_due(self, lease_ms: int, limit: int) -> list[str]:
        """Claim up to `limit` entries whose refresh is due now."""
        now = now_ms()
        with _redis_errors(self.url):
            ids: list[bytes] = await self._claim_due(keys=[self.keys.due], args=[now, now + lease_ms, limit])
        return [i.decode() for i in ids]

    async def claim(self, entry_id: str, lease_ms: int) -> bool:
        """Claim one entry if it is due; False if it is not (already refreshed, or claimed elsewhere)."""
        now = now_ms()
        with _redis_errors(self.url):
            won = await self._claim_one(
                keys=[self.keys.due, self.keys.item(entry_id)], args=[entry_id, now, now + lease_ms]
            )
        return bool(won)

    async def next_due_ms(self) -> int | None:
        """When the earliest scheduled refresh falls due (ms since the epoch), None if nothing is scheduled."""
        with _redis_errors(self.url):
            first = await self.client.zrange(self.keys.due, 0, 0, withscores=True)
        return int(first[0][1]) if first else None

    async def enable_expiry_events(self) -> None:
        """Make Redis publish `expired` keyevents (notify-keyspace-events must include E and x).

        Only that one setting is ever changed, and only by adding flags to what is already set.
        """
        with _redis_errors(self.url):
            try:
                current = _text((await self.client.config_get("notify-keyspace-events")).get("notify-keyspace-events"))
            except ResponseError as exc:
                # CONFIG is disabled or not allowed for this user (managed Redis, ACLs): see for ourselves.
                if await self._expiry_events_arrive():
                    return
                raise self._events_off(_NEEDED_EVENT_FLAGS, exc) from exc
            if _has_expired_events(current):
                return
            wanted = _merge_flags(current)
            try:
                await self.client.config_set("notify-keyspace-events", wanted)
            except ResponseError as exc:
                raise self._events_off(wanted, exc) from exc

    def _events_off(self, wanted: str, exc: Exception) -> ConfigurationError:
        return ConfigurationError(
            f"the Redis server at {redact(self.url)} does not publish key expiry events and eagercache cannot "
            f"enable them ({exc}). Set `notify-keyspace-events {wanted}` on the server (redis.conf, or the "
            "parameter group of a managed Redis), then start eagercache again."
        )

    async def _expiry_events_arrive(self) -> bool:
        """Expire a probe key under the namespace and wait briefly for its `expired` event."""
        probe = f"{self.keys.namespace}probe:{uuid.uuid4().hex}"
        pubsub = self.pubsub()
        try:
            await pubsub.psubscribe(EXPIRED_CHANNEL)
            await self.client.set(probe, b"", px=1)
            deadline = time.monotonic() + EVENT_PROBE_TIMEOUT_S
            while time.monotonic() < deadline:
                # Touching an expired key deletes it at once (lazy expiry), which publishes the event.
                await self.client.exists(probe)
                message = await pubsub.get_message(timeout=0.05)
                if message is not None and _text(message["data"]) == probe:
                    return True
            return False
        finally:
            await self.client.delete(probe)
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    def pubsub(self) -> PubSub:
        return self.client.pubsub(ignore_subscribe_messages=True)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def _has_expired_events(flags: str) -> bool:
    return "E" in flags and ("x" in flags or "A" in flags)


def _merge_flags(flags: str) -> str:
    merged = flags
    for flag in _NEEDED_EVENT_FLAGS:
        if flag not in merged and not (flag == "x" and "A" in merged):
            merged += flag
    return merged
