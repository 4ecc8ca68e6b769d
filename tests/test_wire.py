"""Raw RESP round trips on redis-py's connections: replies in order, error replies
returned, and a connection dropped (then made again) whenever a round trip does not finish.
The redis-py names they rely on are tested in ``tests/test_compat.py``."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import fakeredis
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from quart_wslb.testing import RedisServer
from quart_wslb.wire import Exchange, _read
from tests.support import in_use

pytestmark = pytest.mark.timeout(30)


async def test_exchange_is_not_supported_without_sockets() -> None:
    redis = fakeredis.FakeAsyncRedis()
    exchange = Exchange(redis)
    assert not await exchange.supported()
    assert not in_use(redis.connection_pool)  # handed back at once
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
    await exchange.release()
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
    await exchange.release()


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
    await exchange.release()
    await client.aclose()


@pytest.mark.integration
@pytest.mark.parametrize("step", ["ready", "run"])
async def test_exchange_cut_short_in_its_handshake_connects_again(
    private_redis: RedisServer, step: str
) -> None:
    """A caller gives up while the connection's handshake waits for a stalled Redis:
    the handshake's late replies must not be read as the next round trip's."""
    client = Redis.from_url(private_redis.url + "?client_name=wire")  # a reply to wait for
    admin = Redis.from_url(private_redis.url)
    exchange = Exchange(client)
    try:
        await admin.client_pause(500)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await (exchange.ready() if step == "ready" else exchange.run([["PING"]]))
        assert await admin.ping()  # the pause is over: the handshake's replies are out
        assert await exchange.run([["ECHO", "next"]]) == [b"next"]
    finally:
        await exchange.release()
        await admin.aclose()
        await client.aclose()


class FakeConnection:
    """What ``_read`` needs of a connection: its stream."""

    def __init__(self, data: bytes) -> None:
        self._reader = asyncio.StreamReader()
        self._reader.feed_data(data)


async def test_read_skips_out_of_band_pushes() -> None:
    """A RESP3 push (client tracking, server notices) is nobody's reply."""
    data = b">2\r\n$10\r\ninvalidate\r\n*0\r\n+OK\r\n>1\r\n$1\r\nx\r\n:7\r\n"
    assert await _read(cast(Any, FakeConnection(data)), 2) == [b"OK", 7]


@pytest.mark.integration
async def test_exchange_release_waits_for_a_round_trip_in_flight(
    real_redis: Redis, prefix: str
) -> None:
    """The connection never goes back to the pool while a reply is still being read."""
    pool = real_redis.connection_pool
    exchange = Exchange(real_redis)
    slow = asyncio.create_task(exchange.run([["BLPOP", f"{{{prefix}}}:never", "0.3"]]))
    await asyncio.sleep(0.05)
    await exchange.release()
    assert in_use(pool) == 1  # still ours: BLPOP is being read
    assert await slow == [None]
    await exchange.release()
    assert in_use(pool) == 0
