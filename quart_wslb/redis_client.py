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

from typing import Any
from urllib.parse import urlparse

from redis.asyncio import BlockingConnectionPool, Redis

from ._compat import packing_connection
from .config import DEFAULTS

__all__ = ("checked_client", "make_client")


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
    if redis.connection_pool.connection_kwargs.get("decode_responses"):
        raise ValueError("the redis client must not set decode_responses=True")
    return redis
