"""``ws_route``: makes a Quart websocket handler a tracked, cluster-addressable connection."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import ParamSpec, Protocol, TypeVar, cast

from quart import current_app

from .config import UserGetter
from .connection import Connection
from .globals import _cv_connection
from .recovery import ResumeRefusedError

__all__ = ("MetadataGetter", "Tracker", "ws_route")

P = ParamSpec("P")
R = TypeVar("R")
#: A callable run in the websocket context that returns the connection's metadata.
MetadataGetter = Callable[[], "Mapping[str, str] | Awaitable[Mapping[str, str]]"]


class Tracker(Protocol):
    """What ``ws_route`` needs of the app's extension (``app.extensions["wslb"]``)."""

    def track(
        self,
        *,
        user: UserGetter | None = None,
        metadata: MetadataGetter | None = None,
        accept: bool = True,
        recovery: bool = False,
    ) -> AbstractAsyncContextManager[Connection]:
        """The current websocket as a registered connection, for the block."""
        ...


def ws_route(
    *,
    user: UserGetter | None = None,
    metadata: MetadataGetter | None = None,
    accept: bool = True,
    recovery: bool = False,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Track the websocket handler it decorates, stacked under ``@app.websocket(rule)``.

    ``user`` returns the user's name (``str``) or ``None``; ``metadata`` returns a
    ``str -> str`` mapping. Both are sync or async callables run in the websocket context
    when the handler starts, before the handshake completes, so either may reject the
    connection (``abort(401)``); ``user`` defaults to the extension's ``user`` option.
    Then the websocket is accepted (with ``accept=False`` the handler accepts it itself,
    to choose a subprotocol or headers; messages routed to it wait until it does), the
    connection is registered, and the handler body runs; the connection is unregistered
    when the handler ends, however it ends. Inside, ``current_connection`` is the live
    connection.

    With ``recovery=True`` the connection is a recovery session (``docs/recovery.md``):
    the client's first frame must be the resume frame (it is read before the handler
    runs, which never sees it), every message routed to the connection arrives wrapped
    with its position, and a client that reconnects to any instance within
    ``recovery_ttl`` gets what it missed, or is told that history was lost. It needs
    ``accept=True``.
    """
    if recovery and not accept:
        raise ValueError("ws_route(recovery=True) needs accept=True")

    def decorator(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(handler)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            wslb: Tracker | None = current_app.extensions.get("wslb")
            if wslb is None:
                raise RuntimeError("@ws_route needs WsLoadBalance(app) on this app")
            tracked = wslb.track(user=user, metadata=metadata, accept=accept, recovery=recovery)
            try:
                async with tracked as connection:
                    token = _cv_connection.set(connection)
                    try:
                        return await current_app.ensure_async(handler)(*args, **kwargs)
                    finally:
                        _cv_connection.reset(token)
            except ResumeRefusedError:  # closed (1008) already: the handler never ran
                return cast(R, None)

        return wrapper

    return decorator
