"""The ASGI guard: oversized client frames close with 1009, server cancellation with 1001;
and the stray asyncio traceback of a cancelled connection is quieted."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import fakeredis
import pytest
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)
from quart.testing.connections import WebsocketDisconnectError

from quart_wslb import signals
from quart_wslb.asgi import (
    ACTIVITY,
    GOING_AWAY,
    MESSAGE_TOO_BIG,
    WebsocketGuard,
    quiet_cancelled_connections,
    server_unbounded,
    stray_cancellation,
    too_large,
)
from quart_wslb.connection import Activity
from quart_wslb.signal_sender import SignalSender
from tests.support import SOON, eventually, recording, registry_keys, serving

OWNER = SignalSender(object())


def ws_scope() -> Scope:
    return cast(Scope, {"type": "websocket", "path": "/ws/x"})


def text(value: str) -> ASGIReceiveEvent:
    return {"type": "websocket.receive", "bytes": None, "text": value}


def binary(value: bytes) -> ASGIReceiveEvent:
    return {"type": "websocket.receive", "bytes": value, "text": None}


@pytest.mark.parametrize(
    ("event", "limit", "expected"),
    [
        (binary(b"x" * 10), 10, False),
        (binary(b"x" * 11), 10, True),
        (binary(b""), 1, False),
        (text("x" * 10), 10, False),
        (text("x" * 11), 10, True),
        (text("x" * 2), 10, False),
        (text("é" * 5), 10, False),  # 10 bytes
        (text("é" * 6), 10, True),  # 6 characters, 12 bytes
        (text("😀" * 3), 12, False),  # 12 bytes
        (text("😀" * 3), 11, True),
        (text("a😀"), 4, True),  # 2 characters, 5 bytes
        (text(""), 1, False),
        (cast(ASGIReceiveEvent, {"type": "websocket.receive"}), 1, False),
    ],
)
def test_too_large_counts_utf8_bytes(event: ASGIReceiveEvent, limit: int, expected: bool) -> None:
    assert too_large(event, limit) is expected


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (binary(b"x" * 11), True),
        (binary(b"x" * 10), False),
        (text("x" * 11), True),
        (text("é" * 6), False),  # 12 bytes, but 6 characters: what Hypercorn counts
    ],
)
def test_server_unbounded_counts_what_the_server_counts(
    event: ASGIReceiveEvent, expected: bool
) -> None:
    assert server_unbounded(event, 10) is expected


class Harness:
    """Feeds events to a guarded app and records what it sends and receives."""

    def __init__(self, *events: ASGIReceiveEvent) -> None:
        self.incoming: asyncio.Queue[ASGIReceiveEvent] = asyncio.Queue()
        for event in events:
            self.incoming.put_nowait(event)
        self.sent: list[ASGISendEvent] = []
        self.seen: list[ASGIReceiveEvent] = []
        #: Set once the app asks for an event: it is running, past its accept.
        self.reading = asyncio.Event()

    async def receive(self) -> ASGIReceiveEvent:
        self.reading.set()
        return await self.incoming.get()

    async def wait_reading(self) -> None:
        async with asyncio.timeout(SOON):
            await self.reading.wait()

    async def send(self, event: ASGISendEvent) -> None:
        self.sent.append(event)

    def app(self, *, accept: bool = True, reads: int = 10) -> WebsocketGuard:
        """A guarded app that accepts, then reads until a disconnect or ``reads`` events."""

        async def inner(
            scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
        ) -> None:
            if accept:
                await send({"type": "websocket.accept", "subprotocol": None, "headers": []})
            for _ in range(reads):
                event = await receive()
                self.seen.append(event)
                if event["type"] == "websocket.disconnect":
                    return

        return WebsocketGuard(inner, 10, OWNER)


def closes(events: list[ASGISendEvent]) -> list[int | None]:
    return [cast(dict[str, Any], e).get("code") for e in events if e["type"] == "websocket.close"]


async def test_guard_closes_oversized_frame_with_1009() -> None:
    harness = Harness(text("ok"), binary(b"x" * 11), text("never read"))
    with recording(signals.message_dropped, OWNER) as dropped:
        await harness.app()(ws_scope(), harness.receive, harness.send)
    assert closes(harness.sent) == [MESSAGE_TOO_BIG]
    assert harness.seen == [
        text("ok"),
        {"type": "websocket.disconnect", "code": MESSAGE_TOO_BIG},
    ]
    assert dropped.reasons() == ["too_large"]
    assert "/ws/x" in dropped.calls[0]["detail"]


async def test_guard_warns_once_that_the_server_let_a_frame_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def unbounded() -> list[str]:
        return [r.message for r in caplog.records if "its own limit is higher" in r.message]

    guard = Harness().app()
    with caplog.at_level(logging.WARNING, logger="quart_wslb"):
        for event in (text("é" * 6), binary(b"x" * 11), binary(b"x" * 11)):
            harness = Harness(event)
            guard.app = harness.app().app  # a fresh connection through the same guard
            await guard(ws_scope(), harness.receive, harness.send)
            assert closes(harness.sent) == [MESSAGE_TOO_BIG]
            if event.get("text") is not None:
                assert unbounded() == []  # the server cannot count UTF-8 bytes of text
    assert len(unbounded()) == 1


async def test_guard_passes_small_frames_untouched() -> None:
    events = [text("é" * 5), binary(b"0123456789"), {"type": "websocket.disconnect", "code": 1000}]
    harness = Harness(*cast(list[ASGIReceiveEvent], events))
    await harness.app()(ws_scope(), harness.receive, harness.send)
    assert harness.seen == events
    assert closes(harness.sent) == []


async def test_guard_leaves_other_scopes_alone() -> None:
    got: list[tuple[Scope, Callable[..., Any], Callable[..., Any]]] = []

    async def inner(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        got.append((scope, receive, send))

    harness = Harness()
    scope = cast(Scope, {"type": "http", "path": "/"})
    await WebsocketGuard(inner, 10, OWNER)(scope, harness.receive, harness.send)
    assert got == [(scope, harness.receive, harness.send)]


@pytest.mark.parametrize(("accept", "expected"), [(True, [GOING_AWAY]), (False, [])])
async def test_guard_cancellation_says_going_away_if_open(
    accept: bool, expected: list[int]
) -> None:
    harness = Harness()  # nothing to read: the app waits until it is cancelled
    task = asyncio.create_task(
        harness.app(accept=accept)(ws_scope(), harness.receive, harness.send)
    )
    await harness.wait_reading()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closes(harness.sent) == expected


async def test_guard_cancellation_after_close_sends_nothing_more() -> None:
    harness = Harness(binary(b"x" * 11))

    async def inner(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        await send({"type": "websocket.accept", "subprotocol": None, "headers": []})
        await receive()
        await asyncio.Event().wait()

    task = asyncio.create_task(
        WebsocketGuard(inner, 10, OWNER)(ws_scope(), harness.receive, harness.send)
    )
    await eventually(lambda: closes(harness.sent) == [MESSAGE_TOO_BIG])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closes(harness.sent) == [MESSAGE_TOO_BIG]


async def test_guard_in_app_closes_1009_and_unregisters(
    fake_server: fakeredis.FakeServer,
) -> None:
    async with serving(fake_server, "i1", max_message_size=16) as one:
        async with one.client.websocket("/ws/red?user=alice") as ws:
            async with asyncio.timeout(SOON):
                await ws.receive()  # the greeting: the connection is registered
                await ws.send("small")
                assert await ws.receive() == "echo:small"
                await ws.send("x" * 17)
                with pytest.raises(WebsocketDisconnectError) as closed:
                    await ws.receive()
        assert closed.value.args == (MESSAGE_TOO_BIG,)
        assert one.wslb.local_connections == {}
        assert not {key for key in await registry_keys(one.redis) if ":u:" in key}


async def test_guard_records_when_the_client_last_spoke() -> None:
    harness = Harness()
    scope = ws_scope()
    task = asyncio.create_task(harness.app()(scope, harness.receive, harness.send))
    await harness.wait_reading()
    activity = cast(dict[str, Any], scope)[ACTIVITY]
    assert isinstance(activity, Activity)
    created = activity.received
    spoke = time.monotonic()
    await harness.incoming.put(text("hi"))
    await harness.incoming.put({"type": "websocket.disconnect", "code": 1000})
    await task
    assert activity.received >= spoke > created


async def cancel_a_connection() -> None:
    """What Hypercorn does to a websocket its graceful timeout left open: a connection's
    task (an ``asyncio.start_server`` callback) is cancelled while it waits."""
    started: asyncio.Queue[asyncio.Task[Any]] = asyncio.Queue()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        started.put_nowait(task)
        try:
            await reader.read()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        task = await asyncio.wait_for(started.get(), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)  # the task's done callbacks run now
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


async def test_quiet_cancelled_connections_drops_only_the_stray_cancellation() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    kept = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        await cancel_a_connection()  # not quieted: the stray report, where asyncio makes it
        stray = [context for context in reported if stray_cancellation(context)]
        assert len(stray) == (1 if sys.version_info < (3, 13) else 0), reported
        reported.clear()
        recording_handler = loop.get_exception_handler()
        restore = quiet_cancelled_connections()
        await cancel_a_connection()
        loop.call_exception_handler({"message": "a real error", "exception": ValueError()})
        restore()
        assert loop.get_exception_handler() is recording_handler
    finally:
        loop.set_exception_handler(kept)
    assert [context["message"] for context in reported] == ["a real error"]


def test_stray_cancellation_matches_only_the_stream_callback() -> None:
    callback = "Exception in callback StreamReaderProtocol.connection_made.<locals>.callback()"
    assert stray_cancellation({"message": callback, "exception": asyncio.CancelledError()})
    assert not stray_cancellation({"message": callback, "exception": ValueError()})
    other = "Exception in callback something_else()"
    assert not stray_cancellation({"message": other, "exception": asyncio.CancelledError()})
