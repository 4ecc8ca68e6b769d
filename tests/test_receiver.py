"""The receiver: it dispatches envelopes to local connections and runs a subscriber loop
that survives bad input and lost connections (publishing is tested in test_emitter)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any, cast

import pytest
from quart.wrappers import Websocket
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from websockets.asyncio.client import ClientConnection

from quart_wslb import (
    AllSelector,
    ConnectionSelector,
    GroupSelector,
    PathSelector,
    UserSelector,
    signals,
)
from quart_wslb import receiver as receiver_module
from quart_wslb.connection import Connection
from quart_wslb.emitter import AsyncEmitter
from quart_wslb.envelope import Envelope, Frame, encode
from quart_wslb.keys import Keys
from quart_wslb.local_index import LocalIndex
from quart_wslb.outgoing import Outgoing
from quart_wslb.receiver import READ_TIMEOUT, Receiver
from quart_wslb.redis_client import make_client
from quart_wslb.sharded import MergedSubscription
from quart_wslb.signal_sender import SignalSender
from quart_wslb.signing import Keyring
from quart_wslb.subscriber import SubscriberClosedError
from quart_wslb.testing import RedisServer
from tests.cluster import Clients, Cluster
from tests.support import (
    KEYS,
    NO_MEMBERSHIP,
    SOON,
    FakeWebsocket,
    eventually,
    held,
    make_connection,
    people_sender,
    recording,
    stored_record,
)

OWNER = SignalSender(object())


@pytest.fixture(name="sender")
async def fixture_sender(fake_redis: Redis) -> AsyncEmitter:
    """What publishes for an instance that owns no connection, to ``PEOPLE``."""
    return await people_sender(fake_redis)


@asynccontextmanager
async def started(*connections: Connection) -> AsyncIterator[LocalIndex]:
    """The connections, with their writers running, as a receiver's ``local`` index."""
    local = LocalIndex(KEYS)
    for connection in connections:
        local.add(connection)
        connection.start()
    try:
        yield local
    finally:
        for connection in connections:
            await connection.stop()


def raw(
    targets: list[str] | None,
    frame: str | bytes = "hi",
    kind: Any = "text",
    sel: list[str] | None = None,
) -> bytes:
    return encode(Envelope("m1", "i0", kind, targets, frame, sel=sel))


async def test_dispatch_delivers_to_local_targets_only(fake_redis: Redis) -> None:
    sockets = [FakeWebsocket() for _ in range(3)]
    connections = [make_connection(s, id=f"i1:{n}") for n, s in enumerate(sockets)]
    async with started(*connections) as local:
        receiver = Receiver(fake_redis, KEYS, "i1", local, OWNER)
        with recording(signals.message_received, OWNER) as got:
            await receiver.dispatch(raw(["i1:0", "i1:2"], "hi"))
            await receiver.dispatch(raw(["i1:2"], b"\x01", "binary"))
        assert await sockets[0].wait_sent(1) == ["hi"]
        assert await sockets[2].wait_sent(2) == ["hi", b"\x01"]
        await asyncio.sleep(0.01)
        assert sockets[1].sent == []
    assert [call["envelope"].targets for call in got.calls] == [["i1:0", "i1:2"], ["i1:2"]]


async def test_dispatch_broadcast_delivers_to_every_local(fake_redis: Redis) -> None:
    sockets = [FakeWebsocket() for _ in range(3)]
    connections = [make_connection(s, id=f"i1:{n}") for n, s in enumerate(sockets)]
    async with started(*connections) as local:
        broadcast = raw(None, '{"a":1}', "json", sel=["B"])
        await Receiver(fake_redis, KEYS, "i1", local, OWNER).dispatch(broadcast)
        for socket in sockets:
            assert await socket.wait_sent(1) == ['{"a":1}']


@pytest.mark.parametrize(
    ("sel", "expected"),
    [
        (["S" + KEYS.path("/ws/red")], {0, 1}),
        (["S" + KEYS.metadata("room", "blue")], {1, 2}),
        (["S" + KEYS.path("/ws/red"), "S" + KEYS.metadata("room", "red"), "&"], {0}),
        (["S" + KEYS.path("/ws/blue"), "Ualice", "|"], {0, 2}),
        (["M2", "i1:1", "i1:2", "S" + KEYS.path("/ws/red"), "&"], {1}),
        (["S" + KEYS.group("nobody")], set()),
        (["S" + KEYS.path("/ws/red"), "Cother:1", "|"], {0, 1}),
    ],
)
async def test_dispatch_by_selector_resolves_it_locally(
    fake_redis: Redis, sel: list[str], expected: set[int]
) -> None:
    sockets = [FakeWebsocket() for _ in range(3)]
    people = [("alice", "/ws/red", "red"), ("bob", "/ws/red", "blue"), ("bob", "/ws/blue", "blue")]
    connections = [
        make_connection(s, id=f"i1:{n}", user=user, path=path, metadata={"room": room})
        for n, (s, (user, path, room)) in enumerate(zip(sockets, people, strict=True))
    ]
    async with started(*connections) as local:
        with recording(signals.message_dropped, OWNER) as dropped:
            await Receiver(fake_redis, KEYS, "i1", local, OWNER).dispatch(raw(None, "hi", sel=sel))
        for n in expected:
            assert await sockets[n].wait_sent(1) == ["hi"]
        await asyncio.sleep(0.01)
    assert {n for n, socket in enumerate(sockets) if socket.sent} == expected
    assert dropped.calls == []


