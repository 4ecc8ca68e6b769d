"""The reference JavaScript client of recovery mode (``example_app/static/wslb-recovery.js``)
in headless Chromium, against a scripted stand-in for the server: what it sends first,
what it stores, how it dedups and reconnects. The real server is not involved, so this
checks the client against the protocol as written, not the two against each other.

Skipped, saying why, where Chromium or the ``playwright`` package is missing (as the
example's browser test is).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

if TYPE_CHECKING:  # the browser fixture (conftest) skips without playwright
    from playwright.async_api import Browser, Page

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CLIENT = Path(__file__).resolve().parent.parent / "example_app" / "static" / "wslb-recovery.js"
#: Milliseconds a page waits for anything it expects.
PAGE_WAIT = 10_000
#: The page: one WslbSocket on /ws whose callbacks append to window.events.
HARNESS = """<!doctype html><meta charset="utf-8"><script type="module">
import { WslbSocket } from "/static/wslb-recovery.js";
window.events = [];
const plain = (data) => data instanceof Uint8Array ? { bytes: [...data] } : data;
window.sock = new WslbSocket("/ws", {
  storageKey: "k", minDelay: 100, maxDelay: 400,
  onmessage: (data, pos, replay) => events.push({ kind: "msg", data: plain(data), pos, replay }),
  onwelcome: (welcome) => events.push({ kind: "welcome", ...welcome }),
  onclose: (close) => events.push({ kind: "close", ...close }),
});
</script>"""

#: One connection's script: the connection, its first frame, its index (0, 1, ...).
Script = Callable[[ServerConnection, dict[str, Any], int], Awaitable[None]]


def welcome(pos: str, session: str = "s1", epoch: str = "e1", **fields: Any) -> str:
    frame: dict[str, Any] = {"t": "welcome", "session": session, "token": "tok-" + session}
    frame |= {"epoch": epoch, "pos": pos, "recovered": True, "end": pos, **fields}
    return json.dumps(frame)


def msg(pos: str | None, **payload: Any) -> str:
    return json.dumps({"t": "msg", **({} if pos is None else {"pos": pos}), **payload})


class FakeServer:
    """Records each connection's first frame and runs ``script`` on it."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.first: list[dict[str, Any]] = []
        self.received: list[str] = []

    async def handler(self, ws: ServerConnection) -> None:
        index = len(self.first)
        try:
            self.first.append(json.loads(await ws.recv()))
            await self.script(ws, self.first[-1], index)
            async for frame in ws:  # until the client goes
                self.received.append(str(frame))
        except ConnectionClosed:
            pass


def files(connection: ServerConnection, request: Request) -> Response | None:
    """The server's plain HTTP answers: the harness page and the client module (served
    for real, not by ``page.route``: Chromium refuses a routed page's socket to
    127.0.0.1 as a local network access)."""
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return None
    if request.path == "/static/wslb-recovery.js":
        response = connection.respond(HTTPStatus.OK, CLIENT.read_text())
        response.headers["Content-Type"] = "text/javascript; charset=utf-8"
    else:
        response = connection.respond(HTTPStatus.OK, HARNESS)
        response.headers["Content-Type"] = "text/html; charset=utf-8"
    return response


async def open_page(browser: Browser, script: Script) -> tuple[Page, FakeServer, Server]:
    """A fresh context's page on the harness, its socket served by ``script``."""
    fake = FakeServer(script)
    server = await serve(fake.handler, "127.0.0.1", 0, process_request=files)
    port = next(iter(server.sockets)).getsockname()[1]
    context = await browser.new_context()
    page = await context.new_page()
    page.set_default_timeout(PAGE_WAIT)
    await page.goto(f"http://127.0.0.1:{port}/")
    return page, fake, server


async def events(page: Page, count: int, kind: str | None = None) -> list[dict[str, Any]]:
    """The page's events (of ``kind``), once there are at least ``count``."""
    where = f"e => e.kind === {json.dumps(kind)}" if kind else "e => true"
    await page.wait_for_function(f"events.filter({where}).length >= {count}")
    found: list[dict[str, Any]] = await page.evaluate(f"events.filter({where})")
    return found


async def stored(page: Page) -> Any:
    return await page.evaluate("JSON.parse(sessionStorage.getItem('k'))")


async def closed(page: Page, server: Server) -> None:
    await page.context.close()
    server.close()
    await server.wait_closed()


async def test_new_session_messages_state_and_send(browser: Browser) -> None:
    async def script(ws: ServerConnection, first: dict[str, Any], index: int) -> None:
        await ws.send(welcome("5-3"))
        await ws.send(msg("5-4", d="hello"))
        await ws.send(msg("6-5", j={"a": [1, 2]}))
        await ws.send(msg("7-6", b=base64.b64encode(bytes([0, 1, 255])).decode()))
        await ws.send(msg(None, j={"local": True}))  # current_connection.send: no pos
        await ws.send(msg("6-5", d="a duplicate"))
        await ws.send("ping, not JSON")
        await ws.send(msg("9-7", d="last"))
        await ws.send(json.dumps({"t": "pos", "pos": "8-6"}))  # behind: changes nothing
        await ws.send(json.dumps({"t": "pos", "pos": "12-9"}))  # a mark: resume from there

    page, fake, server = await open_page(browser, script)
    try:
        got = await events(page, 5, "msg")
        assert fake.first == [{"t": "resume"}]
        assert [(e["data"], e["pos"], e["replay"]) for e in got] == [
            ("hello", "5-4", False),
            ({"a": [1, 2]}, "6-5", False),
            ({"bytes": [0, 1, 255]}, "7-6", False),
            ({"local": True}, None, False),
            ("last", "9-7", False),
        ]
        [hello] = await events(page, 1, "welcome")
        assert hello == {
            "kind": "welcome", "session": "s1", "epoch": "e1", "pos": "5-3",
            "recovered": True, "end": "5-3",
        }  # fmt: skip
        for _ in range(50):
            if (await stored(page))["pos"] == "12-9":
                break
            await asyncio.sleep(0.05)
        assert await stored(page) == {
            "session": "s1",
            "token": "tok-s1",
            "epoch": "e1",
            "pos": "12-9",
        }
        state = await page.evaluate("sock.state")
        assert state["pos"] == "12-9" and state["connected"] is True and "token" not in state
        assert await page.evaluate("sock.send({type: 'say'}) && sock.send('raw')") is True
        for _ in range(50):
            if len(fake.received) == 2:
                break
            await asyncio.sleep(0.05)
        assert fake.received == ['{"type":"say"}', "raw"]
    finally:
        await closed(page, server)


