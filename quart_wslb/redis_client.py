"""The Redis clients that quart-wslb creates itself (from ``WSLB_REDIS_URL``).

They are bounded by the configured timeout, and, for plain TCP URLs, pack commands with
hiredis (a dependency) where the installed redis-py allows it
(:func:`quart_wslb._compat.packing_connection`): redis-py's asyncio connections pack in
pure Python, which is a fifth of the CPU of a send. A client given to us (``redis=``) is
used as it is.

Their pool holds at most ``max_connections`` connections (``WSLB_REDIS_MAX_CONNECTIONS``),
and a caller that finds them all in use waits for one, within the timeout: redis-py's
default pool raises ``MaxConnectionsError`` instead, which turned a burst of connecting
clients (a crashed instance's, landing on a survivor) into failed registrations.

A ``redis+sentinel://`` (``rediss+sentinel://``: TLS) URL makes a client of the master
that the sentinels name (:func:`parse_sentinel_url` says what the URL holds): every new
connection asks them where the master is, so after a failover new connections go to the
new master, with the same timeouts and the same bounded, waiting pool.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlparse, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import NoBackoff

from ._compat import packing_connection
from .cluster import cluster_client, is_cluster
from .config import DEFAULTS, redact_url
from .exceptions import REDIS_FAILURES, describe

__all__ = (
    "SentinelURL",
    "checked_client",
    "clustered",
    "make_client",
    "may_be_cluster",
    "open_client",
    "parse_sentinel_url",
)

log = logging.getLogger("quart_wslb")

#: The schemes of Sentinel URLs, and whether each speaks TLS.
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
#: The port of a sentinel whose URL names none.
SENTINEL_PORT = 26379
#: Query parameters for the sentinels themselves; every other one is redis-py's, for the
#: connections to the master (as in a ``redis://`` URL).
SENTINEL_AUTH = {"sentinel_username": "username", "sentinel_password": "password"}


def make_client(
    url: str, timeout: float, max_connections: int = DEFAULTS["redis_max_connections"]
) -> Redis:
    """A client for ``url`` whose connects, reads and waits for a free connection give
    up after ``timeout`` seconds, with at most ``max_connections`` connections.

    Raises ``ValueError`` for a Sentinel URL that is malformed (see :func:`parse_sentinel_url`).
    """
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "max_connections": max_connections,
        "timeout": timeout,  # the wait for a free connection
    }
    scheme = urlparse(url).scheme.lower()
    if scheme in SENTINEL_SCHEMES:
        return _sentinel_client(parse_sentinel_url(url), options)
    connection_class = packing_connection()
    if connection_class is not None and scheme == "redis":
        options["connection_class"] = connection_class
    return Redis.from_pool(BlockingConnectionPool.from_url(url, **options))


def checked_client(redis: Redis) -> Redis:
    """``redis``, a client given to us, if quart-wslb can use it; else ``ValueError``.

    Replies must stay bytes: payloads may be binary, and the fast paths parse them raw.
    """
    if isinstance(redis, RedisCluster):
        options = redis.get_connection_kwargs()
    else:
        options = redis.connection_pool.connection_kwargs
    if options.get("decode_responses"):
        raise ValueError("the redis client must not set decode_responses=True")
    return redis


def may_be_cluster(url: str) -> bool:
    """Whether ``url`` may name a node of a Redis Cluster: ``redis://`` or ``rediss://``
    (a Sentinel URL names the master of one Redis)."""
    return urlparse(url).scheme in ("redis", "rediss")


def clustered(redis: object) -> bool:
    """Whether ``redis`` is a Redis Cluster client (``redis.asyncio.RedisCluster``)."""
    return isinstance(redis, RedisCluster)


async def open_client(
    url: str, timeout: float, max_connections: int = DEFAULTS["redis_max_connections"]
) -> Redis:
    """:func:`make_client`'s client for ``url``, or a Redis Cluster client when ``url``
    names a node of a cluster (asked within ``timeout``; a Redis out of reach is taken
    for a single one, and said so). A cluster client serves every command that
    quart-wslb sends through a client; it is typed as one here, in this one place."""
    if may_be_cluster(url):
        try:
            if await is_cluster(url, timeout):
                return cast(Redis, cluster_client(url, timeout, max_connections))
        except REDIS_FAILURES as error:
            log.warning(
                "quart-wslb: could not tell whether %s is a Redis Cluster (%s): taking it for "
                "a single Redis",
                redact_url(url),
                describe(error),
            )
    return make_client(url, timeout, max_connections)


@dataclass(frozen=True, slots=True)
class SentinelURL:
    """What a Sentinel URL says (see :func:`parse_sentinel_url`)."""

    #: (host, port) of each sentinel, in the URL's order.
    sentinels: tuple[tuple[str, int], ...]
    #: The name the sentinels monitor the master under.
    service: str
    #: Whether every connection (to the master and to the sentinels) speaks TLS.
    tls: bool
    #: Options of the connections to the master: ``db``, the URL's credentials, and its
    #: query parameters (parsed by redis-py, as those of a ``redis://`` URL).
    master: Mapping[str, Any]
    #: Options of the connections to the sentinels: their credentials, and with TLS the
    #: master's ``ssl_*`` options.
    sentinel: Mapping[str, Any]


def parse_sentinel_url(url: str) -> SentinelURL:
    """Read ``redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db]``
    (``rediss+sentinel://`` for TLS) and its query; ``ValueError`` naming what is wrong.

    A sentinel without a port is on 26379. The user and password are the master's; the
    sentinels are asked with ``sentinel_username=`` and ``sentinel_password=`` if given
    (else without AUTH). Other query parameters are redis-py's, as in a ``redis://`` URL
    (``ssl_ca_certs=``, ``client_name=``...); with TLS the ``ssl_*`` ones also apply to
    the sentinels.
    """
    parts = urlsplit(url)  # ValueError for unbalanced IPv6 brackets
    tls = SENTINEL_SCHEMES.get(parts.scheme)
    if tls is None:
        schemes = " or ".join(f"{scheme}://" for scheme in SENTINEL_SCHEMES)
        raise ValueError(f"not a Sentinel URL ({schemes}): {parts.scheme}://...")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels = tuple(_sentinel_address(host) for host in hosts.split(",")) if hosts else ()
    if not sentinels:
        raise ValueError("the Sentinel URL names no sentinel (host:port,...)")
    service, db = _service_and_db(parts.path)
    query = parse_qsl(parts.query, keep_blank_values=True)
    sentinel: dict[str, Any] = {SENTINEL_AUTH[k]: v for k, v in query if k in SENTINEL_AUTH}
    rest = urlencode([(k, v) for k, v in query if k not in SENTINEL_AUTH])
    # redis-py reads the credentials and the query as it does a redis:// URL's.
    master = dict(parse_url(f"{'rediss' if tls else 'redis'}://{userinfo}@/{db}?{rest}"))
    master.pop("connection_class", None)  # the Sentinel's own classes are used
    if tls:
        sentinel |= {k: v for k, v in master.items() if k.startswith("ssl_")}
    return SentinelURL(sentinels, service, tls, master, sentinel)


def _sentinel_address(host: str) -> tuple[str, int]:
    """(host, port) of one ``host[:port]`` or ``[ipv6][:port]`` of a Sentinel URL."""
    if host.startswith("["):  # [ipv6]:port
        name, _, after = host[1:].partition("]")
        port = after[1:] if after.startswith(":") else after or None
    else:
        name, colon, port = host.rpartition(":")
        if not colon:
            name, port = host, None
    if not name:
        raise ValueError(f"a sentinel of the Sentinel URL has no host: {host!r}")
    if port is None:
        return name, SENTINEL_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port of sentinel {host!r} in the Sentinel URL: {port!r}")
    return name, int(port)


def _service_and_db(path: str) -> tuple[str, int]:
    """The service name and the database number of a Sentinel URL's ``/service[/db]``."""
    segments = [unquote(s) for s in path.removeprefix("/").split("/")]
    if not segments[0]:
        raise ValueError("the Sentinel URL names no service: .../<service_name>[/db]")
    if len(segments) > 2:
        raise ValueError(f"the Sentinel URL's path is /<service_name>[/db], not {path!r}")
    db = segments[1] if len(segments) == 2 else "0"
    if not db.isdigit():
        raise ValueError(f"bad database number in the Sentinel URL: {db!r}")
    return segments[0], int(db)


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's Sentinel pool (connections to the master the sentinels name) with the
    blocking pool's bound and wait; closing it closes the connections to the sentinels."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        """Disconnect the pool's connections; all of them: the sentinels' too (closing
        the client closes its pool so; redis-py's own close does not reach them)."""
        await super().disconnect(inuse_connections)
        if inuse_connections:
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.aclose()


def _sentinel_client(url: SentinelURL, options: dict[str, Any]) -> Redis:
    """A client of ``url``'s master, with ``options`` (timeouts, the pool's bound and
    wait); the URL's own options win, as with redis-py's ``from_url``."""
    if url.tls:
        connection_class: type[SentinelManagedConnection] = SentinelManagedSSLConnection
    else:
        packing = packing_connection(SentinelManagedConnection)
        connection_class = cast(
            type[SentinelManagedConnection], packing or SentinelManagedConnection
        )
    sentinel_options = {
        "socket_timeout": options["socket_timeout"],
        "socket_connect_timeout": options["socket_connect_timeout"],
        # Discovery moves on to the next sentinel itself: retries (redis-py 6 and 7
        # give the sentinels' clients its default three) would only multiply the
        # timeout of a dead one.
        "retry": Retry(NoBackoff(), 0),
        "ssl": url.tls,
        **url.sentinel,
    }
    manager = Sentinel(url.sentinels, sentinel_kwargs=sentinel_options)
    client = manager.master_for(
        url.service,
        connection_pool_class=_BlockingSentinelPool,
        connection_class=connection_class,
        **{**options, **url.master},
    )
    return cast(Redis, client)
