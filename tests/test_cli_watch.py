"""``wslb watch``'s rates and screens, from readings made here (no Redis)."""

from __future__ import annotations

from quart_wslb import InstanceInfo
from quart_wslb.cli.watch import Rates, frame, frame_json


def test_rates_are_messages_per_second_between_readings() -> None:
    rates = Rates()
    assert rates.update([InstanceInfo("a", 1.0, 0, 10)], now=100.0) == {"a": None}
    later = [InstanceInfo("a", 1.0, 0, 30), InstanceInfo("b", 1.0, 0, 5)]
    assert rates.update(later, now=104.0) == {"a": 5.0, "b": None}  # b: first seen


def test_rates_restart_when_a_count_goes_down() -> None:
    rates = Rates()
    rates.update([InstanceInfo("a", 1.0, 0, 50)], now=100.0)
    assert rates.update([InstanceInfo("a", 2.0, 0, 3)], now=102.0) == {"a": None}
    assert rates.update([InstanceInfo("a", 2.0, 0, 7)], now=104.0) == {"a": 2.0}


def test_frame_lists_instances_rates_and_totals() -> None:
    found = [InstanceInfo("i0", 40.0, 2, 10), InstanceInfo("i1", 70.0, 3, 4)]
    text = frame(found, {"i0": 2.5, "i1": None}, "heading", now=100.0)
    lines = text.splitlines()
    assert lines[:2] == ["heading", ""]
    assert lines[2].split() == ["INSTANCE", "STARTED", "(UTC)", "UP", "CONNECTIONS",
                                "RECEIVED", "MSG/S"]  # fmt: skip
    assert lines[3].split()[-4:] == ["1m00s", "2", "10", "2.5"]
    assert lines[4].split()[-4:] == ["30s", "3", "4", "-"]
    assert lines[5].split() == ["TOTAL", "2", "instances", "5", "14", "2.5"]


def test_frame_json_has_every_instance_and_its_rate() -> None:
    found = [InstanceInfo("i0", 40.0, 2, 10)]
    assert frame_json(found, {"i0": 1.0}, 100.0) == {
        "time": 100.0,
        "connections": 2,
        "instances": [
            {"id": "i0", "started_at": 40.0, "connections": 2, "received": 10, "rate": 1.0}
        ],
    }
