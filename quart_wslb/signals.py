"""blinker signals, sent with ``send_async`` as Quart sends its own.

Every signal is sent with the :class:`~quart_wslb.WsLoadBalance` extension as sender.
Coroutine receivers are awaited; plain functions are called inline on the event loop,
so they must be quick. A receiver that raises is logged and never breaks delivery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from blinker import NamedSignal, Namespace

__all__ = (
    "connection_closed",
    "connection_opened",
    "message_delivered",
    "message_dropped",
    "message_received",
    "message_routed",
    "send",
)

log = logging.getLogger("quart_wslb")
_signals = Namespace()

#: A local connection was registered. Receivers: ``(sender, connection)``.
connection_opened: NamedSignal = _signals.signal("connection_opened")
#: A local connection ended and left the registry. Receivers: ``(sender, connection)``.
connection_closed: NamedSignal = _signals.signal("connection_closed")
#: ``send`` published a message. Receivers: ``(sender, message_id, selector, routed,
#: instances)``: connections and instances it was routed to.
message_routed: NamedSignal = _signals.signal("message_routed")
#: This instance took an envelope off its channel. Receivers: ``(sender, envelope)``.
message_received: NamedSignal = _signals.signal("message_received")
#: A frame was written to a local client. Receivers: ``(sender, connection, frame)``.
message_delivered: NamedSignal = _signals.signal("message_delivered")
#: Something was not delivered. Receivers: ``(sender, reason, message_id, connection,
#: detail)``; ``reason`` is ``"malformed"``, ``"queue_full"``, ``"gone"`` (no such local
#: connection) or ``"closed"`` (still queued when the connection ended), and
#: ``message_id``/``connection`` are ``None`` when unknown.
message_dropped: NamedSignal = _signals.signal("message_dropped")


def _inline(func: Callable[..., Any]) -> Callable[..., Coroutine[Any, Any, Any]]:
    async def call(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return call


async def send(signal: NamedSignal, sender: object, **kwargs: Any) -> None:
    """Send ``signal`` if anyone listens; a failing receiver is logged, not raised."""
    if not signal.receivers:
        return
    try:
        await signal.send_async(sender, _sync_wrapper=_inline, **kwargs)
    except Exception:
        log.exception("a receiver of the %s signal failed", signal.name)
