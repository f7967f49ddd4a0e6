"""The watch hub: one per process, it keeps the entries watched here and fans each change out to their watchers.

Changes arrive on the change channel (changes.py), from this process and every other. A change to an
entry watched here is read from the store once, diffed once (patches.py) and encoded once as a
Server-Sent Event, which goes into the buffer of each of its watchers: the work is per change, not per
watcher. A watcher's buffer holds BUFFER_EVENTS events; a watcher whose buffer is full (its client reads
too slowly) drops its backlog and is sent a snapshot of the newest version when it catches up, so a slow
client never delays the others and never holds more than that.

Every CHECK_INTERVAL_S the hub reads the header and stale marker of the watched entries that may have
changed unannounced: an entry that turns stale or fresh without a change (a refresh overdue by the newest
header the hub has seen; unchanged data after failures, while it is stale) and one whose refill failed.
It reads every watched entry whenever the subscription is (re)confirmed, when a process says it lost
announcements (changes.py's `sync`), every interval while this process's own subscription or
announcements fail (a Redis user without the channel's rights), and at least each SWEEP_INTERVAL_S: a
change whose announcement was lost otherwise is found then. (Reading every entry each second was 27 % of
the watched process's CPU with 1,000 entries in bench section 8.) An entry that was removed (an admin's
invalidation) is filled again at once, as a cold read, and its watchers get a snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Literal, Protocol

import msgspec

from . import patches
from .changes import Announced, ChangeChannel
from .engine import Engine, Read
from .errors import DataTooStale, EagerCacheError, ShuttingDown, StoreUnavailable, TooManyWatchers
from .fetchers import Fetcher
from .item import Entry, parse_header
from .logs import Throttle
from .settings import Settings
from .store import Store
from .supervise import LoopFactory, Outage, Supervisor, check_cancelled

log = logging.getLogger(__name__)

# Events a watcher's buffer holds (references to events shared by every watcher of the entry).
BUFFER_EVENTS = 16
# The headers and stale markers of the watched entries that may have changed unannounced are read this often.
CHECK_INTERVAL_S = 1.0
# Every watched entry's are read at least this often: an announcement lost unnoticed costs this long.
SWEEP_INTERVAL_S = 10.0
CHECK_BATCH = 100  # entries per pipeline: its replies are parsed in one go, holding the loop (~10 us each)
# A watched entry that was removed and could not be filled again is tried again this much later (at most).
REFILL_RETRY_MAX_S = 10.0
# What a client is told to wait before asking again when this process has max_watchers streams open.
FULL_RETRY_AFTER_S = 5
# ... or when it is shutting down (another replica takes the watch).
SHUTDOWN_RETRY_AFTER_S = 1

EventKind = Literal["snapshot", "patch", "status"]
State = Literal["fresh", "stale"]


class Event(msgspec.Struct, frozen=True):
    """One encoded Server-Sent Event; `written_ms` is when the change it carries was written (store clock)."""

    kind: EventKind
    chunk: bytes
    written_ms: int | None = None


def snapshot_chunk(event_id: str, body: bytes) -> bytes:
    return b"id: " + event_id.encode() + b"\nevent: snapshot\ndata: " + body + b"\n\n"


def patch_chunk(event_id: str, data: bytes) -> bytes:
    return b"id: " + event_id.encode() + b"\nevent: patch\ndata: " + data + b"\n\n"


STATUS: dict[State, Event] = {
    "fresh": Event("status", b'event: status\ndata: {"state":"fresh"}\n\n'),
    "stale": Event("status", b'event: status\ndata: {"state":"stale"}\n\n'),
}


class _Version:
    """One version of an entry, as its watchers get it: its event id (the ETag header's value) and snapshot."""

    __slots__ = ("_snapshot", "entry", "event_id")

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.event_id = f'"{entry.etag}"'
        self._snapshot: bytes | None = None

    def snapshot(self, written_ms: int | None) -> Event:
        if self._snapshot is None:  # built once per version, when a watcher first needs it
            self._snapshot = snapshot_chunk(self.event_id, self.entry.body)
        return Event("snapshot", self._snapshot, written_ms)


class _Watched:
    """An entry watched in this process: its current version and state, and its watchers."""

    __slots__ = (
        "again",
        "entry_id",
        "fetcher",
        "refill",
        "retry_at",
        "seen",
        "state",
        "updating",
        "version",
        "watchers",
    )

    def __init__(self, entry_id: str, fetcher: Fetcher, entry: Entry, state: State) -> None:
        self.entry_id = entry_id
        self.fetcher = fetcher
        self.version = _Version(entry)
        self.seen = entry  # the newest header read of it (its due time: when it would turn stale unannounced)
        self.state: State = state
        self.watchers: set[Watcher] = set()
        self.updating: asyncio.Task[None] | None = None  # the one read of a new version under way
        self.again = False  # another change was heard while reading: read once more
        self.refill = False  # the entry was removed: fill it again, and send every watcher a snapshot
        self.retry_at = 0.0  # time.monotonic() before which a failed refill is not tried again

    def saw(self, entry: Entry) -> None:
        if entry.due_ms >= self.seen.due_ms:
            self.seen = entry


class Outlet(Protocol):
    """Where a watcher's events go: its stream (stream.py), which takes them with `Watcher.take()`."""

    def ready(self) -> None:
        """Events are waiting: take and send what can be sent now (called by the hub, never blocks)."""

    def offer(self, event: Event) -> bool:
        """Send this event now, if nothing is waiting to be sent before it; False: it must be buffered."""

    def close(self) -> None:
        """The hub ends the stream (shutdown)."""


class Watcher:
    """One open stream: a bounded buffer of events, and what its client has been sent."""

    __slots__ = ("_buffer", "behind", "closed", "etag", "first", "outlet", "state", "watched")

    def __init__(self, watched: _Watched, resumed: bool) -> None:
        self.watched = watched
        self._buffer: deque[Event] = deque()
        self.outlet: Outlet | None = None  # set once its response has started
        self.behind = not resumed  # a snapshot of the newest version is due, instead of the buffer
        self.first = True  # its first snapshot is no change's delivery
        self.closed = False
        self.etag = watched.version.entry.etag  # the version the client has once it has read the buffer
        self.state: State = "fresh"  # the state the client was last told (fresh unless told otherwise)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def attach(self, outlet: Outlet) -> None:
        """Send this watcher's events to `outlet` from now on, starting with what is due."""
        self.outlet = outlet
        if self.closed:
            outlet.close()
        else:
            outlet.ready()

    def take(self) -> Event | None:
        """The next event to send, or None: nothing is due until the hub pushes more (or the stream is over)."""
        if self.closed:
            return None
        watched = self.watched
        if self.behind:
            self.behind = False
            self._buffer.clear()
            version = watched.version
            self.etag = version.entry.etag
            written = None if self.first else version.entry.last_modified_ms
            self.first = False
            return version.snapshot(written)
        self.first = False
        if self._buffer:
            return self._buffer.popleft()
        if self.state != watched.state:
            self.state = watched.state
            return STATUS[self.state]
        return None

    def push(self, event: Event, base: str | None, etag: str) -> bool:
        """Buffer an event that takes the client from version `base` (None: any, a snapshot) to `etag`, and
        tell the outlet. False if the watcher fell behind here (its buffer is full): it gets a snapshot
        instead."""
        if self.behind:
            return True  # its snapshot, still to come, is of the newest version: this one or later
        if base is not None and base != self.etag:  # it has another version than the patch's base
            self.behind = True
            self.wake()
            return True
        if not self._buffer and (outlet := self.outlet) is not None and outlet.offer(event):
            self.first = False  # the fan-out's common case: straight to the socket, no buffer, no take()
            self.etag = etag
            return True
        if len(self._buffer) >= BUFFER_EVENTS:
            self.behind = True
            self._buffer.clear()  # let go of the backlog now, not once the stalled send is through
            self.wake()
            return False
        self._buffer.append(event)
        self.etag = etag
        self.wake()
        return True

    def wake(self) -> None:
        if self.outlet is not None:
            self.outlet.ready()

    def close(self) -> None:
        self.closed = True
        if self.outlet is not None:
            self.outlet.close()


class WatchHub:
    """The watched entries of this process and their watchers; started and stopped by the app's lifespan."""

    def __init__(self, engine: Engine, store: Store, settings: Settings) -> None:
        self.engine = engine
        self.store = store
        self.metrics = engine.metrics
        self.max_watchers = settings.max_watchers
        self.check_interval_s = CHECK_INTERVAL_S
        self.entries: dict[str, _Watched] = {}
        self.count = 0  # open watchers, and those being opened
        self.closing = False
        self.channel = ChangeChannel(store, self.metrics)
        self.supervisor = Supervisor(self.metrics)
        self._check_now = asyncio.Event()
        self._errors = Throttle(log, 60.0)
        self._following: set[asyncio.Task[None]] = set()  # every entry's read of a new version under way
        self._loops: list[tuple[str, LoopFactory]] = []  # the streams' own (stream.py: pings, the host's stop)
        engine.watched = self.entries  # watched entries are read by definition (never idle)
        engine.on_change(self.channel.announce)

    async def start(self) -> None:
        self.supervisor.start("watch publish", self.channel.publish)
        self.supervisor.start("watch changes", lambda: self.channel.listen(self._heard, self._check_now.set))
        self.supervisor.start("watch check", self._check_every)
        for name, loop in self._loops:
            self.supervisor.start(name, loop)

    def run_also(self, name: str, loop: LoopFactory) -> None:
        """Supervise another loop from start() to stop() (the streams' timer)."""
        self._loops.append((name, loop))

    def close(self) -> None:
        """End every stream (at SIGTERM: they must not hold the server's shutdown); refuse new ones."""
        self.closing = True
        for watched in self.entries.values():
            for watcher in watched.watchers:
                watcher.close()

    async def stop(self) -> None:
        self.close()
        await self.supervisor.stop()
        following = list(self._following)
        for task in following:
            task.cancel()
        await asyncio.gather(*following, return_exceptions=True)

    def problems(self) -> list[str]:
        """Its loops that are down, for /readyz."""
        return [f"background loop {reason}" for reason in self.supervisor.down()]

    # -- watchers ------------------------------------------------------------------------------------

    async def open(self, fetcher_name: str, query: bytes | str, last_event_id: str | None) -> Watcher:
        """A new watcher of the entry a /watch request names, read (or filled) first. Raises what a /data
        read of it would, and TooManyWatchers or ShuttingDown; `last_event_id` equal to the entry's
        current event id skips the snapshot."""
        self.engine.registry.call(fetcher_name, query)  # bad input is refused before anything else
        if self.closing:
            raise _shutting_down()
        if self.count >= self.max_watchers:
            raise TooManyWatchers(
                f"this process has {self.max_watchers} watchers, its --max-watchers",
                headers={"Retry-After": str(FULL_RETRY_AFTER_S)},
            )
        self._count(+1)
        try:
            watched = await self._watched(await self.engine.read(fetcher_name, query))
            if self.closing:  # the shutdown began while the entry was read
                raise _shutting_down()
        except BaseException:
            self._count(-1)
            raise
        watcher = Watcher(watched, resumed=last_event_id == watched.version.event_id)
        watched.watchers.add(watcher)
        return watcher

    async def _watched(self, read: Read) -> _Watched:
        """The hub's record of the entry just read, made or brought up to date."""
        state: State = "stale" if read.cache == "STALE" else "fresh"
        watched = self.entries.get(read.entry_id)
        if watched is None:
            watched = self.entries[read.entry_id] = _Watched(read.entry_id, read.fetcher, read.entry, state)
            return watched
        current = watched.version.entry
        if read.entry.etag != current.etag:
            # A version the hub has not heard of yet (or an older one, from the near cache): the hub reads
            # the store's before this watcher gets its snapshot (not cancelled if this client leaves).
            self._update(watched)
            if (following := watched.updating) is not None:
                await asyncio.wait({following})
            # Its last watcher may have left meanwhile, and another request made a new record.
            return self.entries.setdefault(read.entry_id, watched)
        if read.entry.last_retrieved_ms > current.last_retrieved_ms:
            watched.version = _Version(read.entry)  # the same data, fetched since: /data's body now
        watched.saw(read.entry)
        self._set_state(watched, state)
        return watched

    def leave(self, watcher: Watcher) -> None:
        """The watcher's stream is over."""
        watcher.closed = True
        watched = watcher.watched
        watched.watchers.discard(watcher)
        self._count(-1)
        if not watched.watchers and self.entries.get(watched.entry_id) is watched:
            del self.entries[watched.entry_id]

    def _count(self, change: int) -> None:
        self.count += change
        self.metrics.watchers.set(self.count)

    # -- changes -------------------------------------------------------------------------------------

    def _heard(self, changes: list[Announced]) -> None:
        for change in changes:
            if change.change == "sync":  # its announcing process lost some: compare every entry now
                self._check_now.set()
                continue
            watched = self.entries.get(change.entry_id)
            if watched is None:
                continue
            if change.change == "data":
                if change.etag != watched.version.entry.etag:
                    self._update(watched)
            elif change.change == "stale":
                self._set_state(watched, "stale")
            else:  # gone
                watched.refill = True
                self._update(watched)

    def _update(self, watched: _Watched) -> None:
        """Read the entry's version in the store (once at a time per entry) and send it to its watchers."""
        if watched.updating is not None:
            watched.again = True
            return
        task = asyncio.create_task(self._follow(watched), name=f"watch {watched.entry_id}")
        watched.updating = task
        self._following.add(task)
        task.add_done_callback(self._following.discard)

    async def _follow(self, watched: _Watched) -> None:
        try:
            while self.entries.get(watched.entry_id) is watched:
                watched.again = False
                refill, watched.refill = watched.refill, False
                try:
                    read = await self.engine.reread(watched.entry_id)
                except DataTooStale:
                    self._set_state(watched, "stale")
                except Exception as exc:  # a refill whose fetch failed, the store: tried again by the check
                    self.metrics.background_errors.labels("watch-read").inc()
                    if isinstance(exc, EagerCacheError):
                        self._errors.warning("watched entry could not be read", "read", {"error": exc.detail})
                    else:
                        log.exception("watched entry could not be read", extra={"entry": watched.entry_id})
                    if refill:
                        watched.refill = True
                        watched.retry_at = time.monotonic() + min(watched.fetcher.ttl, REFILL_RETRY_MAX_S)
                        self._set_state(watched, "stale")
                else:
                    await self._advance(watched, read.entry, refill)
                    self._set_state(watched, "stale" if read.cache == "STALE" else "fresh")
                if not watched.again:
                    return
        finally:
            watched.updating = None

    async def _advance(self, watched: _Watched, entry: Entry, snapshot: bool) -> None:
        """Make `entry` the watched version, and send it: a patch from the one before, or a snapshot."""
        old = watched.version
        watched.saw(entry)
        if entry.etag == old.entry.etag and not snapshot:
            if entry.last_retrieved_ms > old.entry.last_retrieved_ms:
                watched.version = _Version(entry)  # same data, fetched since: new watchers get this body
            return
        new = _Version(entry)
        data = None if snapshot else await _diff(old, new)
        watched.version = new
        written = entry.last_modified_ms
        if data is None:
            event, base = new.snapshot(written), None
        else:
            event, base = Event("patch", patch_chunk(new.event_id, data), written), old.entry.etag
        for watcher in watched.watchers:
            if not watcher.push(event, base, entry.etag):
                self.metrics.watch_slow.labels("snapshot").inc()

    def _set_state(self, watched: _Watched, state: State) -> None:
        if watched.state != state:
            watched.state = state
            for watcher in watched.watchers:
                watcher.wake()

    # -- the check -----------------------------------------------------------------------------------

    async def _check_every(self) -> None:
        """Every check interval, compare the watched entries that may have changed unannounced with the store;
        all of them when a sweep is due, or at once when asked (_check_now). A supervised loop."""
        outage = Outage("watch check")
        sweep_at = 0.0
        while True:
            check_cancelled()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.check_interval_s):
                    await self._check_now.wait()
            now = time.monotonic()
            channel = self.channel
            sweep = self._check_now.is_set() or now >= sweep_at or not channel.subscribed or channel.lost
            self._check_now.clear()
            if sweep:
                sweep_at = now + SWEEP_INTERVAL_S
            watched = [w for w in self.entries.values() if sweep or self._suspect(w)]
            try:
                for i in range(0, len(watched), CHECK_BATCH):
                    await self._check(watched[i : i + CHECK_BATCH])
            except StoreUnavailable as exc:
                self.metrics.background_errors.labels("watch-check").inc()
                await asyncio.sleep(outage.failed(exc.detail))
            else:
                outage.over()

    def _suspect(self, watched: _Watched) -> bool:
        """Whether the entry may have changed with no announcement: it is stale (unchanged data after failures
        turns it fresh), its refill failed, or the newest header seen of it is overdue (a refresh of
        unchanged data moves its due time and announces nothing; no refresh at all makes it stale)."""
        return watched.state == "stale" or watched.refill or self.engine.is_stale(watched.fetcher, watched.seen, None)

    async def _check(self, batch: list[_Watched]) -> None:
        described = await self.store.describe([w.entry_id for w in batch])
        now = time.monotonic()
        for watched, (header, _, stale) in zip(batch, described, strict=True):
            if self.entries.get(watched.entry_id) is not watched:
                continue  # nobody watches it any more
            entry = parse_header(header)
            if entry is None:  # removed (or replaced by a value eagercache did not write)
                if now >= watched.retry_at:
                    watched.refill = True
                    self._update(watched)
                continue
            watched.saw(entry)
            if entry.etag != watched.version.entry.etag:
                self._update(watched)
            self._set_state(watched, "stale" if self.engine.is_stale(watched.fetcher, entry, stale) else "fresh")


def _shutting_down() -> ShuttingDown:
    return ShuttingDown(
        "the server is shutting down; watch again", headers={"Retry-After": str(SHUTDOWN_RETRY_AFTER_S)}
    )


async def _diff(old: _Version, new: _Version) -> bytes | None:
    args = (old.event_id, old.entry.body, new.entry.body)
    if max(len(old.entry.body), len(new.entry.body)) > patches.PATCH_IN_THREAD_BYTES:
        return await asyncio.to_thread(patches.diff, *args)
    return patches.diff(*args)
