"""The example cluster as one object: a Redis, N Hypercorn instances, and the front.

``with Cluster(instances=3) as cluster:`` starts, in order, a private ``redis-server``
(unless a Redis URL is given), ``example_app.app:app`` as N Hypercorn processes on their
own ports, each in a process group of its own with its own ``WSLB_INSTANCE_ID``, and the
round-robin :mod:`front <example_app.front>` that the browser talks to. ``stop()`` (and
leaving the ``with`` block) ends exactly what it started, by pid: SIGTERM to each
Hypercorn parent (so its worker runs ``after_serving``, closes its clients with 1001 and
leaves the registry), SIGKILL to the process group of any still there after
``STOP_TIMEOUT``, then the front, then the Redis and its temporary directory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from quart_wslb.testing import RedisServer, free_port

from .front import Backend, Front, FrontThread

__all__ = ("Cluster", "Instance")

ROOT = Path(__file__).resolve().parent.parent
#: Seconds for every instance to answer HTTP, and for a Hypercorn parent to exit on SIGTERM.
START_TIMEOUT, STOP_TIMEOUT = 15.0, 6.0
#: Hypercorn's ``--graceful-timeout``: how long a stopping instance lets its websockets
#: run before it cancels them (and they get 1001).
GRACEFUL_TIMEOUT = 2


@dataclass
class Instance:
    """One Hypercorn process (a parent and its worker, in a process group of their own)."""

    id: str
    port: int
    process: subprocess.Popen[bytes]
    output: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int:
        """The Hypercorn parent's pid, which is also its process group id."""
        return self.process.pid

    def ready(self) -> bool:
        """Whether it answers ``GET /health`` (so it has subscribed to Redis)."""
        try:
            with urllib.request.urlopen(self.url + "health", timeout=1.0) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def pump(self, stream: IO[bytes], echo: bool) -> None:
        """Read the process's output until EOF; keep the tail, print it if ``echo``."""
        with stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip()
                self.output.append(line)
                if echo:
                    print(f"[{self.id}] {line}", flush=True)


class Cluster:
    """Everything the example runs, so that :meth:`stop` can end exactly that.

    ``port`` is the front's; the instances take the ports after it. Without it every
    port is a free one. ``redis_url`` names a running Redis; without it a private
    ``redis-server`` is started. ``env`` adds variables for the instances (such as
    ``WSLB_PREFIX``); ``echo`` prints their output; ``on_websocket`` is told which
    instance the front sent each WebSocket to.
    """

    def __init__(
        self,
        *,
        instances: int = 3,
        port: int | None = None,
        redis_url: str | None = None,
        env: Mapping[str, str] | None = None,
        echo: bool = False,
        on_websocket: Callable[[str, Backend], None] | None = None,
    ) -> None:
        if not 1 <= instances <= 16:
            raise ValueError("instances must be between 1 and 16")
        self.size = instances
        self.port = port
        self.redis_url = redis_url
        self.env = dict(env or {})
        self.echo = echo
        self.on_websocket = on_websocket
        self.redis: RedisServer | None = None
        self.instances: list[Instance] = []
        self.front: FrontThread | None = None

    @property
    def url(self) -> str:
        """The front's URL: the one address a browser needs."""
        if self.front is None:
            raise RuntimeError("the cluster is not started")
        return self.front.front.url

    def pids(self) -> list[int]:
        """The pid of every process started: the Redis, then each Hypercorn parent."""
        redis = self.redis.process if self.redis is not None else None
        found = [redis.pid] if redis is not None else []
        return found + [i.pid for i in self.instances]

    def start(self) -> None:
        """Start the Redis (if needed), the instances and the front; wait for them all."""
        if self.redis_url is None:
            self.redis = RedisServer()
            self.redis.start()
            self.redis_url = self.redis.url
        env = {**os.environ, **self.env, "WSLB_REDIS_URL": self.redis_url}
        ports = self._ports()
        for index, port in enumerate(ports[1:], 1):
            self._spawn(index, port, env)
        self._wait_ready()
        backends = [Backend(i.id, "127.0.0.1", i.port) for i in self.instances]
        self.front = FrontThread(Front(backends, port=ports[0], on_websocket=self.on_websocket))
        self.front.start()

    def _ports(self) -> list[int]:
        """The front's port, then one per instance."""
        if self.port is None:
            return [0] + [free_port() for _ in range(self.size)]
        ports = [self.port + n for n in range(self.size + 1)]
        for port in ports:
            if _port_taken(port):
                raise RuntimeError(f"port {port} is in use: pass another --port BASE")
        return ports

    def _spawn(self, index: int, port: int, env: dict[str, str]) -> Instance:
        instance_id = f"instance-{index}"
        pythonpath = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        process = subprocess.Popen(
            [sys.executable, "-m", "hypercorn", "example_app.app:app",
             "--config", "python:example_app.app.hypercorn",
             "--bind", f"127.0.0.1:{port}", "--graceful-timeout", str(GRACEFUL_TIMEOUT)],
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
            instance.reader = threading.Thread(
                target=instance.pump, args=(process.stdout, self.echo), daemon=True
            )
            instance.reader.start()
        return instance

    def _wait_ready(self) -> None:
        """Block until every instance serves; raise if one exits or time runs out."""
        deadline = time.monotonic() + START_TIMEOUT
        for instance in self.instances:
            while not instance.ready():
                if instance.process.poll() is not None:
                    raise RuntimeError(f"{instance.id} exited with {instance.process.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{instance.id} did not serve within {START_TIMEOUT:.0f}s")
                time.sleep(0.05)

    def running(self) -> list[Instance]:
        """The instances whose process is still running."""
        return [i for i in self.instances if i.process.poll() is None]

    def stop(self) -> list[str]:
        """Stop everything, instances first; returns the ids of instances killed.

        It prints nothing, so that a closed stdout cannot interrupt it.
        """
        try:
            return self.stop_instances()
        finally:
            if self.front is not None:
                self.front.stop()
            if self.redis is not None:
                self.redis.close()
                self.redis = None

    def stop_instances(self) -> list[str]:
        """SIGTERM every Hypercorn parent, wait, then SIGKILL what is left of each group."""
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
        for instance in self.instances:
            if instance.reader is not None:  # it ends at EOF, now that the group is gone
                instance.reader.join(2.0)
        return killed

    def tails(self) -> str:
        """The last lines each instance printed (for a failure report)."""
        parts = []
        for instance in self.instances:
            parts.append(f"--- last output of {instance.id} ---")
            parts.extend(instance.output)
        return "\n".join(parts)

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


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
