"""`memory://`: the store as plain Python structures in this process, with no Redis, no Lua and no round trip.

The same interface as store.Store (a subclass: every caller keeps its one type), and operation by operation
the semantics of the Lua script it stands in for (scripts.py: each script's comment is the spec). Each
operation runs to its end without an `await` in the middle, so it is as atomic as a script; a read returns
without suspending (the coroutine never awaits), and no task or future is made per call.

Per entry one `_Record` (stored value, schedule score, last read, stale marker) in one dict; per bucket the
schedule in slots of 2**SLOT_SHIFT ms (a list of entry ids per slot, a heap of the slot numbers: no object
per entry, a list slot of 8 B where a heap of `(score, id)` pairs cost 72 B), a slot sorted by score when
claims reach it and ids left behind (the score moved since) skipped then; the entry counts; the tag index
as sets. The store's clock is this process's (one process, one clock). Change announcements go through
an in-process bus (localbus.py).

What the Redis stores guard against cannot happen here, so it is not paid for: nothing else writes the
entries (no foreign keys, no item deleted by hand or evicted while its schedule member stays), so an entry
is stored exactly while it has a record, its schedule score and count are kept by the same operation, and
there is no sweep (no orphans to prune, no count to correct), no fill lock across replicas, no shadow key.
`memory://fakeredis` is the previous memory store, store.Store on fakeredis running the real scripts: kept
as the reference the native store is checked against (tests/test_memstore.py).
"""

from __future__ import annotations

import asyncio
import heapq
import math
import re
from collections.abc import AsyncGenerator, Iterable, Sequence
from itertools import islice
from typing import Any, Literal

import msgspec

from .errors import StoreUnavailable
from .item import encode_tags
from .keys import Keys
from .localbus import LocalBus
from .store import (
    GONE,
    HEADER_MAX_BYTES,
    NOT_OURS,
    OVER_LIMIT,
    STORED,
    TOUCH_CHUNK,
    Claim,
    ClaimRound,
    RefreshWrite,
    Stale,
    Store,
    WriteMode,
    write_each,
)
from .topology import MEMORY_URL, Topology

__all__ = ["FAKEREDIS_URL", "MemoryStore", "build_store"]

# The previous memory store (store.Store on fakeredis, the Lua scripts run by lupa).
FAKEREDIS_URL = f"{MEMORY_URL}fakeredis"
# A bucket's schedule is rebuilt from the records once its slots hold this many times more ids than entries
# (plus a constant): ids left behind by moved scores are otherwise only dropped when their slot comes up.
HEAP_SLACK = 2
HEAP_SLACK_PAIRS = 1024
# The schedule's slots: 2**SLOT_SHIFT ms (128 ms). A claim round sorts the slot it reaches, so a wider slot
# costs more per round when many entries are due; a narrower one costs a list, a dict slot and a heap slot
# (~150 B) per slot in use: at most ~1 per 10 entries for dues spread over 10 s per 1,000 entries.
SLOT_SHIFT = 7
# Entry ids handed out per step of a listing or a scan before the loop gets a turn.
YIELD_EVERY = 1000
# A header's tags, as the scripts find them (scripts.py, tags_of).
_TAGS = re.compile(rb" #([^ \n]*)")


class _Record(msgspec.Struct, gc=False):
    """One stored entry: its value (header line, body), its schedule score (a due time or a lease end; ms),
    its last read (ms) and its stale marker. Mutated in place (a read recorded, a claim made: nothing
    allocated), and never walked by the garbage collector: its fields are atomic (Stale is a gc=False
    Struct too), so it cannot be part of a cycle. As a __slots__ object, every full collection walked
    each record: 100-130 ms per collection at 100,000 entries, the p99 of reads once collections ran."""

    value: bytes
    due: int
    read: int
    stale: Stale | None = None


class _Bucket:
    """What the Redis stores keep per bucket: the schedule, the entry counts per fetcher, the tag index."""

    __slots__ = ("counts", "ids", "index", "order", "pairs", "size", "sorted", "tags")

    def __init__(self, index: int) -> None:
        self.index = index
        self.ids: dict[int, list[str]] = {}  # slot number (score >> SLOT_SHIFT) -> entries scheduled in it
        self.order: list[int] = []  # a heap of the slot numbers in `ids`
        self.sorted: set[int] = set()  # slots whose ids are live, once each, by (score, id): nothing added since
        self.counts: dict[str, int] = {}
        self.tags: dict[bytes, set[str]] = {}
        self.size = 0  # entries stored in this bucket
        self.pairs = 0  # ids in the slots, those left behind included


