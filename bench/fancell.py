"""One fan-out setup (a system on N instances, with its real clients) and its cells.

A setup starts N server processes on the private Redis and connects the real clients,
dealt round-robin over the instances (see :mod:`bench.members`). A cell is one selector
at one size G; instance 0 sends (``GET /fan``: one ``wslb.send`` or ``sio.emit``), one
send in flight, and the next goes once every real member has the last one. Two phases:

- **meter**: ``sends`` sends between two ``INFO`` readings, with every command in the
  slow log (:class:`InfoMeter`): Redis time, longest command, CPU (less what Redis's
  timers cost in as long, measured once per setup) and bytes per send, and the CPU of
  the instances and of the clients;
- **ping**: ``ping_sends`` sends while :mod:`bench.pinger` PINGs Redis every
  millisecond on a connection of its own; the PINGs sent between a send's start and its
  last receipt give the worst wait another Redis user sees (it is kept out of the meter
  phase, whose Redis CPU and bytes it would add to).

Each phase stops early after ``budget_s`` seconds (once 3 sends are in). The caller's
wait and the time to the last member are taken over the sends of both phases.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import redis.asyncio as aioredis

from bench.clients import Pool, Receipts
from bench.config import PEER, WSLB
from bench.members import Client, Filler, Plan
from bench.procs import CpuMeter, LoadWatch, Server, aget_json, start_servers, stop_all
from bench.redisprobe import InfoMeter, Pinger, idle_cpu, ping_stats, send_usec
from bench.scenario import percentile, wait_subscribed
from quart_wslb.keys import Keys
from quart_wslb.registry import Registry

__all__ = ("Arrivals", "Setup", "measure_cell", "open_setup")

#: Liveness ticks reconcile an instance's records with its sockets, which would remove
#: the synthetic records; one tick at start-up, then none for the run.
QUIET_LIVENESS = {"WSLB_HEARTBEAT_INTERVAL": "3600", "WSLB_INSTANCE_TTL": "7200"}
#: Fewest sends of a phase that ``budget_s`` cuts short.
MIN_SENDS = 3
#: Seconds over which Redis's CPU with nothing to do is measured, once per setup.
IDLE_SECONDS = 3.0


class Arrivals(Receipts):
    """Receipts of one send: messages stamped before ``since`` (a late copy of an
    earlier send) are not counted."""

    def __init__(self, expected: int, since: int) -> None:
        super().__init__(expected)
        self.since = since

    def add(self, sent: int, received: int) -> None:
        if sent >= self.since:
            super().add(sent, received)


@dataclass
class Setup:
    """The live pieces of one system on N instances."""

    system: str
    n: int
    redis_url: str
    redis_pid: int
    plan: Plan
    servers: list[Server]
    pools: list[Pool] = field(default_factory=list)
    prefix: str = ""
    filler: Filler | None = None
    instances: list[str] = field(default_factory=list)
    connect_s: float = 0.0
    #: Redis's CPU seconds per second with the setup idle (its timers).
    idle_cpu: float = 0.0
    redis: aioredis.Redis | None = None

    def pids(self) -> list[int]:
        return [pid for server in self.servers for pid in server.pids()]

    async def close(self) -> None:
        """Close the clients, stop the servers, drop the prefix's keys."""
        await asyncio.gather(*(pool.close() for pool in self.pools))
        await asyncio.to_thread(stop_all, self.servers)
        if self.redis is not None:
            async for key in self.redis.scan_iter(match="{" + self.prefix + "}*", count=1000):
                await self.redis.delete(key)
            await self.redis.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _envs(system: str, n: int, redis_url: str, tag: str) -> list[dict[str, str]]:
    if system == WSLB:
        return [
            {"WSLB_REDIS_URL": redis_url, "WSLB_PREFIX": f"fan-{tag}",
             "WSLB_INSTANCE_ID": f"i{k}", **QUIET_LIVENESS}
            for k in range(n)
        ]  # fmt: skip
    return [{"BENCH_REDIS_URL": redis_url, "BENCH_SIO_CHANNEL": f"socketio-{tag}"}] * n


