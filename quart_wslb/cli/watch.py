"""``wslb watch``: a live view of the instances, their connections and message rates.

A rate is derived from each instance's count of messages received (taken off its
channels), which it writes to Redis at every heartbeat: the difference between two
readings over the time between them. Each count is as of its instance's last heartbeat,
so a rate over one refresh is exact to a heartbeat interval (``WSLB_HEARTBEAT_INTERVAL``,
2 s by default); a refresh interval of a few heartbeats smooths it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..instances import InstanceInfo
from .output import INSTANCE_HEADERS, instance_json, instance_rows, table

__all__ = ("Rates", "frame", "frame_json")


@dataclass
class Rates:
    """Messages received per second by each instance, between successive readings."""

    #: The previous reading: instance id -> (monotonic time, messages received).
    _last: dict[str, tuple[float, int]] = field(default_factory=dict)

    def update(self, instances: Sequence[InstanceInfo], now: float) -> dict[str, float | None]:
        """Each instance's rate since the previous reading; ``None`` for an instance first
        seen now, or whose count went down (it restarted under the same id)."""
        rates: dict[str, float | None] = {}
        for info in instances:
            before = self._last.get(info.id)
            if before is None or info.received < before[1] or now <= before[0]:
                rates[info.id] = None
            else:
                rates[info.id] = (info.received - before[1]) / (now - before[0])
        self._last = {info.id: (now, info.received) for info in instances}
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
