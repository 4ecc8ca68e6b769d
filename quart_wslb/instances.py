"""The list of instances in Redis: what an instance writes of itself, and how a reader
(an instance's liveness loop, an emitter) reads every live one back.

Each shard's ``instances`` hash maps an instance id to a small JSON record, written at
every heartbeat: its start time, how many messages it has taken off its channels so far
and when it counted them (the beat's own clock, so that a reader's rates do not depend on
when it happened to read). An instance is live while its heartbeat key exists; its
connections are its records, counted per shard and added up.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .keys import Keys

__all__ = ("InstanceInfo", "Run", "live", "read", "record")

#: Runs groups of commands in one round trip and returns every reply, in order.
Run = Callable[[Iterable[list[tuple[Any, ...]]]], Awaitable[list[Any]]]


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """A live instance, as Redis knows it."""

    id: str
    #: Unix time at which the instance started serving.
    started_at: float
    #: Connections registered for it.
    connections: int
    #: Messages it has taken off its channels since it started, as of its last heartbeat
    #: (0 for an instance of a version that did not count them).
    received: int = 0
    #: Unix time at which the instance read ``received`` (its heartbeat's time); 0.0 for
    #: an instance of a version that did not write it: no rate can be derived then.
    counted_at: float = 0.0


def record(started_at: float, received: int, counted_at: float) -> str:
    """The JSON record an instance writes of itself at each heartbeat."""
    return json.dumps({"started_at": started_at, "received": received, "counted_at": counted_at})


async def read(keys: Keys, run: Run) -> list[tuple[Keys, InstanceInfo, bool]]:
    """Every instance listed in each shard, and whether its heartbeat there is alive:
    two round trips through ``run``."""
    views = keys.views
    listed = await run([("HGETALL", view.instances)] for view in views)
    pairs = [
        (view, name.decode(), raw)
        for view, flat in zip(views, listed, strict=True)
        for name, raw in sorted(_fields(flat).items())
    ]
    counts = await run(
        [("EXISTS", view.heartbeat(name)), ("HLEN", view.records(name))] for view, name, _ in pairs
    )
    found = []
    for i, (view, name, raw) in enumerate(pairs):
        started_at, received, counted_at = _parsed(raw)
        info = InstanceInfo(name, started_at, int(counts[2 * i + 1]), received, counted_at)
        found.append((view, info, bool(counts[2 * i])))
    return found


def live(found: Iterable[tuple[Keys, InstanceInfo, bool]]) -> list[InstanceInfo]:
    """The live instances of :func:`read`'s listing, one each, sorted by id: its
    connections added up over the shards, its count the newest any shard holds (every
    beat writes the same record to each shard, but a shard whose write failed keeps an
    older one, and a count must stay paired with its own time)."""
    merged: dict[str, InstanceInfo] = {}
    for _, info, up in found:
        if up:
            had = merged.get(info.id)
            if had is None:
                merged[info.id] = info
                continue
            newest = max(had, info, key=lambda i: (i.counted_at, i.received))
            merged[info.id] = InstanceInfo(  # the start and the count of the same run
                info.id,
                newest.started_at,
                had.connections + info.connections,
                newest.received,
                newest.counted_at,
            )
    return sorted(merged.values(), key=lambda info: info.id)


def _parsed(raw: bytes) -> tuple[float, int, float]:
    """The start time, messages received and time of that count in an instance record;
    0.0, 0 and 0.0 for what is not ours (and 0 and 0.0 for a count or time missing or
    unreadable: an older version's record)."""
    try:
        data = json.loads(raw)
        started_at = _time(data["started_at"])
    except (ValueError, TypeError, KeyError):
        return 0.0, 0, 0.0
    received = data.get("received")
    if not (isinstance(received, int) and not isinstance(received, bool) and received >= 0):
        return started_at, 0, 0.0
    try:
        return started_at, received, _time(data.get("counted_at"))
    except (ValueError, TypeError):
        return started_at, received, 0.0


def _time(value: object) -> float:
    """A positive, finite Unix time; ``ValueError`` or ``TypeError`` for anything else
    (one corrupt record must not fail every listing, and the sweep with it)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"not a time: {value!r}")
    try:
        seconds = float(value)
    except OverflowError as error:  # an integer too large for a float
        raise ValueError("not a time: too large") from error
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"not a time: {seconds}")
    return seconds


def _fields(reply: Any) -> dict[bytes, bytes]:
    """An ``HGETALL`` reply as a dict: a flat list (RESP2), or a map (RESP3)."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))
