"""A small chat that runs as several instances on one Redis: ``example_app.app:app``.

Connect with ``ws://HOST/ws?user=alice&room=lobby``; the connection joins the room, a
group (and keeps the room name in its metadata too). Every JSON frame a client receives
has a ``type`` and ``sent_by``, the instance that called ``send``; the ``welcome`` frame
names the instance that holds the socket, which is the one that delivers every frame on
it. Frames that only this instance writes to its own client carry ``delivered_by`` too.
Client frames:

* ``{"type": "say", "text": "..."}``: to everyone in the room (a group: ``GroupSelector``).
* ``{"type": "dm", "to": "bob", "text": "..."}``: to every connection of one user
  (``UserSelector``), wherever it is; the sender gets a ``dm_sent`` receipt with the
  number of connections it was routed to.

On joining, a client gets a ``welcome`` frame, then a ``roster``: everyone in the room
with the instance that holds them, read from Redis (``WsLoadBalance.connections``); then
``presence`` frames as people join and leave, on whatever instance.

The route is in recovery mode (``ws_route(recovery=True)``, docs/recovery.md): a client
opens with a resume frame (``{"t": "resume"}`` for a new session), is answered
``{"t": "welcome", ...}``, and gets each frame of the app wrapped: ``{"t": "msg",
"pos": ..., "j": frame}``, with no ``pos`` for what this instance writes to its own
client. A client that reconnects, to any instance, resumes its session and gets the
frames it missed; ``static/wslb-recovery.js`` is the page's client.

``POST /notify/<user>`` with a JSON body pushes ``{"type": "notify", "data": body}`` to
that user and answers ``{"routed": n, "instance": "<the instance that answered>"}``.
``GET /cluster`` lists the live instances (``WsLoadBalance.instances()``). The extension
reads its options from the ``WSLB_*`` environment variables itself (``WSLB_REDIS_URL``,
``WSLB_INSTANCE_ID``, ``WSLB_PREFIX``...), as any app's does.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import Any

from quart import Quart, Response, request, websocket

from quart_wslb import (
    GroupSelector,
    RedisUnavailableError,
    UserSelector,
    WsLoadBalance,
    WsLoadBalanceError,
    current_connection,
    ws_route,
)
from quart_wslb.server import server_options

__all__ = ("app", "wslb")

#: Longest user name, room name and chat text the app accepts.
MAX_NAME, MAX_TEXT = 32, 2000
#: Close code for a client that did not say who it is ("policy violation").
POLICY_VIOLATION = 1008

log = logging.getLogger("example_app")
_handler = logging.StreamHandler()
_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
for _logger in (log, logging.getLogger("quart_wslb")):  # Hypercorn configures its own
    _logger.addHandler(_handler)
    _logger.setLevel(logging.INFO)

app = Quart(__name__)
#: The extension; ``current_app.wslb`` is the same object (this name is typed for mypy).
wslb = WsLoadBalance(app)
#: The frame limit for the server: ``hypercorn --config python:example_app.app.hypercorn``.
hypercorn = SimpleNamespace(**server_options(app))


def _arg(name: str) -> str:
    """A query argument of the websocket request, trimmed to ``MAX_NAME`` ("" if absent)."""
    return (websocket.args.get(name) or "").strip()[:MAX_NAME]


def _stamped(frame: dict[str, Any]) -> dict[str, Any]:
    """``frame`` plus ``sent_by``: the instance that sends it."""
    return {**frame, "sent_by": wslb.instance_id}


def _local(frame: dict[str, Any]) -> dict[str, Any]:
    """A frame for this client only: sent and delivered by this instance."""
    return {**_stamped(frame), "delivered_by": wslb.instance_id}


@app.get("/")
async def index() -> Response:
    """The chat page (plain HTML and JavaScript, no build step)."""
    return await app.send_static_file("index.html")


@app.get("/favicon.ico")
async def favicon() -> Response:
    """The page's icon (``static/favicon.svg``), where a browser asks for it by this name:
    the page names it, but a JSON endpoint opened in a browser tab does not."""
    return await app.send_static_file("favicon.svg")


@app.get("/health")
async def health() -> dict[str, Any]:
    """Which instance this is and how many sockets it holds (the launcher polls it)."""
    return {"instance": wslb.instance_id, "connections": len(wslb.local_connections)}


@app.post("/notify/<user>")
async def notify(user: str) -> tuple[dict[str, Any], int]:
    """Push the JSON body to every connection of ``user``, on whatever instance."""
    body = await request.get_data()
    try:
        data = json.loads(body)
    except ValueError:
        return {"error": "the body must be JSON"}, 400
    message = _stamped({"type": "notify", "to": user, "data": data})
    routed = await wslb.send(UserSelector(user), message)
    return {"routed": routed, "instance": wslb.instance_id}, 200


@app.get("/cluster")
async def cluster() -> dict[str, Any]:
    """The live instances and their connection counts, as Redis knows them."""
    instances = [
        {"id": i.id, "started_at": i.started_at, "connections": i.connections}
        for i in await wslb.instances()
    ]
    return {"answered_by": wslb.instance_id, "instances": instances}


@app.errorhandler(RedisUnavailableError)
async def redis_unavailable(error: RedisUnavailableError) -> tuple[dict[str, str], int]:
    return {"error": str(error)}, 503


@app.websocket("/ws")
@ws_route(
    user=lambda: _arg("user") or None,
    metadata=lambda: {"room": _arg("room") or "lobby"},
    recovery=True,
)
async def chat() -> None:
    """One chat client: registered cluster-wide before this body runs."""
    conn = current_connection
    user, room = conn.user, conn.metadata["room"]
    if user is None:
        await websocket.close(POLICY_VIOLATION, "add ?user=NAME to the URL")
        return
    await conn.join(room)  # the room is a group: GroupSelector(room) reaches its members
    me = {"user": user, "room": room, "instance": wslb.instance_id, "connection": conn.id}
    await conn.send(_local({"type": "welcome", **me}))
    await _presence(me, "joined")
    await conn.send(_local(await _roster(room)))
    try:
        while True:
            reply = await _handle(me, await websocket.receive())
            if reply is not None:
                await conn.send(_local(reply))
    finally:
        await _presence(me, "left")


async def _handle(me: dict[str, str], raw: str | bytes) -> dict[str, Any] | None:
    """Act on one client frame; returns a reply for this client only, if any."""
    try:
        frame = json.loads(raw)
        kind = frame["type"]
    except (ValueError, TypeError, KeyError):
        return {"type": "error", "text": 'send JSON: {"type": "say" or "dm", "text": ...}'}
    user, room, text = me["user"], me["room"], frame.get("text")
    if not isinstance(text, str) or not 0 < len(text) <= MAX_TEXT:
        return {"type": "error", "text": f"text must be 1 to {MAX_TEXT} characters"}
    try:
        if kind == "say":
            message = _stamped({"type": "room", "room": room, "from": user, "text": text})
            await wslb.send(GroupSelector(room), message)
            return None
        if kind == "dm":
            to = frame.get("to")
            if not isinstance(to, str) or not to:
                return {"type": "error", "text": "a dm needs a non-empty 'to'"}
            message = _stamped({"type": "dm", "from": user, "to": to, "text": text})
            routed = await wslb.send(UserSelector(to), message)
            return {"type": "dm_sent", "to": to, "text": text, "routed": routed}
    except WsLoadBalanceError as error:
        return {"type": "error", "text": f"not sent: {error}"}
    return {"type": "error", "text": f"unknown type {kind!r}"}


async def _roster(room: str) -> dict[str, Any]:
    """Everyone in ``room`` and the instance that holds them, as Redis knows it now."""
    try:
        people = [
            {"user": record.user, "instance": record.instance, "connection": record.id}
            async for record in wslb.connections(GroupSelector(room))
        ]
    except WsLoadBalanceError as error:
        return {"type": "error", "text": f"could not list the room: {error}"}
    return {"type": "roster", "room": room, "participants": people}


async def _presence(me: dict[str, str], event: str) -> None:
    """Tell the room that this client joined or left; skipped if Redis cannot be reached."""
    message = _stamped({"type": "presence", "event": event, **me})
    try:
        await wslb.send(GroupSelector(me["room"]), message)
    except WsLoadBalanceError as error:  # such as NotStartedError while the instance stops
        log.info("%s %s %s: not announced (%s)", me["user"], event, me["room"], error)
