"""``current_connection``: the connection of the websocket handler being run."""

from __future__ import annotations

from contextvars import ContextVar

from werkzeug.local import LocalProxy

from .connection import Connection

__all__ = ("current_connection",)

_cv_connection: ContextVar[Connection] = ContextVar("quart_wslb.connection")

#: The live :class:`~quart_wslb.connection.Connection` of the current handler.
current_connection: Connection = LocalProxy(  # type: ignore[assignment]
    _cv_connection,
    unbound_message="Not within a websocket handler tracked by @ws_route.",
)
