"""What Redis spent on a run of sends, from ``INFO`` and ``SLOWLOG``, and a PING loop.

:class:`InfoMeter` reads ``INFO all`` twice back to back before the sends and once after,
and logs every command in the ``SLOWLOG`` meanwhile (``slowlog-log-slower-than 0``, set
back to Redis's default of 10 ms after); this gives, per run:

- ``top``: the commands that clients sent (not those a script ran, which the slow log
  files under the client ``?:0``), each with its calls, total and longest µs; the
  meter's own ``INFO``, ``SLOWLOG`` and ``CONFIG`` are left out. This is the Redis time
  of the sends, whatever commands they use, counted once;
- ``commands``: calls and µs of every command (``INFO commandstats``; ``INFO`` itself
  left out). Redis counts a command that a script runs both under that command and
  inside the script's ``EVALSHA``, so :func:`send_usec` takes the script calls' time when
  there were any, else that of the ``PUBLISH`` calls (a cross-check of ``top``);
- ``cpu_s``: ``used_cpu_sys`` + ``used_cpu_user``: everything Redis did meanwhile, its
  timers too. These cost about 1.5 ms per second at Redis's default ``hz 10`` on the
  benchmark's VM, which a send whose members take seconds to reach would be charged,
  so the meter runs Redis at ``hz 1`` (0.25 ms per second; set back after), and
  :func:`idle_cpu` measures that rate, for the caller to subtract;
- ``egress_bytes``: ``total_net_output_bytes``, less the reply to the first ``INFO``
  after the start (measured by the back-to-back pair): what Redis wrote to every client
  (pub/sub subscribers, the sender's replies);
- ``ingress_bytes``: ``total_net_input_bytes`` (what the sender wrote, and ``INFO``).

:class:`Pinger` runs :mod:`bench.pinger` in a process of its own; :func:`ping_stats`
summarises its samples, optionally only those sent inside given time windows.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

__all__ = ("InfoMeter", "Pinger", "idle_cpu", "ping_stats", "send_usec")

#: Entries the slow log keeps (Redis's default is 128).
SLOWLOG_LEN = 100_000
#: Redis's default ``slowlog-log-slower-than`` (µs), restored after a run.
SLOWLOG_DEFAULT = 10_000
#: Redis's timer frequency while metering, and its default (restored after).
METER_HZ, DEFAULT_HZ = 1, 10
#: The meter's own commands, left out of ``top``.
OWN_COMMANDS = (b"INFO", b"SLOWLOG", b"CONFIG")
SCRIPT_COMMANDS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")
PUBLISH_COMMANDS = ("publish", "spublish")
ROOT = Path(__file__).resolve().parent.parent


def _commands(info: dict[str, Any]) -> dict[str, tuple[int, int]]:
    return {
        name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
        for name, v in info.items()
        if name.startswith("cmdstat_") and isinstance(v, dict)
    }


def _cpu(info: dict[str, Any]) -> float:
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


class InfoMeter:
    """``INFO all`` before and after a run, on a connection of its own."""

    def __init__(self, url: str) -> None:
        self._client = Redis.from_url(url)
        self._before: list[dict[str, Any]] = []

    async def start(self) -> None:
        client = self._client
        await client.config_set("slowlog-max-len", SLOWLOG_LEN)
        await client.config_set("slowlog-log-slower-than", 0)
        await client.config_set("hz", METER_HZ)
        await client.slowlog_reset()
        self._before = [await client.info("all"), await client.info("all")]

    async def stop(self) -> dict[str, Any]:
        """The deltas since :meth:`start` (see the module docstring)."""
        first, second = self._before
        after = await self._client.info("all")
        entries = await self._client.slowlog_get(SLOWLOG_LEN)
        await self._client.config_set("slowlog-log-slower-than", SLOWLOG_DEFAULT)
        await self._client.config_set("hz", DEFAULT_HZ)
        reply = second["total_net_output_bytes"] - first["total_net_output_bytes"]
        old = _commands(second)
        commands = {
            name: (calls - old.get(name, (0, 0))[0], usec - old.get(name, (0, 0))[1])
            for name, (calls, usec) in _commands(after).items()
            if name != "info"
        }
        return {
            "top": _top(entries),
            "commands": {k: {"calls": c, "usec": u} for k, (c, u) in commands.items() if c},
            "cpu_s": _cpu(after) - _cpu(second),
            "egress_bytes": after["total_net_output_bytes"]
            - second["total_net_output_bytes"]
            - reply,
            "ingress_bytes": after["total_net_input_bytes"] - second["total_net_input_bytes"],
        }

    async def aclose(self) -> None:
        await self._client.aclose()


async def idle_cpu(url: str, seconds: float) -> float:
    """Redis's CPU seconds per second at ``hz 1`` over ``seconds`` of doing nothing
    for us (the timers' cost while :class:`InfoMeter` meters)."""
    client = Redis.from_url(url)
    try:
        await client.config_set("hz", METER_HZ)
        before = _cpu(await client.info("cpu"))
        await asyncio.sleep(seconds)
        return (_cpu(await client.info("cpu")) - before) / seconds
    finally:
        await client.config_set("hz", DEFAULT_HZ)
        await client.aclose()


def _top(entries: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Calls, total and longest µs of each command that a client sent (see above)."""
    top: dict[str, dict[str, int]] = {}
    for entry in entries:
        name = bytes(entry["command"]).split(b" ", 1)[0].upper()
        if entry["client_address"] == b"?:0" or name in OWN_COMMANDS:
            continue
        stats = top.setdefault(name.decode(), {"calls": 0, "usec": 0, "max_usec": 0})
        duration = int(entry["duration"])
        stats["calls"] += 1
        stats["usec"] += duration
        stats["max_usec"] = max(stats["max_usec"], duration)
    return top


def send_usec(commands: dict[str, dict[str, int]]) -> int:
    """Redis's µs for the sends of a run: the script calls' (which include the commands
    they ran), or the ``PUBLISH`` calls' when no script ran."""
    scripts = sum(commands.get(c, {}).get("usec", 0) for c in SCRIPT_COMMANDS)
    if any(commands.get(c, {}).get("calls", 0) for c in SCRIPT_COMMANDS):
        return scripts
    return sum(commands.get(c, {}).get("usec", 0) for c in PUBLISH_COMMANDS)


class Pinger:
    """:mod:`bench.pinger` in a process of its own, stopped by its pid."""

    def __init__(self, url: str, interval: float) -> None:
        self._url = url
        self._interval = interval
        self._process: subprocess.Popen[bytes] | None = None
        fd, name = tempfile.mkstemp(prefix="bench-ping-")
        os.close(fd)
        self._out = Path(name)

    def start(self) -> None:
        argv = [sys.executable, "-m", "bench.pinger", self._url, str(self._out)]
        self._process = subprocess.Popen(
            [*argv, "--interval", str(self._interval)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def stop(self) -> list[tuple[int, int]]:
        """Stop the loop; its samples, ``(time_ns sent, round trip ns)``."""
        process, self._process = self._process, None
        if process is None:
            return []
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        values = array("q")
        values.frombytes(self._out.read_bytes())
        self._out.unlink(missing_ok=True)
        return list(zip(values[::2], values[1::2], strict=True))


def ping_stats(
    samples: list[tuple[int, int]], windows: Iterable[tuple[int, int]] | None = None
) -> dict[str, float]:
    """Count, p50, p99 and max (ms) of the PINGs sent inside ``windows`` (``time_ns``
    start and end pairs; all of them when ``None``)."""
    if windows is not None:
        spans = sorted(windows)
        samples = [s for s in samples if any(a <= s[0] <= b for a, b in spans)]
    ordered = sorted(rtt for _, rtt in samples)
    if not ordered:
        return {"pings": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] / 1e6

    return {"pings": len(ordered), "p50_ms": rank(0.5), "p99_ms": rank(0.99), "max_ms": rank(1)}
