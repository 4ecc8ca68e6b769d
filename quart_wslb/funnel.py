"""Round trips of many callers on one connection: :class:`Funnel`.

A :class:`~quart_wslb.transport.Transport` runs one round trip at a time on one
connection. Callers that want round trips to the same Redis at once (on a Redis Cluster,
the group commits of the shards that live on one master) queue them in its
:class:`Funnel`: whenever none is in flight, everything queued goes out as one pipeline,
and each caller gets its own replies. So a Redis costs one connection whatever the
number of callers, and callers share round trips instead of taking turns.

Whether a caller's commands were written decides what its failure means. Before the
write (connecting failed, or the caller gave up while queued or connecting) the error
is raised as it is: nothing ran, the commands may be sent again. Once written (the
exchange failed, or the caller gave up while it was read) :class:`SentError` is raised:
they may have run, and must never be sent twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from .exceptions import describe
from .transport import Transport

__all__ = ("Funnel", "SentError")

log = logging.getLogger("quart_wslb")


class SentError(Exception):
    """The exchange failed once the commands were written: they may have run."""


@dataclass(slots=True, eq=False)
class _Request:
    """One caller's commands, when it gives up, and the future of its replies."""

    commands: Sequence[Sequence[Any]]
    deadline: float
    future: asyncio.Future[list[Any]]
    written: bool = False


class Funnel:
    """Round trips of several callers through one :class:`Transport` (see the module's
    doc); ``name`` says which Redis in errors."""

    def __init__(self, transport: Transport, name: str) -> None:
        self._transport = transport
        self._name = name
        self._queue: list[_Request] = []
        # Held by whoever uses the transport: the pump, release().
        self._lock = asyncio.Lock()
        self._pump: asyncio.Task[None] | None = None
        self._pumping = False
        self._release_due = False

    async def run(self, commands: Sequence[Sequence[Any]], deadline: float) -> list[Any]:
        """The replies to ``commands``, in order, written with those of the other callers
        queued meanwhile; ``TimeoutError`` at ``deadline`` (the loop's time). Error
        replies are returned; a failure raises (see the module's doc)."""
        request = _Request(commands, deadline, asyncio.get_running_loop().create_future())
        self._queue.append(request)
        if not self._pumping:
            self._pumping = True
            self._pump = asyncio.ensure_future(self._drain())
        try:
            async with asyncio.timeout_at(deadline):
                return await request.future
        except (TimeoutError, asyncio.CancelledError) as error:
            future = request.future
            if future.done() and not future.cancelled():
                # The pump's own error (it says whether it was written), or an outcome
                # that came in the loop turn the deadline fired: either stands.
                if isinstance(error, TimeoutError):
                    return future.result()
                raise
            if request in self._queue:
                self._queue.remove(request)
            if request.written and isinstance(error, TimeoutError):
                raise SentError(f"{self._name}: no reply in time") from error
            raise

    async def release(self) -> None:
        """Hand the connection back to the pool now if idle, else once the queue is
        empty."""
        if self._pumping or self._lock.locked():
            self._release_due = True
            return
        async with self._lock:
            await self._transport.release()

    async def aclose(self) -> None:
        """Stop the round trips (their callers get errors) and release the connection."""
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        await self._transport.release()

    async def _drain(self) -> None:
        """Round trips while anything is queued: each takes all that is."""
        batch: list[_Request] = []
        try:
            async with self._lock:
                while self._queue:
                    batch, self._queue = self._queue, []
                    await self._round_trip(batch)
                self._pumping = False  # at once: a caller queued from now on starts a pump
                if self._release_due:
                    self._release_due = False
                    await self._release()
        except asyncio.CancelledError:  # aclose()
            self._stop(batch, RedisConnectionError(f"{self._name}: the transport was closed"))
            raise
        except Exception as error:  # a bug: its callers hear it, and the next starts a pump
            log.exception("%s: round trips failed unexpectedly", self._name)
            self._stop(batch, error)

    def _stop(self, batch: list[_Request], error: BaseException) -> None:
        """End this pump (its round trips were still going): fail ``batch`` and what is
        queued with ``error``, so that a caller queued from now on starts a new one."""
        self._pumping = False
        _fail(batch, error, self._name)
        _fail(self._queue, error, self._name)
        self._queue = []

    async def _release(self) -> None:
        """Hand the connection back; a failure is logged (the pump must go on: a pump
        that died would leave every later caller waiting for it)."""
        try:
            await self._transport.release()
        except Exception as error:
            log.warning("%s: handing the connection back failed: %s", self._name, describe(error))

    async def _round_trip(self, batch: list[_Request]) -> None:
        """Connect, then write what is still awaited in ``batch`` as one pipeline."""
        deadline = max(request.deadline for request in batch)
        try:
            async with asyncio.timeout_at(deadline):
                await self._transport.ready()
        except Exception as error:  # nothing written
            _fail(batch, error, self._name)
            return
        live = [request for request in batch if not request.future.done()]
        if not live:
            return
        for request in live:  # no wait between here and the write
            request.written = True
        try:
            async with asyncio.timeout_at(deadline):
                replies = await self._transport.run([c for r in live for c in r.commands])
        except Exception as error:
            _fail(live, error, self._name)
            return
        at = 0
        for request in live:
            if not request.future.done():
                request.future.set_result(replies[at : at + len(request.commands)])
            at += len(request.commands)


def _fail(requests: list[_Request], error: BaseException, name: str) -> None:
    """Fail each request still awaited: with ``error``, or :class:`SentError` caused by
    it once written."""
    for request in requests:
        if request.future.done():
            continue
        if request.written:
            sent = SentError(f"{name}: {error!r}")
            sent.__cause__ = error
            request.future.set_exception(sent)
        else:
            request.future.set_exception(error)
