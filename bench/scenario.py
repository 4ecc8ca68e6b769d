"""The targeted-send scenario: one system, N instances, K users on one, sends from another.

Instance 0 holds the K clients; instance 1 sends (instance 0 itself when N = 1). Each
run (saturation, sequential, paced) reads, before and after: the CPU time of every server
process and of Redis, Redis's ``total_net_output_bytes``, and each instance's count of
messages taken off Redis; the clients stamp each receipt.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench.clients import Pool, Receipts
from bench.config import MAX_FOREIGN, PEER, WSLB, Params
from bench.fire import user_name
from bench.procs import (
    CpuMeter,
    Server,
    aget_json,
    busy_cpu,
    quietest,
    redis_info,
    start_servers,
    stop_all,
    wait_quiet,
)
from quart_wslb.keys import Keys

__all__ = ("System", "percentile", "run_scenario")

SUBSCRIBE_TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class System:
    """How to run one system's instances."""

    name: str
    server: str
    target: str

    @classmethod
    def of(cls, name: str, params: Params) -> System:
        if name == WSLB:
            return cls(name, params.server, "bench.app:app")
        if name == PEER:
            return cls(name, params.peer_server, "bench.peer_app:app")
        raise ValueError(f"unknown system {name!r}")

    def envs(self, n: int, redis_url: str, tag: str, count: bool = True) -> list[dict[str, str]]:
        """The environment of each instance."""
        common = {"BENCH_COUNT": "1" if count else "0"}
        if self.name == WSLB:
            return [
                {**common, "WSLB_REDIS_URL": redis_url, "WSLB_PREFIX": f"bench-{tag}",
                 "WSLB_INSTANCE_ID": f"i{k}"}
                for k in range(n)
            ]  # fmt: skip
        return [
            {**common, "BENCH_REDIS_URL": redis_url, "BENCH_SIO_CHANNEL": f"socketio-{tag}"}
            for _ in range(n)
        ]

    def channels(self, n: int, tag: str) -> dict[str, int]:
        """Each pub/sub channel and how many subscribers it has once all are up."""
        if self.name == WSLB:
            keys = Keys(f"bench-{tag}")
            return {keys.channel(f"i{k}"): 1 for k in range(n)}
        return {f"socketio-{tag}": n}


def percentile(values: list[int], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))])


async def wait_subscribed(redis_url: str, expected: dict[str, int]) -> None:
    """Until every channel has its subscribers (bounded by ``SUBSCRIBE_TIMEOUT``)."""
    client = aioredis.Redis.from_url(redis_url)
    deadline = time.monotonic() + SUBSCRIBE_TIMEOUT
    try:
        while True:
            found = dict(await client.pubsub_numsub(*expected))
            if all(found.get(c.encode(), 0) >= n for c, n in expected.items()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"channels not subscribed: {expected} vs {found}")
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


@dataclass
class Context:
    """The live pieces of one (system, N) scenario."""

    system: System
    n: int
    params: Params
    redis_url: str
    redis_pid: int
    servers: list[Server]
    pool: Pool

    @property
    def sender(self) -> Server:
        return self.servers[1 if self.n > 1 else 0]


async def _received(servers: list[Server]) -> list[int]:
    stats = await asyncio.gather(*(aget_json(s.port, "/stats") for s in servers))
    return [int(s["received"]) for s in stats]


