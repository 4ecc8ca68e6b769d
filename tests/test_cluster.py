"""End to end: several Hypercorn processes and real WebSocket clients, on each topology
(tests/cluster.py's ``TOPOLOGIES``): one real Redis, a Redis Cluster of 3 masters and 3
replicas (16 shards, sharded channels), and a Sentinel set. Every test proves the same
behaviour on each; where it inspects Redis, it does so through :class:`Where`, which
knows where each topology keeps a key or a channel."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from quart_wslb.envelope import Envelope, encode
from tests.cluster import (
    TOPOLOGIES,
    Clients,
    Cluster,
    Instance,
    Where,
    assert_silent,
    receive,
    where_of,
)
from tests.support import record_ids

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]
StartCluster = Callable[..., Cluster]


@pytest.fixture(name="where", params=TOPOLOGIES)
def fixture_where(request: pytest.FixtureRequest, redis_url: str, admin_redis_url: str) -> Where:
    """The topology of this run of the test."""
    return where_of(request, request.param)


@pytest.fixture(name="start_cluster")
def fixture_start_cluster(start_cluster: StartCluster, where: Where) -> StartCluster:
    """``start_cluster`` of conftest, on ``where``: so every test of this module runs on
    every topology."""
    return partial(start_cluster, url=where.url, **where.env)


async def envelopes(cluster: Cluster) -> list[int]:
    return [int((await i.stats()).get("envelopes", 0)) for i in cluster.instances]


async def test_send_user_reaches_every_connection_of_the_user(
    start_cluster: StartCluster, clients: Clients
) -> None:
    cluster = start_cluster(3)
    alice0, _ = await clients.join(cluster[0], "alice", "red")
    alice2, _ = await clients.join(cluster[2], "alice", "blue")
    bob1, _ = await clients.join(cluster[1], "bob", "red")
    assert await cluster[1].send({"user": "alice"}, {"n": 1}) == 2
    assert await receive(alice0) == {"n": 1}
    assert await receive(alice2) == {"n": 1}
    await assert_silent(bob1)
    assert await envelopes(cluster) == [1, 0, 1]
    for client in (alice0, alice2, bob1):
        await client.close()


async def test_send_targeted_reaches_only_the_owning_instance(
    start_cluster: StartCluster, clients: Clients, where: Where, prefix: str
) -> None:
    cluster = start_cluster(3)
    carol, _ = await clients.join(cluster[0], "carol", "red")
    for n in range(20):
        assert await cluster[1].send({"user": "carol"}, {"n": n}) == 1
    assert [await receive(carol) for _ in range(20)] == [{"n": n} for n in range(20)]
    # every instance listens on its own channel (one per shard), and only the owner got
    # anything
    assert await envelopes(cluster) == [20, 0, 0]
    views = where.keys(prefix).views
    channels = [view.channel(i.id) for i in cluster.instances for view in views]
    assert await where.subscribers(channels) == [1] * 3 * len(views)
    assert await cluster[1].send({"user": "nobody"}, "x") == 0
    assert await envelopes(cluster) == [20, 0, 0]
    await carol.close()


async def test_send_every_selector_across_instances(
    start_cluster: StartCluster, clients: Clients
) -> None:
    cluster = start_cluster(3)
    a, a_id = await clients.join(cluster[0], "ann", "red")
    b, _ = await clients.join(cluster[1], "ben", "red")
    c, _ = await clients.join(cluster[2], "cat", "blue")
    everyone = (a, b, c)

    async def expect(selector: dict[str, Any], routed: int, *got: ClientConnection) -> None:
        message = {"sel": selector}
        assert await cluster[2].send(selector, message) == routed
        for client in got:
            assert await receive(client) == message
        await assert_silent(*(x for x in everyone if x not in got))

    await expect({"path": "/ws/red"}, 2, a, b)
    await expect({"id": a_id}, 1, a)
    await expect({"meta": {"room": "blue"}}, 1, c)
    await expect({"all": True}, 3, a, b, c)
    await expect({"and": [{"meta": {"room": "red"}}, {"user": "ben"}]}, 1, b)
    await expect({"or": [{"user": "ann"}, {"user": "cat"}]}, 2, a, c)
    await expect({"and": [{"user": "ann"}, {"user": "cat"}]}, 0)
    await expect({"id": "i0:no-such-connection"}, 0)
    for client in everyone:
        await client.close()


async def test_send_frames_keep_their_kind(start_cluster: StartCluster, clients: Clients) -> None:
    cluster = start_cluster(2)
    dan, _ = await clients.join(cluster[0], "dan", "red")
    assert await cluster[1].send({"user": "dan"}, "plain text") == 1
    assert await asyncio.wait_for(dan.recv(), 5) == "plain text"
    assert await cluster[1].send({"user": "dan"}, [1, "two"]) == 1
    assert await asyncio.wait_for(dan.recv(), 5) == '[1,"two"]'
    await dan.close()


async def test_send_binary_frame_across_instances(
    start_cluster: StartCluster, clients: Clients
) -> None:
    cluster = start_cluster(2)
    eve, _ = await clients.join(cluster[0], "eve", "red")
    assert await cluster[1].call("/send_raw?user=eve", b"\x00\xff") == {"routed": 1}
    assert await asyncio.wait_for(eve.recv(), 5) == b"\x00\xff"
    await eve.close()


async def test_handler_room_message_crosses_instances(
    start_cluster: StartCluster, clients: Clients
) -> None:
    cluster = start_cluster(2)
    fay, _ = await clients.join(cluster[0], "fay", "green")
    gus, _ = await clients.join(cluster[1], "gus", "green")
    await gus.send("hello from instance 1")
    expected = {"from": "gus", "text": "hello from instance 1"}
    assert await receive(fay) == expected
    assert await receive(gus) == expected
    await fay.close()
    await gus.close()


async def registry_size(where: Where, prefix: str) -> tuple[int, int, int]:
    """(records, ids the users hashes list, keys under the prefix other than instance
    bookkeeping), over every shard."""
    records = members = 0
    async with where.admin() as client:
        for view in where.keys(prefix).views:
            records += len(await record_ids(client, view))
            lists = cast(list[bytes], await client.hvals(view.users))
            members += sum(len(ids.split()) for ids in lists)
    bookkeeping = (b":instances", b":hb:", b":layout")
    names = await where.scan(prefix)
    others = [n for n in names if not any(part in n for part in bookkeeping)]
    return records, members, len(others)


async def test_closed_connections_leave_the_registry(
    start_cluster: StartCluster, clients: Clients, where: Where, prefix: str
) -> None:
    cluster = start_cluster(2)
    hal, _ = await clients.join(cluster[0], "hal", "red")
    ivy, _ = await clients.join(cluster[1], "ivy", "blue")
    records, members, others = await registry_size(where, prefix)
    assert (records, members) == (2, 2)
    assert others > 2  # record hashes, users hash, path and metadata sets
    await hal.close()
    await ivy.send("close")  # the handler returns by itself
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ivy.recv(), 5)
    for _ in range(50):
        if await registry_size(where, prefix) == (0, 0, 0):
            break
        await asyncio.sleep(0.05)
    assert await registry_size(where, prefix) == (0, 0, 0)
    assert await cluster[1].send({"user": "hal"}, "x") == 0
    assert await cluster[0].send({"path": "/ws/blue"}, "x") == 0


async def test_oversized_client_frame_closes_with_1009(
    start_cluster: StartCluster, clients: Clients, where: Where, prefix: str
) -> None:
    cluster = start_cluster(1, WSLB_MAX_MESSAGE_SIZE="1000")
    jo, _ = await clients.join(cluster[0], "jo", "red")
    # 600 characters pass the server's limit (it counts characters); 1200 UTF-8 bytes
    # do not pass the guard's.
    await jo.send("é" * 600)
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(jo.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    for _ in range(50):
        if (await registry_size(where, prefix))[0] == 0:
            break
        await asyncio.sleep(0.05)
    assert (await registry_size(where, prefix))[0] == 0
    assert (await cluster[0].stats())["dropped_too_large"] == 1


async def test_malformed_envelope_is_dropped_and_delivery_goes_on(
    start_cluster: StartCluster, clients: Clients, where: Where, prefix: str
) -> None:
    cluster = start_cluster(2)
    kim, kim_id = await clients.join(cluster[0], "kim", "red")
    # i0's channel in the shard of kim's connection, where an emitter would publish
    channel = where.keys(prefix).of_connection(kim_id).channel("i0")
    good = encode(Envelope("m1", "test", "text", [kim_id], "still alive"))
    garbage_and_good = (
        b"",
        b"\xff\xfe",
        b"{}\n",
        b'{"v":99}\nx',
        b"not json\n",
        b"[" * 100_000 + b"\n",  # deep enough to make the JSON parser recurse out
        good,
    )
    for garbage in garbage_and_good:
        assert await where.publish(channel, garbage) == 1
    assert await asyncio.wait_for(kim.recv(), 5) == "still alive"
    assert (await cluster[0].stats())["dropped_malformed"] == 6
    assert (await cluster[0].stats()).get("subscriber_lost", 0) == 0
    assert await cluster[1].send({"user": "kim"}, "and after") == 1
    assert await asyncio.wait_for(kim.recv(), 5) == "and after"
    await kim.close()


async def test_graceful_stop_closes_1001_and_unregisters(
    start_cluster: StartCluster, clients: Clients, where: Where, prefix: str
) -> None:
    cluster = start_cluster(2)
    leo, _ = await clients.join(cluster[0], "leo", "red")
    mia, _ = await clients.join(cluster[1], "mia", "red")
    assert await asyncio.to_thread(cluster[0].stop) == 0
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(leo.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    records, members, _ = await registry_size(where, prefix)
    assert (records, members) == (1, 1)
    async with where.admin() as client:
        for view in where.keys(prefix).views:  # every shard lists the instances
            assert not await client.exists(view.heartbeat("i0")), view.shard
            assert await client.hkeys(view.instances) == [b"i1"], view.shard
    assert await cluster[1].send({"user": "leo"}, "x") == 0
    assert await cluster[1].send({"user": "mia"}, "x") == 1
    await mia.close()


async def test_many_users_many_instances_each_get_only_their_own(
    start_cluster: StartCluster, clients: Clients
) -> None:
    cluster = start_cluster(3)
    joined = [await clients.join(cluster[n % 3], f"user{n}") for n in range(12)]
    routed = await asyncio.gather(
        *(cluster[(n + 1) % 3].send({"user": f"user{n}"}, {"to": n}) for n in range(12))
    )
    assert routed == [1] * 12
    for n, (client, _) in enumerate(joined):
        assert await receive(client) == {"to": n}
    await assert_silent(*(client for client, _ in joined))
    assert await envelopes(cluster) == [4, 4, 4]


async def post(instance: Instance, path: str, body: dict[str, Any]) -> Any:
    return await instance.call(path, body)


async def test_groups_route_only_to_instances_with_members(
    start_cluster: StartCluster, clients: Clients, where: Where, prefix: str
) -> None:
    cluster = start_cluster(3)
    ann, ann_id = await clients.join(cluster[0], "ann")
    ben, _ = await clients.join(cluster[1], "ben")
    cat, cat_id = await clients.join(cluster[2], "cat")
    for client in (ann, cat):
        await client.send("join:lobby")
        assert (await receive(client))["groups"] == ["lobby"]
    assert await cluster[1].send({"group": "lobby"}, {"to": "lobby"}) == 2
    assert await receive(ann) == {"to": "lobby"}
    assert await receive(cat) == {"to": "lobby"}
    await assert_silent(ben)
    assert await envelopes(cluster) == [1, 0, 1]
    # join and leave from anywhere, by selector
    assert await post(cluster[0], "/join", {"selector": {"user": "ben"}, "group": "lobby"}) == {
        "matched": 1
    }
    body = {"selector": {"user": "ann"}, "group": "lobby", "leave": True}
    assert await post(cluster[2], "/join", body) == {"matched": 1}
    assert await cluster[0].send({"group": "lobby"}, "again") == 2
    assert await asyncio.wait_for(ben.recv(), 5) == "again"
    assert await asyncio.wait_for(cat.recv(), 5) == "again"
    await assert_silent(ann)
    # membership leaves with the connection
    await cat.close()
    query = await post(cluster[0], "/query", {"selector": {"group": "lobby"}})
    for _ in range(50):
        if query["count"] == 1:
            break
        await asyncio.sleep(0.05)
        query = await post(cluster[0], "/query", {"selector": {"group": "lobby"}})
    assert query["count"] == 1 and query["users"] == ["ben"]
    members: set[bytes] = set()
    async with where.admin() as client:
        for view in where.keys(prefix).views:
            members |= cast(set[bytes], await client.smembers(view.group("lobby")))
    assert cat_id.encode() not in members and ann_id.encode() not in members
    assert len(members) == 1


async def test_queries_return_records_counts_and_users(
    start_cluster: StartCluster, clients: Clients
) -> None:
    cluster = start_cluster(2)
    _, ann1 = await clients.join(cluster[0], "ann", "red")
    _, ann2 = await clients.join(cluster[1], "ann", "blue")
    bob, bob_id = await clients.join(cluster[1], "bob", "red")
    await bob.send("join:team")
    await receive(bob)
    everyone = await post(cluster[0], "/query", {"selector": {"all": True}})
    assert everyone["count"] == 3
    assert everyone["users"] == ["ann", "bob"]
    by_id = {r["id"]: r for r in everyone["connections"]}
    assert set(by_id) == {ann1, ann2, bob_id}
    assert by_id[bob_id]["instance"] == "i1"
    assert by_id[bob_id]["path"] == "/ws/red"
    assert by_id[bob_id]["metadata"] == {"room": "red"}
    assert by_id[bob_id]["groups"] == ["team"]
    assert by_id[ann1]["groups"] == [] and by_id[ann1]["user"] == "ann"
    red = await post(cluster[1], "/query", {"selector": {"meta": {"room": "red"}}})
    assert (red["count"], red["users"]) == (2, ["ann", "bob"])
    either = {"or": [{"user": "ann"}, {"group": "team"}]}
    assert (await post(cluster[0], "/query", {"selector": either}))["count"] == 3
    custom = await post(cluster[0], "/query", {"selector": {"room_prefix": "bl"}})
    assert [r["id"] for r in custom["connections"]] == [ann2]
    assert custom["count"] == 1


async def test_custom_selector_send_reaches_only_matches(
    start_cluster: StartCluster, clients: Clients
) -> None:
    cluster = start_cluster(2)
    red, _ = await clients.join(cluster[0], "ann", "red")
    reef, _ = await clients.join(cluster[1], "bob", "reef")
    blue, _ = await clients.join(cluster[1], "cat", "blue")
    assert await cluster[0].send({"room_prefix": "re"}, "custom") == 2
    assert await asyncio.wait_for(red.recv(), 5) == "custom"
    assert await asyncio.wait_for(reef.recv(), 5) == "custom"
    await assert_silent(blue)
    both = {"and": [{"room_prefix": "re"}, {"user": "bob"}]}
    assert await cluster[0].send(both, "narrow") == 1
    assert await asyncio.wait_for(reef.recv(), 5) == "narrow"
    await assert_silent(red, blue)


async def test_disconnect_user_on_two_instances(
    start_cluster: StartCluster, clients: Clients, where: Where, prefix: str
) -> None:
    cluster = start_cluster(3)
    kim0, _ = await clients.join(cluster[0], "kim")
    kim1, _ = await clients.join(cluster[1], "kim")
    other, _ = await clients.join(cluster[1], "lou")
    body = {"selector": {"user": "kim"}, "code": 4001, "reason": "kicked"}
    assert await post(cluster[2], "/disconnect", body) == {"closed": 2}
    for client in (kim0, kim1):
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(client.recv(), 5)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "kicked")
    for _ in range(50):
        if (await registry_size(where, prefix))[0] == 1:
            break
        await asyncio.sleep(0.05)
    assert (await registry_size(where, prefix))[0] == 1
    assert await cluster[2].send({"user": "kim"}, "x") == 0
    assert await cluster[2].send({"user": "lou"}, "still here") == 1
    assert await asyncio.wait_for(other.recv(), 5) == "still here"


async def test_presence_signals_fire_once_cluster_wide(
    start_cluster: StartCluster, clients: Clients
) -> None:
    cluster = start_cluster(2)
    first, _ = await clients.join(cluster[0], "max")
    second, _ = await clients.join(cluster[1], "max")

    async def counts(name: str) -> list[int]:
        return [int((await i.stats()).get(name, 0)) for i in cluster.instances]

    assert await counts("online_max") == [1, 0]
    await first.close()
    await asyncio.sleep(0.3)
    assert await counts("offline_max") == [0, 0]
    await second.close()
    for _ in range(50):
        if sum(await counts("offline_max")) == 1:
            break
        await asyncio.sleep(0.05)
    assert await counts("offline_max") == [0, 1]
    assert await counts("online_max") == [1, 0]


async def test_slow_client_never_stalls_the_others(
    start_cluster: StartCluster, clients: Clients
) -> None:
    cluster = start_cluster(2, WSLB_SEND_QUEUE_SIZE="4")
    fast, _ = await clients.join(cluster[0], "fast")
    # A client that completes the handshake, then never reads: its TCP window fills.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", cluster[0].port))
    handshake = (
        "GET /ws/red?user=slow HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, handshake.encode())
    try:
        big = "x" * 200_000
        for _ in range(40):  # 8 MB for a client that reads nothing
            await cluster[1].send({"user": "slow"}, big)
        started = time.monotonic()
        assert await cluster[1].send({"user": "fast"}, "still flowing") == 1
        assert await asyncio.wait_for(fast.recv(), 10) == "still flowing"
        took = time.monotonic() - started
        assert took < 3, f"a message to another client took {took:.2f}s past the slow one"
        stats = await cluster[0].stats()
        assert stats["dropped_queue_full"] >= 1  # the slow one was cut off, and said so

        async def slow_gone() -> bool:
            return await cluster[1].send({"user": "slow"}, "x") == 0

        for _ in range(100):
            if await slow_gone():
                break
            await asyncio.sleep(0.05)
        assert await slow_gone()  # closed with 1013, and out of the registry
    finally:
        sock.close()


async def test_send_many_arrives_in_order_across_instances(
    start_cluster: StartCluster, clients: Clients
) -> None:
    """A handler's send_many of more than one window: every message reaches its
    clients, in the order given, custom and group selectors included."""
    cluster = start_cluster(2)
    people = [
        (await clients.join(cluster[n % 2], f"u{n}", "red" if n % 2 else "blue"))[0]
        for n in range(6)
    ]
    # 200 messages a client: under the instances' send queue of 256.
    messages: list[list[Any]] = [[{"user": f"u{n % 6}"}, {"n": n}] for n in range(1200)]
    messages[600:600] = [[{"room_prefix": "bl"}, "custom"], [{"user": "nobody"}, "x"]]
    messages.append([{"or": [{"user": "u0"}, {"user": "u1"}]}, "both"])
    result = await post(cluster[1], "/send_many", {"messages": messages})
    assert result["routed"] == [1] * 600 + [3, 0] + [1] * 600 + [2]
    for n, client in enumerate(people):
        expected: list[Any] = [{"n": k} for k in range(n, 600, 6)]
        expected += ["custom"] * (n % 2 == 0) + [{"n": k} for k in range(600 + n, 1200, 6)]
        expected += ["both"] * (n < 2)
        assert [await receive(client) for _ in expected] == expected, n
    await assert_silent(*people)
