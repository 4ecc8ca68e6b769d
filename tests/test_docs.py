"""The docs as a reader meets them: every code block marked runnable runs as written
against a real Redis, the README's links work wherever it is shown, and the built site
fetches nothing from outside.

A Python block is marked runnable by an HTML comment on the line before its fence, which
no renderer shows (MkDocs, GitHub, PyPI)::

    <!-- runnable NAME -->
    ```python

The blocks of one page that share a NAME form one program, in page order (a guide that
grows an app over several blocks), run as one script in a subprocess with
``WSLB_REDIS_URL`` and ``WSLB_PREFIX`` pointing at the tests' Redis. A check of this
module's own, appended to the program, exercises what it defines (a request to its
routes, a client of its websockets), while an instance of the tests ("the watcher")
serves beside it on the same Redis with one client, alice, whose frames show what the
program sent across instances.

A block whose marker also names a file, ``<!-- runnable NAME chat.py -->``, is not run but
saved under that name beside the program's script, for the script (or its check) to
import or to run: a guide's module and the test files that import it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from textwrap import dedent
from urllib.parse import urlsplit

import pytest
from quart import Quart, websocket
from quart import typing as quart_typing
from quart.testing.connections import WebsocketDisconnectError

from quart_wslb import WsLoadBalance, current_connection, ws_route
from tests.support import room_metadata

ROOT = Path(__file__).resolve().parent.parent
PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))

#: A marked block: the marker, then a Python fence, whose code runs to the closing fence.
RUNNABLE = re.compile(
    r"^<!-- runnable (?P<name>[a-z0-9-]+)(?: (?P<file>[a-z0-9_]+\.py))? -->\n"
    r"```python\n(?P<code>.*?)^```$",
    re.M | re.S,
)
#: Any marker, well formed or not: each must open a block that ``RUNNABLE`` finds.
MARKER = re.compile(r"^<!--\s*runnable\b", re.M)
#: The instance id the programs run as, which their messages name.
PROGRAM_ID = "docs-program"


@dataclass
class Program:
    """The marked blocks of one page and name: the script's code, and the files saved
    beside it."""

    code: str = ""
    files: dict[str, str] = field(default_factory=dict)


def _programs() -> dict[str, Program]:
    """``{"page.md#name": program}``: each page's marked blocks, joined by name in order."""
    programs: dict[str, Program] = {}
    for page in PAGES:
        for block in RUNNABLE.finditer(page.read_text()):
            program = programs.setdefault(f"{page.name}#{block['name']}", Program())
            if block["file"]:
                program.files[block["file"]] = block["code"]
            else:
                program.code += block["code"] + "\n\n"
    return programs


PROGRAMS = _programs()


@dataclass(frozen=True)
class Check:
    """What one program is checked by: code appended to it (run in its process), the
    frames the watcher's client alice receives meanwhile (in any order; a ``dict`` is a
    JSON frame), and the close code it gets at the end, if the program closes it."""

    code: str = ""
    frames: tuple[str | dict[str, object], ...] = ()
    closed: int | None = None


#: The helpers every check may use: a frame within 10 s, as JSON when it is JSON.
CHECK_PRELUDE = """
# --- appended by tests/test_docs.py: the check of this program ---
import asyncio
import json


async def received(ws):
    frame = await asyncio.wait_for(ws.receive(), 10)
    try:
        return json.loads(frame)
    except ValueError:
        return frame

"""

