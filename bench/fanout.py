"""``python -m bench.fanout``: group, path and metadata sends to G members (issue 13).

    python -m bench.fanout --quick    # G = 10 ... 50,000 on N = 2, 4; the peer on N = 2
    python -m bench.fanout --smoke    # seconds: what tests/test_bench.py runs
    python -m bench.fanout --gs 10,1000 --ns 2 --kinds group
    python -m bench.fanout --render --against before.json   # reprint, with ratios to a run

quart-wslb runs as N Hypercorn instances of ``bench/app.py`` on one private
``redis-server``; each cell sends to a ``GroupSelector``, ``PathSelector`` or
``MetadataSelector`` matching G connections, spread evenly over the instances: up to
``--real`` real websocket clients in all, the rest synthetic records written through
``Registry.register`` (see :mod:`bench.members`). python-socketio's
``AsyncRedisManager`` (``bench/peer_app.py`` under uvicorn) emits to rooms of G real
clients. What each cell measures is in :mod:`bench.fancell`. Writes ``fanout.json`` to
``--out`` (default ``bench/out``) and prints the tables; ``--against OLD.json`` adds the
ratios of this run to an earlier one, cell by cell (before and after a change).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.config import PEER, SYSTEMS, WSLB

__all__ = ("FAN_PRESETS", "FanParams", "main")

OUT = Path(__file__).resolve().parent / "out"


@dataclass(frozen=True, slots=True)
class FanParams:
    """Every knob of a fan-out run; recorded in the JSON."""

    preset: str
    gs: tuple[int, ...]
    ns: tuple[int, ...]
    kinds: tuple[str, ...]
    #: The peer's sizes and instance counts (real clients only).
    peer_gs: tuple[int, ...]
    peer_ns: tuple[int, ...]
    systems: tuple[str, ...]
    #: Real websocket clients at most, in all (one setup at a time holds them).
    real: int
    #: Sends of each cell's meter phase and of its ping phase.
    sends: int
    ping_sends: int
    #: Seconds after which a phase stops sending (once 3 sends are in).
    budget_s: float
    size: int = 200
    #: Seconds to wait, before each setup, for a machine that others keep busy.
    quiet_wait: float = 0.0


ALL_GS = (10, 100, 1000, 10_000, 50_000)
KINDS = ("group", "path", "metadata")
FAN_PRESETS: dict[str, FanParams] = {
    "smoke": FanParams(
        preset="smoke", gs=(10, 100), ns=(2,), kinds=KINDS, peer_gs=(10,), peer_ns=(2,),
        systems=SYSTEMS, real=60, sends=3, ping_sends=2, budget_s=5.0,
    ),
    "quick": FanParams(
        preset="quick", gs=ALL_GS, ns=(2, 4), kinds=KINDS, peer_gs=(10, 1000, 10_000),
        peer_ns=(2,), systems=SYSTEMS, real=10_000, sends=10, ping_sends=5, budget_s=6.0,
        quiet_wait=5.0,
    ),
    "full": FanParams(
        preset="full", gs=ALL_GS, ns=(2, 4), kinds=KINDS, peer_gs=(10, 100, 1000, 10_000),
        peer_ns=(2, 4), systems=SYSTEMS, real=10_000, sends=20, ping_sends=10,
        budget_s=20.0, quiet_wait=30.0,
    ),
}  # fmt: skip


def _ints(text: str | None) -> tuple[int, ...] | None:
    return tuple(int(x.replace("_", "")) for x in text.split(",")) if text else None


def parse_args(argv: list[str]) -> tuple[FanParams, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fanout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="G up to 50,000, N = 2, 4")
    size.add_argument("--smoke", action="store_true", help="the smallest run (seconds)")
    parser.add_argument("--gs", help="group sizes G, e.g. 10,1000,50000")
    parser.add_argument("--ns", help="quart-wslb instance counts, e.g. 2,4")
    parser.add_argument("--kinds", help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--peer-gs", help="the peer's room sizes (real clients only)")
    parser.add_argument("--peer-ns", help="the peer's instance counts")
    parser.add_argument("--systems", help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--real", type=int, help="real websocket clients at most")
    parser.add_argument("--sends", type=int, help="sends of each cell's meter phase")
    parser.add_argument("--ping-sends", type=int, help="sends of each cell's ping phase")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder")
    parser.add_argument(
        "--render",
        action="store_true",
        help="run nothing: print the tables of the fanout.json in --out",
    )
    parser.add_argument(
        "--against", type=Path, help="an earlier fanout.json: also print this run / that one"
    )
    args = parser.parse_args(argv)
    params = FAN_PRESETS["smoke" if args.smoke else "quick" if args.quick else "full"]
    overrides = {
        "gs": _ints(args.gs),
        "ns": _ints(args.ns),
        "kinds": tuple(args.kinds.split(",")) if args.kinds else None,
        "peer_gs": _ints(args.peer_gs),
        "peer_ns": _ints(args.peer_ns),
        "systems": tuple(args.systems.split(",")) if args.systems else None,
        "real": args.real,
        "sends": args.sends,
        "ping_sends": args.ping_sends,
    }
    params = replace(params, **{k: v for k, v in overrides.items() if v is not None})
    for kind in params.kinds:
        if kind not in KINDS:
            parser.error(f"unknown kind {kind!r}")
    for system in params.systems:
        if system not in SYSTEMS:
            parser.error(f"unknown system {system!r}")
    return params, args


def log(text: str) -> None:
    print(f"[fanout {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


async def run_system(
    system: str, params: FanParams, redis_url: str, redis_pid: int, log_dir: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every setup of one system: its cells, and a summary of each setup."""
    from bench.fancell import measure_cell, open_setup
    from bench.members import Plan
    from bench.procs import wait_quiet

    wslb = system == WSLB
    gs = params.gs if wslb else tuple(g for g in params.peer_gs if g <= params.real)
    kinds = params.kinds if wslb else ("group",)
    cells: list[dict[str, Any]] = []
    setups: list[dict[str, Any]] = []
    for n in params.ns if wslb else params.peer_ns:
        plan = Plan(gs, real=min(params.real, max(gs)))
        await asyncio.to_thread(wait_quiet, params.quiet_wait)
        log(f"{system}, N={n}: starting, connecting {plan.real} real clients")
        logs = log_dir / f"fanout-{system}-n{n}"
        logs.mkdir(parents=True, exist_ok=True)
        setup = await open_setup(system, n, plan, redis_url, redis_pid, logs)
        summary: dict[str, Any] = {"system": system, "n": n, "real": plan.real,
                                   "connect_s": setup.connect_s, "fill_s": {},
                                   "redis_idle_cpu_us_per_s": setup.idle_cpu * 1e6}  # fmt: skip
        setups.append(summary)
        try:
            for g in gs:
                if setup.filler is not None:
                    start = time.perf_counter()
                    count = await setup.filler.fill(g, kinds)
                    summary["fill_s"][g] = (count, time.perf_counter() - start)
                for kind in kinds:
                    log(f"{system}, N={n}, G={g}: {kind if wslb else 'room'}")
                    cells.append(
                        await measure_cell(
                            setup, kind, g, sends=params.sends, ping_sends=params.ping_sends,
                            budget=params.budget_s, size=params.size,
                        )
                    )  # fmt: skip
        finally:
            await setup.close()
    return cells, setups


