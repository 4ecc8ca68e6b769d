"""Client liveness: optional application-level pings and an idle timeout.

ASGI gives an app no way to send WebSocket ping frames or to see pongs, so, like
Engine.IO and Centrifugo, this works at the application level: every
``WSLB_PING_INTERVAL`` seconds a client that has sent nothing for that long gets
``WSLB_PING_MESSAGE``, and one that has sent nothing for ``WSLB_IDLE_TIMEOUT`` seconds is
closed with 4408, ending its handler so that it leaves the registry. Clients keep a
connection alive by sending any frame (such as a reply to the ping). One loop serves
every connection of the instance.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from .connection import Connection
from .envelope import Frame
from .outgoing import Outgoing

__all__ = ("IDLE_CLOSE", "ClientLiveness")

log = logging.getLogger("quart_wslb")
#: Close code for a client silent for longer than ``WSLB_IDLE_TIMEOUT``.
IDLE_CLOSE = 4408


class ClientLiveness:
    """Pings quiet clients and closes silent ones."""

    def __init__(
        self,
        local: Mapping[str, Connection],
        *,
        ping_interval: float | None,
        ping_message: Frame,
        idle_timeout: float | None,
    ) -> None:
        self._local = local
        self._ping_interval = ping_interval
        self._ping_message = Outgoing(ping_message)  # one for every ping: encoded once
        self._idle_timeout = idle_timeout

    @property
    def enabled(self) -> bool:
        """Whether there is anything to do (pings or an idle timeout)."""
        return self._ping_interval is not None or self._idle_timeout is not None

    @property
    def period(self) -> float:
        """How often :meth:`check` runs: a quarter of the shortest configured time."""
        times = [t for t in (self._ping_interval, self._idle_timeout) if t is not None]
        return max(0.05, min(times, default=1.0) / 4)

    async def run(self) -> None:
        """Check every ``period`` seconds until cancelled."""
        while True:
            try:
                await self.check(time.monotonic())
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("client liveness check failed: %r", error)
            await asyncio.sleep(self.period)

    async def check(self, now: float) -> None:
        """Close every connection silent past the idle timeout; ping the quiet ones."""
        for connection in list(self._local.values()):
            activity = connection.activity
            quiet = now - activity.received
            if self._idle_timeout is not None and quiet > self._idle_timeout:
                log.info("closing %s: silent for %.1fs", connection.id, quiet)
                await connection.close(IDLE_CLOSE, "idle timeout")
            elif (
                self._ping_interval is not None
                and quiet >= self._ping_interval
                and now - activity.pinged >= self._ping_interval
            ):
                activity.pinged = now
                await connection.offer(self._ping_message, None)
