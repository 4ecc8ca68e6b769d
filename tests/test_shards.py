"""Sends over several shards (:mod:`quart_wslb.shards`): which shard gets which call, how
their replies add up; and end to end, three Hypercorn processes and real WebSocket
clients, on two topologies: one real Redis with ``WSLB_SHARDS=4``, and a loopback Redis
Cluster of 3 masters and 3 replicas with the cluster's default count of shards. Every
selector, query, membership change, disconnect and reap must do what it does with one
shard, with each connection's keys in its user's shard and every instance listening on
every shard's channels."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import redis
from redis.asyncio.cluster import RedisCluster
from websockets.asyncio.client import ClientConnection

from quart_wslb import AsyncEmitter, Emitter
from quart_wslb.contract import BROADCAST_REACHED, NO_INSTANCES
from quart_wslb.emitter import _by_id
from quart_wslb.keys import CLUSTER_SHARDS, Keys, shard_of
from quart_wslb.selectors import GroupSelector, UserSelector
from quart_wslb.shards import Routed, ShardedSends
from quart_wslb.testing import TLSUnsupportedError
from tests.cluster import Clients, Cluster, Where, assert_silent, receive, where_of
from tests.support import tls_files
from tests.topology import RedisClusterSet, redis_version, wait_until

pytestmark = [pytest.mark.timeout(180)]
StartCluster = Callable[..., Cluster]
SHARDS = 4
USERS = [f"user{n}" for n in range(12)]  # enough names to land in every one of 4 shards


@pytest.fixture(name="tls_cluster_set", scope="module")
def fixture_tls_cluster_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterSet]:
    """3 masters (no replicas: quicker) that speak TLS only, to clients and to each other,
    with one throwaway CA; its URL names the CA."""
    if redis_version() < (7,):
        pytest.skip(f"Redis Cluster's sharded pub/sub needs Redis 7, not {redis_version()}")
    cluster = RedisClusterSet(replicas=0, tls=tls_files(tmp_path_factory.mktemp("tls")))
    try:
        cluster.start()
    except TLSUnsupportedError as error:
        pytest.skip(f"{error}: install a redis-server built with TLS (Debian's is)")
    with cluster:
        yield cluster


@pytest.fixture(
    name="where", params=["redis", pytest.param("cluster", marks=pytest.mark.topology)]
)
def fixture_where(request: pytest.FixtureRequest, redis_url: str, admin_redis_url: str) -> Where:
    """One Redis with ``SHARDS`` shards, or the session's Redis Cluster."""
    return where_of(request, request.param, shards=SHARDS)


async def keys_of(where: Where, prefix: str) -> list[str]:
    return sorted(key.decode() for key in await where.scan(prefix))


async def start(
    start_cluster: StartCluster, clients: Clients, where: Where, **env: str
) -> tuple[Cluster, dict[str, tuple[ClientConnection, str]]]:
    """Three instances; ``USERS`` spread over them, in rooms red and blue."""
    cluster = start_cluster(3, url=where.url, **where.env, **env)
    joined = {}
    for n, user in enumerate(USERS):
        joined[user] = await clients.join(cluster[n % 3], user, "red" if n % 2 else "blue")
    return cluster, joined


def test_users_cover_every_shard() -> None:
    assert {shard_of(user, SHARDS) for user in USERS} == set(range(SHARDS))


class _Transport:
    """A transport that is never used: the calls are only planned."""


def planner(shards: int) -> ShardedSends:
    keys = Keys("t", shards=shards)
    return ShardedSends(keys, [_Transport()] * shards, None, 1.0, "o")  # type: ignore[list-item, arg-type]


def test_sharded_sends_calls_one_shard_for_a_user_and_every_shard_for_a_group() -> None:
    sends, keys = planner(SHARDS), Keys("t", shards=SHARDS)
    user = UserSelector("user5").compile(keys)
    ((shard, (call_keys, args, _)),) = sends._calls(user, ["id"], False)
    assert shard == shard_of("user5", SHARDS) and call_keys == [] and args == ["id", "Uuser5"]
    group = GroupSelector("g").compile(keys)
    calls = sends._calls(group, ["id"], False)
    assert [shard for shard, _ in calls] == list(range(SHARDS))
    assert [call[0] for _, call in calls] == [[view.group("g")] for view in keys.views]
    assert all(call[1] == ["id", "S3"] for _, call in calls), "one program, shard's own keys"


