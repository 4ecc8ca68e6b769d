"""The peer: python-socketio with ``AsyncRedisManager``, run as N ASGI server instances.

What a Python user deploys today: every instance subscribes to one Redis channel; an emit
to a room is published there, and every instance decodes it and emits to the room's
local members (the sender handles it locally first and skips its own copy). Configured
from the environment: ``BENCH_REDIS_URL``, ``BENCH_SIO_CHANNEL``; ``BENCH_COUNT=0`` turns
off the counter of messages taken off the channel.

- ``/socket.io/``: Engine.IO v4; a client connects with ``auth={"user": NAME}`` and joins
  the room ``NAME`` (and those listed in ``auth["rooms"]``, for :mod:`bench.fanout`).
- ``GET /fire?count=&users=&rate=&window=&size=``: ``sio.emit("m", text, room=user)``
  ``count`` times (see :mod:`bench.fire`), answering with the timing.
- ``GET /fan?room=&size=``: one ``sio.emit("m", text, room=room)``, timed (see
  :func:`bench.fire.fan_once`).
- ``GET /stats``: messages taken off the channel, pid.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

import socketio

from bench.fire import fan_once, fire, fire_args

COUNT = os.environ.get("BENCH_COUNT", "1") != "0"


class CountingManager(socketio.AsyncRedisManager):  # type: ignore[misc]
    """``AsyncRedisManager`` that counts what it takes off the channel."""

    received = 0

    async def _listen(self) -> AsyncIterator[Any]:
        async for message in super()._listen():
            if COUNT:
                CountingManager.received += 1
            yield message


manager = CountingManager(
    os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    channel=os.environ.get("BENCH_SIO_CHANNEL", "socketio"),
)
sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager, cors_allowed_origins=[])


@sio.event  # type: ignore[untyped-decorator]
async def connect(sid: str, environ: dict[str, Any], auth: dict[str, Any] | None) -> None:
    auth = auth or {}
    user, rooms = auth.get("user"), auth.get("rooms", [])
    for room in ([user] if isinstance(user, str) else []) + list(rooms):
        await sio.enter_room(sid, room)


async def _emit(user: str, text: str) -> None:
    await sio.emit("m", text, room=user)


async def _startup() -> None:
    # Every instance listens from the start, as in a deployment where each holds clients
    # (otherwise python-socketio subscribes only when its first client connects).
    if not sio.manager_initialized:
        sio.manager_initialized = True
        sio.manager.initialize()


async def control(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The HTTP endpoints beside Socket.IO."""
    query = dict(parse_qsl(scope.get("query_string", b"").decode()))
    status, result = 200, {}
    if scope["type"] != "http":
        return
    if scope["path"] == "/fire":
        result = await fire(_emit, **fire_args(query))
    elif scope["path"] == "/fan":
        room = query["room"]
        result = await fan_once(
            lambda text: sio.emit("m", text, room=room), int(query.get("size", "200"))
        )
    elif scope["path"] == "/stats":
        result = {"received": CountingManager.received, "pid": os.getpid()}
    else:
        status = 404
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(result).encode()})


app = socketio.ASGIApp(sio, other_asgi_app=control, on_startup=_startup)
