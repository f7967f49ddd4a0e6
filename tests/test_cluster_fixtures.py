"""The Cluster and Sentinel fixtures do what the topology tests will count on: real, converged, and failing over."""

from __future__ import annotations

import pytest
import redis
from redis.cluster import RedisCluster
from redis.sentinel import Sentinel

from .redis_cluster import LocalCluster, LocalSentinel, keyslot


def keys_on_each_primary(cluster: LocalCluster) -> dict[int, str]:
    """One key per primary, found by hash tag: which tag lands where is fixed by CRC16, not by the test."""
    found: dict[int, str] = {}
    primaries = set(cluster.primary_ports())
    for n in range(1000):
        key = f"{{tag{n}}}:value"
        found.setdefault(cluster.owner(keyslot(key)), key)
        if set(found) == primaries:
            return found
    raise AssertionError(f"no tag found for some primary: {found}")


def test_keys_land_on_every_primary() -> None:
    with LocalCluster(primaries=3) as cluster:
        assert cluster.url.startswith("redis://127.0.0.1:")
        assert sum(len(cluster.slots_of(port)) for port in cluster.primary_ports()) == 16384
        keys = keys_on_each_primary(cluster)
        assert len(keys) == 3
        with RedisCluster.from_url(cluster.url) as client:
            for port, key in keys.items():
                client.set(key, str(port))
            for port, key in keys.items():
                assert client.get(key) == str(port).encode()
                node = cluster.client(port)
                try:
                    assert node.get(key) == str(port).encode()  # the owner answers itself, no MOVED
                finally:
                    node.close()
            cluster.flushall()
            assert all(client.get(key) is None for key in keys.values())


@pytest.mark.fault
def test_killed_primary_is_replaced_by_its_replica() -> None:
    # 3 primaries, not 1: a replica is promoted only by the votes of a majority of the other primaries.
    with LocalCluster(primaries=3, replicas=1) as cluster:
        victim = cluster.primary_ports()[0]
        key = next(k for k in (f"{{k{n}}}" for n in range(1000)) if cluster.owner(keyslot(k)) == victim)
        primary = cluster.client(victim)
        try:
            primary.set(key, b"kept")
            assert primary.wait(1, 2000) == 1  # the replica has it before the crash
        finally:
            primary.close()

        cluster.kill(victim)
        promoted = cluster.wait_promoted(victim, timeout=12)

        assert promoted != victim
        assert victim not in cluster.primary_ports()
        assert promoted in cluster.primary_ports()
        assert keyslot(key) in cluster.slots_of(promoted)
        with RedisCluster.from_url(cluster.url) as client:
            assert client.get(key) == b"kept"
            client.set(key, b"written after")
            assert client.get(key) == b"written after"


def test_reshard_to_a_new_primary_keeps_every_key_readable() -> None:
    with LocalCluster(primaries=3) as cluster:
        slot = keyslot("{moving}")
        source = cluster.owner(slot)
        moving = [f"{{moving}}:{n}" for n in range(250)]  # more than one GETKEYSINSLOT batch of 100
        staying = [f"{{staying{n}}}" for n in range(50)]
        with RedisCluster.from_url(cluster.url) as client:  # made before the move: must follow MOVED
            for key in moving + staying:
                client.set(key, key)

            added = cluster.add_primary()
            assert added.port in cluster.primary_ports()
            assert cluster.slots_of(added.port) == []
            cluster.move_slots([slot], added.port)

            assert cluster.slots_of(added.port) == [slot]
            assert slot not in cluster.slots_of(source)
            assert cluster.owner(slot) == added.port
            node = cluster.client(added.port)
            try:
                assert node.cluster("COUNTKEYSINSLOT", slot) == len(moving)
            finally:
                node.close()
            for key in moving + staying:
                assert client.get(key) == key.encode()


@pytest.mark.fault
def test_sentinel_promotes_the_replica() -> None:
    with LocalSentinel(replicas=1) as deployment:
        assert deployment.url.startswith("redis+sentinel://127.0.0.1:")
        assert deployment.url.endswith("/mymaster/0")
        assert len(deployment.sentinel_addresses) == 3
        sentinel = Sentinel(deployment.sentinel_addresses, socket_timeout=1)  # type: ignore[no-untyped-call]
        try:
            before: redis.Redis = sentinel.master_for("mymaster", socket_timeout=1)  # type: ignore[no-untyped-call]
            before.set("kept", b"yes")
            assert before.wait(1, 2000) == 1
            before.close()

            old = deployment.kill_primary()
            new = deployment.wait_promoted(old, timeout=12)

            assert new != old
            assert deployment.primary_port() == new
            after: redis.Redis = sentinel.master_for("mymaster", socket_timeout=1)  # type: ignore[no-untyped-call]
            try:
                assert after.get("kept") == b"yes"
                after.set("written after", b"yes")
                assert after.get("written after") == b"yes"
                assert after.info("server")["tcp_port"] == new  # the client found the new primary
            finally:
                after.close()
        finally:
            for client in sentinel.sentinels:
                client.close()
