"""A live connection: its bounded queue, the queue-full policy, and its writer task."""

from __future__ import annotations

import asyncio
from typing import cast

import fakeredis
import pytest
from quart.wrappers import Websocket

from quart_wslb import signals
from quart_wslb.connection import SLOW_CLIENT_CLOSE, Connection, Outbox
from quart_wslb.envelope import Envelope, encode
from quart_wslb.router import Router
from tests.support import KEYS, SOON, FakeWebsocket, eventually, held, make_connection, recording

OWNER = object()


async def test_offer_bounded_queue_refuses_when_full() -> None:
    connection = make_connection(queue_size=2, policy="drop", owner=OWNER)
    assert await connection.offer("1", None)
    assert await connection.offer("2", None)
    assert not await connection.offer("3", "m3")


async def test_offer_drop_policy_drops_and_keeps_connection() -> None:
    socket = FakeWebsocket()
    connection = make_connection(socket, queue_size=1, policy="drop", owner=OWNER)
    with recording(signals.message_dropped, OWNER) as dropped:
        await connection.offer("kept", "m1")
        assert not await connection.offer("lost", "m2")
    assert socket.closed == []
    assert dropped.reasons() == ["queue_full"]
    assert dropped.calls[0]["message_id"] == "m2"
    assert dropped.calls[0]["connection"] is connection
    connection.start()
    assert await socket.wait_sent(1) == ["kept"]
    assert await connection.offer("later", None)
    assert await socket.wait_sent(2) == ["kept", "later"]
    await connection.stop()


async def test_offer_close_policy_closes_with_1013() -> None:
    socket = FakeWebsocket()
    connection = make_connection(socket, queue_size=1, policy="close", owner=OWNER)
    with recording(signals.message_dropped, OWNER) as dropped:
        await connection.offer("kept", None)
        assert not await connection.offer("lost", "m2")
    await eventually(lambda: socket.closed == [(SLOW_CLIENT_CLOSE, "send queue full")])
    assert SLOW_CLIENT_CLOSE == 1013
    assert dropped.reasons() == ["queue_full"]


async def test_offer_full_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    connection = make_connection(id="i1:slow", queue_size=1, policy="drop")
    await connection.offer("a", None)
    await connection.offer("b", None)
    assert "send queue of i1:slow is full" in caplog.text


async def test_writer_sends_in_order() -> None:
    socket = FakeWebsocket()
    connection = make_connection(socket, queue_size=100, owner=OWNER)
    connection.start()
    frames: list[str | bytes] = [f"m{n}" if n % 2 else bytes([n]) for n in range(50)]
    with recording(signals.message_delivered, OWNER) as delivered:
        for frame in frames:
            assert await connection.offer(frame, None)
        assert await socket.wait_sent(len(frames)) == frames
    await connection.stop()
    assert [call["frame"] for call in delivered.calls] == frames
    assert all(call["connection"] is connection for call in delivered.calls)


@pytest.mark.parametrize(
    ("message", "frame"), [("hi", "hi"), (b"\x00", b"\x00"), ({"a": [1]}, '{"a":[1]}')]
)
async def test_send_converts_message_to_frame(message: object, frame: str | bytes) -> None:
    socket = FakeWebsocket()
    connection = make_connection(socket)
    connection.start()
    await connection.send(message)
    assert await socket.wait_sent(1) == [frame]
    await connection.stop()


async def test_send_rejects_other_types() -> None:
    with pytest.raises(TypeError):
        await make_connection().send(42)


async def test_slow_client_does_not_stall_others(fake_server: fakeredis.FakeServer) -> None:
    slow_socket, fast_socket = FakeWebsocket(block=True), FakeWebsocket()
    slow = make_connection(slow_socket, id="i1:slow", queue_size=4, policy="drop", owner=OWNER)
    fast = make_connection(fast_socket, id="i1:fast", queue_size=4, policy="drop", owner=OWNER)
    slow.start()
    fast.start()
    redis = fakeredis.FakeAsyncRedis(server=fake_server)
    router = Router(redis, KEYS, "i1", held(slow, fast), OWNER)
    frames = [f"m{n}" for n in range(20)]
    with recording(signals.message_dropped, OWNER) as dropped:
        async with asyncio.timeout(SOON):
            for frame in frames:
                envelope = Envelope(frame, "i2", "text", None, frame, sel=["B"])
                await router.dispatch(encode(envelope))
                await asyncio.sleep(0)  # let the fast writer keep up
            assert await fast_socket.wait_sent(len(frames)) == frames
    assert slow_socket.sent == []
    assert set(dropped.reasons()) == {"queue_full"}
    assert {call["connection"] for call in dropped.calls} == {slow}
    assert slow_socket.closed == fast_socket.closed == []
    slow_socket.release.set()
    assert (await slow_socket.wait_sent(4))[:1] == ["m0"]
    await slow.stop()
    await fast.stop()
    await redis.aclose()


async def test_close_once_only() -> None:
    socket = FakeWebsocket()
    connection = make_connection(socket)
    await connection.close(4000, "bye")
    await connection.close(1000)
    await eventually(lambda: socket.closed == [(4000, "bye")])


async def test_close_failure_is_swallowed() -> None:
    class Unclosable(FakeWebsocket):
        async def close(self, code: int, reason: str = "") -> None:
            raise ConnectionResetError("already gone")

    connection = make_connection(Unclosable())
    await connection.close()  # does not raise


