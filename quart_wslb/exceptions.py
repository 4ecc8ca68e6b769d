"""The exceptions quart-wslb raises.

Bad arguments raise the built-in ``TypeError``/``ValueError``; use outside a running
app raises ``RuntimeError``. Everything that comes from the cluster derives from
:class:`WsLoadBalanceError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    RedisError,
    ResponseError,
)

__all__ = (
    "NoInstancesError",
    "NotStartedError",
    "RedisAuthenticationError",
    "RedisUnavailableError",
    "describe",
    "WsLoadBalanceError",
    "cancelled_meanwhile",
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


class RedisAuthenticationError(RedisUnavailableError):
    """Redis refused the credentials of ``WSLB_REDIS_URL`` (a wrong or missing password
    or user name): retrying does not help. An instance fails to start on it; later (a
    rotated password) it is raised where ``RedisUnavailableError`` would be, and is one,
    so code that handles Redis being out of reach handles it too."""


class NoInstancesError(WsLoadBalanceError):
    """No instance has announced itself under the prefix: a wrong prefix, or a cluster
    that is down. Raised by emitters instead of quietly routing to nobody."""


class NotStartedError(WsLoadBalanceError, RuntimeError):
    """The extension is used before the app started serving (or after it stopped)."""


#: What a Redis exchange may raise when it fails: see :func:`ours`.
REDIS_FAILURES = (RedisError, OSError, TimeoutError)
#: What redis-py raises when Redis refuses the credentials (``WRONGPASS``, ``NOAUTH``...).
AUTH_FAILURES = (AuthenticationError, AuthorizationError, AuthenticationWrongNumberOfArgsError)


def ours(error: BaseException, what: str) -> WsLoadBalanceError:
    """Our error for a Redis failure (one of ``REDIS_FAILURES``): refused credentials are
    ``RedisAuthenticationError``, another error reply a plain ``WsLoadBalanceError``,
    anything else (silence) ``RedisUnavailableError``."""
    if isinstance(error, AUTH_FAILURES):  # before ResponseError: some derive from it
        return RedisAuthenticationError(
            f"{what}: Redis refused the credentials of the Redis URL ({describe(error)})"
        )
    if isinstance(error, ResponseError):  # Redis answered: with an error, not silence
        return WsLoadBalanceError(f"{what}: Redis answered with an error: {error}")
    if isinstance(error, TimeoutError):  # asyncio's deadline: it says nothing itself
        return RedisUnavailableError(f"{what}: Redis did not answer in time")
    return RedisUnavailableError(f"{what}: Redis did not answer ({describe(error)})")


def describe(error: BaseException) -> str:
    """``"<type>: <message>"`` for a log line or an error message: redis-py's own repr
    of its errors names only their type (``auth:AuthenticationError``)."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


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
    """Bound a Redis exchange in time, and turn its failures into ours.

    A cancellation of the task that lands during the exchange always reaches it, as
    ``CancelledError`` at the end of the block: Python 3.11's ``asyncio.wait_for``, under
    which redis-py awaits a command's write, returns normally when a cancellation lands
    just as what it waits for is done (gh-86296, fixed in 3.12). Swallowed there, it
    would leave a handler whose client has left waiting for that client for good."""
    task = asyncio.current_task()
    pending = task.cancelling() if task is not None else 0
    try:
        with redis_errors(what):
            async with asyncio.timeout(seconds):
                yield
    except Exception:
        cancelled_meanwhile(task, pending)  # the cancellation wins over what it met
        raise
    cancelled_meanwhile(task, pending)


def cancelled_meanwhile(task: asyncio.Task[Any] | None, pending: int = 0) -> None:
    """Raise ``CancelledError`` if ``task`` has more cancellations requested than the
    ``pending`` it had: one landed and never reached it (a task that went on would, in a
    handler, wait for a client gone for good)."""
    if task is not None and task.cancelling() > pending:
        raise asyncio.CancelledError
