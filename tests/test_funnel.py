"""quart_wslb.funnel: round trips of several callers merged on one transport, and what a
failure means before and after the write."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from quart_wslb.funnel import Funnel, SentError
from quart_wslb.subscriber import Subscription

pytestmark = pytest.mark.timeout(10)


class FakeTransport:
    """Echoes each command's first argument; ``gate`` holds the replies back, and the
    next ``fail_ready``/``fail_run`` calls raise."""

    def __init__(self) -> None:
        self.rounds: list[list[Sequence[Any]]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_ready: Exception | None = None
        self.fail_run: Exception | None = None
        self.releases = 0
        self.running = 0
        self.most_running = 0

    async def ready(self) -> None:
        if self.fail_ready is not None:
            error, self.fail_ready = self.fail_ready, None
            raise error

    async def run(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        self.rounds.append(list(commands))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.gate.wait()
            if self.fail_run is not None:
                error, self.fail_run = self.fail_run, None
                raise error
            return [command[1] for command in commands]
        finally:
            self.running -= 1

    async def release(self) -> None:
        self.releases += 1

    def subscribe(self, channels: Sequence[str]) -> AbstractAsyncContextManager[Subscription]:
        raise NotImplementedError


def held() -> tuple[FakeTransport, Funnel]:
    """A funnel on a transport whose replies wait for its gate (closed)."""
    transport = FakeTransport()
    transport.gate.clear()
    return transport, Funnel(transport, "node")


def later(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_funnel_merges_callers_queued_behind_a_round_trip() -> None:
    transport, funnel = held()
    first = asyncio.ensure_future(funnel.run([["ECHO", 1]], later(5)))
    await asyncio.sleep(0.01)
    assert len(transport.rounds) == 1  # a lone caller goes out at once
    queued = [
        asyncio.ensure_future(funnel.run([["ECHO", n], ["ECHO", -n]], later(5))) for n in (2, 3)
    ]
    await asyncio.sleep(0.01)
    transport.gate.set()
    assert await first == [1]
    assert await asyncio.gather(*queued) == [[2, -2], [3, -3]]
    assert len(transport.rounds) == 2, transport.rounds  # the two queued: one pipeline
    assert transport.most_running == 1


async def test_funnel_failure_before_the_write_is_raised_as_it_is() -> None:
    transport = FakeTransport()
    transport.fail_ready = RedisConnectionError("refused")
    with pytest.raises(RedisConnectionError, match="refused"):
        await Funnel(transport, "node").run([["ECHO", 1]], later(5))
    assert transport.rounds == []


async def test_funnel_failure_after_the_write_is_a_sent_error_for_every_caller() -> None:
    transport, funnel = held()
    transport.fail_run = RedisConnectionError("reset")
    calls = [asyncio.ensure_future(funnel.run([["ECHO", n]], later(5))) for n in range(3)]
    await asyncio.sleep(0.01)
    transport.gate.set()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(outcome, SentError) for outcome in outcomes), outcomes
    assert isinstance(outcomes[0].__cause__, RedisConnectionError)  # type: ignore[union-attr]
    assert await funnel.run([["ECHO", 9]], later(5)) == [9]  # the next round trip goes on


async def test_funnel_caller_giving_up_queued_is_never_written() -> None:
    transport, funnel = held()
    first = asyncio.ensure_future(funnel.run([["ECHO", 1]], later(5)))
    await asyncio.sleep(0.01)
    with pytest.raises(TimeoutError) as raised:  # queued, not written: safe to resend
        await funnel.run([["ECHO", 2]], later(0.05))
    assert not isinstance(raised.value, SentError)
    transport.gate.set()
    assert await first == [1]
    assert await funnel.run([["ECHO", 3]], later(5)) == [3]
    assert [c[1] for r in transport.rounds for c in r] == [1, 3]


async def test_funnel_caller_giving_up_once_written_gets_a_sent_error() -> None:
    transport, funnel = held()
    with pytest.raises(SentError, match="no reply in time"):  # may have run
        await funnel.run([["ECHO", 1]], later(0.05))
    assert transport.rounds == [[["ECHO", 1]]]


def open_late(transport: FakeTransport, deadline: float) -> None:
    """Open the gate in a loop turn that ends past ``deadline``: the reply then comes in
    the turn the caller's deadline fires (a loop late with other work)."""

    def late() -> None:
        while asyncio.get_running_loop().time() <= deadline + 0.005:
            time.sleep(0.001)
        transport.gate.set()

    asyncio.get_running_loop().call_at(deadline - 0.01, late)


