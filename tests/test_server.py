"""``WSLB_MAX_MESSAGE_SIZE`` reaches the ASGI server, which reads frames before the app."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from hypercorn.config import Config
from quart import Quart
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from quart_wslb import WsLoadBalance
from quart_wslb.server import hypercorn_config, server_options
from tests.cluster import Clients, Cluster

StartCluster = Callable[..., Cluster]
LIMIT = 256 * 1024
FRAGMENT = 64 * 1024
MESSAGE = 4 * 1024 * 1024  # far over the limit, under Hypercorn's own 16 MiB default


def test_server_options_carry_the_frame_limit() -> None:
    app = Quart(__name__)
    WsLoadBalance(app, max_message_size=12345)
    assert server_options(app) == {"websocket_max_message_size": 12345}


def test_hypercorn_config_sets_the_limit_and_keeps_the_rest() -> None:
    app = Quart(__name__)
    WsLoadBalance(app, max_message_size=4096)
    given = Config()
    given.bind = ["127.0.0.1:9999"]
    config = hypercorn_config(app, given)
    assert config is given
    assert (config.websocket_max_message_size, config.bind) == (4096, ["127.0.0.1:9999"])
    assert hypercorn_config(app).websocket_max_message_size == 4096


def test_server_options_need_the_extension() -> None:
    with pytest.raises(RuntimeError, match="WsLoadBalance"):
        server_options(Quart(__name__))


async def sent_before_close(client: ClientConnection) -> int:
    """Stream one message in fragments, each after the last was read; stop at the close.

    Returns how many payload bytes the client had sent when the server's close arrived.
    """
    sent = 0
    reading = asyncio.ensure_future(client.recv())

    async def fragments() -> AsyncIterator[bytes]:
        nonlocal sent
        while sent < MESSAGE and not reading.done():
            yield b"x" * FRAGMENT
            sent += FRAGMENT
            # Give the server time to read the fragment and answer before the next one.
            await asyncio.wait([reading], timeout=0.02)

    try:
        await client.send(fragments())
    except ConnectionClosed:
        pass
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(reading, 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    return sent


@pytest.mark.integration
@pytest.mark.timeout(90)
async def test_server_refuses_a_frame_at_the_configured_limit(
    start_cluster: StartCluster, clients: Clients
) -> None:
    cluster = start_cluster(1, WSLB_MAX_MESSAGE_SIZE=str(LIMIT))
    client, _ = await clients.join(cluster[0], "jo")
    sent = await sent_before_close(client)
    # The server closes once it holds more than LIMIT bytes; a fragment or two may be in
    # flight by then. Without the limit it reads the whole message first.
    assert sent <= LIMIT + 4 * FRAGMENT, f"{sent} bytes sent before the 1009 close"
