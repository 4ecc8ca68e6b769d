"""``current_connection``: the live connection inside a tracked handler, an error outside."""

from __future__ import annotations

import asyncio
import json

import fakeredis
import pytest
from quart import Quart, websocket

from quart_wslb import Connection, WsLoadBalance, current_connection, ws_route
from tests.support import PREFIX, SOON, fake_client

UNBOUND = "Not within a websocket handler tracked by @ws_route"


def test_current_connection_outside_a_handler_raises() -> None:
    with pytest.raises(RuntimeError, match=UNBOUND):
        current_connection.id  # noqa: B018


async def test_current_connection_is_the_live_connection(
    fake_server: fakeredis.FakeServer,
) -> None:
    redis = fake_client(fake_server)
    app = Quart(__name__)
    wslb = WsLoadBalance(app, redis=redis, instance_id="i1", prefix=PREFIX)
    seen: list[object] = []

    @app.websocket("/tracked")
    @ws_route(user=lambda: "ann")
    async def tracked() -> None:
        seen.append(current_connection._get_current_object())  # type: ignore[attr-defined]
        await current_connection.send(current_connection.id)
        await websocket.receive()

    @app.websocket("/plain")
    async def plain() -> None:
        try:
            current_connection.id  # noqa: B018
        except RuntimeError as error:
            await websocket.send(json.dumps(str(error)))

    async with app.test_app() as test_app:
        client = test_app.test_client()
        async with client.websocket("/tracked") as ws:
            async with asyncio.timeout(SOON):
                conn_id = await ws.receive()
            [connection] = seen
            assert isinstance(connection, Connection)
            assert connection.id == conn_id
            assert wslb.local_connections[conn_id] is connection
            assert connection.user == "ann"
        async with client.websocket("/plain") as ws:
            async with asyncio.timeout(SOON):
                assert UNBOUND in json.loads(await ws.receive())
    with pytest.raises(RuntimeError, match=UNBOUND):
        current_connection.id  # noqa: B018
    await redis.aclose()
