"""The quart-wslb app that the benchmark runs as N Hypercorn instances.

Configured from the environment like ``tests/cluster_app.py``: the extension reads the
``WSLB_*`` variables itself (``WSLB_REDIS_URL``, ``WSLB_PREFIX``, ``WSLB_INSTANCE_ID``).
``BENCH_COUNT=0`` disconnects the counter of received envelopes (the profile runs
without it); otherwise one ``message_received`` receiver adds one to a counter.

- ``/ws?user=NAME``: a tracked, idle websocket of user ``NAME``; it is sent ``ready``
  once registered. For the fan-out benchmark (:mod:`bench.fanout`) the path may go on
  (``/ws/NAME``), every ``group=G`` parameter joins group ``G`` before ``ready``, and
  every other parameter is a metadata pair.
- ``/rws?user=NAME``: the same idle websocket in recovery mode (``docs/recovery.md``): its
  client sends the resume frame first, and every frame it gets is wrapped JSON. For
  :mod:`bench.recovery`.
- ``GET /fire?count=&users=&rate=&window=&size=``: ``wslb.send(UserSelector(...), text)``
  ``count`` times (see :mod:`bench.fire`), answering with the timing.
- ``GET /fan?kind=group|path|metadata&name=&value=&size=``: one
  ``wslb.send(GroupSelector(name) | PathSelector(name) | MetadataSelector(name=value),
  text)``, timed (see :func:`bench.fire.fan_once`).
- ``GET /stats``: envelopes received, local connections, pid.
"""

from __future__ import annotations

import os
from typing import Any

from quart import Quart, request, websocket

from bench.fire import fan_once, fire, fire_args
from quart_wslb import (
    GroupSelector,
    MetadataSelector,
    PathSelector,
    Selector,
    UserSelector,
    WsLoadBalance,
    current_connection,
    signals,
    ws_route,
)
from quart_wslb.envelope import Envelope

app = Quart(__name__)
wslb = WsLoadBalance(app)
received = 0


def _count(sender: WsLoadBalance, envelope: Envelope) -> None:
    global received
    received += 1


if os.environ.get("BENCH_COUNT", "1") != "0":
    signals.message_received.connect(_count, sender=wslb)


def _metadata() -> dict[str, str]:
    """Every query parameter but ``user`` and ``group``."""
    return {k: v for k, v in websocket.args.items() if k not in ("user", "group")}


@app.websocket("/ws")
@app.websocket("/ws/<name>")
@ws_route(user=lambda: websocket.args.get("user"), metadata=_metadata)
async def ws(name: str | None = None) -> None:
    for group in websocket.args.getlist("group"):
        await current_connection.join(group)
    await current_connection.send("ready")
    while True:
        await websocket.receive()


@app.websocket("/rws")
@ws_route(user=lambda: websocket.args.get("user"), recovery=True)
async def rws() -> None:
    await current_connection.send("ready")
    while True:
        await websocket.receive()


async def _send(user: str, text: str) -> int:
    return await wslb.send(UserSelector(user), text)


@app.get("/fire")
async def fire_endpoint() -> dict[str, Any]:
    return await fire(_send, **fire_args(request.args))


def _selector(kind: str, name: str, value: str) -> Selector:
    if kind == "group":
        return GroupSelector(name)
    if kind == "path":
        return PathSelector(name)
    if kind == "metadata":
        return MetadataSelector(**{name: value})
    raise ValueError(f"unknown kind {kind!r}")


@app.get("/fan")
async def fan_endpoint() -> dict[str, Any]:
    args = request.args
    selector = _selector(args["kind"], args["name"], args.get("value", "1"))
    return await fan_once(lambda text: wslb.send(selector, text), int(args.get("size", "200")))


@app.get("/stats")
async def stats() -> dict[str, Any]:
    return {
        "received": received,
        "local": len(wslb.local_connections),
        "pid": os.getpid(),
        "instance": wslb.instance_id,
    }
