"""Sharded subscriptions over the masters of a Redis Cluster: one connection per master,
read off its socket, merged into one :class:`~quart_wslb.subscriber.Subscription`.

:class:`ShardedSubscriptions` makes them for :class:`~quart_wslb.cluster.ClusterTransport`.
A subscription is lost as a whole when one master's part is (closed, failed, or a
``sunsubscribe`` that Redis sent because a slot moved): the caller subscribes again, as
on one Redis. But the other masters' parts are not closed: they are parked, unread
(what arrives waits in their sockets), and the next subscription takes them back if the
map still puts the same channels on the same master, so that a fault on one master costs
the channels of the others nothing: not a message in flight, not a re-subscription.
The caller may end a subscription at once, naming the channels that went deaf
(:meth:`MergedSubscription.abandon`): only their parts are dropped.

A part is dropped only once drained: ``SUNSUBSCRIBE``, then read until Redis confirms
it (within the timeout), so that every message a publisher was told reached us is handed
out, ahead of what the next subscription reads. Parts are closed undrained only when the
caller ends the subscription for good (cancellation, or its block ends), or on an error
of the caller's own that names no channels.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from ._compat import check, get_connection, stream_of
from .subscriber import SHARDED, StreamSubscription, SubscriberClosedError, unsubscriber

__all__ = ("MergedSubscription", "ShardedSubscriptions")

log = logging.getLogger("quart_wslb")
#: A node: host and port.
Address = tuple[str, int]
#: Longest one read of a master's part waits before looking again.
PART_READ = 1.0
#: Batches read and not yet handed out, at most: past it the parts are not read, so a slow
#: consumer backs up into Redis's output buffers, as on one Redis.
MERGE_DEPTH = 64
#: Longest the drain of a part that went deaf waits: its master missed its probes, most
#: likely hung (a healthy one confirms a ``SUNSUBSCRIBE`` far sooner), and the channels
#: of this master stay unheard until the next subscription.
DEAF_DRAIN = 0.5
#: Put after the last batch once every part stopped.
_END: Final = object()


@dataclass(eq=False)
class Part:
    """One master's share of a subscription: its channels, on a connection of its own."""

    node: Address
    channels: frozenset[str]
    subscription: StreamSubscription
    connection: AbstractConnection
    redis: Redis

    async def aclose(self) -> None:
        await self.connection.disconnect(nowait=True)
        await self.redis.connection_pool.release(self.connection)

    async def drain(self, timeout: float) -> list[bytes]:
        """Unsubscribe, and the messages that came before Redis confirmed it (see
        :meth:`StreamSubscription.drain`); then closed."""
        try:
            return await self.subscription.drain(timeout)
        finally:
            await self.aclose()


async def open_part(node: Address, redis: Redis, channels: Iterable[str], timeout: float) -> Part:
    """``SSUBSCRIBE`` to ``channels`` on a connection of ``redis`` (one master's client):
    one command per slot (Redis refuses several slots in one), pipelined; returns once
    every channel is confirmed (at most ``timeout`` s)."""
    names = frozenset(channels)
    pool = redis.connection_pool
    async with asyncio.timeout(timeout):
        connection = await get_connection(pool)
    try:
        async with asyncio.timeout(timeout):
            if not connection.is_connected:
                await connection.connect()  # type: ignore[no-untyped-call]
        stream = stream_of(connection)
        if stream is None:
            raise RedisConnectionError("the subscriber connection has no socket to read")
        subscription = StreamSubscription(
            stream, sorted(names), SHARDED, unsubscriber(connection, "SUNSUBSCRIBE")
        )
        by_slot: dict[int, list[str]] = {}
        for channel in sorted(names):
            by_slot.setdefault(key_slot(channel.encode()), []).append(channel)
        commands = [("SSUBSCRIBE", *same) for same in by_slot.values()]
        await connection.send_packed_command(
            connection.pack_commands(commands), check_health=False
        )
        await subscription.confirm(timeout)
    except BaseException:
        await connection.disconnect(nowait=True)
        await pool.release(connection)
        raise
    return Part(node, names, subscription, connection, redis)