def test_sharded_sends_cut_a_list_of_ids_by_shard() -> None:
    sends = planner(SHARDS)
    ids = [f"i1:t{n}" for n in range(20)]
    program = _by_id(ids)
    calls = sends._calls(program, ["id"], True)
    listed = [id for _, (_, args, _) in calls for id in args[2:]]
    assert sorted(listed) == sorted(ids), "each id in exactly one call"
    for shard, (_, args, alone) in calls:
        assert args[1] == f"M{len(args) - 2}" and alone
        assert all(shard_of(str(id), SHARDS) == shard for id in args[2:])


def test_sharded_sends_one_shard_passes_the_program_as_it_is() -> None:
    keys = Keys("t")
    program = (GroupSelector("g") & UserSelector("u")).compile(keys)
    assert planner(1)._calls(program, ["id"], False) == [
        (0, (program.keys, ["id", *program.ops], False))
    ]


def test_routed_adds_up_the_shards_replies() -> None:
    routed = Routed()
    routed.add([2, 1, b"a", b"dead"])
    routed.add([3, 2, b"a", b"b"])
    routed.add([NO_INSTANCES, 0])
    assert (routed.routed, routed.instances, routed.unheard, routed.nobody) == (
        5,
        2,
        {b"dead"},
        False,
    )
    broadcast = Routed()
    broadcast.add([4, BROADCAST_REACHED, 3])
    broadcast.add([1, BROADCAST_REACHED, 2])
    assert (broadcast.routed, broadcast.instances) == (5, 3)
    nobody = Routed()
    nobody.add([NO_INSTANCES, 0])
    assert nobody.nobody and nobody.routed == 0


@pytest.mark.integration
async def test_shards_hold_each_connection_in_its_users_shard(
    start_cluster: StartCluster, clients: Clients, where: Where, prefix: str
) -> None:
    cluster, joined = await start(start_cluster, clients, where)
    keys = Keys(prefix, shards=where.shards)
    async with where.admin() as client:
        for user, (_, id) in joined.items():
            instance, _, token = id.partition(":")
            view = keys.of_user(user)
            assert keys.of_connection(id) is view, f"{id} is not in {user}'s shard"
            assert await client.hexists(view.records(instance), token), id
            assert (await client.hget(view.users, user)) == id.encode()
            for other in keys.views:
                if other is not view:
                    assert not await client.hexists(other.users, user)
        assert not await client.exists("{" + prefix + "}:users"), "no unsharded keys"
    found = await keys_of(where, prefix)
    roots = {key[: key.index("}") + 1] for key in found}
    assert roots == {view.users[: view.users.index("}") + 1] for view in keys.views}
    await clients.close()
    cluster.stop()
    assert await keys_of(where, prefix) == [], "a graceful stop leaves no key"


@pytest.mark.integration
async def test_shards_send_every_selector_once(
    start_cluster: StartCluster, clients: Clients, where: Where
) -> None:
    cluster, joined = await start(start_cluster, clients, where)
    everyone = [client for client, _ in joined.values()]
    red = [joined[u][0] for n, u in enumerate(USERS) if n % 2]
    assert await cluster[0].call("/join", {"selector": {"meta": {"room": "red"}}, "group": "g"})

    async def expect(
        selector: dict[str, Any], *got: ClientConnection, bound: bool = False
    ) -> None:
        """``got`` receive it once, nobody else; the count is exact, or with ``bound``
        an upper bound (index sets combined by ``&``, as with one shard)."""
        message = {"sel": selector}
        routed = await cluster[1].send(selector, message)
        assert routed >= len(got) if bound else routed == len(got), (selector, routed)
        for client in got:
            assert await receive(client) == message, selector
        await assert_silent(*(x for x in everyone if x not in got))

    await expect({"user": "user5"}, joined["user5"][0])
    await expect({"id": joined["user7"][1]}, joined["user7"][0])
    await expect({"meta": {"room": "red"}}, *red)
    await expect({"path": "/ws/blue"}, *(x for x in everyone if x not in red))
    await expect({"group": "g"}, *red)
    await expect({"all": True}, *everyone)
    await expect({"and": [{"group": "g"}, {"user": "user3"}]}, joined["user3"][0])
    await expect({"or": [{"user": "user0"}, {"group": "g"}]}, joined["user0"][0], *red)
    await expect({"and": [{"path": "/ws/red"}, {"meta": {"room": "blue"}}]}, bound=True)
    await expect({"room_prefix": "bl"}, *(x for x in everyone if x not in red))


