"""Server CPU per member delivered, when one message goes to a group of local members.

One Hypercorn instance of :mod:`bench.encode_app` holds ``--members`` real websockets of
the benchmark's clients (:mod:`bench.clients`), all in one group, and sends
``--messages`` group messages (``--window`` in flight), each of which it delivers to
every member. Reported per run: the instance's CPU (``psutil``, parent and worker) per
frame delivered, and frames per second. Runs alternate the variants, ``--repeat``
times each:

- ``direct``: this checkout, frames encoded once and written through Hypercorn's stream;
- ``asgi``: this checkout with that path off (``BENCH_FRAMES=asgi``): the fallback, one
  ASGI ``websocket.send`` event per connection;
- ``single`` (with ``--single``): ``direct``, but each frame written alone, never
  joined with those queued behind it (``BENCH_FRAMES=single``);
- ``before`` (with ``--base REV``): the package as of the commit ``REV``, imported from
  an export of that commit, on the same Redis and clients.

    .venv/bin/python -m bench.encode [--members 1000] [--messages 200] [--repeat 3]
                                     [--base REV] [--single] [--profile VARIANT]

``--profile VARIANT`` measures nothing: it samples one run of ``VARIANT`` with
``py-spy`` (see :mod:`bench.profile`) and prints where the worker's busy time went.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import subprocess
import tarfile
import tempfile
from pathlib import Path

from bench.clients import Pool, Receipts
from bench.fire import user_name
from bench.procs import ROOT, CpuMeter, aget_json, start_servers, stop_all
from bench.profile import find_py_spy, record, stop_recording, summarize
from quart_wslb.testing import RedisServer

__all__ = ("measure",)


def export(rev: str) -> Path:
    """The ``quart_wslb`` package as of ``rev``, extracted to a temporary folder."""
    archive = subprocess.run(
        ["git", "archive", rev, "quart_wslb"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    folder = Path(tempfile.mkdtemp(prefix="bench-encode-base-"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def variant_env(variant: str, base: Path | None) -> dict[str, str]:
    """The environment that makes an instance run ``variant``."""
    if variant in ("asgi", "single"):
        return {"BENCH_FRAMES": variant}
    if variant == "before" and base is not None:
        return {"BENCH_PACKAGE_DIR": str(base)}
    return {}


async def measure(
    variant: str,
    run: int,
    args: argparse.Namespace,
    redis_url: str,
    base: Path | None,
    profile: Path | None = None,
) -> tuple[float, float]:
    """(frames delivered per second, instance CPU µs per frame) of one run; with
    ``profile``, py-spy's raw stacks of the measured part are written there."""
    env = {
        **variant_env(variant, base),
        "WSLB_REDIS_URL": redis_url,
        "WSLB_PREFIX": f"encode-{variant}-{run}",
        "WSLB_INSTANCE_ID": "i0",
    }
    log_dir = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    target = "bench.encode_before:app" if variant == "before" else "bench.encode_app:app"
    (instance,) = await asyncio.to_thread(start_servers, 1, "hypercorn", target, [env], log_dir)
    pool = Pool("quart-wslb", instance.port)
    try:
        await pool.connect([user_name(u) for u in range(args.members)])
        stats = await aget_json(instance.port, "/stats")
        if stats["local"] != args.members:
            raise RuntimeError(f"{variant}: {stats['local']} members, not {args.members}")
        expected = str(base) if variant == "before" else str(ROOT)
        if not stats["package"].startswith(expected):
            raise RuntimeError(f"{variant} imported quart_wslb from {stats['package']}")
        await _fire(instance.port, pool, args.warmup, args)
        spy = None
        if profile is not None:
            spy = record(_py_spy(), instance.worker_pid(), profile)
            await asyncio.sleep(1.0)  # py-spy attaches
        meter = CpuMeter(instance.pids())
        start = meter.read()
        try:
            receipts = await _fire(instance.port, pool, args.messages, args)
        finally:
            if spy is not None:
                await asyncio.to_thread(stop_recording, spy)
        cpu = meter.read() - start
        frames = args.messages * args.members
        span = (receipts.last_received - receipts.first_sent) / 1e9
        return frames / span, cpu / frames * 1e6
    finally:
        await pool.close()
        stop_all([instance])


async def _fire(port: int, pool: Pool, count: int, args: argparse.Namespace) -> Receipts:
    """Send ``count`` group messages; wait until every member received every one."""
    receipts = Receipts(count * args.members)
    pool.receipts = receipts
    await aget_json(port, f"/group?count={count}&window={args.window}&size={args.size}")
    await asyncio.wait_for(receipts.done.wait(), 120)
    pool.receipts = None
    return receipts


def _py_spy() -> str:
    py_spy = find_py_spy()
    if py_spy is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    return py_spy


async def run_profile(args: argparse.Namespace, base: Path | None) -> None:
    """One sampled run of ``args.profile``; print its components and hottest frames."""
    raw = Path(tempfile.mkdtemp(prefix="bench-encode-profile-")) / f"{args.profile}.txt"
    with RedisServer() as redis:
        rate, us = await measure(args.profile, 0, args, redis.url, base, raw)
    summary = summarize(raw.read_text() if raw.exists() else "")
    print(f"# {args.profile}: {rate:,.0f} frames/s, {us:.2f} µs/frame while sampled ({raw})")
    for title in ("components", "own", "inclusive"):
        print(f"-- by {title}")
        for item in summary[title]:
            print(f"{item['share'] * 100:6.1f}%  {item['frame']}")


async def run(args: argparse.Namespace) -> None:
    """Alternate the variants; print each run, then the medians and ratios."""
    base = export(args.base) if args.base else None
    if args.profile:
        await run_profile(args, base)
        return
    variants = (*(("before",) if base else ()), "direct", *(("single",) if args.single else ()),
                "asgi")  # fmt: skip
    costs: dict[str, list[float]] = {v: [] for v in variants}
    with RedisServer() as redis:
        for n in range(args.repeat):
            for variant in variants:
                rate, us = await measure(variant, n, args, redis.url, base)
                costs[variant].append(us)
                print(
                    f"  run {n + 1} {variant:<7} {rate:9,.0f} frames/s  server {us:5.2f} µs/frame",
                    flush=True,
                )
    medians = {v: statistics.median(c) for v, c in costs.items()}
    for variant, values in costs.items():
        low, high = min(values), max(values)
        ratio = medians[variant] / medians["direct"]
        print(
            f"{variant:<7} median {medians[variant]:5.2f} µs/frame "
            f"(range {low:.2f}-{high:.2f}), {ratio:.2f}x direct"
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.encode", description=__doc__)
    parser.add_argument("--members", type=int, default=1000, help="websockets in the group")
    parser.add_argument("--messages", type=int, default=200, help="group messages per run")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured messages first")
    parser.add_argument("--window", type=int, default=2, help="sends in flight")
    parser.add_argument("--size", type=int, default=200, help="characters per message")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each variant")
    parser.add_argument("--base", help="also measure the package as of this commit")
    parser.add_argument("--single", action="store_true",
                        help="also measure direct writes without coalescing")  # fmt: skip
    parser.add_argument("--profile", choices=("before", "direct", "single", "asgi"),
                        help="only sample one run of this variant with py-spy")  # fmt: skip
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
