"""Raw RESP on redis-py's connections: replies parsed straight off the socket by hiredis.

redis-py makes, connects and handshakes connections (host or Unix socket, TLS,
credentials, database, RESP2 or RESP3) exactly as the user's client is configured; we keep
that. What we skip is its per-reply path (a stack of coroutines, a timeout and response
callbacks for every reply), which on the hot paths cost more than the work itself:
:class:`Exchange` runs pipelined script calls for :mod:`quart_wslb.batch`, and
:class:`~quart_wslb.subscriber.StreamSubscription` reads pub/sub messages; together they
are :class:`~quart_wslb.transport.SocketTransport`, which :func:`~quart_wslb.transport.pick`
chooses where the client's connections have a socket. The redis-py and hiredis names this
needs beyond their public API come from :mod:`quart_wslb._compat`, which checks them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from ._compat import (
    INCOMPLETE,
    PushNotification,
    get_connection,
    parse_error,
    parser,
    stream_of,
)

__all__ = ("INCOMPLETE", "READ_SIZE", "Exchange", "error_of", "parser")

#: Most bytes taken off a socket at once.
READ_SIZE = 1 << 16


def error_of(reply: ResponseError) -> RedisError:
    """The exception redis-py raises for an error reply (``NoScriptError``,
    ``BusyLoadingError``, ``ReadOnlyError``...), so errors read here are classified as
    everywhere else in the client."""
    return parse_error(str(reply))


class Exchange:
    """Pipelined round trips on a connection taken from a client's pool.

    One round trip at a time (the caller serialises them). The connection is kept from
    one round trip to the next until :meth:`release` hands it back to the pool (the
    caller does so whenever it goes idle). Any failure mid-way, a timeout or a
    cancellation included, drops the connection, since its stream is then in an unknown
    state; the next round trip connects again.
    """

    def __init__(self, redis: Redis) -> None:
        self._pool = redis.connection_pool
        self._connection: AbstractConnection | None = None
        self._running = False

    async def ready(self) -> None:
        """Take a connection from the pool and connect it, unless done already: all that
        a round trip may wait for before it writes. A :meth:`run` right after this writes
        without waiting (no other task runs in between), so the caller can still choose,
        with nothing left to wait for, what to send."""
        try:
            await self._connected()
        except BaseException:
            await self._drop()  # a handshake cut short would leave its reply unread
            raise

    async def run(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """The replies to ``commands``, in order; an error reply is returned, not raised."""
        self._running = True
        try:
            connection = await self._connected()
            packed = [hiredis.pack_command(tuple(command)) for command in commands]
            await connection.send_packed_command(packed, check_health=False)
            return await _read(connection, len(commands))
        except BaseException:
            await self._drop()
            raise
        finally:
            self._running = False

    async def release(self) -> None:
        """Hand the connection back to the pool, unless a round trip is reading it (then
        whoever runs round trips releases it when they are done)."""
        if self._connection is not None and not self._running:
            connection, self._connection = self._connection, None
            await self._pool.release(connection)

    async def _drop(self) -> None:
        """Close the connection (kept, to connect again): its stream is in an unknown
        state."""
        if self._connection is not None:
            await self._connection.disconnect(nowait=True)

    async def _connected(self) -> AbstractConnection:
        if self._connection is None:
            self._connection = await get_connection(self._pool)
        if not self._connection.is_connected:
            await self._connection.connect()  # type: ignore[no-untyped-call]
        return self._connection


async def _read(connection: AbstractConnection, count: int) -> list[Any]:
    stream = stream_of(connection)
    if stream is None:
        raise RedisConnectionError("the connection has no socket to read")
    reader, replies = parser(), list[Any]()
    while len(replies) < count:
        reply = reader.gets()
        if reply is INCOMPLETE:
            data = await stream.read(READ_SIZE)
            if not data:
                raise RedisConnectionError("Redis closed the connection")
            reader.feed(data)
        elif isinstance(reply, PushNotification):
            continue  # out of band (RESP3 client tracking, server notices): no one's reply
        elif isinstance(reply, ResponseError):
            replies.append(error_of(reply))
        else:
            replies.append(reply)
    return replies
