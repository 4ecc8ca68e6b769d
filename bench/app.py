"""The quart-wslb app that the benchmark runs as N Hypercorn instances.

Configured from the environment like ``tests/cluster_app.py``: the extension reads the
``WSLB_*`` variables itself (``WSLB_REDIS_URL``, ``WSLB_PREFIX``, ``WSLB_INSTANCE_ID``).
``BENCH_COUNT=0`` disconnects the counter of received envelopes (the profile runs
without it); otherwise one ``message_received`` receiver adds one to a counter.

- ``/ws?user=NAME``: a tracked, idle websocket of user ``NAME``; it is sent ``ready``
  once registered.
- ``GET /fire?count=&users=&rate=&window=&size=``: ``wslb.send(UserSelector(...), text)``
  ``count`` times (see :mod:`bench.fire`), answering with the timing.
- ``GET /stats``: envelopes received, local connections, pid.
"""

from __future__ import annotations

import os
from typing import Any

from quart import Quart, request, websocket

from bench.fire import fire, fire_args
from quart_wslb import UserSelector, WsLoadBalance, current_connection, signals, ws_route
from quart_wslb.envelope import Envelope

app = Quart(__name__)
wslb = WsLoadBalance(app)
received = 0


def _count(sender: WsLoadBalance, envelope: Envelope) -> None:
    global received
    received += 1


if os.environ.get("BENCH_COUNT", "1") != "0":
    signals.message_received.connect(_count, sender=wslb)


@app.websocket("/ws")
@ws_route(user=lambda: websocket.args.get("user"))
async def ws() -> None:
    await current_connection.send("ready")
    while True:
        await websocket.receive()


async def _send(user: str, text: str) -> int:
    return await wslb.send(UserSelector(user), text)


@app.get("/fire")
async def fire_endpoint() -> dict[str, Any]:
    return await fire(_send, **fire_args(request.args))


@app.get("/stats")
async def stats() -> dict[str, Any]:
    return {
        "received": received,
        "local": len(wslb.local_connections),
        "pid": os.getpid(),
        "instance": wslb.instance_id,
    }
