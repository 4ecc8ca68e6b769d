"""How quart-wslb talks to Redis beyond ordinary commands: one :class:`Transport`, picked
once.

Two things go below redis-py's per-reply path on the hot paths: the pipelined script
calls of :mod:`quart_wslb.batch` and the subscription that the receiver reads
(:mod:`quart_wslb.receiver`). A :class:`Transport` does both for one client:

- :class:`SocketTransport` reads replies straight off the sockets of the client's own
  connections (:class:`~quart_wslb.wire.Exchange`,
  :class:`~quart_wslb.subscriber.StreamSubscription`);
- :class:`ClientTransport` goes through redis-py's public API (pipelines, ``PubSub``):
  for clients whose connections have no socket (fakeredis), and for all clients where
  :func:`quart_wslb._compat.check` found the installed redis-py or hiredis unable to
  serve raw reads. Slower, same results.

:func:`pick` chooses one for a client, once: the extension when it starts (its receiver
and emitter share the choice), an emitter or receiver made on its own at its first use.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from ._compat import check, get_connection, stream_of
from .subscriber import (
    CONFIRM_TIMEOUT,
    PubSubSubscription,
    StreamSubscription,
    Subscription,
    unsubscriber,
)
from .wire import Exchange

__all__ = ("ClientTransport", "SocketTransport", "Transport", "another", "close", "pick")

log = logging.getLogger("quart_wslb")


class Transport(Protocol):
    """Pipelined raw commands and subscriptions on one Redis client.

    :meth:`run` keeps a connection of the client's pool from one round trip to the next,
    until :meth:`release`; its caller runs one round trip at a time. :meth:`subscribe`
    takes a connection of its own for each subscription.
    """

    async def ready(self) -> None:
        """Wait for all that a :meth:`run` right after may wait for before it writes
        (taking and connecting its connection), so that the caller can still choose,
        with nothing left to wait for, what to send. (A
        :class:`~quart_wslb.cluster.ClusterTransport` waits here only for its map of
        slots: it connects to each master inside :meth:`run`, within the round trip's
        deadline, so that a hung master holds up only the commands that go to it.)"""
        ...

    async def run(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """The replies to ``commands``, pipelined in one round trip, in order; an error
        reply is returned (as the exception redis-py raises for it), not raised."""
        ...

    async def release(self) -> None:
        """Hand the connection :meth:`run` holds back to the pool (if it holds one and
        no round trip is reading it; else whoever runs round trips releases it later)."""
        ...

    def subscribe(self, channels: Sequence[str]) -> AbstractAsyncContextManager[Subscription]:
        """Subscribe to ``channels`` for the block, on a connection of the client's pool.

        Entered once Redis has confirmed every channel (a refusal raises Redis's error).
        The connection is closed at the end, since a subscribed connection can serve
        nothing else.
        """
        ...


class SocketTransport(Exchange):
    """Replies parsed straight off the sockets of the client's connections: round trips
    through :class:`~quart_wslb.wire.Exchange` (whose methods these are), subscriptions
    through :class:`~quart_wslb.subscriber.StreamSubscription`."""

    @asynccontextmanager
    async def subscribe(self, channels: Sequence[str]) -> AsyncIterator[Subscription]:
        """Subscribe on a connection of the pool (see :meth:`Transport.subscribe`)."""
        pool = self._pool
        connection = await get_connection(pool)
        try:
            stream = stream_of(connection)
            if stream is None:
                raise RedisConnectionError("the subscriber connection has no socket to read")
            subscription = StreamSubscription(
                stream, channels, unsubscribe=unsubscriber(connection, "UNSUBSCRIBE")
            )
            # SUBSCRIBE through redis-py's public send_command: only reading is ours.
            await connection.send_command("SUBSCRIBE", *channels, check_health=False)
            await subscription.confirm(connection.socket_timeout or CONFIRM_TIMEOUT)
            yield subscription
        finally:
            await connection.disconnect(nowait=True)
            await pool.release(connection)


class ClientTransport:
    """Everything through redis-py's public API: pipelines and ``PubSub``."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def ready(self) -> None:
        """Nothing to wait for: a redis-py pipeline takes its connection itself."""

    async def run(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """The replies to ``commands`` through a redis-py pipeline (no transaction)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def release(self) -> None:
        """Nothing held: each pipeline gives its connection back itself."""

    @asynccontextmanager
    async def subscribe(self, channels: Sequence[str]) -> AsyncIterator[Subscription]:
        """Subscribe through a ``PubSub`` (see :meth:`Transport.subscribe`)."""
        timeout = self._redis.connection_pool.connection_kwargs.get("socket_timeout")
        async with self._redis.pubsub() as pubsub:
            subscription = PubSubSubscription(pubsub, channels)
            await pubsub.subscribe(*channels)
            await subscription.confirm(timeout or CONFIRM_TIMEOUT)
            yield subscription


async def pick(redis: Redis) -> Transport:
    """The transport for ``redis``: :class:`SocketTransport` where its connections have a
    socket to read and the installed redis-py and hiredis allow reading it, else
    :class:`ClientTransport`. Says which, and why, on the ``quart_wslb`` logger.

    Takes a connection of the pool to look at (handed back at once): raises Redis's
    error when there is none to be had.
    """
    if not check().raw:  # check() has said what is missing, at WARNING
        log.warning(
            "quart-wslb: Redis transport: redis-py's pipelines and PubSub (slower), since "
            "the installed redis-py or hiredis cannot serve raw reads"
        )
        return ClientTransport(redis)
    if not await _has_socket(redis):
        log.info(
            "quart-wslb: Redis transport: redis-py's pipelines and PubSub, since the "
            "client's connections have no socket to read (fakeredis)"
        )
        return ClientTransport(redis)
    log.info("quart-wslb: Redis transport: replies parsed straight off the socket")
    return SocketTransport(redis)


async def _has_socket(redis: Redis) -> bool:
    """Whether a connection of ``redis``'s pool, once connected, has a socket to read."""
    pool = redis.connection_pool
    connection = await get_connection(pool)
    try:
        if not connection.is_connected:
            await connection.connect()  # type: ignore[no-untyped-call]
        return stream_of(connection) is not None
    except BaseException:
        await connection.disconnect(nowait=True)  # a handshake cut short: replies unread
        raise
    finally:
        await pool.release(connection)


def another(transport: Transport, redis: Redis) -> Transport:
    """A transport of ``transport``'s kind on ``redis``, with a connection of its own
    (each shard's sends run their round trips side by side: :mod:`quart_wslb.shards`);
    or ``transport`` itself where it takes several callers' round trips at once and says
    so with a ``sibling()`` method (a :class:`~quart_wslb.cluster.ClusterTransport`:
    one connection per master, however many shards)."""
    sibling = getattr(transport, "sibling", None)
    if sibling is not None:
        shared: Transport = sibling()
        return shared
    kind: Any = type(transport)
    made: Transport = kind(redis)
    return made


async def close(transport: Transport | None) -> None:
    """Hand back ``transport``'s connection, and close what it opened itself (a
    :class:`~quart_wslb.cluster.ClusterTransport`'s clients of each master); twice is
    harmless."""
    if transport is None:
        return
    await transport.release()
    closer = getattr(transport, "aclose", None)
    if closer is not None:
        await closer()
