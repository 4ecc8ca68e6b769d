"""Private Redis topologies for tests: a loopback Redis Cluster and a Sentinel set.

Both are built of :class:`~quart_wslb.testing.RedisServer` processes (each stopped by its
pid), keep nothing on disk and are ready when the constructor's ``start`` returns: every
slot served, every replica synced, every sentinel aware of the others. They need Redis 7
or later (sharded pub/sub); :func:`redis_version` tells what the binary is.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import pytest
import redis

from quart_wslb.testing import RedisServer, TLSFiles, find_redis_server

__all__ = (
    "RedisClusterSet",
    "SentinelSet",
    "needs_redis_7",
    "pid_of",
    "redis_version",
    "reshard",
    "server_of",
)

#: How long a topology may take to come up (a cluster needs a few gossip rounds).
READY_TIMEOUT = 30.0
#: The hash slots of a Redis Cluster.
SLOTS = 16384
#: The node timeout of the cluster and the down-after time of the sentinels, in ms:
#: short, so that fault tests see a failover within seconds.
FAILURE_MS = 2000


def redis_version(binary: str | None = None) -> tuple[int, ...]:
    """The version of ``binary`` (the ``redis-server`` the tests use by default)."""
    found = binary or find_redis_server()
    if found is None:
        return ()
    said = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=10)
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", said.stdout)
    return tuple(int(part) for part in match.groups()) if match else ()


def needs_redis_7(what: str) -> pytest.MarkDecorator:
    """Skip, saying why, where the ``redis-server`` the tests use is older than 7 or
    missing: ``what`` (the tests) need sharded pub/sub or a recent Sentinel."""
    return pytest.mark.skipif(
        redis_version()[:1] < (7,),
        reason=f"{what} need Redis >= 7 ({find_redis_server()} is "
        f"{'.'.join(map(str, redis_version())) or 'missing'})",
    )


def wait_until(check: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT) -> None:
    """Poll ``check`` until it holds; ``TimeoutError`` naming ``what`` past ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(0.05)


def _client(port: int, tls: TLSFiles | None = None, timeout: float = 5.0) -> redis.Redis:
    """A client of the node on ``port``, over TLS (trusting ``tls.ca``) if given."""
    if tls is None:
        return redis.Redis(port=port, socket_timeout=timeout)
    return redis.Redis(port=port, socket_timeout=timeout, ssl=True, ssl_ca_certs=tls.ca)


def _info(node: RedisServer, section: str) -> dict[str, object]:
    with _client(node.port, node.tls, timeout=2) as client:
        info: dict[str, object] = client.info(section)
        return info


def _synced(replica: RedisServer) -> bool:
    """Whether ``replica`` is linked to its master and done with the initial sync."""
    try:
        info = _info(replica, "replication")
    except redis.RedisError:
        return False
    return info.get("master_link_status") == "up" and info.get("master_sync_in_progress") == 0