def build_store(url: str, **options: Any) -> Store:
    """The store a URL names: the native memory store for `memory://`, else store.Store (Redis, fakeredis)."""
    if url == MEMORY_URL:
        return MemoryStore(url, **options)
    return Store(url, **options)


class MemoryStore(Store):
    """The store of one process, in its memory (see the module's docstring)."""

    def __init__(self, url: str = MEMORY_URL, **options: Any) -> None:
        self._bus = LocalBus()
        super().__init__(url, **options)
        self._records: dict[str, _Record] = {}
        self._buckets = [_Bucket(b.index) for b in self.keys.buckets]
        self._totals_here: dict[str, int] = {}
        self._fills: dict[str, int] = {}  # entry -> lock end (ms): fill locks (engine.py takes none on memory://)
        self._budgets: dict[str, tuple[float, int, int]] = {}  # fetcher -> tokens, at, gone at (ms)
        self._last_now = 0

    def _memory_topology(self) -> Topology:
        return Topology(self.url, self._bus, "memory")

    def _use(self, topology: Topology) -> None:
        self.topology = topology
        self.client = topology.client

    async def open(self) -> None:
        return None

    async def prepare(self) -> None:
        """Settle the layout: the bucket count asked for (one by default); nothing else was written before."""
        if not self._records:
            self.keys = Keys(self.keys.namespace, self.requested_buckets or 1)
            self._buckets = [_Bucket(b.index) for b in self.keys.buckets]

    async def check_layout(self) -> None:
        return None

    @property
    def db(self) -> int:
        return 0

    async def ping(self, timeout_s: float = 0.0) -> None:
        return None

    async def sync_clock(self) -> None:
        return None  # the store's clock is this process's

    async def aclose(self) -> None:
        await self._bus.aclose()

    def _now(self) -> int:
        # One int object per ms, shared by every record written in it (read times): 32 B less per entry.
        now = self.clock.now_ms()
        if now != self._last_now:
            self._last_now = now
        return self._last_now

    def _bucket(self, entry_id: str) -> _Bucket:
        buckets = self._buckets
        return buckets[0] if len(buckets) == 1 else buckets[self.keys.bucket_of(entry_id).index]

    def _schedule(self, bucket: _Bucket, entry_id: str, record: _Record, score: int) -> None:
        record.due = score
        slot = score >> SLOT_SHIFT
        ids = bucket.ids.get(slot)
        if ids is None:
            bucket.ids[slot] = [entry_id]
            heapq.heappush(bucket.order, slot)
        else:
            ids.append(entry_id)
            bucket.sorted.discard(slot)
        bucket.pairs += 1
        if bucket.pairs > HEAP_SLACK * bucket.size + HEAP_SLACK_PAIRS:
            self._rebuild(bucket)

    def _rebuild(self, bucket: _Bucket) -> None:
        slots: dict[int, list[str]] = {}
        for entry_id in self._ids_of(bucket.index):
            slots.setdefault(self._records[entry_id].due >> SLOT_SHIFT, []).append(entry_id)
        bucket.ids, bucket.order, bucket.sorted = slots, list(slots), set()
        heapq.heapify(bucket.order)
        bucket.pairs = bucket.size

    def _first_slot(self, bucket: _Bucket) -> list[str] | None:
        """The earliest slot's entries by (score, id), as Redis ranges a sorted set, after dropping empty slots;
        an id at its head is one still scheduled there. None: nothing is scheduled."""
        records = self._records
        while bucket.order:
            slot = bucket.order[0]
            ids = bucket.ids[slot]
            if slot not in bucket.sorted:
                scores = {i: r.due for i in ids if (r := records.get(i)) is not None and r.due >> SLOT_SHIFT == slot}
                bucket.pairs -= len(ids) - len(scores)
                ids = bucket.ids[slot] = sorted(scores, key=lambda i: (scores[i], i))
                bucket.sorted.add(slot)
            left = 0  # ids that moved or went since the slot was sorted
            while left < len(ids) and ((r := records.get(ids[left])) is None or r.due >> SLOT_SHIFT != slot):
                left += 1
            del ids[:left]
            bucket.pairs -= left
            if ids:
                return ids
            del bucket.ids[slot]
            heapq.heappop(bucket.order)
            bucket.sorted.discard(slot)
        return None

    def _add_count(self, bucket: _Bucket, fetcher: str, change: int) -> None:
        bucket.counts[fetcher] = bucket.counts.get(fetcher, 0) + change
        self._totals_here[fetcher] = self._totals_here.get(fetcher, 0) + change
        bucket.size += change

    # -- reads ---------------------------------------------------------------------------------------

    async def get(self, entry_id: str) -> tuple[bytes | None, Stale | None]:
        record = self._records.get(entry_id)
        if record is None:
            return None, None
        return record.value, record.stale

    async def header(self, entry_id: str) -> bytes | None:
        record = self._records.get(entry_id)
        return None if record is None else _header_line(record.value)

    async def stale(self, entry_id: str) -> Stale | None:
        record = self._records.get(entry_id)
        return None if record is None else record.stale

    async def describe(self, entry_ids: list[str]) -> list[tuple[bytes | None, float | None, Stale | None]]:
        described: list[tuple[bytes | None, float | None, Stale | None]] = []
        for entry_id in entry_ids:
            record = self._records.get(entry_id)
            if record is None:
                described.append((None, None, None))
            else:
                described.append((_header_line(record.value), float(record.due), record.stale))
        return described

    # -- writes (scripts.WRITE, POSTPONE, FORGET, TARGET) --------------------------------------------

    async def write(
        self,
        entry_id: str,
        fetcher: str,
        value: bytes,
        due_at_ms: int,
        *,
        mode: WriteMode,
        max_entries: int,
        lease_end_ms: int | None = None,
    ) -> int:
        record = self._records.get(entry_id)
        if lease_end_ms is not None and record is not None:
            if record.due == due_at_ms and _header_line(record.value) == _header_line(value):
                return STORED  # this very write was applied already (scripts.WRITE: not the score alone)
            if record.due != lease_end_ms:
                return NOT_OURS
        bucket = self._bucket(entry_id)
        now = self._now()
        if record is None:
            if mode != "cold":
                return GONE
            if self._totals_here.get(fetcher, 0) >= max_entries:
                self._fills.pop(entry_id, None)
                return OVER_LIMIT
            record = self._records[entry_id] = _Record(value, due_at_ms, now)
            self._add_count(bucket, fetcher, +1)
            self._index(bucket, entry_id, b"", _tags_of(value))
        else:
            self._index(bucket, entry_id, _tags_of(record.value), _tags_of(value))
            record.value = value
            record.stale = None
            if mode == "cold":
                record.read = now
        self._schedule(bucket, entry_id, record, due_at_ms)
        self._fills.pop(entry_id, None)
        return STORED

    async def write_refreshes(self, writes: Sequence[RefreshWrite]) -> list[int | StoreUnavailable]:
        return await write_each(self.write, writes)  # no round trip to share

    def _index(self, bucket: _Bucket, entry_id: str, old: bytes, new: bytes) -> None:
        """The tag index follows the entry's tags: it leaves the sets of `old` tags not in `new`, joins the others."""
        if old == new:
            return
        old_tags, new_tags = set(old.split(b",")) - {b""}, set(new.split(b",")) - {b""}
        for tag in old_tags - new_tags:
            members = bucket.tags.get(tag)
            if members is not None:
                members.discard(entry_id)
                if not members:
                    del bucket.tags[tag]
        for tag in new_tags - old_tags:
            bucket.tags.setdefault(tag, set()).add(entry_id)

    async def postpone(self, entry_id: str, fetcher: str, retry_in_ms: int, stale: Stale | None) -> bool:
        record = self._records.get(entry_id)
        if record is None:
            return False
        if stale is not None:
            record.stale = stale
        self._schedule(self._bucket(entry_id), entry_id, record, self._now() + max(1, retry_in_ms))
        return True

    async def forget(self, entry_id: str, fetcher: str) -> bool:
        return self._remove(entry_id, fetcher)

    def _remove(self, entry_id: str, fetcher: str) -> bool:
        record = self._records.pop(entry_id, None)
        if record is None:
            return False
        bucket = self._bucket(entry_id)
        self._index(bucket, entry_id, _tags_of(record.value), b"")
        self._add_count(bucket, fetcher, -1)
        return True  # its id in the schedule is skipped when its slot comes up

    async def target(
        self, bucket_index: int, entry_ids: list[str], action: Literal["forget", "refresh"], tag: str | None
    ) -> list[str]:
        encoded = b"" if tag is None else encode_tags([tag])
        bucket = self._buckets[bucket_index]
        now = self._now()
        acted = []
        for entry_id in entry_ids:
            record = self._records.get(entry_id)
            if record is not None and len(self._buckets) > 1 and self._bucket(entry_id) is not bucket:
                record = None  # not this bucket's: as the script, which looks for it under this bucket's keys
            if record is None or (encoded and encoded not in _tags_of(record.value).split(b",")):
                if encoded and (members := bucket.tags.get(encoded)) is not None:
                    members.discard(entry_id)
                    if not members:
                        del bucket.tags[encoded]
            elif action == "forget":
                self._remove(entry_id, entry_id.partition("?")[0])
                acted.append(entry_id)
            else:
                self._schedule(bucket, entry_id, record, now)
                acted.append(entry_id)
        return acted

    async def tagged(self, tag: str, count: int) -> AsyncGenerator[tuple[int, list[str]], None]:
        encoded = encode_tags([tag])
        for bucket in self._buckets:
            members = list(bucket.tags.get(encoded, ()))
            for start in range(0, len(members), count):
                yield bucket.index, members[start : start + count]

    # -- the schedule (scripts.CLAIM_DUE, CLAIM_MANY, RELEASE, REPAIR) --------------------------------

    async def claim_due(self, buckets: Sequence[int], lease_ms: int, limit: int) -> ClaimRound:
        now = self._now()
        lease_end = now + lease_ms
        round_ = ClaimRound()
        records = self._records
        for index in buckets:
            bucket = self._buckets[index]
            # A claimed entry's score is its lease end before it joins that slot: the slot is not in order.
            bucket.sorted.discard(lease_end >> SLOT_SHIFT)
            claimed: list[tuple[str, _Record, int]] = []
            while len(claimed) < limit and (ids := self._first_slot(bucket)) is not None:
                taken = 0
                for entry_id in ids:
                    record = records.get(entry_id)
                    if record is None or record.due >> SLOT_SHIFT != bucket.order[0]:
                        taken += 1  # gone, or moved since the slot was sorted
                        continue
                    if record.due > now or len(claimed) >= limit:
                        break
                    claimed.append((entry_id, record, record.due))
                    record.due = lease_end  # scheduled at its lease end below: not claimed twice
                    taken += 1
                del ids[:taken]
                bucket.pairs -= taken
                if ids:
                    break  # the rest are not due yet (or the limit is reached)
            for entry_id, record, due in claimed:
                self._schedule(bucket, entry_id, record, lease_end)
                round_.claims.append(Claim(entry_id, lease_end, record.read, due, _header_line(record.value)))
            first = self._first_slot(bucket)
            round_.next_due_in[index] = None if first is None else records[first[0]].due - now
            round_.full[index] = len(claimed) >= limit
        return round_

    async def claim(self, entry_ids: list[str], lease_ms: int) -> ClaimRound:
        now = self._now()
        lease_end = now + lease_ms
        round_ = ClaimRound()
        for entry_id in entry_ids:
            record = self._records.get(entry_id)
            if record is not None and record.due <= now:
                due = record.due
                self._schedule(self._bucket(entry_id), entry_id, record, lease_end)
                round_.claims.append(Claim(entry_id, lease_end, record.read, due, _header_line(record.value)))
        return round_

    async def release(self, claims: dict[str, int], delays_ms: dict[str, int] | None = None) -> int:
        delays_ms = delays_ms or {}
        now = self._now()
        released = 0
        for entry_id, lease_end in claims.items():
            record = self._records.get(entry_id)
            if record is not None and record.due == lease_end:
                self._schedule(self._bucket(entry_id), entry_id, record, now + delays_ms.get(entry_id, 0))
                released += 1
        return released

    async def repair(self, entry_ids: list[str]) -> list[str]:
        return []  # an entry is on the schedule exactly while it is stored

    async def touch(self, entry_ids: Iterable[str]) -> None:
        """Record reads (never moving a time back), TOUCH_CHUNK entries at a time between the loop's other work."""
        now = self._now()
        records = self._records
        ids = iter(entry_ids)
        while chunk := list(islice(ids, TOUCH_CHUNK)):
            for entry_id in chunk:
                record = records.get(entry_id)
                if record is not None and record.read < now:
                    record.read = now
            if len(chunk) == TOUCH_CHUNK:
                await asyncio.sleep(0)
                now = self._now()

    # -- listings and counts -------------------------------------------------------------------------

    async def list_entries(self, fetcher: str, cursor: str, count: int) -> tuple[str, list[str]]:
        """One page of a fetcher's entries in the order they were stored; the cursor is `<bucket>.<position>`
        as on Redis. An entry removed meanwhile moves the later ones up by one: a page may then miss one
        (SCAN could list one twice instead)."""
        bucket_index, _, position = cursor.partition(".")
        try:
            b, at = (int(bucket_index), int(position)) if cursor not in ("", "0") else (0, 0)
        except ValueError:
            raise ValueError(f"cursor {cursor!r} is not one this API returned") from None
        if not 0 <= b < len(self._buckets) or at < 0:
            raise ValueError(f"cursor {cursor!r} is not one this API returned")
        prefix = f"{fetcher}?"
        found: list[str] = []
        while b < len(self._buckets) and len(found) < count:
            ids = self._ids_of(b)
            for entry_id in islice(ids, at, None):
                at += 1
                if entry_id.startswith(prefix):
                    found.append(entry_id)
                    if len(found) >= count:
                        break
            else:
                b, at = b + 1, 0
        return ("" if b >= len(self._buckets) else f"{b}.{at}"), found

    def _ids_of(self, bucket: int) -> Iterable[str]:
        if len(self._buckets) == 1:
            return self._records
        return (i for i in self._records if self._bucket(i).index == bucket)

    async def stored_entries(self, fetcher: str | None, count: int) -> AsyncGenerator[list[str], None]:
        prefix = "" if fetcher is None else f"{fetcher}?"
        ids = list(self._records)  # as they are now; each batch is filtered between the loop's other work
        for start in range(0, len(ids), YIELD_EVERY):
            batch = [i for i in ids[start : start + YIELD_EVERY] if i.startswith(prefix)]
            for at in range(0, len(batch), count):
                yield batch[at : at + count]
            await asyncio.sleep(0)

    async def scan_schedule(self, bucket: int, cursor: int, count: int) -> tuple[int, list[str]]:
        ids = list(islice(self._ids_of(bucket), cursor, cursor + count))
        return (0 if len(ids) < count else cursor + count), ids

    async def prune(self, bucket: int, entry_ids: list[str]) -> int:
        return 0  # no entry is scheduled without being stored

    async def take_sweep(self, interval_ms: int, owner: str) -> bool:
        return False  # nothing to sweep: no orphans, no lost schedule, counts kept exact by every write

    async def recount(self, before: dict[int, dict[str, int]], found: dict[int, dict[str, int]]) -> int:
        changed = 0
        for index in set(before) | set(found):
            bucket = self._buckets[index]
            was, now = before.get(index, {}), found.get(index, {})
            for fetcher in set(was) | set(now):
                if bucket.counts.get(fetcher, 0) == was.get(fetcher, 0):
                    self._add_count(bucket, fetcher, now.get(fetcher, 0) - bucket.counts.get(fetcher, 0))
                    changed += 1
        return changed

    async def bucket_counts(self) -> dict[int, dict[str, int]]:
        return {b.index: {name: n for name, n in b.counts.items() if n} for b in self._buckets}

    async def entry_counts(self) -> dict[str, int]:
        return {name: n for name, n in self._totals_here.items() if n}

    # -- fill locks, budgets, the change channel ------------------------------------------------------

    async def start_fill(self, entry_id: str, lock_ms: int) -> bool:
        now = self._now()
        if self._fills.get(entry_id, 0) > now:
            return False
        self._fills[entry_id] = now + lock_ms
        return True

    async def end_fill(self, entry_id: str) -> None:
        self._fills.pop(entry_id, None)

    async def filling(self, entry_id: str) -> tuple[bytes | None, bool]:
        record = self._records.get(entry_id)
        return (None if record is None else record.value), self._fills.get(entry_id, 0) > self._now()

    async def take_budget(self, fetcher: str, rate: float, wanted: int, *, owe: bool = False) -> int:
        """scripts.TAKE_BUDGET: a token bucket refilled at `rate` a second up to one second's worth."""
        burst = max(1.0, rate)
        now = self._now()
        tokens, at, gone_at = self._budgets.get(fetcher, (burst, now, now + 1))
        if gone_at <= now:
            tokens, at = burst, now
        tokens = min(burst, tokens + max(0, now - at) * rate / 1000)
        taken = wanted if owe else max(0, min(wanted, int(tokens)))
        tokens -= taken
        self._budgets[fetcher] = (tokens, now, now + math.ceil((burst - tokens) / rate * 1000) + 1000)
        return taken

    async def publish(self, channel: str, message: bytes) -> int:
        return self._bus.publish(channel, message)


def _header_line(value: bytes) -> bytes:
    """The header line of a stored value, with its newline (scripts.py, header_of)."""
    end = value.find(b"\n", 0, HEADER_MAX_BYTES)
    return value[:HEADER_MAX_BYTES] if end < 0 else value[: end + 1]


def _tags_of(value: bytes) -> bytes:
    end = value.find(b"\n", 0, HEADER_MAX_BYTES)
    found = _TAGS.search(value, 0, min(len(value), HEADER_MAX_BYTES) if end < 0 else end)
    return b"" if found is None else found.group(1)