class MergedSubscription:
    """The messages of several masters' parts, merged (each master's in order).

    One reader task per part. When one part is lost, the others stop being read (what
    they still hold stays in their sockets, for the next subscription) and :meth:`read`
    raises the loss once every batch read before was handed out.
    """

    def __init__(self, parts: Sequence[Part], leftover: Sequence[list[bytes]] = ()) -> None:
        self.parts = list(parts)
        #: The loss that ended the subscription, once read raised it.
        self.failure: Exception | None = None
        self._batches: asyncio.Queue[Any] = asyncio.Queue()
        for batch in leftover:  # read by the previous subscription, never handed out
            self._batches.put_nowait(batch)
        self._room = asyncio.Event()
        self._room.set()
        self._failed: set[int] = set()
        self._abandoned: set[str] = set()
        self._ended = False
        self._readers = [asyncio.ensure_future(self._pump(n, p)) for n, p in enumerate(parts)]
        self._watch = asyncio.ensure_future(self._end_when_stopped())

    async def _pump(self, index: int, part: Part) -> None:
        """Read one part until it is lost (then stop the others) or cancelled; only
        cancelled while waiting, so no batch read is ever dropped."""
        try:
            while True:
                await self._room.wait()
                batch = await part.subscription.read(PART_READ)
                if batch:
                    self._batches.put_nowait(batch)
                    if self._batches.qsize() >= MERGE_DEPTH:
                        self._room.clear()
        except Exception as error:  # the loss, after every message before it
            self._failed.add(index)
            self._batches.put_nowait(error)
            for reader in self._readers:
                if reader is not asyncio.current_task():
                    reader.cancel()

    async def _end_when_stopped(self) -> None:
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._batches.put_nowait(_END)

    async def read(self, timeout: float) -> list[bytes]:
        """The next messages' payloads, of every master, that arrived; ``[]`` when none
        came within ``timeout`` s; the loss of a part raises once what came before it is
        handed out."""
        if self._ended and self.failure is not None:
            raise self.failure
        try:
            async with asyncio.timeout(timeout):
                items = [await self._batches.get()]
        except TimeoutError:
            return []
        while not self._batches.empty():
            items.append(self._batches.get_nowait())
        if self._batches.qsize() < MERGE_DEPTH:
            self._room.set()
        messages: list[bytes] = []
        for item in items:
            if item is _END:
                self._ended = True
            elif isinstance(item, Exception):
                self.failure = self.failure or item
            else:
                messages += item
        if self._ended and not messages:
            raise self.failure or SubscriberClosedError("the subscription ended")
        return messages

    def abandon(self, channels: Iterable[str]) -> None:
        """Name channels that went deaf before ending the subscription with an error of
        the caller's own: their parts are drained and closed, the others parked for the
        next (unread: no drain of theirs holds the caller up)."""
        self._abandoned.update(channels)

    async def stop(self) -> tuple[list[Part], list[Part], list[list[bytes]]]:
        """Stop reading: the parts that are fine, the others, and the batches read but
        not handed out."""
        for task in (*self._readers, self._watch):
            task.cancel()
        await asyncio.gather(*self._readers, self._watch, return_exceptions=True)
        leftover: list[list[bytes]] = []
        while not self._batches.empty():
            item = self._batches.get_nowait()
            if isinstance(item, list):
                leftover.append(item)
        fine: list[Part] = []
        lost: list[Part] = []
        for index, part in enumerate(self.parts):
            bad = index in self._failed or part.channels & self._abandoned
            (lost if bad else fine).append(part)
        return fine, lost, leftover

    async def drain(self, timeout: float) -> list[bytes]:
        """Nothing: what the parts hold goes to the next subscription instead (each
        part drained or parked: see :class:`ShardedSubscriptions`), as every channel is
        abandoned here."""
        self.abandon(channel for part in self.parts for channel in part.channels)
        return []

    def abandoned(self, part: Part) -> bool:
        """Whether ``part`` holds a channel named by :meth:`abandon` (and did not fail)."""
        failed = self.parts.index(part) in self._failed
        return not failed and bool(part.channels & self._abandoned)

    def keeps_parts(self, error: BaseException | None) -> bool:
        """Whether the subscription ending with ``error`` parks its parts that are fine:
        for its own loss, or the caller's error once it named the channels to drop."""
        if not isinstance(error, Exception):  # ended for good, or cancelled
            return False
        return error is self.failure or bool(self._abandoned)


