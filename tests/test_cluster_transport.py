"""quart_wslb.cluster in normal operation: routing, redirections, script loading on every
master, sharded subscriptions merged over the masters, detection, and
AUTH. Faults (kill, hang, reshard) are in ``tests/test_clusterio.py``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import hiredis
import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError, ResponseError

from quart_wslb.batch import GroupCommit
from quart_wslb.cluster import (
    EVERY_MASTER,
    ClusterTransport,
    _redirection,
    _Round,
    cluster_client,
    is_cluster,
    route,
    slot_of,
)
from quart_wslb.redis_client import make_client
from quart_wslb.testing import (
    RedisServer,
    TLSUnsupportedError,
    find_redis_server,
    free_port,
)
from quart_wslb.transport import SocketTransport, another
from tests.support import tls_files
from tests.topology import RedisClusterSet, redis_version, wait_until

pytestmark = pytest.mark.timeout(60)
NEEDS_7 = pytest.mark.skipif(
    redis_version()[:1] < (7,),
    reason=f"Redis Cluster tests need Redis >= 7 ({find_redis_server()} is "
    f"{'.'.join(map(str, redis_version())) or 'missing'})",
)
#: A read that finds nothing waits this long.
QUIET = 0.05
#: How long a test waits for what should come at once.
SOON = 3.0


# -- units ----------------------------------------------------------------------------


def test_route_script_calls_by_first_key_and_publishes_by_channel() -> None:
    assert route(["EVALSHA", "f" * 40, 2, "{a}k", "{b}k", "arg"]) == "{a}k"
    assert route(["EVALSHA", "f" * 40, 0, "arg"]) is None
    assert route(["SPUBLISH", "{a}:ch", b"x"]) == "{a}:ch"
    assert route([b"script", b"load", b"return 1"]) is EVERY_MASTER
    assert route(["PING"]) is None


def test_slot_of_hashes_the_tag_only() -> None:
    assert slot_of("{user1}:a") == slot_of(b"{user1}:b") == slot_of("user1")
    assert slot_of("foo") == 12182  # the cluster spec's example


def test_redirection_tells_moved_ask_and_waits() -> None:
    assert _redirection(ResponseError("MOVED 3999 127.0.0.1:6381")) == (
        "MOVED",
        3999,
        ("127.0.0.1", 6381),
    )
    assert _redirection(MovedError("3999 127.0.0.1:6381")) == ("MOVED", 3999, ("127.0.0.1", 6381))
    assert _redirection(ResponseError("ASK 1 ::1:7000")) == ("ASK", 1, ("::1", 7000))
    assert _redirection(ResponseError("TRYAGAIN Multiple keys request")) == (
        "TRYAGAIN",
        None,
        None,
    )
    assert _redirection(ResponseError("CLUSTERDOWN The cluster is down"))[0] == "CLUSTERDOWN"  # type: ignore[index]
    assert _redirection(ResponseError("WRONGTYPE Operation against a key")) is None
    assert _redirection(b"MOVED 1 h:1") is None


async def test_another_shares_a_cluster_transport_and_makes_a_socket_one() -> None:
    """Each shard's group commit asks ``another`` for a transport: a cluster's serves
    them all (one connection per master), a single Redis's gets one of its own."""
    client = cluster_client(f"redis://127.0.0.1:{free_port()}", 1.0)
    plain = redis.asyncio.Redis(port=free_port())
    try:
        transport = ClusterTransport(client)
        assert another(transport, cast(redis.asyncio.Redis, client)) is transport
        socket = SocketTransport(plain)
        made = another(socket, plain)
        assert isinstance(made, SocketTransport) and made is not socket
    finally:
        await client.aclose()
        await plain.aclose()


async def test_cluster_transport_keeps_its_masters_with_the_map() -> None:
    """The masters are listed once per map read (each round trip asks), and a MOVED to
    a master not in the list adds it before the map is read again."""
    client = cluster_client(f"redis://127.0.0.1:{free_port()}", 1.0)
    try:
        transport = ClusterTransport(client)
        a, b, c = ("h", 1), ("h", 2), ("h", 3)
        transport._take_map([b] * 8000 + [a] * 8384)
        assert transport.masters() == [a, b]
        attempt = _Round({}, {})
        results: list[Any] = [None]
        transport._sort(0, a, ResponseError("MOVED 5 h:3"), attempt, results)
        assert transport.masters() == [a, b, c]
        assert transport._owners[4] == b and transport._owners[5] == c
        assert attempt.refresh and 0 in attempt.retry
    finally:
        await client.aclose()


