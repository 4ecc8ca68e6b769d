"""The one Redis transport, both ways: pipelined round trips with error replies returned,
subscriptions that hand over every message in order and end with an error once lost, and
connections dropped (then made again) whenever a round trip does not finish. Every test of
Redis behaviour runs on a real ``redis-server``, through :class:`SocketTransport` (replies
read off the socket) and :class:`ClientTransport` (redis-py's pipelines and ``PubSub``);
:func:`pick` chooses between them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from quart_wslb import _compat
from quart_wslb.subscriber import SubscriberClosedError, Subscription
from quart_wslb.testing import RedisServer
from quart_wslb.transport import ClientTransport, SocketTransport, Transport, pick
from tests.support import SOON, in_use

pytestmark = pytest.mark.timeout(30)
#: A read that finds nothing waits this long.
QUIET = 0.05
#: The transports, by name: the ``kind`` parameter of the tests.
KINDS: dict[str, Callable[[Redis], Transport]] = {
    "socket": SocketTransport,
    "client": ClientTransport,
}


@pytest.fixture(name="kind", params=sorted(KINDS))
def fixture_kind(request: pytest.FixtureRequest) -> str:
    """Which transport the test runs on."""
    kind: str = request.param
    return kind


@pytest.fixture(name="transport")
async def fixture_transport(kind: str, real_redis: Redis) -> Transport:
    """The ``kind`` transport of the real Redis (in both protocols)."""
    return KINDS[kind](real_redis)


@pytest.fixture(name="fresh_check")
def fixture_fresh_check() -> Iterator[None]:
    """``check()`` made anew, and no (possibly broken) result of it left behind."""
    _compat.check.cache_clear()
    yield
    _compat.check.cache_clear()


async def read_until(subscription: Subscription, count: int) -> list[bytes]:
    """Read (at most ``5 * SOON`` s in all) until ``count`` payloads came."""
    got: list[bytes] = []
    async with asyncio.timeout(SOON * 5):
        while len(got) < count:
            got += await subscription.read(QUIET)
    return got


async def no_pubsub_clients(redis: Redis) -> None:
    """Wait (at most ``SOON``) until Redis has no subscribed client left."""
    async with asyncio.timeout(SOON):
        while await redis.client_list(_type="pubsub"):
            await asyncio.sleep(0.01)


@pytest.mark.integration
async def test_transport_run_replies_in_order_with_errors_returned(
    transport: Transport, real_redis: Redis, prefix: str
) -> None:
    key = f"{{{prefix}}}:n"
    commands: list[list[object]] = [["INCR", key] for _ in range(500)]
    commands += [["EVALSHA", "0" * 40, 0], ["HGET", key, "x"], ["EVAL", "return {1, {'a'}}", 0]]
    replies = await transport.run(commands)
    assert replies[:500] == list(range(1, 501))
    assert isinstance(replies[500], NoScriptError)
    assert isinstance(replies[501], ResponseError)  # WRONGTYPE, returned rather than raised
    assert replies[502] == [1, [b"a"]]
    await transport.release()
    await real_redis.delete(key)


@pytest.mark.integration
async def test_transport_ready_then_run_then_release_hands_the_connection_back(
    transport: Transport, real_redis: Redis
) -> None:
    await transport.ready()
    assert await transport.run([["ECHO", "x"]]) == [b"x"]
    await transport.release()
    assert in_use(real_redis.connection_pool) == 0


@pytest.mark.integration
async def test_transport_cancelled_mid_reply_is_not_answered_by_the_next_round_trip(
    transport: Transport, prefix: str
) -> None:
    """A reply that comes after its caller gave up never answers the next round trip."""
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await transport.run([["BLPOP", f"{{{prefix}}}:never", 1]])
    assert await transport.run([["PING"]]) in ([b"PONG"], ["PONG"], [True])
    assert await transport.run([["ECHO", "x"]]) == [b"x"]
    await transport.release()


@pytest.mark.integration
async def test_transport_works_again_after_its_connection_is_killed(
    kind: str, private_redis: RedisServer
) -> None:
    client, admin = Redis.from_url(private_redis.url), Redis.from_url(private_redis.url)
    transport = KINDS[kind](client)
    assert await transport.run([["ECHO", "first"]]) == [b"first"]
    assert await admin.client_kill_filter(_type="normal", skipme=True) == 1
    try:  # the socket transport's held connection fails once; redis-py may reconnect
        await transport.run([["PING"]])
    except RedisConnectionError:
        pass
    assert await transport.run([["ECHO", "back"]]) == [b"back"]
    await transport.release()
    await admin.aclose()
    await client.aclose()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("kind", "step"),
    [("socket", "ready"), ("socket", "run"), ("client", "run")],  # client: ready waits for nothing
)
async def test_transport_cut_short_in_a_handshake_answers_the_next_round_trip_right(
    kind: str, step: str, private_redis: RedisServer
) -> None:
    """A caller gives up while the connection's handshake waits for a stalled Redis (in
    ``ready``, or in a round trip): those late replies must not answer the next round
    trip."""
    client = Redis.from_url(private_redis.url + "?client_name=wire")  # a reply to wait for
    admin = Redis.from_url(private_redis.url)
    transport = KINDS[kind](client)
    try:
        await admin.client_pause(500)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await (transport.ready() if step == "ready" else transport.run([["PING"]]))
        assert await admin.ping()  # the pause is over: the handshake's replies are out
        assert await transport.run([["ECHO", "next"]]) == [b"next"]
    finally:
        await transport.release()
        await admin.aclose()
        await client.aclose()


@pytest.mark.integration
async def test_transport_release_waits_for_a_round_trip_in_flight(
    transport: Transport, real_redis: Redis, prefix: str
) -> None:
    """The connection never goes back to the pool while a reply is still being read."""
    pool = real_redis.connection_pool
    slow = asyncio.create_task(transport.run([["BLPOP", f"{{{prefix}}}:never", "0.3"]]))
    async with asyncio.timeout(SOON):
        while not in_use(pool):
            await asyncio.sleep(0.005)
    await transport.release()
    assert in_use(pool) == 1  # still in use: BLPOP is being read
    assert await slow == [None]
    await transport.release()
    assert in_use(pool) == 0


@pytest.mark.integration
async def test_transport_subscribe_reads_in_order_and_closes(
    transport: Transport, real_redis: Redis, prefix: str
) -> None:
    channels = (f"{{{prefix}}}:one", f"{{{prefix}}}:two")
    payloads = [b"%d\n" % n + b"z" * 200 for n in range(3000)]
    async with transport.subscribe(channels) as subscription:
        assert await real_redis.pubsub_numsub(*channels) == [(c.encode(), 1) for c in channels]
        async with real_redis.pipeline(transaction=False) as pipe:
            for n, payload in enumerate(payloads):
                pipe.publish(channels[n % 2], payload)
            await pipe.execute()
        got = await read_until(subscription, len(payloads))
        assert len(await real_redis.client_list(_type="pubsub")) == 1
    assert got == payloads
    await no_pubsub_clients(real_redis)


@pytest.mark.integration
async def test_transport_subscription_drain_hands_out_everything_published_before(
    transport: Transport, real_redis: Redis, prefix: str
) -> None:
    """Unread messages (counted as delivered by Redis) come out of the drain, which
    ends once Redis confirmed the unsubscription: then nobody listens."""
    channels = (f"{{{prefix}}}:one", f"{{{prefix}}}:two")
    payloads = [b"%d" % n for n in range(500)]
    async with transport.subscribe(channels) as subscription:
        async with real_redis.pipeline(transaction=False) as pipe:
            for n, payload in enumerate(payloads):
                pipe.publish(channels[n % 2], payload)
            counted = await pipe.execute()
        assert counted == [1] * len(payloads)
        async with asyncio.timeout(SOON):
            got = await subscription.drain(SOON)
        assert await real_redis.pubsub_numsub(*channels) == [(c.encode(), 0) for c in channels]
    assert got == payloads


@pytest.mark.integration
async def test_transport_subscribe_silence_reads_nothing(
    transport: Transport, prefix: str
) -> None:
    async with transport.subscribe([f"{{{prefix}}}:quiet"]) as subscription:
        async with asyncio.timeout(SOON):
            assert await subscription.read(QUIET) == []


@pytest.mark.integration
async def test_transport_subscription_lost_delivers_what_came_before_then_raises(
    kind: str, private_redis: RedisServer
) -> None:
    """Redis closes the subscriber (as for its output buffer): every message it sent
    before is handed out, then the read raises (the socket transport says Redis closed
    it; redis-py's ``PubSub`` raises its own connection error)."""
    client = Redis.from_url(private_redis.url)
    try:
        async with KINDS[kind](client).subscribe(["c"]) as subscription:
            for n in range(50):
                await client.publish("c", b"%d" % n)
            assert await client.client_kill_filter(_type="pubsub") == 1
            got: list[bytes] = []
            async with asyncio.timeout(SOON):
                with pytest.raises(RedisConnectionError) as lost:
                    while True:
                        got += await subscription.read(QUIET)
        assert got == [b"%d" % n for n in range(50)]
        if kind == "socket":
            assert isinstance(lost.value, SubscriberClosedError)
    finally:
        await client.aclose()


@pytest.mark.integration
async def test_transport_subscribe_refused_is_an_error(
    kind: str, admin_redis_url: str, prefix: str
) -> None:
    """A subscription that Redis refuses (here: no permission) fails with Redis's error,
    and leaves no subscribed connection behind."""
    admin = Redis.from_url(admin_redis_url)
    user = f"{prefix}-nosub"
    try:
        await admin.acl_setuser(
            user, enabled=True, passwords=["+pw"], commands=["+@all"], reset_channels=True
        )
        client = Redis.from_url(admin_redis_url, username=user, password="pw")
        try:
            with pytest.raises(ResponseError, match="permissions"):
                async with KINDS[kind](client).subscribe((f"{{{prefix}}}:a", f"{{{prefix}}}:b")):
                    pass
            assert await client.ping()
        finally:
            await client.aclose()
        await no_pubsub_clients(admin)
    finally:
        await admin.acl_deluser(user)
        await admin.aclose()


async def assert_picks(
    redis: Redis, caplog: pytest.LogCaptureFixture, chosen: type[Transport], why: str
) -> None:
    """:func:`pick` chooses ``chosen`` for ``redis`` and says ``why`` (at INFO); the
    connection it looked at is back in the pool."""
    caplog.set_level(logging.INFO, "quart_wslb")
    assert type(await pick(redis)) is chosen
    assert why in caplog.text
    assert not in_use(redis.connection_pool)


@pytest.mark.integration
async def test_pick_reads_a_real_client_off_the_socket(
    real_redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await assert_picks(real_redis, caplog, SocketTransport, "parsed straight off the socket")


async def test_pick_goes_through_redis_py_without_sockets(
    fake_redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """fakeredis connections have no socket to read."""
    await assert_picks(fake_redis, caplog, ClientTransport, "have no socket to read")


@pytest.mark.integration
@pytest.mark.usefixtures("fresh_check")
async def test_pick_goes_through_redis_py_without_raw_reads(
    real_redis: Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_compat, "PushNotification", _compat._NoPush)
    assert isinstance(await pick(real_redis), ClientTransport)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("PushNotification" in w for w in warnings)  # what is missing (check())
    assert any("cannot serve raw reads" in w for w in warnings)  # what pick() chose


@pytest.mark.integration
async def test_pick_without_redis_raises_redis_error() -> None:
    with RedisServer() as server:
        url = server.url
    client = Redis.from_url(url)  # the server is gone
    with pytest.raises(RedisConnectionError):
        await pick(client)
    assert not in_use(client.connection_pool)
    await client.aclose()
