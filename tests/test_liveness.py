"""Fault injection: crashed instances, Redis restarts, killed subscribers, two reapers,
unreachable Redis and silent clients, against private redis-server processes and real
Hypercorn instances. Measured times are printed (run with ``-s``) for the failure-model
docs; the assertions hold the bounds that the docs promise."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import fakeredis
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from quart_wslb import AsyncEmitter, GroupSelector, UserSelector, signals
from quart_wslb.cluster import cluster_client
from quart_wslb.connection import Connection
from quart_wslb.keys import Keys
from quart_wslb.liveness import Liveness
from quart_wslb.local_index import LocalIndex
from quart_wslb.receiver import Receiver
from quart_wslb.registry import Registry
from quart_wslb.signal_sender import SignalSender
from quart_wslb.testing import RedisServer, free_port
from quart_wslb.transport import ClientTransport
from tests.cluster import Clients, Cluster, HttpError, Instance
from tests.proxy import FreezingProxy
from tests.support import (
    NO_MEMBERSHIP,
    FakeWebsocket,
    Recorder,
    eventually,
    held,
    make_connection,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
StartCluster = Callable[..., Cluster]
FAST = {"WSLB_HEARTBEAT_INTERVAL": "0.5", "WSLB_INSTANCE_TTL": "1.5", "WSLB_REDIS_TIMEOUT": "1"}


async def join(clients: Clients, instance: Instance, user: str) -> ClientConnection:
    return (await clients.join(instance, user))[0]


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float) -> float:
    """Seconds until ``check()`` holds; fails the test after ``timeout``."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def try_send(instance: Instance, user: str, message: object) -> int:
    """The routed count, or -1 while the instance answers 503 (Redis unreachable)."""
    try:
        return await instance.send({"user": user}, message)
    except HttpError as error:
        assert error.status == 503
        return -1


def report(what: str, seconds: float) -> None:
    print(f"\nMEASURED {what}: {seconds:.2f}s")


async def records_of(url: str, prefix: str, instance: str) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        return int(await client.hlen(Keys(prefix).records(instance)))
    finally:
        await client.aclose()


async def test_liveness_sigkill_instance_is_reaped_within_ttl(
    start_cluster: StartCluster, clients: Clients, private_redis: RedisServer, prefix: str
) -> None:
    cluster = start_cluster(3, url=private_redis.url, **FAST)
    victims = [await join(clients, cluster[0], f"v{n}") for n in range(5)]
    assert await records_of(private_redis.url, prefix, "i0") == 5
    cluster[0].crash()
    crashed = time.monotonic()

    async def send_returns_zero() -> bool:
        return await cluster[1].send({"user": "v0"}, "x") == 0

    async def records_reaped() -> bool:
        return await records_of(private_redis.url, prefix, "i0") == 0

    report("SIGKILL -> send returns 0", await wait_until(send_returns_zero, 3.5))
    await wait_until(records_reaped, 1.5 + 2.0)
    report("SIGKILL -> records reaped", time.monotonic() - crashed)
    assert await cluster[1].call("/resolve", {"selector": {"all": True}}) == {}
    live = await cluster[1].call("/instances")
    assert sorted(i["id"] for i in live) == ["i1", "i2"]

    async def both_saw_it_leave() -> bool:
        return all([(await cluster[n].stats()).get("left_i0") == 1 for n in (1, 2)])

    await wait_until(both_saw_it_leave, 2.0)  # each survivor's next sweep
    survivors = [await cluster[n].stats() for n in (1, 2)]
    assert sum(s.get("reaped", 0) for s in survivors) == 1  # exactly one survivor reaped it
    assert sum(s.get("offline_v0", 0) for s in survivors) == 1  # presence, once
    for client in victims:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(client.recv(), 5)


async def test_liveness_redis_restart_recovers_without_reconnecting(
    start_cluster: StartCluster, clients: Clients, private_redis: RedisServer
) -> None:
    cluster = start_cluster(2, url=private_redis.url, **FAST)
    ann = await join(clients, cluster[0], "ann")
    bob = await join(clients, cluster[1], "bob")
    assert await cluster[1].send({"user": "ann"}, "before") == 1
    assert await asyncio.wait_for(ann.recv(), 5) == "before"
    private_redis.stop(kill=True)
    assert await try_send(cluster[1], "ann", "during") == -1  # a clear 503, not a hang
    private_redis.start()
    back = time.monotonic()

    async def delivered_both_ways() -> bool:
        return (
            await try_send(cluster[1], "ann", "after") == 1
            and await try_send(cluster[0], "bob", "after") == 1
        )

    await wait_until(delivered_both_ways, 5.0)
    report("Redis restart -> delivery again (both instances)", time.monotonic() - back)
    assert await asyncio.wait_for(ann.recv(), 5) == "after"
    assert await asyncio.wait_for(bob.recv(), 5) == "after"
    assert (await cluster[0].stats())["restored"] >= 1


