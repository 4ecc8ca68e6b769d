"""Real WebSocket clients of the benchmark, and what they received.

Both systems are read by the same code, one ``websockets`` connection per user, with
compression and keepalive pings off. A quart-wslb client reads plain text frames; a
Socket.IO client speaks Engine.IO v4 over a WebSocket (open packet, ``40`` connect with
``auth``, ``42["m", text]`` events, ``3`` in answer to the server's ``2``), which is
what python-socketio's own client does once upgraded, minus its event dispatch.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

__all__ = ("Pool", "Receipts")

CONNECT_TIMEOUT = 20.0
#: Text before the payload of a Socket.IO event ``m``: ``42["m","``.
EVENT_PREFIX = '42["m","'


class Receipts:
    """Latencies and counts of one measured run."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.first_sent = 0
        self.last_received = 0
        self.latencies_ns: list[int] = []
        self.done = asyncio.Event()
        if expected <= 0:
            self.done.set()

    def add(self, sent: int, received: int) -> None:
        """One message, sent and received at these ``time.time_ns()`` values."""
        if not self.count or sent < self.first_sent:
            self.first_sent = sent
        self.last_received = max(self.last_received, received)
        self.latencies_ns.append(received - sent)
        self.count += 1
        if self.count >= self.expected:
            self.done.set()


class Pool:
    """Clients of one system, all on one instance."""

    def __init__(self, system: str, port: int) -> None:
        if system not in ("quart-wslb", "python-socketio"):
            raise ValueError(f"unknown system {system!r}")
        self.sio = system == "python-socketio"
        self.port = port
        self.clients: list[ClientConnection] = []
        self.readers: list[asyncio.Task[None]] = []
        self.receipts: Receipts | None = None

    async def connect(self, users: Sequence[str], concurrency: int = 64) -> float:
        """Connect one client per user (``concurrency`` handshakes at a time), each
        ready to receive; returns the seconds it took."""
        gate = asyncio.Semaphore(concurrency)
        start = time.perf_counter()

        async def one(user: str) -> None:
            async with gate:
                client = await asyncio.wait_for(self._open(user), CONNECT_TIMEOUT)
            self.clients.append(client)
            self.readers.append(asyncio.create_task(self._read(client)))

        await asyncio.gather(*(one(u) for u in users))
        return time.perf_counter() - start

    async def _open(self, user: str) -> ClientConnection:
        base = f"ws://127.0.0.1:{self.port}"
        options = {"compression": None, "ping_interval": None, "max_queue": None}
        if not self.sio:
            client = await connect(f"{base}/ws?user={user}", **options)  # type: ignore[arg-type]
            ready = await client.recv()
            if ready != "ready":
                raise RuntimeError(f"unexpected first frame {ready!r}")
            return client
        client = await connect(f"{base}/socket.io/?EIO=4&transport=websocket", **options)  # type: ignore[arg-type]
        opened = await client.recv()
        if not isinstance(opened, str) or not opened.startswith("0"):
            raise RuntimeError(f"unexpected Engine.IO open packet {opened!r}")
        await client.send("40" + json.dumps({"user": user}))
        while True:  # the namespace connect answer; the room is joined by then
            frame = await client.recv()
            if isinstance(frame, str) and frame.startswith("40"):
                return client
            if frame == "2":
                await client.send("3")

    async def _read(self, client: ClientConnection) -> None:
        sio = self.sio
        try:
            async for frame in client:
                now = time.time_ns()
                if not isinstance(frame, str):
                    continue
                if sio:
                    if frame == "2":
                        await client.send("3")
                        continue
                    if not frame.startswith(EVENT_PREFIX):
                        continue
                    frame = frame[len(EVENT_PREFIX) :]
                receipts = self.receipts
                if receipts is not None:
                    receipts.add(int(frame[9:28]), now)
        except ConnectionClosed:
            return

    async def close(self, concurrency: int = 256) -> float:
        """Close every client (each waits for the close handshake); returns the seconds."""
        gate = asyncio.Semaphore(concurrency)
        start = time.perf_counter()

        async def one(client: ClientConnection) -> None:
            async with gate:
                try:
                    await asyncio.wait_for(client.close(), 10)
                except (TimeoutError, OSError):
                    pass

        await asyncio.gather(*(one(c) for c in self.clients))
        elapsed = time.perf_counter() - start
        for reader in self.readers:
            reader.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        self.clients.clear()
        self.readers.clear()
        return elapsed
