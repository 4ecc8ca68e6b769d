"""``--demo``: real WebSocket clients on two instances, messages that cross between them."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect

__all__ = ("DemoError", "run_demo")

#: How long a client waits for one expected message.
WAIT = 5.0


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
                    frame = json.loads(await self.socket.recv())
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
    else:
        what = json.dumps(frame)
    sent, delivered = frame.get("sent_by"), frame["delivered_by"]
    crossed = "  (crossed instances)" if sent != delivered else ""
    print(f"  {user:<5} <- {what:<48} sent by {sent}, delivered by {delivered}{crossed}")


def _post(url: str, body: object) -> dict[str, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


async def run_demo(urls: list[str]) -> None:
    """alice on the first instance, bob on the second: a DM, a room message, a push."""
    first, second = urls[0], urls[1 % len(urls)]
    print(f"\nalice joins room lobby on {first}, bob on {second}")
    alice = await Client.join(first, "alice", "lobby")
    bob = await Client.join(second, "bob", "lobby")
    try:
        print("\nalice sends bob a direct message (UserSelector):")
        await alice.say({"type": "dm", "to": "bob", "text": "hi bob"})
        await bob.expect("dm", **{"from": "alice", "text": "hi bob"})
        receipt = await alice.expect("dm_sent", to="bob")
        if receipt["routed"] != 1:
            raise DemoError(f"the dm was routed to {receipt['routed']} connections, not 1")

        print("\nbob says hello to the room (MetadataSelector(room='lobby')):")
        await bob.say({"type": "say", "text": "hello lobby"})
        await alice.expect("room", **{"from": "bob", "text": "hello lobby"})
        await bob.expect("room", **{"from": "bob", "text": "hello lobby"})

        print(f"\nPOST {second}notify/alice, to the instance that does not hold alice:")
        result = await asyncio.to_thread(_post, f"{second}notify/alice", {"build": "green"})
        print(f"  HTTP answer: {json.dumps(result)}")
        await alice.expect("notify", data={"build": "green"})
        if result != {"routed": 1}:
            raise DemoError(f"/notify answered {result}, not {{'routed': 1}}")
    finally:
        await asyncio.gather(alice.close(), bob.close(), return_exceptions=True)
