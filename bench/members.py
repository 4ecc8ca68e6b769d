"""Who the G members of each fan-out cell are: real clients, then synthetic records.

Real clients (``real`` in all) are dealt round-robin over the instances. Client ``i`` is
a member at every size ``G > i``: it joins group ``fan<G>`` and carries the metadata pair
``f<G>=1`` for each, so one population of sockets serves every G of those two kinds. A
connection has one path, so for paths the clients are cut in tiers: client ``i``
connects on ``/ws/t<G>`` for the smallest ``G > i``, and a path send at G goes to the
largest tier up to G that holds real clients (at G = 100: the 90 clients of ``/ws/t100``).

Synthetic records make up the rest of each set, up to G: records written through
:meth:`quart_wslb.registry.Registry.register` with no socket behind them, dealt over the
real instances the same way (ids ``<instance id>:<token>``), so that Redis holds
exactly what G members would make it hold.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from quart_wslb.connection import Connection
from quart_wslb.registry import Registry

__all__ = ("KINDS", "Client", "Filler", "Plan", "Synthetic")

KINDS = ("group", "path", "metadata")
#: Records per ``Registry.register`` call (one pipeline).
FILL_BATCH = 500
#: The path of synthetic records that belong to no path cell.
ELSEWHERE = "/ws/elsewhere"


@dataclass(frozen=True, slots=True)
class Client:
    """One real websocket client: its user name, path, groups and metadata."""

    index: int
    user: str
    path: str
    groups: tuple[str, ...]
    metadata: dict[str, str]

    def url_path(self) -> str:
        """The websocket path and query that ``bench/app.py`` reads."""
        query = [f"user={self.user}", *(f"group={g}" for g in self.groups)]
        query += [f"{k}={v}" for k, v in self.metadata.items()]
        return f"{self.path}?{'&'.join(query)}"


@dataclass(frozen=True, slots=True)
class Synthetic:
    """A connection record with no socket: all that ``Registry.register`` reads."""

    id: str
    user: str | None
    path: str
    instance: str
    metadata: dict[str, str]
    groups: frozenset[str]
    connected_at: float


def group_name(g: int) -> str:
    return f"fan{g}"


def meta_name(g: int) -> str:
    return f"f{g}"


def tier_path(g: int) -> str:
    return f"/ws/t{g}"


@dataclass(frozen=True, slots=True)
class Plan:
    """The sizes G and how many real clients there are (``real``)."""

    gs: tuple[int, ...]
    real: int

    def clients(self) -> list[Client]:
        """Every real client, in order."""
        return [
            Client(
                index=i,
                user=f"c{i:05d}",
                path=tier_path(min(g for g in self.gs if g > i)),
                groups=tuple(group_name(g) for g in self.gs if g > i),
                metadata={meta_name(g): "1" for g in self.gs if g > i},
            )
            for i in range(self.real)
        ]

    def _tier(self, g: int) -> int:
        """The largest tier up to ``g`` that holds real clients (``g`` if none does)."""
        held = [t for t in self.gs if t <= g and self._in_tier(t)]
        return held[-1] if held else g

    def _in_tier(self, tier: int) -> int:
        lower = max([g for g in self.gs if g < tier], default=0)
        return max(0, min(tier, self.real) - lower)

    def target(self, kind: str, g: int) -> tuple[str, str]:
        """``(name, value)`` of the selector of a cell (see ``/fan`` in bench/app.py)."""
        if kind == "group":
            return group_name(g), ""
        if kind == "metadata":
            return meta_name(g), "1"
        if kind == "path":
            return tier_path(self._tier(g)), ""
        raise ValueError(f"unknown kind {kind!r}")

    def real_members(self, kind: str, g: int) -> int:
        """How many real clients a cell's selector matches."""
        if kind == "path":
            return self._in_tier(self._tier(g))
        return min(g, self.real)


@dataclass
class Filler:
    """Writes the synthetic records that bring each cell's set up to G members."""

    registry: Registry
    instances: Sequence[str]
    plan: Plan
    #: Synthetic records written so far, per (kind, selector name).
    written: Counter[tuple[str, str]] = field(default_factory=Counter)
    total: int = 0

    def missing(self, kind: str, g: int) -> int:
        """Synthetic records the cell still needs."""
        name, _ = self.plan.target(kind, g)
        return max(0, g - self.plan.real_members(kind, g) - self.written[kind, name])

    def synthetic(self, kind: str, g: int) -> int:
        """Synthetic records in the cell's set."""
        return self.written[kind, self.plan.target(kind, g)[0]]

    async def fill(self, g: int, kinds: Sequence[str]) -> int:
        """Write what the cells of size ``g`` miss; returns how many records."""
        need = {kind: self.missing(kind, g) for kind in kinds}
        count = max(need.values(), default=0)
        records = [self._record(g, k, need) for k in range(count)]
        for start in range(0, count, FILL_BATCH):
            batch = cast(list[Connection], records[start : start + FILL_BATCH])
            await self.registry.register(*batch)
        for kind in kinds:
            self.written[kind, self.plan.target(kind, g)[0]] += need[kind]
        self.total += count
        return count

    def _record(self, g: int, k: int, need: dict[str, int]) -> Any:
        instance = self.instances[(self.total + k) % len(self.instances)]
        name, _ = self.plan.target("path", g)
        return Synthetic(
            id=f"{instance}:s{g}-{k:06d}",
            user=None,
            path=name if k < need.get("path", 0) else ELSEWHERE,
            instance=instance,
            metadata={meta_name(g): "1"} if k < need.get("metadata", 0) else {},
            groups=frozenset([group_name(g)] if k < need.get("group", 0) else []),
            connected_at=time.time(),
        )
