"""The send loop both benchmark apps run: M targeted messages, saturating or paced.

It imports neither Quart nor python-socketio, so both systems fire through the same code.
A message is ``"<index:08d> <time_ns:019d> "`` padded with ``x`` to ``size`` characters:
the client reads the send time back from it to measure latency. Message ``i`` goes to
user ``i % users``; users are named by :func:`user_name`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

__all__ = ("FireResult", "fan_once", "fire", "fire_args", "parse", "payload", "user_name")

#: Characters of a message that carry the index and the send time.
HEADER = 29
#: A send: (user, payload) -> connections routed to, or ``None`` when the system
#: does not say.
Send = Callable[[str, str], Awaitable[int | None]]
#: A group send: payload -> connections routed to, or ``None`` when the system does not say.
GroupSend = Callable[[str], Awaitable[int | None]]
FireResult = dict[str, Any]


def user_name(index: int) -> str:
    """The name of user number ``index`` (also the socket.io room it joins)."""
    return f"u{index:05d}"


def payload(index: int, size: int) -> str:
    """Message ``index`` stamped with the time of the send, ``size`` characters long."""
    return f"{index:08d} {time.time_ns():019d} ".ljust(size, "x")


def parse(text: str) -> tuple[int, int]:
    """(index, send time in ns) of a message built by :func:`payload`."""
    return int(text[:8]), int(text[9:28])


async def fire(
    send: Send, *, count: int, users: int, rate: float, window: int, size: int
) -> FireResult:
    """Send ``count`` messages with at most ``window`` in flight, at ``rate``/s (0: no limit).

    Returns how long the sends took and how many connections they were routed to
    (``routed`` is ``-1`` when the system does not report it).
    """
    if size < HEADER:
        raise ValueError(f"messages must be at least {HEADER} characters")
    counter = itertools.count()
    routed = 0
    unknown = False
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal routed, unknown
        for i in counter:
            if i >= count:
                return
            if rate > 0:
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            result = await send(user_name(i % users), payload(i, size))
            if result is None:
                unknown = True
            else:
                routed += result

    await asyncio.gather(*(worker() for _ in range(max(1, min(window, count)))))
    elapsed = time.perf_counter() - start
    return {
        "sent": count,
        "elapsed_s": elapsed,
        "send_rate": count / elapsed if elapsed > 0 else 0.0,
        "routed": -1 if unknown else routed,
    }


async def fan_once(send: GroupSend, size: int) -> FireResult:
    """One group send of a stamped message, timed as its caller waits for it.

    Returns the connections it was routed to (``-1``: the system does not say), the
    caller's wait in ns, and the wall-clock ``time_ns`` of the stamp and of the return.
    """
    text = payload(0, size)
    start = time.perf_counter_ns()
    routed = await send(text)
    caller = time.perf_counter_ns() - start
    return {
        "routed": -1 if routed is None else routed,
        "caller_ns": caller,
        "sent_ns": parse(text)[1],
        "done_ns": time.time_ns(),
    }


def fire_args(query: Mapping[str, str]) -> dict[str, Any]:
    """The keyword arguments of :func:`fire` from a query string (``/fire?count=...``)."""
    return {
        "count": int(query.get("count", "1000")),
        "users": int(query.get("users", "1")),
        "rate": float(query.get("rate", "0")),
        "window": int(query.get("window", "1")),
        "size": int(query.get("size", "200")),
    }