async def open_setup(
    system: str, n: int, plan: Plan, redis_url: str, redis_pid: int, log_dir: Path
) -> Setup:
    """Start the instances and connect the real clients; stopped again on failure."""
    tag = f"{n}-{os.urandom(3).hex()}"
    target = "bench.app:app" if system == WSLB else "bench.peer_app:app"
    server = "hypercorn" if system == WSLB else "uvicorn"
    servers = await asyncio.to_thread(
        start_servers, n, server, target, _envs(system, n, redis_url, tag), log_dir
    )
    setup = Setup(system, n, redis_url, redis_pid, plan, servers, prefix=f"fan-{tag}")
    try:
        if system == WSLB:
            keys = Keys(setup.prefix)
            await wait_subscribed(redis_url, {keys.channel(f"i{k}"): 1 for k in range(n)})
            setup.redis = aioredis.Redis.from_url(redis_url)
            known = sorted(_text(k) for k in await setup.redis.hkeys(keys.instances))
            stats = [await aget_json(s.port, "/stats") for s in servers]
            setup.instances = [str(s["instance"]) for s in stats]
            if sorted(setup.instances) != known:
                raise RuntimeError(f"instances {setup.instances} but Redis knows {known}")
            registry = Registry(setup.redis, keys)
            setup.filler = Filler(registry, setup.instances, plan)
        else:
            await wait_subscribed(redis_url, {f"socketio-{tag}": n})
        setup.connect_s = await _connect(setup, plan.clients())
        setup.idle_cpu = await idle_cpu(redis_url, IDLE_SECONDS)
    except BaseException:
        await setup.close()
        raise
    return setup


async def _connect(setup: Setup, clients: list[Client]) -> float:
    """Connect every real client to its instance (round-robin); the seconds it took."""
    by_user = {c.user: c for c in clients}
    for server in setup.servers:
        setup.pools.append(
            Pool(
                setup.system,
                server.port,
                path=lambda user: by_user[user].url_path(),
                auth=lambda user: {"user": user, "rooms": list(by_user[user].groups)},
            )
        )
    start = time.perf_counter()
    await asyncio.gather(
        *(
            pool.connect([c.user for c in clients if c.index % setup.n == k])
            for k, pool in enumerate(setup.pools)
        )
    )
    return time.perf_counter() - start


@dataclass
class Sent:
    """One send as its caller and the real members saw it."""

    routed: int
    caller_ns: int
    delivered: int
    #: Stamp at the send's start to the last real member's receipt (``None``: no member).
    last_ns: int | None
    #: Wall-clock start and end (the later of the return and the last receipt).
    window: tuple[int, int]


async def _send_once(setup: Setup, query: str, real: int) -> Sent:
    arrivals = Arrivals(real, since=time.time_ns())
    for pool in setup.pools:
        pool.receipts = arrivals
    try:
        reply = await aget_json(setup.servers[0].port, query, timeout=120)
        try:
            await asyncio.wait_for(arrivals.done.wait(), 10 + real / 500)
        except TimeoutError:
            pass
    finally:
        for pool in setup.pools:
            pool.receipts = None
    sent, done = int(reply["sent_ns"]), int(reply["done_ns"])
    last = arrivals.last_received - sent if arrivals.count else None
    end = max(done, arrivals.last_received)
    return Sent(int(reply["routed"]), int(reply["caller_ns"]), arrivals.count, last, (sent, end))


async def _phase(setup: Setup, query: str, real: int, count: int, budget: float) -> list[Sent]:
    """Up to ``count`` sends, one at a time, cut short after ``budget`` seconds."""
    sends: list[Sent] = []
    start = time.monotonic()
    while len(sends) < count:
        if len(sends) >= min(MIN_SENDS, count) and time.monotonic() - start > budget:
            break
        sends.append(await _send_once(setup, query, real))
    return sends


async def _received(setup: Setup) -> int:
    stats = await asyncio.gather(*(aget_json(s.port, "/stats") for s in setup.servers))
    return sum(int(s["received"]) for s in stats)