async def test_liveness_groups_follow_reaping_and_redis_restarts(
    start_cluster: StartCluster, clients: Clients, private_redis: RedisServer
) -> None:
    cluster = start_cluster(3, url=private_redis.url, **FAST)
    members = [await join(clients, cluster[n], f"m{n}") for n in range(3)]
    for member in members:
        await member.send("join:crew")
        assert json.loads(await asyncio.wait_for(member.recv(), 5))["groups"] == ["crew"]
    assert await cluster[1].send({"group": "crew"}, "all three") == 3
    cluster[0].crash()

    async def two_left() -> bool:
        query = await cluster[1].call("/query", {"selector": {"group": "crew"}})
        return bool(query["count"] == 2)

    await wait_until(two_left, 1.5 + 2.0)  # the dead member left the group when reaped
    private_redis.stop(kill=True)
    private_redis.start()

    async def group_send() -> int:
        try:
            return await cluster[2].send({"group": "crew"}, "after restart")
        except HttpError:
            return -1

    async def restored() -> bool:
        return await group_send() == 2

    report("Redis restart -> group membership restored", await wait_until(restored, 5.0))
    for member in members[1:]:
        frames = [await asyncio.wait_for(member.recv(), 5) for _ in range(2)]
        assert frames[-1] == "after restart"


async def test_liveness_killed_subscriber_resubscribes(
    start_cluster: StartCluster, clients: Clients, private_redis: RedisServer
) -> None:
    cluster = start_cluster(2, url=private_redis.url, **FAST)
    cat = await join(clients, cluster[0], "cat")
    client = aioredis.Redis.from_url(private_redis.url)
    try:
        assert await client.client_kill_filter(_type="pubsub") == 2
    finally:
        await client.aclose()
    killed = time.monotonic()

    async def delivered() -> bool:
        return await cluster[1].send({"user": "cat"}, "again") == 1

    await wait_until(delivered, 5.0)
    report("CLIENT KILL TYPE pubsub -> delivery again", time.monotonic() - killed)
    assert await asyncio.wait_for(cat.recv(), 5) == "again"
    assert (await cluster[0].stats())["subscriber_lost"] >= 1


async def test_liveness_redis_unreachable_send_fails_fast_and_clients_stay(
    start_cluster: StartCluster, clients: Clients, private_redis: RedisServer
) -> None:
    cluster = start_cluster(2, url=private_redis.url, **FAST)
    dan = await join(clients, cluster[0], "dan")
    private_redis.stop(kill=True)
    started = time.monotonic()
    with pytest.raises(HttpError) as failed:
        await cluster[1].send({"user": "dan"}, "x")
    elapsed = time.monotonic() - started
    report("send with Redis down -> RedisUnavailableError", elapsed)
    assert failed.value.status == 503
    assert elapsed < 1.0 + 3.0, f"a send took {elapsed:.2f}s with WSLB_REDIS_TIMEOUT=1"
    await dan.send("still here?")  # the handler sends to the room: fails, but stays open
    await dan.ping()
    private_redis.start()


async def test_liveness_redis_frozen_send_fails_within_timeout(
    start_cluster: StartCluster, clients: Clients, private_redis: RedisServer
) -> None:
    cluster = start_cluster(2, url=private_redis.url, **FAST)
    await join(clients, cluster[0], "eve")
    assert private_redis.process is not None
    private_redis.process.send_signal(signal.SIGSTOP)  # accepts TCP, never answers
    try:
        started = time.monotonic()
        with pytest.raises(HttpError) as failed:
            await cluster[1].send({"user": "eve"}, "x")
        elapsed = time.monotonic() - started
    finally:
        private_redis.process.send_signal(signal.SIGCONT)
    report("send with Redis frozen -> RedisUnavailableError", elapsed)
    assert failed.value.status == 503
    assert 0.9 < elapsed < 1.0 + 3.0, f"a send took {elapsed:.2f}s with WSLB_REDIS_TIMEOUT=1"


