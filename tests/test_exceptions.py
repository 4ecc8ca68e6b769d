"""Our errors for Redis failures: each says what happened, in words."""

from __future__ import annotations

import pytest
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    MaxConnectionsError,
    NoPermissionError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from quart_wslb import RedisAuthenticationError, RedisUnavailableError, WsLoadBalanceError
from quart_wslb.exceptions import describe, ours, redis_errors


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
