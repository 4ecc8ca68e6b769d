"""The Redis clients that quart-wslb creates itself (from ``WSLB_REDIS_URL``).

They are bounded by the configured timeout, and, for plain TCP URLs with hiredis
installed (a dependency), pack commands with hiredis: redis-py's asyncio connections
pack in pure Python, which is a fifth of the CPU of a send. A client given to us
(``redis=``) is used as it is.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from redis.asyncio import Connection, Redis
from redis.utils import HIREDIS_AVAILABLE

__all__ = ("make_client",)

if HIREDIS_AVAILABLE:
    from redis.connection import HiredisRespSerializer

    class _HiredisPackingConnection(Connection):
        """A TCP connection that packs commands with hiredis."""

        _packer = HiredisRespSerializer()

        def pack_command(self, *args: Any) -> list[bytes]:
            return list(self._packer.pack(*args))


def make_client(url: str, timeout: float) -> Redis:
    """A client for ``url`` whose connects and reads give up after ``timeout`` seconds."""
    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if HIREDIS_AVAILABLE and urlparse(url).scheme == "redis":
        options["connection_class"] = _HiredisPackingConnection
    return Redis.from_url(url, **options)
