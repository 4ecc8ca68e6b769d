"""The private and version-dependent names of redis-py and hiredis (``quart_wslb._compat``):
each still there and behaving as relied on (these tests fail on a release that changes
one), and, where one is gone, a WARNING and redis-py's public path instead."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import hiredis
import pytest
from redis.asyncio import Connection, ConnectionPool, Redis
from redis.exceptions import BusyLoadingError, NoScriptError, ReadOnlyError, ResponseError

from quart_wslb import UserSelector, _compat
from quart_wslb.emitter import AsyncEmitter
from quart_wslb.outgoing import encode_frame
from quart_wslb.redis_client import make_client
from quart_wslb.testing import RedisServer
from quart_wslb.transport import ClientTransport, pick

from .support import PREFIX, SOON, in_use, make_app

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def fresh_check(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test checks anew, and leaves no (possibly broken) result cached behind it."""
    _compat.check.cache_clear()
    _compat.packing_connection.cache_clear()
    yield
    _compat.check.cache_clear()
    _compat.packing_connection.cache_clear()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_check_finds_every_name(caplog: pytest.LogCaptureFixture) -> None:
    """Fails on a release of a dependency that changes a name the fast paths use."""
    support = _compat.check()
    assert support == _compat.Support(
        raw=True, packing=True, errors=True, frames=True, problems=()
    )
    assert warnings_of(caplog) == []


@pytest.mark.integration
async def test_stream_of_a_real_connection_is_its_socket_reader(real_redis: Redis) -> None:
    connection = await _compat.get_connection(real_redis.connection_pool)
    try:
        assert isinstance(_compat.stream_of(connection), asyncio.StreamReader)
    finally:
        await real_redis.connection_pool.release(connection)


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("NOSCRIPT No matching script", NoScriptError),
        ("LOADING Redis is loading the dataset in memory", BusyLoadingError),
        ("READONLY You can't write against a read only replica.", ReadOnlyError),
        ("ERR unknown command", ResponseError),
    ],
)
def test_parse_error_classifies_as_redis_py_does(message: str, kind: type[Exception]) -> None:
    assert type(_compat.parse_error(message)) is kind


def test_packing_connection_packs_as_hiredis() -> None:
    connection_class = _compat.packing_connection()
    assert connection_class is not None
    command: tuple[Any, ...] = ("EVALSHA", "0" * 40, 1, b"k", 2.5)
    packed = connection_class().pack_command(*command)
    assert b"".join(packed) == hiredis.pack_command(command)


def without_push_notifications(monkeypatch: pytest.MonkeyPatch) -> None:
    """As with hiredis before 3.2."""
    monkeypatch.setattr(_compat, "PushNotification", _compat._NoPush)


def get_connection_needing_a_command_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """As with redis-py before 5.3."""

    async def get_connection(self: Any, command_name: str, *keys: Any) -> Any:
        raise AssertionError("never called")

    monkeypatch.setattr(ConnectionPool, "get_connection", get_connection)


