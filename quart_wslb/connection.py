"""A live websocket connection on this instance, and its bounded send queue.

Every frame for a client goes through the connection's queue and one writer task, so a
slow client only ever fills its own queue; it cannot stall delivery to anyone else. What
happens when the queue is full is the ``WSLB_QUEUE_FULL`` policy: ``"close"`` (default)
closes the connection with 1013 so the client reconnects knowing it missed messages,
``"drop"`` drops the frame. Either way ``message_dropped`` is sent and a line is logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, cast

from hypercorn.typing import ASGISendCallable, WebsocketSendEvent
from quart.wrappers import Websocket

from . import _compat, signals
from .config import QueueFullPolicy
from .envelope import Frame, pack, to_frame
from .outgoing import Outgoing
from .positions import Recovery, wrap
from .selectors import ConnectionSelector, GroupSelector, Selector
from .signal_sender import SignalSender

__all__ = ("Activity", "Connection", "Grouping", "Membership")

log = logging.getLogger("quart_wslb")
#: Close code for a client that cannot keep up ("try again later").
SLOW_CLIENT_CLOSE = 1013
#: Seconds the close frame may take to write before the connection is given up on.
CLOSE_TIMEOUT = 1.0
#: Seconds between tries of :meth:`Connection.put` while the queue is full.
PUT_POLL = 0.005
#: Bytes of queued frames a writer joins into one write to Hypercorn's stream at most:
#: one system call for a burst, without copying large frames for each connection.
COALESCE_BYTES = 64 * 1024


@dataclass(slots=True)
class Activity:
    """What the ASGI middleware sees of one websocket: accepted yet, and when it spoke.

    Times are monotonic: the client's last frame, and the last ping sent to it.
    """

    received: float = field(default_factory=time.monotonic)
    pinged: float = 0.0
    accepted: asyncio.Event = field(default_factory=asyncio.Event)
    #: The ASGI server's send, for writing frames without Quart's per-frame overhead.
    send: ASGISendCallable | None = None


class Membership(Protocol):
    """Cluster-wide group membership (the extension's ``join`` and ``leave``): what
    :meth:`Connection.join` and :meth:`Connection.leave` record in Redis."""

    async def join(self, selector: Selector, group: str) -> int:
        """Add the connections ``selector`` matches to ``group``; how many."""
        ...

    async def leave(self, selector: Selector, group: str) -> int:
        """Remove the connections ``selector`` matches from ``group``; how many."""
        ...


class Grouping(Protocol):
    """Changes a connection's groups, and whatever indexes them
    (:class:`~quart_wslb.local_index.LocalIndex`)."""

    def join(self, connection: Connection, group: str) -> None: ...
    def leave(self, connection: Connection, group: str) -> None: ...


class _Unindexed:
    """The grouping of a connection that no index holds: its ``groups`` alone."""

    @staticmethod
    def join(connection: Connection, group: str) -> None:
        connection.groups.add(group)

    @staticmethod
    def leave(connection: Connection, group: str) -> None:
        connection.groups.discard(group)


class Outbox:
    """A connection's bounded queue of frames, with one consumer: its writer.

    Lighter than ``asyncio.Queue`` (built for many producers and consumers), since each
    frame crosses one on the receiving instance's hot path.
    """

    __slots__ = ("_frames", "_limit", "_waiter")

    def __init__(self, limit: int) -> None:
        self._frames: deque[Outgoing] = deque()
        self._limit = limit
        self._waiter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._frames)

    def put(self, message: Outgoing) -> bool:
        """Queue ``message`` and wake the writer; ``False`` (nothing queued) when full."""
        if len(self._frames) >= self._limit:
            return False
        self._frames.append(message)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True

    async def get(self) -> Outgoing:
        """The oldest frame, waiting for one if there is none."""
        while not self._frames:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._frames.popleft()

    async def get_wire(self, limit: int) -> list[Outgoing]:
        """The oldest frame, waiting for one, and those queued right behind it while
        their encoded bytes come to at most ``limit`` in all."""
        frames = self._frames
        while not frames:  # as get(), inlined: this runs once per frame written
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        batch = [frames.popleft()]
        if frames:
            size = len(batch[0].wire)
            while frames and size + len(frames[0].wire) <= limit:
                message = frames.popleft()
                size += len(message.wire)
                batch.append(message)
        return batch


class Connection:
    """A websocket tracked by ``ws_route``: what ``current_connection`` points to."""

    __slots__ = (
        "_closed",
        "_closer",
        "_handler",
        "_index",
        "activity",
        "_membership",
        "_sender",
        "_policy",
        "_queue",
        "_websocket",
        "_wire",
        "_writer",
        "connected_at",
        "groups",
        "id",
        "instance",
        "metadata",
        "path",
        "recovery",
        "registering",
        "user",
    )

    def __init__(
        self,
        *,
        id: str,
        user: str | None,
        path: str,
        instance: str,
        metadata: Mapping[str, str],
        websocket: Websocket,
        queue_size: int,
        policy: QueueFullPolicy,
        sender: SignalSender,
        membership: Membership,
        activity: Activity | None = None,
        index: Grouping | None = None,
    ) -> None:
        #: Cluster-unique id: ``<instance>:<token>``.
        self.id = id
        #: The user the ``user`` callable named, or ``None``.
        self.user = user
        #: The concrete websocket path, such as ``/ws/red``.
        self.path = path
        #: The id of the instance that holds the socket.
        self.instance = instance
        #: Metadata from the ``metadata`` callable (str -> str).
        self.metadata: Mapping[str, str] = dict(metadata)
        #: Unix time at which the connection was registered.
        self.connected_at = time.time()
        #: The groups (rooms) it belongs to; change them with :meth:`join` and :meth:`leave`.
        self.groups: set[str] = set()
        self._websocket = websocket
        self._queue = Outbox(queue_size)
        self._policy = policy
        self._sender = sender
        self._membership = membership
        # "is None", not "or": an index holding no connection yet is an empty mapping.
        self._index: Grouping = _Unindexed() if index is None else index
        self._writer: asyncio.Task[None] | None = None
        # Whether the writer writes frames encoded once to Hypercorn's stream.
        self._wire = False
        self._closer: asyncio.Task[None] | None = None
        self._closed = False
        #: True until the first registration attempt ends; repairs leave it alone.
        self.registering = True
        #: On a recovery route (``ws_route(recovery=True)``), its session's state.
        self.recovery: Recovery | None = None
        # The handler's task: a close from outside it also ends the handler, so a client
        # that never answers the close (dead TCP, slow reader) cannot keep it running.
        self._handler = _current_task()
        #: When the client last sent a frame, when it was last pinged, whether accepted.
        self.activity = activity or _accepted()

    def __repr__(self) -> str:
        return f"<Connection {self.id} user={self.user!r} path={self.path!r}>"

    @property
    def queued(self) -> int:
        """Frames waiting in its send queue (at most ``WSLB_SEND_QUEUE_SIZE``)."""
        return len(self._queue)

    async def send(self, message: object) -> None:
        """Send to this client (through its queue): str, bytes, dict or list. On a
        recovery route it arrives as a ``{"t":"msg"}`` frame with no position."""
        if self.recovery is not None:
            kind, payload = pack(message)
            frame: Frame = payload if kind == "binary" else payload.decode()
            await self.offer(Outgoing(wrap(kind, frame, None)), None)
            return
        await self.offer(Outgoing(to_frame(message)), None)

    async def join(self, group: str) -> None:
        """Join ``group`` (a room): ``GroupSelector(group)`` then reaches this connection."""
        GroupSelector(group)  # validates the name before anything changes
        member = group in self.groups
        self._index.join(self, group)
        try:
            await self._membership.join(ConnectionSelector(self.id), group)
        except BaseException:
            if not member:  # a failed join takes back only what it added
                self._index.leave(self, group)
            raise

    async def leave(self, group: str) -> None:
        """Leave ``group``; leaving a group it is not in does nothing."""
        GroupSelector(group)
        await self._membership.leave(ConnectionSelector(self.id), group)
        self._index.leave(self, group)

    def put_nowait(self, message: Outgoing | Frame) -> bool:
        """Queue one frame if the connection is open and its queue has room; else
        ``False``, and :meth:`offer` applies the policy (and reports the drop).

        Give every connection the same :class:`~quart_wslb.outgoing.Outgoing` for one
        message: it is then encoded once for all of them."""
        if type(message) is not Outgoing:
            message = Outgoing(cast(Frame, message))
        return not self._closed and self._queue.put(message)

    async def put(self, message: Outgoing | Frame) -> None:
        """Queue one frame, waiting while the queue is full rather than applying the
        policy (a replay must not drop what it hands out); nothing once it is closed."""
        if type(message) is not Outgoing:
            message = Outgoing(cast(Frame, message))
        while not self.put_nowait(message) and not self._closed:
            await asyncio.sleep(PUT_POLL)

    async def offer(self, message: Outgoing | Frame, message_id: str | None) -> bool:
        """Queue one frame without waiting; apply the queue-full policy if it is full."""
        if self._closed:  # closing already (say, for being slow): report, quietly
            await self._sender.dropped(
                "closed",
                message_id=message_id,
                connection=self,
                detail="the connection is closing",
            )
            return False
        if type(message) is not Outgoing:
            message = Outgoing(cast(Frame, message))
        if self._queue.put(message):
            return True
        log.warning("send queue of %s is full (%s)", self.id, self._policy)
        await self._sender.dropped(
            "queue_full",
            message_id=message_id,
            connection=self,
            detail=f"policy {self._policy}",
        )
        # A recovery connection is closed whatever the policy: its client resumes and
        # gets what was dropped, where a drop would leave a gap in its history.
        if self._policy == "close" or self.recovery is not None:
            await self.close(SLOW_CLIENT_CLOSE, "send queue full")
        return False

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the websocket and end its handler; the record then leaves Redis.

        Returns at once: the close frame is written by a task of its own, bounded by
        ``CLOSE_TIMEOUT``, because writing to a client that does not read can block, and
        whoever closes (the subscriber loop, for a slow client) must never wait on it.
        """
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.cancel()  # frees the socket for the close frame
        self._closer = asyncio.create_task(self._send_close(code, reason))
        if self._handler is not None and self._handler is not asyncio.current_task():
            self._handler.cancel()

    async def _send_close(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._websocket.close(code, reason)
        except Exception:  # the client is gone or does not read: nothing more to do
            log.debug("closing %s failed", self.id, exc_info=True)

    def start(self) -> None:
        """Start the writer task (in the handler's context)."""
        self._writer = asyncio.create_task(self._write(), name=f"wslb-writer-{self.id}")

    async def stop(self) -> None:
        """Cancel the writer and wait for it; frames still queued are reported dropped."""
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._closer is not None:  # bounded by CLOSE_TIMEOUT
            await asyncio.gather(self._closer, return_exceptions=True)
        if unsent := len(self._queue):
            await self._sender.dropped(
                "closed",
                message_id=None,
                connection=self,
                detail=f"{unsent} frames queued when the connection ended",
            )

    async def _write(self) -> None:
        # Frames wait for the handshake: a routed message must not accept the socket
        # with Quart's defaults before the handler chose its subprotocol and headers.
        await self.activity.accepted.wait()
        # Straight to the ASGI server when the middleware handed us its send: Quart's
        # Websocket.send adds an event-loop round (sleep(0)) and a signal to each frame.
        # Straighter still to Hypercorn's stream when it allows: frames encoded once.
        send = self.activity.send
        try:
            if send is not None and (writer := _compat.frame_writer(send)) is not None:
                self._wire = True
                await self._write_wire(writer, send)
            else:
                await self._write_events(send)
        except Exception as error:  # the socket is gone; the handler is ending too
            log.warning("writing to %s failed; its writer stops", self.id, exc_info=True)
            await self._sender.dropped(
                "closed", connection=self, detail=f"writing failed: {error!r}"
            )

    async def _write_events(self, send: ASGISendCallable | None) -> None:
        """One ASGI ``websocket.send`` event (or Quart's send) per frame."""
        queue = self._queue
        delivered, timed = signals.message_delivered, signals.message_timed
        while True:
            message = await queue.get()
            if send is not None:
                await send(_send_event(message.frame))
            else:
                await self._websocket.send(message.frame)
            if delivered.receivers or timed.receivers:
                await self._delivered([message])

    async def _write_wire(self, writer: _compat.FrameWriter, send: ASGISendCallable) -> None:
        """Encoded frames written to Hypercorn's stream, those queued together at once;
        the ASGI event again whenever the stream says no (closing, say), so that
        Hypercorn handles the frame as it would any other."""
        queue = self._queue
        delivered, timed = signals.message_delivered, signals.message_timed
        while True:
            batch = await queue.get_wire(COALESCE_BYTES)
            if not writer.ready():
                for message in batch:
                    await send(_send_event(message.frame))
            elif len(batch) == 1:
                await writer.write(batch[0].wire)
            else:
                await writer.write(b"".join([message.wire for message in batch]))
            if delivered.receivers or timed.receivers:
                await self._delivered(batch)

    async def _delivered(self, batch: list[Outgoing]) -> None:
        """``message_delivered`` for each frame of ``batch``, just written, and
        ``message_timed`` for each that carries a usable send time.

        Never raises (but cancellation): the writer awaits it between writes, and a
        writer that ended would leave its client open, registered and sent nothing more.
        """
        try:
            now = time.time_ns() // 1000  # one clock reading for the batch, as one write
            send = self._sender.send
            for message in batch:
                await send(signals.message_delivered, connection=self, frame=message.frame)
                if message.sent is not None:
                    latency = _latency(now, message.sent)
                    if latency is not None:
                        await send(signals.message_timed, connection=self, latency=latency)
        except Exception:  # receivers are isolated already: this is a bug of ours
            log.exception("reporting frames written to %s failed; its writer goes on", self.id)


def _latency(now: int, sent: int) -> float | None:
    """Seconds from ``sent`` to ``now`` (Unix µs); ``None`` when they make no float
    (``decode`` keeps such send times out, but an ``Outgoing`` may come from elsewhere)."""
    try:
        return (now - sent) / 1e6
    except (TypeError, OverflowError):
        return None


def _send_event(frame: Frame) -> WebsocketSendEvent:
    if isinstance(frame, str):
        return {"type": "websocket.send", "bytes": None, "text": frame}
    return {"type": "websocket.send", "bytes": frame, "text": None}


def _accepted() -> Activity:
    """The activity of a socket nothing watches: taken as accepted already."""
    activity = Activity()
    activity.accepted.set()
    return activity


def _current_task() -> asyncio.Task[object] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # built outside an event loop (a test, a tool)
        return None