async def run(params: FanParams, out: Path) -> dict[str, Any]:
    from bench.__main__ import missing_peer, raise_nofile
    from bench.fanreport import ratios
    from bench.redisprobe import Pinger, ping_stats
    from bench.report import machine, source, versions
    from quart_wslb.testing import RedisServer

    raise_nofile()
    started = time.monotonic()
    systems = list(params.systems)
    skipped: dict[str, str] = {}
    reason = missing_peer()
    if PEER in systems and reason:
        systems.remove(PEER)
        skipped[PEER] = reason
    results: dict[str, Any] = {"skipped": skipped, "cells": [], "setups": []}
    with RedisServer() as redis:
        if redis.process is None:
            raise RuntimeError("redis-server did not start")
        results["meta"] = {"params": asdict(params), "machine": machine(),
                           "versions": versions(redis.binary), "source": source(),
                           "loadavg_start": os.getloadavg()}  # fmt: skip
        pinger = Pinger(redis.url, 0.001)  # what a PING waits with nothing else running
        pinger.start()
        await asyncio.sleep(1.0)
        results["ping_idle"] = ping_stats(pinger.stop())
        for system in systems:
            cells, setups = await run_system(
                system, params, redis.url, redis.process.pid, out / "logs"
            )
            results["cells"] += cells
            results["setups"] += setups
    results["ratios"] = ratios(results["cells"])
    results["meta"]["duration_s"] = time.monotonic() - started
    results["meta"]["loadavg_end"] = os.getloadavg()
    return results


def main(argv: list[str] | None = None) -> int:
    from bench.fanreport import format_against, format_fanout, ratios

    params, args = parse_args(sys.argv[1:] if argv is None else argv)
    out: Path = args.out
    if args.render:
        results = json.loads((out / "fanout.json").read_text())
        results["ratios"] = ratios(results["cells"])  # as this version computes them
    else:
        out.mkdir(parents=True, exist_ok=True)
        results = asyncio.run(run(params, out))
        (out / "fanout.json").write_text(json.dumps(results, indent=1) + "\n")
    print(format_fanout(results))
    if args.against:
        print(format_against(results, json.loads(args.against.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