def reader_without_not_enough_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hiredis whose Reader takes ``notEnoughData=`` but answers ``False`` anyway."""
    real = hiredis.Reader

    def reader(**options: Any) -> Any:
        options.pop("notEnoughData", None)
        return real(**options)

    monkeypatch.setattr(hiredis, "Reader", reader)


def connection_without_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Connection.__init__

    def init(self: Connection, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        del self._reader

    monkeypatch.setattr(Connection, "__init__", init)


@pytest.mark.parametrize(
    ("breakage", "named"),
    [
        (without_push_notifications, "has no PushNotification (3.2 has)"),
        (get_connection_needing_a_command_name, "ConnectionPool.get_connection() needs"),
        (connection_without_reader, "Connection has no _reader"),
        (reader_without_not_enough_data, "hiredis.Reader ignores notEnoughData"),
    ],
)
def test_check_raw_name_gone_warns_once_and_turns_raw_reads_off(
    breakage: Callable[[pytest.MonkeyPatch], None],
    named: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    breakage(monkeypatch)
    support = _compat.check()
    assert not support.raw and support.packing and support.errors
    (warning,) = warnings_of(caplog)
    assert named in warning and "PubSub" in warning, warning
    _compat.check()
    assert len(warnings_of(caplog)) == 1, "warned once per process"


def test_check_without_hiredis_packing_falls_back_to_redis_py(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_compat, "HiredisRespSerializer", None)
    support = _compat.check()
    assert support.raw and not support.packing
    assert _compat.packing_connection() is None
    client = make_client("redis://127.0.0.1:1/0", 1.0)
    assert client.connection_pool.connection_class is Connection
    assert any("HiredisRespSerializer" in w for w in warnings_of(caplog))


def test_check_without_parse_error_still_tells_noscript(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_compat, "BaseParser", None)
    assert not _compat.check().errors
    assert type(_compat.parse_error("NOSCRIPT No matching script")) is NoScriptError
    assert type(_compat.parse_error("LOADING later")) is ResponseError
    assert any("parse_error" in w for w in warnings_of(caplog))


@pytest.mark.integration
async def test_raw_reads_off_subscriber_and_sends_use_redis_py(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    real_redis: Redis,
    prefix: str,
) -> None:
    """With raw reads off, a real Redis is read through PubSub and pipelines, and works."""
    monkeypatch.setattr(_compat, "PushNotification", _compat._NoPush)
    transport = await pick(real_redis)
    assert isinstance(transport, ClientTransport)
    channel = f"{prefix}:fallback"
    async with transport.subscribe([channel]) as subscription:
        assert await real_redis.publish(channel, b"still heard") == 1
        got: list[bytes] = []
        async with asyncio.timeout(SOON):
            while not got:
                got += await subscription.read(0.05)
    assert got == [b"still heard"]
    assert any("PushNotification" in w for w in warnings_of(caplog))


@pytest.mark.integration
async def test_extension_and_emitter_check_on_start(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    private_redis: RedisServer,
) -> None:
    """The warning comes when the app starts serving (not at the first send), and a send
    across the fallback paths still reaches the client."""
    monkeypatch.setattr(_compat, "PushNotification", _compat._NoPush)
    client = Redis.from_url(private_redis.url)
    app, _ = make_app(client, "c1")
    try:
        async with app.test_app() as test_app:
            assert any("PushNotification" in w for w in warnings_of(caplog))
            async with test_app.test_client().websocket("/ws/red?user=ann") as ws:
                await asyncio.wait_for(ws.receive(), SOON)  # the greeting: registered
                emitter = AsyncEmitter(client, prefix=PREFIX)
                assert await emitter.send(UserSelector("ann"), "via pipelines") == 1
                assert await asyncio.wait_for(ws.receive(), SOON) == "via pipelines"
                await emitter.aclose()
    finally:
        await client.aclose()


async def test_emitter_checks_on_construction(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fake_redis: Redis
) -> None:
    monkeypatch.setattr(_compat, "PushNotification", _compat._NoPush)
    emitter = AsyncEmitter(fake_redis)
    assert any("PushNotification" in w for w in warnings_of(caplog))
    await emitter.aclose()


async def test_in_use_counts_the_connections_taken_from_a_pool() -> None:
    """``tests.support.in_use``, the tests' one reading of redis-py's pool internals."""
    redis = fakeredis.FakeAsyncRedis()
    pool = redis.connection_pool
    assert in_use(pool) == 0
    first, second = await _compat.get_connection(pool), await _compat.get_connection(pool)
    assert in_use(pool) == 2
    await pool.release(first)
    assert in_use(pool) == 1
    await pool.release(second)
    assert in_use(pool) == 0
    await redis.aclose()


class Written:
    """The events a detached Hypercorn stream writes (``_compat.detached_stream``)."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    async def __call__(self, event: Any) -> None:
        self.events.append(event)

    def data(self) -> bytes:
        """Every websocket byte written after the handshake's response."""
        return b"".join(bytes(e.data) for e in self.events if hasattr(e, "data"))


async def test_frame_writer_of_hypercorns_stream_writes_as_it_does() -> None:
    written = Written()
    stream = _compat.detached_stream(written)
    writer = _compat.frame_writer(stream.app_send)
    assert writer is not None and writer.ready()
    written.events.clear()
    await writer.write(encode_frame("hé") + encode_frame(b"\x00"))
    await stream.app_send({"type": "websocket.send", "text": "hé"})
    await stream.app_send({"type": "websocket.send", "bytes": b"\x00"})
    first, second, third = (bytes(e.data) for e in written.events)
    assert first == second + third  # pre-encoded frames: what Hypercorn writes for them


def test_frame_writer_none_when_permessage_deflate_was_negotiated() -> None:
    stream = _compat.detached_stream(Written(), b"permessage-deflate")
    assert _compat.frame_writer(stream.app_send) is None


def test_frame_writer_none_for_another_server() -> None:
    async def send(event: Any) -> None: ...

    class Protocol:  # as uvicorn's: the ASGI send is a method of its protocol
        async def asgi_send(self, event: Any) -> None: ...

    assert _compat.frame_writer(send) is None
    assert _compat.frame_writer(Protocol().asgi_send) is None


async def test_frame_writer_not_ready_once_closing() -> None:
    stream = _compat.detached_stream(Written())
    writer = _compat.frame_writer(stream.app_send)
    assert writer is not None
    await stream.app_send({"type": "websocket.close", "code": 1000, "reason": ""})
    assert not writer.ready()


def test_check_without_hypercorns_stream_writes_asgi_events(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stream = _compat.detached_stream(Written())
    monkeypatch.setattr(_compat, "WSStream", None)
    support = _compat.check()
    assert not support.frames and support.raw and support.packing and support.errors
    assert _compat.frame_writer(stream.app_send) is None
    (warning,) = warnings_of(caplog)
    assert "WSStream" in warning and "websocket.send events" in warning, warning


@pytest.mark.parametrize(
    ("breakage", "named"),
    [
        (lambda frame: b"\x81\x00", "frames differ"),  # another encoding than wsproto's
        (lambda frame: 1 / 0, "no longer behaves"),  # anything failing
    ],
)
def test_check_frames_unlike_wsprotos_turn_the_fast_path_off(
    breakage: Callable[[Any], bytes],
    named: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(_compat, "encode_frame", breakage)
    assert not _compat.check().frames
    (warning,) = warnings_of(caplog)
    assert named in warning, warning


def test_check_extensions_not_told_apart_turn_the_fast_path_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_compat, "_extended", lambda connection: False)
    assert not _compat.check().frames
    assert any("permessage-deflate" in w for w in warnings_of(caplog))