async def measure(ctx: Context, mode: str, count: int, rate: float, window: int) -> dict[str, Any]:
    """One run: fire ``count`` messages and wait until the clients have them (bounded)."""
    params = ctx.params
    receipts = Receipts(count)
    ctx.pool.receipts = receipts
    meters = [CpuMeter(s.pids()) for s in ctx.servers]
    redis_meter = CpuMeter([ctx.redis_pid])
    client_meter = CpuMeter([os.getpid()])
    received0 = await _received(ctx.servers)
    info_a = redis_info(ctx.redis_url, "stats")["total_net_output_bytes"]
    info_b = redis_info(ctx.redis_url, "stats")["total_net_output_bytes"]
    cpu0 = [m.read() for m in meters]
    redis_cpu0, client_cpu0 = redis_meter.read(), client_meter.read()
    busy0, wall0 = busy_cpu(), time.monotonic()
    query = (
        f"/fire?count={count}&users={params.users}&rate={rate}&window={window}&size={params.size}"
    )
    fired = await aget_json(ctx.sender.port, query, timeout=60 + count / 100)
    budget = 10.0 + count / 2000
    try:
        await asyncio.wait_for(receipts.done.wait(), budget)
    except TimeoutError:
        pass
    cpu1 = [m.read() for m in meters]
    redis_cpu1, client_cpu1 = redis_meter.read(), client_meter.read()
    busy1, wall1 = busy_cpu(), time.monotonic()
    info_c = redis_info(ctx.redis_url, "stats")["total_net_output_bytes"]
    received1 = await _received(ctx.servers)
    ctx.pool.receipts = None

    delivered = receipts.count
    per = max(delivered, 1)
    span = (receipts.last_received - receipts.first_sent) / 1e9 if delivered else 0.0
    server_cpu = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
    redis_cpu = redis_cpu1 - redis_cpu0
    # INFO's own reply (measured by the back-to-back pair) is not a message's egress.
    egress = info_c - info_b - (info_b - info_a)
    holder, sender = 0, 1 if ctx.n > 1 else 0
    others = [c for i, c in enumerate(server_cpu) if i not in (holder, sender)]
    lat = receipts.latencies_ns
    ours = sum(server_cpu) + redis_cpu + client_cpu1 - client_cpu0
    return {
        "system": ctx.system.name,
        "server": ctx.system.server,
        "n": ctx.n,
        "mode": mode,
        "messages": count,
        "rate_target": rate,
        "window": window,
        "delivered": delivered,
        "lost": count - delivered,
        "routed": fired["routed"],
        "send_s": fired["elapsed_s"],
        "send_rate": fired["send_rate"],
        "span_s": span,
        "throughput": delivered / span if span > 0 else 0.0,
        "p50_ms": percentile(lat, 0.50) / 1e6,
        "p99_ms": percentile(lat, 0.99) / 1e6,
        "max_ms": (max(lat) / 1e6) if lat else 0.0,
        "mean_ms": (statistics.fmean(lat) / 1e6) if lat else 0.0,
        "redis_bytes_per_msg": egress / per,
        "instances_per_msg": sum(b - a for a, b in zip(received0, received1, strict=True))
        / max(count, 1),
        "received_per_instance": [b - a for a, b in zip(received0, received1, strict=True)],
        "cpu_us_per_msg": (sum(server_cpu) + redis_cpu) * 1e6 / per,
        "cpu_us_per_msg_holder": server_cpu[holder] * 1e6 / per,
        "cpu_us_per_msg_sender": (server_cpu[sender] * 1e6 / per) if sender != holder else 0.0,
        "cpu_us_per_msg_idle_each": (statistics.fmean(others) * 1e6 / per) if others else 0.0,
        "cpu_us_per_msg_redis": redis_cpu * 1e6 / per,
        "cpu_us_per_msg_clients": (client_cpu1 - client_cpu0) * 1e6 / per,
        # Cores kept busy meanwhile by processes that are not part of the run.
        "foreign_cores": max(0.0, busy1 - busy0 - ours) / max(wall1 - wall0, 1e-9),
    }


async def measure_quietly(
    ctx: Context, mode: str, count: int, rate: float, window: int
) -> dict[str, Any]:
    """:func:`measure`, repeated (``params.attempts`` in all) while others load the
    machine; the run with the least foreign load is kept."""
    params = ctx.params
    return await quietest(
        lambda: measure(ctx, mode, count, rate, window),
        params.attempts,
        params.quiet_wait,
        MAX_FOREIGN,
    )


async def run_scenario(
    name: str, n: int, params: Params, redis_url: str, redis_pid: int, log_dir: Path
) -> list[dict[str, Any]]:
    """Every run of one system at one N; the servers are stopped whatever happens."""
    system = System.of(name, params)
    await asyncio.to_thread(wait_quiet, params.quiet_wait)
    tag = f"{'w' if name == WSLB else 's'}{n}-{os.urandom(3).hex()}"
    servers = await asyncio.to_thread(
        start_servers, n, system.server, system.target, system.envs(n, redis_url, tag), log_dir
    )
    pool = Pool(name, servers[0].port)
    rows: list[dict[str, Any]] = []
    try:
        await wait_subscribed(redis_url, system.channels(n, tag))
        await pool.connect([user_name(u) for u in range(params.users)])
        ctx = Context(system, n, params, redis_url, redis_pid, servers, pool)
        # A short warm-up, so that first-use costs (imports, script load) stay out.
        await measure(ctx, "warmup", min(200, params.messages), 0, params.window)
        rows.append(await measure_quietly(ctx, "sat", params.messages, 0, params.window))
        if params.seq_messages:
            rows.append(await measure_quietly(ctx, "seq", params.seq_messages, 0, 1))
        rows.append(
            await measure_quietly(
                ctx, "paced", params.paced_messages, params.paced_rate, params.window
            )
        )
    finally:
        await pool.close()
        await asyncio.to_thread(stop_all, servers)
    return rows
