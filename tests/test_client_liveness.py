"""Client liveness: application-level pings for quiet clients, an idle timeout for silent
ones."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest
from quart.testing.connections import WebsocketDisconnectError

from quart_wslb.client_liveness import IDLE_CLOSE, ClientLiveness
from quart_wslb.connection import Activity, Connection
from tests.support import SOON, FakeWebsocket, eventually, make_connection, serving

PING = '{"type":"ping"}'


def quiet_connection(socket: FakeWebsocket, id: str, silent_since: float) -> Connection:
    connection = make_connection(socket, id=id)
    connection.activity = Activity(received=silent_since)
    connection.activity.accepted.set()
    return connection


def liveness(
    *connections: Connection, ping: float | None = None, idle: float | None = None
) -> ClientLiveness:
    local = {connection.id: connection for connection in connections}
    return ClientLiveness(local, ping_interval=ping, ping_message=PING, idle_timeout=idle)


@pytest.mark.parametrize(
    ("ping", "idle", "enabled", "period"),
    [
        (None, None, False, 0.25),
        (4.0, None, True, 1.0),
        (None, 2.0, True, 0.5),
        (8.0, 2.0, True, 0.5),
        (0.01, None, True, 0.05),
    ],
)
async def test_liveness_enabled_and_period(
    ping: float | None, idle: float | None, enabled: bool, period: float
) -> None:
    checker = liveness(ping=ping, idle=idle)
    assert checker.enabled is enabled
    assert checker.period == pytest.approx(period)


async def test_check_closes_silent_clients_with_4408() -> None:
    silent, chatty = FakeWebsocket(), FakeWebsocket()
    checker = liveness(
        quiet_connection(silent, "i1:silent", 0.0),
        quiet_connection(chatty, "i1:chatty", 95.0),
        idle=10.0,
    )
    await checker.check(100.0)
    await eventually(lambda: silent.closed == [(IDLE_CLOSE, "idle timeout")])
    assert chatty.closed == []


async def test_check_pings_quiet_clients_once_per_interval() -> None:
    quiet, chatty = FakeWebsocket(), FakeWebsocket()
    quiet_one = quiet_connection(quiet, "i1:quiet", 0.0)
    chatty_one = quiet_connection(chatty, "i1:chatty", 99.0)
    checker = liveness(quiet_one, chatty_one, ping=5.0)
    quiet_one.start()
    chatty_one.start()
    await checker.check(100.0)
    await checker.check(102.0)  # pinged 2 s ago: not again yet
    assert await quiet.wait_sent(1) == [PING]
    chatty_one.activity.received = 104.0  # the client spoke
    await checker.check(105.0)
    assert await quiet.wait_sent(2) == [PING, PING]
    await asyncio.sleep(0.01)
    assert chatty.sent == []
    assert quiet.closed == chatty.closed == []
    await quiet_one.stop()
    await chatty_one.stop()


async def test_check_idle_beats_ping() -> None:
    socket = FakeWebsocket()
    checker = liveness(quiet_connection(socket, "i1:x", 0.0), ping=1.0, idle=5.0)
    await checker.check(10.0)
    await eventually(lambda: socket.closed == [(IDLE_CLOSE, "idle timeout")])
    assert socket.sent == []


async def test_idle_client_is_closed_and_unregistered(fake_server: fakeredis.FakeServer) -> None:
    async with serving(fake_server, "i1", idle_timeout=0.2, ping_interval=0.1) as one:
        async with one.client.websocket("/ws/red?user=alice") as ws:
            async with asyncio.timeout(SOON):
                await ws.receive()  # the greeting
                assert await ws.receive() == PING
                with pytest.raises(WebsocketDisconnectError) as closed:
                    while True:
                        await ws.receive()
        assert closed.value.args == (IDLE_CLOSE,)
        assert one.wslb.local_connections == {}


async def test_talking_client_is_kept(fake_server: fakeredis.FakeServer) -> None:
    async with serving(fake_server, "i1", idle_timeout=0.2) as one:
        async with one.client.websocket("/ws/red?user=alice") as ws:
            async with asyncio.timeout(SOON):
                await ws.receive()  # the greeting
                for n in range(6):
                    await asyncio.sleep(0.1)
                    await ws.send(str(n))
                    assert await ws.receive() == f"echo:{n}"
            assert len(one.wslb.local_connections) == 1
