"""Shared fixtures: a real Redis (private, or ``WSLB_TEST_REDIS_URL``), fakeredis, and
clusters of Hypercorn processes."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator

import fakeredis
import pytest
import redis
from redis.asyncio import Redis

from quart_wslb.testing import RedisServer
from tests.cluster import Clients, Cluster


@pytest.fixture(autouse=True)
def no_exported_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every app, emitter and instance reads ``WSLB_*`` from the environment: options
    exported in the shell that runs the tests must not reach them (``WSLB_TEST_*`` are
    the tests' own)."""
    for name in list(os.environ):
        if name.startswith("WSLB_") and not name.startswith("WSLB_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture(name="redis_url", scope="session")
def fixture_redis_url() -> Iterator[str]:
    """A real Redis: ``WSLB_TEST_REDIS_URL``, else a private server for the session."""
    url = os.environ.get("WSLB_TEST_REDIS_URL")
    if url:
        yield url
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture(name="prefix")
def fixture_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards (never FLUSHALL)."""
    prefix = "test-" + secrets.token_hex(4)
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match="{" + prefix + "}*", count=1000):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture(name="private_redis")
def fixture_private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone, for fault injection (stop, kill, CLIENT KILL)."""
    with RedisServer() as server:
        yield server


@pytest.fixture(name="fake_server")
def fixture_fake_server() -> fakeredis.FakeServer:
    """One fakeredis server that several app instances may share."""
    return fakeredis.FakeServer()


@pytest.fixture(name="redis")
async def fixture_redis(fake_server: fakeredis.FakeServer) -> AsyncIterator[Redis]:
    """An asyncio client of ``fake_server`` (tests on a real Redis define their own)."""
    client: Redis = fakeredis.FakeAsyncRedis(server=fake_server)
    yield client
    await client.aclose()


@pytest.fixture(name="real_redis", params=[2, 3], ids=["resp2", "resp3"])
async def fixture_real_redis(
    redis_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[Redis]:
    """A client of the real Redis, speaking RESP2 or RESP3."""
    client = Redis.from_url(redis_url, protocol=request.param)
    yield client
    await client.aclose()


@pytest.fixture(name="start_cluster")
def fixture_start_cluster(
    redis_url: str, prefix: str, tmp_path: os.PathLike[str]
) -> Iterator[Callable[..., Cluster]]:
    """Start ``n`` Hypercorn instances of ``tests.cluster_app``; all stopped afterwards."""
    clusters: list[Cluster] = []

    def start(n: int = 3, *, url: str | None = None, **env: str) -> Cluster:
        cluster = Cluster(url or redis_url, prefix, n, str(tmp_path), env)
        clusters.append(cluster)
        cluster.start()
        return cluster

    yield start
    for cluster in clusters:
        cluster.stop()


@pytest.fixture(name="clients")
async def fixture_clients() -> AsyncIterator[Clients]:
    """Real WebSocket clients, all closed at the end of the test."""
    pool = Clients()
    yield pool
    await pool.close()
