"""Group commit for script calls: concurrent calls share round trips.

A call made while no other is in flight goes out at once, alone, so a lone send waits for
nobody. Calls made while one is in flight queue up, and as soon as it returns they all go
out together in one pipeline, then the next queue, and so on: under load a send costs a
share of a round trip instead of one of its own. Each round trip is bounded by
``timeout``, so a queued caller waits at most for two of them.

Round trips go through :class:`~quart_wslb.wire.Exchange` (replies parsed straight off the
socket) where the client has sockets, and through a redis-py pipeline otherwise
(fakeredis).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from .wire import Exchange

__all__ = ("GroupCommit",)

log = logging.getLogger("quart_wslb")
Call = tuple[list[str], list[Any], "asyncio.Future[Any]"]
#: Seconds without a call after which the connection goes back to the client's pool.
IDLE_RELEASE = 1.0


class GroupCommit:
    """Runs one Lua script for many concurrent callers, batching them into pipelines."""

    def __init__(self, redis: Redis, script: AsyncScript, timeout: float) -> None:
        self._redis = redis
        self._script = script
        self._timeout = timeout
        self._busy = False
        self._queue: list[Call] = []
        self._drainer: asyncio.Task[None] | None = None
        self._exchange = Exchange(redis)
        self._raw: bool | None = None  # whether the exchange can be used; known at first use
        self._release: asyncio.TimerHandle | None = None
        self._releasing: set[asyncio.Future[None]] = set()

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        """The script's result for ``keys`` and ``args``, raised errors included."""
        if self._release is not None:
            self._release.cancel()
            self._release = None
        if self._busy:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._queue.append((keys, args, future))
            return await future
        self._busy = True
        try:
            async with asyncio.timeout(self._timeout):
                (result,) = await self._round_trip([(keys, args)])
            if isinstance(result, BaseException):
                raise result
            return result
        finally:
            if self._queue:
                self._drainer = asyncio.create_task(self._drain(), name="wslb-group-commit")
            else:
                self._idle()

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._run(batch)
                # Let the callers just answered run first: those that send again (any
                # loop of sends) then join the next batch instead of each starting a
                # round trip of its own. Only ever one event-loop turn, and only here,
                # after a batch: a lone call never waits for it.
                await asyncio.sleep(0)
        finally:
            self._idle()
            for _, _, future in self._queue:  # only if cancelled: nobody is left waiting
                if not future.done():
                    future.set_exception(ConnectionError("the batch was abandoned"))
            self._queue = []

    async def _run(self, batch: list[Call]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                results = await self._pipeline(batch)
        except Exception as error:  # the whole round trip failed: every caller hears it
            results = [error] * len(batch)
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller gave up (its own deadline)
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _pipeline(self, batch: list[Call]) -> list[Any]:
        return await self._round_trip([(keys, args) for keys, args, _ in batch])

    async def _round_trip(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Replies to ``calls`` in one round trip; errors are returned, not raised."""
        results = await self._commands([self._evalsha(*call) for call in calls])
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            # Redis lost its script cache (a restart): load the script (on this same
            # connection, which has just proved it works) and run again only the calls
            # that did not run; if that fails, only they fail.
            load = ["SCRIPT", "LOAD", self._script.script]
            try:
                again = await self._commands([load, *(self._evalsha(*calls[i]) for i in missing)])
            except Exception as error:
                again = [None] + [error] * len(missing)
            for i, result in zip(missing, again[1:], strict=True):
                results[i] = result
        return results

    async def _commands(self, commands: list[list[Any]]) -> list[Any]:
        """Pipelined commands: through the exchange, or a redis-py pipeline (fakeredis)."""
        if await self._is_raw():
            return await self._exchange.run(commands)
        async with self._redis.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    def _evalsha(self, keys: list[str], args: list[Any]) -> list[Any]:
        return ["EVALSHA", self._script.sha, len(keys), *keys, *args]

    async def _is_raw(self) -> bool:
        if self._raw is None:
            self._raw = await self._exchange.supported()
        return self._raw

    def _idle(self) -> None:
        """Nothing in flight: hand the connection back to the pool if it stays so for
        ``IDLE_RELEASE`` seconds (sooner would cost every lone call a pool round)."""
        self._busy = False
        loop = asyncio.get_running_loop()
        self._release = loop.call_later(IDLE_RELEASE, self._release_now)

    def _release_now(self) -> None:
        self._release = None
        if not self._busy:
            task = asyncio.ensure_future(self._exchange.release())
            self._releasing.add(task)  # a reference, until it is done
            task.add_done_callback(self._releasing.discard)

    async def aclose(self) -> None:
        """Hand the exchange's connection back to the client's pool now; it goes back by
        itself ``IDLE_RELEASE`` seconds after the last call ends, which is also when one
        that a call is still reading goes back."""
        if self._release is not None:
            self._release.cancel()
            self._release = None
        await self._exchange.release()