async def test_liveness_outage_longer_than_ttl_reaps_nobody(
    start_cluster: StartCluster, clients: Clients, private_redis: RedisServer
) -> None:
    cluster = start_cluster(3, url=private_redis.url, **FAST)
    users = [await join(clients, cluster[n], f"u{n}") for n in range(3)]
    assert private_redis.process is not None
    private_redis.process.send_signal(signal.SIGSTOP)
    await asyncio.sleep(1.5 * 2)  # every heartbeat expires inside Redis meanwhile
    private_redis.process.send_signal(signal.SIGCONT)

    async def all_routable() -> bool:
        routed = [await try_send(cluster[(n + 1) % 3], f"u{n}", "back") for n in range(3)]
        return routed == [1, 1, 1]

    await wait_until(all_routable, 5.0)
    await asyncio.sleep(1.5 + 1.0)  # past the point where a hasty survivor would reap
    assert await all_routable()
    stats = [await cluster[n].stats() for n in range(3)]
    assert sum(s.get("reaped", 0) for s in stats) == 0
    assert sum(s.get(f"offline_u{n}", 0) for s in stats for n in range(3)) == 0
    for user in users:  # each socket stayed open and got what was routed to it
        assert await asyncio.wait_for(user.recv(), 5) == "back"


async def test_liveness_two_reapers_at_once_leave_nothing_behind(
    private_redis: RedisServer, prefix: str
) -> None:
    redis = aioredis.Redis.from_url(private_redis.url)
    keys = Keys(prefix)
    registry = Registry(redis, keys)
    dead = [_record(f"ghost:{n}", f"user{n % 7}", n) for n in range(1200)]
    await registry.register(*dead)
    await redis.hset(keys.instances, "ghost", json.dumps({"started_at": 1.0}))
    reapers = [_liveness(redis, keys, registry, name) for name in ("s1", "s2")]
    for reaper in reapers:
        await reaper.tick()
    await asyncio.sleep(1.5)  # healthy for a whole TTL: now they may reap
    assert all(r.may_reap() for r in reapers)
    await asyncio.gather(*(r.sweep() for r in reapers))
    assert [k async for k in redis.scan_iter(match="{" + prefix + "}:[cpmg]:*")] == []
    assert not await redis.exists(keys.users)
    assert await redis.hkeys(keys.instances) == []
    await redis.aclose()


async def test_liveness_instance_that_never_beat_is_reaped(
    private_redis: RedisServer, prefix: str
) -> None:
    """An instance that crashed after registering, before its first heartbeat."""
    redis = aioredis.Redis.from_url(private_redis.url)
    keys = Keys(prefix)
    registry = Registry(redis, keys)
    await registry.register(*[_record(f"early:{n}", f"user{n}", n) for n in range(20)])
    assert await redis.hget(keys.instances, "early") == b"{}"
    survivor = _liveness(redis, keys, registry, "s1")
    await survivor.tick()
    await asyncio.sleep(1.5)  # healthy for a whole TTL: now it may reap
    await survivor.sweep()
    assert await redis.exists(keys.records("early"), keys.users) == 0
    assert await redis.hkeys(keys.instances) == [b"s1"]
    await redis.aclose()


async def test_liveness_delist_keeps_an_instance_that_still_has_records(
    private_redis: RedisServer, prefix: str
) -> None:
    """A reaper that emptied an instance must not unlist it if it registered meanwhile:
    unlisted records would never be reaped."""
    redis = aioredis.Redis.from_url(private_redis.url)
    keys = Keys(prefix)
    registry = Registry(redis, keys)
    survivor = _liveness(redis, keys, registry, "s1")
    await registry.register(_record("late:1", "bob", 1))  # lists "late", no heartbeat
    assert not await survivor.delist("late")
    assert await redis.hexists(keys.instances, "late")
    await redis.set(keys.heartbeat("late"), "1")
    await registry.unregister(["late:1"])
    assert not await survivor.delist("late")  # it beats: not ours to unlist
    await redis.delete(keys.heartbeat("late"))
    assert await survivor.delist("late")
    assert not await redis.hexists(keys.instances, "late")
    await redis.aclose()


