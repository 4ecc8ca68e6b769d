"""Every private or version-dependent name of redis-py and hiredis that quart-wslb uses.

The fast paths (:mod:`quart_wslb.wire`, :mod:`quart_wslb.subscriber`,
:mod:`quart_wslb.redis_client`) go below redis-py's public API in a few places. They reach
those names only through this module, and :func:`check`, run when an extension starts and
when an emitter is made, verifies that each still exists and behaves as relied on. What
fails is logged once, at WARNING, and the part that needs it falls back to redis-py's
public path: slower, same results.

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
========================================== ============================ ==================

``tests/test_compat.py`` fails on any redis-py or hiredis release that changes them.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.asyncio import BlockingConnectionPool, Connection, ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import InvalidResponse, NoScriptError, RedisError, ResponseError

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

__all__ = (
    "INCOMPLETE",
    "PushNotification",
    "Support",
    "check",
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
    #: What failed, one sentence each (empty when everything works).
    problems: tuple[str, ...] = ()


@functools.cache
def check() -> Support:
    """Verify the names of the module's doc; log what fails (once, at WARNING).

    Cheap and cached: the extension calls it on start, every emitter on construction.
    """
    raw, packing, errors = _raw_problems(), _packing_problems(), _error_problems()
    fallbacks = (
        (raw, "replies are read through redis-py's PubSub and pipelines (slower)"),
        (packing, "commands are packed by redis-py, in Python (slower)"),
        (errors, "error replies other than NOSCRIPT are plain ResponseError"),
    )
    for problems, fallback in fallbacks:
        for problem in problems:
            log.warning("quart-wslb: %s; %s", problem, fallback)
    return Support(
        raw=not raw,
        packing=not packing,
        errors=not errors,
        problems=tuple(raw + packing + errors),
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
def packing_connection() -> type[Connection] | None:
    """A TCP connection class that packs commands with hiredis; ``None`` if unsupported."""
    if not check().packing:
        return None
    packer = _serializer()

    class HiredisPackingConnection(Connection):
        """A TCP connection that packs commands with hiredis."""

        def pack_command(self, *args: Any) -> list[bytes]:
            return list(packer.pack(*args))

    return HiredisPackingConnection
