"""ASGI middleware: a client frame larger than ``WSLB_MAX_MESSAGE_SIZE`` closes with 1009.

It sits in front of the Quart app so it sees every frame before any handler does; the
handler then sees an ordinary disconnect and ends, and its connection leaves the registry.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    Scope,
    WebsocketDisconnectEvent,
)

from . import signals

__all__ = ("MESSAGE_TOO_BIG", "MessageSizeLimit")

log = logging.getLogger("quart_wslb")
ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]
MESSAGE_TOO_BIG = 1009


def too_large(event: ASGIReceiveEvent, limit: int) -> bool:
    """Whether a received frame is over ``limit`` bytes (UTF-8 for text)."""
    data = event.get("bytes")
    if isinstance(data, bytes):
        return len(data) > limit
    text = event.get("text")
    if not isinstance(text, str) or len(text) * 4 <= limit:
        return False  # a character is at most four UTF-8 bytes: no need to encode
    return len(text) > limit or len(text.encode("utf-8")) > limit


class MessageSizeLimit:
    """Wraps an ASGI app; closes websockets whose client sends an oversized frame."""

    def __init__(self, app: ASGIApp, limit: int, owner: object) -> None:
        self.app = app
        self.limit = limit
        self._owner = owner

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return

        async def limited_receive() -> ASGIReceiveEvent:
            event = await receive()
            if event["type"] == "websocket.receive" and too_large(event, self.limit):
                log.warning("closed %s: client frame over %d bytes", scope["path"], self.limit)
                await send({"type": "websocket.close", "code": MESSAGE_TOO_BIG, "reason": ""})
                await signals.send(
                    signals.message_dropped,
                    self._owner,
                    reason="too_large",
                    message_id=None,
                    connection=None,
                    detail=f"client frame on {scope['path']} over {self.limit} bytes",
                )
                closed: WebsocketDisconnectEvent = {
                    "type": "websocket.disconnect",
                    "code": MESSAGE_TOO_BIG,
                }
                return closed
            return event

        await self.app(scope, limited_receive, send)
