"""Redis key names. Every key the service touches lives under the namespace prefix.

- `{ns}item:{entry}`   the entry's response body (a DataItem as JSON)
- `{ns}shadow:{entry}` empty, with TTL = ttl + jitter; its `expired` event says "refresh me"
- `{ns}stale:{entry}`  present while refreshes fail: "<first failure ms> <failures> <last error>"
- `{ns}fill:{entry}`   held (SET NX PX) by the replica fetching a missing entry; others wait for its write
- `{ns}due`            sorted set: entry id -> due time (ms since the epoch); the schedule and the claim
- `{ns}read`           sorted set: entry id -> last read (ms), written in batches; for max_idle
- `{ns}counts`         hash: fetcher name -> number of entries; for max_entries
- `{ns}sweep`          held (SET NX PX) by the replica that sweeps the store for entries off the schedule
- `{ns}probe:{uuid}`   short-lived, only at start-up on servers that refuse CONFIG
"""

from __future__ import annotations

DEFAULT_NAMESPACE = "eagercache:"


class Keys:
    __slots__ = (
        "counts",
        "due",
        "fill_prefix",
        "item_prefix",
        "namespace",
        "read",
        "shadow_prefix",
        "shadow_prefix_bytes",
        "stale_prefix",
        "sweep",
    )

    def __init__(self, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.namespace = namespace
        self.item_prefix = f"{namespace}item:"
        self.shadow_prefix = f"{namespace}shadow:"
        self.shadow_prefix_bytes = self.shadow_prefix.encode()  # expiry events carry key names as bytes
        self.stale_prefix = f"{namespace}stale:"
        self.fill_prefix = f"{namespace}fill:"
        self.due = f"{namespace}due"
        self.read = f"{namespace}read"
        self.counts = f"{namespace}counts"
        self.sweep = f"{namespace}sweep"

    def item(self, entry_id: str) -> str:
        return self.item_prefix + entry_id

    def shadow(self, entry_id: str) -> str:
        return self.shadow_prefix + entry_id

    def stale(self, entry_id: str) -> str:
        return self.stale_prefix + entry_id

    def fill(self, entry_id: str) -> str:
        return self.fill_prefix + entry_id

    def entry_of_shadow(self, key: bytes) -> str | None:
        """The entry id behind a shadow key, or None for any other key (other namespaces, other apps).

        Key names arrive as bytes and stay bytes until they are known to be ours: another application's
        key may be any bytes at all. Entry ids are canonical percent-encoded ASCII, so a key under our
        prefix that is not ASCII was never written by eagercache.
        """
        prefix = self.shadow_prefix_bytes
        return entry_id_of(key[len(prefix) :]) if key.startswith(prefix) else None


def entry_id_of(raw: bytes) -> str | None:
    """An entry id read from Redis (part of a key name, a schedule member), or None if it cannot be one:
    entry ids are canonical percent-encoded ASCII, so anything else was not written by eagercache."""
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return None


def split_entry_id(entry_id: str) -> tuple[str, str]:
    """An entry id is `fetcher?canonical-query`; fetcher names cannot contain '?'."""
    name, _, query = entry_id.partition("?")
    return name, query