class ShardedSubscriptions:
    """Sharded subscriptions made over the masters, parts parked between them (see the
    module's doc). ``client_of`` gives a master's plain client."""

    def __init__(self, client_of: Callable[[Address], Redis], timeout: float) -> None:
        self._client_of = client_of
        self._timeout = timeout
        self._parked: list[Part] = []
        self._leftover: list[list[bytes]] = []

    @asynccontextmanager
    async def subscribe(
        self, groups: dict[Address, list[str]]
    ) -> AsyncIterator[MergedSubscription]:
        """Subscribe to each master's channels (``groups``), taking back the parked parts
        whose channels are all still there; entered once every channel is confirmed."""
        if not check().raw:
            raise RedisConnectionError(
                "sharded subscriptions need raw reads (hiredis >= 3.2 and redis-py's "
                "asyncio Connection._reader: see quart_wslb._compat)"
            )
        parts = await self._gather(groups)
        merged = MergedSubscription(parts, self._leftover)
        self._leftover = []
        try:
            yield merged
        except BaseException as error:
            await self._end(merged, error)
            raise
        else:
            await self._end(merged, None)

    async def _gather(self, groups: dict[Address, list[str]]) -> list[Part]:
        """Every master's part: the parked ones taken back, the missing ones opened while
        the dropped ones drain (what they hold is left over for the new subscription:
        it comes first). A failure to open raises, the parts that are fine parked."""
        kept, dropped, missing = self._take_back(groups)
        try:
            drained, opened = await asyncio.gather(
                self._drain_dropped(dropped, groups),
                asyncio.gather(
                    *(self._open(node, channels) for node, channels in missing.items()),
                    return_exceptions=True,
                ),
            )
        except BaseException:  # cancelled: the parts taken back stay parked
            self._parked += kept
            raise
        self._leftover += drained
        parts = kept + [part for part in opened if isinstance(part, Part)]
        for outcome in opened:
            if isinstance(outcome, BaseException):
                self._parked += parts  # confirmed and fine: kept for the next try
                raise outcome
        return parts

    def _take_back(
        self, groups: dict[Address, list[str]]
    ) -> tuple[list[Part], list[Part], dict[Address, list[str]]]:
        """The parked parts whose channels are all still on their master, the others
        (to drain), and each master's channels that no kept part holds."""
        owner = {channel: node for node, channels in groups.items() for channel in channels}
        parked, self._parked = self._parked, []
        kept: list[Part] = []
        dropped: list[Part] = []
        for part in parked:
            still = all(owner.get(channel) == part.node for channel in part.channels)
            (kept if still else dropped).append(part)
        held = {channel for part in kept for channel in part.channels}
        missing = {
            node: [channel for channel in channels if channel not in held]
            for node, channels in groups.items()
        }
        return kept, dropped, {node: channels for node, channels in missing.items() if channels}

    async def _drain_dropped(
        self, dropped: list[Part], groups: dict[Address, list[str]]
    ) -> list[list[bytes]]:
        """Drain the dropped parts: those of a node that the map still gives some of the
        channels (others moved) within the timeout; those of a node it gives none (failed
        over: most likely dead or hung, or all its slots moved) within ``DEAF_DRAIN``."""
        gone = [part for part in dropped if part.node not in groups]
        return await self._drain_split(dropped, gone)

    async def _drain_split(self, parts: list[Part], short: list[Part]) -> list[list[bytes]]:
        """Drain ``parts`` side by side: those in ``short`` (deaf, or of a node given none
        of the channels) within ``DEAF_DRAIN``, the others within the timeout."""
        rest = [part for part in parts if part not in short]
        drained = await asyncio.gather(
            _drain(rest, self._timeout), _drain(short, min(self._timeout, DEAF_DRAIN))
        )
        return drained[0] + drained[1]

    async def _open(self, node: Address, channels: list[str]) -> Part:
        return await open_part(node, self._client_of(node), channels, self._timeout)

    async def _end(self, merged: MergedSubscription, error: BaseException | None) -> None:
        fine, lost, leftover = await merged.stop()
        if merged.keeps_parts(error):
            self._parked += fine
            deaf = [part for part in lost if merged.abandoned(part)]
            self._leftover = leftover + await self._drain_split(lost, deaf)
        else:
            await _close(fine + lost)

    async def aclose(self) -> None:
        """Close the parked parts."""
        parked, self._parked = self._parked, []
        await _close(parked)


async def _drain(parts: Sequence[Part], timeout: float) -> list[list[bytes]]:
    """Drain the parts side by side (each closed after): their messages, as batches."""
    drains = (part.drain(timeout) for part in parts)
    drained = await asyncio.gather(*drains, return_exceptions=True)
    for outcome in drained:
        if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
            raise outcome  # cancellation
    return [batch for batch in drained if isinstance(batch, list) and batch]


async def _close(parts: Iterable[Part]) -> None:
    await asyncio.gather(*(part.aclose() for part in parts), return_exceptions=True)
