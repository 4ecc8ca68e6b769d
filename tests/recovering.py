"""A client of the recovery protocol, for the integration tests (tests/test_recovery_cluster.py).

The protocol (docs/recovery.md; a route with ``@ws_route(recovery=True)``): the
client's first frame is ``{"t":"resume"}`` (a new session) or ``{"t":"resume",
"session":..,"token":..,"epoch":..,"pos":..}``; the server answers ``{"t":"welcome",
...,"recovered":..,"end":..}``, then sends every message routed through Redis as
``{"t":"msg","pos":P,"d"|"j"|"b":..}`` (replayed ones first, then live ones), what the
handler sends its own connection in the same shapes without ``"pos"``, and now and then
a mark ``{"t":"pos","pos":P}`` (all before ``P`` has arrived). Positions are
``"<ms>-<seq>"``, ordered by ``seq``.

:class:`RecoveringClient` keeps the session, token, epoch and the position of the last
message, can resume on any instance, and keeps everything it received with the time it
arrived, so a test can count what was lost, duplicated or out of order. Like a real
client it ignores a message at or before the last position of its epoch, but it records
it in :attr:`RecoveringClient.stale` first: the tests assert that list stays empty (the
server must not rely on the client's safety net).
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

#: How long a frame that should come at once is waited for.
FRAME_TIMEOUT = 5.0
#: The route of ``tests.cluster_app`` that opts into recovery (user from ``?user=``).
RECOVER_PATH = "/ws/recover"
#: The close code of a connection whose session was resumed elsewhere.
RESUMED_ELSEWHERE = 4409
#: The close code of a connection whose history was lost while it was connected.
HISTORY_LOST = 4410

Kind = Literal["d", "j", "b"]
KINDS: tuple[Kind, ...] = ("d", "j", "b")


def seq(pos: str) -> int:
    """The order of position ``pos`` (``"<ms>-<seq>"``): the integer after the dash."""
    return int(pos.rpartition("-")[2])


@dataclass(frozen=True)
class Welcome:
    """The server's first frame on a connection."""

    session: str
    token: str
    epoch: str
    pos: str
    recovered: bool
    #: ``time.monotonic()`` when it arrived.
    at: float
    #: Where the history ended when the session was claimed (docs/recovery.md): the
    #: messages numbered up to it are the replay.
    end: str

    @classmethod
    def parse(cls, frame: dict[str, Any], at: float) -> Welcome:
        """A welcome frame, checked against the protocol's shape."""
        if frame.get("t") != "welcome":
            raise ProtocolError(f"first frame is not a welcome: {frame!r}")
        try:
            welcome = cls(
                session=frame["session"],
                token=frame["token"],
                epoch=frame["epoch"],
                pos=frame["pos"],
                recovered=frame["recovered"],
                at=at,
                end=frame["end"],
            )
        except KeyError as missing:
            raise ProtocolError(f"welcome without {missing}: {frame!r}") from None
        for name in ("session", "token", "epoch", "pos", "end"):
            if not isinstance(getattr(welcome, name), str):
                raise ProtocolError(f"welcome {name} is not a string: {frame!r}")
        if not isinstance(welcome.recovered, bool):
            raise ProtocolError(f"welcome recovered of the wrong type: {frame!r}")
        seq(welcome.pos)  # a position, or ValueError
        seq(welcome.end)
        return welcome


@dataclass(frozen=True)
class Message:
    """A message frame: ``pos`` is ``None`` for the handler's own sends (not recoverable)."""

    pos: str | None
    kind: Kind
    #: The ``str`` (``"d"``), the JSON value (``"j"``) or the ``bytes`` (``"b"``).
    value: Any
    epoch: str
    at: float

    @classmethod
    def parse(cls, frame: dict[str, Any], epoch: str, at: float) -> Message:
        """A ``{"t":"msg",...}`` frame, with exactly one of ``d``, ``j``, ``b``."""
        kinds: list[Kind] = [kind for kind in KINDS if kind in frame]
        if len(kinds) != 1:
            raise ProtocolError(f"msg frame needs exactly one of d, j, b: {frame!r}")
        kind = kinds[0]
        value = frame[kind]
        if kind == "d" and not isinstance(value, str):
            raise ProtocolError(f"msg d is not a string: {frame!r}")
        if kind == "b":
            value = base64.b64decode(value, validate=True)
        pos = frame.get("pos")
        if pos is not None:
            seq(pos)
        return cls(pos, kind, value, epoch, at)


