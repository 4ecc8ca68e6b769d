"""A live connection: its bounded queue, the queue-full policy, and its writer task."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import fakeredis
import pytest
from quart.wrappers import Websocket
from wsproto.connection import Connection as WsprotoConnection
from wsproto.connection import ConnectionType
from wsproto.events import BytesMessage, CloseConnection, TextMessage
from wsproto.extensions import Extension, PerMessageDeflate

from quart_wslb import _compat, signals
from quart_wslb.connection import (
    COALESCE_BYTES,
    SLOW_CLIENT_CLOSE,
    Activity,
    Connection,
    Outbox,
)
from quart_wslb.envelope import Envelope, Frame, encode
from quart_wslb.keys import Keys
from quart_wslb.outgoing import Outgoing
from quart_wslb.positions import Recovery
from quart_wslb.receiver import Receiver
from quart_wslb.signal_sender import SignalSender
from tests.support import (
    KEYS,
    NO_MEMBERSHIP,
    SOON,
    FakeWebsocket,
    eventually,
    held,
    make_connection,
    recording,
)

OWNER = SignalSender(object())


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


async def test_offer_recovery_connection_closes_whatever_the_policy() -> None:
    """What reaches ``offer`` on a full recovery connection cannot wait in the history
    (the receiver makes it lag when it can): a drop would leave a hole, a close makes
    the client resume."""
    socket = FakeWebsocket()
    connection = make_connection(socket, queue_size=1, policy="drop", owner=OWNER)
    connection.recovery = Recovery(Keys("p"), "s")
    await connection.offer("kept", None)
    assert not await connection.offer("lost", "m2")
    await eventually(lambda: socket.closed == [(SLOW_CLIENT_CLOSE, "send queue full")])


async def test_put_waits_for_room_instead_of_dropping() -> None:
    socket = FakeWebsocket()
    connection = make_connection(socket, queue_size=1, policy="close", owner=OWNER)
    await connection.put("first")
    waiting = asyncio.create_task(connection.put("second"))
    await asyncio.sleep(0.02)
    assert not waiting.done() and socket.closed == []
    connection.start()
    await asyncio.wait_for(waiting, 5)
    assert await socket.wait_sent(2) == ["first", "second"]
    await connection.stop()


async def test_send_on_a_recovery_connection_is_wrapped_without_a_position() -> None:
    socket = FakeWebsocket()
    connection = make_connection(socket, owner=OWNER)
    connection.recovery = Recovery(Keys("p"), "s")
    connection.start()
    await connection.send({"a": 1})
    await connection.send(b"\x00")
    assert await socket.wait_sent(2) == ['{"t":"msg","j":{"a":1}}', '{"t":"msg","b":"AA=="}']
    await connection.stop()


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


async def test_writer_times_frames_that_carry_their_send_time() -> None:
    socket = FakeWebsocket()
    connection = make_connection(socket, owner=OWNER)
    connection.start()
    sent = time.time_ns() // 1000 - 2_000_000  # two seconds ago, by the sender's clock
    with recording(signals.message_timed, OWNER) as timed:
        assert await connection.offer(Outgoing("old", sent), None)
        assert await connection.offer(Outgoing("untimed"), None)
        await socket.wait_sent(2)
    await connection.stop()
    [call] = timed.calls
    assert call["connection"] is connection
    assert 2.0 <= call["latency"] < 60, call["latency"]


async def test_writer_delivers_untimed_a_send_time_that_makes_no_latency() -> None:
    socket = FakeWebsocket()
    connection = make_connection(socket, owner=OWNER)
    connection.start()
    with recording(signals.message_timed, OWNER) as timed:
        assert await connection.offer(Outgoing("huge", 10**400), None)  # no float holds it
        assert await connection.offer(Outgoing("next"), None)
        assert await socket.wait_sent(2) == ["huge", "next"]
    assert connection._writer is not None and not connection._writer.done()
    await connection.stop()
    assert timed.calls == []


async def test_writer_survives_a_failure_to_report_what_it_wrote(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Failing(SignalSender):
        async def send(self, signal: Any, **kwargs: Any) -> None:
            raise RuntimeError("reporting broke")

    socket = FakeWebsocket()
    connection = make_connection(socket, owner=Failing(OWNER.sender))
    connection.start()
    with recording(signals.message_delivered, OWNER):  # someone listens: it reports
        assert await connection.offer("one", None)
        assert await socket.wait_sent(1) == ["one"]
        assert await connection.offer("two", None)
        assert await socket.wait_sent(2) == ["one", "two"]
    assert connection._writer is not None and not connection._writer.done()
    await connection.stop()
    assert "its writer goes on" in caplog.text


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
    receiver = Receiver(redis, KEYS, "i1", held(slow, fast), OWNER)
    frames = [f"m{n}" for n in range(20)]
    with recording(signals.message_dropped, OWNER) as dropped:
        async with asyncio.timeout(SOON):
            for frame in frames:
                envelope = Envelope(frame, "i2", "text", None, frame, sel=["B"])
                await receiver.dispatch(encode(envelope))
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
    await connection.stop()  # waits for the close task
    assert socket.closed == [(4000, "bye")]


async def test_close_failure_is_swallowed(caplog: pytest.LogCaptureFixture) -> None:
    class Unclosable(FakeWebsocket):
        async def close(self, code: int, reason: str = "") -> None:
            raise ConnectionResetError("already gone")

    caplog.set_level("DEBUG", "quart_wslb")
    connection = make_connection(Unclosable(), id="i1:gone")
    await connection.close()  # returns at once: the close frame is a task of its own
    await connection.stop()  # waits for that task, which logs the failure and ends
    [record] = [r for r in caplog.records if r.getMessage() == "closing i1:gone failed"]
    assert record.exc_info is not None and record.exc_info[0] is ConnectionResetError


async def test_writer_stops_when_client_is_gone(caplog: pytest.LogCaptureFixture) -> None:
    socket = FakeWebsocket(fail=True)
    connection = make_connection(socket, owner=OWNER)
    connection.start()
    with (
        recording(signals.message_delivered, OWNER) as delivered,
        recording(signals.message_dropped, OWNER) as dropped,
    ):
        await connection.offer("x", None)
        await eventually(lambda: bool(dropped.calls))  # the writer failed
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
    with recording(signals.message_dropped, OWNER) as dropped:
        await make_connection(owner=OWNER).stop()
    assert dropped.calls == []


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
    a, b = Outgoing("a"), Outgoing(b"b")
    assert outbox.put(a) and outbox.put(b)
    assert not outbox.put(Outgoing("c"))  # full: nothing queued
    assert len(outbox) == 2
    assert [await outbox.get(), await outbox.get()] == [a, b]
    assert len(outbox) == 0


async def test_outbox_get_waits_for_a_put_and_survives_cancellation() -> None:
    outbox = Outbox(4)
    waiting = asyncio.create_task(outbox.get())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    after, following = Outgoing("after"), Outgoing("next")
    assert outbox.put(after)  # no error from the cancelled waiter
    getter = asyncio.create_task(outbox.get())
    await asyncio.sleep(0)
    assert outbox.put(following)
    assert await asyncio.wait_for(getter, 1) is after
    assert await asyncio.wait_for(outbox.get(), 1) is following


async def test_outbox_get_wire_takes_what_fits_in_the_limit_in_order() -> None:
    outbox = Outbox(8)
    messages = [Outgoing("a" * 8), Outgoing(b"b" * 8), Outgoing("c" * 100), Outgoing("d")]
    for message in messages:
        outbox.put(message)
    # 10 bytes each on the wire (2 of header): the third, of 102, does not fit in 30.
    assert await outbox.get_wire(30) == messages[:2]
    assert await outbox.get_wire(30) == messages[2:3]  # the first is taken whatever its size
    assert await outbox.get_wire(30) == messages[3:]
    assert len(outbox) == 0


async def test_connection_put_nowait_queues_only_while_open_with_room() -> None:
    """The receiver's fast path: anything else goes through ``offer`` and its policy."""
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
    connection = make_connection(id="i1:first", user=None, membership=owner, index=local)
    local.add(connection)
    await connection.join("room")
    assert local.resolve(["S" + KEYS.group("room")]) == [connection]


