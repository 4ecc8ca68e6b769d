"""SignalSender: receivers of its sender only, failing receivers logged, sync ones inline."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from blinker import NamedSignal, Namespace

from quart_wslb import signals
from quart_wslb.signal_sender import SignalSender

SENDER = object()


@pytest.fixture(name="signal")
def fixture_signal() -> NamedSignal:
    """A fresh signal of a private namespace, so no test leaves receivers behind."""
    return Namespace().signal("test_signal")


async def test_signal_sender_send_calls_sync_receivers_inline(signal: NamedSignal) -> None:
    calls: list[tuple[object, dict[str, Any], int, asyncio.Task[Any] | None]] = []

    def receiver(sender: object, **kwargs: Any) -> None:
        calls.append((sender, kwargs, threading.get_ident(), asyncio.current_task()))

    signal.connect(receiver)
    await SignalSender(SENDER).send(signal, reason="x", n=1)
    assert calls == [
        (SENDER, {"reason": "x", "n": 1}, threading.get_ident(), asyncio.current_task())
    ]


async def test_signal_sender_send_awaits_async_receivers(signal: NamedSignal) -> None:
    calls: list[dict[str, Any]] = []

    async def receiver(sender: object, **kwargs: Any) -> None:
        await asyncio.sleep(0)
        calls.append(kwargs)

    signal.connect(receiver)
    await SignalSender(SENDER).send(signal, value=3)
    assert calls == [{"value": 3}]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_signal_sender_send_logs_a_failing_receiver(
    signal: NamedSignal, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    def failing(sender: object, **kwargs: Any) -> None:
        raise RuntimeError("receiver broke")

    async def failing_async(sender: object, **kwargs: Any) -> None:
        raise RuntimeError("receiver broke")

    signal.connect(failing if kind == "sync" else failing_async)
    await SignalSender(SENDER).send(signal)  # does not raise
    [record] = [r for r in caplog.records if r.name == "quart_wslb"]
    assert "test_signal" in record.getMessage()
    assert record.exc_info is not None
    assert "receiver broke" in str(record.exc_info[1])


async def test_signal_sender_send_failing_receiver_does_not_starve_others(
    signal: NamedSignal,
) -> None:
    called: list[str] = []

    def first(sender: object, **kwargs: Any) -> None:
        called.append("first")
        raise RuntimeError("first broke")

    def second(sender: object, **kwargs: Any) -> None:
        called.append("second")
        raise RuntimeError("second broke")

    signal.connect(first)
    signal.connect(second)
    await SignalSender(SENDER).send(signal)
    assert sorted(called) == ["first", "second"]


async def test_signal_sender_send_only_to_receivers_of_that_sender(signal: NamedSignal) -> None:
    mine: list[object] = []
    other = object()

    def receiver(sender: object, **kwargs: Any) -> None:
        mine.append(sender)

    signal.connect(receiver, sender=SENDER)
    await SignalSender(other).send(signal)
    await SignalSender(SENDER).send(signal)
    assert mine == [SENDER]


async def test_signal_sender_send_without_receivers_is_a_no_op(signal: NamedSignal) -> None:
    assert not signal.receivers
    await SignalSender(SENDER).send(signal, anything=object())


async def test_signal_sender_presence_sends_online_then_offline() -> None:
    heard: list[tuple[str, str]] = []

    def online(sender: object, user: str) -> None:
        heard.append(("online", user))

    def offline(sender: object, user: str) -> None:
        heard.append(("offline", user))

    with (
        signals.user_online.connected_to(online, sender=SENDER),
        signals.user_offline.connected_to(offline, sender=SENDER),
    ):
        await SignalSender(SENDER).presence(["ann", "bob"], ["cy"])
    assert heard == [("online", "ann"), ("online", "bob"), ("offline", "cy")]


async def test_signal_sender_dropped_sends_every_field() -> None:
    got: list[dict[str, Any]] = []

    def receiver(sender: object, **kwargs: Any) -> None:
        got.append(kwargs)

    with signals.message_dropped.connected_to(receiver, sender=SENDER):
        await SignalSender(SENDER).dropped("gone", message_id="m1", detail="i1:a")
    assert got == [{"reason": "gone", "message_id": "m1", "connection": None, "detail": "i1:a"}]
