"""``python -m bench``: the whole benchmark, one private Redis, bounded in time.

    python -m bench            # full: N = 1, 2, 4, 8; 20,000 messages; 10,000 idle sockets
    python -m bench --quick    # under 3 minutes: N = 1, 2, 4; fewer messages and sockets
    python -m bench --smoke    # seconds: what tests/test_bench.py runs
    python -m bench --profile  # also py-spy both instances of each system at saturation

Writes ``results.json`` and ``throughput.png`` (and, with ``--profile``, the raw stacks
and ``profile.txt``) to ``--out`` (default ``bench/out``), and prints the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from bench.config import PEER, SYSTEMS, WSLB, Params, preset

OUT = Path(__file__).resolve().parent / "out"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the under-3-minutes preset")
    size.add_argument("--smoke", action="store_true", help="the smallest run (seconds)")
    parser.add_argument("--ns", help="instance counts, e.g. 1,2,4")
    parser.add_argument("--systems", help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--users", type=int, help="K: clients (distinct users)")
    parser.add_argument("--messages", type=int, help="M: messages of the saturation run")
    parser.add_argument("--window", type=int, help="sends in flight at saturation")
    parser.add_argument("--peer-server", choices=("uvicorn", "hypercorn"),
                        help="ASGI server of python-socketio (default uvicorn)")  # fmt: skip
    parser.add_argument("--server", choices=("hypercorn", "uvicorn"),
                        help="ASGI server of quart-wslb (default hypercorn)")  # fmt: skip
    parser.add_argument("--idle", type=int, help="idle websockets held by one instance")
    parser.add_argument("--attempts", type=int,
                        help="repeat a measurement disturbed by other processes, up to "
                             "this many runs in all")  # fmt: skip
    parser.add_argument("--no-floor", action="store_true", help="skip the redis floor")
    parser.add_argument("--no-connections", action="store_true",
                        help="skip the connection and registry figures")  # fmt: skip
    parser.add_argument("--profile", action="store_true",
                        help="py-spy each system's instances at N=2 (saturation)")  # fmt: skip
    parser.add_argument("--profile-only", action="store_true", help="only the profile")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder")
    parser.add_argument("--render", action="store_true",
                        help="run nothing: print the tables and redraw the plot of the "
                             "results.json already in --out")  # fmt: skip
    return parser.parse_args(argv)


def params_from(args: argparse.Namespace) -> Params:
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    return preset(
        name,
        ns=tuple(int(n) for n in args.ns.split(",")) if args.ns else None,
        systems=tuple(args.systems.split(",")) if args.systems else None,
        users=args.users,
        messages=args.messages,
        window=args.window,
        peer_server=args.peer_server,
        server=args.server,
        idle_connections=args.idle,
        attempts=args.attempts,
    )


def missing_peer() -> str | None:
    """Why the python-socketio peer cannot run, or ``None``."""
    for module in ("socketio", "engineio"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[bench]')"
    return None


def raise_nofile() -> None:
    """Open-files soft limit up to the hard one: clients and servers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


async def run(params: Params, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from bench.capacity import run_connections, run_registry
    from bench.floor import run_floor
    from bench.procs import wait_quiet
    from bench.profile import format_profile, run_profile
    from bench.report import machine, source, targets, versions
    from bench.scenario import run_scenario
    from quart_wslb.testing import RedisServer

    started = time.monotonic()
    systems = list(params.systems)
    skipped: dict[str, str] = {}
    reason = missing_peer()
    if PEER in systems and reason:
        systems.remove(PEER)
        skipped[PEER] = reason
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"skipped": skipped}
    with RedisServer() as redis:
        if redis.process is None:
            raise RuntimeError("redis-server did not start")
        url, pid = redis.url, redis.process.pid
        results["meta"] = {"params": _params_dict(params), "machine": machine(),
                           "versions": versions(redis.binary), "source": source(),
                           "loadavg_start": os.getloadavg()}  # fmt: skip
        if not args.profile_only:
            if not args.no_floor:
                log("floor: raw redis.asyncio publish/subscribe")
                await asyncio.to_thread(wait_quiet, params.quiet_wait)
                results["floor"] = await run_floor(url, pid, params.floor_messages, params.size)
            rows: list[dict[str, Any]] = []
            for n in params.ns:
                for system in systems:
                    log(f"scenario: {system}, N={n}")
                    rows += await run_scenario(system, n, params, url, pid, logs)
            results["scenario"] = rows
            if not args.no_connections:
                results["connections"] = []
                for system in systems:
                    log(f"connections: {system}, {params.idle_connections} idle websockets")
                    await asyncio.to_thread(wait_quiet, params.quiet_wait)
                    results["connections"].append(
                        await run_connections(system, params, url, pid, logs)
                    )
                if WSLB in systems:
                    log(f"registry: {params.memory_records} records through Registry")
                    results["registry"] = await run_registry(params, url, pid)
        if args.profile or args.profile_only:
            results["profile"] = []
            for system in systems:
                log(f"profile: {system}, N=2, py-spy on both instances")
                profile = await run_profile(system, params, max(params.messages, 10_000),
                                            url, pid, out)  # fmt: skip
                results["profile"].append(profile)
            (out / "profile.txt").write_text(
                "\n\n".join(format_profile(p) for p in results["profile"]) + "\n"
            )
    results["targets"] = targets(results)
    results["meta"]["duration_s"] = time.monotonic() - started
    results["meta"]["loadavg_end"] = os.getloadavg()
    return results


def _params_dict(params: Params) -> dict[str, Any]:
    return {name: getattr(params, name) for name in params.__dataclass_fields__}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    params = params_from(args)
    unknown = set(params.systems) - set(SYSTEMS)
    if unknown:
        print(f"unknown systems: {sorted(unknown)}", file=sys.stderr)
        return 2
    out: Path = args.out
    from bench.report import format_report, plot, targets

    if args.render:
        results = json.loads((out / "results.json").read_text())
        results["targets"] = targets(results)
    else:
        raise_nofile()
        out.mkdir(parents=True, exist_ok=True)
        results = asyncio.run(run(params, args, out))

    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if results.get("scenario"):
        plot(results, out / "throughput.png")
    print(format_report(results))
    if results.get("profile"):
        print(f"\nprofile summary: {out / 'profile.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