async def test_connection_failed_join_keeps_a_membership_it_had() -> None:
    local = held()
    owner = _Owner()
    connection = make_connection(id="i1:c", user=None, membership=owner, index=local)
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


class Stream:
    """A detached Hypercorn websocket stream (``_compat.detached_stream``) and what it
    wrote after its handshake, read back by a wsproto client."""

    def __init__(self, extensions: bytes = b"") -> None:
        self.events: list[Any] = []
        self.stream = _compat.detached_stream(self._send, extensions)
        self.events.clear()  # the handshake's response
        offered: list[Extension] = [PerMessageDeflate()] if extensions else []
        for extension in offered:  # as the client does, having read the server's answer
            cast(PerMessageDeflate, extension).finalize("permessage-deflate")
        self.client = WsprotoConnection(ConnectionType.CLIENT, offered)

    async def _send(self, event: Any) -> None:
        self.events.append(event)

    def received(self) -> list[Frame]:
        """The messages the client reads from everything written so far."""
        for event in self.events:
            self.client.receive_data(bytes(event.data))
        self.events.clear()
        events = self.client.events()
        return [bytes(e.data) if isinstance(e, BytesMessage) else e.data
                for e in events if isinstance(e, TextMessage | BytesMessage)]  # fmt: skip


def stream_connection(stream: Stream) -> Connection:
    activity = Activity(send=stream.stream.app_send)
    activity.accepted.set()
    connection = Connection(
        id="i1:c1", user=None, path="/ws", instance="i1", metadata={},
        websocket=cast(Websocket, FakeWebsocket()), queue_size=100, policy="close",
        sender=OWNER, membership=NO_MEMBERSHIP, activity=activity,
    )  # fmt: skip
    return connection


