"""``python -m bench.recovery``: what recovery mode costs a send, off against on, in one run.

    python -m bench.recovery            # 10,000 sends per figure, 5 rounds
    python -m bench.recovery --smoke    # seconds: what tests/test_bench.py runs

One private ``redis-server`` holds two prefixes. Under ``off`` no recovery session exists,
so ``send.lua`` only reads the history's missing meta hash (one ``HMGET`` per script
call). Under ``on``, one instance of ``bench/app.py`` holds a real recovery client
(``/rws``: the client's first frame is ``{"t": "resume"}``, it gets a welcome), so the
script appends every routed message to the history stream (``XADD``, plus ``HSET``,
``XTRIM`` and ``PEXPIRE`` per script call) and each envelope entry carries its ``pos``.
Under each prefix, as in :mod:`bench.sender`, ``--users`` connections of instance ``i0``
are registered through ``Registry`` (no socket) and a ``redis-cli`` hears ``i0``'s channel.

Each round measures ``--messages`` sends of a ``--payload``-character text to those users,
in both regimes: one send in flight (a handler's loop of ``await send``) and ``--senders``
concurrent senders, four ways, all from this process:

- ``floor``: raw ``redis.asyncio`` ``PUBLISH`` of the text to a channel a ``redis-cli``
  hears;
- ``python-socketio``: ``AsyncRedisManager(write_only=True).emit("m", text, room=user)``,
  python-socketio's emitter outside a server (its channel heard by a ``redis-cli``);
- ``quart-wslb off`` and ``quart-wslb on``: ``AsyncEmitter.send(UserSelector(user), text)``
  under each prefix.

Per way: sends per second; this process's CPU µs per send (``time.process_time``);
``redis-server``'s CPU µs per send (psutil, 10 ms ticks; the instances' background work
is in it); Redis's time in the commands the way sends, per send (``INFO commandstats``:
``PUBLISH``, or ``EVALSHA``, whose time includes the commands the script runs; every
command's calls and time are in the JSON). Then delivery end to end: ``--delivered``
sends to the one client of each instance (a plain client on ``off``'s, ``/ws``; the
recovery client on ``on``'s, whose frames are ``{"t":"msg","pos":...,"d":...}``), per
regime: delivered messages per second (first send to last receipt) and the holding
instance's CPU µs per message. The instances' send queues hold ``QUEUE`` frames, so that
a client read late by this busy process is not closed for a full queue.

The order of the ways is reversed every other round, and each round first waits (up to
``--quiet-wait`` s) for the machine to be quiet; the tables give the median and the
range over ``--repeat`` rounds, and the cores other processes kept busy in each. Each
round also checks that ``on`` recorded exactly its sends in the history and that ``off``
has none. Writes ``recovery.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import socketio
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect

from bench.capacity import socketless
from bench.fire import user_name
from bench.procs import CpuMeter, LoadWatch, Server, start_servers, stop_all, wait_quiet
from bench.scenario import wait_subscribed
from bench.sender import listener
from quart_wslb import UserSelector
from quart_wslb.emitter import AsyncEmitter
from quart_wslb.keys import Keys
from quart_wslb.registry import Registry
from quart_wslb.testing import RedisServer

__all__ = ("main",)

OUT = Path(__file__).resolve().parent / "out"
OFF, ON = "bench-rec-off", "bench-rec-on"
#: The instance whose socketless connections the sends go to, under each prefix.
INSTANCE = "i0"
FLOOR_CHANNEL, PEER_CHANNEL = "bench-floor", "socketio-bench"
#: The longest one measurement may take.
BUDGET = 180.0
#: Commands of the measurement itself, left out of Redis's command time.
OURS = ("cmdstat_config", "cmdstat_info")
#: The commands each way sends itself: Redis counts a script's own commands apart as
#: well as in its ``EVALSHA``'s time, so only these add up to the way's Redis time.
SENT = {"floor": ("publish",), "python-socketio": ("publish",)}
SCRIPT = ("evalsha", "eval")
#: The instances' send queue, in frames: a saturated delivery to one client in this busy
#: process must not fill it (a full queue closes a recovery connection, 1013).
QUEUE = 65_536
#: Sends of each way before the first round (scripts loaded, connections made).
WARMUP = 200
WAYS = ("floor", "python-socketio", "quart-wslb off", "quart-wslb on")
#: The two regimes' names, by sends in flight (1, else --senders).
LOOP = "1 in flight"

Send = Callable[[int], Awaitable[object]]


@dataclass
class Holder:
    """One instance and its one client: ``recovery`` tells how its frames are wrapped."""

    server: Server
    client: ClientConnection
    user: str
    recovery: bool
    received: int = 0
    expected: int = 0
    last: float = 0.0
    done: asyncio.Event | None = None
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        try:
            async for frame in self.client:
                if self.recovery and not (
                    isinstance(frame, str) and frame.startswith('{"t":"msg"')
                ):
                    raise RuntimeError(f"unexpected frame on the recovery route: {frame!r:.200}")
                self.received += 1
                if self.done is not None and self.received >= self.expected:
                    self.last = time.perf_counter()
                    self.done.set()
        finally:  # closed: whoever waits is told at once
            if self.done is not None:
                self.done.set()


async def open_client(server: Server, user: str, recovery: bool) -> Holder:
    """A client of ``server`` as ``user`` (on the recovery route if ``recovery``), ready."""
    path = f"/rws?user={user}" if recovery else f"/ws?user={user}"
    client = await connect(f"ws://127.0.0.1:{server.port}{path}", compression=None)
    if recovery:
        await client.send('{"t": "resume"}')
        welcome = json.loads(await client.recv())
        if welcome.get("t") != "welcome":
            raise RuntimeError(f"no welcome: {welcome}")
        ready = json.loads(await client.recv())
        if ready != {"t": "msg", "d": "ready"}:
            raise RuntimeError(f"not ready: {ready}")
    elif await client.recv() != "ready":
        raise RuntimeError("not ready")
    holder = Holder(server, client, user, recovery)
    holder.reader = asyncio.create_task(holder.read())
    return holder


async def run_senders(send: Send, count: int, senders: int) -> float:
    """``count`` sends from ``senders`` coroutines; the seconds they took."""
    counter = iter(range(count))

    async def sender() -> None:
        for i in counter:
            await send(i)

    start = time.perf_counter()
    async with asyncio.timeout(BUDGET):
        await asyncio.gather(*(sender() for _ in range(senders)))
    return time.perf_counter() - start


async def timed(
    send: Send, top: tuple[str, ...], count: int, senders: int, admin: Redis, redis_cpu: CpuMeter
) -> dict[str, Any]:
    """One measurement of the send path: rate, CPU here and in Redis, Redis's time."""
    await admin.config_resetstat()
    redis0, cpu0 = redis_cpu.read(), time.process_time()
    elapsed = await run_senders(send, count, senders)
    cpu, redis = time.process_time() - cpu0, redis_cpu.read() - redis0
    stats = await admin.info("commandstats")
    commands = {k.removeprefix("cmdstat_"): (int(v["calls"]), float(v["usec"]))
                for k, v in stats.items() if k not in OURS}  # fmt: skip
    usec = sum(commands.get(name, (0, 0.0))[1] for name in top)
    return {
        "sends_per_s": count / elapsed,
        "cpu_us": cpu * 1e6 / count,
        "redis_cpu_us": redis * 1e6 / count,
        "redis_us": usec / count,
        "commands": commands,
    }


