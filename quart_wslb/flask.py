"""A Flask extension that pushes to a quart-wslb cluster from Flask views.

Install with ``pip install quart-wslb[flask]``. It hosts no websocket: it is an
:class:`~quart_wslb.Emitter` configured from the same ``WSLB_*`` keys as the Quart
extension (``WSLB_REDIS_URL``, ``WSLB_PREFIX``, ``WSLB_REDIS_TIMEOUT``,
``WSLB_REDIS_MAX_CONNECTIONS``, ``WSLB_SECRET``, in the config or the environment)::

    from flask import Flask, current_app
    from quart_wslb import UserSelector
    from quart_wslb.flask import WsLoadBalance

    app = Flask(__name__)
    WsLoadBalance(app)

    @app.post("/notify/<user>")
    def notify(user):
        return {"routed": current_app.wslb.send(UserSelector(user), {"hello": user})}

The Quart path never imports this module, so Flask stays an optional dependency.
"""

from __future__ import annotations

import atexit

from flask import Flask

from .config import emitter_options
from .sync import Emitter

__all__ = ("WsLoadBalance",)


class WsLoadBalance:
    """Binds an :class:`~quart_wslb.Emitter` to a Flask app as ``app.wslb``.

    Keyword arguments win over ``app.config["WSLB_*"]``, which wins over the environment
    variables of the same names, which win over the defaults.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        redis_url: str | None = None,
        prefix: str | None = None,
        redis_timeout: float | None = None,
        redis_max_connections: int | None = None,
        secret: object = None,
    ) -> None:
        self._redis_url = redis_url
        self._prefix = prefix
        self._redis_timeout = redis_timeout
        self._redis_max_connections = redis_max_connections
        self._secret = secret
        self.emitter: Emitter | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> Emitter:
        """Create the app's emitter and register it as ``app.extensions["wslb"]``."""
        if "wslb" in app.extensions:
            raise RuntimeError("the app already has a WsLoadBalance")
        # Only the emitter's own options: the Quart instances' (pings...) are not read.
        options = emitter_options(
            redis_url=self._redis_url,
            prefix=self._prefix,
            timeout=self._redis_timeout,
            max_connections=self._redis_max_connections,
            secret=self._secret,
            config=app.config,
        )
        emitter = Emitter.from_options(options)
        app.extensions["wslb"] = emitter
        app.wslb = emitter  # type: ignore[attr-defined]
        atexit.register(emitter.close)
        self.emitter = emitter
        return emitter
