"""The exceptions quart-wslb raises.

Bad arguments raise the built-in ``TypeError``/``ValueError``; use outside a running
app raises ``RuntimeError``. Everything that comes from the cluster derives from
:class:`WsLoadBalanceError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from redis.exceptions import RedisError, ResponseError

__all__ = (
    "NoInstancesError",
    "NotStartedError",
    "RedisUnavailableError",
    "WsLoadBalanceError",
    "redis_deadline",
    "redis_errors",
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


#: What a Redis exchange may raise when it fails: see :func:`ours`.
REDIS_FAILURES = (RedisError, OSError, TimeoutError)


def ours(error: BaseException, what: str) -> WsLoadBalanceError:
    """Our error for a Redis failure (one of ``REDIS_FAILURES``): an error reply is a
    plain ``WsLoadBalanceError``, anything else (silence) ``RedisUnavailableError``."""
    if isinstance(error, ResponseError):  # Redis answered: with an error, not silence
        return WsLoadBalanceError(f"{what}: Redis answered with an error: {error}")
    return RedisUnavailableError(f"{what}: Redis did not answer ({error!r})")


@contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Turn Redis failures into ours (see :func:`ours`). Costs nothing when nothing
    fails (no timer)."""
    try:
        yield
    except REDIS_FAILURES as error:
        raise ours(error, what) from error


@asynccontextmanager
async def redis_deadline(seconds: float, what: str) -> AsyncIterator[None]:
    """Bound a Redis exchange in time, and turn its failures into ours."""
    with redis_errors(what):
        async with asyncio.timeout(seconds):
            yield
