"""Redis key names. Every key the service touches lives under the namespace prefix.

- `{ns}item:{entry}`   the entry's response body (a DataItem as JSON)
- `{ns}shadow:{entry}` empty, with TTL = ttl + jitter; its `expired` event says "refresh me"
- `{ns}due`            sorted set: entry id -> due time (ms since the epoch); the schedule and the claim
"""

from __future__ import annotations

DEFAULT_NAMESPACE = "eagercache:"


class Keys:
    __slots__ = ("due", "item_prefix", "namespace", "shadow_prefix")

    def __init__(self, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.namespace = namespace
        self.item_prefix = f"{namespace}item:"
        self.shadow_prefix = f"{namespace}shadow:"
        self.due = f"{namespace}due"

    def item(self, entry_id: str) -> str:
        return self.item_prefix + entry_id

    def shadow(self, entry_id: str) -> str:
        return self.shadow_prefix + entry_id

    def entry_of_shadow(self, key: str) -> str | None:
        """The entry id behind a shadow key, or None for any other key (other namespaces, other apps)."""
        return key[len(self.shadow_prefix) :] if key.startswith(self.shadow_prefix) else None


def split_entry_id(entry_id: str) -> tuple[str, str]:
    """An entry id is `fetcher?canonical-query`; fetcher names cannot contain '?'."""
    name, _, query = entry_id.partition("?")
    return name, query
