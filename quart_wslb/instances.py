"""The list of instances in Redis: what an instance writes of itself, and how a reader
(an instance's liveness loop, an emitter) reads every live one back.

Each shard's ``instances`` hash maps an instance id to a small JSON record, written at
every heartbeat: its start time and how many messages it has taken off its channels so
far. An instance is live while its heartbeat key exists; its connections are its
records, counted per shard and added up.
"""

from __future__ import annotations

import json
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


def record(started_at: float, received: int) -> str:
    """The JSON record an instance writes of itself at each heartbeat."""
    return json.dumps({"started_at": started_at, "received": received})


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
        started_at, received = _parsed(raw)
        info = InstanceInfo(name, started_at, int(counts[2 * i + 1]), received)
        found.append((view, info, bool(counts[2 * i])))
    return found


def live(found: Iterable[tuple[Keys, InstanceInfo, bool]]) -> list[InstanceInfo]:
    """The live instances of :func:`read`'s listing, one each, sorted by id: its
    connections added up over the shards (every shard holds the same record)."""
    merged: dict[str, InstanceInfo] = {}
    for _, info, up in found:
        if up:
            had = merged.get(info.id)
            count = info.connections + (had.connections if had else 0)
            merged[info.id] = InstanceInfo(
                info.id, info.started_at, count, max(info.received, had.received if had else 0)
            )
    return sorted(merged.values(), key=lambda info: info.id)


def _parsed(raw: bytes) -> tuple[float, int]:
    """The start time and messages received in an instance record; 0.0 and 0 for what
    is not ours."""
    try:
        data = json.loads(raw)
        started_at = float(data["started_at"])
    except (ValueError, TypeError, KeyError):
        return 0.0, 0
    received = data.get("received")
    valid = isinstance(received, int) and not isinstance(received, bool) and received >= 0
    return started_at, received if valid else 0


def _fields(reply: Any) -> dict[bytes, bytes]:
    """An ``HGETALL`` reply as a dict: a flat list (RESP2), or a map (RESP3)."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))
