"""quart_wslb.probes: which channels count as deaf, from the probes sent and heard."""

from __future__ import annotations

import pytest

from quart_wslb.probes import ProbeTracker

pytestmark = pytest.mark.timeout(10)


def test_probe_tracker_deaf_after_two_missed_probes() -> None:
    tracker = ProbeTracker(["a", "b"])
    for _ in range(2):
        for channel in tracker.channels:
            number = tracker.next(channel)
            tracker.published(channel, 1)
            if channel == "a":
                assert tracker.heard("a", number)
    assert tracker.deaf_channels() == ["b"]
    assert tracker.missed("b") == 2
    tracker.reset()
    assert tracker.deaf_channels() == []


def test_probe_tracker_one_miss_is_not_deaf() -> None:
    tracker = ProbeTracker(["a"])
    tracker.next("a")
    assert tracker.deaf_channels() == []
    tracker.heard("a", tracker.next("a"))  # a later probe heard covers the earlier one
    assert tracker.missed("a") == 0


def test_probe_tracker_probe_reaching_nobody_is_deaf_at_once() -> None:
    tracker = ProbeTracker(["a", "b"])
    tracker.next("a")
    tracker.published("a", 0)
    tracker.published("b", None)  # a failed publish is just a missed probe
    assert tracker.deaf_channels() == ["a"]


def test_probe_tracker_ignores_probes_never_sent() -> None:
    tracker = ProbeTracker(["a"])
    tracker.next("a")
    tracker.next("a")
    assert not tracker.heard("a", 3)
    assert not tracker.heard("other", 1)
    assert tracker.deaf_channels() == ["a"]
    with pytest.raises(ValueError, match="at least 1"):
        ProbeTracker(["a"], missed=0)
