"""Server processes of a benchmark run, and what is read from them: CPU time and Redis INFO.

Every process is started in a session of its own and stopped by its pid: SIGTERM to the
parent, then SIGKILL to its process group after a timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import redis

from quart_wslb.testing import free_port

__all__ = (
    "CpuMeter",
    "LoadWatch",
    "Server",
    "busy_cpu",
    "get_json",
    "quietest",
    "redis_info",
    "start_servers",
    "stop_all",
    "wait_quiet",
)

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0


def get_json(port: int, path: str, timeout: float = 120.0) -> Any:
    """A blocking ``GET`` to a local server; the JSON answer."""
    url = f"http://127.0.0.1:{port}{path}"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


async def aget_json(port: int, path: str, timeout: float = 120.0) -> Any:
    """:func:`get_json` in a thread, so the event loop (and its clients) keeps running."""
    return await asyncio.to_thread(get_json, port, path, timeout)


@dataclass
class Server:
    """One server process (and, for Hypercorn, its worker) of one instance."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def spawn(cls, name: str, argv: Sequence[str], env: dict[str, str], log_dir: Path) -> Server:
        """Start ``argv`` (with ``{port}`` filled in) on a free port."""
        port = free_port()
        log = log_dir / f"{name}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [a.format(port=port) for a in argv],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(name, port, process, log)

    def wait_ready(self, deadline: float) -> None:
        """Block until ``/stats`` answers (or raise with the log)."""
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                get_json(self.port, "/stats", timeout=1.0)
                return
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.name} did not start:\n{self.log.read_text()[-3000:]}"
                    ) from None
                time.sleep(0.05)

    def pids(self) -> list[int]:
        """The parent and every descendant (Hypercorn's worker)."""
        try:
            parent = psutil.Process(self.process.pid)
            return [parent.pid, *(c.pid for c in parent.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def worker_pid(self) -> int:
        """The process that runs the app: the deepest descendant, else the parent."""
        return self.pids()[-1]

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the parent; SIGKILL the whole group if it has not ended in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)


def server_argv(kind: str, target: str) -> list[str]:
    """The command line of one instance: ``hypercorn`` or ``uvicorn`` serving ``target``."""
    if kind == "hypercorn":
        return [sys.executable, "-m", "hypercorn", target, "--bind", "127.0.0.1:{port}",
                "--graceful-timeout", "3", "--log-level", "warning"]  # fmt: skip
    if kind == "uvicorn":
        return [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1",
                "--port", "{port}", "--log-level", "warning", "--no-access-log",
                "--timeout-graceful-shutdown", "3"]  # fmt: skip
    raise ValueError(f"unknown server {kind!r}")


def start_servers(
    n: int, kind: str, target: str, envs: Iterable[dict[str, str]], log_dir: Path
) -> list[Server]:
    """Start ``n`` instances at once and wait for all; on failure stop those started."""
    servers: list[Server] = []
    try:
        for index, env in zip(range(n), envs, strict=False):
            servers.append(
                Server.spawn(
                    f"{target.split(':')[0]}-{index}", server_argv(kind, target), env, log_dir
                )
            )
        deadline = time.monotonic() + START_TIMEOUT
        for server in servers:
            server.wait_ready(deadline)
    except BaseException:
        stop_all(servers)
        raise
    return servers


def stop_all(servers: Iterable[Server]) -> None:
    """Stop every server, each by its own pid."""
    for server in servers:
        server.stop()


class CpuMeter:
    """User + system CPU seconds of a fixed set of processes, read twice."""

    def __init__(self, pids: Iterable[int]) -> None:
        self._processes = [psutil.Process(p) for p in pids]

    def read(self) -> float:
        """CPU seconds used so far by every process still alive."""
        total = 0.0
        for process in self._processes:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total


def busy_cpu() -> float:
    """CPU seconds the whole machine has spent running processes (user, nice, system).

    Interrupt time is left out: loopback traffic is partly handled there, unattributed,
    and it would otherwise count as someone else's load."""
    times = psutil.cpu_times()
    return float(times.user + times.nice + times.system)


class LoadWatch:
    """How many cores processes other than ``pids`` kept busy between two reads."""

    def __init__(self, pids: Iterable[int]) -> None:
        self._ours = CpuMeter(pids)
        self._start = (busy_cpu(), self._ours.read(), time.monotonic())

    def foreign_cores(self) -> float:
        busy, ours, wall = self._start
        foreign = busy_cpu() - busy - (self._ours.read() - ours)
        return max(0.0, foreign) / max(time.monotonic() - wall, 1e-9)


def wait_quiet(limit: float, cores: float = 0.3) -> float:
    """Wait (at most ``limit`` s) until the machine is busier than ``cores`` for no
    one; returns the busy cores seen last. Other work on a shared machine (a test run)
    would otherwise be measured as ours."""
    deadline = time.monotonic() + limit
    while True:
        start, busy = time.monotonic(), busy_cpu()
        time.sleep(0.5)
        seen = (busy_cpu() - busy) / (time.monotonic() - start)
        if seen < cores or time.monotonic() > deadline:
            return seen


async def quietest(
    run: Callable[[], Awaitable[dict[str, Any]]], attempts: int, quiet_wait: float, limit: float
) -> dict[str, Any]:
    """``run()`` up to ``attempts`` times while other processes keep more than ``limit``
    cores busy (waiting for quiet in between); the row with the least foreign load, with
    ``attempts`` set to how many runs it took."""
    best: dict[str, Any] | None = None
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            await asyncio.to_thread(wait_quiet, quiet_wait)
        row = await run()
        if best is None or row["foreign_cores"] < best["foreign_cores"]:
            best = row
        if row["foreign_cores"] <= limit:
            break
    if best is None:
        raise ValueError("attempts must be at least 1")
    return {**best, "attempts": attempt}


def redis_info(url: str, section: str) -> dict[str, Any]:
    """``INFO section`` of the Redis at ``url``."""
    client = redis.Redis.from_url(url)
    try:
        return dict(client.info(section))
    finally:
        client.close()