async def test_writer_writes_queued_frames_encoded_once_in_one_write() -> None:
    stream = Stream()
    connection = stream_connection(stream)
    frames: list[Frame] = ["a", b"\x00\x01", "é" * 70, "", b"x" * 300]
    shared = [Outgoing(f) for f in frames]
    for message in shared:
        assert connection.put_nowait(message)
    with recording(signals.message_delivered, OWNER) as delivered:
        connection.start()
        await eventually(lambda: len(delivered.calls) == len(frames))
    assert len(stream.events) == 1  # queued together: written together
    assert stream.received() == frames
    assert [call["frame"] for call in delivered.calls] == frames
    assert all(m.wire is m.wire for m in shared)
    await connection.stop()


async def test_writer_large_frames_are_written_alone() -> None:
    stream = Stream()
    connection = stream_connection(stream)
    frames: list[Frame] = [b"a" * COALESCE_BYTES, "b", b"c" * COALESCE_BYTES]
    for frame in frames:
        assert connection.put_nowait(frame)
    connection.start()
    await eventually(lambda: len(stream.events) == 3)
    assert stream.received() == frames
    await connection.stop()


async def test_writer_hands_frames_to_hypercorn_once_the_client_closes() -> None:
    """Past the client's close, Hypercorn decides (it drops them, quietly)."""
    stream = Stream()
    connection = stream_connection(stream)
    connection.start()
    await connection.offer("before", None)
    await eventually(lambda: len(stream.events) == 1)
    assert stream.received() == ["before"]
    server = stream.stream.connection  # the client's close frame reaches wsproto
    server.receive_data(stream.client.send(CloseConnection(code=1000)))
    assert [type(e) for e in server.events()] == [CloseConnection]
    with (
        recording(signals.message_dropped, OWNER) as dropped,
        recording(signals.message_delivered, OWNER) as handed,
    ):
        await connection.offer("after", None)
        await eventually(lambda: [call["frame"] for call in handed.calls] == ["after"])
    assert stream.events == []
    assert dropped.calls == []
    assert connection._writer is not None and not connection._writer.done()
    await connection.stop()


async def test_writer_with_permessage_deflate_sends_asgi_events() -> None:
    stream = Stream(b"permessage-deflate")
    connection = stream_connection(stream)
    frames: list[Frame] = ["z" * 500, b"\x00" * 500]
    for frame in frames:
        connection.put_nowait(frame)
    connection.start()
    await eventually(lambda: len(stream.events) == 2)  # one event each: no coalescing
    assert all(len(e.data) < 100 for e in stream.events)  # compressed by wsproto
    assert stream.received() == frames
    await connection.stop()
