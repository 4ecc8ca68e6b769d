"""What the ASGI server alone costs per message: the bare app under Hypercorn and uvicorn.

One instance of :mod:`bench.bare` (no quart-wslb, no Quart, no Redis) holds ``--users``
real websockets of the benchmark's clients and writes ``--messages`` messages to them,
``--window`` in flight, through the ASGI ``send`` of each socket. Reported per message:
the instance's CPU (``psutil``, parent and worker) and the clients' CPU. This is the
part of a holding instance's cost that belongs to the server: quart-wslb's own part is
what ``python -m bench.subscriber --writers`` measures.

    .venv/bin/python -m bench.servers [--messages 40000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path

from bench.clients import Pool, Receipts
from bench.fire import user_name
from bench.procs import CpuMeter, aget_json, start_servers, stop_all

__all__ = ("measure",)

SERVERS = ("hypercorn", "uvicorn")


async def measure(
    server: str, users: int, messages: int, window: int
) -> tuple[float, float, float]:
    """(messages/s received, server CPU µs per message, clients' CPU µs per message)."""
    log_dir = Path(tempfile.mkdtemp(prefix="bench-servers-"))
    (instance,) = await asyncio.to_thread(
        start_servers, 1, server, "bench.bare:app", [{}], log_dir
    )
    pool = Pool("quart-wslb", instance.port)  # plain text frames, as quart-wslb's clients
    try:
        await pool.connect([user_name(u) for u in range(users)])
        receipts = Receipts(messages)
        pool.receipts = receipts
        server_cpu, client_cpu = CpuMeter(instance.pids()), CpuMeter([os.getpid()])
        s0, c0 = server_cpu.read(), client_cpu.read()
        query = f"/fire?count={messages}&users={users}&window={window}&size=200"
        await aget_json(instance.port, query)
        await asyncio.wait_for(receipts.done.wait(), 60)
        s1, c1 = server_cpu.read(), client_cpu.read()
        span = (receipts.last_received - receipts.first_sent) / 1e9
        return messages / span, (s1 - s0) / messages * 1e6, (c1 - c0) / messages * 1e6
    finally:
        await pool.close()
        stop_all([instance])


async def run(args: argparse.Namespace) -> None:
    """Alternate the servers, ``--repeat`` runs each; print each run, then the medians."""
    costs: dict[str, list[float]] = {server: [] for server in SERVERS}
    for n in range(args.repeat):
        for server in SERVERS:
            rate, server_us, client_us = await measure(
                server, args.users, args.messages, args.window
            )
            costs[server].append(server_us)
            print(
                f"  run {n + 1} {server:<10} {rate:9,.0f} msg/s  server {server_us:5.1f} "
                f"µs/msg  clients {client_us:5.1f} µs/msg",
                flush=True,
            )
    for server, values in costs.items():
        print(f"{server:<10} median server CPU {statistics.median(values):5.1f} µs/msg")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.servers", description=__doc__)
    parser.add_argument("--messages", type=int, default=40_000, help="per run")
    parser.add_argument("--users", type=int, default=200, help="websockets held")
    parser.add_argument("--window", type=int, default=32, help="writes in flight")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each server")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