async def delivered(
    emitter: AsyncEmitter, holder: Holder, text: str, count: int, senders: int, redis_cpu: CpuMeter
) -> dict[str, float]:
    """``count`` sends to ``holder``'s client: delivered/s, the holder's CPU per message."""
    if holder.reader is None or holder.reader.done():
        raise RuntimeError(f"{holder.user}: its connection is closed")
    holder.received, holder.expected, holder.done = 0, count, asyncio.Event()
    meter = CpuMeter(holder.server.pids())
    cpu0, redis0 = meter.read(), redis_cpu.read()
    selector = UserSelector(holder.user)
    start = time.perf_counter()
    await run_senders(lambda _: emitter.send(selector, text), count, senders)
    async with asyncio.timeout(BUDGET):
        await holder.done.wait()
    if holder.received < count:
        raise RuntimeError(
            f"{holder.user}: {holder.received} of {count} delivered, closed with "
            f"{holder.client.close_code} {holder.client.close_reason!r}"
        )
    cpu, redis = meter.read() - cpu0, redis_cpu.read() - redis0
    holder.done = None
    return {
        "delivered_per_s": count / (holder.last - start),
        "holder_cpu_us": cpu * 1e6 / count,
        "redis_cpu_us": redis * 1e6 / count,
    }


async def history(admin: Redis, prefix: str) -> tuple[int, int]:
    """The history's last sequence number and length under ``prefix`` (0, 0: none)."""
    keys = Keys(prefix)
    seq = await admin.hget(keys.history_meta, "s")
    return int(seq or 0), int(await admin.xlen(keys.history))