def _query(setup: Setup, kind: str, g: int, size: int) -> str:
    name, value = setup.plan.target(kind if setup.system == WSLB else "group", g)
    if setup.system == PEER:
        return "/fan?" + urlencode({"room": name, "size": size})
    return "/fan?" + urlencode({"kind": kind, "name": name, "value": value, "size": size})


async def measure_cell(
    setup: Setup, kind: str, g: int, *, sends: int, ping_sends: int, budget: float, size: int
) -> dict[str, Any]:
    """One cell: a warm-up send, the meter phase, the ping phase (see the docstring)."""
    real = setup.plan.real_members(kind if setup.system == WSLB else "group", g)
    query = _query(setup, kind, g, size)
    await _send_once(setup, query, real)  # first-use costs stay out
    meter = InfoMeter(setup.redis_url)
    servers, clients = CpuMeter(setup.pids()), CpuMeter([os.getpid()])
    watch = LoadWatch([*setup.pids(), os.getpid(), setup.redis_pid])
    try:
        received0 = await _received(setup)
        await meter.start()
        servers0, clients0, start = servers.read(), clients.read(), time.monotonic()
        metered = await _phase(setup, query, real, sends, budget)
        servers1, clients1 = servers.read(), clients.read()
        redis = await meter.stop()
        idle = setup.idle_cpu * (time.monotonic() - start)
        received = await _received(setup) - received0
    finally:
        await meter.aclose()
    foreign = watch.foreign_cores()
    pinger = Pinger(setup.redis_url, 0.001)
    pinger.start()
    try:
        await asyncio.sleep(0.3)  # the loop is running before the first send
        pinged = await _phase(setup, query, real, ping_sends, budget)
    finally:
        samples = pinger.stop()
    every = metered + pinged
    per = len(metered)
    synthetic = setup.filler.synthetic(kind, g) if setup.filler else 0
    return {
        "system": setup.system,
        "n": setup.n,
        "kind": kind if setup.system == WSLB else "room",
        "g": g,
        "real": real,
        "synthetic": synthetic,
        "selector": setup.plan.target(kind if setup.system == WSLB else "group", g),
        "sends": per,
        "ping_sends": len(pinged),
        "routed": [s.routed for s in metered],
        "lost": sum(real - s.delivered for s in every),
        "caller_ms_p50": percentile([s.caller_ns for s in every], 0.5) / 1e6,
        "caller_ms_p99": percentile([s.caller_ns for s in every], 0.99) / 1e6,
        "last_ms_p50": _last(every, 0.5),
        "last_ms_max": _last(every, 1.0),
        "redis_us_per_send": sum(c["usec"] for c in redis["top"].values()) / per,
        "redis_max_us": max((c["max_usec"] for c in redis["top"].values()), default=0),
        "redis_us_per_send_commandstats": send_usec(redis["commands"]) / per,
        "top_commands_per_send": {k: v["calls"] / per for k, v in redis["top"].items()},
        "redis_cpu_us_per_send": (redis["cpu_s"] - idle) * 1e6 / per,
        "redis_cpu_us_per_send_raw": redis["cpu_s"] * 1e6 / per,
        # What was subtracted: when it exceeds the result, the result is noise.
        "redis_cpu_idle_us_per_send": idle * 1e6 / per,
        "egress_bytes_per_send": redis["egress_bytes"] / per,
        "ingress_bytes_per_send": redis["ingress_bytes"] / per,
        "commands_per_send": {k: v["calls"] / per for k, v in redis["commands"].items()},
        "instances_per_send": received / per,
        "instances_cpu_ms_per_send": (servers1 - servers0) * 1e3 / per,
        "clients_cpu_ms_per_send": (clients1 - clients0) * 1e3 / per,
        "ping_during_sends": ping_stats(samples, [s.window for s in pinged]),
        "ping_phase": ping_stats(samples),
        "foreign_cores": foreign,
    }


def _last(sends: list[Sent], q: float) -> float | None:
    values = [s.last_ns for s in sends if s.last_ns is not None]
    return percentile(values, q) / 1e6 if values else None
