"""``wslb watch``: a live view of the instances, their connections and message rates.

A rate is derived from each instance's count of messages received (taken off its
channels), which it writes to Redis at every heartbeat along with the time of that count
(its own clock): the difference between two counts over the time between the two beats
that wrote them. When the watch reads again before a new beat, it shows the rate it had;
rates are thus over one heartbeat interval (``WSLB_HEARTBEAT_INTERVAL``, 2 s by default)
or more, whatever the refresh interval, and do not depend on when the watch reads.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..instances import InstanceInfo
from .output import INSTANCE_HEADERS, instance_json, instance_rows, table

__all__ = ("Rates", "error_frame", "error_json", "frame", "frame_json")


@dataclass
class Rates:
    """Messages received per second by each instance, between its successive beats."""

    #: The previous reading of each instance run, (id, start time) -> (the time of its
    #: count, the count, the rate shown then): an instance restarted under the same id
    #: is another run, whose count starts again.
    _last: dict[tuple[str, float], tuple[float, int, float | None]] = field(default_factory=dict)

    def update(self, instances: Sequence[InstanceInfo]) -> dict[str, float | None]:
        """Each instance's rate between the last two beats seen: the previous rate if no
        beat came since the previous reading; ``None`` for a run first seen now, one
        with no second beat yet, or one whose record has no time (an older version)."""
        rates: dict[str, float | None] = {}
        last: dict[tuple[str, float], tuple[float, int, float | None]] = {}
        for info in instances:
            run = (info.id, info.started_at)
            before = self._last.get(run)
            rate: float | None = None
            if before is not None and info.counted_at > 0:
                at, count, shown = before
                if info.counted_at == at:  # no beat since: the count is the same
                    rate = shown
                elif info.counted_at > at and info.received >= count:
                    rate = (info.received - count) / (info.counted_at - at)
            rates[info.id] = rate
            last[run] = (info.counted_at, info.received, rate)
        self._last = last
        return rates


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1f}"


def frame(
    instances: Sequence[InstanceInfo],
    rates: dict[str, float | None],
    heading: str,
    now: float | None = None,
) -> str:
    """One screen of the view: ``heading``, a table of the instances, and the totals."""
    now = time.time() if now is None else now
    rows = [
        [*row, _rate(rates.get(info.id))]
        for row, info in zip(instance_rows(instances, now), instances, strict=True)
    ]
    known = [rate for rate in rates.values() if rate is not None]
    total = [
        "TOTAL",
        f"{len(instances)} instance{'' if len(instances) == 1 else 's'}",
        "",
        str(sum(info.connections for info in instances)),
        str(sum(info.received for info in instances)),
        _rate(sum(known) if known else None),
    ]
    body = table([*INSTANCE_HEADERS, "MSG/S"], [*rows, total])
    return f"{heading}\n\n{body}\n"


def frame_json(
    instances: Sequence[InstanceInfo], rates: dict[str, float | None], now: float
) -> dict[str, Any]:
    """One reading as a JSON object (``watch --json`` prints one per line)."""
    return {
        "time": now,
        "instances": [{**instance_json(info), "rate": rates.get(info.id)} for info in instances],
        "connections": sum(info.connections for info in instances),
    }


def error_frame(error: str, heading: str, interval: float) -> str:
    """The screen of a refresh that failed: the watch goes on."""
    return f"{heading}\n\nerror: {error}\n(trying again every {interval:g} s)\n"


def error_json(error: str, now: float) -> dict[str, Any]:
    """A refresh that failed, as a JSON object (``watch --json``)."""
    return {"time": now, "error": error}