@pytest.mark.integration
async def test_shards_queries_count_and_list_across_shards(
    start_cluster: StartCluster, clients: Clients, where: Where
) -> None:
    cluster, joined = await start(start_cluster, clients, where)
    red_users = sorted(u for n, u in enumerate(USERS) if n % 2)
    for selector, users in (
        ({"all": True}, sorted(USERS)),
        ({"meta": {"room": "red"}}, red_users),
        ({"user": "user4"}, ["user4"]),
        ({"or": [{"user": "user4"}, {"path": "/ws/red"}]}, sorted(["user4", *red_users])),
        ({"room_prefix": "re"}, red_users),
    ):
        result = await cluster[2].call("/query", {"selector": selector})
        assert result["count"] == len(users), selector
        assert result["users"] == users, selector
        assert sorted(c["id"] for c in result["connections"]) == sorted(
            joined[u][1] for u in users
        )
    instances = await cluster[0].call("/instances")
    assert [i["connections"] for i in instances] == [4, 4, 4]


@pytest.mark.integration
async def test_shards_join_leave_and_disconnect(
    start_cluster: StartCluster, clients: Clients, where: Where
) -> None:
    cluster, joined = await start(start_cluster, clients, where)
    members = ["user1", "user2", "user6", "user11"]
    selector = {"or": [{"or": [{"user": "user1"}, {"user": "user2"}]}, {"user": "user6"}]}
    selector = {"or": [selector, {"user": "user11"}]}
    assert await cluster[0].call("/join", {"selector": selector, "group": "vip"}) == {"matched": 4}
    assert await cluster[1].send({"group": "vip"}, "v") == 4
    for user in members:
        assert await receive(joined[user][0]) == "v"
    leave = {"selector": {"user": "user2"}, "group": "vip", "leave": True}
    assert await cluster[2].call("/join", leave) == {"matched": 1}
    assert await cluster[1].send({"group": "vip"}, "w") == 3
    for user in ("user1", "user6", "user11"):
        assert await receive(joined[user][0]) == "w"
    await assert_silent(joined["user2"][0])
    closed = await cluster[0].call(
        "/disconnect", {"selector": {"group": "vip"}, "code": 4001, "reason": "bye"}
    )
    assert closed == {"closed": 3}
    for user in ("user1", "user6", "user11"):
        client = joined[user][0]
        await asyncio.wait_for(client.wait_closed(), 5)
        assert client.close_code == 4001


@pytest.mark.integration
async def test_shards_survivors_reap_every_shard_of_a_crashed_instance(
    start_cluster: StartCluster, clients: Clients, where: Where, prefix: str
) -> None:
    cluster, joined = await start(
        start_cluster, clients, where, WSLB_HEARTBEAT_INTERVAL="0.2", WSLB_INSTANCE_TTL="1"
    )
    cluster[2].crash()
    keys = Keys(prefix, shards=where.shards)

    async def left() -> list[str]:
        async with where.admin() as client:
            found: list[str] = []
            for view in keys.views:
                found += [
                    k.decode() for k in cast(list[bytes], await client.hkeys(view.instances))
                ]
                if await client.hlen(view.records("i2")):
                    found.append(view.records("i2"))
        return found

    def reaped() -> bool:
        return "i2" not in asyncio.run(left())

    await asyncio.to_thread(wait_until, reaped, "i2 reaped in every shard", 20)
    assert await cluster[0].send({"all": True}, "after") == 8
    gone = [u for n, u in enumerate(USERS) if n % 3 == 2]
    result = await cluster[1].call("/query", {"selector": {"all": True}})
    assert result["users"] == sorted(u for u in USERS if u not in gone)
    stats = [await cluster[i].stats() for i in (0, 1)]
    assert sum(s.get("reaped", 0) for s in stats) == 1, "one signal for the instance"
    assert sum(s.get("reaped_connections", 0) for s in stats) == 4, stats