async def test_liveness_silent_subscriber_is_replaced(
    private_redis: RedisServer, prefix: str
) -> None:
    """A subscriber whose connection stays up but hears nothing (no error ever comes) is
    found by the probes it misses and subscribed again; delivery resumes."""
    interval = 0.3
    async with FreezingProxy(private_redis.port) as proxy:
        lost = Recorder()
        signals.subscriber_lost.connect(lost)
        redis = aioredis.Redis(port=proxy.port)
        keys = Keys(prefix)
        socket = FakeWebsocket()
        connection = make_connection(socket, id="solo:c1", user="ann")
        connection.start()
        local = held(connection, keys=keys)
        receiver = Receiver(redis, keys, "solo", local, SignalSender(None))
        liveness = Liveness(
            redis, keys, "solo", interval=interval, ttl=1.0, registry=Registry(redis, keys),
            receiver=receiver, local=local, sender=SignalSender(None),
        )  # fmt: skip
        receiver.on_subscribed(liveness.resubscribed)  # as the extension wires them
        await Registry(redis, keys).register(connection)
        connection.registering = False
        tasks = [asyncio.create_task(receiver.run()), asyncio.create_task(liveness.run())]
        try:
            async with asyncio.timeout(5):
                await receiver.subscribed.wait()
            emitter = AsyncEmitter(redis, prefix=prefix)
            assert await emitter.send(UserSelector("ann"), "before") == 1
            assert await socket.wait_sent(1) == ["before"]
            assert proxy.freeze() == proxy.subscribers[:1]
            frozen = time.monotonic()
            # Redis still counts the frozen subscriber, so sends are "routed", but lost;
            # so is the instruction to join a group made meanwhile.
            assert await emitter.send(UserSelector("ann"), "lost") == 1
            assert await emitter.join(UserSelector("ann"), "vip") == 1
            async with asyncio.timeout(10):
                while len(proxy.subscribers) < 2:  # a new SUBSCRIBE: the loop restarted
                    await asyncio.sleep(0.02)
                while receiver.missed_probes() or not receiver.subscribed.is_set():
                    await asyncio.sleep(0.02)
            report("silent subscriber replaced after", time.monotonic() - frozen)
            assert await emitter.send(UserSelector("ann"), "after") == 1
            assert await socket.wait_sent(2) == ["before", "after"]
            assert lost.reasons() == ["deaf"]
            # The groups came back from Redis when it subscribed again.
            await eventually(lambda: connection.groups == {"vip"})
            assert await emitter.send(GroupSelector("vip"), "to vip") == 1
            assert await socket.wait_sent(3) == ["before", "after", "to vip"]
            await emitter.aclose()
        finally:
            signals.subscriber_lost.disconnect(lost)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await connection.stop()
            await redis.aclose()


def _record(id: str, user: str, n: int) -> Connection:
    return Connection(
        id=id,
        user=user,
        path=f"/ws/{n % 3}",
        instance=id.split(":")[0],
        metadata={"room": str(n % 5)},
        websocket=None,  # type: ignore[arg-type]
        queue_size=1,
        policy="drop",
        sender=SignalSender(None),
        membership=NO_MEMBERSHIP,
    )


def _liveness(
    redis: Any, keys: Keys, registry: Registry, name: str, local: LocalIndex | None = None
) -> Liveness:
    """A liveness loop (not running) of instance ``name``, its receiver sharing ``local``
    (an empty index of its own when none is given)."""
    local = held(keys=keys) if local is None else local
    receiver = Receiver(redis, keys, name, local, SignalSender(None))
    return Liveness(
        redis, keys, name, interval=0.5, ttl=1.5, registry=registry, receiver=receiver,
        local=local, sender=SignalSender(None),
    )  # fmt: skip


