"""``wslb watch``'s rates and screens, from readings made here (no Redis)."""

from __future__ import annotations

from quart_wslb import InstanceInfo
from quart_wslb.cli.watch import Rates, error_frame, error_json, frame, frame_json


def test_rates_are_messages_per_second_between_beats() -> None:
    rates = Rates()
    assert rates.update([InstanceInfo("a", 1.0, 0, 10, 100.0)]) == {"a": None}
    later = [InstanceInfo("a", 1.0, 0, 30, 104.0), InstanceInfo("b", 1.0, 0, 5, 104.0)]
    assert rates.update(later) == {"a": 5.0, "b": None}  # b: first seen


def test_rates_keep_the_last_rate_until_a_new_beat() -> None:
    """Read again before the instance beat again, the rate stays what it was: it never
    drops to 0 and doubles at the next beat (a refresh as frequent as the beats)."""
    rates = Rates()
    rates.update([InstanceInfo("a", 1.0, 0, 10, 100.0)])
    assert rates.update([InstanceInfo("a", 1.0, 0, 10, 100.0)]) == {"a": None}  # no 2nd beat
    assert rates.update([InstanceInfo("a", 1.0, 0, 30, 102.0)]) == {"a": 10.0}
    assert rates.update([InstanceInfo("a", 1.0, 0, 30, 102.0)]) == {"a": 10.0}
    assert rates.update([InstanceInfo("a", 1.0, 0, 50, 104.0)]) == {"a": 10.0}


def test_rates_of_an_instance_that_writes_no_count_time_are_unknown() -> None:
    """An instance of an older version (no ``counted_at``) has no rate, not 0.0."""
    rates = Rates()
    rates.update([InstanceInfo("old", 1.0, 0)])
    assert rates.update([InstanceInfo("old", 1.0, 0)]) == {"old": None}


def test_rates_restart_when_an_instance_restarts_under_its_id() -> None:
    """A new run (another start time) has no rate yet, even if its count is higher."""
    rates = Rates()
    rates.update([InstanceInfo("a", 1.0, 0, 5, 100.0)])
    assert rates.update([InstanceInfo("a", 2.0, 0, 50, 102.0)]) == {"a": None}
    assert rates.update([InstanceInfo("a", 2.0, 0, 54, 104.0)]) == {"a": 2.0}


def test_rates_restart_when_a_count_goes_down() -> None:
    rates = Rates()
    rates.update([InstanceInfo("a", 1.0, 0, 50, 100.0)])
    assert rates.update([InstanceInfo("a", 1.0, 0, 3, 102.0)]) == {"a": None}


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
            {
                "id": "i0",
                "started_at": 40.0,
                "connections": 2,
                "received": 10,
                "counted_at": 0.0,
                "rate": 1.0,
            }  # fmt: skip
        ],
    }


def test_error_frame_and_json_say_what_failed() -> None:
    text = error_frame("Redis: timeout", "heading", 2.0)
    assert text.splitlines()[:3] == ["heading", "", "error: Redis: timeout"]
    assert error_json("Redis: timeout", 5.0) == {"time": 5.0, "error": "Redis: timeout"}
