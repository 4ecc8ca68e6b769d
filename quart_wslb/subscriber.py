"""Subscriptions: the messages of this instance's channels, with as little work per
message as possible.

redis-py's ``PubSub.get_message`` pays, for every message, a stack of coroutines (retry
wrapper, connection read, parser, push handler), a fresh timeout and a dict: at
saturation that was a third of the receiving instance's CPU, several times what
dispatching the message costs. Here the socket is read once for whatever has arrived
(hundreds of messages under load), every complete reply is parsed with
``hiredis.Reader``, and the payloads come back as one list, in order.

The socket is one of the client's own connections, subscribed by
:class:`~quart_wslb.transport.SocketTransport`. Both protocols are read alike: a RESP3
push and a RESP2 array of a pub/sub message parse to the same three-item list.
:class:`PubSubSubscription` reads through redis-py's ``PubSub`` instead, for
:class:`~quart_wslb.transport.ClientTransport`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .wire import INCOMPLETE, READ_SIZE, parser

__all__ = (
    "PubSubSubscription",
    "StreamSubscription",
    "SubscriberClosedError",
    "SubscriptionMovedError",
    "Subscription",
    "output_buffer_cuts",
)

log = logging.getLogger("quart_wslb")
#: How long Redis may take to confirm a subscription when the client sets no
#: ``socket_timeout``.
CONFIRM_TIMEOUT = 5.0
#: The ``INFO stats`` field that counts the clients Redis disconnected for
#: ``client-output-buffer-limit`` (newer servers only: Redis 7.0 has none).
OUTPUT_BUFFER_CUTS = "client_output_buffer_limit_disconnections"


class SubscriberClosedError(RedisConnectionError):
    """Redis closed the subscriber connection; every message it sent before was read."""


class SubscriptionMovedError(SubscriberClosedError):
    """Redis unsubscribed the connection from one of its channels by itself: on a Redis
    Cluster, a sharded channel's slot moved to another master (reshard or failover).
    Every message it sent before was read; subscribe again where the slot is now."""


#: The kinds of pushes of a subscription: a message, a confirmation, and an
#: unsubscription that ends it (none for classic channels: Redis never sends one by itself).
PLAIN: tuple[bytes, bytes, bytes | None] = (b"message", b"subscribe", None)
#: The same for sharded channels (``SSUBSCRIBE``, Redis 7 and Redis Cluster).
SHARDED: tuple[bytes, bytes, bytes | None] = (b"smessage", b"ssubscribe", b"sunsubscribe")
#: The confirmations of an unsubscription (a drain's).
UNSUBSCRIBED = frozenset({b"unsubscribe", b"sunsubscribe"})


class Subscription(Protocol):
    """A subscription to some channels that hands out the payloads of their messages."""

    async def read(self, timeout: float) -> list[bytes]:
        """The next messages' payloads, in order; ``[]`` when no whole message came
        within ``timeout`` s.

        Raises a ``redis.exceptions.RedisError`` once the subscription is lost, and
        only once every message that arrived ahead of the loss was handed out: on the
        socket, :class:`SubscriberClosedError` when Redis closed it; through ``PubSub``,
        redis-py's ``ConnectionError`` (its ``PubSub`` would reconnect at the next read,
        but the caller drops it and subscribes again).
        """
        ...

    async def drain(self, timeout: float) -> list[bytes]:
        """Once the caller stopped reading and before the connection is closed: the
        payloads of every message Redis sent before it confirmed an unsubscription from
        every channel (sent here), so that closing drops none that a publisher was told
        reached us. At most ``timeout`` s: cut short (a dead or hung Redis), it logs a
        warning and returns what came."""
        ...


class StreamSubscription:
    """Messages parsed straight off a subscribed connection's socket."""

    def __init__(
        self,
        stream: asyncio.StreamReader,
        channels: Sequence[str],
        kinds: tuple[bytes, bytes, bytes | None] = PLAIN,
        unsubscribe: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``unsubscribe`` sends the unsubscription from every channel that
        :meth:`drain` waits for (none: the drain hands out what arrived, no more)."""
        self._stream = stream
        self._unsubscribe = unsubscribe
        self._parser = parser()
        self._message, self._confirmed, self._unsubscribed = kinds
        self._unconfirmed = {channel.encode() for channel in channels}
        # Messages parsed while waiting for confirmations, for the first read.
        self._ready: list[bytes] = []
        # A failure parsed after good messages: raised once those were handed out.
        self._failure: Exception | None = None
        # Set by drain(): unsubscriptions are expected, and the last one ends it.
        self._draining = False
        self._drained = False

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

    async def drain(self, timeout: float) -> list[bytes]:
        """See :meth:`Subscription.drain`; also after a :class:`SubscriptionMovedError`,
        for the connection's other channels. After any other failure (a protocol error,
        a closed connection) nothing follows: what was parsed before it is returned."""
        messages, self._ready = self._ready, []
        if self._failure is not None and not isinstance(self._failure, SubscriptionMovedError):
            return messages
        self._failure, self._draining = None, True
        try:
            async with asyncio.timeout(timeout):
                messages += self._parse(b"")  # what the parser holds past a moved slot
                if self._unsubscribe is None:
                    return messages
                await self._unsubscribe()
                while not self._drained and self._failure is None:
                    data = await self._stream.read(READ_SIZE)
                    if not data:
                        break
                    messages += self._parse(data)
        except (OSError, RedisError) as error:  # TimeoutError is an OSError
            _cut_short(error)
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
            while not self._drained and (reply := gets()) is not INCOMPLETE:
                # [b"message", channel, payload]; a RESP3 push is a list subclass.
                if isinstance(reply, list) and len(reply) == 3 and reply[0] == self._message:
                    messages.append(reply[2])
                else:
                    self._other(reply)
        except (InvalidResponse, ResponseError, SubscriptionMovedError) as error:
            # The messages before it still count; the connection does not.
            self._failure = error
        return messages

    def _other(self, reply: object) -> None:
        """A reply that is not a message: a confirmation, an error, or an unused push."""
        if isinstance(reply, ResponseError):
            raise reply
        if isinstance(reply, list) and len(reply) == 3 and reply[0] == self._confirmed:
            self._unconfirmed.discard(reply[1])
        elif (
            self._draining
            and isinstance(reply, list)
            and len(reply) == 3
            and reply[0] in UNSUBSCRIBED
        ):
            self._drained = reply[2] == 0  # ours; the count of channels left: 0 at the last
        elif isinstance(reply, list) and len(reply) == 3 and reply[0] == self._unsubscribed:
            # We never unsubscribe but to drain: Redis did (a sharded channel's slot
            # moved away). Never swallowed, else the channel would stay silent for good.
            raise SubscriptionMovedError(f"Redis unsubscribed us from {reply[1]!r}")
        else:
            log.debug("subscriber ignored a reply: %.200r", reply)


class PubSubSubscription:
    """Messages through redis-py's ``PubSub``, one per read (without raw reads: see
    :class:`~quart_wslb.transport.ClientTransport`)."""

    def __init__(self, pubsub: PubSub, channels: Sequence[str]) -> None:
        self._pubsub = pubsub
        self._unconfirmed = set(channels)
        # Messages read while waiting for confirmations, for the first read.
        self._ready: list[bytes] = []

    async def confirm(self, timeout: float) -> None:
        """Wait until Redis confirmed every channel (at most ``timeout`` seconds); a
        refusal raises Redis's error, as on the socket."""
        deadline = time.monotonic() + timeout
        while self._unconfirmed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RedisTimeoutError(f"Redis did not confirm the subscription in {timeout}s")
            message = await self._pubsub.get_message(timeout=remaining)
            if message is None:
                continue
            if message["type"] == "message":
                self._ready.append(message["data"])
            elif message["type"] == "subscribe":
                channel = message["channel"]
                self._unconfirmed.discard(
                    channel.decode() if isinstance(channel, bytes) else channel
                )

    async def read(self, timeout: float) -> list[bytes]:
        """The next message's payload, or ``[]`` when none came within ``timeout`` s."""
        if self._ready:
            ready, self._ready = self._ready, []
            return ready
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = await self._pubsub.get_message(
                ignore_subscribe_messages=True, timeout=remaining
            )
            if message is not None and message["type"] == "message":
                return [message["data"]]
        return []

    async def drain(self, timeout: float) -> list[bytes]:
        """See :meth:`Subscription.drain`."""
        messages, self._ready = self._ready, []
        try:
            async with asyncio.timeout(timeout):
                await self._pubsub.unsubscribe()
                while True:
                    message = await self._pubsub.get_message(timeout=timeout)
                    if message is None:
                        continue
                    if message["type"] == "message":
                        messages.append(message["data"])
                    elif message["type"] == "unsubscribe" and message["data"] == 0:
                        return messages
        except (OSError, RedisError) as error:
            _cut_short(error)
        return messages


def unsubscriber(connection: AbstractConnection, command: str) -> Callable[[], Awaitable[None]]:
    """What sends ``command`` (``UNSUBSCRIBE`` or ``SUNSUBSCRIBE``: from every channel)
    on ``connection``, for :meth:`StreamSubscription.drain`."""

    async def unsubscribe() -> None:
        packed = connection.pack_command(command)
        await connection.send_packed_command(packed, check_health=False)

    return unsubscribe


def _cut_short(error: BaseException) -> None:
    log.warning(
        "draining a subscription before closing it ended early (%r): what Redis had not "
        "sent by then is lost for this instance",
        error,
    )


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
