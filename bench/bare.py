"""A bare ASGI app with the benchmark's routes and no quart-wslb, Quart or Redis.

``/ws?user=NAME`` holds a websocket (sent ``ready`` once accepted); ``GET /fire`` writes
messages straight to the users' sockets through the ASGI ``send`` of each, with
:func:`bench.fire.fire`, as the real apps send through their libraries; ``GET /stats``
answers once the app is up. What it costs a server to run this is what any library on
that server pays at least to deliver a message to a local websocket.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

from bench.fire import fire, fire_args

__all__ = ("app",)

Scope = dict[str, Any]
#: Each connected user's ASGI ``send``.
sockets: dict[str, Any] = {}


async def app(scope: Scope, receive: Any, send: Any) -> None:
    """The ASGI entry point."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    elif scope["type"] == "websocket":
        await _websocket(scope, receive, send)
    elif scope["type"] == "http":
        await _http(scope, receive, send)


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _websocket(scope: Scope, receive: Any, send: Any) -> None:
    user = parse_qs(scope["query_string"].decode()).get("user", [""])[0]
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": "ready"})
    sockets[user] = send
    try:
        while (await receive())["type"] != "websocket.disconnect":
            pass
    finally:
        sockets.pop(user, None)


async def _http(scope: Scope, receive: Any, send: Any) -> None:
    args = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    if scope["path"] == "/fire":
        body: Any = await fire(_send, **fire_args(args))
    else:
        body = {"sockets": len(sockets)}
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def _send(user: str, text: str) -> int:
    await sockets[user]({"type": "websocket.send", "text": text})
    return 1
