"""Launcher: ``python -m example_app [--instances N] [--port BASE] [--demo]``.

Starts a throwaway Redis when ``WSLB_REDIS_URL`` is unset, then N Hypercorn instances of
``example_app.app:app``, each in its own process group with its own ``WSLB_INSTANCE_ID``.
On Ctrl-C or SIGTERM it stops everything it started, by pid: SIGTERM to each Hypercorn
parent (so the worker runs ``after_serving`` and leaves the registry), then SIGKILL to
the process group of any that is still there after a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

import redis

from quart_wslb.testing import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
#: Seconds for every instance to answer HTTP, for a Hypercorn parent to exit on SIGTERM,
#: and for the whole ``--demo`` conversation.
START_TIMEOUT, STOP_TIMEOUT, DEMO_TIMEOUT = 12.0, 5.0, 10.0
DEFAULT_PORT = 8001


@dataclass
class Instance:
    """One Hypercorn process (a parent and its worker, in a process group of their own)."""

    id: str
    port: int
    process: subprocess.Popen[bytes]
    output: deque[str] = field(default_factory=lambda: deque(maxlen=40))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def ready(self) -> bool:
        """Whether it answers ``GET /health`` (so it has subscribed to Redis)."""
        try:
            with urllib.request.urlopen(self.url + "health", timeout=1.0) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def pump(self, stream: IO[bytes], echo: bool) -> None:
        """Read the process's output until EOF; keep the tail, print it if ``echo``."""
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            self.output.append(line)
            if echo:
                print(f"[{self.id}] {line}", flush=True)