async def test_liveness_idle_client_is_closed_and_pinged_client_stays(
    start_cluster: StartCluster, clients: Clients
) -> None:
    cluster = start_cluster(
        1, WSLB_PING_INTERVAL="0.3", WSLB_IDLE_TIMEOUT="1.2", WSLB_PING_MESSAGE="ping"
    )
    quiet = await join(clients, cluster[0], "quiet")
    chatty = await join(clients, cluster[0], "chatty")

    async def answer_pings() -> None:
        async for frame in chatty:
            if frame == "ping":
                await chatty.send("pong")

    answering = asyncio.create_task(answer_pings())
    try:
        assert await asyncio.wait_for(quiet.recv(), 2) == "ping"
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(quiet.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4408
        assert not answering.done()  # chatty is still open, answering pings
        assert await cluster[0].send({"user": "quiet"}, "x") == 0
        assert await cluster[0].send({"user": "chatty"}, "x") == 1
    finally:
        answering.cancel()
        await asyncio.gather(answering, return_exceptions=True)


@pytest.mark.parametrize(
    ("error", "level", "traceback"),
    [(RedisConnectionError("reset"), "WARNING", False), (RuntimeError("a bug"), "ERROR", True)],
)
async def test_liveness_failed_tick_is_logged_and_the_next_one_runs(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
    level: str,
    traceback: bool,
) -> None:
    redis = fakeredis.FakeAsyncRedis()
    liveness = _liveness(redis, Keys("t"), Registry(redis, Keys("t")), "solo")
    ticks = 0

    async def failing() -> None:
        nonlocal ticks
        ticks += 1
        raise error

    monkeypatch.setattr(liveness, "tick", failing)
    monkeypatch.setattr(liveness, "_interval", 0.01)
    task = asyncio.create_task(liveness.run())
    try:
        async with asyncio.timeout(2.0):
            while ticks < 2:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await redis.aclose()
    records = [r for r in caplog.records if "liveness tick failed" in r.getMessage()]
    assert records and {(r.levelname, r.exc_info is not None) for r in records} == {
        (level, traceback)
    }


async def test_liveness_regroup_cut_short_is_retried_by_the_next_tick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Groups taken from Redis after a resubscription: when Redis fails meanwhile, the
    next tick takes them, so a join made elsewhere while deaf is not missed for good."""
    redis = fakeredis.FakeAsyncRedis()
    keys = Keys("regroup")
    registry = Registry(redis, keys)
    connection = make_connection(id="solo:c1", user="ann")
    local = held(connection, keys=keys)
    liveness = _liveness(redis, keys, registry, "solo", local)
    await registry.register(connection)
    connection.registering = False
    connection.groups.add("vip")  # as Redis will record it: joined elsewhere
    await registry.register(connection)
    local.leave(connection, "vip")  # ... while this instance was not listening
    groups = registry.groups
    failures = [RedisConnectionError("cut")]

    async def flaky(instance: str) -> dict[str, frozenset[str]]:
        if failures:
            raise failures.pop()
        return await groups(instance)

    monkeypatch.setattr(registry, "groups", flaky)
    with pytest.raises(RedisConnectionError):
        await liveness.resubscribed()
    assert connection.groups == set()
    await liveness.tick()
    assert connection.groups == {"vip"}
    assert local.resolve(["S" + keys.group("vip")]) == [connection]
    await redis.aclose()


class _OneAtATime(ClientTransport):
    """A transport that counts how many round trips run at once (each one yields to the
    loop mid-way, as a socket read does)."""

    def __init__(self, redis: Any) -> None:
        super().__init__(redis)
        self.running = self.most = 0

    async def run(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0.01)
            return await super().run(commands)
        finally:
            self.running -= 1


async def test_liveness_round_trips_of_its_callers_never_overlap() -> None:
    """The tick, a resubscription's callback (in the subscriber's task) and a request's
    ``instances()`` share the loop's transport, which takes one round trip at a time: on
    a socket, two at once read each other's replies (or fail: "read() called while
    another coroutine is already waiting"), and one that ends hands the connection back
    to the pool while the other still reads it."""
    redis = fakeredis.FakeAsyncRedis()
    keys = Keys("overlap", shards=4)
    registry = Registry(redis, keys)
    transport = _OneAtATime(redis)
    receiver = Receiver(redis, keys, "solo", held(keys=keys), SignalSender(None))
    liveness = Liveness(
        redis, keys, "solo", interval=0.5, ttl=1.5, registry=registry, receiver=receiver,
        local=held(keys=keys), sender=SignalSender(None), transport=transport,
    )  # fmt: skip
    try:
        async with asyncio.timeout(5):
            await asyncio.gather(liveness.tick(), liveness.resubscribed(), liveness.instances())
        assert [info.id for info in await liveness.instances()] == ["solo"]
    finally:
        await redis.aclose()
    assert transport.most == 1, f"{transport.most} round trips at once"


class _Stuck(ClientTransport):
    """A transport whose first round trip hangs in ``stuck_in`` (``run``, or the
    ``release`` after it) until ``unstick`` is set; counts releases."""

    def __init__(self, redis: Any, stuck_in: str) -> None:
        super().__init__(redis)
        self.stuck_in, self.unstick, self.releases = stuck_in, asyncio.Event(), 0
        self.started = asyncio.Event()

    async def run(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        await self._maybe_stick("run")
        return [b"PONG" for _ in commands]

    async def release(self) -> None:
        self.releases += 1
        await self._maybe_stick("release")

    async def _maybe_stick(self, step: str) -> None:
        if self.stuck_in == step and not self.started.is_set():
            self.started.set()
            await self.unstick.wait()


def _liveness_on(redis: Any, transport: _Stuck, timeout: float) -> Liveness:
    """A liveness loop on ``transport``, with ``timeout`` as the Redis timeout."""
    keys = Keys("stuck")
    liveness = _liveness(redis, keys, Registry(redis, keys), "solo")
    liveness._transport, liveness._timeout = transport, timeout
    return liveness


async def _behind_a_stuck_one(
    liveness: Liveness, transport: _Stuck
) -> tuple[asyncio.Future[list[Any]], asyncio.Future[list[Any]], bool]:
    """A round trip that sticks, then another: both, and whether the other ended within
    2 s."""
    first = asyncio.ensure_future(liveness._run([[("PING",)]]))
    await asyncio.wait_for(transport.started.wait(), 2)
    second = asyncio.ensure_future(liveness._run([[("PING",)]]))
    done, _ = await asyncio.wait([second], timeout=2.0)
    return first, second, second in done


async def test_liveness_round_trip_waits_for_a_stuck_one_at_most_the_timeout() -> None:
    """On one Redis the loop's round trips take turns; one stuck where no timeout runs
    (here its release) holds the next for at most the Redis timeout, the wait for its
    turn included, so a request's instances() never waits without bound."""
    redis = fakeredis.FakeAsyncRedis()
    transport = _Stuck(redis, "release")
    liveness = _liveness_on(redis, transport, timeout=0.2)
    try:
        first, second, ended = await _behind_a_stuck_one(liveness, transport)
        assert ended, "the second round trip waited past 2 s for its turn"
        assert isinstance(second.exception(), TimeoutError), second.exception()
    finally:
        transport.unstick.set()
        await redis.aclose()
    await asyncio.gather(first, return_exceptions=True)


