"""Every Redis command and Lua script the service runs, behind one class for `redis://` and `memory://`.

`memory://` is fakeredis in this process: the same commands and scripts, no server, nothing shared or
kept. It publishes no `expired` events, which is why the schedule (the `due` sorted set) and not
the events is what the refresher trusts. Key names are in keys.py, scripts in scripts.py, the
expiry-event subscription in events.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import fakeredis
import redis.asyncio as redis
from redis import exceptions as redis_exceptions
from redis.exceptions import RedisError

from . import scripts
from .clock import ServerClock
from .errors import ConfigurationError, StoreTimeout, StoreUnavailable
from .keys import Keys, entry_id_of

MEMORY_URL = "memory://"
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0
DEFAULT_MAX_CONNECTIONS = 64
# The longest a reader waits for Redis (connection and reply); past it the read is answered from memory
# (grace) or with a 503. Background work has COMMAND_TIMEOUT_S.
DEFAULT_READ_BUDGET_S = 0.2
FILL_BUDGET_S = 1.0
# Connections opened at start-up (see Store.warm).
WARM_CONNECTIONS = 16
# A budget's check that runs this much later than planned means the event loop was busy: it looks again.
LOOP_LATE_S = 0.05
# Loop iterations a budget's check waits, once the budget is spent, for replies already received.
CONFIRM_ROUNDS = 2
# The header line of a stored value (item.Entry) fits in this many bytes; claims and listings read only these.
HEADER_MAX_BYTES = 128
# Eviction policies that may delete keys without a TTL: the schedule, the read times, the counts.
UNSAFE_EVICTION = ("allkeys-lru", "allkeys-lfu", "allkeys-random")


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


@contextmanager
def store_errors(url: str) -> Iterator[None]:
    """Redis and socket errors as StoreUnavailable, in words an operator can act on."""
    try:
        yield
    except (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError, OSError) as exc:
        hint = ""
        if url.startswith("rediss://") and ("SSL" in str(exc) or "reset by peer" in str(exc)):
            hint = (
                " (TLS: the server's certificate is checked against --redis-ca-file, or the system's CAs; "
                "a server that requires client certificates needs --redis-cert-file and --redis-key-file)"
            )
        raise StoreUnavailable(f"cannot reach the store at {redact(url)}: {exc}{hint}") from exc
    except RedisError as exc:
        raise StoreUnavailable(f"store error at {redact(url)}: {type(exc).__name__}: {exc}") from exc


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
        if url.startswith("rediss://"):
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
        try:
            return cls(int(since), int(failures or 1), error)
        except ValueError:  # not a marker eagercache wrote: still a marker, from now on
            return cls(0, 1, f"unreadable stale marker {_text(raw)[:40]!r}")

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

    def __init__(self, client: redis.Redis, keys: Keys, *, url: str, read_budget_s: float = DEFAULT_READ_BUDGET_S):
        self.client = client
        self.keys = keys
        self.url = url
        self.is_memory = url.startswith(MEMORY_URL)
        self.read_budget_s = read_budget_s
        self._answered_at = time.monotonic()  # when a call last got its answer: the store is answering
        self._wrote_at = self._answered_at  # when a write last got its answer
        # A miss's own calls (fill lock, write) come after Redis has answered its read, and its reader
        # waits for a fetch anyway: they get more room, so a burst of misses on a busy process is not
        # taken for a stall.
        self.fill_budget_s = max(read_budget_s, FILL_BUDGET_S)
        self.clock = ServerClock()
        self._claim_due = client.register_script(scripts.CLAIM_DUE)
        self._claim_many = client.register_script(scripts.CLAIM_MANY)
        self._release = client.register_script(scripts.RELEASE)
        self._write = client.register_script(scripts.WRITE)
        self._postpone = client.register_script(scripts.POSTPONE)
        self._forget = client.register_script(scripts.FORGET)
        self._repair = client.register_script(scripts.REPAIR)
        self._prune = client.register_script(scripts.PRUNE)
        self._recount = client.register_script(scripts.RECOUNT)

    @classmethod
    def from_url(
        cls,
        url: str,
        keys: Keys,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        read_budget_s: float = DEFAULT_READ_BUDGET_S,
        auth: Auth | None = None,
    ) -> Store:
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
                    **(auth or Auth()).connection_kwargs(url),
                )
            except ValueError as exc:
                raise ConfigurationError(f"redis_url {redact(url)!r} is not a valid Redis URL: {exc}") from exc
            client = redis.Redis.from_pool(pool)
        return cls(client, keys, url=url, read_budget_s=read_budget_s)

    @property
    def db(self) -> int:
        """The database number the client uses (expiry events are published per database)."""
        return int(self.client.connection_pool.connection_kwargs.get("db", 0) or 0)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def ping(self, timeout_s: float = COMMAND_TIMEOUT_S) -> None:
        """PING, answered within `timeout_s` by the clock, however busy the store is (a probe's deadline)."""
        try:
            async with asyncio.timeout(timeout_s):
                with self._errors():
                    await self.client.ping()
        except TimeoutError:
            raise StoreTimeout(f"the store at {redact(self.url)} did not answer within {timeout_s:g} s") from None

    async def warm(self, connections: int = WARM_CONNECTIONS) -> None:
        """Open some connections now, so that the first burst of reads finds the store answering on them
        while more connections are opened (a cold pool answers nothing until its first connections are up,
        which a read budget cannot tell from a stall)."""
        if self.is_memory:
            return
        pool = self.client.connection_pool
        n = min(connections, pool.max_connections - 1)
        with self._errors():
            opened = await asyncio.gather(*(pool.get_connection() for _ in range(n)))  # type: ignore[no-untyped-call]
            for connection in opened:
                await pool.release(connection)

    async def sync_clock(self) -> None:
        """Read the server's clock (TIME) into `self.clock`."""
        async with self._within(COMMAND_TIMEOUT_S):
            sent = time.monotonic()
            seconds, micros = await self.client.time()
            self.clock.observe(seconds * 1000 + micros / 1000, sent, time.monotonic())

    @contextmanager
    def _errors(self, *, write: bool = False) -> Iterator[None]:
        """Redis errors as StoreUnavailable; a call that gets its answer shows the store is answering
        (a write, that it is taking writes: a server can take reads and hold writes, as a failover does)."""
        with store_errors(self.url):
            yield
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

                def check(planned: float, rounds_left: int = CONFIRM_ROUNDS) -> None:
                    nonlocal handle
                    now = loop.time()
                    silent_s = time.monotonic() - (self._wrote_at if write else self._answered_at)
                    if now - started >= COMMAND_TIMEOUT_S:
                        deadline.reschedule(now)
                    elif now - planned > LOOP_LATE_S:
                        # This loop was busy, not the store: replies may be waiting in sockets. Look again.
                        handle = loop.call_at(now + LOOP_LATE_S, check, now + LOOP_LATE_S)
                    elif silent_s < budget_s:
                        handle = loop.call_at(now + budget_s - silent_s, check, now + budget_s - silent_s)
                    elif rounds_left:
                        # Replies that arrived with this timer are only read by tasks that run after it: let
                        # them run before calling the store silent (a burst of requests can take a whole
                        # budget's worth of loop time before the first reply is read).
                        handle = loop.call_at(now, check, now, rounds_left - 1)
                    else:
                        deadline.reschedule(now)  # the store answered nobody for the whole budget

                handle = loop.call_at(started + budget_s, check, started + budget_s)
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

    async def get(self, entry_id: str) -> tuple[bytes | None, Stale | None]:
        """The entry's body and, if its refreshes are failing, its stale marker: one round trip, within the budget."""
        async with self._read():
            body, stale = await self.client.mget(self.keys.item(entry_id), self.keys.stale(entry_id))
        assert body is None or isinstance(body, bytes)  # the client is built without decode_responses
        return body, Stale.parse(stale)

    async def header(self, entry_id: str) -> bytes | None:
        """The start of the stored value (its header line), without the body; None if it is not stored."""
        with self._errors():
            head = await self.client.getrange(self.keys.item(entry_id), 0, HEADER_MAX_BYTES - 1)
        assert head is None or isinstance(head, bytes)
        return head or None

    async def write(
        self, entry_id: str, fetcher: str, value: bytes, due_at_ms: int, *, mode: WriteMode, max_entries: int
    ) -> int:
        """Store the value and schedule the next refresh atomically; STORED, OVER_LIMIT or GONE.

        A cold write is a reader's: it is bounded like the reader's other calls on a miss.
        """
        keys = [*self._entry_keys(entry_id), self.keys.fill(entry_id)]
        args: list[str | bytes | int] = [entry_id, value, due_at_ms, fetcher, max_entries, mode]
        async with self._within(self.fill_budget_s if mode == "cold" else COMMAND_TIMEOUT_S, write=True):
            result: int = await self._write(keys=keys, args=args)
        return result

    async def start_fill(self, entry_id: str, lock_ms: int) -> bool:
        """Take the right to fetch a missing entry across replicas; False if another replica has it."""
        async with self._fill():
            return bool(await self.client.set(self.keys.fill(entry_id), b"", nx=True, px=lock_ms))

    async def end_fill(self, entry_id: str) -> None:
        """Let go of the cold-fill lock without storing (the fetch failed)."""
        async with self._fill():
            await self.client.delete(self.keys.fill(entry_id))

    async def filling(self, entry_id: str) -> tuple[bytes | None, bool]:
        """The entry's body if stored by now, and whether a replica still holds its fill lock."""
        async with self._fill(write=False):
            body, lock = await self.client.mget(self.keys.item(entry_id), self.keys.fill(entry_id))
        assert body is None or isinstance(body, bytes)
        return body, lock is not None

    async def stale(self, entry_id: str) -> Stale | None:
        with self._errors():
            return Stale.parse(await self.client.get(self.keys.stale(entry_id)))

    async def postpone(self, entry_id: str, fetcher: str, retry_in_ms: int, stale: Stale | None) -> bool:
        """Keep the body, mark the entry stale (unless `stale` is None), try again later; False if it is gone."""
        k = self.keys
        keys = [k.item(entry_id), k.shadow(entry_id), k.due, k.stale(entry_id), k.read, k.counts]
        marker = stale.encode() if stale is not None else ""
        args: list[str | int] = [entry_id, max(1, retry_in_ms), marker, fetcher]
        with self._errors(write=True):
            kept: int = await self._postpone(keys=keys, args=args)
        return bool(kept)

    async def forget(self, entry_id: str, fetcher: str) -> bool:
        """Remove an entry and everything about it; False if it had no stored item."""
        with self._errors(write=True):
            existed = await self._forget(keys=self._entry_keys(entry_id), args=[entry_id, fetcher])
        return bool(existed)

    async def scan_entries(self, fetcher: str | None, cursor: int, count: int) -> tuple[int, list[str]]:
        """One page of stored entries, of one fetcher or all (SCAN semantics: a cursor, 0 when done).

        Keys under the namespace that are not eagercache's (not ASCII) are skipped, never decoded.
        """
        # glob-escaped: a literal '?' ends the fetcher's name, so fetcher `a` never matches entries of `ab`
        pattern = _glob_escape(self.keys.item_prefix + ("" if fetcher is None else f"{fetcher}?")) + "*"
        with self._errors():
            cursor, keys = await self.client.scan(cursor, match=pattern, count=count)
        start = len(self.keys.item_prefix)
        return int(cursor), _entry_ids(key[start:] for key in keys)

    async def describe(self, entry_ids: list[str]) -> list[tuple[bytes | None, float | None, Stale | None]]:
        """For each entry: its stored header line (not the body), its due score, its stale marker."""
        async with self.client.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.getrange(self.keys.item(entry_id), 0, HEADER_MAX_BYTES - 1)
                pipe.zscore(self.keys.due, entry_id)
                pipe.get(self.keys.stale(entry_id))
            with self._errors():
                flat = await pipe.execute()
        return [(flat[i] or None, flat[i + 1], Stale.parse(flat[i + 2])) for i in range(0, len(flat), 3)]

    def _entry_keys(self, entry_id: str) -> list[str]:
        k = self.keys
        return [k.item(entry_id), k.shadow(entry_id), k.due, k.read, k.stale(entry_id), k.counts]

    async def claim_due(self, lease_ms: int, limit: int) -> list[Claim]:
        """Claim up to `limit` entries whose refresh is due now, each for `lease_ms`."""
        args: list[str | int] = [lease_ms, limit, self.keys.item_prefix, HEADER_MAX_BYTES - 1]
        with self._errors(write=True):
            sent = time.monotonic()
            flat: list[bytes] = await self._claim_due(keys=[self.keys.due, self.keys.read], args=args)
        return self._claims(flat, sent)

    async def claim(self, entry_ids: list[str], lease_ms: int) -> list[Claim]:
        """Claim those of these entries that are due (refreshed already, or claimed elsewhere: not)."""
        args: list[str | int] = [lease_ms, self.keys.item_prefix, HEADER_MAX_BYTES - 1, *entry_ids]
        with self._errors(write=True):
            sent = time.monotonic()
            flat: list[bytes] = await self._claim_many(keys=[self.keys.due, self.keys.read], args=args)
        return self._claims(flat, sent)

    def _claims(self, flat: list[bytes], sent: float) -> list[Claim]:
        # Every claim reply starts with the server's time: a free reading for the clock.
        self.clock.observe(int(flat[0]), sent, time.monotonic())
        lease_end_ms = int(flat[1])
        return [
            Claim(flat[i].decode(), lease_end_ms, _ms(flat[i + 1]), _ms(flat[i + 2]), flat[i + 3] or None)
            for i in range(2, len(flat), 4)
        ]

    async def release(self, claims: dict[str, int]) -> int:
        """Give back claims still held (shutdown): those entries are due again at once, for any replica."""
        args = [value for pair in claims.items() for value in pair]
        with self._errors(write=True):
            released: int = await self._release(keys=[self.keys.due], args=args)
        return released

    async def touch(self, entry_ids: list[str]) -> None:
        """Record reads, in one command: only for entries that exist, and never moving a time back."""
        if entry_ids:
            now = self.clock.now_ms()
            with self._errors(write=True):
                await self.client.zadd(self.keys.read, dict.fromkeys(entry_ids, now), xx=True, gt=True)

    async def repair(self, entry_ids: list[str]) -> list[str]:
        """Put stored entries that are missing from the schedule back on it (due now); returns those."""
        if not entry_ids:
            return []
        keys = [self.keys.due, self.keys.read]
        with self._errors(write=True):
            repaired: list[bytes] = await self._repair(keys=keys, args=[self.keys.item_prefix, *entry_ids])
        return [entry_id.decode() for entry_id in repaired]

    async def scan_schedule(self, cursor: int, count: int) -> tuple[int, list[str]]:
        """One page of the schedule's entry ids (ZSCAN semantics: a cursor, 0 when done)."""
        with self._errors():
            cursor, pairs = await self.client.zscan(self.keys.due, cursor, count=count)
        return int(cursor), _entry_ids(member for member, _ in pairs)

    async def prune(self, entry_ids: list[str]) -> int:
        """Drop schedule members whose item is gone; how many were dropped (the counts are not touched)."""
        if not entry_ids:
            return 0
        k = self.keys
        args = [k.item_prefix, k.shadow_prefix, k.stale_prefix, *entry_ids]
        with self._errors(write=True):
            dropped: int = await self._prune(keys=[k.due, k.read, k.counts], args=args)
        return dropped

    async def take_sweep(self, interval_ms: int, owner: str) -> bool:
        """The right to sweep the store for this interval; one replica sweeps at a time."""
        with self._errors(write=True):
            return bool(await self.client.set(self.keys.sweep, owner, nx=True, px=interval_ms))

    async def recount(self, before: dict[str, int], found: dict[str, int]) -> int:
        """Set each fetcher's count to what a sweep `found`, where it is still what it was `before` the
        sweep (a write or removal meanwhile: left for the next sweep); how many were set."""
        args: list[str | int] = []
        for fetcher in sorted(set(before) | set(found)):
            args += [fetcher, before.get(fetcher, 0), found.get(fetcher, 0)]
        if not args:
            return 0
        with self._errors(write=True):
            recounted: int = await self._recount(keys=[self.keys.counts], args=args)
        return recounted

    async def next_due_ms(self) -> int | None:
        """When the earliest scheduled refresh falls due (ms since the epoch), None if nothing is scheduled."""
        with self._errors():
            first = await self.client.zrange(self.keys.due, 0, 0, withscores=True)
        return int(first[0][1]) if first else None

    async def entry_counts(self) -> dict[str, int]:
        with self._errors():
            counts = await self.client.hgetall(self.keys.counts)
        return {_text(name): int(n) for name, n in counts.items()}

    async def entry_count(self, fetcher: str) -> int:
        with self._errors():
            return int(await self.client.hget(self.keys.counts, fetcher) or 0)

    async def eviction_policy(self) -> str | None:
        """The server's maxmemory-policy, or None where CONFIG is not allowed (or on memory://)."""
        if self.is_memory:
            return None
        try:
            with self._errors():
                found = await self.client.config_get("maxmemory-policy")
        except StoreUnavailable:
            return None
        return _text(found.get("maxmemory-policy")) or None


def _entry_ids(raw: Iterable[object]) -> list[str]:
    """The entry ids among these (key name tails, schedule members); anything not eagercache's is skipped."""
    ids = []
    for value in raw:
        assert isinstance(value, bytes)  # the client is built without decode_responses
        if (entry_id := entry_id_of(value)) is not None:
            ids.append(entry_id)
    return ids


def _glob_escape(text: str) -> str:
    """Escape Redis glob characters (KEYS/SCAN MATCH)."""
    return "".join("\\" + c if c in "\\*?[]^" else c for c in text)


def _ms(raw: bytes | str) -> int | None:
    value = int(float(raw))
    return None if value < 0 else value


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")