async def test_writer_stops_when_client_is_gone(caplog: pytest.LogCaptureFixture) -> None:
    socket = FakeWebsocket(fail=True)
    connection = make_connection(socket, owner=OWNER)
    connection.start()
    with (
        recording(signals.message_delivered, OWNER) as delivered,
        recording(signals.message_dropped, OWNER) as dropped,
    ):
        await connection.offer("x", None)
        await asyncio.sleep(0.01)
    await connection.stop()
    assert delivered.calls == []
    assert dropped.reasons() == ["closed"]
    assert "ConnectionResetError" in dropped.calls[0]["detail"]
    [record] = [r for r in caplog.records if "writing to" in r.getMessage()]
    assert record.levelname == "WARNING"
    assert record.exc_info is not None


async def test_stop_reports_unsent_frames_closed() -> None:
    socket = FakeWebsocket(block=True)
    connection = make_connection(socket, owner=OWNER)
    connection.start()
    with recording(signals.message_dropped, OWNER) as dropped:
        for frame in ("a", "b", "c"):
            await connection.offer(frame, None)
        await asyncio.sleep(0.01)  # the writer holds "a", blocked in send
        await connection.stop()
    assert dropped.reasons() == ["closed"]
    assert dropped.calls[0]["detail"].startswith("2 frames")


async def test_stop_without_unsent_frames_is_quiet() -> None:
    socket = FakeWebsocket()
    connection = make_connection(socket, owner=OWNER)
    connection.start()
    with recording(signals.message_dropped, OWNER) as dropped:
        await connection.offer("a", None)
        await socket.wait_sent(1)
        await connection.stop()
    assert dropped.calls == []


async def test_stop_before_start_is_harmless() -> None:
    await make_connection().stop()


async def test_repr_names_id_user_and_path() -> None:
    text = repr(make_connection(id="i1:x", user="bob", path="/ws/a"))
    assert text == "<Connection i1:x user='bob' path='/ws/a'>"


async def test_close_from_outside_ends_the_handler() -> None:
    """The handler's task (the one that made the connection) ends even if the client
    never answers the close."""
    socket = FakeWebsocket()
    made: list[Connection] = []

    async def handler() -> None:
        made.append(make_connection(socket))
        await asyncio.Event().wait()

    task = asyncio.create_task(handler())
    await eventually(lambda: bool(made))
    await made[0].close(1001, "bye")
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: socket.closed == [(1001, "bye")])


async def test_close_from_the_handler_does_not_cancel_it() -> None:
    await make_connection().close()
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


async def test_outbox_is_a_bounded_fifo() -> None:
    outbox = Outbox(2)
    assert outbox.put("a") and outbox.put(b"b")
    assert not outbox.put("c")  # full: nothing queued
    assert len(outbox) == 2
    assert [await outbox.get(), await outbox.get()] == ["a", b"b"]
    assert len(outbox) == 0


async def test_outbox_get_waits_for_a_put_and_survives_cancellation() -> None:
    outbox = Outbox(4)
    waiting = asyncio.create_task(outbox.get())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert outbox.put("after")  # no error from the cancelled waiter
    getter = asyncio.create_task(outbox.get())
    await asyncio.sleep(0)
    assert outbox.put("next")
    assert await asyncio.wait_for(getter, 1) == "after"
    assert await asyncio.wait_for(outbox.get(), 1) == "next"


async def test_connection_put_nowait_queues_only_while_open_with_room() -> None:
    """The router's fast path: anything else goes through ``offer`` and its policy."""
    socket = FakeWebsocket(block=True)
    connection = make_connection(socket, queue_size=1)
    assert connection.put_nowait("a")
    assert not connection.put_nowait("b")  # full
    await connection.close(1000)
    assert not connection.put_nowait("c")  # closing


class _Owner:
    """Stands in for the extension's membership calls; fails when told to."""

    def __init__(self) -> None:
        self.fail = False

    async def join(self, selector: object, group: str) -> int:
        if self.fail:
            raise TimeoutError("Redis did not answer")
        return 1

    async def leave(self, selector: object, group: str) -> int:
        return 1


async def test_connection_join_indexes_it_in_an_index_that_held_nobody() -> None:
    """The first connection of an instance: its index is an empty mapping, still its index."""
    local = held()
    owner = _Owner()
    connection = Connection(
        id="i1:first",
        user=None,
        path="/",
        instance="i1",
        metadata={},
        websocket=cast(Websocket, FakeWebsocket()),
        queue_size=4,
        policy="drop",
        owner=owner,
        index=local,
    )
    local.add(connection)
    await connection.join("room")
    assert local.resolve(["S" + KEYS.group("room")]) == [connection]


async def test_connection_failed_join_keeps_a_membership_it_had() -> None:
    local = held()
    owner = _Owner()
    connection = Connection(
        id="i1:c",
        user=None,
        path="/",
        instance="i1",
        metadata={},
        websocket=cast(Websocket, FakeWebsocket()),
        queue_size=4,
        policy="drop",
        owner=owner,
        index=local,
    )
    local.add(connection)
    await connection.join("room")
    owner.fail = True
    with pytest.raises(TimeoutError):
        await connection.join("room")  # already in it: the failure takes nothing back
    with pytest.raises(TimeoutError):
        await connection.join("other")  # new: the failure takes it back
    assert connection.groups == {"room"}
    assert local.resolve(["S" + KEYS.group("room")]) == [connection]
    assert local.resolve(["S" + KEYS.group("other")]) == []
