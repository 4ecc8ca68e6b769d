"""Real WebSocket clients of the benchmark, and what they received.

The clients run in the benchmark's own process, on the same 2-core box as the servers
under test, so every microsecond of CPU they spend per message is taken from the
servers and caps what the benchmark can measure. They are therefore as lean as a real
client can be: websockets' Sans-I/O :class:`~websockets.client.ClientProtocol` (a full
RFC 6455 client: handshake, masking, UTF-8 checks, pongs, close handshake) driven
straight from an asyncio protocol, one TCP connection per user. Frames are handled in
the protocol's read callback as the bytes arrive, with no reader task to wake per
message and one receipt time per read, and all clients read into one preallocated
buffer (asyncio's default read allocates 256 KiB each time). Compression is off (no
extension offered) and the clients send no keepalive pings; the server's pings are
answered.

Both systems are read by the same code. A quart-wslb client reads plain text frames
after the server's ``ready``; a Socket.IO client speaks Engine.IO v4 over a WebSocket
(open packet, ``40`` connect with ``auth``, ``42["m", text]`` events, ``3`` in answer to
the server's ``2``), which is what python-socketio's own client does once upgraded,
minus its event dispatch.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import State
from websockets.typing import BytesLike
from websockets.uri import parse_uri

__all__ = ("Pool", "Receipts")

CONNECT_TIMEOUT = 20.0
#: Bytes read at most at once, as asyncio's own transports do.
READ_SIZE = 256 * 1024
#: Seconds each client waits for the close handshake before it is cut off.
CLOSE_TIMEOUT = 10.0
#: Text before the payload of a Socket.IO event ``m``: ``42["m","``.
EVENT_PREFIX = '42["m","'
_PREFIX_LEN = len(EVENT_PREFIX)
_TEXT, _CONT = Opcode.TEXT, Opcode.CONT

#: What a client does with one whole text message, received at ``time.time_ns()``.
OnText = Callable[[str, int], None]


class Receipts:
    """Latencies and counts of one measured run."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.first_sent = 0
        self.last_received = 0
        self.latencies_ns: list[int] = []
        self.done = asyncio.Event()
        if expected <= 0:
            self.done.set()

    def add(self, sent: int, received: int) -> None:
        """One message, sent and received at these ``time.time_ns()`` values."""
        if not self.count or sent < self.first_sent:
            self.first_sent = sent
        self.last_received = max(self.last_received, received)
        self.latencies_ns.append(received - sent)
        self.count += 1
        if self.count >= self.expected:
            self.done.set()


class _Client(asyncio.BufferedProtocol):
    """One user's WebSocket connection: the Sans-I/O protocol fed from the event loop.

    ``on_text`` is the state of the connection: the greeting, then (Socket.IO) the
    namespace join, then the live handler that stamps receipts. Switching it inside
    the read callback means a message right behind the greeting is never misread.
    """

    def __init__(self, pool: Pool, user: str, uri: str) -> None:
        self.pool = pool
        self.user = user
        self.ws = ClientProtocol(parse_uri(uri))  # no extensions: no compression
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        #: Payloads of a fragmented text message so far; ``None`` outside one (or in a
        #: fragmented binary message, whose continuations are ignored).
        self.fragments: list[BytesLike] | None = None
        self.on_text: OnText = self._sio_open if pool.sio else self._wslb_ready

    # asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the opening handshake request."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.ws.send_request(self.ws.connect())
        self._flush()

    def get_buffer(self, sizehint: int) -> bytearray:
        """The pool's read buffer: asyncio's default read path allocates a fresh 256 KiB
        buffer for every read (and shrinks it), which a profile showed to cost more CPU
        than parsing the frame."""
        return self.pool.buffer

    def buffer_updated(self, nbytes: int) -> None:
        """Parse what arrived and handle each frame now: one receipt time per read."""
        now = time.time_ns()
        ws = self.ws
        ws.receive_data(self.pool.buffer[:nbytes])  # copied before the next read
        self._flush()  # pongs, the close echo
        for event in ws.events_received():
            if isinstance(event, Frame):
                self._frame(event, now)
            elif ws.handshake_exc is not None:  # the HTTP response, refused
                self._fail_setup(ws.handshake_exc)

    def eof_received(self) -> None:
        """The server closed its side; returning ``None`` lets the transport close."""
        self.ws.receive_eof()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        """Unblock whoever waits for the handshake or the close."""
        self.ws.receive_eof()
        self.ws.data_to_send()  # nowhere to send it any more
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost: {exc!r}"))
        if not self.closed.done():
            self.closed.set_result(None)

    # Frames and messages

    def _frame(self, frame: Frame, now: int) -> None:
        """Text messages, assembled from fragments if need be; everything else is the
        Sans-I/O protocol's business (pongs, close) or ignored (binary)."""
        opcode = frame.opcode
        if opcode is _TEXT:
            if frame.fin:
                self._text(frame.data, now)
            else:
                self.fragments = [frame.data]
        elif opcode is _CONT and self.fragments is not None:
            self.fragments.append(frame.data)
            if frame.fin:
                data, self.fragments = b"".join(self.fragments), None
                self._text(data, now)

    def _text(self, data: BytesLike, now: int) -> None:
        """Decode a whole text message; RFC 6455 requires failing on invalid UTF-8."""
        try:
            text = str(data, "utf-8")
        except UnicodeDecodeError as exc:
            self._fail(CloseCode.INVALID_DATA, exc.reason)
            return
        self.on_text(text, now)

    def _wslb_ready(self, text: str, now: int) -> None:
        """quart-wslb's first frame says the client is registered."""
        if text != "ready":
            self._fail_setup(RuntimeError(f"unexpected first frame {text!r}"))
            return
        self._live()

    def _sio_open(self, text: str, now: int) -> None:
        """The Engine.IO open packet; then join the namespace as our user."""
        if not text.startswith("0"):
            self._fail_setup(RuntimeError(f"unexpected Engine.IO open packet {text!r}"))
            return
        self.send("40" + json.dumps(self.pool.auth(self.user)))
        self.on_text = self._sio_join

    def _sio_join(self, text: str, now: int) -> None:
        """Wait for the namespace connect answer; the room is joined by then."""
        if text.startswith("40"):
            self._live()
        elif text == "2":
            self.send("3")

    def _live(self) -> None:
        self.on_text = self._sio_event if self.pool.sio else self._message
        self.ready.set_result(None)

    def _sio_event(self, text: str, now: int) -> None:
        """Answer Engine.IO pings; unwrap the event ``m``; ignore anything else."""
        if text == "2":
            self.send("3")
        elif text.startswith(EVENT_PREFIX):
            self._message(text[_PREFIX_LEN:], now)

    def _message(self, text: str, now: int) -> None:
        """Stamp one message (see ``bench.fire.payload``) while a run is measured."""
        receipts = self.pool.receipts
        if receipts is not None:
            receipts.add(int(text[9:28]), now)

    @staticmethod
    def _ignore(text: str, now: int) -> None:
        """Text after the connection failed: RFC 6455 says stop processing it."""

    # Sending and closing

    def send(self, text: str) -> None:
        """Send one text frame now."""
        self.ws.send_text(text.encode())
        self._flush()

    def _flush(self) -> None:
        """Write what the Sans-I/O protocol queued; an empty chunk means half-close."""
        transport = self.transport
        for chunk in self.ws.data_to_send():
            if transport is None or transport.is_closing():
                continue
            if chunk:
                transport.write(chunk)
            elif transport.can_write_eof():
                transport.write_eof()

    def _fail(self, code: CloseCode, reason: str) -> None:
        """Fail the WebSocket connection (a close frame, then wait for the server)."""
        self.on_text = self._ignore
        self.ws.fail(code, reason)
        self._flush()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"failed with {code}: {reason}"))

    def _fail_setup(self, exc: BaseException) -> None:
        """The handshake or the greeting went wrong: report it to ``connect``."""
        self.on_text = self._ignore
        if not self.ready.done():
            self.ready.set_exception(exc)
        self.abort()

    async def close(self, timeout: float) -> None:
        """The close handshake: our close frame, the server's, then the server closes
        TCP (RFC 6455 7.1.1); bounded by ``timeout`` seconds."""
        if self.ws.state is State.OPEN:
            self.ws.send_close(CloseCode.NORMAL_CLOSURE)
            self._flush()
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            pass

    def abort(self) -> None:
        """Drop the TCP connection at once."""
        if self.transport is not None:
            self.transport.abort()