@pytest.mark.parametrize("fails", [False, True], ids=["reply", "failure"])
async def test_funnel_outcome_in_the_deadline_turn_stands(fails: bool) -> None:
    """A round trip that ends in the loop turn the caller's deadline fires: its reply is
    returned, its failure once written is a SentError; never a plain TimeoutError,
    which says nothing was written."""
    transport, funnel = held()
    transport.fail_run = RedisConnectionError("reset") if fails else None
    deadline = later(0.05)
    open_late(transport, deadline)
    if fails:
        with pytest.raises(SentError):
            await funnel.run([["ECHO", 1]], deadline)
    else:
        assert await funnel.run([["ECHO", 1]], deadline) == [1]
    assert transport.rounds == [[["ECHO", 1]]]


async def test_funnel_release_waits_for_the_round_trips() -> None:
    transport, funnel = held()
    call = asyncio.ensure_future(funnel.run([["ECHO", 1]], later(5)))
    await asyncio.sleep(0.01)
    await funnel.release()
    assert transport.releases == 0  # in use: released once done
    transport.gate.set()
    await call
    await asyncio.sleep(0.01)
    assert transport.releases == 1
    await funnel.release()
    assert transport.releases == 2


async def test_funnel_release_failure_in_the_pump_is_logged_and_the_pump_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport, funnel = held()
    call = asyncio.ensure_future(funnel.run([["ECHO", 1]], later(5)))
    await asyncio.sleep(0.01)
    await funnel.release()  # due once the round trip is done: the pump hands it back

    async def broken() -> None:
        raise RedisConnectionError("reset while handing back")

    transport.release = broken  # type: ignore[method-assign]
    transport.gate.set()
    assert await call == [1]
    await asyncio.sleep(0.01)
    assert "handing the connection back failed" in caplog.text
    assert funnel._pump is not None and funnel._pump.exception() is None
    assert await funnel.run([["ECHO", 2]], later(1)) == [2]


async def test_funnel_pump_that_fails_unexpectedly_fails_its_callers_and_restarts() -> None:
    transport, funnel = held()
    run = transport.run

    async def garbled(commands: Sequence[Sequence[Any]]) -> list[Any]:
        await run(commands)
        return None  # type: ignore[return-value]  # a transport's bug: no replies

    transport.run = garbled  # type: ignore[method-assign]
    first = asyncio.ensure_future(funnel.run([["ECHO", 1]], later(1)))
    await asyncio.sleep(0.01)
    queued = asyncio.ensure_future(funnel.run([["ECHO", 2]], later(1)))
    await asyncio.sleep(0.01)
    transport.gate.set()
    outcomes = await asyncio.gather(first, queued, return_exceptions=True)
    assert isinstance(outcomes[0], SentError), outcomes  # written: may have run
    assert isinstance(outcomes[0].__cause__, TypeError)
    transport.run = run  # type: ignore[method-assign]
    assert await funnel.run([["ECHO", 3]], later(1)) == [3]  # a new pump


async def test_funnel_aclose_fails_what_is_in_flight() -> None:
    transport, funnel = held()
    call = asyncio.ensure_future(funnel.run([["ECHO", 1]], later(5)))
    await asyncio.sleep(0.01)
    await funnel.aclose()
    with pytest.raises(SentError):
        await call
