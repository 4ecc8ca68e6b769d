"""The exceptions quart-wslb raises.

Bad arguments raise the built-in ``TypeError``/``ValueError``; use outside a running
app raises ``RuntimeError``. Everything that comes from the cluster derives from
:class:`WsLoadBalanceError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.exceptions import RedisError, ResponseError

__all__ = (
    "NoInstancesError",
    "NotStartedError",
    "RedisUnavailableError",
    "WsLoadBalanceError",
    "redis_deadline",
)


class WsLoadBalanceError(Exception):
    """Base class of every error that quart-wslb raises about the cluster."""


class RedisUnavailableError(WsLoadBalanceError):
    """Redis did not answer within ``WSLB_REDIS_TIMEOUT``, or could not be reached.

    When it could not be reached nothing was routed; when it answered too late, the
    message may have been routed all the same.
    """


class NoInstancesError(WsLoadBalanceError):
    """No instance has announced itself under the prefix: a wrong prefix, or a cluster
    that is down. Raised by emitters instead of quietly routing to nobody."""


class NotStartedError(WsLoadBalanceError, RuntimeError):
    """The extension is used before the app started serving (or after it stopped)."""


@asynccontextmanager
async def redis_deadline(seconds: float, what: str) -> AsyncIterator[None]:
    """Bound a Redis exchange in time; turn every failure into ``RedisUnavailableError``."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except ResponseError as error:  # Redis answered: with an error, not silence
        raise WsLoadBalanceError(f"{what}: Redis answered with an error: {error}") from error
    except (RedisError, OSError, TimeoutError) as error:
        raise RedisUnavailableError(f"{what}: Redis did not answer ({error!r})") from error
