"""The Quart app that the integration tests run as several Hypercorn instances.

A plain ``WsLoadBalance(app)``: the extension reads its options from the environment
(``WSLB_REDIS_URL``, ``WSLB_PREFIX``, ``WSLB_INSTANCE_ID``...) itself.
It counts every envelope its instance receives, so tests can prove which instances
a send reached. With ``TEST_METRICS=1`` in its environment it also has
:class:`~quart_wslb.metrics.Metrics`, served at ``/metrics``.
"""

from __future__ import annotations

import os
from collections import Counter
from types import SimpleNamespace
from typing import Any

from quart import Quart, Response, current_app, request, websocket

from quart_wslb import (
    AllSelector,
    ConnectionInfo,
    ConnectionSelector,
    CustomSelector,
    GroupSelector,
    MetadataSelector,
    PathSelector,
    RedisUnavailableError,
    Selector,
    UserSelector,
    WsLoadBalance,
    current_connection,
    signals,
    ws_route,
)
from quart_wslb.envelope import CONTROL_KINDS, Envelope
from quart_wslb.server import server_options

app = Quart(__name__)
wslb = WsLoadBalance(app)
stats: Counter[str] = Counter()


if os.environ.get("TEST_METRICS") == "1":  # prometheus_client is imported only then
    from prometheus_client import CollectorRegistry

    from quart_wslb.metrics import Metrics

    metrics = Metrics(app, registry=CollectorRegistry())

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return metrics.response()


#: The server's settings: ``hypercorn --config python:tests.cluster_app.hypercorn``.
hypercorn = SimpleNamespace(**server_options(app))


@signals.message_received.connect_via(wslb)
def _count(sender: WsLoadBalance, envelope: Envelope) -> None:
    if envelope.kind in CONTROL_KINDS:
        stats["controls"] += 1
        return
    stats["envelopes"] += 1
    stats["targets"] += len(envelope.targets or ())


@signals.message_dropped.connect_via(wslb)
def _count_drop(sender: WsLoadBalance, reason: str, **_: Any) -> None:
    stats[f"dropped_{reason}"] += 1


@signals.user_online.connect_via(wslb)
def _online(sender: WsLoadBalance, user: str) -> None:
    stats[f"online_{user}"] += 1


@signals.user_offline.connect_via(wslb)
def _offline(sender: WsLoadBalance, user: str) -> None:
    stats[f"offline_{user}"] += 1


@signals.instance_left.connect_via(wslb)
def _left(sender: WsLoadBalance, instance: str) -> None:
    stats[f"left_{instance}"] += 1


@signals.instance_reaped.connect_via(wslb)
def _count_reaped(sender: WsLoadBalance, instance: str, connections: int) -> None:
    stats["reaped"] += 1
    stats["reaped_connections"] += connections


@signals.registry_repaired.connect_via(wslb)
def _count_repaired(sender: WsLoadBalance, restored: int, removed: int) -> None:
    stats["restored"] += restored
    stats["removed"] += removed


@signals.subscriber_lost.connect_via(wslb)
def _count_lost(sender: WsLoadBalance, error: Exception, reason: str = "", **_: Any) -> None:
    stats["subscriber_lost"] += 1
    stats[f"subscriber_lost_{reason}"] += 1


@app.errorhandler(RedisUnavailableError)
async def _unavailable(error: RedisUnavailableError) -> tuple[dict[str, str], int]:
    return {"error": str(error)}, 503


