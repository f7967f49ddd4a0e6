"""Redis key names. Every key the service touches lives under the namespace prefix.

Entries are spread over a fixed number of buckets. Every key of one entry and of its bucket carries
the bucket's hash tag `{b<n>}`, so on Redis Cluster they live in one hash slot (the Lua scripts that
touch them stay atomic) while the buckets spread over the primaries. An entry's bucket is a hash of its
id. Per bucket `b`:

- `{ns}{bN}:item:{entry}`   the entry's response body (a DataItem as JSON)
- `{ns}{bN}:shadow:{entry}` empty, with TTL = ttl + jitter; its `expired` event says "refresh me"
- `{ns}{bN}:stale:{entry}`  present while refreshes fail: "<first failure ms> <failures> <last error>"
- `{ns}{bN}:fill:{entry}`   held (SET NX PX) by the replica fetching a missing entry; others wait for its write
- `{ns}{bN}:due`            sorted set: entry id -> due time (ms since the epoch); the schedule and the claim
- `{ns}{bN}:read`           sorted set: entry id -> last read (ms), written in batches; for max_idle
- `{ns}{bN}:counts`         hash: fetcher name -> number of entries in the bucket; for max_entries
- `{ns}{bN}:tag:{tag}`      set: the bucket's entries that carry the tag (percent-encoded, item.encode_tags)
- `{ns}{bN}:claim:{process}` a process's last claim there (token, lease end, ids), for 30 s: a retry of it
                            (its reply lost with its connection) gets the same entries (scripts._REPLAY)

And once per namespace (anywhere in a cluster: no script touches them with other keys):

- `{ns}layout`              the bucket count, written by the first process; the others check theirs against it
- `{ns}sweep`               held (SET NX PX) by the replica that sweeps the store for entries off the schedule
- `{ns}probe:{uuid}`        short-lived, only at start-up (access check; servers that refuse CONFIG)
- `{ns}budget:{fetcher}`    hash: the fetcher's max_rate token bucket (tokens, at), shared by the replicas
"""

from __future__ import annotations

import re
import zlib

DEFAULT_NAMESPACE = "eagercache:"
# Buckets are numbered 0..n-1; a bucket count above this buys no spread (16384 slots) and costs claims.
MAX_BUCKETS = 4096
_BUCKET_KEY = re.compile(rb"\{b(\d+)\}:(item|shadow):")


class Bucket:
    """The key names of one bucket: all in one hash slot."""

    __slots__ = (
        "claim_prefix",
        "counts",
        "due",
        "fill_prefix",
        "index",
        "item_prefix",
        "read",
        "shadow_prefix",
        "stale_prefix",
        "tag_prefix",
    )

    def __init__(self, namespace: str, index: int) -> None:
        base = f"{namespace}{{b{index}}}:"
        self.index = index
        self.item_prefix = f"{base}item:"
        self.shadow_prefix = f"{base}shadow:"
        self.stale_prefix = f"{base}stale:"
        self.fill_prefix = f"{base}fill:"
        self.tag_prefix = f"{base}tag:"
        self.claim_prefix = f"{base}claim:"
        self.due = f"{base}due"
        self.read = f"{base}read"
        self.counts = f"{base}counts"

    def item(self, entry_id: str) -> str:
        return self.item_prefix + entry_id

    def shadow(self, entry_id: str) -> str:
        return self.shadow_prefix + entry_id

    def stale(self, entry_id: str) -> str:
        return self.stale_prefix + entry_id

    def fill(self, entry_id: str) -> str:
        return self.fill_prefix + entry_id

    def claim(self, process: str) -> str:
        return self.claim_prefix + process


class Keys:
    __slots__ = ("buckets", "budget_prefix", "layout", "namespace", "namespace_bytes", "probe_prefix", "sweep")

    def __init__(self, namespace: str = DEFAULT_NAMESPACE, buckets: int = 1) -> None:
        check_namespace(namespace)
        if not 1 <= buckets <= MAX_BUCKETS:
            raise ValueError(f"buckets must be 1-{MAX_BUCKETS}, got {buckets}")
        self.namespace = namespace
        self.namespace_bytes = namespace.encode()
        self.buckets = tuple(Bucket(namespace, i) for i in range(buckets))
        self.layout = f"{namespace}layout"
        self.sweep = f"{namespace}sweep"
        self.probe_prefix = f"{namespace}probe:"
        self.budget_prefix = f"{namespace}budget:"

    def budget(self, fetcher: str) -> str:
        return self.budget_prefix + fetcher

    def bucket_of(self, entry_id: str) -> Bucket:
        """The entry's bucket: a hash of its id (crc32: stable across processes, versions and platforms)."""
        buckets = self.buckets
        if len(buckets) == 1:
            return buckets[0]
        return buckets[zlib.crc32(entry_id.encode()) % len(buckets)]

    def item(self, entry_id: str) -> str:
        return self.bucket_of(entry_id).item(entry_id)

    def shadow(self, entry_id: str) -> str:
        return self.bucket_of(entry_id).shadow(entry_id)

    def stale(self, entry_id: str) -> str:
        return self.bucket_of(entry_id).stale(entry_id)

    def fill(self, entry_id: str) -> str:
        return self.bucket_of(entry_id).fill(entry_id)

    def item_pattern(self, fetcher: str | None) -> str:
        """A SCAN MATCH pattern for the stored items of one fetcher, or of all, in every bucket."""
        # glob-escaped: a literal '?' ends the fetcher's name, so fetcher `a` never matches entries of `ab`
        tail = "" if fetcher is None else glob_escape(f"{fetcher}?")
        return f"{glob_escape(self.namespace)}{{b*}}:item:{tail}*"

    def entry_of_item(self, key: bytes) -> str | None:
        return self._entry_of(key, b"item")

    def entry_of_shadow(self, key: bytes) -> str | None:
        """The entry id behind a shadow key, or None for any other key (other namespaces, other apps).

        Key names arrive as bytes and stay bytes until they are known to be ours: another application's
        key may be any bytes at all. Entry ids are canonical percent-encoded ASCII, so a key under our
        prefix that is not ASCII was never written by eagercache.
        """
        return self._entry_of(key, b"shadow")

    def _entry_of(self, key: bytes, kind: bytes) -> str | None:
        if not key.startswith(self.namespace_bytes):
            return None
        found = _BUCKET_KEY.match(key, len(self.namespace_bytes))
        if found is None or found.group(2) != kind:
            return None
        entry_id = entry_id_of(key[found.end() :])
        # Only in the bucket this layout puts it in: a key left by another bucket count is not an entry here.
        if entry_id is None or self.bucket_of(entry_id).index != int(found.group(1)):
            return None
        return entry_id


def check_namespace(namespace: str) -> None:
    """A namespace is a plain key prefix: braces in it would change which part of a key Redis Cluster
    hashes, and with it which slot (and node) an entry's keys land on."""
    if not namespace or any(c.isspace() for c in namespace):
        raise ValueError(f"namespace must be non-empty without whitespace, got {namespace!r}")
    if "{" in namespace or "}" in namespace:
        raise ValueError(f"namespace may not contain '{{' or '}}' (Redis Cluster hash tags), got {namespace!r}")


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


def glob_escape(text: str) -> str:
    """Escape Redis glob characters (KEYS/SCAN MATCH)."""
    return "".join("\\" + c if c in "\\*?[]^" else c for c in text)
