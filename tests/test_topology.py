"""The private Redis topologies of the tests: a 3-master/3-replica cluster, a Sentinel set."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from redis.cluster import RedisCluster

from tests.topology import RedisClusterSet, SentinelSet, needs_redis_7, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    needs_redis_7("Redis Cluster and Sentinel tests"),
]


@pytest.fixture(name="sentinel_set")
def fixture_sentinel_set() -> Iterator[SentinelSet]:
    """A Sentinel set of this test alone: it fails over (the session's never does)."""
    with SentinelSet().start() as sentinels:
        yield sentinels


def test_redis_cluster_set_has_three_synced_masters_each_with_a_replica(
    cluster_set: RedisClusterSet,
) -> None:
    assert len(cluster_set.masters()) == 3
    assert len(cluster_set.replicas()) == 3
    client = RedisCluster.from_url(cluster_set.url)
    try:
        keys = [f"k{n}" for n in range(50)]  # spread over the slots, so over the masters
        for key in keys:
            client.set(key, key)
        assert [client.get(key) for key in keys] == [key.encode() for key in keys]
        owners = {client.get_node_from_key(key).port for key in keys}  # type: ignore[no-untyped-call, unused-ignore]
        assert owners == {server.port for server in cluster_set.masters()}
    finally:
        client.close()


def test_sentinel_set_fails_over_to_the_replica(sentinel_set: SentinelSet) -> None:
    first = sentinel_set.master_port()
    assert first == sentinel_set.master.port
    with redis.Redis(port=sentinel_set.sentinels[0].port) as sentinel:
        sentinel.execute_command("SENTINEL", "FAILOVER", sentinel_set.service)
    replica = sentinel_set.replica_servers[0].port
    wait_until(lambda: sentinel_set.master_port() == replica, "the replica promoted", 20)
    assert sentinel_set.url.startswith("redis+sentinel://127.0.0.1:")