async def setup_prefix(redis: Redis, prefix: str, users: int) -> None:
    """``users`` socketless connections of ``INSTANCE`` under ``prefix``, announced."""
    keys = Keys(prefix)
    await Registry(redis, keys).register(*(socketless(n, INSTANCE) for n in range(users)))
    await redis.set(keys.heartbeat(INSTANCE), "1")
    await redis.hset(keys.instances, INSTANCE, "{}")


def median_range(values: list[float]) -> str:
    digits = 0 if statistics.median(values) >= 100 else 1 if statistics.median(values) >= 10 else 2
    low, mid, high = min(values), statistics.median(values), max(values)
    if len(values) == 1:
        return f"{mid:,.{digits}f}"
    return f"{mid:,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"


def report(results: dict[str, Any]) -> str:
    """The tables: medians (ranges) per regime and way, the ratios, the delivery."""
    rounds = results["rounds"]
    foreign = ", ".join(f"{r['foreign_cores']:.2f}" for r in rounds)
    lines = [
        f"{len(rounds)} round(s) of {results['params']['messages']:,} sends per figure; median "
        f"(min-max); cores kept busy by other processes, per round: {foreign}"
    ]
    header = f"{'regime':<14}{'way':<17}{'sends/s':>24}{'CPU µs/send':>22}"
    header += f"{'Redis CPU µs/send':>22}{'Redis cmd µs/send':>22}"
    lines += ["", header]
    for regime in results["regimes"]:
        for way in WAYS:
            rows = [r["send"][regime][way] for r in rounds]
            lines.append(
                f"{regime:<14}{way:<17}"
                + "".join(
                    f"{median_range([row[k] for row in rows]):>{w}}"
                    for k, w in (
                        ("sends_per_s", 24),
                        ("cpu_us", 22),
                        ("redis_cpu_us", 22),
                        ("redis_us", 22),
                    )
                )  # fmt: skip
            )
    lines += ["", "ratios, per round then median (min-max):"]
    for regime in results["regimes"]:
        per = [r["send"][regime] for r in rounds]

        def ratio(a: str, b: str, key: str, rows: list[dict[str, Any]] = per) -> str:
            return median_range([row[a][key] / row[b][key] for row in rows])

        def delta(key: str, rows: list[dict[str, Any]] = per) -> str:
            return median_range(
                [row["quart-wslb on"][key] - row["quart-wslb off"][key] for row in rows]
            )

        lines.append(
            f"{regime:<14}sends/s on/off {ratio('quart-wslb on', 'quart-wslb off', 'sends_per_s')}"
            f"; CPU µs/send on-off {delta('cpu_us')}; Redis CPU on-off {delta('redis_cpu_us')}"
            f"; Redis cmd on-off {delta('redis_us')}"
        )
        lines.append(
            f"{'':<14}sends/s off/peer {ratio('quart-wslb off', 'python-socketio', 'sends_per_s')}"
            f", on/peer {ratio('quart-wslb on', 'python-socketio', 'sends_per_s')}"
            f", off/floor {ratio('quart-wslb off', 'floor', 'sends_per_s')}"
            f", on/floor {ratio('quart-wslb on', 'floor', 'sends_per_s')}"
        )
    lines += [
        "",
        f"delivery end to end ({results['params']['delivered']:,} messages to one client)",
    ]
    lines.append(f"{'regime':<14}{'client':<17}{'delivered/s':>24}{'holder CPU µs/msg':>22}"
                 f"{'Redis CPU µs/msg':>22}")  # fmt: skip
    for regime in results["regimes"]:
        for client in ("plain (off)", "recovery (on)"):
            rows = [r["delivery"][regime][client] for r in rounds]
            lines.append(
                f"{regime:<14}{client:<17}"
                f"{median_range([row['delivered_per_s'] for row in rows]):>24}"
                f"{median_range([row['holder_cpu_us'] for row in rows]):>22}"
                f"{median_range([row['redis_cpu_us'] for row in rows]):>22}"
            )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    text = "x" * args.payload
    regimes = {LOOP: 1, f"{args.senders} in flight": args.senders}
    listeners: list[subprocess.Popen[bytes]] = []
    servers: list[Server] = []
    holders: list[Holder] = []
    closers: list[Callable[[], Awaitable[object]]] = []
    with RedisServer() as redis_server, tempfile.TemporaryDirectory() as logs:
        if redis_server.process is None:
            raise RuntimeError("redis-server did not start")
        url = redis_server.url
        admin = Redis.from_url(url)
        closers.append(admin.aclose)
        redis_cpu = CpuMeter([redis_server.process.pid])
        try:
            for prefix in (OFF, ON):
                await setup_prefix(admin, prefix, args.users)
            channels = [FLOOR_CHANNEL, PEER_CHANNEL, Keys(OFF).channel(INSTANCE),
                        Keys(ON).channel(INSTANCE)]  # fmt: skip
            listeners += [listener(url, channel) for channel in channels]
            envs = [
                {"WSLB_REDIS_URL": url, "WSLB_PREFIX": prefix, "WSLB_INSTANCE_ID": f"h{k}",
                 "WSLB_SEND_QUEUE_SIZE": str(QUEUE), "BENCH_COUNT": "0"}
                for k, prefix in enumerate((OFF, ON))
            ]  # fmt: skip
            servers = await asyncio.to_thread(
                start_servers, 2, "hypercorn", "bench.app:app", envs, Path(logs)
            )
            await wait_subscribed(
                url, {**{c: 1 for c in channels}, Keys(OFF).channel("h0"): 1,
                      Keys(ON).channel("h1"): 1}
            )  # fmt: skip
            holders.append(await open_client(servers[0], "plain", recovery=False))
            holders.append(await open_client(servers[1], "rec", recovery=True))
            if await admin.exists(Keys(OFF).history_meta) or not await admin.exists(
                Keys(ON).history_meta
            ):
                raise RuntimeError("recovery should be on under ON only")

            floor = Redis.from_url(url)
            closers.append(floor.aclose)
            peer = socketio.AsyncRedisManager(url, channel=PEER_CHANNEL, write_only=True)
            off = AsyncEmitter(Redis.from_url(url), prefix=OFF, origin="s1")
            on = AsyncEmitter(Redis.from_url(url), prefix=ON, origin="s1")
            closers += [off.aclose, on.aclose]
            users = [user_name(i) for i in range(args.users)]
            selectors = [UserSelector(u) for u in users]

            async def floor_send(i: int) -> object:
                return await floor.publish(FLOOR_CHANNEL, text)

            async def peer_send(i: int) -> object:
                return await peer.emit("m", text, room=users[i % args.users], namespace="/")

            def wslb(emitter: AsyncEmitter) -> Send:
                async def send(i: int) -> object:
                    return await emitter.send(selectors[i % args.users], text)

                return send

            ways: dict[str, Send] = {
                "floor": floor_send, "python-socketio": peer_send,
                "quart-wslb off": wslb(off), "quart-wslb on": wslb(on),
            }  # fmt: skip
            for send in ways.values():
                await run_senders(send, WARMUP, 1)
            for emitter, holder in ((off, holders[0]), (on, holders[1])):
                await delivered(emitter, holder, text, WARMUP, 1, redis_cpu)

            rounds = []
            for number in range(args.repeat):
                order = list(ways) if number % 2 == 0 else list(reversed(ways))
                await asyncio.to_thread(wait_quiet, args.quiet_wait)
                row: dict[str, Any] = {"send": {}, "delivery": {}, "loadavg": os.getloadavg()}
                ours = [os.getpid(), redis_server.process.pid]
                ours += [p.pid for p in listeners] + [p for s in servers for p in s.pids()]
                watch = LoadWatch(ours)
                for regime, senders in regimes.items():
                    row["send"][regime] = {}
                    for way in order:
                        before = await history(admin, ON)
                        row["send"][regime][way] = await timed(
                            ways[way],
                            SENT.get(way, SCRIPT),
                            args.messages,
                            senders,
                            admin,
                            redis_cpu,
                        )
                        after = await history(admin, ON)
                        recorded = after[0] - before[0]
                        expected = args.messages if way == "quart-wslb on" else 0
                        if recorded != expected or after[1] == 0:
                            raise RuntimeError(f"{way}: {recorded} recorded, {expected} expected")
                    if await admin.exists(Keys(OFF).history):
                        raise RuntimeError("a history exists under the prefix without recovery")
                    pairs = [("plain (off)", off, holders[0]), ("recovery (on)", on, holders[1])]
                    row["delivery"][regime] = {}
                    for client, emitter, holder in pairs if number % 2 == 0 else pairs[::-1]:
                        row["delivery"][regime][client] = await delivered(
                            emitter, holder, text, args.delivered, senders, redis_cpu
                        )
                row["foreign_cores"] = watch.foreign_cores()
                rounds.append(row)
                print(f"[bench.recovery] round {number + 1}/{args.repeat} done", file=sys.stderr)
            await peer.redis.aclose()
        finally:
            for holder in holders:
                if holder.reader is not None:
                    holder.reader.cancel()
                await holder.client.close()
            for close in closers:
                await close()
            await asyncio.to_thread(stop_all, servers)
            for process in listeners:
                process.kill()
                process.wait(10)
    return {"params": vars(args) | {"out": str(args.out)}, "regimes": list(regimes),
            "rounds": rounds}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.recovery",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="300 sends, 1 round (seconds)")
    parser.add_argument("--messages", type=int, help="sends per figure (10,000)")
    parser.add_argument("--delivered", type=int, help="sends per delivery figure (5,000)")
    parser.add_argument("--senders", type=int, default=32, help="sends in flight, many")
    parser.add_argument("--users", type=int, default=200, help="distinct users")
    parser.add_argument("--payload", type=int, default=200, help="characters per message")
    parser.add_argument("--repeat", type=int, help="rounds (5)")
    parser.add_argument("--quiet-wait", type=float,
                        help="seconds to wait, before each round, for a machine that others "
                             "keep busy (20; 0 with --smoke)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=OUT, help="where recovery.json goes")
    args = parser.parse_args(argv)
    small = args.smoke
    args.messages = args.messages or (300 if small else 10_000)
    args.delivered = args.delivered or (100 if small else 5_000)
    args.repeat = args.repeat or (1 if small else 5)
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if small else 20.0
    results = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recovery.json").write_text(json.dumps(results, indent=1) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