class ProtocolError(AssertionError):
    """The server broke the protocol (a frame of the wrong shape or at the wrong time)."""


@dataclass
class Outage:
    """One loss of the connection and the resume that followed it (see :meth:`follow`)."""

    #: ``time.monotonic()`` when the client saw its connection end.
    lost_at: float
    #: The close code the client saw (1006: the connection dropped without a close frame).
    code: int | None
    #: The close frame's reason.
    reason: str = ""
    #: The instance it resumed on (the ``ws://host:port`` base).
    resumed_on: str = ""
    welcome: Welcome | None = None
    #: ``time.monotonic()`` of the first message after the welcome.
    first_message_at: float | None = None
    #: Connection attempts that failed before the resume.
    failed_attempts: int = 0

    @property
    def welcome_recovered(self) -> bool:
        """Whether the resume was told ``recovered: true``."""
        return self.welcome is not None and self.welcome.recovered

    @property
    def gap(self) -> float:
        """Seconds from the loss to the welcome of the resume."""
        return (self.welcome.at if self.welcome else float("inf")) - self.lost_at

    def describe(self) -> str:
        welcome = self.welcome
        first = (
            f"{self.first_message_at - self.lost_at:.3f} s"
            if self.first_message_at is not None
            else "none"
        )
        return (
            f"lost (close code {self.code} {self.reason!r}), resumed on {self.resumed_on} after "
            f"{self.gap:.3f} s ({self.failed_attempts} failed attempts), recovered="
            f"{welcome.recovered if welcome else None}, first message {first} after the loss"
        )


