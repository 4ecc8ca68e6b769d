"""The app of :mod:`bench.encode`: one instance whose clients all join one group.

Configured from the environment like :mod:`bench.app` (``WSLB_REDIS_URL``,
``WSLB_PREFIX``, ``WSLB_INSTANCE_ID``). ``BENCH_FRAMES=asgi`` turns the pre-encoded
frame path off, as if :func:`quart_wslb._compat.check` had failed, so that the fallback
(the ASGI ``websocket.send`` event per connection) can be measured beside it;
``BENCH_FRAMES=single`` keeps it but writes each frame alone (no coalescing).

- ``/ws?user=NAME``: a tracked websocket that joins the group ``all``, then is sent
  ``ready``.
- ``GET /group?count=&window=&size=``: ``wslb.send(GroupSelector("all"), text)``
  ``count`` times (see :mod:`bench.fire`), answering with the timing.
- ``GET /stats``: local connections, pid, and where ``quart_wslb`` was imported from.
"""

from __future__ import annotations

import os
from typing import Any

from quart import Quart, request, websocket

import quart_wslb
from bench.fire import fire, fire_args
from quart_wslb import GroupSelector, WsLoadBalance, current_connection, ws_route

GROUP = "all"

app = Quart(__name__)
wslb = WsLoadBalance(app)

if os.environ.get("BENCH_FRAMES") == "asgi":
    from quart_wslb import _compat

    _compat.frame_writer = lambda send: None
elif os.environ.get("BENCH_FRAMES") == "single":
    from quart_wslb import connection

    connection.COALESCE_BYTES = 0  # one write per frame, however many are queued


@app.websocket("/ws")
@ws_route(user=lambda: websocket.args.get("user"))
async def ws() -> None:
    await current_connection.join(GROUP)
    await current_connection.send("ready")
    while True:
        await websocket.receive()


async def _send(user: str, text: str) -> int:
    return await wslb.send(GroupSelector(GROUP), text)


@app.get("/group")
async def group() -> dict[str, Any]:
    return await fire(_send, **fire_args(request.args))


@app.get("/stats")
async def stats() -> dict[str, Any]:
    return {
        "local": len(wslb.local_connections),
        "pid": os.getpid(),
        "package": os.path.dirname(quart_wslb.__file__),
    }
