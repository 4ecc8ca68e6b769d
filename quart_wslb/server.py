"""Carry quart-wslb's bounds to the ASGI server, which reads client frames before the app.

The server assembles each client message in memory before the app sees any of it, so
``WSLB_MAX_MESSAGE_SIZE`` bounds that memory only if the server refuses at the same size
(Hypercorn's own default is 16 MiB). The app cannot reach into a server started from the
command line: there the option goes into the server's config (see the deploy guide).
"""

from __future__ import annotations

from typing import Any

from hypercorn.config import Config
from quart import Quart

__all__ = ("hypercorn_config", "server_options")


def server_options(app: Quart) -> dict[str, Any]:
    """The Hypercorn settings that carry ``app``'s quart-wslb bounds to the server.

    Today one: ``websocket_max_message_size``, from ``WSLB_MAX_MESSAGE_SIZE``.
    """
    wslb = app.extensions.get("wslb")
    if wslb is None:
        raise RuntimeError("the app has no WsLoadBalance: create it before the server config")
    return {"websocket_max_message_size": wslb.settings.max_message_size}


def hypercorn_config(app: Quart, config: Config | None = None) -> Config:
    """``config`` (a new :class:`hypercorn.config.Config` by default) with ``app``'s bounds.

    For ``hypercorn.asyncio.serve(app, hypercorn_config(app))``; every other setting of
    ``config`` is kept.
    """
    config = Config() if config is None else config
    for name, value in server_options(app).items():
        setattr(config, name, value)
    return config
