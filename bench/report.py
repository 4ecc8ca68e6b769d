"""What a run leaves: the printed tables, the target ratios, ``results.json`` and the plot."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.config import PEER, WSLB

__all__ = ("format_report", "machine", "plot", "source", "targets", "versions")

PACKAGES = (
    "quart-wslb", "quart", "hypercorn", "redis", "marshmallow", "blinker", "websockets",
    "python-socketio", "python-engineio", "uvicorn", "psutil", "matplotlib",
)  # fmt: skip


def versions(redis_binary: str | None) -> dict[str, str]:
    """Versions of Python, Redis and every package involved (``-`` when absent)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "-"
    if redis_binary:
        out = subprocess.run([redis_binary, "--version"], capture_output=True, text=True)
        found["redis-server"] = out.stdout.split("v=")[1].split()[0] if "v=" in out.stdout else "?"
    return found


def source() -> dict[str, Any]:
    """The commit of quart-wslb measured, and its files changed since (if any)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        except OSError:
            return ""
        return done.stdout.rstrip("\n") if done.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "quart_wslb").splitlines()
    return {
        "commit": git("rev-parse", "--short", "HEAD") or "?",
        "subject": git("log", "-1", "--format=%s"),
        "uncommitted": [line[3:] for line in changed],
    }


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, kernel and the open-files limit."""
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(pages / 2**30, 1),
        "kernel": platform.release(),
        "system": platform.system(),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def _row(rows: Iterable[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _check(
    name: str, value: float | None, op: str, limit: float, note: str = ""
) -> dict[str, Any]:
    met = None if value is None else (value >= limit if op == ">=" else value <= limit)
    return {"target": name, "value": value, "op": op, "limit": limit, "met": met, "note": note}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each as measured in this run (``met`` is None when unmeasured)."""
    rows = results.get("scenario", [])
    ns = sorted({r["n"] for r in rows if r["system"] == WSLB})

    def get(system: str, n: int, key: str, mode: str = "sat") -> float | None:
        row = _row(rows, system=system, n=n, mode=mode)
        return None if row is None else float(row[key])

    def worst(key: str, mode: str = "sat") -> float | None:
        # The issue's scenario sends from another instance: N = 1 is not part of it.
        values = [v for v in (get(WSLB, n, key, mode) for n in ns if n > 1) if v is not None]
        return max(values, default=None)

    floor = _row(results.get("floor", []), mode="pipelined")
    floor_rate = None if floor is None else float(floor["throughput"])
    registry = results.get("registry") or {}
    conns = _row(results.get("connections", []), system=WSLB) or {}
    checks = [
        _check("throughput vs python-socketio, N=2",
               _ratio(get(WSLB, 2, "throughput"), get(PEER, 2, "throughput")), ">=", 3.0),
        _check("throughput vs python-socketio, N=4",
               _ratio(get(WSLB, 4, "throughput"), get(PEER, 4, "throughput")), ">=", 5.0),
        _check("CPU per delivered message vs python-socketio, N=2",
               _ratio(get(WSLB, 2, "cpu_us_per_msg"), get(PEER, 2, "cpu_us_per_msg")),
               "<=", 1 / 3),
    ]  # fmt: skip
    if len(ns) > 1:
        lo, hi = min((n for n in ns if n >= 2), default=ns[0]), ns[-1]
        checks += [
            _check(f"CPU per message flat in N (N={hi} / N={lo})",
                   _ratio(get(WSLB, hi, "cpu_us_per_msg"), get(WSLB, lo, "cpu_us_per_msg")),
                   "<=", 1.25, "flat taken as within 25%"),
            _check(f"Redis egress per message flat in N (N={hi} / N={ns[0]})",
                   _ratio(get(WSLB, hi, "redis_bytes_per_msg"),
                          get(WSLB, ns[0], "redis_bytes_per_msg")),
                   "<=", 1.05, "flat taken as within 5%"),
        ]  # fmt: skip
    checks += [
        _check("instances receiving each targeted message (worst N > 1)",
               worst("instances_per_msg"), "<=", 1.0),
        _check("throughput vs the pipelined floor, N=2",
               _ratio(get(WSLB, 2, "throughput"), floor_rate), ">=", 0.5),
        _check("p99 latency at the paced rate, ms (worst N > 1)",
               worst("p99_ms", "paced"), "<=", 5.0),
        _check("registrations per second per instance (Registry, 64 at a time)",
               registry.get("register_per_s"), ">=", 2000),
        _check("connections per second per instance (real websockets)",
               conns.get("connects_per_s"), ">=", 2000,
               "handshake included; the client shares the 2 cores"),
        _check("Redis memory per connection, bytes (Registry records)",
               registry.get("redis_bytes_per_conn"), "<=", 400),
    ]  # fmt: skip
    return checks


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


def format_report(results: dict[str, Any]) -> str:
    """Every table of the run, as printed at the end."""
    out: list[str] = []
    meta = results["meta"]
    m = meta["machine"]
    out.append(f"quart-wslb benchmark ({meta['params']['preset']}), "
               f"{m['cores']} cores {m['cpu']}, {meta['duration_s']:.0f} s")  # fmt: skip
    v = meta["versions"]
    out.append("versions: " + ", ".join(f"{k} {v[k]}" for k in v))
    src = meta["source"]
    dirty = f" + uncommitted {', '.join(src['uncommitted'])}" if src["uncommitted"] else ""
    out.append(f"quart-wslb at {src['commit']} ({src['subject']}){dirty}")
    p = meta["params"]
    out.append(f"K={p['users']} users on instance 0, sends from instance 1; sat: "
               f"{p['messages']} msgs, {p['window']} in flight; seq: {p['seq_messages']} "
               f"one at a time; paced: {p['paced_messages']} at {p['paced_rate']:.0f}/s; "
               f"{p['size']}-char messages")  # fmt: skip
    for system, reason in results.get("skipped", {}).items():
        out.append(f"SKIPPED {system}: {reason}")
    head = (f"{'system':<16}{'N':>3} {'mode':<6}{'msg/s':>8}{'send/s':>8}{'p50ms':>8}"
            f"{'p99ms':>8}{'B/msg':>7}{'inst':>5}{'CPUus':>7}{'hold':>6}{'send':>6}"
            f"{'idle':>6}{'redis':>6}{'lost':>5}{'bg':>5}")  # fmt: skip
    out += ["", "## targeted sends (CPU in us per delivered message, summed over processes)",
            "msg/s: received by the clients; send/s: send() calls completed; B/msg: Redis "
            "egress; inst: instances that took each message off Redis; hold/send/idle: "
            "CPU of the holding, the sending and each other instance; bg: cores other "
            "processes on the machine kept busy meanwhile", head, "-" * len(head)]  # fmt: skip
    for r in results.get("scenario", []):
        out.append(
            f"{r['system']:<16}{r['n']:>3} {r['mode']:<6}{r['throughput']:>8.0f}"
            f"{r['send_rate']:>8.0f}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}"
            f"{r['redis_bytes_per_msg']:>7.0f}{r['instances_per_msg']:>5.1f}"
            f"{r['cpu_us_per_msg']:>7.0f}{r['cpu_us_per_msg_holder']:>6.0f}"
            f"{r['cpu_us_per_msg_sender']:>6.0f}{r['cpu_us_per_msg_idle_each']:>6.0f}"
            f"{r['cpu_us_per_msg_redis']:>6.0f}{r['lost']:>5}{r['foreign_cores']:>5.1f}"
        )
    if results.get("floor"):
        out += ["", "## floor: raw redis.asyncio publish -> subscriber (separate processes)"]
        out.append(f"{'mode':<10}{'msg/s':>8}{'pub/s':>8}{'p50ms':>8}{'p99ms':>8}"
                   f"{'B/msg':>7}{'CPUus':>7}")  # fmt: skip
        for r in results["floor"]:
            runs = ", ".join(f"{x:.0f}" for x in r.get("runs", []))
            median = f"  median of {runs}" if runs else ""
            out.append(f"{r['mode']:<10}{r['throughput']:>8.0f}{r['send_rate']:>8.0f}"
                       f"{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}{r['redis_bytes_per_msg']:>7.0f}"
                       f"{r['cpu_us_per_msg']:>7.0f}{median}")  # fmt: skip
    if results.get("connections") or results.get("registry"):
        out += ["", "## connections (one instance)"]
        out.append("srv us: CPU of the instance and Redis per connect / per disconnect; "
                   "cli us: the clients' CPU per connect")  # fmt: skip
        out.append(f"{'system':<16}{'conns':>6}{'conn/s':>8}{'disc/s':>8}{'srv us':>12}"
                   f"{'cli us':>7}{'RSS MB':>8}{'KB/conn':>8}{'Redis B/conn':>13}"
                   f"{'bg':>5}")  # fmt: skip
        for r in results.get("connections", []):
            out.append(
                f"{r['system']:<16}{r['connections']:>6}{r['connects_per_s']:>8.0f}"
                f"{r['disconnects_per_s']:>8.0f}"
                f"{_fmt(r.get('server_us_per_connect'), '.0f'):>6} /"
                f"{_fmt(r.get('server_us_per_disconnect'), '.0f'):>4}"
                f"{_fmt(r.get('client_us_per_connect'), '.0f'):>7}{r['rss_after_mb']:>8.1f}"
                f"{r['rss_per_conn_kb']:>8.1f}{r['redis_bytes_per_conn']:>13.0f}"
                f"{r['foreign_cores']:>5.1f}"
            )
        reg = results.get("registry")
        if reg:
            out.append(f"Registry direct ({reg['records']} records, 64 at a time): "
                       f"{reg['register_per_s']:.0f} registrations/s, "
                       f"{reg['unregister_per_s']:.0f} unregistrations/s, "
                       f"{reg['redis_bytes_per_conn']:.0f} Redis bytes per record "
                       f"(bg {reg['foreign_cores']:.1f})")  # fmt: skip
    out += ["", "## targets (issue 6)"]
    for t in results.get("targets", []):
        mark = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        limit = f"{t['limit']:.3g}"
        note = f"  ({t['note']})" if t["note"] else ""
        out.append(f"{mark:<13}{t['target']}: {_fmt(t['value'], '.3g')} {t['op']} {limit}{note}")
    return "\n".join(out)


def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput, Redis egress and CPU per message against N, both systems (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results.get("scenario", []) if r["mode"] == "sat"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (
        ("throughput", "delivered messages / s (saturation)"),
        ("redis_bytes_per_msg", "Redis egress bytes / message"),
        ("cpu_us_per_msg", "CPU µs / delivered message (all processes)"),
    )
    for axis, (key, title) in zip(axes, panels, strict=True):
        for system, style in ((WSLB, "o-"), (PEER, "s--")):
            points = sorted((r["n"], r[key]) for r in rows if r["system"] == system)
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], style, label=system)
        if key == "throughput":
            for floor in results.get("floor", []):
                axis.axhline(floor["throughput"], linestyle=":", color="grey")
                axis.annotate(f"floor ({floor['mode']})", (1, floor["throughput"]),
                              fontsize=8, color="grey", va="bottom")  # fmt: skip
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("instances (N)")
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted({r["n"] for r in rows}) or [1])
        axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    m = results["meta"]["machine"]
    fig.suptitle(f"{WSLB} vs {PEER} (AsyncRedisManager): targeted sends, "
                 f"{m['cores']} cores, one private Redis", fontsize=11)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
