"""Signals: sent with ``send_async``; failing receivers are logged, sync ones run inline."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from blinker import NamedSignal, Namespace

from quart_wslb import signals

SENDER = object()


@pytest.fixture(name="signal")
def fixture_signal() -> NamedSignal:
    """A fresh signal of a private namespace, so no test leaves receivers behind."""
    return Namespace().signal("test_signal")


async def test_send_calls_sync_receivers_inline(signal: NamedSignal) -> None:
    calls: list[tuple[object, dict[str, Any], int, asyncio.Task[Any] | None]] = []

    def receiver(sender: object, **kwargs: Any) -> None:
        calls.append((sender, kwargs, threading.get_ident(), asyncio.current_task()))

    signal.connect(receiver)
    await signals.send(signal, SENDER, reason="x", n=1)
    assert calls == [
        (SENDER, {"reason": "x", "n": 1}, threading.get_ident(), asyncio.current_task())
    ]


async def test_send_awaits_async_receivers(signal: NamedSignal) -> None:
    calls: list[dict[str, Any]] = []

    async def receiver(sender: object, **kwargs: Any) -> None:
        await asyncio.sleep(0)
        calls.append(kwargs)

    signal.connect(receiver)
    await signals.send(signal, SENDER, value=3)
    assert calls == [{"value": 3}]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_send_logs_a_failing_receiver(
    signal: NamedSignal, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    def failing(sender: object, **kwargs: Any) -> None:
        raise RuntimeError("receiver broke")

    async def failing_async(sender: object, **kwargs: Any) -> None:
        raise RuntimeError("receiver broke")

    signal.connect(failing if kind == "sync" else failing_async)
    await signals.send(signal, SENDER)  # does not raise
    [record] = [r for r in caplog.records if r.name == "quart_wslb"]
    assert "test_signal" in record.getMessage()
    assert record.exc_info is not None
    assert "receiver broke" in str(record.exc_info[1])


async def test_send_failing_receiver_does_not_starve_others(signal: NamedSignal) -> None:
    called: list[str] = []

    def first(sender: object, **kwargs: Any) -> None:
        called.append("first")
        raise RuntimeError("first broke")

    def second(sender: object, **kwargs: Any) -> None:
        called.append("second")
        raise RuntimeError("second broke")

    signal.connect(first)
    signal.connect(second)
    await signals.send(signal, SENDER)
    assert sorted(called) == ["first", "second"]


async def test_send_only_to_receivers_of_that_sender(signal: NamedSignal) -> None:
    mine: list[object] = []
    other = object()

    def receiver(sender: object, **kwargs: Any) -> None:
        mine.append(sender)

    signal.connect(receiver, sender=SENDER)
    await signals.send(signal, other)
    await signals.send(signal, SENDER)
    assert mine == [SENDER]


async def test_send_without_receivers_is_a_no_op(signal: NamedSignal) -> None:
    assert not signal.receivers
    await signals.send(signal, SENDER, anything=object())


def test_signals_are_named_after_their_attribute() -> None:
    names = [name for name in signals.__all__ if isinstance(getattr(signals, name), NamedSignal)]
    assert {"connection_opened", "connection_closed", "message_dropped"} <= set(names)
    for name in names:
        assert getattr(signals, name).name == name