async def test_liveness_cluster_round_trips_go_side_by_side_and_keep_connections() -> None:
    """On a cluster the loop's transport is the instance's ClusterTransport, which takes
    round trips from several callers at once: one stuck (a hung master) holds no other,
    and none hands the masters' connections (the sends' too) back to the pool."""
    redis = cluster_client(f"redis://127.0.0.1:{free_port()}", 1.0)  # never connected
    transport = _Stuck(redis, "run")
    liveness = _liveness_on(redis, transport, timeout=1.0)
    try:
        first, second, ended = await _behind_a_stuck_one(liveness, transport)
        assert ended, "a round trip waited for one stuck on a hung master"
        assert second.result() == [b"PONG"]
        transport.unstick.set()
        assert await asyncio.wait_for(first, 2) == [b"PONG"]
        assert transport.releases == 0, f"{transport.releases} releases of the shared one"
    finally:
        transport.unstick.set()
        await redis.aclose()


@pytest.mark.parametrize("listening", [False, True], ids=["subscribing", "subscribed"])
async def test_liveness_probe_unheard_restarts_only_a_subscribed_subscriber(
    monkeypatch: pytest.MonkeyPatch, listening: bool
) -> None:
    """A probe nobody heard restarts a subscriber that says it listens (Redis dropped
    its subscription unasked); one still subscribing (a cluster's first subscription
    takes longer than the first beat) is left to finish, not restarted once it has."""
    redis = fakeredis.FakeAsyncRedis()
    keys = Keys("unheard")
    liveness = _liveness(redis, keys, Registry(redis, keys), "solo")
    receiver = liveness._receiver
    restarts: list[None] = []
    monkeypatch.setattr(receiver, "restart", lambda shards=None: restarts.append(shards))
    if listening:
        receiver.subscribed.set()
    try:
        async with asyncio.timeout(5):
            assert await liveness.beat() == (0, [0]), "nobody subscribes: the probe is unheard"
            await liveness.tick()
    finally:
        await redis.aclose()
    assert len(restarts) == listening


