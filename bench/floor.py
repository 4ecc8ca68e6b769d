"""The floor: raw ``redis.asyncio`` publish and subscriber receive of the same payload.

What no Python library on Redis pub/sub can beat: this process publishes (one awaited
``PUBLISH`` at a time, or pipelines of ``BATCH``), and a subscriber in a process of its
own (``python -m bench.floor URL CHANNEL COUNT``) takes each message off its
connection and reads the send time in it, doing nothing else. Nothing is written to a
WebSocket.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import redis.asyncio as aioredis

from bench.fire import payload
from bench.procs import ROOT, CpuMeter, redis_info

__all__ = ("BATCH", "PIPELINED_RUNS", "run_floor")

#: Publishes per pipeline in the pipelined run.
BATCH = 100
#: Pipelined runs, of which the median is reported.
PIPELINED_RUNS = 3


async def subscribe(url: str, channel: str, count: int, budget: float) -> dict[str, Any]:
    """The subscriber's side: receive ``count`` messages (or stop after ``budget`` s)."""
    client = aioredis.Redis.from_url(url)
    latencies: list[int] = []
    first_sent = last = 0
    try:
        async with client.pubsub() as pubsub:
            await pubsub.subscribe(channel)
            print("ready", flush=True)
            cpu = time.process_time()

            async def drain() -> None:
                nonlocal first_sent, last
                async for message in pubsub.listen():
                    if message["type"] != "message":
                        continue
                    now = time.time_ns()
                    sent = int(message["data"][9:28])
                    first_sent = sent if not latencies else min(first_sent, sent)
                    last = now
                    latencies.append(now - sent)
                    if len(latencies) >= count:
                        return

            try:
                await asyncio.wait_for(drain(), budget)
            except TimeoutError:
                pass
            cpu = time.process_time() - cpu
    finally:
        await client.aclose()
    latencies.sort()
    return {"count": len(latencies), "first_sent": first_sent, "last": last,
            "latencies_ns": latencies, "cpu_s": cpu}  # fmt: skip


async def _publish(url: str, channel: str, count: int, size: int, pipelined: bool) -> float:
    client = aioredis.Redis.from_url(url)
    start = time.perf_counter()
    try:
        if not pipelined:
            for i in range(count):
                await client.publish(channel, payload(i, size))
        else:
            for base in range(0, count, BATCH):
                async with client.pipeline(transaction=False) as pipe:
                    for i in range(base, min(base + BATCH, count)):
                        pipe.publish(channel, payload(i, size))
                    await pipe.execute()
    finally:
        await client.aclose()
    return time.perf_counter() - start


async def floor_run(
    url: str, redis_pid: int, count: int, size: int, pipelined: bool
) -> dict[str, Any]:
    """One floor run: a subscriber process, this process publishing."""
    channel = f"floor-{os.urandom(3).hex()}"
    budget = 20.0 + count / 1000
    sub = subprocess.Popen(
        [sys.executable, "-m", "bench.floor", url, channel, str(count), str(budget)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        if sub.stdout is None or sub.stdout.readline().strip() != b"ready":
            raise RuntimeError("the floor subscriber did not start")
        meter = CpuMeter([os.getpid(), redis_pid])
        out0 = redis_info(url, "stats")["total_net_output_bytes"]
        cpu0 = meter.read()
        send_s = await _publish(url, channel, count, size, pipelined)
        raw = await asyncio.to_thread(sub.stdout.read)
        cpu1 = meter.read()
        out1 = redis_info(url, "stats")["total_net_output_bytes"]
        result = json.loads(raw)
    finally:
        if sub.poll() is None:
            sub.kill()
        sub.wait(10)
    got = max(int(result["count"]), 1)
    span = (result["last"] - result["first_sent"]) / 1e9
    lat: list[int] = result["latencies_ns"]
    return {
        "system": "floor",
        "mode": "pipelined" if pipelined else "seq",
        "messages": count,
        "delivered": result["count"],
        "send_rate": count / send_s,
        "throughput": result["count"] / span if span > 0 else 0.0,
        "p50_ms": lat[len(lat) // 2] / 1e6 if lat else 0.0,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e6 if lat else 0.0,
        "redis_bytes_per_msg": (out1 - out0) / got,
        "cpu_us_per_msg": (cpu1 - cpu0 + float(result["cpu_s"])) * 1e6 / got,
    }


async def run_floor(
    url: str, redis_pid: int, count: int, size: int, repeats: int = PIPELINED_RUNS
) -> list[dict[str, Any]]:
    """The sequential floor, and the pipelined floor's median of ``repeats`` runs (its
    rate varies by tens of percent from one run to the next on a shared 2-core box;
    every run's rate is kept in ``runs``)."""
    rows = [await floor_run(url, redis_pid, count, size, False)]
    runs = [await floor_run(url, redis_pid, count, size, True) for _ in range(repeats)]
    runs.sort(key=lambda row: float(row["throughput"]))
    median = runs[len(runs) // 2]
    median["runs"] = [row["throughput"] for row in runs]
    return [*rows, median]


def main(argv: list[str]) -> None:
    """Subscriber process: ``URL CHANNEL COUNT BUDGET``; prints one JSON line at the end."""
    url, channel, count, budget = argv
    result = asyncio.run(subscribe(url, channel, int(count), float(budget)))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
