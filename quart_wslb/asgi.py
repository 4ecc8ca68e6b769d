"""ASGI middleware in front of the Quart app, for what Quart itself cannot see.

- A client frame larger than ``WSLB_MAX_MESSAGE_SIZE`` closes the websocket with 1009
  before any handler sees it; the handler then sees an ordinary disconnect and ends, and
  its connection leaves the registry. The server should refuse such frames itself (it
  holds a whole message in memory before the app sees it: :mod:`quart_wslb.server`); the
  guard still catches text whose characters the server counted but whose UTF-8 bytes are
  over the limit, and says once when the server's own limit is evidently higher.
- When the server gives up on a websocket (Hypercorn cancels the app once its graceful
  timeout has passed on shutdown), the client gets 1001 "going away", so it reconnects
  elsewhere, instead of 1011 "internal error". On Python before 3.13, asyncio then logs a
  ``CancelledError`` traceback for each connection Hypercorn cancelled (its stream
  callback asks a cancelled task for its exception, CPython gh-113538): while the app
  serves, :func:`quiet_cancelled_connections` drops exactly that report.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
    WebsocketDisconnectEvent,
)

from .connection import Activity
from .signal_sender import SignalSender

__all__ = (
    "ACTIVITY",
    "GOING_AWAY",
    "MESSAGE_TOO_BIG",
    "WebsocketGuard",
    "quiet_cancelled_connections",
    "server_unbounded",
    "stray_cancellation",
    "too_large",
)

log = logging.getLogger("quart_wslb")
ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]
MESSAGE_TOO_BIG = 1009
GOING_AWAY = 1001
#: The scope key under which the middleware keeps the websocket's :class:`Activity`.
ACTIVITY = "quart_wslb.activity"
#: Where asyncio's stream callback comes from, as the loop names the failed callback.
STREAM_CALLBACK = "StreamReaderProtocol.connection_made"
ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


def server_unbounded(event: ASGIReceiveEvent, limit: int) -> bool:
    """Whether the server let through a frame that its own limit, set to ``limit``, would
    have refused (Hypercorn counts bytes of binary frames and characters of text)."""
    data = event.get("bytes")
    text = event.get("text")
    return (isinstance(data, bytes) and len(data) > limit) or (
        isinstance(text, str) and len(text) > limit
    )


def too_large(event: ASGIReceiveEvent, limit: int) -> bool:
    """Whether a received frame is over ``limit`` bytes (UTF-8 for text)."""
    data = event.get("bytes")
    if isinstance(data, bytes):
        return len(data) > limit
    text = event.get("text")
    if not isinstance(text, str) or len(text) * 4 <= limit:
        return False  # a character is at most four UTF-8 bytes: no need to encode
    return len(text) > limit or len(text.encode("utf-8")) > limit


class WebsocketGuard:
    """Wraps an ASGI app: oversized client frames and server cancellation close cleanly."""

    def __init__(self, app: ASGIApp, limit: int, sender: SignalSender) -> None:
        self.app = app
        self.limit = limit
        self._sender = sender
        self._warned = False

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return

        open_ = False
        # The connection reads when its client last spoke from here (idle timeout).
        activity = Activity(send=send)
        cast(dict[str, Any], scope)[ACTIVITY] = activity

        async def tracked_send(event: ASGISendEvent) -> None:
            nonlocal open_
            if event["type"] == "websocket.accept":
                open_ = True
                activity.accepted.set()
            elif event["type"] == "websocket.close":
                open_ = False
            await send(event)

        async def limited_receive() -> ASGIReceiveEvent:
            event = await receive()
            if event["type"] != "websocket.receive":
                return event
            activity.received = time.monotonic()
            if too_large(event, self.limit):
                log.warning("closed %s: client frame over %d bytes", scope["path"], self.limit)
                self._warn_unbounded(event)
                await tracked_send(
                    {"type": "websocket.close", "code": MESSAGE_TOO_BIG, "reason": ""}
                )
                await self._sender.dropped(
                    "too_large",
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

        try:
            await self.app(scope, limited_receive, tracked_send)
        except asyncio.CancelledError:
            if open_:
                await send({"type": "websocket.close", "code": GOING_AWAY, "reason": ""})
            raise

    def _warn_unbounded(self, event: ASGIReceiveEvent) -> None:
        """Say once per process that the server buffers frames past the limit."""
        if self._warned or not server_unbounded(event, self.limit):
            return
        self._warned = True
        log.warning(
            "the server delivered a client frame over WSLB_MAX_MESSAGE_SIZE (%d): its own "
            "limit is higher, so it holds frames up to that size in memory; give it the "
            "same limit (quart_wslb.server.hypercorn_config, or websocket_max_message_size "
            "in its config file)",
            self.limit,
        )


def stray_cancellation(context: dict[str, Any]) -> bool:
    """Whether an event loop's error ``context`` is the CancelledError that asyncio's stream
    callback raises for a connection task cancelled by the server (gh-113538).

    That callback only reports what the connection's coroutine raised; it raises
    CancelledError itself only when asked about a cancelled task, so nothing else matches.
    """
    return isinstance(context.get("exception"), asyncio.CancelledError) and (
        STREAM_CALLBACK in str(context.get("message", ""))
    )


def quiet_cancelled_connections() -> Callable[[], None]:
    """Drop :func:`stray_cancellation` reports on the running loop; every other report goes
    to the handler that was there (or the default). Returns the function that undoes it.

    Hypercorn cancels the websockets still open when its graceful timeout ends: the app
    has done its part (the guard sent 1001), yet before Python 3.13 each cancelled
    connection logged a 25-line traceback, which reads as a crash on every Ctrl-C.
    """
    if sys.version_info >= (3, 13):  # fixed in asyncio: nothing to quiet
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: ExceptionHandler | None = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if stray_cancellation(context):
            return
        if previous is None:
            loop.default_exception_handler(context)
        else:
            previous(loop, context)

    loop.set_exception_handler(handler)

    def restore() -> None:
        if loop.get_exception_handler() is handler:  # not if someone replaced it since
            loop.set_exception_handler(previous)

    return restore