@pytest.mark.parametrize("sel", [["&"], ["Xwhat"], ["Ualice", "Ubob"], ["M9", "i1:0"]])
async def test_dispatch_drops_an_unreadable_selector(fake_redis: Redis, sel: list[str]) -> None:
    socket = FakeWebsocket()
    async with started(make_connection(socket, id="i1:0")) as local:
        with recording(signals.message_dropped, OWNER) as dropped:
            await Receiver(fake_redis, KEYS, "i1", local, OWNER).dispatch(raw(None, "hi", sel=sel))
        await asyncio.sleep(0.01)
        assert socket.sent == []
    assert dropped.reasons() == ["malformed"]
    assert dropped.calls[0]["detail"] == "unreadable selector"


@pytest.mark.parametrize(
    "data",
    [b"garbage", b"{}\nhi", b'{"v":3,"id":"m","origin":"o","kind":"text","targets":[]}\nx', b""],
)
async def test_dispatch_drops_malformed_envelope(fake_redis: Redis, data: bytes) -> None:
    socket = FakeWebsocket()
    async with started(make_connection(socket, id="i1:a")) as local:
        receiver = Receiver(fake_redis, KEYS, "i1", local, OWNER)
        with recording(signals.message_dropped, OWNER) as dropped:
            await receiver.dispatch(data)
        await asyncio.sleep(0.01)
        assert socket.sent == []
    assert dropped.reasons() == ["malformed"]
    assert dropped.calls[0]["message_id"] is None
    assert dropped.calls[0]["connection"] is None


@pytest.mark.parametrize(
    "sent",
    [b"1" + b"0" * 400, b'"x"', b"-1", b"1.5", b"true", b"null", str(2**53 + 1).encode()],
)
async def test_dispatch_delivers_messages_whose_send_time_is_bad(
    fake_redis: Redis, sent: bytes
) -> None:
    """A ``t`` that is not a send time is ignored: the message is delivered, untimed,
    and the writer lives on (10**400 once killed it, computing the latency)."""
    socket = FakeWebsocket()
    connection = make_connection(socket, id="i1:a", owner=OWNER)
    bad = b'{"v":3,"origin":"i0","messages":[{"id":"m1","kind":"text","targets":["i1:a"],'
    bad += b'"t":' + sent + b',"size":3}]}\nbad'
    async with started(connection) as local:
        receiver = Receiver(fake_redis, KEYS, "i1", local, OWNER)
        with (
            recording(signals.message_timed, OWNER) as timed,
            recording(signals.message_dropped, OWNER) as dropped,
        ):
            await receiver.dispatch(bad)
            assert await socket.wait_sent(1) == ["bad"]
            await receiver.dispatch(raw(["i1:a"], "next"))
            assert await socket.wait_sent(2) == ["bad", "next"]
        assert connection._writer is not None and not connection._writer.done()
    assert timed.calls == []
    assert dropped.calls == []


async def test_dispatch_delivers_every_message_of_a_publish_in_order(fake_redis: Redis) -> None:
    """Concurrent sends arrive as one publish; each message reaches its own targets, in
    order, and one that fails to deliver costs only itself."""
    sockets = [FakeWebsocket() for _ in range(3)]
    connections = [make_connection(s, id=f"i1:{n}") for n, s in enumerate(sockets)]

    class Broken(Connection):
        def put_nowait(self, message: Outgoing | Frame) -> bool:
            raise RuntimeError("broken connection")

    publish = encode(
        *(
            Envelope(id=f"m{n}", origin="i0", kind="text", targets=[f"i1:{n % 3}"], frame=str(n))
            for n in range(9)
        )
    )
    broken = Broken(
        id="i1:1",
        user=None,
        path="/",
        instance="i1",
        metadata={},
        websocket=cast(Websocket, FakeWebsocket()),
        queue_size=8,
        policy="close",
        sender=OWNER,
        membership=NO_MEMBERSHIP,
    )
    async with started(connections[0], connections[2]) as local:
        local.add(broken)
        receiver = Receiver(fake_redis, KEYS, "i1", local, OWNER)
        with recording(signals.message_dropped, OWNER) as dropped:
            await receiver.dispatch(publish)
        assert await sockets[0].wait_sent(3) == ["0", "3", "6"]
        assert await sockets[2].wait_sent(3) == ["2", "5", "8"]
    assert [(c["reason"], c["message_id"]) for c in dropped.calls] == [
        ("error", "m1"),
        ("error", "m4"),
        ("error", "m7"),
    ]


async def test_dispatch_reports_unknown_targets_gone(fake_redis: Redis) -> None:
    socket = FakeWebsocket()
    async with started(make_connection(socket, id="i1:a")) as local:
        receiver = Receiver(fake_redis, KEYS, "i1", local, OWNER)
        with recording(signals.message_dropped, OWNER) as dropped:
            await receiver.dispatch(raw(["i1:gone", "i1:a"]))
        assert await socket.wait_sent(1) == ["hi"]
    assert dropped.reasons() == ["gone"]
    assert dropped.calls[0]["message_id"] == "m1"
    assert dropped.calls[0]["detail"] == "i1:gone"


@pytest.fixture(name="log_errors")
def fixture_log_errors(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level("DEBUG", "quart_wslb")
    yield caplog


@asynccontextmanager
async def running(receiver: Receiver) -> AsyncIterator[asyncio.Task[None]]:
    """Run the subscriber loop for the block; it must end by cancellation.

    The cancellation is repeated: on Python 3.11 fakeredis reads through
    ``asyncio.wait_for``, which loses a cancellation that coincides with a message.
    """
    task = asyncio.create_task(receiver.run())
    try:
        async with asyncio.timeout(SOON):
            await receiver.subscribed.wait()
        yield task
    finally:
        async with asyncio.timeout(SOON):
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.05)
        assert task.cancelled()


