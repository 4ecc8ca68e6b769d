"""The tables of a fan-out run (``python -m bench.fanout``) and its ratios to the peer."""

from __future__ import annotations

from typing import Any

from bench.config import PEER, WSLB

__all__ = ("format_against", "format_fanout", "ratios")

#: (label, key of the quart-wslb cell and the peer's cell) of each ratio.
RATIOS = (
    ("last p50", "last_ms_p50"),
    ("caller p50", "caller_ms_p50"),
    ("Redis us", "redis_us_per_send"),
    ("Redis max", "redis_max_us"),
    ("Redis CPU", "redis_cpu_us_per_send"),
    ("egress", "egress_bytes_per_send"),
    ("PING max", "ping_max_ms"),
)
HEADER = (
    f"{'kind':<9}{'N':>2}{'G':>8}{'real':>8}{'synth':>8}{'sends':>6}{'inst':>5}"
    f"{'caller p50/p99 ms':>19}{'last p50/max ms':>17}{'Redis us':>10}{'max us':>9}{'CPU us':>9}"
    f"{'egress B':>11}{'inst ms':>9}{'PING max/p99 ms':>17}"
)


def _noisy_cpu(cell: dict[str, Any]) -> bool:
    """Whether Redis's idle CPU, subtracted, exceeded the CPU figure left (noise)."""
    return bool(cell.get("redis_cpu_idle_us_per_send", 0) > cell["redis_cpu_us_per_send"])


def _value(cell: dict[str, Any], key: str) -> float | None:
    if key == "ping_max_ms":
        return float(cell["ping_during_sends"]["max_ms"])
    if key == "redis_cpu_us_per_send" and _noisy_cpu(cell):
        return None
    value = cell.get(key)
    return None if value is None else float(value)