async def test_reconnect_replays_then_reload_resumes_in_a_new_epoch(browser: Browser) -> None:
    go_on = asyncio.Event()

    async def script(ws: ServerConnection, first: dict[str, Any], index: int) -> None:
        if index == 0:
            await ws.send(welcome("0-10"))
            await ws.send(msg("0-11", d="before"))
            await asyncio.sleep(0.2)
            await ws.close(1011, "instance crashed")
        elif index == 1:  # two replayed (up to the welcome's end), then live ones
            await ws.send(welcome("0-11", end="0-14"))
            await go_on.wait()
            await ws.send(msg("0-12", d="missed 1"))
            await ws.send(msg("0-14", d="missed 2"))
            await ws.send(msg("0-14", d="a duplicate"))
            await ws.send(msg("0-15", d="live"))
        else:  # after the reload: Redis lost history, the sequence starts again
            await ws.send(welcome("0-1", epoch="e2", recovered=False))
            await ws.send(msg("0-2", d="new epoch"))

    page, fake, server = await open_page(browser, script)
    try:
        await events(page, 2, "welcome")
        # Until the replayed messages are processed, the stored pos is the one asked for.
        assert (await stored(page))["pos"] == "0-11"
        go_on.set()
        got = await events(page, 4, "msg")
        assert [(e["data"], e["pos"], e["replay"]) for e in got] == [
            ("before", "0-11", False),
            ("missed 1", "0-12", True),
            ("missed 2", "0-14", True),
            ("live", "0-15", False),
        ]
        [close] = await events(page, 1, "close")
        assert close["code"] == 1011 and close["reconnecting"] is True
        assert fake.first[1] == {
            "t": "resume", "session": "s1", "token": "tok-s1", "epoch": "e1", "pos": "0-11",
        }  # fmt: skip

        await page.reload()  # sessionStorage stays: the new page resumes
        [lost] = await events(page, 1, "welcome")
        assert lost["recovered"] is False and lost["epoch"] == "e2"
        assert fake.first[2]["pos"] == "0-15" and fake.first[2]["session"] == "s1"
        [new] = await events(page, 1, "msg")  # seq 2 < 15, but in another epoch
        assert (new["data"], new["pos"]) == ("new epoch", "0-2")
    finally:
        await closed(page, server)


async def test_4409_is_final_and_1008_starts_one_new_session(browser: Browser) -> None:
    async def script(ws: ServerConnection, first: dict[str, Any], index: int) -> None:
        if index == 0:
            await ws.send(welcome("0-1"))
            await ws.send(msg("0-2", d="x"))
            await asyncio.sleep(0.2)
            await ws.close(4409, "session resumed elsewhere")
        else:
            await ws.close(1008, "no")

    page, fake, server = await open_page(browser, script)
    try:
        [close] = await events(page, 1, "close")
        assert (close["code"], close["reconnecting"]) == (4409, False)
        await asyncio.sleep(0.6)  # more than maxDelay: a reconnect would have come
        assert len(fake.first) == 1
        assert (await stored(page))["session"] == "s1"

        # A reload resumes; the server refuses (1008); the client forgets and starts one
        # new session, which is refused too: then it stops.
        await page.reload()
        closes = await events(page, 2, "close")
        assert [(c["code"], c["reconnecting"]) for c in closes] == [(1008, True), (1008, False)]
        await asyncio.sleep(0.6)
        assert [f.get("session") for f in fake.first] == [None, "s1", None]
        assert await stored(page) is None
    finally:
        await closed(page, server)


async def test_backoff_is_capped_exponential_with_jitter_and_reset_by_a_welcome(
    browser: Browser,
) -> None:
    async def script(ws: ServerConnection, first: dict[str, Any], index: int) -> None:
        if index == 5:
            await ws.send(welcome("0-1"))
        await ws.close(1011)

    page, fake, server = await open_page(browser, script)
    try:
        closes = await events(page, 6, "close")
        delays = [c["delay"] for c in closes]
        # minDelay 100, maxDelay 400: each delay is between half its cap and its cap.
        for delay, cap in zip(delays, [100, 200, 400, 400, 400, 100], strict=True):
            assert cap / 2 <= delay <= cap, delays
        await page.evaluate("sock.close()")
        await asyncio.sleep(0.2)  # a socket that was opening then may have sent its frame
        count = len(fake.first)
        await asyncio.sleep(0.6)
        assert len(fake.first) == count
    finally:
        await closed(page, server)
