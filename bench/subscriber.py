"""The receiving side alone: CPU per message of the receiver's subscriber loop.

Starts a private ``redis-server`` and runs a ``Receiver`` in this process with
``--connections`` local connections whose ``offer`` only counts. A publisher process
sends ``--messages`` envelopes (``text``, one target each, a ``--payload``-byte frame) as
pipelined ``PUBLISH`` batches, packed before the clock starts and written to a raw
socket, so that it needs little of the two cores; flat out, or paced at ``--rate``
messages per second. Each run measures this process from the publisher's start to the
last envelope dispatched: CPU µs per message (``time.process_time``) and messages per
second. Runs alternate the lean reader
(:mod:`quart_wslb.subscriber`) with the ``PubSub.get_message`` loop it replaced (kept
here as ``LegacyReceiver``), ``--repeat`` times each. With ``--writers`` the local
connections are real :class:`~quart_wslb.connection.Connection` objects (a bounded queue
and a writer task each) whose ASGI send only counts: all of quart-wslb's receiving path,
without the server's cost of writing a frame.

    .venv/bin/python -m bench.subscriber [--messages 50000] [--repeat 5] [--rate 14000]
                                         [--writers]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import secrets
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from typing import cast

import hiredis
from quart.wrappers import Websocket
from redis.asyncio import Redis

from quart_wslb import signals
from quart_wslb.connection import Activity, Connection, Membership
from quart_wslb.envelope import Envelope, Frame, encode
from quart_wslb.keys import Keys
from quart_wslb.local_index import LocalIndex
from quart_wslb.receiver import BACKOFF_MAX, BACKOFF_MIN, READ_TIMEOUT, Receiver, log
from quart_wslb.redis_client import make_client
from quart_wslb.signal_sender import SignalSender
from quart_wslb.testing import RedisServer

__all__ = ("LegacyReceiver", "Result", "measure", "publish")

INSTANCE = "i1"
KEYS = Keys("bench-sub")
#: PUBLISH commands per pipelined write.
BATCH = 500
#: The longest a run may take before it counts as failed.
BUDGET = 120.0


class LegacyReceiver(Receiver):
    """The receiver with the loop it had before the lean reader, for comparison."""

    async def run(self) -> None:
        """The former ``Receiver.run``: one ``PubSub.get_message`` per message."""
        channels = (self._keys.channel(self._instance), self._keys.broadcast)
        delay = BACKOFF_MIN
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(*channels)
                    self._subscribed()
                    delay = BACKOFF_MIN
                    while not self._restart:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=READ_TIMEOUT
                        )
                        if message is not None and message["type"] == "message":
                            self.last_message = time.monotonic()
                            await self._dispatch_guarded(message["data"])
                self.subscribed.clear()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.subscribed.clear()
                log.warning("subscriber lost (%r); subscribing again in %.2fs", error, delay)
                await self._sender.send(signals.subscriber_lost, error=error)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, BACKOFF_MAX)


class Tally:
    """Counts offers across all local connections; ``done`` once ``total`` arrived."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.done = asyncio.Event()


class Counting:
    """A local connection that only counts what it is offered."""

    def __init__(self, id: str, tally: Tally) -> None:
        self.id = id
        self.user = None
        self.path = "/"
        self.metadata: dict[str, str] = {}
        self.groups: set[str] = set()
        self._tally = tally

    def put_nowait(self, frame: Frame) -> bool:
        tally = self._tally
        tally.count += 1
        if tally.count == tally.total:
            tally.done.set()
        return True

    async def offer(self, frame: Frame, message_id: str | None) -> bool:
        return self.put_nowait(frame)


def writer(id: str, tally: Tally) -> Connection:
    """A real connection, queue and writer task included, whose ASGI send only counts."""

    async def send(event: object) -> None:
        tally.count += 1
        if tally.count == tally.total:
            tally.done.set()

    activity = Activity(send=send)
    activity.accepted.set()
    connection = Connection(
        id=id,
        user=None,
        path="/ws",
        instance=INSTANCE,
        metadata={},
        websocket=cast(Websocket, None),
        queue_size=64,
        policy="drop",
        sender=SignalSender(None),
        membership=cast(Membership, None),  # never joins a group
        activity=activity,
    )
    connection.start()
    return connection


def envelopes(targets: Sequence[str], count: int, payload: int) -> list[bytes]:
    """``count`` envelopes as the route script publishes them, one target each."""
    frame = ("x" * payload)[:payload]
    return [
        encode(
            Envelope(
                id=secrets.token_urlsafe(12),
                origin="i2",
                kind="text",
                targets=[targets[n % len(targets)]],
                frame=frame,
            )
        )
        for n in range(count)
    ]