#: One check per program (``test_docs_every_program_has_a_check`` holds this to it).
CHECKS: dict[str, Check] = {
    "README.md#quick-start": Check(
        code="""
        async def check():
            async with app.test_app() as served:
                client = served.test_client()
                async with client.websocket("/ws/lobby?user=bob") as bob:
                    await bob.send("hi")  # to the room: bob here, alice on the watcher
                    assert await received(bob) == {"from": "bob", "text": "hi"}
                response = await client.post("/notify/alice")
                assert await response.get_json() == {"routed": 1}

        asyncio.run(check())
        """,
        frames=({"from": "bob", "text": "hi"}, {"notice": "hi"}),
    ),
    "tutorial.md#chat": Check(
        code="""
        async def check():
            async with app.test_app() as served:
                client = served.test_client()
                async with client.websocket("/ws/lobby?user=bob") as bob:
                    hello = "hello bob: you are connected to instance docs-program"
                    assert await received(bob) == hello
                    await bob.send("hi")
                    assert await received(bob) == "[lobby] bob: hi (sent by docs-program)"
                response = await client.post("/notify/alice", json={"build": "green"})
                assert await response.get_json() == {"routed": 1}

        asyncio.run(check())
        """,
        frames=(
            "[lobby] bob: hi (sent by docs-program)",
            {"notice": {"build": "green"}, "sent_by": "docs-program"},
        ),
    ),
    "push.md#app": Check(
        code="""
        @app.get("/redis-down")  # proves the error handler is wired
        async def redis_down():
            raise RedisUnavailableError("Redis is down")

        async def check():
            async with app.test_app() as served:
                client = served.test_client()
                response = await client.post("/notify/alice", json={"n": 1})
                assert await response.get_json() == {"routed": 1}
                response = await client.post("/digest", json={"alice": {"d": 2}, "nobody": {}})
                assert await response.get_json() == {"routed": [1, 0]}
                response = await client.get("/redis-down")
                assert response.status_code == 503
                assert await response.get_json() == {"error": "Redis is down"}

        asyncio.run(check())
        """,
        frames=({"n": 1}, {"d": 2}),
    ),
    "push.md#async-emitter": Check(frames=("from a worker",)),
    "push.md#emitter": Check(
        code="""
        report_ready("alice", 7)
        emitter.close()
        """,
        frames=({"type": "notify", "text": "report 7 ready"},),
    ),
    "push.md#flask": Check(
        code="""
        response = app.test_client().post("/notify/alice")
        assert response.get_json() == {"routed": 1}, response.get_data()
        """,
        frames=({"hello": "alice"},),
    ),
    "authenticate.md#auth": Check(
        code="""
        from quart.testing import WebsocketResponseError

        async def refused(client, path, **options):
            try:
                async with client.websocket(path, **options) as ws:
                    await received(ws)
            except WebsocketResponseError as error:
                return error.response.status_code
            raise AssertionError(f"{path} was accepted")

        async def check():
            async with app.test_app() as served:
                client = served.test_client()
                async with client.websocket("/ws/lobby?token=t-bob") as bob:
                    assert await received(bob) == "hello bob"
                assert await refused(client, "/ws/lobby?token=forged") == 401
                assert await refused(client, "/ws/staff-only?token=t-bob") == 403
                offered = {"subprotocols": ["chat", "token.t-alice"]}
                async with client.websocket("/ws-subprotocol", scope_base=offered) as ws:
                    assert await received(ws) == "hello alice"
                assert await refused(client, "/ws-subprotocol") == 401

        asyncio.run(check())
        """,
    ),
    "chat-room.md#rooms": Check(
        code="""
        async def check():
            async with app.test_app() as served:
                client = served.test_client()
                response = await client.post("/rooms/lobby/invite/alice")
                assert await response.get_json() == {"joined": 1}
                async with client.websocket("/chat?user=carol") as carol:
                    await carol.send_json({"type": "join", "room": "lobby"})
                    await carol.send_json({"type": "say", "room": "lobby", "text": "hi"})
                    said = {"room": "lobby", "from": "carol", "text": "hi"}
                    while (frame := await received(carol)) != said:
                        assert frame == {"online": "carol"}, frame  # if she joined first
                    response = await client.get("/rooms/lobby")
                    members = await response.get_json()
                    assert members["count"] == 2
                    assert sorted(members["users"]) == ["alice", "carol"]
                    instances = sorted(members["instances"].values())
                    assert instances == ["docs-program", "docs-watcher"]

        asyncio.run(check())
        """,
        frames=({"online": "carol"}, {"room": "lobby", "from": "carol", "text": "hi"}),
    ),
    "testing.md#testing": Check(
        code="""
        import os
        import subprocess
        import sys

        # The guide's tests set their options themselves: none of this run's reaches them.
        env = {key: value for key, value in os.environ.items() if not key.startswith("WSLB_")}
        tests = ["test_unit.py", "test_integration.py"]
        options = ["-p", "no:cacheprovider", "-o", "asyncio_mode=auto"]
        options += ["-o", "asyncio_default_fixture_loop_scope=function"]
        result = subprocess.run(
            [sys.executable, "-m", "pytest", *options, *tests],
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert " 3 passed" in result.stdout, result.stdout
        """,
    ),
    "recovery.md#chat": Check(
        code="""
        from quart_wslb import UserSelector

        async def check():
            async with app.test_app() as served:
                client = served.test_client()
                async with client.websocket("/ws?user=bob") as bob:
                    await bob.send_json({"t": "resume"})
                    welcome = await received(bob)
                    assert welcome["t"] == "welcome", welcome
                    await bob.send("hi")
                    said = await received(bob)
                    assert said["j"] == {"from": "bob", "text": "hi"}, said
                await app.wslb.send(UserSelector("bob"), "while away")  # kept in the history
                resume = {key: welcome[key] for key in ("session", "token", "epoch")}
                async with client.websocket("/ws?user=bob") as bob:
                    await bob.send_json({"t": "resume", **resume, "pos": said["pos"]})
                    welcome = await received(bob)
                    assert welcome["t"] == "welcome" and welcome["recovered"], welcome
                    missed = await received(bob)
                    assert missed["d"] == "while away", missed
                    await bob.send("back")  # its handler is past its join now
                    assert (await received(bob))["j"] == {"from": "bob", "text": "back"}

        asyncio.run(check())
        """,
    ),
    "reference.md#async-emitter": Check(frames=({"type": "notify", "text": "done"},)),
    "kick-user.md#kick": Check(
        code="""
        async def check():
            async with app.test_app() as served:
                response = await served.test_client().post("/admin/kick/alice")
                assert await response.get_json() == {"closed": 1}

        asyncio.run(check())
        """,
        closed=4001,
    ),
}