async def test_cluster_transport_ready_connects_to_no_master() -> None:
    """``ready()`` only makes sure the map is read: connecting to every master there
    held a caller whose commands go to a healthy master for the socket timeout of a
    hung master's handshake (each master is connected inside ``run``, within the
    round trip's deadline)."""
    accepted: list[asyncio.StreamWriter] = []

    async def hung(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, answers nothing: a SIGSTOPped master

    server = await asyncio.start_server(hung, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = cluster_client(f"redis://127.0.0.1:{free_port()}", 2.0)
    transport = ClusterTransport(client)
    try:
        transport._take_map([("127.0.0.1", port)] * 16384)
        async with asyncio.timeout(SOON):
            await transport.ready()
        await asyncio.sleep(QUIET)  # a connection made in the background would show now
        assert accepted == [], "ready() connected to the hung master"
    finally:
        await transport.aclose()
        await client.aclose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


# -- on a real cluster ----------------------------------------------------------------


@pytest.fixture(name="cluster_set", scope="module")
def fixture_cluster_set() -> Iterator[RedisClusterSet]:
    if redis_version()[:1] < (7,):
        pytest.skip("Redis Cluster tests need Redis >= 7")
    with RedisClusterSet().start() as cluster:
        yield cluster


@pytest.fixture(name="transport")
async def fixture_transport(cluster_set: RedisClusterSet) -> AsyncIterator[ClusterTransport]:
    client = cluster_client(cluster_set.url, 3.0)
    transport = ClusterTransport(client)
    yield transport
    await transport.aclose()
    await client.aclose()


def spread(transport: ClusterTransport, prefix: str, count: int = 1) -> list[str]:
    """``count`` channels on each master (``{prefix|n}:ch``), master by master."""
    found: dict[tuple[str, int], list[str]] = {m: [] for m in transport.masters()}
    n = 0
    while any(len(names) < count for names in found.values()):
        name = f"{{{prefix}|{n}}}:ch"
        owner = transport.owner(name)
        if owner is not None and len(found[owner]) < count:
            found[owner].append(name)
        n += 1
    return [name for names in found.values() for name in names]


async def read_until(subscription: object, count: int) -> list[bytes]:
    got: list[bytes] = []
    async with asyncio.timeout(SOON):
        while len(got) < count:
            got += await subscription.read(QUIET)  # type: ignore[attr-defined]
    return got


def cluster_ok(node: redis.Redis) -> bool:
    """Whether ``node`` says the cluster is ok."""
    return parsed_ok(node.execute_command("CLUSTER INFO"))  # type: ignore[no-untyped-call, unused-ignore]


def parsed_ok(info: Any) -> bool:
    """Whether a CLUSTER INFO reply says ok (redis-py parses it, or not, by version)."""
    if isinstance(info, dict):
        return str(info.get("cluster_state")) == "ok"
    return b"cluster_state:ok" in info


def master_client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=5)


@pytest.mark.integration
@NEEDS_7
async def test_is_cluster_tells_a_cluster_node_from_a_plain_redis(
    cluster_set: RedisClusterSet, private_redis: RedisServer
) -> None:
    assert await is_cluster(cluster_set.url)
    assert not await is_cluster(private_redis.url)


@pytest.mark.integration
@NEEDS_7
async def test_cluster_transport_routes_each_command_to_its_master(
    transport: ClusterTransport,
) -> None:
    await transport.ready()
    keys = spread(transport, "route")
    assert len({transport.owner(key) for key in keys}) == 3
    replies = await transport.run([["SET", key, key] for key in keys] + [["GET", k] for k in keys])
    assert replies == [b"OK"] * 3 + [key.encode() for key in keys]
    for key in keys:  # each key lives on the master the map says, and only there
        owner = transport.owner(key)
        assert owner is not None
        with master_client(owner[1]) as node:
            assert node.get(key) == key.encode()


@pytest.mark.integration
@NEEDS_7
async def test_cluster_transport_returns_error_replies(transport: ClusterTransport) -> None:
    key = spread(transport, "errors")[0] if transport.masters() else "{errors}k"
    await transport.ready()
    replies = await transport.run([["SET", key, "v"], ["HGET", key, "f"], ["GET", key]])
    assert replies[0] == b"OK" and replies[2] == b"v"
    assert isinstance(replies[1], ResponseError) and "WRONGTYPE" in str(replies[1])


@pytest.mark.integration
@NEEDS_7
async def test_cluster_transport_follows_moved_from_a_stale_map(
    transport: ClusterTransport,
) -> None:
    await transport.ready()
    keys = spread(transport, "moved")
    wrong = transport.masters()[0]
    transport._take_map([wrong] * len(transport._owners))  # every slot on one master
    replies = await transport.run([["SET", key, "v"] for key in keys])
    assert replies == [b"OK"] * 3
    assert len({transport.owner(key) for key in keys}) == 3  # the map was read again


@pytest.mark.integration
@NEEDS_7
async def test_cluster_transport_sends_again_what_could_not_be_written(
    transport: ClusterTransport,
) -> None:
    """A master gone from where the map says (nothing listens): nothing was written, so
    the command goes again where the map, read again, says."""
    await transport.ready()
    key = spread(transport, "gone")[0]
    transport._take_map([("127.0.0.1", free_port())] * len(transport._owners))
    assert await transport.run([["SET", key, "v"], ["GET", key]]) == [b"OK", b"v"]
    assert transport.owner(key) in transport.masters()


@pytest.mark.integration
@NEEDS_7
async def test_cluster_transport_never_sends_twice_what_may_have_run(
    transport: ClusterTransport,
) -> None:
    """A connection that fails once the command is written: its error is the reply, and
    the command is not sent again (it may have run)."""
    received: list[list[bytes]] = []

    async def node(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        while data := await reader.read(65536):
            parser.feed(data)
            while (command := parser.gets()) is not False:
                received.append(command)
                if command[0].upper() == b"SET":
                    writer.close()  # read, maybe run: then gone
                    return
                # The handshake: HELLO 3 (redis-py 8.2's cluster client), CLIENT SETINFO.
                hello = b"%2\r\n+server\r\n+redis\r\n+proto\r\n:3\r\n"
                writer.write(hello if command[0].upper() == b"HELLO" else b"+OK\r\n")
        writer.close()

    server = await asyncio.start_server(node, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await transport.ready()
        transport._take_map([("127.0.0.1", port)] * len(transport._owners))
        (reply,) = await transport.run([["SET", "{twice}k", "v"]])
        assert isinstance(reply, RedisConnectionError), (reply, received)
        assert sum(c[0].upper() == b"SET" for c in received) == 1
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.integration
@NEEDS_7
async def test_cluster_transport_follows_ask_during_a_migration(
    cluster_set: RedisClusterSet, transport: ClusterTransport
) -> None:
    await transport.ready()
    key = spread(transport, "ask")[0]
    slot, source = slot_of(key), transport.owner(key)
    target = next(m for m in transport.masters() if m != source)
    assert source is not None
    with master_client(source[1]) as src, master_client(target[1]) as dst:
        src_id, dst_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        try:
            # The key is not on the source: it answers ASK, the target serves it.
            assert await transport.run([["SET", key, "there"]]) == [b"OK"]
            assert dst.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 1
            assert src.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0
        finally:
            for node in (src, dst):
                node.execute_command("CLUSTER SETSLOT", slot, "STABLE")
            assert await transport.run([["DEL", key]]) in ([0], [1])


@pytest.mark.integration
@NEEDS_7
async def test_cluster_transport_group_commit_loads_its_script_on_every_master(
    cluster_set: RedisClusterSet, transport: ClusterTransport
) -> None:
    """``batch``'s NOSCRIPT handling: SCRIPT LOAD reaches every master. (Calls one at a
    time: a batch of concurrent calls is one EVALSHA, which must stay in one slot.)"""
    client = cluster_client(cluster_set.url, 3.0)
    script = client.register_script("return {1, KEYS[1]}")  # [count, item] framing
    for master in cluster_set.masters():
        with master_client(master.port) as node:
            node.script_flush()
    await transport.ready()
    commit = GroupCommit(transport, script, timeout=5.0)
    keys = spread(transport, "script")
    results = [await commit([key], []) for key in keys]
    assert results == [[key.encode()] for key in keys]
    for master in cluster_set.masters():
        with master_client(master.port) as node:
            assert node.script_exists(script.sha) == [True]
    with master_client(cluster_set.masters()[1].port) as node:
        node.script_flush()  # one master lost it (a restart, a promoted replica)
    assert [await commit([key], []) for key in keys] == [[key.encode()] for key in keys]
    await commit.aclose()
    await client.aclose()


@pytest.mark.integration
@NEEDS_7
async def test_cluster_transport_subscribes_on_every_master_and_merges(
    transport: ClusterTransport,
) -> None:
    await transport.ready()
    channels = spread(transport, "sub", 2)
    async with transport.subscribe(channels) as subscription:
        assert await subscription.read(QUIET) == []
        replies = await transport.run([["SPUBLISH", c, c.encode()] for c in channels])
        assert replies == [1] * len(channels)
        got = await read_until(subscription, len(channels))
    assert sorted(got) == sorted(c.encode() for c in channels)


@pytest.mark.integration
@NEEDS_7
async def test_cluster_transport_spreads_spublish_over_the_masters(
    cluster_set: RedisClusterSet, transport: ClusterTransport
) -> None:
    """Per-master command counts under a uniform load over 30 shards; no PUBLISH."""
    masters = cluster_set.masters()
    for master in masters:
        with master_client(master.port) as node:
            node.config_resetstat()
    await transport.ready()
    channels = [f"{{load|{n}}}:ch" for n in range(30)]
    for _ in range(20):
        await transport.run([["SPUBLISH", c, b"x"] for c in channels])
    counts = {}
    for master in masters:
        with master_client(master.port) as node:
            stats = node.info("commandstats")
        counts[master.port] = stats.get("cmdstat_spublish", {}).get("calls", 0)
        assert stats.get("cmdstat_publish", {}).get("calls", 0) == 0
    total = sum(counts.values())
    shares = {port: round(count / total, 3) for port, count in counts.items()}
    print(f"\nSPUBLISH per master (30 shards x 20 rounds): {counts}, shares {shares}")
    assert total == 600
    assert all(1 / 6 <= share <= 2 / 3 for share in shares.values()), shares


@pytest.mark.integration
@NEEDS_7
async def test_cluster_client_and_transport_use_the_url_password() -> None:
    """AUTH from the URL reaches every connection: map reads, round trips, subscriptions."""
    with RedisServer(args=("--cluster-enabled", "yes"), cluster_bus=True) as server:
        with redis.Redis(port=server.port) as node:  # the password once it is up
            node.config_set("requirepass", "s3cret")
        with redis.Redis(port=server.port, password="s3cret") as node:
            node.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            wait_until(lambda: cluster_ok(node), "the one-node cluster ok")
        url = f"redis://:s3cret@127.0.0.1:{server.port}/0"
        assert await is_cluster(url)
        client = cluster_client(url, 3.0)
        transport = ClusterTransport(client)
        try:
            async with transport.subscribe(["{pw}:ch"]) as subscription:
                assert await transport.run([["SPUBLISH", "{pw}:ch", b"hi"]]) == [1]
                assert await read_until(subscription, 1) == [b"hi"]
        finally:
            await transport.aclose()
            await client.aclose()
        anonymous = cluster_client(f"redis://127.0.0.1:{server.port}/0", 3.0)
        try:
            with pytest.raises(Exception, match="(?i)auth"):
                await ClusterTransport(anonymous).ready()
        finally:
            await anonymous.aclose()


@pytest.mark.integration
@NEEDS_7
async def test_cluster_client_and_transport_speak_tls(tmp_path: Path) -> None:
    """``rediss://`` reaches every connection: map reads, round trips, subscriptions."""
    files = tls_files(tmp_path)
    args = ("--cluster-enabled", "yes", "--tls-cluster", "yes")
    server = RedisServer(tls=files, args=args, cluster_bus=True)
    try:
        server.start()
    except TLSUnsupportedError as error:
        pytest.skip(f"{error}: install a redis-server built with TLS (Debian's is)")
    try:
        node = make_client(server.url, 3.0)  # the slots first: a cluster client needs them
        try:
            await node.execute_command("CLUSTER ADDSLOTSRANGE", 0, 16383)  # type: ignore[no-untyped-call, unused-ignore]
            async with asyncio.timeout(10):
                while not parsed_ok(await node.execute_command("CLUSTER INFO")):  # type: ignore[no-untyped-call, unused-ignore]
                    await asyncio.sleep(0.05)
        finally:
            await node.aclose()
        client = cluster_client(server.url, 3.0)
        transport = ClusterTransport(client)
        try:
            async with transport.subscribe(["{tls}:ch"]) as subscription:
                assert await transport.run([["SPUBLISH", "{tls}:ch", b"hi"]]) == [1]
                assert await read_until(subscription, 1) == [b"hi"]
        finally:
            await transport.aclose()
            await client.aclose()
    finally:
        server.close()
