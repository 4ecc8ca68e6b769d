"""Group commit for a batched script: concurrent calls share round trips and script calls.

A call made while no other is in flight goes out at once, alone, so a lone send waits for
nobody. Calls made while one is in flight queue up, and as soon as it returns they all go
out together, then the next queue, and so on: under load a send costs a share of a round
trip, of a script call and (for ``send.lua``) of a publish, instead of one of each. Each
caller waits at most ``timeout`` from its own call, queued or not (``TimeoutError``); a
queued call whose caller gave up before its batch is written is left out of it, so it
has no effect. A batch is cut only once its connection is ready (taken from the pool,
connected), right before the write: a caller may give up while the batch waits to
reconnect after a blip, and then may send again. (On the redis-py pipelines of
:class:`~quart_wslb.transport.ClientTransport`, which make their connection themselves,
and on a Redis Cluster, whose transport connects to each master inside the round trip,
the batch is cut before that.)

The script takes its calls in one ``EVALSHA``: ``KEYS`` are the fixed keys, then each
call's keys; ``ARGV`` the fixed arguments, then for each call the offset of its keys
(past the fixed ones), its argument count and its arguments. It returns one flat array:
for each call the count of its reply's items, then the items (a caller gets them as a
list), or ``REPLY_ERROR`` and an error message for a call that failed alone (its caller
gets the error): the reply framing of :mod:`quart_wslb.contract`. Flat, because Redis
turns nested Lua tables into a reply slowly. A long queue is split into several such
script calls (``MAX_CALLS``, ``MAX_BYTES``), pipelined in the same round trip.

:meth:`GroupCommit.many` takes many calls at once (``send_many``) with one future per
window of them, not one per call: a window is at most ``MAX_PIPELINE`` script calls,
pipelined in one round trip (queued behind, and sharing it with, the calls already
waiting if one is in flight); the windows go one after the other, each within
``timeout`` of its own start.

Round trips go through the client's :class:`~quart_wslb.transport.Transport`, picked
once by :func:`~quart_wslb.transport.pick`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from .contract import REPLY_ERROR
from .transport import Transport
from .wire import error_of

__all__ = ("GroupCommit",)

log = logging.getLogger("quart_wslb")
#: One call: its keys and its arguments.
Args = tuple[list[Any], list[bytes | str], bool]
#: A queued call, and the future its caller waits on.
Call = tuple[Args, "asyncio.Future[Any]"]
#: Seconds without a call after which the connection goes back to the client's pool.
IDLE_RELEASE = 1.0
#: Most calls, and most bytes of arguments, in one script call: a script holds Redis for
#: its whole run, and ``send.lua`` publishes what one script call routes at once.
MAX_CALLS = 128
MAX_BYTES = 1 << 20
#: Most script calls of :meth:`GroupCommit.many` in one round trip: bounds the bytes in
#: flight and what one round trip asks of Redis (and of its ``timeout``).
MAX_PIPELINE = 8
#: A window of calls given at once, and the future that gets its replies (a list).
Window = tuple[list[Args], "asyncio.Future[list[Any]]"]


class GroupCommit:
    """Runs a batched Lua script for many concurrent callers (see the module's doc)."""

    def __init__(
        self,
        transport: Transport,
        script: AsyncScript,
        timeout: float,
        keys: Sequence[Any] = (),
        args: Sequence[Any] = (),
    ) -> None:
        self._transport = transport
        self._script = script
        self._timeout = timeout
        self._keys, self._args = list(keys), list(args)  # first in every script call
        self._busy = False
        self._queue: list[Call] = []
        self._window_queue: list[Window] = []  # windows of many(), queued like calls
        self._drainer: asyncio.Task[None] | None = None
        self._release: asyncio.TimerHandle | None = None
        self._releasing: set[asyncio.Future[None]] = set()
        # Each queued call's deadline, in the order of the calls (so of their deadlines),
        # and ONE timer for the earliest: a timer per call cost a third of a send's CPU.
        self._deadlines: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._watchdog: asyncio.TimerHandle | None = None

    async def __call__(
        self, keys: list[Any], args: list[bytes | str], *, alone: bool = False
    ) -> Any:
        """The script's reply to one call of ``keys`` and ``args``; an error raises.

        An ``alone`` call (one that may hold Redis long) gets a script call of its own,
        in the same round trip as the others.
        """
        self._cancel_release()
        if self._busy:
            future: asyncio.Future[Any] = self._queued()
            self._queue.append(((keys, args, alone), future))
            return await future  # failed by _expire in time: _drain then skips it
        self._busy = True
        try:
            async with asyncio.timeout(self._timeout):
                (result,) = await self._round_trip([(keys, args, alone)])
            if isinstance(result, BaseException):
                raise result
            return result
        finally:
            self._handover()

    async def many(self, calls: list[Args]) -> list[Any]:
        """The script's replies to ``calls``, in order: a call that failed alone gets
        its error in the list; a round trip that failed raises (``TimeoutError`` past
        ``timeout``), and then the calls of the windows before it have run, and those
        of its own may have. One future per window of ``MAX_PIPELINE`` script calls."""
        results: list[Any] = []
        for chunks in _windows(calls):
            results += await self._window(chunks)
        return results

    async def _window(self, chunks: list[list[Args]]) -> list[Any]:
        """One window's replies: its script calls (``chunks``) in a round trip of their
        own, or, queued behind one in flight, in the next with the calls queued too."""
        self._cancel_release()
        if self._busy:  # queued like a call: its deadline from now, one future
            future: asyncio.Future[list[Any]] = self._queued()
            self._window_queue.append(([call for chunk in chunks for call in chunk], future))
            return await future
        self._busy = True
        try:
            async with asyncio.timeout(self._timeout):
                return await self._round_trip([], chunks)  # cut already
        finally:
            self._handover()

    def _cancel_release(self) -> None:
        """Cancel the pending hand-back of the connection to the pool, if any."""
        if self._release is not None:
            self._release.cancel()
            self._release = None

    def _queued(self) -> asyncio.Future[Any]:
        """A future for a queued call, failed by :meth:`_expire` ``timeout`` from now:
        from the call's own start, not its batch's, else a call queued behind a stalled
        round trip would wait for that one's timeout, then for its own."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._deadlines.append((loop.time() + self._timeout, future))
        if self._watchdog is None:
            self._arm()
        return future

    def _handover(self) -> None:
        """A lone round trip ended: drain what queued behind it, else go idle."""
        if self._queue or self._window_queue:
            self._drainer = asyncio.create_task(self._drain(), name="wslb-group-commit")
        else:
            self._idle()

    async def _drain(self) -> None:
        try:
            while self._queue or self._window_queue:
                batch = [call for call in self._queue if not call[1].done()]
                self._queue = []
                windows = self._next_windows()
                if batch or windows:  # else every caller gave up: nothing to send
                    await self._run(batch, windows)
                # Let the callers just answered run first: those that send again (any
                # loop of sends) then join the next batch instead of each starting a
                # round trip of its own. Only ever one event-loop turn, and only here,
                # after a batch: a lone call never waits for it.
                await asyncio.sleep(0)
        finally:
            self._idle()
            abandoned = [f for _, f in self._queue] + [f for _, f in self._window_queue]
            for future in abandoned:  # only if cancelled: nobody is left waiting
                if not future.done():
                    future.set_exception(ConnectionError("the batch was abandoned"))
            self._queue, self._window_queue = [], []

    def _next_windows(self) -> list[Window]:
        """The queued windows still awaited, up to about one window's worth of calls
        (at least one window): several ``many`` at once share a round trip, bounded."""
        windows: list[Window] = []
        size = 0
        while self._window_queue and (not windows or size < MAX_PIPELINE * MAX_CALLS):
            calls, future = self._window_queue.pop(0)
            if not future.done():
                windows.append((calls, future))
                size += len(calls)
        return windows

    def _trim(self) -> None:
        """Forget the deadlines of answered calls at the head (calls are answered in
        order, so this keeps the list short)."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][1].done():
            deadlines.popleft()

    def _arm(self) -> None:
        """Set the timer for the earliest deadline of a call still waiting, if any."""
        self._trim()
        deadlines = self._deadlines
        if deadlines:
            self._watchdog = asyncio.get_running_loop().call_at(deadlines[0][0], self._expire)
        else:
            self._watchdog = None

    def _expire(self) -> None:
        """Fail every waiting call whose deadline has passed, as ``asyncio.timeout``
        would have (``TimeoutError``), then set the timer for the next."""
        now, deadlines = asyncio.get_running_loop().time(), self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, future = deadlines.popleft()
            if not future.done():
                future.set_exception(TimeoutError())
        self._arm()

    async def _run(self, batch: list[Call], windows: Sequence[Window] = ()) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._transport.ready()
                # Nothing left to wait for before the write: leave out now the calls
                # whose callers gave up while the connection was made.
                batch = [call for call in batch if not call[1].done()]
                windows = [window for window in windows if not window[1].done()]
                if not batch and not windows:
                    return
                results = await self._pipeline(batch, windows)
        except Exception as error:  # the whole round trip failed: every caller hears it
            results = [error] * (len(batch) + len(windows))
        _answer_windows(windows, results[len(batch) :])
        for (_, future), result in zip(batch, results[: len(batch)], strict=True):
            if future.done():  # its caller gave up (its own deadline)
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        self._trim()

    async def _pipeline(self, batch: list[Call], windows: Sequence[Window] = ()) -> list[Any]:
        """The replies of the calls of ``batch``, then one per window (its list)."""
        calls = [call for call, _ in batch]
        for window_calls, _ in windows:
            calls += window_calls
        results = await self._round_trip(calls)
        at = len(batch)
        for window_calls, _ in windows:
            results[at : at + len(window_calls)] = [results[at : at + len(window_calls)]]
            at += 1
        return results

    async def _round_trip(
        self, calls: list[Args], chunks: list[list[Args]] | None = None
    ) -> list[Any]:
        """Replies to ``calls`` (or to those of ``chunks``, cut into script calls
        already) in one round trip; errors are returned, not raised."""
        chunks = _chunks(calls) if chunks is None else chunks
        commands = [self._evalsha(chunk) for chunk in chunks]
        replies = await self._transport.run(commands)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            # Redis lost its script cache (a restart): load the script (on this same
            # connection, which has just proved it works) and run again only the script
            # calls that did not run; if that fails, only their calls fail.
            load = ["SCRIPT", "LOAD", self._script.script]
            try:
                again = await self._transport.run([load, *(commands[i] for i in missing)])
            except Exception as error:
                again = [None] + [error] * len(missing)
            for i, reply in zip(missing, again[1:], strict=True):
                replies[i] = reply
        results: list[Any] = []
        for chunk, reply in zip(chunks, replies, strict=True):
            results += _split(reply, len(chunk))
        return results

    def _evalsha(self, calls: list[Args]) -> list[Any]:
        keys, args = list(self._keys), list(self._args)
        for call_keys, call_args, _ in calls:
            args += [len(keys) - len(self._keys), len(call_args), *call_args]
            keys += call_keys
        return ["EVALSHA", self._script.sha, len(keys), *keys, *args]

    def _idle(self) -> None:
        """Nothing in flight: hand the connection back to the pool if it stays so for
        ``IDLE_RELEASE`` seconds (sooner would cost every lone call a pool round)."""
        self._busy = False
        loop = asyncio.get_running_loop()
        self._release = loop.call_later(IDLE_RELEASE, self._release_now)

    def _release_now(self) -> None:
        self._release = None
        if not self._busy:
            task = asyncio.ensure_future(self._transport.release())
            self._releasing.add(task)  # a reference, until it is done
            task.add_done_callback(self._releasing.discard)

    async def aclose(self) -> None:
        """Hand the transport's connection back to the client's pool now; it goes back by
        itself ``IDLE_RELEASE`` seconds after the last call ends, which is also when one
        that a call is still reading goes back."""
        self._cancel_release()
        await self._transport.release()


def _answer_windows(windows: Sequence[Window], results: list[Any]) -> None:
    """Give each still awaited window its replies (a list), or the round trip's error."""
    for (_, future), result in zip(windows, results, strict=True):
        if future.done():
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


def _windows(calls: list[Args]) -> list[list[list[Args]]]:
    """``calls`` in order, cut into script calls, in windows of at most ``MAX_PIPELINE``."""
    chunks = _chunks(calls) if calls else []
    return [chunks[at : at + MAX_PIPELINE] for at in range(0, len(chunks), MAX_PIPELINE)]


def _chunks(calls: list[Args]) -> list[list[Args]]:
    """``calls`` in order, cut into script calls of at most ``MAX_CALLS`` calls and
    ``MAX_BYTES`` of arguments; a single larger call, or an ``alone`` one, goes alone."""
    chunks: list[list[Args]] = [[]]
    size = 0
    for call in calls:
        weight = sum(map(len, call[1]))
        last = chunks[-1]
        if last and (
            call[2] or last[-1][2] or len(last) >= MAX_CALLS or size + weight > MAX_BYTES
        ):
            chunks.append([])
            size = 0
        chunks[-1].append(call)
        size += weight
    return chunks


def _split(reply: Any, count: int) -> list[Any]:
    """The replies of a script call's ``count`` calls, cut out of its flat reply: its
    error if it failed as a whole; a call's error as the exception redis-py would raise."""
    if isinstance(reply, BaseException):
        return [reply] * count
    if not isinstance(reply, list):
        reply = [reply]  # reported below
    replies: list[Any] = []
    at = 0
    try:
        while at < len(reply):
            size = reply[at]
            if type(size) is not int or (size < 0 and size != REPLY_ERROR):
                break  # reported below
            if size == REPLY_ERROR:
                replies.append(error_of(ResponseError(_text(reply[at + 1]))))
                at += 2
            else:
                replies.append(reply[at + 1 : at + 1 + size])
                at += 1 + size
    except (TypeError, IndexError):
        pass  # the count check below reports it
    if len(replies) != count or at != len(reply):
        error = ResponseError(f"expected {count} replies from the script, got {reply!r:.100}")
        return [error] * count
    return replies


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