Socket = quart_typing.TestWebsocketConnectionProtocol


def _canonical(frame: object) -> str:
    """A frame as comparable text: JSON re-dumped with sorted keys, other text as is."""
    value = frame
    if isinstance(frame, str):
        try:
            value = json.loads(frame)
        except ValueError:
            return frame
    return json.dumps(value, sort_keys=True)


def _watcher(redis_url: str, prefix: str) -> Quart:
    """An instance with one tracked route, ``/ws/<room>?user=<name>``, whose client says
    ``"watching"`` once registered and then takes whatever the cluster sends it."""
    app = Quart(__name__)
    WsLoadBalance(app, redis_url=redis_url, prefix=prefix, instance_id="docs-watcher")

    @app.websocket("/ws/<room>")
    @ws_route(user=lambda: websocket.args.get("user"), metadata=room_metadata)
    async def watch(room: str) -> None:
        await current_connection.send("watching")
        await websocket.receive()  # until the test's client leaves

    return app


async def _frame(ws: Socket, timeout: float = 10) -> str | bytes:
    async with asyncio.timeout(timeout):
        return await ws.receive()


async def _run(script: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run ``script`` in its folder; its exit code and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        cwd=script.parent,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(60):
            output, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


@pytest.fixture(name="alice")
async def fixture_alice(redis_url: str, prefix: str) -> AsyncIterator[Socket]:
    """The watcher's client alice, in room lobby, registered cluster-wide."""
    async with _watcher(redis_url, prefix).test_app() as served:
        async with served.test_client().websocket("/ws/lobby?user=alice") as alice:
            assert await _frame(alice) == "watching"
            yield alice


@pytest.mark.integration
@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", sorted(PROGRAMS))
async def test_docs_block_runs_as_written(
    name: str, alice: Socket, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    check = CHECKS[name]
    script = tmp_path / "program.py"
    program = PROGRAMS[name]
    for file, text in program.files.items():
        (tmp_path / file).write_text(text)
    script.write_text(program.code + CHECK_PRELUDE + "\n" + dedent(check.code))
    env = {key: value for key, value in os.environ.items() if not key.startswith("WSLB_")}
    env |= {"WSLB_REDIS_URL": redis_url, "WSLB_PREFIX": prefix, "WSLB_INSTANCE_ID": PROGRAM_ID}
    code, output = await _run(script, env)
    assert code == 0, f"{name} failed:\n{output}"
    frames = [await _frame(alice) for _ in check.frames]
    assert sorted(map(_canonical, frames)) == sorted(map(_canonical, check.frames))
    if check.closed is not None:
        with pytest.raises(WebsocketDisconnectError) as closed:
            await _frame(alice)
        assert closed.value.args == (check.closed,)
    else:
        with pytest.raises(TimeoutError):  # and nothing else
            await _frame(alice, timeout=0.3)


def test_docs_every_program_has_a_check() -> None:
    """A new runnable block gets a check that exercises it, and no check outlives its
    block (a renamed marker would otherwise leave a program merely imported)."""
    assert sorted(CHECKS) == sorted(PROGRAMS)


def test_docs_every_marker_opens_a_python_block() -> None:
    """A marker that ``RUNNABLE`` does not see (a typo, a blank line before the fence)
    would leave its block untested without a word."""
    for page in PAGES:
        text = page.read_text()
        markers = len(MARKER.findall(text))
        assert markers == len(RUNNABLE.findall(text)), page.name


#: A Markdown link or image: ``[text](target)``, ``![alt](target)``.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _anchor(heading: str) -> str:
    """The id GitHub and Python-Markdown's toc give a heading (for the README's)."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    return re.sub(r"\s+", "-", re.sub(r"[^\w\s-]", "", text))


def test_readme_links_work_outside_the_repository() -> None:
    """The README is also the package's long description (PyPI, ``pip show``, an index):
    a link relative to the repository breaks there, so each is absolute or names a
    heading of the README itself."""
    text = (ROOT / "README.md").read_text()
    headings = {_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}
    links = LINK.findall(text)
    assert links
    for target in links:
        if target.startswith("#"):
            assert target[1:] in headings, target
        else:
            parts = urlsplit(target)
            assert parts.scheme == "https" and parts.netloc, target


class _Resources(HTMLParser):
    """What a page makes the browser fetch by itself (not what it links to): scripts,
    stylesheets and icons, images, frames, media."""

    FETCHED = {
        ("script", "src"),
        ("link", "href"),
        ("img", "src"),
        ("iframe", "src"),
        ("source", "src"),
        ("video", "src"),
        ("audio", "src"),
        ("embed", "src"),
        ("object", "data"),
    }

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if (tag, name) in self.FETCHED and value:
                self.urls.append(value)


def _outside(url: str) -> bool:
    """Whether a browser would fetch ``url`` from another host (``data:`` is inline)."""
    parts = urlsplit(url)
    return bool(parts.netloc) or parts.scheme not in ("", "data")


def test_docs_site_needs_nothing_from_outside(tmp_path: Path) -> None:
    """An offline copy of the built site loads and highlights as well as the served one:
    no page, stylesheet or script fetches from another host, and code is highlighted at
    build time (Pygments), not by a script from a CDN."""
    pytest.importorskip("pygments")
    pytest.importorskip("mkdocs")
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    site = tmp_path / "site"
    build(load_config(str(ROOT / "mkdocs.yml"), site_dir=str(site), strict=True))
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 10
    for page in pages:
        parser = _Resources()
        parser.feed(page.read_text())
        assert parser.urls, page  # the parser saw the page's stylesheets
        outside = [url for url in parser.urls if _outside(url)]
        assert not outside, (page, outside)
    for sheet in site.rglob("*.css"):  # @import and url() fetch too
        for url in re.findall(r"""(?:url\(|@import\s+)\s*["']?([^"')\s;]+)""", sheet.read_text()):
            assert not _outside(url), (sheet, url)
    for script in site.rglob("*.js"):  # a script that loads another by itself
        assert not re.search(r"importScripts\([^)]*https?:", script.read_text()), script
    highlighted = '<div class="codehilite"><pre><span></span><code><span'
    for source in PAGES[1:]:  # each Python block comes out highlighted
        page = site / ("" if source.stem == "index" else source.stem) / "index.html"
        blocks = source.read_text().count("```python\n")
        assert page.read_text().count(highlighted) >= blocks, source.name
