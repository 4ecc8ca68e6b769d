"""Launcher: ``python -m example_app [--instances N] [--port BASE] [--demo]``.

Starts a throwaway Redis when ``WSLB_REDIS_URL`` is unset, N Hypercorn instances of
``example_app.app:app`` (three by default) and the round-robin front that a browser talks
to (see :mod:`example_app.launcher`). On Ctrl-C or SIGTERM it stops everything it
started, by pid. While it runs, an instance may be crashed (``kill -KILL -- -PID``): the
front skips it, and the survivors reap its records.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import sys
import time
from types import FrameType

import redis

from quart_wslb.keys import Keys

from .front import Backend
from .launcher import STOP_TIMEOUT, Cluster

#: Seconds for the whole ``--demo`` conversation, and for everything the demo does before
#: it stops the cluster (stopping takes at most ``STOP_TIMEOUT`` more).
DEMO_TIMEOUT, DEMO_DEADLINE = 12.0, 22.0
#: The front's port; the instances take the ports after it.
DEFAULT_PORT = 8000


class DeadlineError(Exception):
    """``--demo`` ran past ``DEMO_DEADLINE``."""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _deadline(signum: int, frame: FrameType | None) -> None:
    raise DeadlineError(f"the demo did not finish within {DEMO_DEADLINE:.0f}s")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m example_app",
        description="Run the quart-wslb chat as N instances behind a round-robin front.",
    )
    parser.add_argument("--instances", type=int, default=3, metavar="N", help="default: 3")
    parser.add_argument(
        "--port",
        type=int,
        metavar="BASE",
        help=f"the front's port; the instances take the next ones (default: {DEFAULT_PORT}, "
        "free ports with --demo)",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="drive two clients through the front across the instances, then exit",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.instances <= 16:
        parser.error("--instances must be between 1 and 16")
    return args


def _routed(request_line: str, backend: Backend) -> None:
    target = request_line.split(" ")[1] if " " in request_line else request_line
    print(f"front: WebSocket {target} -> {backend.name}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    # Both stop everything; SIGINT explicitly too, since a shell may start us ignoring it.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    env: dict[str, str] = {}
    # The demo takes a prefix of its own (unless one is set), so that on a shared Redis
    # it touches no other keys and can check that it left none behind.
    own_prefix = ""
    if args.demo and not os.environ.get("WSLB_PREFIX"):
        own_prefix = "wslb-demo-" + secrets.token_hex(4)
        env["WSLB_PREFIX"] = own_prefix
    redis_url = os.environ.get("WSLB_REDIS_URL") or None
    port = args.port if args.port is not None or args.demo else DEFAULT_PORT
    cluster = Cluster(
        instances=args.instances,
        port=port,
        redis_url=redis_url,
        env=env,
        echo=not args.demo,
        on_websocket=None if args.demo else _routed,
    )
    started = time.monotonic()
    code = 1
    try:
        if args.demo:
            signal.signal(signal.SIGALRM, _deadline)
            signal.setitimer(signal.ITIMER_REAL, DEMO_DEADLINE)
        cluster.start()
        _announce(cluster, from_env=redis_url is not None)
        if args.demo:
            code = _demo(cluster)
        else:
            print(
                f"\nOpen {cluster.url} in two browser tabs and join one room under two names;"
                "\neach new WebSocket goes to the next instance. Ctrl-C stops everything.\n",
                flush=True,
            )
            code = _watch(cluster)
    except KeyboardInterrupt:
        print("\nstopping")
        code = 130 if args.demo else 0
    except (RuntimeError, OSError, DeadlineError) as error:
        print(f"error: {error}", file=sys.stderr)
        print(cluster.tails(), file=sys.stderr)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip this
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            killed = cluster.stop_instances()  # first: on the way out they leave the registry
            if killed:
                print(f"killed after {STOP_TIMEOUT:.0f}s without stopping: {', '.join(killed)}")
            if own_prefix and cluster.instances and cluster.redis_url:
                _report_leftovers(cluster.redis_url, own_prefix)
        finally:
            cluster.stop()  # the front, then the Redis it started and its directory
        print(f"stopped everything it started ({time.monotonic() - started:.1f}s in all)")
    return code


def _announce(cluster: Cluster, *, from_env: bool) -> None:
    if from_env:
        print(f"Redis: {cluster.redis_url} (from WSLB_REDIS_URL)")
    elif cluster.redis is not None and cluster.redis.process is not None:
        print(
            f"Redis: embedded redis-server on {cluster.redis_url}, "
            f"pid {cluster.redis.process.pid}, dir {cluster.redis.directory} "
            "(stopped and removed on exit)"
        )
    for instance in cluster.instances:
        print(f"{instance.id}: {instance.url}  pid {instance.pid}")
    print(f"front: {cluster.url}  (round robin over the {len(cluster.instances)} instances)")
    if len(cluster.instances) > 1 and not from_env:
        print(f"To crash an instance: kill -KILL -- -{cluster.instances[-1].pid}", flush=True)


def _report_leftovers(url: str, prefix: str) -> None:
    """Count (then delete) the keys that the stopped instances left under ``prefix``."""
    client = redis.Redis.from_url(url, socket_timeout=2.0)
    try:
        keys = list(client.scan_iter(match="{" + prefix + "}*", count=1000))
        # Recovery sessions and their history outlive a stop on purpose (clients resume
        # on the next instance), each with a TTL: counted apart, and checked to expire.
        kept = {Keys(prefix).history, Keys(prefix).history_meta}
        recovery = [k for k in keys if k.decode() in kept or b":ss:" in k]
        expiring = sum(1 for k in recovery if client.pttl(k) > 0)
        left = len(keys) - len(recovery)
        if keys:
            client.delete(*keys)
        print(
            f"Redis keys left under {{{prefix}}} after the graceful stop: {left} (and "
            f"{len(recovery)} recovery keys, {expiring} of them expiring)"
        )
    except redis.RedisError as error:
        print(f"could not check Redis for leftover keys: {error}")
    finally:
        client.close()


def _watch(cluster: Cluster) -> int:
    """Wait for Ctrl-C/SIGTERM; report instances that die, and fail once none is left."""
    reported: set[str] = set()
    while running := cluster.running():
        for instance in cluster.instances:
            if instance not in running and instance.id not in reported:
                reported.add(instance.id)
                print(
                    f"{instance.id} (pid {instance.pid}) exited with "
                    f"{instance.process.returncode}; the front skips it, and the others "
                    "reap its records once its heartbeat expires",
                    flush=True,
                )
        time.sleep(0.5)
    print("every instance has exited", file=sys.stderr)
    print(cluster.tails(), file=sys.stderr)
    return 1


def _demo(cluster: Cluster) -> int:
    from websockets.exceptions import WebSocketException

    from .demo import DemoError, run_demo

    async def bounded() -> None:
        async with asyncio.timeout(DEMO_TIMEOUT):
            await run_demo(cluster.url)

    try:
        asyncio.run(bounded())
    except (DemoError, TimeoutError, OSError, WebSocketException) as error:
        print(f"\nDEMO FAILED: {error or type(error).__name__}", file=sys.stderr)
        print(cluster.tails(), file=sys.stderr)
        return 1
    print("\nDemo passed: every message arrived, across instances, through the front.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
