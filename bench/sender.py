"""The sending side alone: CPU per ``AsyncEmitter.send`` and Redis time per routed message.

Starts a private ``redis-server``, registers ``--users`` connections of one instance
through ``Registry`` (one user each), and has a subscriber process (``redis-cli``, or a
Python one when ``redis-cli`` is not on ``PATH``) hear that instance's channel, so that
every send is routed and published. Then ``--senders`` coroutines in this process share
``--messages`` sends of a ``--payload``-character text to those users, as the
benchmark's sending instance does. Each run reports this process's CPU µs per send
(``time.process_time``), sends per second, and from Redis's ``INFO commandstats`` the
``EVALSHA`` calls and Redis's time per routed message (what ``send.lua`` costs inside
Redis, network excluded).

    .venv/bin/python -m bench.sender [--messages 40000] [--senders 32] [--repeat 3]

``--compare`` instead sends ``--messages`` (10,000 by default then) messages three ways
per run: a loop of ``await send`` (one in flight), ``--senders`` concurrent senders, and
one ``send_many`` of them all; it prints each one's sends/s and the ratio of
``send_many`` to the concurrent senders.

    .venv/bin/python -m bench.sender --compare [--messages 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time

from redis.asyncio import Redis

from bench.capacity import socketless
from bench.fire import user_name
from quart_wslb import UserSelector
from quart_wslb.emitter import AsyncEmitter
from quart_wslb.keys import Keys
from quart_wslb.registry import Registry
from quart_wslb.testing import RedisServer

__all__ = ("measure",)

PREFIX = "bench-send"
INSTANCE = "i0"
#: The longest a run may take.
BUDGET = 120.0


async def measure(emitter: AsyncEmitter, redis: Redis, args: argparse.Namespace) -> str:
    """One run: ``args.messages`` sends from ``args.senders`` coroutines; one line."""
    counter = iter(range(args.messages))
    text = "x" * args.payload

    async def sender() -> None:
        for i in counter:
            await emitter.send(UserSelector(user_name(i % args.users)), text)

    await redis.config_resetstat()
    cpu, start = time.process_time(), time.perf_counter()
    async with asyncio.timeout(BUDGET):
        await asyncio.gather(*(sender() for _ in range(args.senders)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    evalsha = (await redis.info("commandstats")).get("cmdstat_evalsha", {})
    calls, usec = int(evalsha.get("calls", 0)), float(evalsha.get("usec", 0))
    return (
        f"{args.messages / elapsed:8.0f} sends/s  {cpu * 1e6 / args.messages:6.2f} us CPU/send  "
        f"{calls:6d} EVALSHA  {usec / args.messages:5.2f} us Redis/message"
    )


async def compare(emitter: AsyncEmitter, args: argparse.Namespace) -> str:
    """One run of ``--compare``: sends/s of a loop, of concurrent senders, of send_many."""
    text = "x" * args.payload
    pairs = [(UserSelector(user_name(i % args.users)), text) for i in range(args.messages)]

    async def senders(count: int) -> None:
        work = iter(pairs)

        async def sender() -> None:
            for selector, message in work:
                await emitter.send(selector, message)

        await asyncio.gather(*(sender() for _ in range(count)))

    async def many(_: int) -> None:
        await emitter.send_many(pairs)

    rates = []
    for way, count in ((senders, 1), (senders, args.senders), (many, 0)):
        start = time.perf_counter()
        async with asyncio.timeout(BUDGET):
            await way(count)
        rates.append(args.messages / (time.perf_counter() - start))
    loop, concurrent, batched = rates
    return (
        f"loop {loop:8.0f} sends/s  {args.senders} senders {concurrent:8.0f} sends/s  "
        f"send_many {batched:8.0f} sends/s  send_many/{args.senders} senders "
        f"{batched / concurrent:5.2f}"
    )


def listener(url: str, channel: str) -> subprocess.Popen[bytes]:
    """A process subscribed to ``channel`` that discards what it hears."""
    if shutil.which("redis-cli"):
        argv = ["redis-cli", "-u", url, "subscribe", channel]
    else:
        code = (
            "import sys, redis; p = redis.Redis.from_url(sys.argv[1]).pubsub(); "
            "p.subscribe(sys.argv[2]); [None for _ in p.listen()]"
        )
        argv = [sys.executable, "-c", code, url, channel]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL)


async def run(args: argparse.Namespace) -> None:
    with RedisServer() as server:
        redis = Redis.from_url(server.url)
        keys = Keys(PREFIX)
        await Registry(redis, keys).register(*(socketless(n, INSTANCE) for n in range(args.users)))
        await redis.set(keys.heartbeat(INSTANCE), "1")
        await redis.hset(keys.instances, INSTANCE, "{}")
        heard = listener(server.url, keys.channel(INSTANCE))
        emitter = AsyncEmitter(redis, prefix=PREFIX, origin="i1")
        try:
            while not (await redis.pubsub_numsub(keys.channel(INSTANCE)))[0][1]:
                await asyncio.sleep(0.05)
            await emitter.send(UserSelector(user_name(0)), "warm-up")  # script, layout
            for _ in range(args.repeat):
                if args.compare:
                    print(await compare(emitter, args), flush=True)
                else:
                    print(await measure(emitter, redis, args), flush=True)
        finally:
            heard.kill()
            heard.wait(10)
            await emitter.aclose()
            await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sender", description=__doc__)
    parser.add_argument("--messages", type=int, help="sends per run (40,000; 10,000 to compare)")
    parser.add_argument("--senders", type=int, default=32, help="sends in flight")
    parser.add_argument("--users", type=int, default=200, help="distinct users")
    parser.add_argument("--payload", type=int, default=200, help="characters per message")
    parser.add_argument("--repeat", type=int, default=3, help="runs")
    parser.add_argument(
        "--compare", action="store_true", help="a loop, concurrent senders, send_many"
    )
    args = parser.parse_args()
    if args.messages is None:
        args.messages = 10_000 if args.compare else 40_000
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
