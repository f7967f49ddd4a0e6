"""A bounded least-recently-used map: what the per-process caches keep.

Recency, not insertion order, decides what goes: a hot entry is used on every read, so it stays however
many cold ones pass through (an insertion-order FIFO would evict it every `max_entries` insertions).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: K) -> bool:
        return key in self._items  # without making it recent

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> V | None:
        """Store `value`; the value it evicted (the least recently used one), if any."""
        self._items[key] = value
        self._items.move_to_end(key)
        if len(self._items) > self.max_entries:
            return self._items.popitem(last=False)[1]
        return None

    def pop(self, key: K) -> V | None:
        return self._items.pop(key, None)

    def pop_oldest(self) -> V | None:
        return self._items.popitem(last=False)[1] if self._items else None
