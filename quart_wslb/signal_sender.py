"""How the library sends its signals: on behalf of one sender, receivers isolated.

The signals themselves, and what each receiver gets, are in :mod:`quart_wslb.signals`.
Every part of an instance that reports something (the receiver, liveness, connections,
the ASGI guard) holds the same :class:`SignalSender`, whose ``sender`` is the
:class:`~quart_wslb.WsLoadBalance` extension: receivers connected for one extension
(``connect_via(wslb)``) hear only it.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from blinker import NamedSignal

from . import signals

__all__ = ("SignalSender",)

log = logging.getLogger("quart_wslb")


class SignalSender:
    """Sends signals with ``sender`` as their sender.

    Unlike ``Signal.send_async``, each receiver is isolated: one that raises is logged,
    and the others still run, so a signal never breaks delivery. Coroutine receivers are
    awaited; plain functions are called inline on the event loop.
    """

    __slots__ = ("sender",)

    def __init__(self, sender: object) -> None:
        #: What every receiver gets as its first argument.
        self.sender = sender

    async def send(self, signal: NamedSignal, **kwargs: Any) -> None:
        """Call every receiver of ``signal`` for this sender, if anyone listens."""
        if not signal.receivers:
            return
        sender = self.sender
        for receiver in signal.receivers_for(sender):
            try:
                result = receiver(sender, **kwargs)
                if result is not None and inspect.isawaitable(result):  # sync: None
                    await result
            except Exception:
                log.exception("a receiver of the %s signal failed", signal.name)

    async def presence(self, online: list[str], offline: list[str]) -> None:
        """Send ``user_online`` and ``user_offline`` for what the registry reported."""
        for user in online:
            await self.send(signals.user_online, user=user)
        for user in offline:
            await self.send(signals.user_offline, user=user)

    async def dropped(
        self,
        reason: str,
        *,
        message_id: str | None = None,
        connection: object = None,
        detail: str = "",
    ) -> None:
        """Send ``message_dropped`` (its comment in :mod:`quart_wslb.signals` lists the
        reasons)."""
        if signals.message_dropped.receivers:
            await self.send(
                signals.message_dropped,
                reason=reason,
                message_id=message_id,
                connection=connection,
                detail=detail,
            )