def _user_path(user: str) -> str:
    return f"/ws?user={user}"


def _user_auth(user: str) -> dict[str, Any]:
    return {"user": user}


class Pool:
    """Clients of one system, all on one instance.

    ``path`` gives a quart-wslb client's websocket path and query (default
    ``/ws?user=NAME``), ``auth`` a Socket.IO client's connect payload (default
    ``{"user": NAME}``), each from the client's user name.
    """

    def __init__(
        self,
        system: str,
        port: int,
        *,
        path: Callable[[str], str] = _user_path,
        auth: Callable[[str], dict[str, Any]] = _user_auth,
    ) -> None:
        if system not in ("quart-wslb", "python-socketio"):
            raise ValueError(f"unknown system {system!r}")
        self.sio = system == "python-socketio"
        self.port = port
        self.path = path
        self.auth = auth
        self.clients: list[_Client] = []
        self.receipts: Receipts | None = None
        #: One read buffer for every client: each read is parsed before the next.
        self.buffer = bytearray(READ_SIZE)

    async def connect(self, users: Sequence[str], concurrency: int = 64) -> float:
        """Connect one client per user (``concurrency`` handshakes at a time), each
        ready to receive; returns the seconds it took."""
        gate = asyncio.Semaphore(concurrency)
        start = time.perf_counter()

        async def one(user: str) -> None:
            async with gate:
                client = await self._open(user)
            self.clients.append(client)

        await asyncio.gather(*(one(u) for u in users))
        return time.perf_counter() - start

    async def _open(self, user: str) -> _Client:
        """One client, ready to receive within ``CONNECT_TIMEOUT``, or dropped."""
        path = "/socket.io/?EIO=4&transport=websocket" if self.sio else self.path(user)
        client = _Client(self, user, f"ws://127.0.0.1:{self.port}{path}")
        try:
            await asyncio.wait_for(self._start(client), CONNECT_TIMEOUT)
        except BaseException:
            client.abort()
            raise
        return client

    async def _start(self, client: _Client) -> None:
        """TCP connection, opening handshake, then the system's greeting."""
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: client, "127.0.0.1", self.port)
        await client.ready

    async def close(self, concurrency: int = 256) -> float:
        """Close every client (each waits for the close handshake); returns the seconds."""
        gate = asyncio.Semaphore(concurrency)
        start = time.perf_counter()

        async def one(client: _Client) -> None:
            async with gate:
                await client.close(CLOSE_TIMEOUT)

        await asyncio.gather(*(one(c) for c in self.clients))
        elapsed = time.perf_counter() - start
        for client in self.clients:
            client.abort()  # those the server left open past the timeout
        self.clients.clear()
        return elapsed