def publish(
    port: int, channel: str, messages: list[bytes], rate: int, ready: Event, go: Event
) -> None:
    """The publisher process: pack every batch, then write them as fast as Redis reads
    (``rate`` 0) or at ``rate`` messages per second, a batch every millisecond."""
    name = channel.encode()
    command = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
    size = max(1, rate // 1000) if rate else BATCH
    batches = [
        (b"".join(command % (len(name), name, len(m), m) for m in chunk), len(chunk))
        for chunk in (messages[i : i + size] for i in range(0, len(messages), size))
    ]
    with socket.create_connection(("127.0.0.1", port)) as sock:
        reader = hiredis.Reader()
        ready.set()
        go.wait()
        started = time.perf_counter()
        for n, (blob, count) in enumerate(batches):
            if rate:
                time.sleep(max(0.0, started + n * size / rate - time.perf_counter()))
            sock.sendall(blob)
            while count:
                reader.feed(sock.recv(1 << 16))
                while count and reader.gets() is not False:
                    count -= 1


@dataclass(frozen=True)
class Result:
    """One run: which loop, CPU µs per message of this process, messages per second."""

    loop: str
    cpu_us: float
    rate: float


async def measure(
    server: RedisServer,
    legacy: bool,
    messages: list[bytes],
    connections: int,
    rate: int,
    writers: bool = False,
) -> Result:
    """Run one receiver (lean or legacy) while a publisher process sends ``messages``."""
    redis: Redis = make_client(server.url, 5.0)
    tally = Tally(len(messages))
    ids = [f"{INSTANCE}:{n}" for n in range(connections)]
    local = LocalIndex(KEYS)
    for id in ids:
        local.add(writer(id, tally) if writers else cast(Connection, Counting(id, tally)))
    receiver = (LegacyReceiver if legacy else Receiver)(
        redis, KEYS, INSTANCE, local, SignalSender(None)
    )
    task = asyncio.create_task(receiver.run())
    context = multiprocessing.get_context("spawn")
    ready, go = context.Event(), context.Event()
    channel = KEYS.channel(INSTANCE)
    process = context.Process(
        target=publish, args=(server.port, channel, messages, rate, ready, go), daemon=True
    )
    try:
        await asyncio.wait_for(receiver.subscribed.wait(), 10)
        process.start()
        if not await asyncio.to_thread(ready.wait, 30):
            raise RuntimeError("the publisher did not start")
        cpu, wall = time.process_time(), time.perf_counter()
        go.set()
        await asyncio.wait_for(tally.done.wait(), BUDGET)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if writers:
            for connection in local.values():
                await connection.stop()
        await redis.aclose()
        await asyncio.to_thread(process.join, 30)
    loop = "legacy PubSub.get_message" if legacy else "lean reader"
    return Result(loop, cpu / len(messages) * 1e6, len(messages) / wall)


async def run(args: argparse.Namespace) -> list[Result]:
    """Every run, alternating the two loops, on one private Redis."""
    ids = [f"{INSTANCE}:{n}" for n in range(args.connections)]
    messages = envelopes(ids, args.messages, args.payload)
    print(
        f"{args.messages} envelopes of {statistics.mean(map(len, messages)):.0f} bytes "
        f"({args.payload}-byte frame), {args.connections} local connections, "
        + (f"{args.rate:,} msg/s" if args.rate else "as fast as possible")
    )
    results: list[Result] = []
    with RedisServer() as server:
        admin = Redis.from_url(server.url)
        # A lagging subscriber must not be cut off by the output buffer limit.
        await admin.config_set("client-output-buffer-limit", "pubsub 0 0 0")
        await admin.aclose()
        for n in range(args.repeat):
            for legacy in (True, False):
                result = await measure(
                    server, legacy, messages, args.connections, args.rate, args.writers
                )
                print(
                    f"  run {n + 1} {result.loop:<26} {result.cpu_us:7.2f} µs CPU/msg "
                    f"{result.rate:9,.0f} msg/s",
                    flush=True,
                )
                results.append(result)
    return results


def summary(results: list[Result]) -> str:
    """Median and range per loop, and the lean reader's share of the legacy CPU."""
    lines = []
    medians: dict[str, float] = {}
    for loop in dict.fromkeys(r.loop for r in results):
        cpu = [r.cpu_us for r in results if r.loop == loop]
        rate = [r.rate for r in results if r.loop == loop]
        medians[loop] = statistics.median(cpu)
        lines.append(
            f"{loop:<26} median {statistics.median(cpu):6.2f} µs CPU/msg "
            f"(range {min(cpu):.2f}-{max(cpu):.2f}), median {statistics.median(rate):,.0f} "
            f"msg/s (range {min(rate):,.0f}-{max(rate):,.0f})"
        )
    old, new = medians.get("legacy PubSub.get_message"), medians.get("lean reader")
    if old and new:
        lines.append(f"lean / legacy CPU per message: {new / old:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.subscriber", description=__doc__)
    parser.add_argument("--messages", type=int, default=50_000, help="M, per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each loop")
    parser.add_argument("--connections", type=int, default=200, help="local connections")
    parser.add_argument("--payload", type=int, default=200, help="frame bytes")
    parser.add_argument("--rate", type=int, default=0, help="msg/s to publish (0: flat out)")
    parser.add_argument(
        "--writers", action="store_true", help="real connections with a no-op ASGI send"
    )
    results = asyncio.run(run(parser.parse_args()))
    print(summary(results))


if __name__ == "__main__":
    main()