@pytest.mark.integration
async def test_shards_signed_group_send_arrives_once(
    start_cluster: StartCluster, clients: Clients, where: Where
) -> None:
    """Each shard routes its own copy of a message with the same id and MAC: none may be
    refused as a replay of another shard's."""
    cluster, joined = await start(start_cluster, clients, where, WSLB_SECRET="k1:" + "s" * 32)
    assert await cluster[2].send({"all": True}, "signed") == len(USERS)
    for client, _ in joined.values():
        assert await receive(client) == "signed"
    await assert_silent(*(client for client, _ in joined.values()))
    drops = [await cluster[i].stats() for i in range(3)]
    assert not [k for s in drops for k in s if k.startswith("dropped_")], drops


def commandstats(port: int) -> dict[str, int]:
    """Calls per command of the node on ``port`` since its stats were reset."""
    with redis.Redis(port=port, socket_timeout=5) as node:
        stats = node.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()}


@pytest.mark.integration
async def test_shards_spread_the_work_over_the_masters(
    start_cluster: StartCluster, clients: Clients, cluster_set: RedisClusterSet
) -> None:
    """A uniform workload of registrations, joins and user sends: every master of the
    cluster serves between 1/6 and 2/3 of its commands, and nobody PUBLISHes (a classic
    publish would cross the cluster bus to every node)."""
    for server in cluster_set.servers:
        with redis.Redis(port=server.port) as node:
            node.config_resetstat()
    cluster = start_cluster(3, url=cluster_set.url)
    users = [f"member{n}" for n in range(60)]
    joined = [await clients.join(cluster[n % 3], user, "red") for n, user in enumerate(users)]
    for n, user in enumerate(users):
        assert await cluster[n % 3].call("/join", {"selector": {"user": user}, "group": "g"})
        assert await cluster[(n + 1) % 3].send({"user": user}, [n]) == 1
    for n, (client, _) in enumerate(joined):
        assert await receive(client) == [n]
    masters = [server.port for server in cluster_set.masters()]
    calls = {port: commandstats(port) for port in masters}
    ours = {
        port: sum(n for name, n in stats.items() if name not in MEASURING)
        for port, stats in calls.items()
    }
    total = sum(ours.values())
    shares = {port: round(n / total, 3) for port, n in ours.items()}
    print(f"\ncommands per master: {ours} shares: {shares}")
    assert all(1 / 6 <= share <= 2 / 3 for share in shares.values()), shares
    every = [commandstats(server.port) for server in cluster_set.servers]
    assert not [stats["publish"] for stats in every if "publish" in stats], "a classic PUBLISH"
    assert sum(stats.get("spublish", 0) for stats in every) > 0, "sharded channels, not none"
    assert sum(stats.get("evalsha", 0) for stats in calls.values()) >= 3 * len(users)


def named_connections(port: int, name: str) -> list[dict[str, Any]]:
    """The clients of the node on ``port`` that called themselves ``name``."""
    with redis.Redis(port=port, socket_timeout=5) as node:
        return [c for c in node.client_list() if c.get("name") == name]


@pytest.mark.integration
async def test_shards_sends_share_one_connection_per_master(
    cluster_set: RedisClusterSet, prefix: str
) -> None:
    """Concurrent sends over all of a cluster's shards (16, on 3 masters): each shard
    has its group commit, but their round trips share one connection per master, where
    a transport per shard held one on every master (17-18 connections per master
    measured then, 2-3 now)."""
    name = f"conns-{prefix}"
    url = f"{cluster_set.url}?client_name={name}"
    emitter = AsyncEmitter(redis_url=url, prefix=prefix, strict=False)
    users = [f"member{n}" for n in range(100)]
    try:
        await emitter.send(UserSelector("warm"), "w")  # detection, the layout, the map
        assert emitter.keys.shards == CLUSTER_SHARDS
        assert {shard_of(user, CLUSTER_SHARDS) for user in users} == set(range(CLUSTER_SHARDS))
        for _ in range(3):
            await asyncio.gather(*(emitter.send(UserSelector(user), "x") for user in users))
            await emitter.send(GroupSelector("g"), "y")  # every shard at once
        held = {
            server.port: named_connections(server.port, name) for server in cluster_set.masters()
        }
    finally:
        await emitter.aclose()
    counts = {port: len(clients) for port, clients in held.items()}
    sends = {port: sum(c["cmd"] == "evalsha" for c in clients) for port, clients in held.items()}
    print(f"\nconnections per master: {counts}; of which last ran EVALSHA: {sends}")
    assert len(counts) == 3
    # One for the sends; the cluster client's: its map of slots, the layout's reads.
    assert all(n <= 3 for n in counts.values()), counts
    assert all(n == 1 for n in sends.values()), sends


