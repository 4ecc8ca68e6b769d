"""Registry figures: how fast connections come and go, and what each one costs at rest.

- ``connections``: one instance of a system; C real websockets are opened (64 handshakes
  at a time), held idle, then closed. It gives connects and disconnects per second, the
  CPU the instance and Redis spend per connect and disconnect (the clients' apart), the
  RSS the instance's worker grows by per connection, and (quart-wslb) the Redis memory
  per connection. For quart-wslb a disconnect counts when its record has left Redis.
- ``registry`` (quart-wslb only): records written and removed straight through
  :class:`quart_wslb.registry.Registry`, one script call per connection, 64 at a time,
  with ``Connection`` objects that have no socket; this isolates the Redis side from
  the WebSocket handshake and allows 10,000 records without 10,000 sockets.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, cast

import psutil
import redis.asyncio as aioredis

from bench.clients import Pool
from bench.config import MAX_FOREIGN, WSLB, Params
from bench.fire import user_name
from bench.procs import CpuMeter, LoadWatch, quietest, redis_info, start_servers, stop_all
from bench.scenario import System
from quart_wslb.connection import Connection, Membership
from quart_wslb.keys import Keys
from quart_wslb.registry import Registry
from quart_wslb.signal_sender import SignalSender

__all__ = ("registry_once", "run_connections", "run_registry", "socketless")

CONCURRENCY = 64
DRAIN_TIMEOUT = 60.0


def _used_memory(url: str) -> int:
    return int(redis_info(url, "memory")["used_memory"])


async def _settle() -> None:
    await asyncio.sleep(1.0)


async def run_connections(
    name: str, params: Params, redis_url: str, redis_pid: int, log_dir: Path
) -> dict[str, Any]:
    """Open, hold and close ``params.idle_connections`` websockets on one instance."""
    system = System.of(name, params)
    tag = f"c{os.urandom(3).hex()}"
    servers = await asyncio.to_thread(
        start_servers, 1, system.server, system.target, system.envs(1, redis_url, tag), log_dir
    )
    pool = Pool(name, servers[0].port)
    count = params.idle_connections
    client = aioredis.Redis.from_url(redis_url)
    members = Keys(f"bench-{tag}").records("i0")
    try:
        worker = psutil.Process(servers[0].worker_pid())
        await _settle()
        watch = LoadWatch([os.getpid(), redis_pid, *servers[0].pids()])
        server = CpuMeter([*servers[0].pids(), redis_pid])
        clients = CpuMeter([os.getpid()])
        rss0, mem0 = worker.memory_info().rss, _used_memory(redis_url)
        server0, clients0 = server.read(), clients.read()
        connect_s = await pool.connect([user_name(u) for u in range(count)], CONCURRENCY)
        server1, clients1 = server.read(), clients.read()
        await _settle()
        rss1, mem1 = worker.memory_info().rss, _used_memory(redis_url)
        start, server2 = time.perf_counter(), server.read()
        await pool.close()
        if name == WSLB:
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while await client.hlen(members) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        disconnect_s = time.perf_counter() - start
        server3 = server.read()
        left = int(await client.hlen(members)) if name == WSLB else 0
        foreign = watch.foreign_cores()
    finally:
        await pool.close()
        await client.aclose()
        await asyncio.to_thread(stop_all, servers)
    return {
        "system": name,
        "server": system.server,
        "connections": count,
        "connects_per_s": count / connect_s,
        "disconnects_per_s": count / disconnect_s,
        # CPU of the instance and Redis (and, apart, of the clients) per connection.
        "server_us_per_connect": (server1 - server0) * 1e6 / count,
        "client_us_per_connect": (clients1 - clients0) * 1e6 / count,
        "server_us_per_disconnect": (server3 - server2) * 1e6 / count,
        "records_left": left,
        "rss_before_mb": rss0 / 2**20,
        "rss_after_mb": rss1 / 2**20,
        "rss_per_conn_kb": (rss1 - rss0) / count / 1024,
        "redis_bytes_per_conn": (mem1 - mem0) / count if name == WSLB else 0.0,
        "foreign_cores": foreign,
    }


def socketless(index: int, instance: str) -> Connection:
    """A connection with no socket: all that ``Registry`` reads of it is real."""
    return Connection(
        id=f"{instance}:{index:08d}{os.urandom(4).hex()}",
        user=user_name(index),
        path="/ws",
        instance=instance,
        metadata={},
        websocket=cast(Any, None),
        queue_size=1,
        policy="close",
        sender=SignalSender(None),
        membership=cast(Membership, None),  # never joins a group
    )


async def _each(count: int, call: Any) -> float:
    """Run ``call(i)`` for ``i < count``, ``CONCURRENCY`` at a time; the seconds it took."""
    indexes = iter(range(count))
    start = time.perf_counter()

    async def worker() -> None:
        for i in indexes:
            await call(i)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return time.perf_counter() - start


async def run_registry(params: Params, redis_url: str, redis_pid: int) -> dict[str, Any]:
    """:func:`registry_once`, repeated (``params.attempts`` in all) while others load the
    machine; the run with the least foreign load is kept."""
    return await quietest(
        lambda: registry_once(params, redis_url, redis_pid),
        params.attempts,
        params.quiet_wait,
        MAX_FOREIGN,
    )


async def registry_once(params: Params, redis_url: str, redis_pid: int) -> dict[str, Any]:
    """Register and unregister ``params.memory_records`` records through ``Registry``."""
    count = params.memory_records
    keys = Keys(f"bench-r{os.urandom(3).hex()}")
    client = aioredis.Redis.from_url(redis_url, max_connections=CONCURRENCY * 2)
    registry = Registry(client, keys)
    connections = [socketless(i, "reg0") for i in range(count)]
    try:
        watch = LoadWatch([os.getpid(), redis_pid])
        mem0 = _used_memory(redis_url)
        register_s = await _each(count, lambda i: registry.register(connections[i]))
        # What the records keep, without the buffers of the pool's open connections
        # (tens of KB each, per client rather than per record).
        await client.connection_pool.disconnect()
        await asyncio.sleep(0.1)
        mem1 = _used_memory(redis_url)
        unregister_s = await _each(count, lambda i: registry.unregister([connections[i].id]))
        mem2 = _used_memory(redis_url)
        left = int(await client.hlen(keys.records("reg0")))
        foreign = watch.foreign_cores()
    finally:
        await client.aclose()
    return {
        "system": WSLB,
        "records": count,
        "register_per_s": count / register_s,
        "unregister_per_s": count / unregister_s,
        "redis_bytes_per_conn": (mem1 - mem0) / count,
        "redis_bytes_left": mem2 - mem0,
        "records_left": left,
        "foreign_cores": foreign,
    }
