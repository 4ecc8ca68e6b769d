"""Our errors for Redis failures: each says what happened, in words."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    MaxConnectionsError,
    NoPermissionError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from quart_wslb import (
    AsyncEmitter,
    RedisAuthenticationError,
    RedisUnavailableError,
    UserSelector,
    WsLoadBalanceError,
)
from quart_wslb.exceptions import describe, ours, redis_deadline, redis_errors


@pytest.mark.parametrize(
    "error",
    [
        AuthenticationError("invalid username-password pair or user is disabled."),
        AuthenticationError("Authentication required."),
        AuthenticationWrongNumberOfArgsError("wrong number of arguments for 'auth' command"),
    ],
)
def test_ours_refused_credentials_say_so(error: Exception) -> None:
    mine = ours(error, "send")
    assert isinstance(mine, RedisAuthenticationError)
    assert isinstance(mine, RedisUnavailableError)  # handled wherever silence is
    assert str(mine).startswith("send: Redis refused the credentials")
    assert str(error) in str(mine)


def test_ours_names_the_failure_and_its_message() -> None:
    mine = ours(MaxConnectionsError("Too many connections"), "register")
    assert type(mine) is RedisUnavailableError
    expected = "register: Redis did not answer (MaxConnectionsError: Too many connections)"
    assert str(mine) == expected
    assert str(ours(TimeoutError(), "send")) == "send: Redis did not answer in time"
    timed_out = ours(RedisTimeoutError("Timeout reading from db:6379"), "query")
    assert "TimeoutError: Timeout reading from db:6379" in str(timed_out)


def test_ours_an_error_reply_is_not_silence() -> None:
    for error in (ResponseError("WRONGTYPE no"), NoPermissionError("no permissions")):
        mine = ours(error, "count")
        assert type(mine) is WsLoadBalanceError
        assert "Redis answered with an error" in str(mine) and str(error) in str(mine)


def test_describe_needs_no_message() -> None:
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(ValueError("bad")) == "ValueError: bad"


def test_redis_errors_chains_the_original() -> None:
    with pytest.raises(RedisAuthenticationError) as raised:
        with redis_errors("stop"):
            raise AuthenticationError("Authentication required.")
    assert isinstance(raised.value.__cause__, AuthenticationError)


async def _swallowing_wait(*, handled: bool = False) -> None:
    """What Python 3.11's ``asyncio.wait_for`` does when a cancellation lands as its
    future completes: it returns normally. ``handled``: as code that means to go on
    does, it also says so (``uncancel``)."""
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    try:
        await asyncio.sleep(0)
    except asyncio.CancelledError:
        if handled:
            task.uncancel()


async def test_redis_deadline_passes_a_swallowed_cancellation_on() -> None:
    went_on = False

    async def exchange() -> None:
        nonlocal went_on
        async with redis_deadline(5, "test"):
            await _swallowing_wait()
        went_on = True

    task = asyncio.create_task(exchange())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled() and not went_on


async def test_redis_deadline_passes_a_swallowed_cancellation_on_over_an_error() -> None:
    async def exchange() -> None:
        async with redis_deadline(5, "test"):
            await _swallowing_wait()
            raise RedisConnectionError("the connection went too")

    task = asyncio.create_task(exchange())
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_redis_deadline_leaves_a_handled_cancellation_alone() -> None:
    async def exchange() -> str:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.01):  # fires: cancels the task, then takes it back
                async with redis_deadline(5, "test"):
                    await asyncio.sleep(1)
        async with redis_deadline(5, "test"):
            await _swallowing_wait(handled=True)
        return "done"

    assert await asyncio.create_task(exchange()) == "done"


async def test_redis_deadline_lets_a_cancelled_task_clean_up() -> None:
    """A task whose cancellation was delivered may still talk to Redis in its
    ``finally`` (as a handler unregisters): the block is not cancelled again."""
    cleaned = False

    async def handler() -> None:
        nonlocal cleaned
        try:
            await asyncio.sleep(10)
        finally:
            async with redis_deadline(5, "cleanup"):
                await asyncio.sleep(0)
            cleaned = True

    task = asyncio.create_task(handler())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_redis_deadline_cancelled_emitter_calls_never_go_on(
    redis_url: str, prefix: str
) -> None:
    """A task cancelled at random points of real round trips (the ``asyncio.wait_for``
    redis-py awaits under swallowed most of these on Python 3.11 before the check)
    always ends cancelled."""
    emitter = AsyncEmitter(redis_url=redis_url, prefix=prefix, strict=False)
    went_on = 0
    rounds = 200

    async def loop() -> None:
        nonlocal went_on
        while True:
            await emitter.join(UserSelector("alice"), "room")
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                went_on += 1
                return

    try:
        await emitter.join(UserSelector("alice"), "room")
        for _ in range(rounds):
            task = asyncio.create_task(loop())
            await asyncio.sleep(random.random() * 0.003)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await emitter.aclose()
    assert went_on == 0, f"{went_on} of {rounds} cancelled tasks went on"
