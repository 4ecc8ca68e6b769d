"""Every private or version-dependent name of redis-py, hiredis, Hypercorn and wsproto that
quart-wslb uses.

The fast paths (:mod:`quart_wslb.wire`, :mod:`quart_wslb.subscriber`,
:mod:`quart_wslb.transport`, :mod:`quart_wslb.redis_client`, the writer of
:mod:`quart_wslb.connection`) go below their dependencies' public APIs in a few places.
They reach those names only through this module, and :func:`check`, run when an extension
starts and when an emitter is made, verifies that each still exists and behaves as relied
on. What fails is logged once, at WARNING, and the part that needs it falls back to the
public path: slower, same results (without raw reads, :func:`quart_wslb.transport.pick`
picks the transport through redis-py's pipelines and ``PubSub``).

========================================== ============================ ==================
Name                                       Needed for                   Without it
========================================== ============================ ==================
``redis.asyncio.Connection._reader``       raw reads (replies parsed    ``PubSub``, and
                                           off the socket)              pipelines for sends
``ConnectionPool.get_connection()`` with   raw reads (a connection of   as above
no command name (redis-py 5.3)             the client's own pool)
``hiredis.PushNotification`` and           raw reads (RESP3 pushes      as above
``Reader(notEnoughData=)`` (hiredis 3.2),  told from replies)
made by :func:`parser`
``redis._parsers.base.BaseParser``         classifying error replies    ``NoScriptError``
``.parse_error``                           (``NoScriptError``...)       or ``ResponseError``
``redis.utils.HIREDIS_AVAILABLE``,         packing commands with        redis-py packs
``redis.connection.HiredisRespSerializer`` hiredis                      in Python
Hypercorn's ``WSStream`` (``app_send``,    writing frames encoded once  one ASGI
``closed``, ``state``, ``connection``,     (:func:`frame_writer`)       ``websocket.send``
``send``, ``stream_id``),                                               event per frame
``ASGIWebsocketState``, ``events.Data``;
wsproto's ``Connection._proto.extensions``
and ``ConnectionState``
========================================== ============================ ==================

``tests/test_compat.py`` fails on any release that changes them.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import hiredis
from redis.asyncio import BlockingConnectionPool, Connection, ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import InvalidResponse, NoScriptError, RedisError, ResponseError

from .outgoing import encode_frame

try:
    from redis._parsers.base import BaseParser
except ImportError:  # pragma: no cover - depends on the redis-py release
    BaseParser = None  # type: ignore[assignment,misc]
try:
    from redis.utils import HIREDIS_AVAILABLE
except ImportError:  # pragma: no cover - depends on the redis-py release
    HIREDIS_AVAILABLE = False
try:
    from redis.connection import HiredisRespSerializer
except ImportError:  # pragma: no cover - depends on the redis-py release
    HiredisRespSerializer = None  # type: ignore[assignment,misc]
try:
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.protocol.events import Data
    from hypercorn.protocol.ws_stream import ASGIWebsocketState, Handshake, WSStream
    from wsproto.connection import Connection as WsprotoConnection
    from wsproto.connection import ConnectionState
except ImportError:  # pragma: no cover - depends on the Hypercorn release
    WSStream = None  # type: ignore[assignment,misc]

__all__ = (
    "INCOMPLETE",
    "FrameWriter",
    "PushNotification",
    "Support",
    "check",
    "detached_stream",
    "frame_writer",
    "get_connection",
    "packing_connection",
    "parse_error",
    "parser",
    "stream_of",
)

log = logging.getLogger("quart_wslb")


class _NoPush(list[Any]):
    """Stands in for ``hiredis.PushNotification`` where hiredis lacks it (then raw reads
    are off, so nothing is ever checked against it)."""


#: The type hiredis gives RESP3 pushes (hiredis 3.2 or later).
PushNotification: type[list[Any]] = getattr(hiredis, "PushNotification", _NoPush)


#: What a :func:`parser`'s ``gets`` returns while no complete reply is buffered
#: (hiredis's default, ``False``, is also a valid RESP3 reply).
INCOMPLETE = object()


def parser() -> hiredis.Reader:
    """A hiredis parser for raw reads: error replies come back as redis-py's
    ``ResponseError``, and :data:`INCOMPLETE` while no reply is whole. Only for where
    :func:`check` found raw reads supported (``notEnoughData=`` needs hiredis 3.2)."""
    return hiredis.Reader(
        protocolError=InvalidResponse, replyError=ResponseError, notEnoughData=INCOMPLETE
    )


@dataclass(frozen=True, slots=True)
class Support:
    """What the installed redis-py and hiredis support (see the module's doc)."""

    #: Replies read straight off redis-py's connections (else ``PubSub`` and pipelines).
    raw: bool
    #: Commands packed by hiredis (else by redis-py, in Python).
    packing: bool
    #: Error replies classified by redis-py's parser (else only ``NoScriptError``).
    errors: bool
    #: Frames written to Hypercorn's stream encoded once (else one ASGI event each).
    frames: bool
    #: What failed, one sentence each (empty when everything works).
    problems: tuple[str, ...] = ()


@functools.cache
def check() -> Support:
    """Verify the names of the module's doc; log what fails (once, at WARNING).

    Cheap and cached: the extension calls it on start, every emitter on construction.
    """
    raw, packing, errors = _raw_problems(), _packing_problems(), _error_problems()
    frames = _frame_problems()
    fallbacks = (
        (raw, "replies are read through redis-py's PubSub and pipelines (slower)"),
        (packing, "commands are packed by redis-py, in Python (slower)"),
        (errors, "error replies other than NOSCRIPT are plain ResponseError"),
        (frames, "frames are written as ASGI websocket.send events (slower)"),
    )
    for problems, fallback in fallbacks:
        for problem in problems:
            log.warning("quart-wslb: %s; %s", problem, fallback)
    return Support(
        raw=not raw,
        packing=not packing,
        errors=not errors,
        frames=not frames,
        problems=tuple(raw + packing + errors + frames),
    )


def _raw_problems() -> list[str]:
    problems: list[str] = []
    if PushNotification is _NoPush:
        problems.append(f"hiredis {hiredis.__version__} has no PushNotification (3.2 has)")
    else:
        reader = parser()  # the one the raw reads use
        if reader.gets() is not INCOMPLETE:
            problems.append("hiredis.Reader ignores notEnoughData")
        reader.feed(b">1\r\n$1\r\nx\r\n")
        if not isinstance(reader.gets(), PushNotification):
            problems.append("hiredis does not parse RESP3 pushes as PushNotification")
    for pool in (ConnectionPool, BlockingConnectionPool):
        try:
            inspect.signature(pool.get_connection).bind(None)  # None: self
        except TypeError:
            problems.append(f"redis-py's {pool.__name__}.get_connection() needs a command name")
    if not hasattr(Connection(), "_reader"):  # unconnected: no I/O
        problems.append("redis-py's asyncio Connection has no _reader")
    return problems


def _packing_problems() -> list[str]:
    if HIREDIS_AVAILABLE is not True or HiredisRespSerializer is None:
        return ["redis-py does not offer hiredis packing (HiredisRespSerializer)"]
    command: tuple[Any, ...] = ("SET", "k", b"v", 1)
    packed = b"".join(_serializer().pack(*command))
    if packed != hiredis.pack_command(command):
        return ["redis-py's HiredisRespSerializer packs differently from hiredis"]
    return []


def _serializer() -> Any:
    return HiredisRespSerializer()  # type: ignore[no-untyped-call]


def _error_problems() -> list[str]:
    parse = getattr(BaseParser, "parse_error", None)
    try:
        if parse is not None and type(parse("NOSCRIPT No matching script")) is NoScriptError:
            return []
    except Exception:  # any failure means: do not rely on it
        pass
    return ["redis-py's BaseParser.parse_error is gone or classifies differently"]


def parse_error(text: str) -> RedisError:
    """The exception redis-py raises for the error reply ``text`` (``NoScriptError``,
    ``BusyLoadingError``, ``ReadOnlyError``...), so that errors read here are classified
    as everywhere else in the client."""
    if check().errors:
        error: RedisError = BaseParser.parse_error(text)  # type: ignore[no-untyped-call]
        return error
    return NoScriptError(text[9:]) if text.startswith("NOSCRIPT ") else ResponseError(text)


def stream_of(connection: AbstractConnection) -> asyncio.StreamReader | None:
    """The socket reader of a connected redis-py connection; ``None`` if it has none.

    redis-py offers no public way to read a connection's raw bytes; its asyncio
    connections (TCP, TLS and Unix socket alike) keep an ``asyncio.StreamReader`` in
    ``_reader``, which its own parsers read. fakeredis keeps something else there, and
    :func:`check` may have turned raw reads off: then ``None``.
    """
    if not check().raw:
        return None
    stream = getattr(connection, "_reader", None)
    return stream if isinstance(stream, asyncio.StreamReader) else None


async def get_connection(pool: ConnectionPool) -> AbstractConnection:
    """A connection of ``pool``, taken without a command name (redis-py 5.3 or later)."""
    connection: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
    return connection


@functools.cache
def packing_connection(base: type[Connection] = Connection) -> type[Connection] | None:
    """A subclass of ``base`` (a TCP connection class: redis-py's, or its Sentinel-managed
    one) that packs commands with hiredis; ``None`` if unsupported."""
    if not check().packing:
        return None
    packer = _serializer()

    class HiredisPackingConnection(base):  # type: ignore[valid-type,misc]
        """A TCP connection that packs commands with hiredis."""

        def pack_command(self, *args: Any) -> list[bytes]:
            return list(packer.pack(*args))

    HiredisPackingConnection.__name__ = HiredisPackingConnection.__qualname__ = (
        f"HiredisPacking{base.__name__}"
    )
    return HiredisPackingConnection


class FrameWriter:
    """Writes pre-encoded frames to one Hypercorn websocket stream, as the stream itself
    writes what wsproto encodes (``WSStream._send_wsproto_event``): one ``Data`` event to
    the stream's ``send``. Only made by :func:`frame_writer`, for a stream with no
    extension negotiated, so that the frames are exactly what wsproto would write."""

    __slots__ = ("_connection", "_send", "_stream", "_stream_id")

    def __init__(self, stream: Any, connection: Any) -> None:
        self._stream = stream
        self._connection = connection
        self._send = stream.send
        self._stream_id = stream.stream_id

    def ready(self) -> bool:
        """Whether a frame may be written now: the stream is open, accepted, and wsproto
        has neither sent nor received a close (else Hypercorn decides: the ASGI event)."""
        stream = self._stream
        return (
            not stream.closed
            and stream.state is ASGIWebsocketState.CONNECTED
            and self._connection.state is ConnectionState.OPEN
        )

    def write(self, data: bytes) -> Awaitable[None]:
        """Write ``data``, whole frames encoded by :func:`~quart_wslb.outgoing.encode_frame`."""
        result: Awaitable[None] = self._send(Data(stream_id=self._stream_id, data=data))
        return result


def frame_writer(send: object) -> FrameWriter | None:
    """A :class:`FrameWriter` for the websocket whose ASGI ``send`` this is, when the
    server is Hypercorn (``send`` is a ``WSStream``'s own ``app_send``), the websocket is
    accepted and no extension (permessage-deflate) was negotiated; else ``None``."""
    return _writer_of(send) if check().frames else None


def _writer_of(send: object) -> FrameWriter | None:
    stream = getattr(send, "__self__", None)
    if not isinstance(stream, WSStream) or getattr(send, "__func__", None) is not (
        WSStream.app_send
    ):
        return None
    connection = getattr(stream, "connection", None)
    if not isinstance(connection, WsprotoConnection) or _extended(connection):
        return None
    return FrameWriter(stream, connection)


def _extended(connection: Any) -> bool:
    """Whether wsproto transforms this connection's frames (an extension is enabled)."""
    return any(extension.enabled() for extension in connection._proto.extensions)


def _frame_problems() -> list[str]:
    """Accept a websocket on a detached ``WSStream``, as Hypercorn would, then compare what
    it writes for text and binary messages with :func:`encode_frame`'s bytes."""
    if WSStream is None:
        return ["Hypercorn's WSStream, events.Data or wsproto's Connection moved"]
    try:
        problem = _stream_problem(b"") or _stream_problem(b"permessage-deflate")
    except Exception as error:  # any failure means: do not rely on it
        problem = f"Hypercorn's WSStream no longer behaves as relied on ({error!r})"
    return [] if problem is None else [problem]


def _stream_problem(extensions: bytes) -> str | None:
    written: list[Any] = []

    async def send(event: Any) -> None:
        written.append(event)

    stream = detached_stream(send, extensions)
    writer = _writer_of(stream.app_send)
    if (writer is None) != bool(extensions):
        return "wsproto's Connection._proto.extensions no longer tells permessage-deflate"
    if writer is None:
        return None
    return _writes_problem(stream, writer, written, encode_frame)


def detached_stream(send: Callable[[Any], Awaitable[None]], extensions: bytes = b"") -> Any:
    """A Hypercorn ``WSStream`` of no connection that writes its events to ``send``,
    accepted as Hypercorn accepts a websocket whose client offered ``extensions``
    (``b"permessage-deflate"``, say): for :func:`check` and tests."""
    unused: Any = None  # no app, worker or task group: nothing is spawned
    stream = WSStream(
        app=unused, config=HypercornConfig(), context=unused, task_group=unused, ssl=False,
        client=None, server=None, send=send, stream_id=1,
    )  # fmt: skip
    headers = [(b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
               (b"sec-websocket-version", b"13"), (b"connection", b"Upgrade"),
               (b"upgrade", b"websocket")]  # fmt: skip
    if extensions:
        headers.append((b"sec-websocket-extensions", extensions))
    stream.handshake = Handshake(headers, "1.1")
    stream.scope, stream.start_time = cast(Any, {}), 0.0  # Hypercorn sets them on requests
    _run_now(stream.app_send(cast(Any, {"type": "websocket.accept"})))
    return stream


def _writes_problem(
    stream: Any, writer: FrameWriter, written: list[Any], encode: Callable[[Any], bytes]
) -> str | None:
    if not writer.ready():
        return "Hypercorn's WSStream is not ready to write once accepted"
    for frame in ("", "h\u00e9", "x" * 125, "y" * 126, b"", b"\x00" * 65535, b"z" * 65536):
        written.clear()
        key = "text" if isinstance(frame, str) else "bytes"
        _run_now(stream.app_send(cast(Any, {"type": "websocket.send", key: frame})))
        _run_now(writer.write(encode(frame)))
        if [type(e) for e in written] != [Data, Data] or written[0] != written[1]:
            return "wsproto frames differ from quart-wslb's, or WSStream writes them otherwise"
    return None


def _run_now(coroutine: Any) -> Any:
    """Run a coroutine that must finish without waiting (no event loop needed)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("a detached WSStream waited")
