"""A TCP proxy in front of Redis that can make subscribers go silent.

A "silently dead" subscriber is one whose connection stays up while nothing reaches it
(a half-open TCP connection, a stuck proxy or NAT entry): no error ever tells the loop.
``freeze()`` makes every connection that has sent ``SUBSCRIBE`` so far stop receiving;
connections made afterwards pass everything.
"""

from __future__ import annotations

import asyncio
import contextlib


class FreezingProxy:
    """``async with FreezingProxy(port) as proxy:`` then connect to ``proxy.port``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        #: Connections that sent SUBSCRIBE, by the order they were made.
        self.subscribers: list[int] = []
        self._frozen: set[int] = set()
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self._count = 0

    async def __aenter__(self) -> FreezingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    def freeze(self) -> list[int]:
        """Silence every subscriber connection made so far; returns which."""
        self._frozen.update(self.subscribers)
        return sorted(self._frozen)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._count += 1
        number = self._count
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        for pump in (
            self._pump(reader, up_writer, number, upstream=True),
            self._pump(up_reader, writer, number, upstream=False),
        ):
            task = asyncio.create_task(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, number: int, upstream: bool
    ) -> None:
        try:
            while data := await source.read(1 << 16):
                if upstream and b"SUBSCRIBE" in data.upper() and number not in self.subscribers:
                    self.subscribers.append(number)
                if not upstream and number in self._frozen:
                    continue  # swallowed: the connection stays up and hears nothing
                sink.write(data)
                await sink.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            sink.close()
