"""Reading this instance's channels with as little work per message as possible.

redis-py's ``PubSub.get_message`` pays, for every message, a stack of coroutines (retry
wrapper, connection read, parser, push handler), a fresh timeout and a dict: at
saturation that was a third of the receiving instance's CPU, several times what
dispatching the message costs. Here the socket is read once for whatever has arrived
(hundreds of messages under load), every complete reply is parsed with
``hiredis.Reader``, and the payloads come back as one list, in order.

Only reading bypasses redis-py. The connection comes from the client's own pool, so it
was made, connected and handshaken (host or Unix socket, TLS, credentials, database,
RESP2 or RESP3) exactly as the client was configured; SUBSCRIBE goes through the
connection's public ``send_command``. Both protocols are read alike: a RESP3 push and a
RESP2 array of a pub/sub message parse to the same three-item list.

Clients whose connections have no socket (fakeredis) are read through ``PubSub``, and so
are all clients where :func:`quart_wslb._compat.check` found the installed redis-py or
hiredis unable to serve raw reads (it says so at WARNING).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._compat import check, get_connection, stream_of
from .wire import INCOMPLETE, READ_SIZE, parser

__all__ = (
    "PubSubSubscription",
    "StreamSubscription",
    "SubscriberClosedError",
    "Subscription",
    "output_buffer_cuts",
    "subscribe",
)

log = logging.getLogger("quart_wslb")
#: How long Redis may take to confirm the subscription when the client sets no
#: ``socket_timeout``.
CONFIRM_TIMEOUT = 5.0
#: The ``INFO stats`` field that counts the clients Redis disconnected for
#: ``client-output-buffer-limit`` (newer servers only: Redis 7.0 has none).
OUTPUT_BUFFER_CUTS = "client_output_buffer_limit_disconnections"


class SubscriberClosedError(RedisConnectionError):
    """Redis closed the subscriber connection; every message it sent before was read."""


class Subscription(Protocol):
    """A subscription to some channels that hands out the payloads of their messages."""

    async def read(self, timeout: float) -> list[bytes]:
        """The next messages' payloads, in order; ``[]`` when no whole message came
        within ``timeout`` s.

        Raises a ``redis.exceptions.RedisError`` once the subscription is lost
        (:class:`SubscriberClosedError` when Redis closed it), and only once every
        message that arrived ahead of the loss was handed out.
        """
        ...


class StreamSubscription:
    """Messages parsed straight off a subscribed connection's socket."""

    def __init__(self, stream: asyncio.StreamReader, channels: Sequence[str]) -> None:
        self._stream = stream
        self._parser = parser()
        self._unconfirmed = {channel.encode() for channel in channels}
        # Messages parsed while waiting for confirmations, for the first read.
        self._ready: list[bytes] = []
        # A failure parsed after good messages: raised once those were handed out.
        self._failure: Exception | None = None

    async def confirm(self, timeout: float) -> None:
        """Wait until Redis confirmed every channel (at most ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while self._unconfirmed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RedisTimeoutError(f"Redis did not confirm the subscription in {timeout}s")
            self._ready += await self._next(remaining)

    async def read(self, timeout: float) -> list[bytes]:
        """The next messages' payloads, in order; ``[]`` when no whole message came
        within ``timeout`` s (a message split across reads is waited for)."""
        if self._ready:
            ready, self._ready = self._ready, []
            return ready
        deadline = time.monotonic() + timeout
        while not (messages := await self._next(max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                break
        return messages

    async def _next(self, timeout: float) -> list[bytes]:
        if self._failure is not None:
            raise self._failure
        data = await self._receive(timeout)
        return self._parse(data) if data else []

    async def _receive(self, timeout: float) -> bytes:
        """Whatever the socket has (waiting at most ``timeout``); ``b""`` if nothing came."""
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                data = await self._stream.read(READ_SIZE)
        except OSError as error:  # TimeoutError is one: ours expiring, or the socket's
            if deadline.expired():
                return b""
            raise RedisConnectionError(f"subscriber connection failed: {error!r}") from error
        if not data:  # the stream hands out everything before the end first
            raise SubscriberClosedError("Redis closed the subscriber connection")
        return data

    def _parse(self, data: bytes) -> list[bytes]:
        """The payloads of the messages that ``data`` completes; other replies handled."""
        self._parser.feed(data)
        gets = self._parser.gets
        messages: list[bytes] = []
        try:
            while (reply := gets()) is not INCOMPLETE:
                # [b"message", channel, payload]; a RESP3 push is a list subclass.
                if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                    messages.append(reply[2])
                else:
                    self._other(reply)
        except (InvalidResponse, ResponseError) as error:
            # The messages before it still count; the connection does not.
            self._failure = error
        return messages

    def _other(self, reply: object) -> None:
        """A reply that is not a message: a confirmation, an error, or an unused push."""
        if isinstance(reply, ResponseError):
            raise reply
        if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"subscribe":
            self._unconfirmed.discard(reply[1])
        else:
            log.debug("subscriber ignored a reply: %.200r", reply)


class PubSubSubscription:
    """Messages through redis-py's ``PubSub``, one per read (for fakeredis)."""

    def __init__(self, pubsub: PubSub) -> None:
        self._pubsub = pubsub

    async def read(self, timeout: float) -> list[bytes]:
        """The next message's payload, or ``[]`` when none came within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = await self._pubsub.get_message(
                ignore_subscribe_messages=True, timeout=remaining
            )
            if message is not None and message["type"] == "message":
                return [message["data"]]
        return []


async def output_buffer_cuts(redis: Redis, timeout: float = 1.0) -> int | None:
    """How many clients Redis disconnected for ``client-output-buffer-limit`` so far;
    ``None`` where it does not say (older servers, ``INFO`` refused, no answer within
    ``timeout`` s)."""
    try:
        async with asyncio.timeout(timeout):
            stats = await redis.info("stats")
    except (RedisError, TimeoutError) as error:
        log.debug("INFO stats failed: %r", error)
        return None
    count = stats.get(OUTPUT_BUFFER_CUTS)
    return count if isinstance(count, int) else None


@asynccontextmanager
async def subscribe(redis: Redis, channels: Sequence[str]) -> AsyncIterator[Subscription]:
    """Subscribe to ``channels`` on a connection of ``redis``'s pool for the block.

    Returns once Redis has confirmed every channel. The connection is closed at the end
    (a subscribed connection can serve nothing else) and handed back to the pool.
    """
    pool = redis.connection_pool
    raw = await _raw_connection(pool)
    if raw is None:
        log.info("no socket to read the subscription from; reading it through PubSub")
        async with redis.pubsub() as pubsub:
            await pubsub.subscribe(*channels)
            yield PubSubSubscription(pubsub)
        return
    connection, stream = raw
    try:
        subscription = StreamSubscription(stream, channels)
        await connection.send_command("SUBSCRIBE", *channels, check_health=False)
        await subscription.confirm(connection.socket_timeout or CONFIRM_TIMEOUT)
        yield subscription
    finally:
        await connection.disconnect(nowait=True)
        await pool.release(connection)


async def _raw_connection(
    pool: ConnectionPool,
) -> tuple[AbstractConnection, asyncio.StreamReader] | None:
    """A connection of ``pool`` and its socket reader; ``None`` (holding nothing) where
    there is no socket to read (fakeredis) or raw reads are off (:func:`check`)."""
    if not check().raw:
        return None
    connection = await get_connection(pool)
    stream = stream_of(connection)
    if stream is None:
        await pool.release(connection)
        return None
    return connection, stream
