"""Where the CPU goes: py-spy on the receiving and the sending instance under saturation.

N = 2 (instance 0 holds the K clients, instance 1 sends), the envelope counter off, one
saturation run of ``messages`` while ``py-spy record --format raw --function
--nonblocking`` samples each instance's worker. Idle samples (waiting in ``epoll``) are
left out by py-spy, so shares are of the time each process was busy. The raw stacks are
kept in the output folder (``profile-<system>-<role>.txt``, for ``flamegraph.pl`` or
speedscope); the summary ranks functions by their own time and by their inclusive time,
and groups own time by component. py-spy cannot always walk a whole coroutine stack,
so inclusive shares are lower bounds.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.clients import Pool
from bench.config import WSLB, Params
from bench.fire import user_name
from bench.procs import start_servers, stop_all
from bench.scenario import Context, System, measure, wait_subscribed

__all__ = (
    "find_py_spy",
    "format_profile",
    "record",
    "run_profile",
    "stop_recording",
    "summarize",
)

RATE = 250
TOP = 20
#: Component of a frame, by the first path fragment found in its file name.
COMPONENTS = (
    ("quart_wslb/", "quart_wslb"),
    ("bench/", "bench app"),
    ("socketio/", "python-socketio"),
    ("engineio/", "python-engineio"),
    ("redis/", "redis-py"),
    ("hypercorn/", "hypercorn"),
    ("wsproto/", "wsproto"),
    ("h11/", "h11"),
    ("uvicorn/", "uvicorn"),
    ("websockets/", "websockets"),
    ("quart/", "quart"),
    ("werkzeug/", "werkzeug"),
    ("marshmallow/", "marshmallow"),
    ("blinker/", "blinker"),
    ("json/", "json"),
    ("asyncio/", "asyncio"),
)


#: Frames of the interpreter, the server's start-up and the event loop itself: on every
#: stack, so they say nothing in the inclusive ranking.
BOOTSTRAP = (
    "<frozen runpy>", "<string>", "click/", "multiprocessing/", "asyncio/runners.py",
    "asyncio/base_events.py", "asyncio/events.py", "hypercorn/asyncio/run.py",
    "uvicorn/main.py", "uvicorn/server.py", "uvicorn/_compat.py", "uvicorn/__main__.py",
)  # fmt: skip


def find_py_spy() -> str | None:
    """The ``py-spy`` beside this Python, else on ``PATH``."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def component(frame: str) -> str:
    """``quart_wslb/receiver.py``-style name of a frame's module, or its component."""
    location = frame[frame.rfind("(") + 1 :]
    if "quart_wslb/" in location:
        return "quart_wslb/" + location.split("quart_wslb/")[1].split(":")[0]
    for fragment, name in COMPONENTS:
        if fragment in location:
            return name
    return "other (stdlib, C)"


def summarize(raw: str) -> dict[str, Any]:
    """Rank the frames of py-spy's raw output (``frame;frame;... count`` lines)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        parts[component(frames[-1])] += count
        for frame in set(frames):
            if not any(b in frame for b in BOOTSTRAP):
                inclusive[frame] += count

    def ranked(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"frame": f, "samples": c, "share": c / total if total else 0.0}
            for f, c in counter.most_common(TOP)
        ]

    return {
        "samples": total,
        "own": ranked(own),
        "inclusive": ranked(inclusive),
        "components": ranked(parts),
    }


def record(py_spy: str, pid: int, output: Path) -> subprocess.Popen[bytes]:
    """Start ``py-spy record`` of ``pid`` (raw stacks to ``output``)."""
    return subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--rate", str(RATE), "--format", "raw",
         "--function", "--nonblocking", "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


def stop_recording(spy: subprocess.Popen[bytes]) -> None:
    """Stop one py-spy by its pid: SIGINT makes it write its output."""
    if spy.poll() is None:
        spy.send_signal(signal.SIGINT)
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(10)


async def run_profile(
    name: str, params: Params, messages: int, redis_url: str, redis_pid: int, out: Path
) -> dict[str, Any]:
    """Profile both instances of a system at N = 2 during one saturation run."""
    py_spy = find_py_spy()
    if py_spy is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    system = System.of(name, params)
    tag = f"p{os.urandom(3).hex()}"
    envs = system.envs(2, redis_url, tag, count=False)
    servers = await asyncio.to_thread(start_servers, 2, system.server, system.target, envs, out)
    pool = Pool(name, servers[0].port)
    short = "wslb" if name == WSLB else "sio"
    files = {role: out / f"profile-{short}-{role}.txt" for role in ("holder", "sender")}
    spies: list[subprocess.Popen[bytes]] = []
    try:
        await wait_subscribed(redis_url, system.channels(2, tag))
        await pool.connect([user_name(u) for u in range(params.users)])
        ctx = Context(system, 2, params, redis_url, redis_pid, servers, pool)
        await measure(ctx, "warmup", 200, 0, params.window)
        spies = [
            record(py_spy, servers[0].worker_pid(), files["holder"]),
            record(py_spy, servers[1].worker_pid(), files["sender"]),
        ]
        await asyncio.sleep(1.0)  # py-spy attaches
        row = await measure(ctx, "sat", messages, 0, params.window)
    finally:
        for spy in spies:
            await asyncio.to_thread(stop_recording, spy)
        await pool.close()
        await asyncio.to_thread(stop_all, servers)
    result: dict[str, Any] = {"system": name, "run": row}
    for role, path in files.items():
        raw = path.read_text() if path.exists() else ""
        result[role] = {"file": path.name, **summarize(raw)}
    return result


def format_profile(profile: dict[str, Any]) -> str:
    """The summary as text: components, then own and inclusive time, per role."""
    lines = [f"# profile of {profile['system']} at N=2, saturation "
             f"({profile['run']['throughput']:.0f} msg/s while sampled)"]  # fmt: skip
    for role in ("holder", "sender"):
        part = profile[role]
        lines.append(f"\n## {role} instance ({part['samples']} busy samples, {part['file']})")
        for title in ("components", "own", "inclusive"):
            lines.append(f"-- by {title}")
            for item in part[title]:
                lines.append(f"{item['share'] * 100:6.1f}%  {item['frame']}")
    return "\n".join(lines)