async def test_run_survives_malformed_and_keeps_delivering(
    fake_redis: Redis, sender: AsyncEmitter, log_errors: pytest.LogCaptureFixture
) -> None:
    socket = FakeWebsocket()
    async with started(make_connection(socket, id="i1:a1", user="alice")) as local:
        receiver = Receiver(fake_redis, KEYS, "i1", local, OWNER)
        with recording(signals.message_dropped, OWNER) as dropped:
            async with running(receiver) as task:
                for junk in (b"junk", b"\xff\n", b'{"v":1}\n'):
                    await fake_redis.publish(KEYS.channel("i1"), junk)
                await fake_redis.publish(KEYS.broadcast, b"junk")
                route = await sender.publish(ConnectionSelector("i1:a1"), "text", b"one")
                await sender.publish(AllSelector(), "text", b"two")
                assert await socket.wait_sent(2) == ["one", "two"]
                assert not task.done()
    assert route.routed == 1
    assert dropped.reasons() == ["malformed"] * 4
    assert "malformed envelope" in log_errors.text


@pytest.mark.parametrize("failing", ["subscribe", "get_message"])
async def test_run_resubscribes_after_redis_error(
    fake_redis: Redis, sender: AsyncEmitter, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    real = fake_redis.pubsub
    made: list[PubSub] = []

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RedisConnectionError("connection lost")

    def flaky(**kwargs: Any) -> PubSub:
        pubsub = real(**kwargs)
        if not made:
            monkeypatch.setattr(pubsub, failing, broken)
        made.append(pubsub)
        return pubsub

    monkeypatch.setattr(fake_redis, "pubsub", flaky)
    socket = FakeWebsocket()
    async with started(make_connection(socket, id="i1:a1", user="alice")) as local:
        receiver = Receiver(fake_redis, KEYS, "i1", local, OWNER)
        with recording(signals.subscriber_lost, OWNER) as lost:
            async with running(receiver):
                await eventually(lambda: len(made) >= 2 and receiver.subscribed.is_set())
                route = await sender.publish(ConnectionSelector("i1:a1"), "text", b"after")
                assert await socket.wait_sent(1) == ["after"]
    assert route.routed == 1
    assert [type(call["error"]) for call in lost.calls] == [RedisConnectionError]
    assert lost.reasons() == ["error"]


async def test_run_cancellation_ends_it(fake_redis: Redis) -> None:
    receiver = Receiver(fake_redis, KEYS, "i1", held(), OWNER)
    async with running(receiver) as task:
        pass
    assert task.cancelled()


async def test_dispatch_probe_is_counted_not_dropped(fake_redis: Redis) -> None:
    receiver = Receiver(fake_redis, KEYS, "i1", held(), OWNER)
    probe = receiver.next_probe()
    assert receiver.missed_probes() == 1
    with recording(signals.message_dropped, OWNER) as dropped:
        await receiver.dispatch(probe)
    assert receiver.missed_probes() == 0
    assert dropped.calls == []


@pytest.mark.parametrize(
    "probe",
    [
        b"\x00probe:" + str(10**18).encode(),
        b"\x00probe:2",
        b"\x00probe:x",
        b"\x00probe:" + b"9" * 5000,
    ],
)
async def test_dispatch_probe_never_sent_is_dropped(fake_redis: Redis, probe: bytes) -> None:
    """A probe numbered past the last one sent (forged) would hide every missed probe
    after it, disabling deaf-subscriber detection: it is dropped and signalled."""
    receiver = Receiver(fake_redis, KEYS, "i1", held(), OWNER)
    receiver.next_probe()
    with recording(signals.message_dropped, OWNER) as dropped:
        await receiver.dispatch(probe)
    assert dropped.reasons() == ["malformed"]
    assert receiver.missed_probes() == 1
    receiver.next_probe()
    assert receiver.missed_probes() == 2


async def test_dispatch_probe_with_a_secret_must_be_signed(fake_redis: Redis) -> None:
    ring = Keyring.parse("k1:a-secret-for-the-probes")
    receiver = Receiver(fake_redis, KEYS, "i1", held(), OWNER, keyring=ring)
    probe = receiver.next_probe()
    assert probe.startswith(b"\x00probe:1:k1:")
    other = Keyring.parse("k1:another-secret-entirely")
    with recording(signals.message_dropped, OWNER) as dropped:
        await receiver.dispatch(b"\x00probe:1")
        await receiver.dispatch(b"\x00probe:1:" + other.probe("i1", 1).partition(b":")[2])
        assert receiver.missed_probes() == 1
        await receiver.dispatch(probe)
    assert dropped.reasons() == ["unsigned", "bad_signature"]
    assert receiver.missed_probes() == 0


async def test_run_hears_its_own_probes(fake_redis: Redis) -> None:
    receiver = Receiver(fake_redis, KEYS, "i1", held(), OWNER)
    async with running(receiver):
        assert await fake_redis.publish(KEYS.channel("i1"), receiver.next_probe()) == 1
        await eventually(lambda: receiver.missed_probes() == 0)


async def test_run_restart_resubscribes_and_calls_back(
    fake_redis: Redis, sender: AsyncEmitter, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    async def callback() -> None:
        calls.append("subscribed")

    async def failing() -> None:
        raise RuntimeError("callback broke")

    socket = FakeWebsocket()
    async with started(make_connection(socket, id="i1:a1")) as local:
        receiver = Receiver(fake_redis, KEYS, "i1", local, OWNER)
        receiver.on_subscribed(failing)
        receiver.on_subscribed(callback)
        async with running(receiver):
            await eventually(lambda: calls == ["subscribed"])
            receiver.restart()
            await eventually(lambda: calls == ["subscribed"] * 2)
            await sender.publish(ConnectionSelector("i1:a1"), "text", b"still here")
            assert await socket.wait_sent(1) == ["still here"]
    records = [r for r in caplog.records if "after subscribing" in r.getMessage()]
    assert [(r.levelname, r.exc_info is not None) for r in records] == [("ERROR", True)] * 2
    assert "callback broke" in caplog.text


Step = list[bytes] | Exception | Callable[[], list[bytes]] | float


class Scripted:
    """A subscription that plays ``steps`` (a batch, an error to raise, a callable
    that returns a batch, or seconds of silence), then stays silent."""

    def __init__(self, *steps: Step, drained: list[bytes] | None = None) -> None:
        self.steps = list(steps)
        self.drained = drained or []
        self.drains = 0

    async def drain(self, timeout: float) -> list[bytes]:
        self.drains += 1
        return self.drained

    async def read(self, timeout: float) -> list[bytes]:
        if not self.steps:
            await asyncio.sleep(timeout)
            return []
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        if isinstance(step, float):
            await asyncio.sleep(step)
            return []
        return step() if callable(step) else step


def picking(subscribe: Callable[[Any], Any]) -> Callable[[Redis], Awaitable[Any]]:
    """A stand-in for ``transport.pick``: its transport subscribes with ``subscribe``."""

    async def pick(redis: Redis) -> Any:
        return SimpleNamespace(subscribe=subscribe)

    return pick


@pytest.fixture(name="scripts")
def fixture_scripts(monkeypatch: pytest.MonkeyPatch) -> list[Scripted]:
    """The subscriptions the receiver gets, in turn (then silent ones); fast backoff."""
    scripts: list[Scripted] = []

    @asynccontextmanager
    async def subscribe(channels: Any) -> AsyncIterator[Scripted]:
        yield scripts.pop(0) if scripts else Scripted()

    monkeypatch.setattr("quart_wslb.receiver.pick_transport", picking(subscribe))
    monkeypatch.setattr("quart_wslb.receiver.BACKOFF_MAX", 0.05)
    monkeypatch.setattr("quart_wslb.receiver.READ_TIMEOUT", 0.05)
    return scripts


def texts(*frames: str) -> list[bytes]:
    return [raw(["i1:a"], frame) for frame in frames]


def restarting(receiver: Receiver, *frames: str) -> Callable[[], list[bytes]]:
    """A step that asks ``receiver`` to restart, then brings ``frames``."""

    def step() -> list[bytes]:
        receiver.restart()
        return texts(*frames)

    return step


async def test_run_restart_delivers_what_keeps_arriving_then_signals_deaf(
    fake_redis: Redis, scripts: list[Scripted]
) -> None:
    local = keeping("i1:a")
    receiver = Receiver(fake_redis, KEYS, "i1", local, OWNER)

    script = Scripted(
        texts("a"), restarting(receiver, "b"), texts("c", "d"), texts("e"), drained=texts("f")
    )
    scripts.append(script)
    with recording(signals.subscriber_lost, OWNER) as lost:
        async with running(receiver):
            await eventually(lambda: len(lost.calls) == 1 and receiver.subscribed.is_set())
    # "f": what came before Redis confirmed the unsubscription, delivered before closing.
    assert frames_of(local, "i1:a") == ["a", "b", "c", "d", "e", "f"]
    assert script.drains == 1
    assert lost.reasons() == ["deaf"]
    assert isinstance(lost.calls[0]["error"], RedisConnectionError)


@pytest.mark.parametrize(
    ("cuts", "reason"),
    [((None, None), "closed"), ((3, 3), "closed"), ((3, 4), "output_buffer_limit")],
)
async def test_run_closed_by_redis_delivers_everything_before_and_says_why(
    fake_redis: Redis,
    scripts: list[Scripted],
    monkeypatch: pytest.MonkeyPatch,
    cuts: tuple[int | None, int | None],
    reason: str,
) -> None:
    counts = list(cuts)

    async def output_buffer_cuts(redis: Redis) -> int | None:
        return counts.pop(0) if counts else cuts[-1]

    monkeypatch.setattr("quart_wslb.receiver.output_buffer_cuts", output_buffer_cuts)
    local = keeping("i1:a")
    receiver = Receiver(fake_redis, KEYS, "i1", local, OWNER)
    closed = SubscriberClosedError("Redis closed the subscriber connection")
    scripts.append(Scripted(texts("a"), restarting(receiver, "b"), closed))
    with recording(signals.subscriber_lost, OWNER) as lost:
        async with running(receiver):
            await eventually(lambda: len(lost.calls) == 1 and receiver.subscribed.is_set())
    assert frames_of(local, "i1:a") == ["a", "b"]
    assert lost.reasons() == [reason]
    assert lost.calls[0]["error"] is closed


async def test_run_backs_off_while_subscriptions_are_cut_young(
    fake_redis: Redis,
    scripts: list[Scripted],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Subscriptions that Redis accepts and then cuts at once (a slow instance under a
    flood: each delivers a little first) do not reset the backoff; one that lived
    longer than the longest backoff does."""

    async def output_buffer_cuts(redis: Redis) -> int | None:
        return None

    monkeypatch.setattr("quart_wslb.receiver.output_buffer_cuts", output_buffer_cuts)
    monkeypatch.setattr("quart_wslb.receiver.BACKOFF_MAX", 0.4)
    local = keeping("i1:a")
    receiver = Receiver(fake_redis, KEYS, "i1", local, OWNER)
    cut = SubscriberClosedError("Redis closed the subscriber connection")
    scripts.extend(Scripted(texts(str(n)), cut) for n in range(4))
    scripts.append(Scripted(texts("lived"), 0.5, cut))
    with recording(signals.subscriber_lost, OWNER) as lost:
        async with running(receiver):
            await eventually(lambda: len(lost.calls) == 5 and receiver.subscribed.is_set())
    lines = [r for r in caplog.records if "subscriber lost" in r.getMessage()]
    delays = [cast(tuple[Any, ...], r.args)[-1] for r in lines]
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.05], delays
    assert frames_of(local, "i1:a") == ["0", "1", "2", "3", "lived"]


async def test_run_reads_the_cut_counter_before_subscribing(
    fake_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis may cut a subscription as soon as it has confirmed it: the counter is read
    before subscribing, so that cut counts as one (and listening starts at once)."""
    counter = [3]
    events: list[str] = []

    async def output_buffer_cuts(redis: Redis) -> int | None:
        events.append(f"cuts={counter[0]}")
        return counter[0]

    @asynccontextmanager
    async def subscribe(channels: Any) -> AsyncIterator[Scripted]:
        events.append("subscribed")
        if len(events) <= 2:  # the first subscription is cut straight away
            counter[0] += 1
            yield Scripted(SubscriberClosedError("Redis closed the subscriber connection"))
        else:
            yield Scripted()

    monkeypatch.setattr("quart_wslb.receiver.output_buffer_cuts", output_buffer_cuts)
    monkeypatch.setattr("quart_wslb.receiver.pick_transport", picking(subscribe))
    monkeypatch.setattr("quart_wslb.receiver.BACKOFF_MAX", 0.05)
    receiver = Receiver(fake_redis, KEYS, "i1", held(), OWNER)
    with recording(signals.subscriber_lost, OWNER) as lost:
        async with running(receiver):
            await eventually(lambda: len(lost.calls) == 1 and receiver.subscribed.is_set())
    assert lost.reasons() == ["output_buffer_limit"]
    assert events[:3] == ["cuts=3", "subscribed", "cuts=4"], events


async def test_run_unexpected_error_is_logged_with_traceback_and_retried(
    fake_redis: Redis, scripts: list[Scripted], caplog: pytest.LogCaptureFixture
) -> None:
    local = keeping("i1:a")
    receiver = Receiver(fake_redis, KEYS, "i1", local, OWNER)
    scripts.append(Scripted(texts("a"), RuntimeError("a bug")))
    scripts.append(Scripted(texts("b")))
    with recording(signals.subscriber_lost, OWNER) as lost:
        async with running(receiver):
            await eventually(lambda: frames_of(local, "i1:a") == ["a", "b"])
    assert lost.reasons() == ["unexpected"]
    [record] = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert record.levelname == "ERROR"
    assert record.exc_info is not None and "a bug" in caplog.text


async def test_run_redis_failure_is_a_warning_without_traceback(
    fake_redis: Redis, scripts: list[Scripted], caplog: pytest.LogCaptureFixture
) -> None:
    receiver = Receiver(fake_redis, KEYS, "i1", held(), OWNER)
    scripts.append(Scripted(RedisConnectionError("connection reset")))
    with recording(signals.subscriber_lost, OWNER) as lost:
        async with running(receiver):
            await eventually(lambda: len(lost.calls) == 1 and receiver.subscribed.is_set())
    assert lost.reasons() == ["error"]
    [record] = [r for r in caplog.records if "subscriber lost" in r.getMessage()]
    assert record.levelname == "WARNING"
    assert record.exc_info is None


def control(kind: Any, targets: list[str], frame: str) -> bytes:
    return encode(Envelope(id="c1", origin="i0", kind=kind, targets=targets, frame=frame))


async def test_dispatch_join_and_leave_change_local_groups(fake_redis: Redis) -> None:
    one, two = make_connection(id="i1:a"), make_connection(id="i1:b")
    receiver = Receiver(fake_redis, KEYS, "i1", held(one, two), OWNER)
    await receiver.dispatch(control("join", ["i1:a", "i1:b", "i1:gone"], "vip"))
    await receiver.dispatch(control("join", ["i1:a"], "staff"))
    await receiver.dispatch(control("leave", ["i1:b"], "vip"))
    assert (one.groups, two.groups) == ({"vip", "staff"}, set())


async def test_dispatch_join_changes_what_a_group_send_reaches(fake_redis: Redis) -> None:
    """A join instruction updates the local index that the next group send resolves."""
    sockets = [FakeWebsocket(), FakeWebsocket()]
    one, two = (make_connection(s, id=f"i1:{n}") for n, s in enumerate(sockets))
    receiver = Receiver(fake_redis, KEYS, "i1", held(one, two), OWNER)
    vip = ["S" + KEYS.group("vip")]
    one.start()
    two.start()
    try:
        await receiver.dispatch(control("join", ["i1:1"], "vip"))
        await receiver.dispatch(raw(None, "first", sel=vip))
        await receiver.dispatch(control("join", ["i1:0"], "vip"))
        await receiver.dispatch(control("leave", ["i1:1"], "vip"))
        await receiver.dispatch(raw(None, "second", sel=vip))
        assert await sockets[1].wait_sent(1) == ["first"]
        assert await sockets[0].wait_sent(1) == ["second"]
        await asyncio.sleep(0.01)
        assert (sockets[0].sent, sockets[1].sent) == (["second"], ["first"])
    finally:
        await one.stop()
        await two.stop()


async def test_dispatch_disconnect_by_selector_closes_what_it_selects(fake_redis: Redis) -> None:
    sockets = [FakeWebsocket(), FakeWebsocket()]
    one, two = (make_connection(s, id=f"i1:{n}", path=f"/ws/{n}") for n, s in enumerate(sockets))
    receiver = Receiver(fake_redis, KEYS, "i1", held(one, two), OWNER)
    bye = encode(
        Envelope(
            "d1",
            "i0",
            "disconnect",
            None,
            '{"code":4000,"reason":"bye"}',
            sel=["S" + KEYS.path("/ws/0")],
        )
    )
    await receiver.dispatch(bye)
    await eventually(lambda: sockets[0].closed == [(4000, "bye")])
    assert sockets[1].closed == []


async def test_dispatch_disconnect_closes_targets(fake_redis: Redis) -> None:
    sockets = [FakeWebsocket(), FakeWebsocket()]
    one, two = (make_connection(s, id=f"i1:{n}") for n, s in enumerate(sockets))
    receiver = Receiver(fake_redis, KEYS, "i1", held(one, two), OWNER)
    await receiver.dispatch(control("disconnect", ["i1:1"], '{"code":4000,"reason":"bye"}'))
    assert sockets[0].closed == []
    await eventually(lambda: sockets[1].closed == [(4000, "bye")])


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        '{"reason":"no code"}',
        '{"code":"x"}',
        "[]",
        '{"code":99999,"reason":"out of range"}',
        '{"code":1006}',
        '{"code":4000.0}',
        '{"code":true}',
        '{"code":4000,"reason":7}',
        '{"code":4000,"reason":"' + "x" * 124 + '"}',
    ],
)
async def test_dispatch_bad_disconnect_is_malformed(fake_redis: Redis, payload: str) -> None:
    socket = FakeWebsocket()
    connection = make_connection(socket, id="i1:a")
    receiver = Receiver(fake_redis, KEYS, "i1", held(connection), OWNER)
    with recording(signals.message_dropped, OWNER) as dropped:
        await receiver.dispatch(control("disconnect", ["i1:a"], payload))
    assert dropped.reasons() == ["malformed"]
    assert socket.closed == []


async def test_join_and_disconnect_reach_the_owner(
    fake_redis: Redis, sender: AsyncEmitter
) -> None:
    """Membership and disconnects go through Redis to the instance holding the socket,
    whose close ends the connection's handler."""
    socket = FakeWebsocket()
    made: list[Connection] = []

    async def handler() -> None:
        made.append(make_connection(socket, id="i1:a1", user="alice"))
        await asyncio.Event().wait()

    task = asyncio.create_task(handler())
    try:
        await eventually(lambda: bool(made))
        [connection] = made
        receiver = Receiver(fake_redis, KEYS, "i1", held(connection), OWNER)
        async with running(receiver):
            assert await sender.join(UserSelector("alice"), "vip") == 3
            await eventually(lambda: connection.groups == {"vip"})
            assert (await stored_record(fake_redis, "i1:a1"))["g"] == ["vip"]
            assert await sender.resolve(GroupSelector("vip")) == {
                "i1": ["i1:a1", "i1:a2"],
                "i2": ["i2:a3"],
            }
            assert await sender.leave(ConnectionSelector("i1:a2"), "vip") == 1
            assert await sender.count(GroupSelector("vip")) == 2
            # i1:a1 and i2:a3 match; nobody listens for i2, so only one is reached.
            selector = GroupSelector("vip") & PathSelector("/ws/red")
            assert await sender.disconnect(selector, 4001) == 1
            await eventually(lambda: socket.closed == [(4001, "")])
            with pytest.raises(asyncio.CancelledError):
                await task
    finally:
        task.cancel()


class Keeping:
    """A local connection that keeps the frames it is offered, in order."""

    def __init__(self, id: str) -> None:
        self.id = id
        self.user = None
        self.path = "/"
        self.metadata: dict[str, str] = {}
        self.groups: set[str] = set()
        self.recovery = None  # not a recovery connection
        self.frames: list[Frame] = []

    def put_nowait(self, message: Outgoing | Frame) -> bool:
        self.frames.append(message.frame if isinstance(message, Outgoing) else message)
        return True

    async def offer(self, message: Outgoing | Frame, message_id: str | None) -> bool:
        return self.put_nowait(message)


def keeping(*ids: str) -> LocalIndex:
    return held(*(cast(Connection, Keeping(id)) for id in ids))


def frames_of(local: Mapping[str, Connection], id: str) -> list[Frame]:
    return cast(Keeping, local[id]).frames


@asynccontextmanager
async def real_client(url: str) -> AsyncIterator[Redis]:
    """A client built the way the extension builds its own (RESP3, hiredis packing)."""
    client = make_client(url, SOON)
    try:
        yield client
    finally:
        await client.aclose()


async def pubsub_clients(redis: Redis) -> int:
    return len(await redis.client_list(_type="pubsub"))


@pytest.mark.integration
async def test_run_on_real_redis_delivers_in_order_and_skips_junk(
    redis_url: str, prefix: str
) -> None:
    keys = Keys(prefix)
    local = keeping("i1:a")
    expected = [f"{n:05d}" + "p" * 200 for n in range(3000)]
    async with real_client(redis_url) as redis:
        receiver = Receiver(redis, keys, "i1", local, OWNER)
        with recording(signals.message_dropped, OWNER) as dropped:
            async with running(receiver):
                async with redis.pipeline(transaction=False) as pipe:
                    for n, frame in enumerate(expected):
                        if n % 100 == 50:
                            pipe.publish(keys.channel("i1"), b"junk")
                        channel = keys.broadcast if n % 7 == 0 else keys.channel("i1")
                        pipe.publish(channel, raw(["i1:a"], frame))
                    await pipe.execute()
                async with asyncio.timeout(SOON * 5):
                    while len(frames_of(local, "i1:a")) < len(expected):
                        await asyncio.sleep(0.01)
    assert frames_of(local, "i1:a") == expected
    assert dropped.reasons() == ["malformed"] * 30


@pytest.mark.integration
async def test_run_on_real_redis_resubscribes_after_client_kill(
    private_redis: RedisServer,
) -> None:
    calls: list[float] = []

    async def callback() -> None:
        calls.append(time.monotonic())

    local = keeping("i1:a")
    async with real_client(private_redis.url) as redis:
        receiver = Receiver(redis, KEYS, "i1", local, OWNER)
        receiver.on_subscribed(callback)
        with recording(signals.subscriber_lost, OWNER) as lost:
            async with running(receiver):
                assert await redis.client_kill_filter(_type="pubsub") == 1
                await eventually(lambda: len(calls) == 2 and receiver.subscribed.is_set())
                assert await redis.publish(KEYS.channel("i1"), raw(["i1:a"], "after")) == 1
                await eventually(lambda: frames_of(local, "i1:a") == ["after"])
                assert await pubsub_clients(redis) == 1
    assert lost.reasons() == ["closed"]  # Redis 7.0 does not count output-buffer cuts
    assert all(isinstance(call["error"], RedisConnectionError) for call in lost.calls)


@pytest.mark.integration
async def test_run_on_real_redis_restart_takes_effect_within_read_timeout(
    admin_redis_url: str, prefix: str
) -> None:
    calls: list[float] = []

    async def callback() -> None:
        calls.append(time.monotonic())

    keys = Keys(prefix)
    async with real_client(admin_redis_url) as redis:
        receiver = Receiver(redis, keys, "i1", held(keys=keys), OWNER)
        receiver.on_subscribed(callback)
        async with running(receiver):
            await eventually(lambda: len(calls) == 1)
            await asyncio.sleep(0.05)  # in the middle of a read that finds nothing
            asked = time.monotonic()
            receiver.restart()
            await eventually(lambda: len(calls) == 2)
            took = calls[1] - asked
            assert took < READ_TIMEOUT + 0.75, f"restarted {took:.2f}s after it was asked"
            assert await redis.pubsub_numsub(keys.broadcast) == [(keys.broadcast.encode(), 1)]
            assert await redis.publish(keys.channel("i1"), receiver.next_probe()) == 1
            await eventually(lambda: receiver.missed_probes() == 0)


@pytest.mark.integration
async def test_run_on_real_redis_cancellation_closes_the_connection(admin_redis_url: str) -> None:
    async with real_client(admin_redis_url) as redis:
        before = await pubsub_clients(redis)
        receiver = Receiver(redis, Keys("t-" + secrets.token_hex(4)), "i1", held(), OWNER)
        async with running(receiver) as task:
            assert await pubsub_clients(redis) == before + 1
        assert task.cancelled()
        assert not receiver.subscribed.is_set()
        async with asyncio.timeout(SOON):
            while await pubsub_clients(redis) > before:
                await asyncio.sleep(0.01)


#: A pub/sub output buffer small enough for a frozen instance to overflow it in a second.
CUT_LIMIT = 256 * 1024
CUT_MESSAGE = 12_000


async def collect(socket: ClientConnection, counts: Counter[str], user: str) -> None:
    """Count the frames of the cut test that ``socket`` receives, until it closes."""
    async for frame in socket:
        if isinstance(frame, str) and frame.startswith("cut:"):
            counts[user] += 1


async def send_until_cut(emitter: AsyncEmitter, users: list[str]) -> tuple[int, int]:
    """Send 12 KB messages to ``users`` in turn until Redis cut their instance's
    subscriber (a send then routes to nobody); returns (sends, routed)."""
    sends = counted = 0
    while sends < 3000:
        payload = f"cut:{sends}:".ljust(CUT_MESSAGE, "x")
        routed = await emitter.send(UserSelector(users[sends % len(users)]), payload)
        sends += 1
        counted += routed
        if routed == 0:
            break
    return sends, counted


async def settled(counts: Counter[str]) -> None:
    """Wait until no counted frame arrived for a second."""
    while True:
        before = counts.total()
        await asyncio.sleep(1.0)
        if counts.total() == before:
            return


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_run_cut_by_redis_delivers_what_it_holds_and_signals_the_loss(
    private_redis: RedisServer, start_cluster: Callable[..., Cluster], clients: Clients
) -> None:
    """Redis cuts a frozen instance's subscriber (``client-output-buffer-limit pubsub``)
    while 12 KB messages pour in. Once it runs again, every counted message must be
    delivered, except those Redis still buffered at the cut (at most the limit), and the
    cut must be signalled."""
    cluster = start_cluster(
        1, url=private_redis.url, WSLB_HEARTBEAT_INTERVAL="0.5", WSLB_INSTANCE_TTL="10"
    )
    users = [f"u{n}" for n in range(4)]
    delivered = Counter[str]()
    collectors = [
        asyncio.create_task(collect((await clients.join(cluster[0], user))[0], delivered, user))
        for user in users
    ]
    async with real_client(private_redis.url) as redis:
        await redis.config_set("client-output-buffer-limit", f"pubsub {CUT_LIMIT} 0 0")
        emitter = AsyncEmitter(redis, prefix=cluster.prefix)
        try:
            cluster[0].pause()
            try:
                sends, counted = await send_until_cut(emitter, users)
                await asyncio.sleep(1.0)  # its liveness tick is due the moment it resumes
            finally:
                cluster[0].resume()
            resumed = time.monotonic()
            async with asyncio.timeout(20):
                while await emitter.send(UserSelector(users[0]), "back") != 1:
                    await asyncio.sleep(0.05)
                recovered = time.monotonic() - resumed
                await settled(delivered)
            stats = await cluster[0].stats()
        finally:
            for task in collectors:
                task.cancel()
            await asyncio.gather(*collectors, return_exceptions=True)
            await emitter.aclose()
    total = delivered.total()
    dropped = sum(v for k, v in stats.items() if k.startswith("dropped_"))
    lost = counted - total - dropped
    # What Redis held for the subscriber when it cut it: the limit, its 16 KB reply
    # buffer, and the message that crossed the limit.
    bound = (CUT_LIMIT + 16 * 1024) // CUT_MESSAGE + 1
    figures = (
        f"sends {sends}, counted {counted}, delivered {total}, dropped {dropped}, "
        f"lost {lost} (bound {bound}), subscriber_lost "
        f"{ {k: v for k, v in stats.items() if k.startswith('subscriber_lost')} }, "
        f"delivery again {recovered:.2f}s after resuming"
    )
    print(f"\nMEASURED Redis cut a frozen subscriber: {figures}")
    assert counted > bound, figures  # the sockets held more than Redis dropped
    # "closed" where Redis does not count output-buffer cuts (7.0, which the tests run)
    cut = stats.get("subscriber_lost_closed", 0) + stats.get(
        "subscriber_lost_output_buffer_limit", 0
    )
    assert cut == 1, figures
    assert 0 <= lost <= bound, figures


class ScriptedMerged(Scripted, MergedSubscription):
    """A cluster's merged subscription, scripted: records the channels abandoned."""

    def __init__(self, *steps: Step) -> None:
        Scripted.__init__(self, *steps)
        self.deaf: list[str] = []

    def abandon(self, channels: Iterable[str]) -> None:
        self.deaf += channels


@pytest.mark.parametrize("named", [True, False], ids=["shards-named", "none-named"])
async def test_run_restart_of_named_shards_abandons_them_at_once(
    fake_redis: Redis, scripts: list[Scripted], named: bool
) -> None:
    """A restart ends a cluster's subscription after the batch in hand, the deaf shards'
    channels abandoned (the other masters' parts keep what they hold, unread; they are
    drained before they are dropped): all of them when none are named."""
    keys = Keys("t", shards=4)
    local = keeping("i1:a")
    receiver = Receiver(fake_redis, keys, "i1", local, OWNER)

    def restart() -> list[bytes]:
        receiver.restart([2] if named else None)
        return texts("b")

    merged = ScriptedMerged(texts("a"), restart, texts("c"))
    scripts.append(merged)
    scripts.append(Scripted(texts("d")))
    with recording(signals.subscriber_lost, OWNER) as lost:
        async with running(receiver):
            await eventually(lambda: frames_of(local, "i1:a")[-1:] == ["d"])
    assert frames_of(local, "i1:a") == ["a", "b", "d"]
    shards = [keys.view(2)] if named else keys.views
    channels = [name for view in shards for name in (view.channel("i1"), view.broadcast)]
    assert merged.deaf == channels
    assert lost.reasons() == ["deaf"]


async def test_run_delivers_while_a_callback_after_subscribing_hangs(
    fake_redis: Redis, scripts: list[Scripted]
) -> None:
    """The callbacks after subscribing (a beat, a repair: Redis round trips, maybe to a
    master still hung) run beside the listening, and stop with the loop."""
    entered, cancelled = asyncio.Event(), asyncio.Event()

    async def hanging() -> None:
        entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    local = keeping("i1:a")
    receiver = Receiver(fake_redis, KEYS, "i1", local, OWNER)
    receiver.on_subscribed(hanging)
    scripts.append(Scripted(texts("a")))
    async with running(receiver):
        await eventually(lambda: frames_of(local, "i1:a") == ["a"] and entered.is_set())
        assert not cancelled.is_set()
    assert cancelled.is_set()


async def test_dispatch_counts_messages_received_not_probes(fake_redis: Redis) -> None:
    """``received`` (which the heartbeat publishes, for ``wslb watch``'s rates) counts
    every message of a publish, delivered or not, and no probe."""
    receiver = Receiver(fake_redis, KEYS, "i1", held(), OWNER)
    publish = encode(*(Envelope(f"m{n}", "i0", "text", ["i1:9"], "x") for n in range(3)))
    await receiver.dispatch(publish)
    await receiver.dispatch(raw(["i1:9"]))
    await receiver.dispatch(receiver.next_probe())
    await receiver.dispatch(b"not an envelope")
    assert receiver.received == 4


def on_shard(publish: bytes, shard: int) -> bytes:
    """``publish`` as shard ``shard``'s script call writes it (header field ``sh``)."""
    return publish.replace(b"{", b'{"sh":%d,' % shard, 1)


async def test_dispatch_counts_a_message_once_over_its_shards_copies(fake_redis: Redis) -> None:
    """With several shards a send reaches an instance as one envelope per shard that
    routed it, all of one id: ``received`` counts messages, not envelopes."""
    keys = Keys("counted", shards=4)
    receiver = Receiver(fake_redis, keys, "i1", held(keys=keys), OWNER)
    first, second = (Envelope(i, "i0", "text", ["i1:9"], "x") for i in ("m1", "m2"))
    for shard in range(4):
        await receiver.dispatch(on_shard(encode(first), shard))
    assert receiver.received == 1
    await receiver.dispatch(on_shard(encode(second, first), 0))  # m2 new, m1 a late copy
    await receiver.dispatch(on_shard(encode(second), 3))
    assert receiver.received == 2


async def test_dispatch_remembers_a_bounded_window_of_message_ids(
    fake_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ids kept to count each message once are the last ``RECENT_IDS``, not all."""
    monkeypatch.setattr(receiver_module, "RECENT_IDS", 3)
    keys = Keys("counted", shards=2)
    receiver = Receiver(fake_redis, keys, "i1", held(keys=keys), OWNER)
    for n in range(10):
        await receiver.dispatch(on_shard(encode(Envelope(f"m{n}", "i0", "text", [], "x")), 0))
    assert receiver.received == 10
    assert len(receiver._recent_set) == len(receiver._recent_ids) == 3
    await receiver.dispatch(on_shard(encode(Envelope("m9", "i0", "text", [], "x")), 1))
    assert receiver.received == 10  # a copy within the window: counted already
