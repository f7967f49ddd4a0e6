"""Every Redis command and Lua script the service runs, behind one class for `redis://` and `memory://`.

`memory://` is fakeredis in this process: the same commands and scripts, no server, nothing shared or
kept. It publishes no `expired` events, which is why the schedule (the `due` sorted set) and not
the events is what the refresher trusts. Key names are in keys.py, scripts in scripts.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import fakeredis
import redis.asyncio as redis
from redis import exceptions as redis_exceptions
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError, ResponseError

from . import scripts
from .errors import ConfigurationError, StoreUnavailable
from .keys import Keys

MEMORY_URL = "memory://"
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0
DEFAULT_MAX_CONNECTIONS = 64
# The header line of a stored value (item.Entry) fits in this many bytes; claims and listings read only these.
HEADER_MAX_BYTES = 128
EXPIRED_CHANNEL = "__keyevent@*__:expired"
EVENT_PROBE_TIMEOUT_S = 2.0
# Keyspace notification flags: E = keyevent channel, x = expired events; A is an alias that includes x.
_NEEDED_EVENT_FLAGS = "Ex"


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


@dataclass(frozen=True, slots=True)
class Stale:
    """An entry whose refreshes fail: since when (ms since the epoch), how many times in a row, the last error."""

    since_ms: int
    failures: int
    error: str = ""

    @classmethod
    def parse(cls, raw: bytes | str | None) -> Stale | None:
        if raw is None:
            return None
        since, failures, error = [*_text(raw).split(" ", 2), "", ""][:3]
        return cls(int(since), int(failures or 1), error)

    def encode(self) -> str:
        return f"{self.since_ms} {self.failures} {self.error}"


@dataclass(frozen=True, slots=True)
class Claim:
    """The right to refresh one entry until `lease_end_ms`, with what the schedule knew about it."""

    entry_id: str
    lease_end_ms: int
    last_read_ms: int | None
    due_ms: int | None
    header: bytes | None = None  # the start of the stored value: its validators, without the body


WriteMode = Literal["cold", "refresh"]
STORED, OVER_LIMIT, GONE = 1, 0, -1


class Store:
    """The cache's storage: entry bodies, shadow keys, the due schedule, read times and entry counts."""

    def __init__(self, client: redis.Redis, keys: Keys, *, url: str) -> None:
        self.client = client
        self.keys = keys
        self.url = url
        self.is_memory = url.startswith(MEMORY_URL)
        self._claim_due = client.register_script(scripts.CLAIM_DUE)
        self._claim_many = client.register_script(scripts.CLAIM_MANY)
        self._release = client.register_script(scripts.RELEASE)
        self._write = client.register_script(scripts.WRITE)
        self._postpone = client.register_script(scripts.POSTPONE)
        self._forget = client.register_script(scripts.FORGET)

    @classmethod
    def from_url(cls, url: str, keys: Keys, *, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> Store:
        if url.startswith(MEMORY_URL):
            client: redis.Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        else:
            try:
                # Blocking: at max_connections a command waits for a free connection (up to the command
                # timeout) instead of failing with "Too many connections" under a burst of reads.
                pool = redis.BlockingConnectionPool.from_url(
                    url,
                    max_connections=max_connections,
                    timeout=COMMAND_TIMEOUT_S,
                    socket_connect_timeout=CONNECT_TIMEOUT_S,
                    socket_timeout=COMMAND_TIMEOUT_S,
                )
            except ValueError as exc:
                raise ConfigurationError(f"redis_url {redact(url)!r} is not a valid Redis URL: {exc}") from exc
            client = redis.Redis.from_pool(pool)
        return cls(client, keys, url=url)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def ping(self) -> None:
        with _redis_errors(self.url):
            await self.client.ping()

    async def get(self, entry_id: str) -> tuple[bytes | None, Stale | None]:
        """The entry's body and, if its refreshes are failing, its stale marker: one round trip."""
        with _redis_errors(self.url):
            body, stale = await self.client.mget(self.keys.item(entry_id), self.keys.stale(entry_id))
        assert body is None or isinstance(body, bytes)  # the client is built without decode_responses
        return body, Stale.parse(stale)

    async def write(
        self,
        entry_id: str,
        fetcher: str,
        value: bytes,
        now: int,
        due_at_ms: int,
        *,
        mode: WriteMode,
        max_entries: int,
    ) -> int:
        """Store the value and schedule the next refresh atomically; STORED, OVER_LIMIT or GONE."""
        keys = [*self._entry_keys(entry_id), self.keys.fill(entry_id)]
        due_in_ms = max(1, due_at_ms - now)
        args: list[str | bytes | int] = [entry_id, value, due_in_ms, now, due_at_ms, fetcher, max_entries, mode]
        with _redis_errors(self.url):
            result: int = await self._write(keys=keys, args=args)
        return result

    async def start_fill(self, entry_id: str, lock_ms: int) -> bool:
        """Take the right to fetch a missing entry across replicas; False if another replica has it."""
        with _redis_errors(self.url):
            return bool(await self.client.set(self.keys.fill(entry_id), b"", nx=True, px=lock_ms))

    async def end_fill(self, entry_id: str) -> None:
        """Let go of the cold-fill lock without storing (the fetch failed)."""
        with _redis_errors(self.url):
            await self.client.delete(self.keys.fill(entry_id))

    async def filling(self, entry_id: str) -> tuple[bytes | None, bool]:
        """The entry's body if stored by now, and whether a replica still holds its fill lock."""
        with _redis_errors(self.url):
            body, lock = await self.client.mget(self.keys.item(entry_id), self.keys.fill(entry_id))
        assert body is None or isinstance(body, bytes)
        return body, lock is not None

    async def stale(self, entry_id: str) -> Stale | None:
        with _redis_errors(self.url):
            return Stale.parse(await self.client.get(self.keys.stale(entry_id)))

    async def postpone(self, entry_id: str, fetcher: str, due_in_ms: int, stale: Stale | None) -> bool:
        """Keep the body, mark the entry stale (unless `stale` is None), try again later; False if it is gone."""
        k = self.keys
        keys = [k.item(entry_id), k.shadow(entry_id), k.due, k.stale(entry_id), k.read, k.counts]
        marker = stale.encode() if stale is not None else ""
        args: list[str | int] = [entry_id, due_in_ms, now_ms() + due_in_ms, marker, fetcher]
        with _redis_errors(self.url):
            kept: int = await self._postpone(keys=keys, args=args)
        return bool(kept)

    async def forget(self, entry_id: str, fetcher: str) -> bool:
        """Remove an entry and everything about it; False if it had no stored item."""
        with _redis_errors(self.url):
            existed = await self._forget(keys=self._entry_keys(entry_id), args=[entry_id, fetcher])
        return bool(existed)

    async def scan_entries(self, fetcher: str, cursor: int, count: int) -> tuple[int, list[str]]:
        """One page of a fetcher's stored entries (SCAN semantics: a cursor, 0 when done; pages vary in size)."""
        # glob-escaped: a literal '?' ends the fetcher's name, so fetcher `a` never matches entries of `ab`
        pattern = _glob_escape(f"{self.keys.item_prefix}{fetcher}?") + "*"
        with _redis_errors(self.url):
            cursor, keys = await self.client.scan(cursor, match=pattern, count=count)
        start = len(self.keys.item_prefix)
        return int(cursor), [_text(key)[start:] for key in keys]

    async def describe(self, entry_ids: list[str]) -> list[tuple[bytes | None, float | None, Stale | None]]:
        """For each entry: its stored header line (not the body), its due score, its stale marker."""
        async with self.client.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.getrange(self.keys.item(entry_id), 0, HEADER_MAX_BYTES - 1)
                pipe.zscore(self.keys.due, entry_id)
                pipe.get(self.keys.stale(entry_id))
            with _redis_errors(self.url):
                flat = await pipe.execute()
        return [(flat[i] or None, flat[i + 1], Stale.parse(flat[i + 2])) for i in range(0, len(flat), 3)]

    def _entry_keys(self, entry_id: str) -> list[str]:
        k = self.keys
        return [k.item(entry_id), k.shadow(entry_id), k.due, k.read, k.stale(entry_id), k.counts]

    async def claim_due(self, lease_end_ms: int, limit: int) -> list[Claim]:
        """Claim up to `limit` entries whose refresh is due now."""
        args: list[str | int] = [now_ms(), lease_end_ms, limit, self.keys.item_prefix, HEADER_MAX_BYTES - 1]
        with _redis_errors(self.url):
            flat: list[bytes] = await self._claim_due(keys=[self.keys.due, self.keys.read], args=args)
        return self._claims(flat, lease_end_ms)

    async def claim(self, entry_ids: list[str], lease_end_ms: int) -> list[Claim]:
        """Claim those of these entries that are due (refreshed already, or claimed elsewhere: not)."""
        args: list[str | int] = [now_ms(), lease_end_ms, self.keys.item_prefix, HEADER_MAX_BYTES - 1, *entry_ids]
        with _redis_errors(self.url):
            flat: list[bytes] = await self._claim_many(keys=[self.keys.due, self.keys.read], args=args)
        return self._claims(flat, lease_end_ms)

    @staticmethod
    def _claims(flat: list[bytes], lease_end_ms: int) -> list[Claim]:
        return [
            Claim(_text(flat[i]), lease_end_ms, _ms(flat[i + 1]), _ms(flat[i + 2]), flat[i + 3] or None)
            for i in range(0, len(flat), 4)
        ]

    async def release(self, claims: dict[str, int]) -> int:
        """Give back claims still held (shutdown): those entries are due again at once, for any replica."""
        now = now_ms()
        with _redis_errors(self.url):
            released = [await self._release(keys=[self.keys.due], args=[i, end, now]) for i, end in claims.items()]
        return sum(released)

    async def touch(self, entry_ids: list[str]) -> None:
        """Record reads, in one command: only for entries that exist, and never moving a time back."""
        if entry_ids:
            now = now_ms()
            with _redis_errors(self.url):
                await self.client.zadd(self.keys.read, dict.fromkeys(entry_ids, now), xx=True, gt=True)

    async def next_due_ms(self) -> int | None:
        """When the earliest scheduled refresh falls due (ms since the epoch), None if nothing is scheduled."""
        with _redis_errors(self.url):
            first = await self.client.zrange(self.keys.due, 0, 0, withscores=True)
        return int(first[0][1]) if first else None

    async def entry_counts(self) -> dict[str, int]:
        with _redis_errors(self.url):
            counts = await self.client.hgetall(self.keys.counts)
        return {_text(name): int(n) for name, n in counts.items()}

    async def entry_count(self, fetcher: str) -> int:
        with _redis_errors(self.url):
            return int(await self.client.hget(self.keys.counts, fetcher) or 0)

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
            "parameter group of a managed Redis) for refreshes driven by expiry events."
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


def _glob_escape(text: str) -> str:
    """Escape Redis glob characters (KEYS/SCAN MATCH)."""
    return "".join("\\" + c if c in "\\*?[]^" else c for c in text)


def _ms(raw: bytes | str) -> int | None:
    value = int(float(raw))
    return None if value < 0 else value


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
