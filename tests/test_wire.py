"""Raw RESP round trips on redis-py's connections: the one private name they read, replies
in order, error replies returned, and a connection dropped (then made again) whenever a
round trip does not finish."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from quart_wslb.testing import RedisServer
from quart_wslb.wire import Exchange, stream_of

pytestmark = pytest.mark.timeout(30)


@pytest.mark.integration
async def test_stream_of_a_real_connection_is_its_socket_reader(real_redis: Redis) -> None:
    """The one private redis-py name we read (``Connection._reader``) is still there."""
    connection = await real_redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        assert isinstance(stream_of(connection), asyncio.StreamReader)
    finally:
        await real_redis.connection_pool.release(connection)


async def test_exchange_is_not_supported_without_sockets() -> None:
    redis = fakeredis.FakeAsyncRedis()
    exchange = Exchange(redis)
    assert not await exchange.supported()
    assert redis.connection_pool._in_use_connections == set()  # handed back at once
    await redis.aclose()


@pytest.mark.integration
async def test_exchange_replies_in_order_with_errors_returned(
    real_redis: Redis, prefix: str
) -> None:
    exchange = Exchange(real_redis)
    assert await exchange.supported()
    key = f"{{{prefix}}}:n"
    commands: list[list[object]] = [["INCR", key] for _ in range(500)]
    commands += [["EVALSHA", "0" * 40, 0], ["HGET", key, "x"], ["EVAL", "return {1, {'a'}}", 0]]
    replies = await exchange.run(commands)
    assert replies[:500] == list(range(1, 501))
    assert isinstance(replies[500], NoScriptError)
    assert isinstance(replies[501], ResponseError)  # WRONGTYPE, returned rather than raised
    assert replies[502] == [1, [b"a"]]
    await exchange.aclose()
    await real_redis.delete(key)


@pytest.mark.integration
async def test_exchange_cancelled_mid_reply_drops_the_connection(
    real_redis: Redis, prefix: str
) -> None:
    """A reply that comes after its caller gave up never answers the next round trip."""
    exchange = Exchange(real_redis)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await exchange.run([["BLPOP", f"{{{prefix}}}:never", 1]])
    assert await exchange.run([["PING"]]) in ([b"PONG"], ["PONG"])
    assert await exchange.run([["ECHO", "x"]]) == [b"x"]
    await exchange.aclose()


@pytest.mark.integration
async def test_exchange_reconnects_after_its_connection_is_killed(
    private_redis: RedisServer,
) -> None:
    client = Redis.from_url(private_redis.url)
    exchange = Exchange(client)
    assert await exchange.run([["ECHO", "first"]]) == [b"first"]
    assert await client.client_kill_filter(_type="normal", skipme=True) == 1
    with pytest.raises(RedisConnectionError):
        await exchange.run([["PING"]])
    assert await exchange.run([["ECHO", "back"]]) == [b"back"]
    await exchange.aclose()
    await client.aclose()