class Launcher:
    """Everything the example starts, so that ``stop`` can end exactly that."""

    def __init__(self, *, echo: bool) -> None:
        self.echo = echo
        self.redis: RedisServer | None = None
        self.instances: list[Instance] = []

    def redis_url(self) -> str:
        """``WSLB_REDIS_URL``, or a private redis-server started now."""
        url = os.environ.get("WSLB_REDIS_URL")
        if url:
            print(f"Redis: {url} (from WSLB_REDIS_URL)")
            return url
        try:
            self.redis = RedisServer()
        except RuntimeError as error:
            raise SystemExit(
                f"{error}.\nInstall the extra (pip install -e '.[example]'), put redis-server "
                "on PATH, or point WSLB_REDIS_URL at a running Redis."
            ) from None
        self.redis.start()
        print(f"Redis: embedded redis-server on {self.redis.url} (stopped on exit)")
        return self.redis.url

    def spawn(self, index: int, port: int, env: dict[str, str]) -> Instance:
        """Start instance ``instance-<index>`` on ``port``."""
        instance_id = f"instance-{index}"
        pythonpath = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        process = subprocess.Popen(
            [sys.executable, "-m", "hypercorn", "example_app.app:app",
             "--bind", f"127.0.0.1:{port}"],
            cwd=ROOT,
            env={**env, "WSLB_INSTANCE_ID": instance_id, "PYTHONPATH": pythonpath,
                 "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        instance = Instance(instance_id, port, process)
        self.instances.append(instance)
        if process.stdout is not None:
            reader = threading.Thread(
                target=instance.pump, args=(process.stdout, self.echo), daemon=True
            )
            reader.start()
        return instance

    def wait_ready(self) -> None:
        """Block until every instance serves; raise if one exits or time runs out."""
        deadline = time.monotonic() + START_TIMEOUT
        for instance in self.instances:
            while not instance.ready():
                if instance.process.poll() is not None:
                    raise RuntimeError(f"{instance.id} exited with {instance.process.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{instance.id} did not serve within {START_TIMEOUT:.0f}s")
                time.sleep(0.05)

    def dead(self) -> Instance | None:
        """An instance whose process has exited, if any."""
        return next((i for i in self.instances if i.process.poll() is not None), None)

    def stop_instances(self) -> list[str]:
        """SIGTERM every Hypercorn parent, wait, then SIGKILL whatever is left of its group.

        Returns the ids of the instances that had to be killed (it prints nothing, so that
        a closed stdout cannot interrupt it).
        """
        for instance in self.instances:
            if instance.process.poll() is None:
                instance.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        killed = []
        for instance in self.instances:
            try:
                instance.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed.append(instance.id)
            _kill_group(instance.process)
        return killed

    def stop_redis(self) -> None:
        """Stop the private Redis, if one was started, and remove its directory."""
        if self.redis is not None:
            self.redis.close()
            self.redis = None

    def print_tails(self) -> None:
        """The last lines each instance printed (for a failure report)."""
        for instance in self.instances:
            print(f"--- last output of {instance.id} ---", file=sys.stderr)
            for line in instance.output:
                print(line, file=sys.stderr)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL what is left of the process group that ``process`` leads, and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already empty
    if process.poll() is None:
        process.wait(5)


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m example_app", description="Run the quart-wslb chat as N instances."
    )
    parser.add_argument("--instances", type=int, default=2, metavar="N", help="default: 2")
    parser.add_argument(
        "--port",
        type=int,
        metavar="BASE",
        help=f"first port; the others follow (default: {DEFAULT_PORT}, free ports with --demo)",
    )
    parser.add_argument(
        "--demo", action="store_true", help="drive two clients across the instances, then exit"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.instances <= 16:
        parser.error("--instances must be between 1 and 16")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    # Both stop everything; SIGINT explicitly too, since a shell may start us ignoring it.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    launcher = Launcher(echo=not args.demo)
    env = dict(os.environ)
    # The demo takes a prefix of its own (unless one is set), so that on a shared Redis
    # it touches no other keys and can check that it left none behind.
    own_prefix = ""
    if args.demo and not env.get("WSLB_PREFIX"):
        own_prefix = "wslb-demo-" + secrets.token_hex(4)
        env["WSLB_PREFIX"] = own_prefix
    started = time.monotonic()
    code = 1
    try:
        env["WSLB_REDIS_URL"] = launcher.redis_url()
        for index in range(1, args.instances + 1):
            launcher.spawn(index, _port(args, index), env)
        launcher.wait_ready()
        for instance in launcher.instances:
            print(f"{instance.id}: {instance.url}")
        if args.demo:
            code = _demo(launcher)
        else:
            print("Open two of these URLs in a browser and join one room. Ctrl-C stops all.")
            code = _watch(launcher)
    except KeyboardInterrupt:
        print("\nstopping")
        code = 130 if args.demo else 0
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        launcher.print_tails()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip this
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            killed = launcher.stop_instances()  # first: on the way out they leave the registry
            if killed:
                print(f"killed after {STOP_TIMEOUT:.0f}s without stopping: {', '.join(killed)}")
            if own_prefix and launcher.instances:
                _report_leftovers(env["WSLB_REDIS_URL"], own_prefix)
        finally:
            launcher.stop_redis()
        print(f"stopped everything it started ({time.monotonic() - started:.1f}s in all)")
    return code


def _port(args: argparse.Namespace, index: int) -> int:
    """The port of instance ``index``: free ports for a demo, else consecutive ones."""
    if args.port is None and args.demo:
        return free_port()
    port = int(args.port or DEFAULT_PORT) + index - 1
    if _port_taken(port):
        raise RuntimeError(f"port {port} is in use: pass --port BASE")
    return port


def _report_leftovers(url: str, prefix: str) -> None:
    """Count (then delete) the keys that the stopped instances left under ``prefix``."""
    client = redis.Redis.from_url(url, socket_timeout=2.0)
    try:
        keys = list(client.scan_iter(match="{" + prefix + "}*", count=1000))
        if keys:
            client.delete(*keys)
        print(f"Redis keys left under {{{prefix}}} after the graceful stop: {len(keys)}")
    except redis.RedisError as error:
        print(f"could not check Redis for leftover keys: {error}")
    finally:
        client.close()


def _watch(launcher: Launcher) -> int:
    """Wait for Ctrl-C/SIGTERM; stop early, and fail, if an instance dies."""
    while (dead := launcher.dead()) is None:
        time.sleep(0.5)
    print(f"{dead.id} exited with {dead.process.returncode}: stopping the others")
    launcher.print_tails()
    return 1


def _demo(launcher: Launcher) -> int:
    from websockets.exceptions import WebSocketException

    from .demo import DemoError, run_demo

    async def bounded() -> None:
        async with asyncio.timeout(DEMO_TIMEOUT):
            await run_demo([i.url for i in launcher.instances])

    try:
        asyncio.run(bounded())
    except (DemoError, TimeoutError, OSError, WebSocketException) as error:
        print(f"\nDEMO FAILED: {error or type(error).__name__}", file=sys.stderr)
        launcher.print_tails()
        return 1
    print("\nDemo passed: every message arrived, across instances.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
