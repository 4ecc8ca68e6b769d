"""A small round-robin front for the example cluster, standing in for nginx.

It reads each request's head, picks the next instance, and then pipes bytes both ways
until either side closes, the way nginx proxies a WebSocket after the upgrade. Plain HTTP
requests get ``Connection: close``, so that every request is balanced on its own rather
than riding a kept-alive connection to one instance. WebSocket handshakes and HTTP
requests each take their turn in a rotation of their own (like two nginx ``upstream``
blocks over the same servers), so the first two chat tabs land on different instances
whatever the page fetched over HTTP. An instance that refuses the TCP connection is
skipped, and left out for ``FAIL_TIMEOUT`` seconds, as nginx's ``proxy_next_upstream
error`` and ``fail_timeout`` do; when every instance fails, the client gets 502.

``python -m example_app.front PORT HOST:PORT [HOST:PORT ...]`` runs it on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ("Backend", "Front", "FrontThread")

log = logging.getLogger("example_app.front")
#: Seconds a client has to send its request head, and the front to reach an instance.
HEAD_TIMEOUT, CONNECT_TIMEOUT = 10.0, 3.0
#: Seconds an instance that refused a connection is left out of the rotation.
FAIL_TIMEOUT = 10.0
#: Longest request head accepted (the StreamReader limit).
HEAD_LIMIT = 64 * 1024
#: Headers that concern one hop only; the front sets its own ``Connection``.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection"})
BAD_GATEWAY = (
    b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain\r\ncontent-length: 26\r\n"
    b"connection: close\r\n\r\nno instance is reachable.\n"
)


@dataclass(frozen=True, slots=True)
class Backend:
    """One instance behind the front."""

    name: str
    host: str
    port: int


class _Rotation:
    """Round robin over the backends: each call starts one further along."""

    def __init__(self, backends: Sequence[Backend]) -> None:
        self._backends = list(backends)
        self._next = 0

    def turn(self) -> list[Backend]:
        """Every backend, starting with the one whose turn it is."""
        start = self._next
        self._next = (self._next + 1) % len(self._backends)
        return self._backends[start:] + self._backends[:start]


class Front:
    """The proxy: ``await front.start()``, then ``front.port``; ``await front.close()``."""

    def __init__(
        self,
        backends: Sequence[Backend],
        host: str = "127.0.0.1",
        port: int = 0,
        on_websocket: Callable[[str, Backend], None] | None = None,
    ) -> None:
        if not backends:
            raise ValueError("the front needs at least one backend")
        self.host = host
        self.port = port
        self._http = _Rotation(backends)
        self._websocket = _Rotation(backends)
        self._on_websocket = on_websocket
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Backend name -> loop time until which it is left out (after a failure).
        self._down: dict[str, float] = {}

    @property
    def url(self) -> str:
        """``http://HOST:PORT/`` (the port is known once started)."""
        return f"http://{self.host}:{self.port}/"

    async def start(self) -> None:
        """Listen; with port 0 a free port is taken, and ``port`` tells which."""
        self._server = await asyncio.start_server(
            self._accepted, self.host, self.port, limit=HEAD_LIMIT
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and end every proxied connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._proxy(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # a client or an instance went away: nothing to tell anyone
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(HEAD_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        request_line, *lines = head[:-4].split(b"\r\n")
        headers = [line.split(b":", 1) for line in lines if b":" in line]
        upgrade = any(
            name.strip().lower() == b"upgrade" and b"websocket" in value.lower()
            for name, value in headers
        )
        kept = [(n, v) for n, v in headers if n.strip().lower() not in HOP_BY_HOP]
        if upgrade:
            kept.append((b"Connection", b" Upgrade"))
        else:
            kept.append((b"Connection", b" close"))
        peer = writer.get_extra_info("peername")
        if isinstance(peer, tuple):
            kept.append((b"X-Forwarded-For", b" " + str(peer[0]).encode()))
        forwarded = b"\r\n".join([request_line, *(n + b":" + v for n, v in kept)]) + b"\r\n\r\n"
        connected = await self._connect(self._websocket if upgrade else self._http)
        if connected is None:
            writer.write(BAD_GATEWAY)
            await writer.drain()
            return
        backend, up_reader, up_writer = connected
        if upgrade and self._on_websocket is not None:
            self._on_websocket(request_line.decode("latin-1"), backend)
        try:
            up_writer.write(forwarded)
            await _both_ways(reader, writer, up_reader, up_writer)
        finally:
            up_writer.close()

    async def _connect(
        self, rotation: _Rotation
    ) -> tuple[Backend, asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A connection to the backend whose turn it is, or to the next that answers."""
        now = asyncio.get_running_loop().time()
        turn = rotation.turn()
        # Instances that failed lately go last: tried only if every other one fails.
        for backend in sorted(turn, key=lambda b: self._down.get(b.name, 0.0) > now):
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    up_reader, up_writer = await asyncio.open_connection(
                        backend.host, backend.port
                    )
            except (OSError, TimeoutError) as error:
                if self._down.get(backend.name, 0.0) <= now:
                    log.warning(
                        "front: %s is unreachable (%s); left out for %.0fs",
                        backend.name,
                        error,
                        FAIL_TIMEOUT,
                    )
                self._down[backend.name] = now + FAIL_TIMEOUT
                continue
            self._down.pop(backend.name, None)
            return backend, up_reader, up_writer
        return None


async def _both_ways(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    """Pipe client <-> instance until either side closes, then close both."""
    pipes = [
        asyncio.create_task(_pipe(reader, up_writer)),
        asyncio.create_task(_pipe(up_reader, writer)),
    ]
    try:
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pipe in pipes:
            pipe.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while chunk := await source.read(65536):
            sink.write(chunk)
            await sink.drain()


class FrontThread:
    """A :class:`Front` on an event loop of its own, in a daemon thread.

    The launcher's own code is synchronous (it starts and waits for processes), so the
    front runs beside it: ``start()`` returns once it listens, ``stop()`` ends it.
    """

    def __init__(self, front: Front) -> None:
        self.front = front
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="example-front", daemon=True)

    def start(self, timeout: float = 5.0) -> None:
        """Start the thread and wait until the front listens; raise if it cannot."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the front did not start within {timeout:.0f}s")
        if self._error is not None:
            raise RuntimeError(f"the front could not start: {self._error}")

    def stop(self, timeout: float = 5.0) -> None:
        """Close the front and wait for its thread (a no-op if it never started)."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(stopping.set)
            self._thread.join(timeout)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            await self.front.start()
        except OSError as error:
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self.front.close()


def _backend(text: str, index: int) -> Backend:
    host, _, port = text.rpartition(":")
    return Backend(f"instance-{index}", host or "127.0.0.1", int(port))


async def _serve(port: int, backends: list[Backend]) -> None:
    front = Front(backends, port=port, on_websocket=_print_route)
    await front.start()
    print(f"front on {front.url} -> " + ", ".join(f"{b.host}:{b.port}" for b in backends))
    try:
        await asyncio.Event().wait()
    finally:
        await front.close()


def _print_route(request_line: str, backend: Backend) -> None:
    print(f"front: {request_line.split(' ')[1]} -> {backend.name}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python -m example_app.front PORT HOST:PORT [HOST:PORT ...]")
    targets = [_backend(arg, i) for i, arg in enumerate(sys.argv[2:], 1)]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(int(sys.argv[1]), targets))