def ratios(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """quart-wslb's group send / the peer's room emit, for each (N, G) both ran."""
    ours = {(c["n"], c["g"]): c for c in cells if c["system"] == WSLB and c["kind"] == "group"}
    rows = []
    for peer in (c for c in cells if c["system"] == PEER):
        cell = ours.get((peer["n"], peer["g"]))
        if cell is None:
            continue
        row: dict[str, Any] = {"n": peer["n"], "g": peer["g"]}
        for label, key in RATIOS:
            a, b = _value(cell, key), _value(peer, key)
            row[label] = a / b if a is not None and b else None
        rows.append(row)
    return rows


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _line(cell: dict[str, Any]) -> str:
    ping = cell["ping_during_sends"]
    caller = f"{_num(cell['caller_ms_p50'], '.2f')} / {_num(cell['caller_ms_p99'], '.2f')}"
    last = f"{_num(cell['last_ms_p50'], '.1f')} / {_num(cell['last_ms_max'], '.1f')}"
    return (
        f"{cell['kind']:<9}{cell['n']:>2}{cell['g']:>8,}{cell['real']:>8,}"
        f"{cell['synthetic']:>8,}{cell['sends']:>6}{cell['instances_per_send']:>5.1f}"
        f"{caller:>19}{last:>17}{cell['redis_us_per_send']:>10,.0f}{cell['redis_max_us']:>9,}"
        f"{_cpu(cell):>9}{cell['egress_bytes_per_send']:>11,.0f}"
        f"{cell['instances_cpu_ms_per_send']:>9.1f}"
        f"{ping['max_ms']:>10.2f} / {ping['p99_ms']:.2f}"
        + ("" if not cell["lost"] else f"  LOST {cell['lost']}")
    )


def _cpu(cell: dict[str, Any]) -> str:
    if _noisy_cpu(cell):
        return f"~{max(0.0, cell['redis_cpu_us_per_send']):,.0f}*"
    return f"{cell['redis_cpu_us_per_send']:,.0f}"


def _table(title: str, cells: list[dict[str, Any]]) -> list[str]:
    if not cells:
        return []
    return ["", title, HEADER, *(_line(c) for c in cells)]


def format_fanout(results: dict[str, Any]) -> str:
    """Every table of a fan-out run, with what was real and what synthetic."""
    meta, cells = results["meta"], results["cells"]
    params, source = meta["params"], meta["source"]
    idle = results["ping_idle"]
    lines = [
        f"fan-out, preset {params['preset']}, commit {source['commit']}"
        + (" (+ uncommitted changes)" if source["uncommitted"] else "")
        + f", {meta['duration_s']:.0f} s",
        f"instance 0 sends, one send in flight, {params['size']}-character texts; members "
        "dealt round-robin over the instances: 'real' are websocket clients of this "
        "process, 'synth' registry records with no socket",
        f"PING with nothing running: max {idle['max_ms']:.2f} ms, p99 {idle['p99_ms']:.2f} "
        "ms; 'PING max/p99' are PINGs sent while a send ran (start to last receipt)",
        "per send: Redis us = time of the commands the sender sent (SLOWLOG: script calls "
        "and PUBLISH, not what a script runs; wall time inside Redis; INFO commandstats "
        "agrees, in the JSON), max us = the longest one, CPU us = used_cpu_sys+user (at "
        "hz 1) less its idle rate, egress B = "
        "total_net_output_bytes (to every subscriber, and replies), inst ms = CPU of all "
        "instances, inst = instances that took the message off Redis",
        "*: Redis's idle CPU in as long, subtracted, was more than what is left: noise, "
        "and no ratio is given",
        "real: clients c00000... (client i is a member at every G > i; paths: tiers), "
        "synth: records <instance id>:s<G>-<k> written through Registry.register",
    ]
    for setup in results["setups"]:
        fills = ", ".join(f"G={g}: {c:,} in {s:.1f} s" for g, (c, s) in setup["fill_s"].items())
        lines.append(
            f"  {setup['system']} N={setup['n']}: {setup['real']:,} real clients connected "
            f"in {setup['connect_s']:.1f} s, Redis idle "
            f"{setup.get('redis_idle_cpu_us_per_s', 0):,.0f} us CPU/s"
            + (f"; synthetic records {fills}" if fills else "")
        )
    for name, reason in results["skipped"].items():
        lines.append(f"  {name} skipped: {reason}")
    lines += _table("quart-wslb", [c for c in cells if c["system"] == WSLB])
    lines += _table("python-socketio (AsyncRedisManager rooms)",
                    [c for c in cells if c["system"] == PEER])  # fmt: skip
    if results["ratios"]:
        lines += ["", "quart-wslb group send / python-socketio room emit (same run; < 1: "
                  "quart-wslb less)", f"{'N':>3}{'G':>8}"
                  + "".join(f"{label:>12}" for label, _ in RATIOS)]  # fmt: skip
        for row in results["ratios"]:
            lines.append(
                f"{row['n']:>3}{row['g']:>8,}"
                + "".join(f"{_num(row[label], '.2f'):>12}" for label, _ in RATIOS)
            )
    return "\n".join(lines)


#: The figures compared by :func:`format_against`.
AGAINST = (*RATIOS[:-1], ("inst CPU", "instances_cpu_ms_per_send"), RATIOS[-1])


def format_against(results: dict[str, Any], earlier: dict[str, Any]) -> str:
    """This run's figures / an earlier run's, for every cell both have."""
    old = {(c["system"], c["n"], c["kind"], c["g"]): c for c in earlier["cells"]}
    commit = earlier["meta"]["source"]["commit"]
    lines = [
        "",
        f"this run / the run of commit {commit} (< 1: less now)",
        f"{'system':<16}{'kind':<9}{'N':>2}{'G':>8}" + "".join(f"{k:>11}" for k, _ in AGAINST),
    ]
    for cell in results["cells"]:
        then = old.get((cell["system"], cell["n"], cell["kind"], cell["g"]))
        if then is None:
            continue
        values = []
        for _, key in AGAINST:
            a, b = _value(cell, key), _value(then, key)
            values.append(_num(a / b if a is not None and b else None, ".2f"))
        lines.append(
            f"{cell['system']:<16}{cell['kind']:<9}{cell['n']:>2}{cell['g']:>8,}"
            + "".join(f"{v:>11}" for v in values)
        )
    return "\n".join(lines)
