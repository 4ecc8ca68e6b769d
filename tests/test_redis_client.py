"""The clients quart-wslb builds: a bounded pool that makes callers wait, never fail;
``rediss://`` to a private TLS redis-server whose certificate comes from a throwaway CA;
and what a ``redis+sentinel://`` URL says (tests/test_sentinel.py runs it on sentinels)."""

from __future__ import annotations

import asyncio
import json
import re
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.sentinel import (
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from websockets.asyncio.client import ClientConnection, connect

from quart_wslb import Emitter, UserSelector
from quart_wslb._compat import packing_connection
from quart_wslb.keys import Keys
from quart_wslb.redis_client import SentinelURL, make_client, parse_sentinel_url
from quart_wslb.testing import RedisServer, TLSUnsupportedError
from tests.cluster import Clients, Cluster, Instance
from tests.support import tls_files

StartCluster = Callable[..., Cluster]
#: Simultaneous connects of the burst: a crashed instance's clients landing on a survivor.
BURST = 1000
#: The instance's pool bound in that test: far fewer connections than clients.
BOUND = 20


async def _connect_and_echo(instance: Instance, n: int) -> ClientConnection:
    """Connect user ``u<n>`` alone in room ``r<n>``, then prove it is routable at once:
    its handler sends what it says to its room (a lookup in Redis), which reaches it
    only if it is registered. One round trip after the handshake: the registrations
    are what the burst tests, and each client costs the shared CI little more."""
    client = await connect(instance.ws(f"/ws/r{n}?user=u{n}"), open_timeout=60)
    hello = json.loads(await asyncio.wait_for(client.recv(), 60))
    assert hello["user"] == f"u{n}", hello
    await client.send("hi")
    echo = json.loads(await asyncio.wait_for(client.recv(), 60))
    assert echo == {"from": f"u{n}", "text": "hi"}, echo
    return client


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


@pytest.mark.integration
@pytest.mark.timeout(240)
async def test_make_client_burst_of_connects_registers_every_connection(
    start_cluster: StartCluster, admin_redis_url: str, prefix: str
) -> None:
    _raise_fd_limit(4 * BURST)
    cluster = start_cluster(1, WSLB_REDIS_MAX_CONNECTIONS=str(BOUND))
    instance = cluster[0]
    started = time.monotonic()
    results = await asyncio.gather(
        *(_connect_and_echo(instance, n) for n in range(BURST)), return_exceptions=True
    )
    took = time.monotonic() - started
    clients = [r for r in results if isinstance(r, ClientConnection)]
    failures = [r for r in results if not isinstance(r, ClientConnection)]
    log = instance.log.read_text()
    unreachable = log.count("opened while Redis is unreachable")
    try:
        assert not failures, (
            f"{len(failures)} of {BURST} clients failed in {took:.1f}s "
            f"({unreachable} registrations failed), first: {failures[0]!r}"
        )
        assert unreachable == 0, f"{unreachable} registrations failed"
        redis = aioredis.Redis.from_url(admin_redis_url)
        try:
            keys = Keys(prefix)
            registered = await redis.hlen(keys.records(instance.id))
            names = await redis.client_list()
        finally:
            await redis.aclose()
        assert registered == BURST, f"{registered} of {BURST} records"
        # The instance's connections, at most the bound, and this test's client.
        assert len(names) <= BOUND + 1, f"{len(names)} Redis connections, bound {BOUND}"
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    # Every unregistration succeeds too (the same burst, the other way).
    async with aioredis.Redis.from_url(admin_redis_url) as redis:
        deadline = time.monotonic() + 60
        while (left := await redis.hlen(Keys(prefix).records(instance.id))) and (
            time.monotonic() < deadline
        ):
            await asyncio.sleep(0.2)
    log = instance.log.read_text()
    failed = log.count("could not unregister")
    assert left == 0 and failed == 0, f"{left} records left, {failed} unregisters failed"


@pytest.mark.integration
async def test_make_client_pool_is_bounded_and_waits(private_redis: RedisServer) -> None:
    client = make_client(private_redis.url, 5.0, max_connections=3)
    try:
        started = time.monotonic()
        replies = await asyncio.gather(*(client.ping() for _ in range(50)))
        took = time.monotonic() - started
        assert replies == [True] * 50, f"after {took:.2f}s"
        info = await client.info("clients")
        assert info["connected_clients"] <= 3, info
    finally:
        await client.aclose()


@pytest.mark.integration
async def test_make_client_gives_up_waiting_for_a_connection_within_the_timeout(
    private_redis: RedisServer,
) -> None:
    client = make_client(private_redis.url, 0.5, max_connections=1)
    try:
        held = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        started = time.monotonic()
        with pytest.raises(RedisConnectionError, match="No connection available"):
            await client.ping()
        took = time.monotonic() - started
        assert took < 0.5 + 1.0, f"waited {took:.2f}s for a connection, timeout 0.5s"
        await client.connection_pool.release(held)
        assert await client.ping() is True
    finally:
        await client.aclose()


@pytest.fixture(name="tls_redis")
def fixture_tls_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server that speaks TLS only, with a certificate for 127.0.0.1 signed by a CA
    made for this test."""
    server = RedisServer(tls=tls_files(tmp_path))
    try:
        server.start()
    except TLSUnsupportedError as error:
        pytest.skip(f"{error}: install a redis-server built with TLS (Debian's is)")
    try:
        yield server
    finally:
        server.close()


@pytest.mark.integration
async def test_make_client_over_tls_trusts_the_ca_named_in_the_url(
    tls_redis: RedisServer,
) -> None:
    assert tls_redis.url.startswith("rediss://") and "ssl_ca_certs=" in tls_redis.url
    client = make_client(tls_redis.url, 5.0)
    try:
        assert await client.set("k", "v")
        assert await client.get("k") == b"v"
    finally:
        await client.aclose()
    # Without the CA the server's certificate is not trusted: verification is on.
    untrusted = make_client(tls_redis.url.partition("?")[0], 5.0)
    try:
        with pytest.raises(RedisConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.ping()
    finally:
        await untrusted.aclose()


@pytest.mark.integration
@pytest.mark.timeout(90)
async def test_cluster_over_tls_delivers_across_instances_and_from_an_emitter(
    tls_redis: RedisServer, start_cluster: StartCluster, clients: Clients, prefix: str
) -> None:
    cluster = start_cluster(2, url=tls_redis.url)
    ann, _ = await clients.join(cluster[0], "ann", "red")
    bob, _ = await clients.join(cluster[1], "bob", "red")
    await ann.send("hello over tls")  # a room message: i0 routes it, i1 delivers it
    for client in (ann, bob):
        got = json.loads(await asyncio.wait_for(client.recv(), 5))
        assert got == {"from": "ann", "text": "hello over tls"}
    with Emitter(tls_redis.url, prefix=prefix) as emitter:
        assert await asyncio.to_thread(emitter.send, UserSelector("bob"), "from the emitter") == 1
    assert await asyncio.wait_for(bob.recv(), 5) == "from the emitter"


def test_parse_sentinel_url_reads_sentinels_service_db_and_credentials() -> None:
    url = parse_sentinel_url("redis+sentinel://app:p%40ss@s1:26380,[::1]:26381,s3/main/2")
    assert url == SentinelURL(
        sentinels=(("s1", 26380), ("::1", 26381), ("s3", 26379)),
        service="main",
        tls=False,
        master={"username": "app", "password": "p@ss", "db": 2},
        sentinel={},
    )


def test_parse_sentinel_url_defaults_to_database_0_without_auth() -> None:
    url = parse_sentinel_url("redis+sentinel://s1:5000/main")
    assert (url.sentinels, url.service, url.master, url.sentinel) == (
        (("s1", 5000),),
        "main",
        {"db": 0},
        {},
    )


def test_parse_sentinel_url_sentinel_auth_comes_from_its_own_parameters() -> None:
    url = parse_sentinel_url(
        "redis+sentinel://:master-pw@s1/main?sentinel_username=watch&sentinel_password=s%26pw"
        "&client_name=app&health_check_interval=10"
    )
    assert url.sentinel == {"username": "watch", "password": "s&pw"}
    assert url.master == {
        "password": "master-pw",
        "db": 0,
        "client_name": "app",
        "health_check_interval": 10,
    }


def test_parse_sentinel_url_tls_applies_the_ssl_options_to_the_sentinels_too() -> None:
    url = parse_sentinel_url(
        "REDISS+SENTINEL://s1/main?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required&client_name=x"
    )
    assert url.tls is True
    assert url.master == {
        "db": 0,
        "ssl_ca_certs": "/ca.pem",
        "ssl_cert_reqs": "required",
        "client_name": "x",
    }
    assert url.sentinel == {"ssl_ca_certs": "/ca.pem", "ssl_cert_reqs": "required"}


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel:///main", "names no sentinel"),
        ("redis+sentinel://user:pw@/main", "names no sentinel"),
        ("redis+sentinel://s1,,s2/main", "has no host"),
        ("redis+sentinel://:26379/main", "has no host"),
        ("redis+sentinel://s1", "names no service"),
        ("redis+sentinel://s1/", "names no service"),
        ("redis+sentinel://s1?x=1", "names no service"),
        ("redis+sentinel://s1:port/main", "bad port of sentinel 's1:port'"),
        ("redis+sentinel://s1:0/main", "bad port"),
        ("redis+sentinel://s1:65536/main", "bad port"),
        ("redis+sentinel://s1:/main", "bad port"),
        ("redis+sentinel://[::1]x/main", "bad port"),
        ("redis+sentinel://s1/main/zero", "bad database number"),
        ("redis+sentinel://s1/main/-1", "bad database number"),
        ("redis+sentinel://s1/main/0/x", "path is /<service_name>"),
        ("redis+sentinel://s1/main?socket_timeout=soon", "socket_timeout"),
        ("redis://s1/main", "not a Sentinel URL"),
    ],
)
def test_parse_sentinel_url_names_what_is_wrong(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_sentinel_url(url)


def test_make_client_rejects_a_bad_sentinel_url() -> None:
    with pytest.raises(ValueError, match="names no service"):
        make_client("redis+sentinel://s1:26379", 1.0)


async def test_make_client_sentinel_url_is_a_bounded_waiting_pool_of_the_master() -> None:
    """Nothing connects until a command: the client is built from the URL alone."""
    client = make_client("redis+sentinel://s1:1,s2:2/main/3?client_name=app", 2.5, 7)
    try:
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool) and pool.is_master
        assert isinstance(pool, BlockingConnectionPool)
        assert (pool.service_name, pool.max_connections, pool.timeout) == ("main", 7, 2.5)
        assert issubclass(pool.connection_class, SentinelManagedConnection)
        packing = packing_connection(SentinelManagedConnection)
        assert packing is None or pool.connection_class is packing
        options = pool.connection_kwargs
        assert (options["db"], options["client_name"]) == (3, "app")
        assert (options["socket_timeout"], options["socket_connect_timeout"]) == (2.5, 2.5)
        sentinels = pool.sentinel_manager.sentinels
        addresses = [s.connection_pool.connection_kwargs for s in sentinels]
        assert [(a["host"], a["port"], a["socket_timeout"]) for a in addresses] == [
            ("s1", 1, 2.5),
            ("s2", 2, 2.5),
        ]
    finally:
        await client.aclose()


async def test_make_client_tls_sentinel_url_speaks_tls_everywhere() -> None:
    client = make_client("rediss+sentinel://s1/main?ssl_ca_certs=/ca.pem", 1.0)
    try:
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.connection_class is SentinelManagedSSLConnection
        assert pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"
        sentinel = pool.sentinel_manager.sentinels[0].connection_pool
        assert sentinel.connection_kwargs["ssl_ca_certs"] == "/ca.pem"
        assert sentinel.connection_class.__name__ == "SSLConnection"
    finally:
        await client.aclose()
