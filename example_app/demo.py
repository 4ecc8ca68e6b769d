"""``--demo``: real WebSocket clients behind the front, messages that cross instances.

alice and bob connect through the front, which sends each new WebSocket to the next
instance, so they are held by different instances; a direct message, a room message and
HTTP pushes then travel between those instances through Redis.

The chat route is in recovery mode: each client opens a new session with the resume frame
(:data:`RESUME`) and reads the app's frames out of the protocol's (:func:`app_frame`).
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect

__all__ = ("RESUME", "DemoError", "app_frame", "run_demo")

#: How long a client waits for one expected message.
WAIT = 5.0
#: How often bob reconnects if the front happens to put him on alice's instance.
REJOINS = 4
#: A recovery route's first client frame, here for a new session (docs/recovery.md).
RESUME = json.dumps({"t": "resume"})


def app_frame(raw: str | bytes) -> dict[str, Any] | None:
    """The app's frame in one frame of a recovery route, ``{"t": "msg", "j": frame}``;
    ``None`` for the protocol's own frames (its ``{"t": "welcome"}``)."""
    frame = json.loads(raw)
    inner = frame.get("j") if isinstance(frame, dict) and frame.get("t") == "msg" else None
    return inner if isinstance(inner, dict) else None


class DemoError(Exception):
    """An expected message did not arrive in time (or arrived wrong)."""


class Client:
    """One chat user on one instance; remembers which instance delivers its frames."""

    def __init__(self, user: str, socket: ClientConnection) -> None:
        self.user = user
        self.socket = socket
        self.instance = "?"
        self._seen: list[dict[str, Any]] = []

    @classmethod
    async def join(cls, base_url: str, user: str, room: str) -> Client:
        """Connect and wait for the welcome frame."""
        query = urlencode({"user": user, "room": room})
        url = base_url.replace("http://", "ws://") + "ws?" + query
        client = cls(user, await connect(url, open_timeout=WAIT))
        await client.socket.send(RESUME)
        welcome = await client.expect("welcome")
        client.instance = welcome["instance"]
        return client

    async def say(self, frame: Mapping[str, Any]) -> None:
        """Send one JSON frame to the server."""
        await self.socket.send(json.dumps(frame))

    async def expect(self, kind: str, **fields: Any) -> dict[str, Any]:
        """The next frame of type ``kind`` whose fields match; others are skipped."""
        try:
            async with asyncio.timeout(WAIT):
                while True:
                    frame = app_frame(await self.socket.recv())
                    if frame is None:
                        continue
                    self._seen.append(frame)
                    if frame.get("type") == kind and all(
                        frame.get(k) == v for k, v in fields.items()
                    ):
                        frame.setdefault("delivered_by", self.instance)
                        _report(self.user, frame)
                        return dict(frame)
        except TimeoutError:
            seen = ", ".join(f.get("type", "?") for f in self._seen) or "nothing"
            raise DemoError(
                f"{self.user} got no {kind} {fields or ''} within {WAIT:.0f}s (saw: {seen})"
            ) from None

    async def close(self) -> None:
        await self.socket.close()


def _report(user: str, frame: Mapping[str, Any]) -> None:
    kind = frame["type"]
    if kind == "welcome":
        what = f"welcome: connected to {frame['instance']}"
    elif kind == "dm":
        what = f"dm from {frame['from']}: {frame['text']!r}"
    elif kind == "dm_sent":
        what = f"dm_sent to {frame['to']}: routed to {frame['routed']} connection(s)"
    elif kind == "room":
        what = f"room {frame['room']} from {frame['from']}: {frame['text']!r}"
    elif kind == "notify":
        what = f"notify: {json.dumps(frame['data'])}"
    elif kind == "roster":
        people = ", ".join(f"{p['user']} on {p['instance']}" for p in frame["participants"])
        what = f"roster of {frame['room']}: {people}"
    elif kind == "presence":
        what = f"presence: {frame['user']} {frame['event']} (on {frame['instance']})"
    else:
        what = json.dumps(frame)
    sent, delivered = frame.get("sent_by"), frame["delivered_by"]
    crossed = "  (crossed instances)" if sent != delivered else ""
    print(f"  {user:<5} <- {what:<48} sent by {sent}, delivered by {delivered}{crossed}")


def _http(url: str, body: object = None) -> dict[str, Any]:
    """GET (no body) or POST JSON; the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


async def run_demo(front: str) -> None:
    """alice and bob on two instances behind ``front``: a DM, a room message, pushes."""
    print(f"\nalice and bob join room lobby through the front, {front}")
    alice = await Client.join(front, "alice", "lobby")
    bob = await Client.join(front, "bob", "lobby")
    try:
        for _ in range(REJOINS):
            if bob.instance != alice.instance:
                break
            print("  bob landed on alice's instance (one instance?); he reconnects")
            await bob.close()
            bob = await Client.join(front, "bob", "lobby")
        await alice.expect("presence", user="bob", event="joined")
        roster = await bob.expect("roster")
        if {p["user"]: p["instance"] for p in roster["participants"]}.get(
            "alice"
        ) != alice.instance:
            raise DemoError(f"bob's roster does not show alice on {alice.instance}: {roster}")

        print("\nalice sends bob a direct message (UserSelector):")
        await alice.say({"type": "dm", "to": "bob", "text": "hi bob"})
        await bob.expect("dm", **{"from": "alice", "text": "hi bob"})
        receipt = await alice.expect("dm_sent", to="bob")
        if receipt["routed"] != 1:
            raise DemoError(f"the dm was routed to {receipt['routed']} connections, not 1")

        print("\nbob says hello to the room (GroupSelector('lobby')):")
        await bob.say({"type": "say", "text": "hello lobby"})
        await alice.expect("room", **{"from": "bob", "text": "hello lobby"})
        await bob.expect("room", **{"from": "bob", "text": "hello lobby"})

        print("\nthree HTTP pushes to alice, each POST sent by the front to the next instance:")
        for n in (1, 2, 3):
            result = await asyncio.to_thread(_http, f"{front}notify/alice", {"push": n})
            print(f"  POST /notify/alice answered by {result['instance']}: {json.dumps(result)}")
            await alice.expect("notify", data={"push": n})
            if result.get("routed") != 1:
                raise DemoError(f"/notify answered {result}, not routed to 1 connection")

        cluster = await asyncio.to_thread(_http, f"{front}cluster")
        print(f"\nGET /cluster (answered by {cluster['answered_by']}), read from Redis:")
        for instance in cluster["instances"]:
            print(f"  {instance['id']}: {instance['connections']} connection(s)")
    finally:
        await asyncio.gather(alice.close(), bob.close(), return_exceptions=True)