@dataclass
class RecoveringClient:
    """One user's recoverable session, over as many connections as it takes."""

    user: str
    path: str = RECOVER_PATH
    session: str | None = None
    token: str | None = None
    epoch: str | None = None
    pos: str | None = None
    #: The ``ws://host:port`` base of the instance of the current (or last) connection.
    base: str = ""
    connection: ClientConnection | None = None
    welcomes: list[Welcome] = field(default_factory=list)
    #: The messages with a position, in the order they arrived, but the stale ones.
    messages: list[Message] = field(default_factory=list)
    #: Messages whose position was at or before the last one of their epoch (a
    #: duplicate, or one out of order): ignored, as the protocol says, and kept here.
    stale: list[Message] = field(default_factory=list)
    #: The handler's own sends (no position).
    own: list[Message] = field(default_factory=list)
    #: JSON frames of another ``t`` (or none), and frames that were not JSON (pings).
    others: list[Any] = field(default_factory=list)
    #: The positions of the marks (``{"t":"pos"}``) received.
    marks: list[str] = field(default_factory=list)
    outages: list[Outage] = field(default_factory=list)
    #: Every connection it opened, the current one last.
    opened: list[ClientConnection] = field(default_factory=list)
    #: The pool that closes its connections at the end of the test.
    pool: Pool | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.pool is not None:
            self.pool.clients.append(self)

    def fork(self) -> RecoveringClient:
        """Another client holding the same session state (for two resumes at once), in
        the same pool."""
        return RecoveringClient(
            self.user,
            self.path,
            self.session,
            self.token,
            self.epoch,
            self.pos,
            self.base,
            pool=self.pool,
        )

    def resume_frame(self) -> dict[str, str]:
        """``{"t":"resume"}``, with the session's state once it has one."""
        if self.session is None:
            return {"t": "resume"}
        assert self.token is not None and self.epoch is not None and self.pos is not None
        return {
            "t": "resume",
            "session": self.session,
            "token": self.token,
            "epoch": self.epoch,
            "pos": self.pos,
        }

    def url(self, base: str) -> str:
        """The route's URL on the instance at ``base`` (``ws://host:port``): the user in
        the query, never the token."""
        return f"{base}{self.path}?user={self.user}"

    async def open(
        self, base: str, frame: dict[str, str] | None = None, *, rcvbuf: int | None = None
    ) -> Welcome:
        """Connect to the instance at ``base``, send the resume frame (``frame`` instead,
        to send a tampered one) and read the welcome; the state becomes the welcome's.
        Raises ``ConnectionClosed`` if the server closes the connection first. With
        ``rcvbuf``, the socket's receive buffer is that small (a client that does not
        read then holds up its server soon), and no compression is negotiated (so that
        the socket holds the bytes the server wrote)."""
        self.base = base
        sock = None
        if rcvbuf is not None:
            host, _, port = base.removeprefix("ws://").rpartition(":")
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            except BaseException:
                sock.close()
                raise
        self.connection = await connect(
            self.url(base),
            open_timeout=FRAME_TIMEOUT,
            sock=sock,
            max_queue=16 if rcvbuf is None else 1,
            compression="deflate" if rcvbuf is None else None,
        )
        self.opened.append(self.connection)
        await self.connection.send(json.dumps(frame or self.resume_frame()))
        while True:
            raw = await asyncio.wait_for(self.connection.recv(), FRAME_TIMEOUT)
            at = time.monotonic()
            decoded = _json(raw)
            if decoded is None:  # a ping of WSLB_PING_*: not a protocol frame
                self.others.append(raw)
                continue
            welcome = Welcome.parse(decoded, at)
            break
        self.session, self.token = welcome.session, welcome.token
        self.epoch, self.pos = welcome.epoch, welcome.pos
        self.welcomes.append(welcome)
        return welcome

    def drop(self) -> None:
        """Drop the connection at once, without a close frame (the network failed)."""
        if self.connection is not None:
            self.connection.transport.abort()

    async def close(self) -> None:
        """Close the connection cleanly (code 1000), if it is open."""
        if self.connection is not None:
            await self.connection.close()

    @property
    def last_seq(self) -> int | None:
        """The seq of the last message processed in the current epoch (``None``: none; a
        new epoch, after Redis lost its history, starts the dedup over)."""
        for message in reversed(self.messages):
            if message.epoch != self.epoch:
                return None
            if message.pos is not None:
                return seq(message.pos)
        return None

    async def next(self, timeout: float = FRAME_TIMEOUT) -> Message:
        """The next message frame (a stale one too), after processing it; other frames
        are kept in :attr:`others`. ``TimeoutError`` past ``timeout``; ``ConnectionClosed``
        when the connection ends."""
        assert self.connection is not None, "not connected"
        deadline = time.monotonic() + timeout
        while True:
            raw = await asyncio.wait_for(
                self.connection.recv(), max(0.0, deadline - time.monotonic())
            )
            at = time.monotonic()
            decoded = _json(raw)
            if decoded is not None and decoded.get("t") == "pos":
                self._mark(decoded)
                continue
            if decoded is None or decoded.get("t") != "msg":
                if decoded is not None and decoded.get("t") == "welcome":
                    raise ProtocolError(f"a second welcome: {decoded!r}")
                self.others.append(decoded if decoded is not None else raw)
                continue
            assert self.epoch is not None
            message = Message.parse(decoded, self.epoch, at)
            self._take(message)
            return message

    def _mark(self, frame: dict[str, Any]) -> None:
        """A mark, ``{"t":"pos","pos":P}``: everything before ``P`` has arrived, so a
        resume may start there (docs/recovery.md)."""
        pos = frame.get("pos")
        if not isinstance(pos, str):
            raise ProtocolError(f"a mark without a position: {frame!r}")
        self.marks.append(pos)
        last = self.last_seq
        if last is not None and seq(pos) < last:
            raise ProtocolError(f"a mark {pos} before the last message (seq {last})")
        self.pos = pos

    def _take(self, message: Message) -> None:
        if message.pos is None:
            self.own.append(message)
            return
        last = self.last_seq
        if last is not None and seq(message.pos) <= last:
            self.stale.append(message)
            return
        self.messages.append(message)
        self.pos = message.pos

    async def read(self, count: int, timeout: float = FRAME_TIMEOUT) -> list[Message]:
        """The next ``count`` messages with a position (stale ones do not count)."""
        start = len(self.messages)
        deadline = time.monotonic() + timeout
        try:
            while len(self.messages) < start + count:
                await self.next(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            got = [m.value for m in self.messages[start:]]
            raise TimeoutError(f"{len(got)} of {count} messages in {timeout} s: {got}") from None
        return self.messages[start:]

    async def read_until(
        self, last: Callable[[Message], bool], timeout: float = FRAME_TIMEOUT
    ) -> list[Message]:
        """The messages with a position up to the first for which ``last`` is true."""
        start = len(self.messages)
        deadline = time.monotonic() + timeout
        try:
            while True:
                message = await self.next(max(0.0, deadline - time.monotonic()))
                if message.pos is not None and self.messages[-1] is message and last(message):
                    return self.messages[start:]
        except TimeoutError:
            got = [m.value for m in self.messages[start:]]
            raise TimeoutError(f"not the last in {timeout} s, only {got}") from None

    async def quiet(self, seconds: float = 0.3) -> list[Message]:
        """Every message that arrives within ``seconds`` (none, when all was delivered)."""
        got: list[Message] = []
        deadline = time.monotonic() + seconds
        try:
            while (left := deadline - time.monotonic()) > 0:
                got.append(await self.next(left))
        except TimeoutError:
            pass
        return got

    async def closed(self, timeout: float) -> int | None:
        """The close code once the connection has ended within ``timeout`` (frames that
        arrive meanwhile are processed), else ``None``: still open."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                await self.next(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return None
        except ConnectionClosed:
            assert self.connection is not None
            return self.connection.close_code

    async def follow(
        self,
        bases: Sequence[str],
        count: int,
        timeout: float,
        *,
        settled: Callable[[], bool] = lambda: False,
        idle: float = 5.0,
        cut_every: int = 0,
        on_message: Callable[[Message], None] | None = None,
    ) -> None:
        """Read until :attr:`messages` holds ``count``, resuming (on the next of ``bases``
        after the one it was on, and the ones after that in turn while a connection
        fails) each time the connection ends; every loss is an :class:`Outage`. Returns
        early when nothing arrived for ``idle`` seconds once ``settled()`` (the sender
        is done: what is missing then is lost, for the test to count); raises
        ``TimeoutError`` past ``timeout``. With ``cut_every``, the client drops its own
        connection (no close frame, as when the network fails) after every
        ``cut_every`` messages, and resumes the same way. ``on_message`` is called with
        each message taken, as soon as it is."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(self.messages)} of {count} messages in {timeout} s")
            try:
                message = await self.next(min(left, idle))
            except TimeoutError:
                if settled():
                    return
                continue
            except ConnectionClosed:
                assert self.connection is not None
                connection = self.connection
                outage = Outage(
                    time.monotonic(), connection.close_code, connection.close_reason or ""
                )
                self.outages.append(outage)
                await self._resume_elsewhere(bases, outage, deadline)
                continue
            last = self.outages[-1] if self.outages else None
            taken = bool(self.messages) and self.messages[-1] is message
            if last is not None and last.first_message_at is None and taken:
                last.first_message_at = message.at
            if taken and on_message is not None:
                on_message(message)
            cut = taken and cut_every and len(self.messages) % cut_every == 0
            if cut and len(self.messages) < count:
                self.drop()

    async def _resume_elsewhere(
        self, bases: Sequence[str], outage: Outage, deadline: float
    ) -> None:
        order = list(bases)
        start = order.index(self.base) + 1 if self.base in order else 0
        candidates = order[start:] + order[:start]
        attempt = 0
        while True:
            base = candidates[attempt % len(candidates)]
            try:
                outage.welcome = await self.open(base)
                outage.resumed_on = base
                return
            except (OSError, ConnectionClosed, TimeoutError) as error:
                outage.failed_attempts += 1
                attempt += 1
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no resume before the deadline: {error!r}") from error
                await asyncio.sleep(0.05)


class Pool:
    """The recovery clients of a test: every connection any of them opened is closed at
    the end, however the test ended."""

    def __init__(self) -> None:
        self.clients: list[RecoveringClient] = []

    def client(self, user: str, path: str = RECOVER_PATH) -> RecoveringClient:
        """A new client of ``user`` on ``path``, in this pool."""
        return RecoveringClient(user, path, pool=self)

    async def close(self) -> None:
        """Close every connection (those closed already are skipped fast)."""
        connections = [c for client in self.clients for c in client.opened]
        await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)


def _json(raw: str | bytes) -> dict[str, Any] | None:
    """A text frame's JSON object, else ``None`` (a binary frame or a text ping)."""
    if not isinstance(raw, str) or not raw.startswith("{"):
        return None
    try:
        decoded = json.loads(raw)
    except ValueError:
        return None
    return decoded if isinstance(decoded, dict) else None
