"""``Emitter``: the synchronous face of :class:`~quart_wslb.AsyncEmitter`.

For Flask views, Celery or RQ workers, cron jobs and scripts. Every call runs on one
private event loop in a daemon thread, which holds one Redis connection pool, so the
routing rules and the wire format are exactly those of the async path, a send is one
round trip, and any number of threads may call at once. After a ``fork`` (prefork
workers) the child starts its own loop and pool on first use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
)
from types import TracebackType
from typing import Any, Self, TypeVar, cast

from .batch import MAX_CALLS, MAX_PIPELINE
from .config import EmitterOptions, emitter_options, validated_instance_id
from .emitter import EVERYONE, AsyncEmitter
from .exceptions import RedisUnavailableError
from .instances import InstanceInfo
from .records import ConnectionRecord
from .selectors import Selector

__all__ = ("Emitter",)

T = TypeVar("T")
#: How long a caller waits for a whole call, in multiples of the per-step timeout, plus
#: ``GRACE`` seconds; paged calls make several bounded steps.
LOOP_PATIENCE = 20
GRACE = 1.0


class Emitter:
    """Send to, query and act on connections anywhere in the cluster, synchronously.

    Takes the same arguments as :class:`~quart_wslb.AsyncEmitter` except a client,
    ``secret`` included; as there, options that are not given are read from the
    environment (``WSLB_*``), else take their defaults. Use it as a context manager, or
    call :meth:`close`.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        prefix: str | None = None,
        origin: str | None = None,
        timeout: float | None = None,
        max_connections: int | None = None,
        secret: object = None,
        strict: bool = True,
        shards: int | None = None,
    ) -> None:
        # Resolved and validated now, in the caller's thread, so bad settings fail at
        # construction (and the loop thread sees the environment as it was then).
        options = emitter_options(
            redis_url=redis_url,
            prefix=prefix,
            timeout=timeout,
            max_connections=max_connections,
            secret=secret,  # parsed: a bad one fails here, and the text is not kept,
            shards=shards,
        )
        self._setup(options, origin, strict)

    @classmethod
    def from_options(
        cls, options: EmitterOptions, *, origin: str | None = None, strict: bool = True
    ) -> Self:
        """An emitter of options resolved already (:func:`~quart_wslb.config.emitter_options`)."""
        emitter = cls.__new__(cls)
        emitter._setup(options, origin, strict)
        return emitter

    def _setup(self, options: EmitterOptions, origin: str | None, strict: bool) -> None:
        if origin is not None:
            validated_instance_id(origin)
        #: What the emitter was made with.
        self.options = options
        self._origin = origin
        #: Raise ``NoInstancesError`` where no instance announced itself under the prefix
        #: (as :attr:`AsyncEmitter.strict <quart_wslb.AsyncEmitter.strict>`).
        self.strict = strict
        self.timeout = options.timeout
        self._lock = threading.Lock()
        self._pid = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._emitter: AsyncEmitter | None = None
        self._timestamps = False

    @property
    def timestamps(self) -> bool:
        """Whether each message it sends carries its send time, as
        :attr:`AsyncEmitter.timestamps <quart_wslb.AsyncEmitter.timestamps>` (off by
        default); set it at any time, from any thread."""
        return self._timestamps

    @timestamps.setter
    def timestamps(self, on: bool) -> None:
        with self._lock:
            self._timestamps = on
            # A bool written whole: the loop's thread reads it at its next send.
            if self._emitter is not None:
                self._emitter.timestamps = on

    def send(self, selector: Selector, message: object) -> int:
        """Like :meth:`AsyncEmitter.send`: returns how many connections it routed to."""
        return self._call(lambda e: e.send(selector, message))

    def send_many(self, messages: Iterable[tuple[Selector, object]]) -> list[int]:
        """Like :meth:`AsyncEmitter.send_many`: each send's count, in order."""
        pairs = list(messages)  # read here, in the caller's thread
        # Each window of sends is a round trip bounded on its own: patience for each.
        windows = 1 + len(pairs) // (MAX_CALLS * MAX_PIPELINE)
        return self._call(lambda e: e.send_many(pairs), windows)

    def disconnect(self, selector: Selector, code: int = 1000, reason: str = "") -> int:
        """Like :meth:`AsyncEmitter.disconnect`."""
        return self._call(lambda e: e.disconnect(selector, code, reason))

    def join(self, selector: Selector, group: str) -> int:
        """Like :meth:`AsyncEmitter.join`."""
        return self._call(lambda e: e.join(selector, group))

    def leave(self, selector: Selector, group: str) -> int:
        """Like :meth:`AsyncEmitter.leave`."""
        return self._call(lambda e: e.leave(selector, group))

    def count(self, selector: Selector = EVERYONE) -> int:
        """Like :meth:`AsyncEmitter.count`."""
        return self._call(lambda e: e.count(selector))

    def resolve(self, selector: Selector) -> dict[str, list[str]]:
        """Like :meth:`AsyncEmitter.resolve`."""
        return self._call(lambda e: e.resolve(selector))

    def instances(self) -> list[InstanceInfo]:
        """Like :meth:`AsyncEmitter.instances`."""
        return self._call(lambda e: e.instances(), steps=2)

    def connections(self, selector: Selector = EVERYONE) -> Iterator[ConnectionRecord]:
        """Like :meth:`AsyncEmitter.connections`, as a plain iterator (paged)."""
        return self._iterate(lambda e: e.connections(selector).pages())

    def users(self, selector: Selector = EVERYONE) -> Iterator[str]:
        """Like :meth:`AsyncEmitter.users`, as a plain iterator (paged)."""
        return self._iterate(lambda e: e.users(selector).pages())

    def close(self) -> None:
        """Close the pool and stop the loop thread; the emitter may not be used after."""
        with self._lock:
            loop, emitter, self._loop, self._emitter = self._loop, self._emitter, None, None
            thread, self._thread = self._thread, None
        if loop is None or emitter is None or thread is None or self._pid != os.getpid():
            return
        try:
            closing = asyncio.run_coroutine_threadsafe(emitter.aclose(), loop)
            closing.result(self.timeout + GRACE)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(self.timeout + GRACE)
            if not thread.is_alive():
                loop.close()

    def __enter__(self) -> Emitter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, work: Callable[[AsyncEmitter], Coroutine[Any, Any, T]], steps: int = 1) -> T:
        loop, emitter = self._started()
        future = asyncio.run_coroutine_threadsafe(work(emitter), loop)
        return _result(future, self.timeout * steps)

    def _iterate(self, pages: Callable[[AsyncEmitter], AsyncIterator[list[T]]]) -> Iterator[T]:
        """The items of a paged query, waiting for one page at a time: each page is a
        few Redis steps, each bounded by ``timeout``, however many pages match nothing."""
        loop, emitter = self._started()
        source = pages(emitter)
        while True:
            future = asyncio.run_coroutine_threadsafe(_next(source), loop)
            done, page = _result(future, self.timeout)
            if done:
                return
            yield from cast(list[T], page)

    def _started(self) -> tuple[asyncio.AbstractEventLoop, AsyncEmitter]:
        if self._pid != os.getpid():  # a forked child: the parent's lock may be held
            self._lock = threading.Lock()
        with self._lock:
            if self._loop is None or self._emitter is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="quart-wslb-emitter", daemon=True
                )
                self._thread.start()
                self._emitter = AsyncEmitter.from_options(
                    self.options, origin=self._origin, strict=self.strict
                )
                self._emitter.timestamps = self._timestamps  # a new one after a fork too
            return self._loop, self._emitter


async def _next(agen: AsyncIterator[T]) -> tuple[bool, T | None]:
    try:
        return False, await agen.__anext__()
    except StopAsyncIteration:
        return True, None


def _result(future: concurrent.futures.Future[T], timeout: float) -> T:
    """Wait for a call; each of its Redis steps is bounded by ``timeout`` already, so
    this only guards against a loop that stopped answering at all."""
    try:
        return future.result(timeout * LOOP_PATIENCE + GRACE)
    except TimeoutError as error:
        future.cancel()
        raise RedisUnavailableError("the emitter's event loop did not answer") from error
