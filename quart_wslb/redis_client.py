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
"""

from __future__ import annotations

import logging
from typing import Any, cast
from urllib.parse import urlparse

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

from ._compat import packing_connection
from .cluster import cluster_client, is_cluster
from .config import DEFAULTS, redact_url
from .exceptions import REDIS_FAILURES, describe

__all__ = ("checked_client", "clustered", "make_client", "open_client")

log = logging.getLogger("quart_wslb")


def make_client(
    url: str, timeout: float, max_connections: int = DEFAULTS["redis_max_connections"]
) -> Redis:
    """A client for ``url`` whose connects, reads and waits for a free connection give
    up after ``timeout`` seconds, with at most ``max_connections`` connections."""
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "max_connections": max_connections,
        "timeout": timeout,  # the wait for a free connection
    }
    connection_class = packing_connection()
    if connection_class is not None and urlparse(url).scheme == "redis":
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
    if urlparse(url).scheme in ("redis", "rediss"):
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
