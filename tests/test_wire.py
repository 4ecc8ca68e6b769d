"""Raw RESP round trips on redis-py's connections, what only :class:`Exchange` has: a
handshake cut short, and RESP3 pushes told from replies. What every transport does (replies
in order, errors returned, connections dropped and made again) is tested through both in
``tests/test_transport.py``; the redis-py names they rely on in ``tests/test_compat.py``."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from quart_wslb.testing import RedisServer
from quart_wslb.wire import Exchange, _read

pytestmark = pytest.mark.timeout(30)


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
