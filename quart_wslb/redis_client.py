"""The Redis clients that quart-wslb creates itself (from ``WSLB_REDIS_URL``).

They are bounded by the configured timeout, and, for plain TCP URLs, pack commands with
hiredis (a dependency) where the installed redis-py allows it
(:func:`quart_wslb._compat.packing_connection`): redis-py's asyncio connections pack in
pure Python, which is a fifth of the CPU of a send. A client given to us (``redis=``) is
used as it is.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from redis.asyncio import Redis

from ._compat import packing_connection

__all__ = ("make_client",)


def make_client(url: str, timeout: float) -> Redis:
    """A client for ``url`` whose connects and reads give up after ``timeout`` seconds."""
    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    connection_class = packing_connection()
    if connection_class is not None and urlparse(url).scheme == "redis":
        options["connection_class"] = connection_class
    return Redis.from_url(url, **options)
