"""Real Hypercorn processes of ``tests.cluster_app``, helpers to talk to them, and the
Redis topologies they run on (:class:`Where`): one Redis, a Redis Cluster, a Sentinel set.
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
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from websockets.asyncio.client import ClientConnection, connect

from quart_wslb.keys import CLUSTER_SHARDS, Keys
from quart_wslb.testing import free_port
from tests.topology import RedisClusterSet, SentinelSet

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0


class HttpError(Exception):
    """An instance answered with an HTTP error status."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status


def http(port: int, path: str, body: object = None, timeout: float = 10.0) -> Any:
    """A blocking HTTP call to one instance; JSON (or raw bytes) in, JSON out."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        headers={"content-type": "application/json"},
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:  # closes its socket now, not at garbage collection
            raise HttpError(error.code, error.read()) from None


@dataclass
class Instance:
    """One Hypercorn process (a parent and its worker, in their own process group)."""

    id: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def ws(self, path: str) -> str:
        """The ``ws://`` URL of ``path`` on this instance."""
        return f"ws://127.0.0.1:{self.port}{path}"

    async def call(self, path: str, body: object = None) -> Any:
        """An HTTP call to this instance from async code."""
        return await asyncio.to_thread(http, self.port, path, body)

    async def send(self, selector: Mapping[str, Any], message: object) -> int:
        """``wslb.send`` on this instance; returns the routed count."""
        result = await self.call("/send", {"selector": selector, "message": message})
        return int(result["routed"])

    async def stats(self) -> dict[str, Any]:
        """Counters of the instance (envelopes received, drops, local connections)."""
        return dict(await self.call("/stats"))

    def wait_ready(self) -> None:
        """Block until the instance answers HTTP."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.id} exited:\n{self.log.read_text()}")
            try:
                http(self.port, "/stats", timeout=1.0)
                return
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.id} did not start:\n{self.log.read_text()}"
                    ) from None
                time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int | None:
        """Graceful stop: SIGTERM to the parent only, so the worker runs after_serving."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.crash()
        self._reap_group()
        return self.process.returncode

    def pause(self) -> None:
        """SIGSTOP the whole process group (parent and worker): frozen, sockets open."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the process group after :meth:`pause`."""
        try:
            os.killpg(self.process.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

    def crash(self) -> None:
        """SIGKILL the whole process group: the worker gets no chance to clean up."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)

    def _reap_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Cluster:
    """``n`` instances on one Redis and one prefix."""

    def __init__(
        self, redis_url: str, prefix: str, n: int, log_dir: str, env: Mapping[str, str]
    ) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.n = n
        self.log_dir = Path(log_dir)
        self.env = dict(env)
        self.instances: list[Instance] = []

    def __getitem__(self, index: int) -> Instance:
        return self.instances[index]

    def spawn(self, index: int) -> Instance:
        """Start one more instance, named ``i<index>``, and wait until it serves."""
        port = free_port()
        instance_id = f"i{index}"
        env = {
            **os.environ,
            "WSLB_REDIS_URL": self.redis_url,
            "WSLB_PREFIX": self.prefix,
            "WSLB_INSTANCE_ID": instance_id,
            "PYTHONPATH": str(ROOT),
            **self.env,
        }
        log = self.log_dir / f"{instance_id}-{port}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "hypercorn", "tests.cluster_app:app",
                 "--config", "python:tests.cluster_app.hypercorn",
                 "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "5"],
                cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        instance = Instance(instance_id, port, process, log)
        self.instances.append(instance)
        return instance

    def start(self) -> None:
        """Start every instance, then wait for all of them."""
        started = [self.spawn(i) for i in range(self.n)]
        for instance in started:
            instance.wait_ready()

    def stop(self) -> None:
        """Stop every instance still running, gracefully."""
        for instance in self.instances:
            instance.stop()


class Clients:
    """Real WebSocket clients of a test; every one is closed when the test ends."""

    def __init__(self) -> None:
        self.open: list[ClientConnection] = []

    async def join(
        self, instance: Instance, user: str, room: str = "red"
    ) -> tuple[ClientConnection, str]:
        """Connect ``user`` to ``/ws/<room>``; returns the client and its connection id."""
        client = await connect(instance.ws(f"/ws/{room}?user={user}"))
        self.open.append(client)
        hello = json.loads(await asyncio.wait_for(client.recv(), 5))
        if hello.get("user") != user:
            raise AssertionError(f"unexpected hello {hello!r}")
        return client, str(hello["hello"])

    async def close(self) -> None:
        """Close every client (those the server closed already are skipped fast)."""
        await asyncio.gather(*(c.close() for c in self.open), return_exceptions=True)


#: How long "nothing else arrives" is watched.
QUIET = 0.3


async def receive(client: ClientConnection) -> Any:
    """The next frame of ``client`` (within 5 s), JSON decoded when it is JSON text."""
    frame = await asyncio.wait_for(client.recv(), 5)
    return json.loads(frame) if isinstance(frame, str) and frame[:1] in "{[" else frame


async def assert_silent(*clients: ClientConnection) -> None:
    """Nothing arrives at any of ``clients`` for ``QUIET`` seconds: all watched at once,
    so a check of many clients costs ``QUIET``, not ``QUIET`` for each."""

    async def silent(client: ClientConnection) -> None:
        try:
            frame = await asyncio.wait_for(client.recv(), QUIET)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame {frame!r}")

    await asyncio.gather(*(silent(client) for client in clients))


#: The topologies a suite runs on, as ``params`` of its ``where`` fixture: one Redis (the
#: tests' own, or ``WSLB_TEST_REDIS_URL``; as the ACL user in the ACL run), and the
#: private Redis Cluster and Sentinel set, marked ``topology`` (the ACL run leaves them
#: out: they have no ACL user).
TOPOLOGIES = (
    "redis",
    pytest.param("cluster", marks=pytest.mark.topology),
    pytest.param("sentinel", marks=pytest.mark.topology),
)


@dataclass
class Where:
    """A topology the instances run on: the URL they are given, what else they are told,
    their count of shards, and how a test inspects it as an administrator (each test's
    own prefix keeps its keys apart on a topology the session shares)."""

    name: str
    url: str
    admin_url: str
    shards: int = 1
    env: dict[str, str] = field(default_factory=dict)

    @property
    def cluster(self) -> bool:
        """Whether this is a Redis Cluster (sharded channels, keys over many slots)."""
        return self.name == "cluster"

    def admin(self) -> Any:
        """A new admin client (a cluster client on a cluster), to close after use."""
        if self.cluster:
            return RedisCluster.from_url(self.admin_url)
        return aioredis.Redis.from_url(self.admin_url)

    def keys(self, prefix: str) -> Keys:
        """The names the instances use for ``prefix``: :meth:`Keys.views` are the shards."""
        return Keys(prefix, shards=self.shards)

    async def scan(self, prefix: str) -> list[bytes]:
        """Every key under ``prefix``, whatever its shard (and node)."""
        async with self.admin() as client:
            return [
                key
                for pattern in ("{" + prefix + "}*", "{" + prefix + "|*")
                async for key in client.scan_iter(match=pattern, count=1000)
            ]

    async def subscribers(self, channels: Sequence[str]) -> list[int]:
        """How many clients listen on each of ``channels``: PUBSUB NUMSUB, or on a
        cluster PUBSUB SHARDNUMSUB asked of the master that owns each channel's slot
        (a sharded channel is known to that node and its replicas only)."""
        if not self.cluster:
            async with self.admin() as client:
                found = dict(await client.pubsub_numsub(*channels))
            return [int(found[channel.encode()]) for channel in channels]
        counts = []
        async with self._owners() as owner:
            for channel in channels:
                reply = await owner(channel).pubsub_shardnumsub(channel)
                counts.append(int(_pairs(reply)[channel.encode()]))
        return counts

    async def publish(self, channel: str, data: bytes) -> int:
        """Publish ``data`` on ``channel`` as an emitter does (SPUBLISH on a cluster, to
        the owner of the channel's slot); the count of clients that received it."""
        if not self.cluster:
            async with self.admin() as client:
                return int(await client.publish(channel, data))
        async with self._owners() as owner:
            return int(await owner(channel).spublish(channel, data))

    @asynccontextmanager
    async def _owners(self) -> AsyncIterator[Callable[[str], aioredis.Redis]]:
        """On a cluster: what gives a plain client of the master that owns a key's slot
        now, asked of the cluster's own map (a sharded channel lives on that node: a
        command must reach it, not whichever node a cluster client would pick); the
        clients are closed at the end."""
        nodes: dict[tuple[str, int], aioredis.Redis] = {}
        async with self.admin() as cluster:
            await cluster.initialize()

            def owner(key: str) -> aioredis.Redis:
                node = cluster.get_node_from_key(key)
                address = (node.host, node.port)
                if address not in nodes:
                    nodes[address] = aioredis.Redis(host=node.host, port=node.port)
                return nodes[address]

            try:
                yield owner
            finally:
                for client in nodes.values():
                    await client.aclose()


def _pairs(reply: Any) -> dict[bytes, Any]:
    """A ``channel, count, ...`` reply (a list of pairs, or flat, by redis-py version)."""
    if isinstance(reply, dict):
        return cast(dict[bytes, Any], reply)
    flat = (
        [part for pair in reply for part in pair]
        if reply and isinstance(reply[0], (list, tuple))
        else list(reply)
    )
    return dict(zip(flat[::2], flat[1::2], strict=True))


def where_of(request: pytest.FixtureRequest, name: str, *, shards: int = 1) -> Where:
    """The :class:`Where` of topology ``name`` (one of :data:`TOPOLOGIES`); the
    session's ``cluster_set`` or ``sentinel_set`` starts at the first test that needs it.
    ``shards``: the instances' count on one Redis (a cluster has its default)."""
    if name == "redis":
        env = {"WSLB_SHARDS": str(shards)} if shards > 1 else {}
        url, admin = (
            request.getfixturevalue("redis_url"),
            request.getfixturevalue("admin_redis_url"),
        )
        return Where(name, url, admin, shards, env)
    if name == "cluster":
        cluster = cast(RedisClusterSet, request.getfixturevalue("cluster_set"))
        return Where(name, cluster.url, cluster.url, CLUSTER_SHARDS)
    sentinels = cast(SentinelSet, request.getfixturevalue("sentinel_set"))
    # Tests inspect the master: the session's set never fails over (fault tests have
    # sets of their own), so its address holds for the session.
    return Where(name, sentinels.url, f"redis://127.0.0.1:{sentinels.master_port()}")