@pytest.mark.integration
async def test_shards_deliver_over_tls_through_every_master(
    start_cluster: StartCluster, clients: Clients, tls_cluster_set: RedisClusterSet, prefix: str
) -> None:
    """Two instances and an emitter given the ``rediss://`` URL of one node of a
    3-master cluster that speaks only TLS: registrations, every master's sharded
    subscriptions and sends, and the emitter's, all over TLS."""
    cluster = start_cluster(2, url=tls_cluster_set.url)
    users = [f"member{n}" for n in range(24)]
    joined = {user: await clients.join(cluster[0], user) for user in users}
    for n, user in enumerate(users):
        assert await cluster[1].send({"user": user}, [n]) == 1
    assert await cluster[1].send({"all": True}, "everyone") == len(users)
    emitter = AsyncEmitter(redis_url=tls_cluster_set.url, prefix=prefix)
    try:
        assert await emitter.send(UserSelector(users[0]), "from an emitter") == 1
    finally:
        await emitter.aclose()
    for n, user in enumerate(users):
        client = joined[user][0]
        assert await receive(client) == [n]
        assert await receive(client) == "everyone"
    assert await receive(joined[users[0]][0]) == "from an emitter"
    ca = tls_cluster_set.tls.ca if tls_cluster_set.tls else None
    for server in tls_cluster_set.masters():  # each master took its share, over TLS
        with redis.Redis(port=server.port, ssl=True, ssl_ca_certs=ca) as node:
            stats = node.info("commandstats")
        assert {"cmdstat_evalsha", "cmdstat_spublish", "cmdstat_ssubscribe"} <= stats.keys()


@pytest.mark.integration
async def test_shards_emitter_first_calls_at_once_find_the_cluster_once(
    cluster_set: RedisClusterSet, prefix: str
) -> None:
    """Many first calls of an emitter made from a cluster node's URL, all at once: one
    tells the cluster, and none fails on the client it replaced."""
    emitter = AsyncEmitter(redis_url=cluster_set.url, prefix=prefix, strict=False)
    try:
        outcomes = await asyncio.gather(
            *(emitter.send(UserSelector(f"member{n}"), "x") for n in range(50)),
            return_exceptions=True,
        )
        assert [o for o in outcomes if isinstance(o, BaseException)] == []
        assert isinstance(emitter._redis, RedisCluster)
    finally:
        await emitter.aclose()


#: Commands of the measurement itself, not of the workload.
MEASURING = frozenset({"info", "config|resetstat", "config", "cluster|slots", "cluster|nodes"})


@pytest.mark.integration
async def test_shards_emitters_made_from_a_url_find_the_cluster(
    start_cluster: StartCluster, clients: Clients, where: Where, prefix: str
) -> None:
    """An emitter given only the URL (and the shards) reaches the instances: on a cluster,
    it tells so at its first call and speaks to the cluster."""
    cluster, joined = await start(start_cluster, clients, where)
    shards = None if where.cluster else where.shards
    emitter = AsyncEmitter(redis_url=where.url, prefix=prefix, shards=shards)
    try:
        assert await emitter.send(UserSelector("user3"), "from an emitter") == 1
        assert await emitter.count() == len(USERS)
        assert emitter.keys.shards == where.shards
    finally:
        await emitter.aclose()
    assert await receive(joined["user3"][0]) == "from an emitter"

    def sync_send() -> int:
        with Emitter(redis_url=where.url, prefix=prefix, shards=shards) as sync:
            return sync.send(UserSelector("user4"), "from a sync emitter")

    assert await asyncio.to_thread(sync_send) == 1
    assert await receive(joined["user4"][0]) == "from a sync emitter"
