"""What one benchmark run does: the presets (smoke, quick, full) and their parameters."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

__all__ = ("MAX_FOREIGN", "PRESETS", "SYSTEMS", "Params", "preset")

WSLB = "quart-wslb"
PEER = "python-socketio"
SYSTEMS = (WSLB, PEER)
#: Cores that processes outside the run may keep busy before a measurement is repeated.
MAX_FOREIGN = 0.25


@dataclass(frozen=True, slots=True)
class Params:
    """Every knob of a run; recorded in the results JSON."""

    preset: str
    #: Instance counts to run each system at.
    ns: tuple[int, ...]
    systems: tuple[str, ...]
    #: K: clients (one distinct user each) on the holding instance.
    users: int
    #: M: targeted messages of the saturation run, and their size in characters.
    messages: int
    size: int
    #: Sends in flight on the sending instance at saturation.
    window: int
    #: Messages of the sequential run (one send at a time; 0 skips it).
    seq_messages: int
    #: Messages and rate of the paced run.
    paced_messages: int
    paced_rate: float
    #: Messages of each floor run (raw redis.asyncio publish + subscribe).
    floor_messages: int
    #: Records written straight through ``Registry`` (rate and Redis memory).
    memory_records: int
    #: Idle websockets opened on one instance, held (RSS, Redis memory), then closed.
    idle_connections: int
    #: The ASGI server of the python-socketio peer.
    peer_server: str = "uvicorn"
    #: The ASGI server of quart-wslb's instances (Hypercorn, what it is tested under).
    server: str = "hypercorn"
    #: Seconds to wait, before each scenario, for a machine that others keep busy.
    quiet_wait: float = 0.0
    #: Runs of a measurement while other processes kept more than ``MAX_FOREIGN`` cores
    #: busy are repeated, up to this many attempts in all; the quietest is kept.
    attempts: int = 1


PRESETS: dict[str, Params] = {
    "smoke": Params(
        preset="smoke", ns=(1,), systems=SYSTEMS, users=4, messages=200, size=200,
        window=8, seq_messages=0, paced_messages=50, paced_rate=500.0, floor_messages=300,
        memory_records=200, idle_connections=10,
    ),
    "quick": Params(
        preset="quick", ns=(1, 2, 4), systems=SYSTEMS, users=200, messages=4000, size=200,
        window=32, seq_messages=1000, paced_messages=1000, paced_rate=1000.0,
        floor_messages=5000, memory_records=10_000,
        idle_connections=1000, quiet_wait=5.0,
    ),
    "full": Params(
        preset="full", ns=(1, 2, 4, 8), systems=SYSTEMS, users=200, messages=20_000,
        size=200, window=32, seq_messages=5000, paced_messages=5000, paced_rate=1000.0,
        floor_messages=20_000, memory_records=10_000,
        idle_connections=10_000, quiet_wait=30.0, attempts=3,
    ),
}  # fmt: skip


def preset(name: str, **overrides: Any) -> Params:
    """A preset with some fields replaced (``None`` values are ignored)."""
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
