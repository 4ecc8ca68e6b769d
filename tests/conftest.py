"""Shared fixtures: a real Redis (private, or ``WSLB_TEST_REDIS_URL``), fakeredis, and
clusters of Hypercorn processes."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from typing import NoReturn, TypeVar

import fakeredis
import pytest
import redis
from redis.asyncio import Redis

from quart_wslb.acl import acl_rules
from quart_wslb.testing import RedisServer
from tests.cluster import Clients, Cluster
from tests.support import acl_refusals, acl_url
from tests.topology import RedisClusterSet, SentinelSet, redis_version

try:
    from playwright.async_api import Browser, async_playwright
except ImportError:  # pragma: no cover - depends on the environment
    async_playwright = None  # type: ignore[assignment]

#: The browser tests' Chromium: Debian's package (``.ci/run`` installs it).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

#: The prefixes of the tests on the real Redis (see ``prefix``), as an ACL glob.
TEST_PREFIXES = "test-*"
#: The fixtures that start or reach a real redis-server (every real-Redis fixture below
#: depends on one of these): a test that uses one, even through another fixture, must be
#: marked ``integration``, since CI runs those a second time as the restricted ACL user.
#: Fixtures that start a private Redis Cluster or Sentinel set (tests/topology.py): their
#: tests are marked ``topology`` too (the ACL run leaves them out: they use no ACL user).
TOPOLOGY_FIXTURES = frozenset(
    {"cluster_set", "sentinel_set", "faulty_set", "tls_sentinels", "tls_cluster_set"}
)
REAL_REDIS_FIXTURES = frozenset({"admin_redis_url", "private_redis"}) | TOPOLOGY_FIXTURES


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Refuse to run when a real-Redis test lacks the ``integration`` marker (checked
    before ``-m`` deselects anything, so ``-m "not integration"`` cannot hide one); mark
    ``topology`` the tests that run a private Redis Cluster or Sentinel set."""
    for item in items:
        if TOPOLOGY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.topology)
    unmarked = [
        item.nodeid
        for item in items
        if REAL_REDIS_FIXTURES & set(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("integration") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "these tests use a real Redis but are not marked integration: " + ", ".join(unmarked)
        )


@pytest.fixture(autouse=True)
def no_unmarked_processes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that starts a process (redis-server, Hypercorn, the example) must be marked
    ``integration``: collection cannot see a ``Popen`` in its body, so this refuses it."""
    name = request.node.nodeid
    if request.node.get_closest_marker("integration") is not None:
        return

    def refuse(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError(f"{name} starts a process but is not marked integration")

    monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.fixture(autouse=True)
def no_exported_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every app, emitter and instance reads ``WSLB_*`` from the environment: options
    exported in the shell that runs the tests must not reach them (``WSLB_TEST_*`` are
    the tests' own)."""
    for name in list(os.environ):
        if name.startswith("WSLB_") and not name.startswith("WSLB_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture(name="admin_redis_url", scope="session")
def fixture_admin_redis_url() -> Iterator[str]:
    """A real Redis: ``WSLB_TEST_REDIS_URL``, else a private server for the session."""
    url = os.environ.get("WSLB_TEST_REDIS_URL")
    if url:
        yield url
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture(name="redis_url", scope="session")
def fixture_redis_url(admin_redis_url: str) -> Iterator[str]:
    """The URL that the code under test uses: ``admin_redis_url``, or with
    ``WSLB_TEST_ACL=1`` a user that has only the documented ACL rules
    (:func:`quart_wslb.acl.acl_rules`) for the tests' prefixes."""
    if os.environ.get("WSLB_TEST_ACL") != "1":
        yield admin_redis_url
        return
    name, password = f"wslb-test-{secrets.token_hex(3)}", secrets.token_hex(16)
    # No admin connection stays open meanwhile: tests count the server's clients.
    with redis.Redis.from_url(admin_redis_url) as admin:
        rules = acl_rules(TEST_PREFIXES)
        admin.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", *rules)
    try:
        yield acl_url(admin_redis_url, name, password)
    finally:
        with redis.Redis.from_url(admin_redis_url) as admin:
            refused = acl_refusals(admin, name)
            admin.execute_command("ACL", "DELUSER", name)
    # Code that swallows an error (a retrying loop) would hide a refusal from the tests.
    assert not refused, f"Redis refused the ACL user: {refused}"


@pytest.fixture(name="prefix")
def fixture_prefix(admin_redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards (never FLUSHALL)."""
    prefix = "test-" + secrets.token_hex(4)
    yield prefix
    client = redis.Redis.from_url(admin_redis_url)
    try:
        for pattern in ("{" + prefix + "}*", "{" + prefix + "|*"):  # one shard, or several
            for key in client.scan_iter(match=pattern, count=1000):
                client.delete(key)
    finally:
        client.close()


def _needs_redis_7(what: str) -> None:
    """Skip, saying why, where the ``redis-server`` the tests use is older than 7."""
    if redis_version()[:1] < (7,):
        found = ".".join(map(str, redis_version())) or "missing"
        pytest.skip(f"{what} needs Redis >= 7 (sharded pub/sub), not {found}")


#: Tries at starting a shared topology. Its ports are chosen free before its servers
#: bind them, and another process (tests run side by side) may take one meanwhile: a
#: failed start would fail every test of the session that shares the topology.
START_TRIES = 3


Topology = TypeVar("Topology", RedisClusterSet, SentinelSet)


def _started(make: Callable[[], Topology]) -> Topology:
    """``make().start()``, made again (other ports) when one of its ports was taken."""
    for _ in range(START_TRIES - 1):
        try:
            return make().start()
        except RuntimeError as error:  # start() stopped whatever it had started
            if "Address already in use" not in str(error):
                raise
    return make().start()


@pytest.fixture(name="cluster_set", scope="session")
def fixture_cluster_set() -> Iterator[RedisClusterSet]:
    """A Redis Cluster of 3 masters and 3 replicas, shared by the tests that inject no
    fault (a module whose tests kill, stop or reshard nodes has a fixture of its own)."""
    _needs_redis_7("a Redis Cluster")
    with _started(RedisClusterSet) as cluster:
        yield cluster


@pytest.fixture(name="sentinel_set", scope="session")
def fixture_sentinel_set() -> Iterator[SentinelSet]:
    """A Sentinel set (1 master, 1 replica, 3 sentinels), shared like ``cluster_set``."""
    _needs_redis_7("a Sentinel set")
    with _started(SentinelSet) as sentinels:
        yield sentinels


@pytest.fixture(name="private_redis")
def fixture_private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone, for fault injection (stop, kill, CLIENT KILL)."""
    with RedisServer() as server:
        yield server


@pytest.fixture(name="fake_server")
def fixture_fake_server() -> fakeredis.FakeServer:
    """One fakeredis server that several app instances may share."""
    return fakeredis.FakeServer()


@pytest.fixture(name="fake_redis")
async def fixture_fake_redis(fake_server: fakeredis.FakeServer) -> AsyncIterator[Redis]:
    """An asyncio client of ``fake_server``."""
    client: Redis = fakeredis.FakeAsyncRedis(server=fake_server)
    yield client
    await client.aclose()


@pytest.fixture(name="real_redis", params=[2, 3], ids=["resp2", "resp3"])
async def fixture_real_redis(
    admin_redis_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[Redis]:
    """An admin client of the real Redis, speaking RESP2 or RESP3: for the tests of the
    wire modules, which use names of their own and inspect with admin commands."""
    client = Redis.from_url(admin_redis_url, protocol=request.param)
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


@pytest.fixture(name="browser")
async def fixture_browser() -> AsyncIterator[Browser]:
    """Headless Chromium from the OS packages; the test is skipped without it."""
    if async_playwright is None:
        pytest.skip("the playwright package is not installed (pip install -e '.[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            yield browser
        finally:
            await browser.close()
