"""Signals: one namespace, each named after its attribute; ``__all__`` lists only them."""

from __future__ import annotations

from blinker import NamedSignal

from quart_wslb import signals


def test_signals_are_named_after_their_attribute() -> None:
    names = [name for name in signals.__all__ if isinstance(getattr(signals, name), NamedSignal)]
    assert {"connection_opened", "connection_closed", "message_dropped"} <= set(names)
    for name in names:
        assert getattr(signals, name).name == name


def test_signals_all_lists_only_signals() -> None:
    assert signals.__all__, "signals exports nothing"
    others = [n for n in signals.__all__ if not isinstance(getattr(signals, n), NamedSignal)]
    assert others == []