@pytest.mark.parametrize(
    ("listeners", "named"),
    [([1, 0, 1, 0], [1, 3]), ([0, 0, 0, 0], None), ([1, 1, 1, 1], None)],
    ids=["some-shards-unheard", "all-unheard", "heard-but-silent"],
)
async def test_liveness_tick_names_the_unheard_shards_to_the_restart(
    monkeypatch: pytest.MonkeyPatch, listeners: list[int], named: list[int] | None
) -> None:
    """A beat that failed on some shards (a cluster's hung master) restarts only
    theirs; when every shard is unheard, or the probes were missed in silence, all."""
    redis = fakeredis.FakeAsyncRedis()
    keys = Keys("t", shards=4)
    liveness = _liveness(redis, keys, Registry(redis, keys), "solo")
    restarts: list[list[int] | None] = []

    async def beat() -> tuple[int, list[int]]:
        return 0, listeners

    def restart(shards: Any = None) -> None:
        restarts.append(None if shards is None else list(shards))

    receiver = cast(Any, liveness)._receiver
    monkeypatch.setattr(liveness, "beat", beat)
    monkeypatch.setattr(receiver, "restart", restart)
    monkeypatch.setattr(receiver, "missed_probes", lambda: 2)
    monkeypatch.setattr(receiver, "silent_for", lambda: 10.0)
    receiver.subscribed.set()
    await liveness.tick()
    assert restarts == [named]
    await redis.aclose()


async def test_liveness_regroup_skips_a_connection_that_changed_while_redis_was_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The regroup after a resubscription runs beside the delivery: a join delivered
    while Redis was read is newer than the record read, which must not undo it; the
    next tick reads again."""
    redis = fakeredis.FakeAsyncRedis()
    keys = Keys("regroup-race")
    registry = Registry(redis, keys)
    connection = make_connection(id="solo:c1", user="ann")
    connection.registering = False
    local = held(connection, keys=keys)
    liveness = _liveness(redis, keys, registry, "solo", local)
    reads = [frozenset({"old"}), frozenset({"old", "new"})]

    async def groups(instance: str) -> dict[str, frozenset[str]]:
        if len(reads) == 2:  # the first read: a join is delivered meanwhile
            local.join(connection, "new")
        return {"solo:c1": reads.pop(0)}

    monkeypatch.setattr(registry, "groups", groups)
    await liveness.regroup()
    assert connection.groups == {"new"}, "the older record undid the join"
    assert cast(Any, liveness)._regroup_due
    await liveness.regroup()
    assert connection.groups == {"old", "new"}
    assert not cast(Any, liveness)._regroup_due
    await redis.aclose()


async def test_liveness_probe_out_during_a_resubscription_restarts_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A probe nobody heard because the subscriber resubscribed meanwhile tested the
    subscription before: the new one is not restarted."""
    redis = fakeredis.FakeAsyncRedis()
    keys = Keys("resubscribed")
    liveness = _liveness(redis, keys, Registry(redis, keys), "solo")
    receiver = cast(Any, liveness)._receiver
    restarts: list[object] = []
    receiver.subscribed.set()

    async def beat() -> tuple[int, list[int]]:
        receiver.subscriptions += 1  # subscribed again while the probe was out
        return 0, [0]

    monkeypatch.setattr(liveness, "beat", beat)
    monkeypatch.setattr(receiver, "restart", lambda shards=None: restarts.append(shards))
    await liveness.tick()
    assert restarts == []
    await redis.aclose()


async def test_liveness_beat_publishes_messages_received() -> None:
    """Each beat writes the receiver's count into the instance's record, in every shard:
    ``instances()`` (and an emitter's, for ``wslb watch``) reads it back."""
    redis = fakeredis.FakeAsyncRedis()
    keys = Keys("counted", shards=2)
    receiver = Receiver(redis, keys, "solo", held(keys=keys), SignalSender(None))
    liveness = Liveness(
        redis, keys, "solo", interval=0.5, ttl=1.5, registry=Registry(redis, keys),
        receiver=receiver, local=held(keys=keys), sender=SignalSender(None),
    )  # fmt: skip
    try:
        await liveness.beat()
        receiver.received = 41
        assert [info.received for info in await liveness.instances()] == [0]
        before = time.time()
        await liveness.beat()
        (info,) = await liveness.instances()
        assert (info.id, info.received, info.started_at) == ("solo", 41, liveness.started_at)
        assert before <= info.counted_at <= time.time()  # the beat's time, for rates
    finally:
        await liveness.aclose()
        await redis.aclose()
