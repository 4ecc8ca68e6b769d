"""The whole stack on a loopback Redis Cluster (3 masters, 3 replicas) under faults: two
Hypercorn instances, a real WebSocket client on one, the other sending it numbered
messages, one at a time, while the master that holds the client's shard (its keys and
its channel) is killed, hung or its slot moved. Delivery must come back within 10 s of
the fault; every message the send counted as routed must arrive; the sends that failed
or routed to nobody are counted and printed. Also: how the commands of a uniform
workload spread over the masters."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from websockets.asyncio.client import ClientConnection

from quart_wslb.keys import CLUSTER_SHARDS, Keys
from tests.cluster import Clients, Cluster, HttpError
from tests.topology import RedisClusterSet, pid_of, redis_version, reshard, server_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
StartCluster = Callable[..., Cluster]
#: Delivery must be back this long after the fault.
RESTORE_BOUND = 10.0
#: How long the stream runs after the fault.
STREAM_AFTER = 14.0
#: Sends started this long before a SIGKILL may be counted as routed and lost with it
#: (Redis wrote the publisher's reply, not yet the subscriber's copy): reported, allowed.
KILL_WINDOW = 0.5
FAST = {"WSLB_HEARTBEAT_INTERVAL": "0.5", "WSLB_INSTANCE_TTL": "4", "WSLB_REDIS_TIMEOUT": "2"}


@pytest.fixture(name="cluster_set")
def fixture_cluster_set() -> Iterator[RedisClusterSet]:
    """A cluster of this test alone: faults change it."""
    if redis_version() < (7,):
        pytest.skip(f"Redis Cluster's sharded pub/sub needs Redis 7, not {redis_version()}")
    with RedisClusterSet().start() as cluster:
        yield cluster


@dataclass
class Stream:
    """Numbered sends and what became of each."""

    routed: dict[int, int] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)
    sent_at: dict[int, float] = field(default_factory=dict)
    received: dict[int, float] = field(default_factory=dict)

    def report(self, name: str, fault: float, kill: bool = False) -> tuple[float, set[int]]:
        """(seconds from the fault to the first delivery of a message sent after it,
        the messages counted as routed that never arrived, but those in flight at a
        kill); printed with the rest."""
        after = [n for n, at in self.sent_at.items() if at > fault and n in self.received]
        restored = min(self.received[n] for n in after) - fault if after else float("inf")
        lost = {n for n, count in self.routed.items() if count > 0} - set(self.received)
        in_flight = {n for n in lost if kill and -KILL_WINDOW <= self.sent_at[n] - fault <= 0}
        nobody = sorted(n for n, count in self.routed.items() if count == 0)
        print(
            f"\n{name}: {len(self.sent_at)} sent, {len(self.received)} received; restored "
            f"{restored:.2f} s after the fault; routed to nobody: {len(nobody)}; failed: "
            f"{len(self.failed)}; counted as routed and lost: {sorted(lost)} (in flight at "
            f"the kill: {sorted(in_flight)})"
        )
        return restored, lost - in_flight


async def run_stream(
    cluster: Cluster, client: ClientConnection, fault: Callable[[], None]
) -> tuple[Stream, float]:
    """Send ``{"n": n}`` to alice from instance 1, one at a time, for a while before the
    fault and ``STREAM_AFTER`` after it; read what alice gets meanwhile."""
    stream = Stream()

    async def read() -> None:
        while True:
            frame = json.loads(await client.recv())
            stream.received.setdefault(frame["n"], time.monotonic())

    reader = asyncio.create_task(read())
    faulted = 0.0
    n = 0
    started = time.monotonic()
    try:
        while not faulted or time.monotonic() - faulted < STREAM_AFTER:
            if not faulted and time.monotonic() - started > 2.0:
                fault()
                faulted = time.monotonic()
            n += 1
            stream.sent_at[n] = time.monotonic()
            try:
                stream.routed[n] = await cluster[1].send({"user": "alice"}, {"n": n})
            except (HttpError, OSError):
                stream.failed.add(n)
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.02)
        await asyncio.sleep(2.0)  # the last ones in flight
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return stream, faulted


async def alice_and_her_master(
    start_cluster: StartCluster, clients: Clients, cluster_set: RedisClusterSet, prefix: str
) -> tuple[Cluster, ClientConnection, int]:
    """Two instances, alice on the first; the port of the master of her shard's slot."""
    cluster = start_cluster(2, url=cluster_set.url, **FAST)
    alice, _ = await clients.join(cluster[0], "alice", "red")
    channel = Keys(prefix, shards=CLUSTER_SHARDS).of_user("alice").channel("i0")
    async with RedisCluster.from_url(cluster_set.url) as admin:
        node = admin.get_node_from_key(channel)
        assert node is not None
        return cluster, alice, int(node.port)


def check(stream: Stream, name: str, fault: float, kill: bool = False) -> None:
    restored, lost = stream.report(name, fault, kill)
    assert restored <= RESTORE_BOUND, f"{name}: delivery back after {restored:.2f} s"
    assert not lost, f"{name}: counted as routed, never delivered: {sorted(lost)}"


async def test_cluster_faults_master_killed(
    start_cluster: StartCluster, clients: Clients, cluster_set: RedisClusterSet, prefix: str
) -> None:
    cluster, alice, port = await alice_and_her_master(start_cluster, clients, cluster_set, prefix)
    server = server_of(cluster_set, port)
    stream, fault = await run_stream(
        cluster, alice, lambda: os.kill(pid_of(server), signal.SIGKILL)
    )
    check(stream, "SIGKILL of the master of alice's shard", fault, kill=True)


async def test_cluster_faults_master_hung(
    start_cluster: StartCluster, clients: Clients, cluster_set: RedisClusterSet, prefix: str
) -> None:
    cluster, alice, port = await alice_and_her_master(start_cluster, clients, cluster_set, prefix)
    pid = pid_of(server_of(cluster_set, port))
    try:
        stream, fault = await run_stream(cluster, alice, lambda: os.kill(pid, signal.SIGSTOP))
    finally:
        os.kill(pid, signal.SIGCONT)
    check(stream, "SIGSTOP of the master of alice's shard", fault)


async def test_cluster_faults_slot_moved(
    start_cluster: StartCluster, clients: Clients, cluster_set: RedisClusterSet, prefix: str
) -> None:
    cluster, alice, port = await alice_and_her_master(start_cluster, clients, cluster_set, prefix)
    view = Keys(prefix, shards=CLUSTER_SHARDS).of_user("alice")
    slot = key_slot(view.users.encode())
    ports = [server.port for server in cluster_set.masters()]
    target = next(p for p in ports if p != port)
    stream, fault = await run_stream(cluster, alice, lambda: reshard(slot, port, target, ports))
    check(stream, "reshard of the slot of alice's shard", fault)