class _Topology:
    """Processes started together and stopped together, by their pids."""

    servers: list[RedisServer]

    def start(self) -> Self:
        """Bring the topology up, ready for use; stops whatever started if that fails."""
        try:
            self._bring_up()
        except BaseException:
            self.close()
            raise
        return self

    def _bring_up(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop every process and remove its directory."""
        for server in self.servers:
            server.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RedisClusterSet(_Topology):
    """``masters`` masters with ``replicas`` replicas each, on loopback ports; with
    ``tls``, every node speaks TLS only, to clients, on the cluster bus and for
    replication (``TLSUnsupportedError`` from :meth:`start` if the binary cannot)."""

    def __init__(self, masters: int = 3, replicas: int = 1, tls: TLSFiles | None = None) -> None:
        self.size = masters * (1 + replicas)
        self.replicas_per_master = replicas
        self.tls = tls
        args: tuple[str, ...] = (
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(FAILURE_MS),
        )  # fmt: skip
        if tls is not None:
            args = (*args, "--tls-cluster", "yes", "--tls-replication", "yes")
        self.servers = [
            RedisServer(tls=tls, args=args, cluster_bus=True) for _ in range(self.size)
        ]

    @property
    def url(self) -> str:
        """A URL of one node (a cluster client finds the others; ``rediss://`` naming
        the CA with TLS)."""
        return self.servers[0].url

    def _bring_up(self) -> None:
        """Start the nodes, assign the slots, and wait until every replica is synced."""
        for server in self.servers:
            server.start()
        self._assign()
        wait_until(self._ready, "every node sees the cluster ok and every replica synced")

    def _assign(self) -> None:
        """Slots to the first masters in equal ranges, every node met, then each other
        node the replica of one master (no redis-cli needed)."""
        ports = [server.port for server in self.servers]
        masters = ports[: self.size // (1 + self.replicas_per_master)]
        for n, port in enumerate(masters):
            first, last = SLOTS * n // len(masters), SLOTS * (n + 1) // len(masters) - 1
            _run(port, "CLUSTER", "ADDSLOTSRANGE", first, last, tls=self.tls)
        for server in self.servers[1:]:
            meet = ("CLUSTER", "MEET", "127.0.0.1", server.port, server.bus_port)
            _run(ports[0], *meet, tls=self.tls)
        wait_until(
            lambda: all(_known(port, self.tls) == self.size for port in ports), "every node met"
        )
        ids = [_run(port, "CLUSTER", "MYID", tls=self.tls) for port in masters]
        for n, port in enumerate(ports[len(masters) :]):
            _run(port, "CLUSTER", "REPLICATE", ids[n % len(masters)], tls=self.tls)

    def masters(self) -> list[RedisServer]:
        """The nodes that are masters now."""
        return [s for s in self.servers if _role(s) == "master"]

    def replicas(self) -> list[RedisServer]:
        """The nodes that are replicas now."""
        return [s for s in self.servers if _role(s) == "slave"]

    def _ready(self) -> bool:
        try:
            if not all(_cluster_state(s) == "ok" for s in self.servers):
                return False
            replicas = self.replicas()
        except redis.RedisError:
            return False
        expected = self.size - self.size // (1 + self.replicas_per_master)
        return len(replicas) == expected and all(_synced(replica) for replica in replicas)


class SentinelSet(_Topology):
    """One master, ``replicas`` replicas and ``sentinels`` sentinels watching them as
    ``service``."""

    def __init__(self, service: str = "wslb", replicas: int = 1, sentinels: int = 3) -> None:
        self.service = service
        self.master = RedisServer()
        self.replica_servers = [
            RedisServer(args=("--replicaof", "127.0.0.1", str(self.master.port)))
            for _ in range(replicas)
        ]
        quorum = sentinels // 2 + 1
        config = (
            f"sentinel monitor {service} 127.0.0.1 {self.master.port} {quorum}\n"
            f"sentinel down-after-milliseconds {service} {FAILURE_MS}\n"
            f"sentinel failover-timeout {service} {FAILURE_MS * 3}\n"
        )
        self.sentinels = [
            RedisServer(config=config, args=("--sentinel",)) for _ in range(sentinels)
        ]
        self.servers = [self.master, *self.replica_servers, *self.sentinels]

    @property
    def url(self) -> str:
        """``redis+sentinel://`` URL of the sentinels and the service."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}"

    def _bring_up(self) -> None:
        """Start everything; wait until the replicas are synced and every sentinel
        knows the replicas and the other sentinels."""
        for server in self.servers:  # the master first
            server.start()
        wait_until(self._ready, "replicas synced and sentinels aware of each other")

    def master_port(self) -> int:
        """The port of the master, as the first sentinel sees it now."""
        with redis.Redis(port=self.sentinels[0].port, socket_timeout=2) as client:
            _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
            return int(port)

    def _ready(self) -> bool:
        if not all(_synced(replica) for replica in self.replica_servers):
            return False
        try:
            for sentinel in self.sentinels:
                fields = _fields(_run(sentinel.port, "SENTINEL", "MASTER", self.service))
                if int(fields["num-slaves"]) < len(self.replica_servers):
                    return False
                if int(fields["num-other-sentinels"]) < len(self.sentinels) - 1:
                    return False
        except redis.RedisError:
            return False
        return True


def _role(server: RedisServer) -> str:
    return str(_info(server, "replication").get("role"))


def _run(port: int, *command: object, tls: TLSFiles | None = None) -> Any:
    """One command to the node on ``port`` (over TLS if given)."""
    with _client(port, tls) as client:
        return client.execute_command(*command)  # type: ignore[no-untyped-call, unused-ignore]


def _fields(reply: Any) -> dict[str, Any]:
    """A SENTINEL MASTER reply as a dict of str (redis-py parses it, or not, by version)."""
    if not isinstance(reply, dict):
        reply = dict(zip(reply[::2], reply[1::2], strict=True))
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in reply.items()}


def _known(port: int, tls: TLSFiles | None = None) -> int:
    """How many nodes the node on ``port`` knows (itself included)."""
    raw = _run(port, "CLUSTER", "NODES", tls=tls)
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return len([line for line in text.splitlines() if line.strip()])


def _cluster_state(server: RedisServer) -> str:
    raw = _run(server.port, "CLUSTER", "INFO", tls=server.tls)
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    match = re.search(r"cluster_state:(\w+)", text)
    return match.group(1) if match else ""


def server_of(cluster: RedisClusterSet, port: int) -> RedisServer:
    return next(server for server in cluster.servers if server.port == port)


def pid_of(server: RedisServer) -> int:
    if server.process is None:
        raise RuntimeError("the server is not running")
    return server.process.pid


def reshard(slot: int, source: int, target: int, ports: list[int]) -> None:
    """Move ``slot`` from the master on ``source`` to the one on ``target`` as redis-cli
    would: IMPORTING, MIGRATING, every key MIGRATEd, then SETSLOT NODE everywhere."""
    with redis.Redis(port=source) as src, redis.Redis(port=target) as dst:
        dst_id = dst.execute_command("CLUSTER MYID")
        dst.execute_command(
            "CLUSTER SETSLOT", slot, "IMPORTING", src.execute_command("CLUSTER MYID")
        )
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        for port in [target, source, *(p for p in ports if p not in (source, target))]:
            with redis.Redis(port=port) as node:
                node.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