class RoomPrefix(CustomSelector):
    """A custom selector: connections whose room starts with a prefix (no index)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def matches(self, connection: ConnectionInfo) -> bool:
        return connection.metadata.get("room", "").startswith(self.prefix)


def selector_from(spec: dict[str, Any]) -> Selector:
    """Build a selector from JSON: {"user": u} | {"path": p} | {"id": i} | {"meta": {...}}
    | {"group": g} | {"room_prefix": p} | {"all": true} | {"and": [a, b]} | {"or": [a, b]}."""
    if "and" in spec:
        left, right = spec["and"]
        return selector_from(left) & selector_from(right)
    if "or" in spec:
        left, right = spec["or"]
        return selector_from(left) | selector_from(right)
    if "user" in spec:
        return UserSelector(spec["user"])
    if "path" in spec:
        return PathSelector(spec["path"])
    if "id" in spec:
        return ConnectionSelector(spec["id"])
    if "meta" in spec:
        return MetadataSelector(**spec["meta"])
    if "group" in spec:
        return GroupSelector(spec["group"])
    if "room_prefix" in spec:
        return RoomPrefix(spec["room_prefix"])
    return AllSelector()


@app.websocket("/ws/<room>")
@ws_route(
    user=lambda: websocket.args.get("user"),
    metadata=lambda: {"room": websocket.view_args["room"]} if websocket.view_args else {},
)
async def chat(room: str) -> None:
    conn = current_connection
    await conn.send({"hello": conn.id, "instance": conn.instance, "user": conn.user})
    while True:
        text = await websocket.receive()
        if text == "close":
            return
        if text == "pong":
            continue
        if isinstance(text, str) and text.startswith(("join:", "leave:")):
            action, _, group = text.partition(":")
            await (conn.join(group) if action == "join" else conn.leave(group))
            await conn.send({"done": text, "groups": sorted(conn.groups)})
            continue
        await current_app.wslb.send(  # type: ignore[attr-defined]
            MetadataSelector(room=room), {"from": conn.user, "text": text}
        )


@app.websocket("/ws/recover")
@app.websocket("/ws/recover/other")
@ws_route(recovery=True, user=lambda: websocket.args.get("user"))
async def recover() -> None:
    """A recoverable connection (tests/recovering.py speaks its protocol): what is routed
    to it comes with a position and is replayed on a resume. ``whoami`` is answered on
    the connection itself (a frame without a position); ``close`` ends the handler.
    Two paths: a session of one must not resume on the other."""
    conn = current_connection
    while True:
        text = await websocket.receive()
        if text == "close":
            return
        if text == "whoami":
            await conn.send({"instance": conn.instance, "user": conn.user, "id": conn.id})


@app.post("/send")
async def send() -> dict[str, Any]:
    body = await request.get_json()
    routed = await wslb.send(selector_from(body["selector"]), body["message"])
    return {"routed": routed}


@app.post("/send_many")
async def send_many() -> dict[str, Any]:
    body = await request.get_json()
    pairs = [(selector_from(spec), message) for spec, message in body["messages"]]
    return {"routed": await wslb.send_many(pairs)}


@app.post("/send_raw")
async def send_raw() -> dict[str, Any]:
    body = await request.get_data()
    routed = await wslb.send(UserSelector(request.args["user"]), body)
    return {"routed": routed}


@app.post("/resolve")
async def resolve() -> dict[str, Any]:
    body = await request.get_json()
    return dict(await wslb.resolve(selector_from(body["selector"])))


@app.post("/join")
async def join() -> dict[str, Any]:
    body = await request.get_json()
    selector = selector_from(body["selector"])
    if body.get("leave"):
        return {"matched": await wslb.leave(selector, body["group"])}
    return {"matched": await wslb.join(selector, body["group"])}


@app.post("/disconnect")
async def disconnect() -> dict[str, Any]:
    body = await request.get_json()
    closed = await wslb.disconnect(selector_from(body["selector"]), body["code"], body["reason"])
    return {"closed": closed}


@app.post("/query")
async def query() -> dict[str, Any]:
    body = await request.get_json()
    selector = selector_from(body["selector"])
    records = [
        {
            "id": r.id,
            "user": r.user,
            "path": r.path,
            "instance": r.instance,
            "metadata": dict(r.metadata),
            "groups": sorted(r.groups),
            "connected_at": r.connected_at,
        }
        async for r in wslb.connections(selector)
    ]
    return {
        "count": await wslb.count(selector),
        "connections": sorted(records, key=lambda r: str(r["id"])),
        "users": sorted([u async for u in wslb.users(selector)]),
    }


@app.get("/instances")
async def get_instances() -> list[dict[str, Any]]:
    return [
        {"id": i.id, "started_at": i.started_at, "connections": i.connections}
        for i in await wslb.instances()
    ]


@app.get("/stats")
async def get_stats() -> dict[str, Any]:
    local = wslb.local_connections
    # The connections whose frames are written encoded once, to Hypercorn's stream.
    wire = sorted(id for id, c in local.items() if c._wire)
    return {"instance": wslb.instance_id, "local": len(local), "wire": wire, **stats}
