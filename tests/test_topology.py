"""The key layout and the URL forms, without a server: what a cluster and a sentinel URL are taken to mean."""

from __future__ import annotations

import zlib

import pytest
from redis.crc import key_slot

from eagercache.errors import ConfigurationError, StoreUnavailable
from eagercache.keys import Keys
from eagercache.settings import Settings
from eagercache.store import Store
from eagercache.topology import SentinelTarget, store_errors


def test_every_key_of_an_entry_shares_its_buckets_slot() -> None:
    keys = Keys("eagercache:", 256)
    for entry_id in ("weather?city=Oslo", "greeting?name=Z%C3%BCrich", "x?"):
        bucket = keys.bucket_of(entry_id)
        assert bucket.index == zlib.crc32(entry_id.encode()) % 256
        slots = {
            key_slot(name.encode())
            for name in (
                bucket.item(entry_id),
                bucket.shadow(entry_id),
                bucket.stale(entry_id),
                bucket.fill(entry_id),
                bucket.due,
                bucket.read,
                bucket.counts,
            )
        }
        assert len(slots) == 1, slots


def test_buckets_spread_over_slots_and_entries_over_buckets() -> None:
    keys = Keys("eagercache:", 256)
    slots = {key_slot(b.due.encode()) for b in keys.buckets}
    assert len(slots) == 256  # no two buckets share a slot: each can move on its own
    per_bucket = [0] * 256
    for i in range(25_600):
        per_bucket[keys.bucket_of(f"item?k={i}").index] += 1
    assert min(per_bucket) > 50 and max(per_bucket) < 150  # ~100 each


def test_shadow_keys_are_read_back_only_when_they_are_ours() -> None:
    keys = Keys("eagercache:", 16)
    b = keys.bucket_of("item?k=1").index
    assert keys.entry_of_shadow(f"eagercache:{{b{b}}}:shadow:item?k=1".encode()) == "item?k=1"
    assert keys.entry_of_item(f"eagercache:{{b{b}}}:item:item?k=1".encode()) == "item?k=1"
    assert keys.entry_of_shadow(f"eagercache:{{b{b}}}:item:item?k=1".encode()) is None  # an item is not a shadow
    assert keys.entry_of_shadow(f"eagercache:{{b{(b + 1) % 16}}}:shadow:item?k=1".encode()) is None  # not its bucket
    assert keys.entry_of_shadow(b"eagercache:{b16}:shadow:item?k=1") is None  # no such bucket here
    assert keys.entry_of_shadow(b"eagercache:shadow:item?k=1") is None  # the layout before buckets
    assert keys.entry_of_shadow(f"other:{{b{b}}}:shadow:item?k=1".encode()) is None
    assert keys.entry_of_shadow(f"eagercache:{{b{b}}}:shadow:\xff".encode("latin-1")) is None  # not ASCII


def test_the_item_pattern_matches_one_fetcher_in_every_bucket() -> None:
    keys = Keys("ns:", 4)
    assert keys.item_pattern("a") == "ns:{b*}:item:a\\?*"
    assert keys.item_pattern(None) == "ns:{b*}:item:*"


@pytest.mark.parametrize("namespace", ["a{b}:", "x}", "{ns}"])
def test_a_namespace_with_braces_is_refused(namespace: str) -> None:
    with pytest.raises(ValueError, match="may not contain"):
        Keys(namespace)
    with pytest.raises(ValueError, match="may not contain"):
        Settings(namespace=namespace)


@pytest.mark.parametrize("buckets", [0, -1, 4097])
def test_a_bucket_count_out_of_range_is_refused(buckets: int) -> None:
    with pytest.raises(ValueError, match="buckets must be 1-4096"):
        Settings(buckets=buckets)


def test_a_sentinel_url_names_sentinels_service_database_and_user() -> None:
    target = SentinelTarget.parse("redis+sentinel://app:s%40cret@10.0.0.1:26379,[::1]:26380/mymaster/2")
    assert target.sentinels == (("10.0.0.1", 26379), ("::1", 26380))
    assert (target.service, target.db, target.username, target.password, target.tls) == (
        "mymaster",
        2,
        "app",
        "s@cret",
        False,
    )
    plain = SentinelTarget.parse("rediss+sentinel://h:26379/svc")
    assert (plain.db, plain.username, plain.password, plain.tls) == (0, None, None, True)


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://h:26379",  # no service
        "redis+sentinel://h/svc",  # no port
        "redis+sentinel://h:26379/svc/notadb",
        "redis+sentinel:///svc",  # no sentinel
    ],
)
def test_a_sentinel_url_that_cannot_be_used_is_a_clear_error(url: str) -> None:
    with pytest.raises(ConfigurationError, match="sentinel"):
        Store(url)


def test_a_sentinel_url_is_a_valid_setting_and_its_password_is_never_shown() -> None:
    settings = Settings(redis_url="redis+sentinel://app:hunter2@h:26379/mymaster")
    assert "hunter2" not in repr(settings)
    with pytest.raises(ValueError, match="redis_url must start with"):
        Settings(redis_url="sentinel://h:26379/mymaster")


def test_a_write_to_a_connection_uvloop_closed_is_the_store_unreachable() -> None:
    """uvloop raises RuntimeError, not ConnectionError, for a write to a closed socket (seen in the reshard
    fault test as a 500): it is the store being unreachable, and readers get grace or a 503 problem."""
    closed = RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")
    with pytest.raises(StoreUnavailable, match="connection was closed"), store_errors("redis://h:1"):
        raise closed
    with pytest.raises(RuntimeError, match="something else"), store_errors("redis://h:1"):
        raise RuntimeError("something else")  # any other RuntimeError is a bug to see, not an outage
