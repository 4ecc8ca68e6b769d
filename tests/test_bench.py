"""Smoke test of the benchmark suite: its smallest run completes and reports sane figures.

It checks that ``python -m bench --smoke``, ``python -m bench.fanout --smoke``,
``python -m bench.recovery --smoke`` and ``python -m bench.metrics --smoke`` run, not how
fast anything is: the figures are never part of pass/fail. Skipped unless the ``bench``
extra is installed; the python-socketio part (and ``bench.recovery``, which measures it
in every round) is skipped on its own when only that package is missing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parent.parent
MISSING = [m for m in ("psutil", "matplotlib") if importlib.util.find_spec(m) is None]
NO_PEER = importlib.util.find_spec("socketio") is None
if MISSING:
    pytest.skip(
        f"the bench extra is not installed ({', '.join(MISSING)} missing): "
        "pip install -e '.[bench]'",
        allow_module_level=True,
    )

SCENARIO_FIELDS = {
    "system", "n", "mode", "messages", "delivered", "lost", "throughput", "send_rate",
    "p50_ms", "p99_ms", "redis_bytes_per_msg", "instances_per_msg", "cpu_us_per_msg",
    "cpu_us_per_msg_holder", "cpu_us_per_msg_sender", "cpu_us_per_msg_redis",
}  # fmt: skip


def _smoke(module: str, out: Path) -> str:
    """Run ``python -m MODULE --smoke --out OUT``; its standard output (fails the test
    if it fails)."""
    done = subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        pytest.fail(f"python -m {module} --smoke failed:\n{done.stdout}\n{done.stderr[-4000:]}")
    return done.stdout


@pytest.fixture(name="smoke", scope="module")
def fixture_smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One ``python -m bench --smoke`` run for the whole module: its results and folder."""
    out = tmp_path_factory.mktemp("bench")
    _smoke("bench", out)
    return json.loads((out / "results.json").read_text()), out


def _rows(results: dict[str, Any], system: str) -> list[dict[str, Any]]:
    return [r for r in results["scenario"] if r["system"] == system]


def test_bench_smoke_writes_results_plot_and_table(smoke: tuple[dict[str, Any], Path]) -> None:
    results, out = smoke
    assert {"meta", "scenario", "floor", "connections", "registry", "targets"} <= set(results)
    assert {"params", "machine", "versions", "duration_s"} <= set(results["meta"])
    assert results["meta"]["params"]["preset"] == "smoke"
    assert (out / "throughput.png").stat().st_size > 1000
    assert {t["target"] for t in results["targets"]} >= {
        "instances receiving each targeted message (worst N > 1)"
    }


def test_bench_smoke_measures_quart_wslb(smoke: tuple[dict[str, Any], Path]) -> None:
    results, _ = smoke
    rows = _rows(results, "quart-wslb")
    assert {r["mode"] for r in rows} == {"sat", "paced"}
    for row in rows:
        assert SCENARIO_FIELDS <= set(row)
        assert row["lost"] == 0
        assert row["throughput"] > 0
        assert row["instances_per_msg"] == 1.0
        assert row["redis_bytes_per_msg"] > 0
        assert row["p99_ms"] >= row["p50_ms"] > 0
    registry = results["registry"]
    assert registry["register_per_s"] > 0
    assert registry["records_left"] == 0


def test_bench_smoke_measures_the_floor(smoke: tuple[dict[str, Any], Path]) -> None:
    results, _ = smoke
    assert [r["mode"] for r in results["floor"]] == ["seq", "pipelined"]
    for row in results["floor"]:
        assert row["delivered"] == row["messages"]
        assert row["throughput"] > 0


@pytest.mark.skipif(NO_PEER, reason="python-socketio is not installed (the bench extra)")
def test_bench_smoke_measures_python_socketio(smoke: tuple[dict[str, Any], Path]) -> None:
    results, _ = smoke
    rows = _rows(results, "python-socketio")
    assert {r["mode"] for r in rows} == {"sat", "paced"}
    for row in rows:
        assert SCENARIO_FIELDS <= set(row)
        assert row["lost"] == 0
        assert row["throughput"] > 0
    connections = {c["system"] for c in results["connections"]}
    assert connections == {"quart-wslb", "python-socketio"}


def test_bench_sender_compare_reports_the_three_ways() -> None:
    """``python -m bench.sender --compare`` runs and prints each way's rate and the ratio."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.sender", "--compare", "--messages", "500", "--repeat", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    [line] = done.stdout.splitlines()
    assert "loop" in line and "32 senders" in line and "send_many" in line, line
    assert float(line.split()[-1]) > 0, line


@pytest.mark.skipif(NO_PEER, reason="python-socketio is not installed (the bench extra)")
def test_bench_recovery_smoke_measures_off_and_on(tmp_path: Path) -> None:
    """``python -m bench.recovery --smoke`` runs (it checks itself that only the sends
    with recovery on were recorded) and reports every way in both regimes."""
    stdout = _smoke("bench.recovery", tmp_path)
    results = json.loads((tmp_path / "recovery.json").read_text())
    [round_] = results["rounds"]
    ways = {"floor", "python-socketio", "quart-wslb off", "quart-wslb on"}
    assert results["regimes"] == ["1 in flight", "32 in flight"]
    for regime in results["regimes"]:
        assert set(round_["send"][regime]) == ways
        for row in round_["send"][regime].values():
            assert row["sends_per_s"] > 0 and row["redis_us"] > 0, row
        assert round_["send"][regime]["quart-wslb on"]["commands"]["xadd"][0] == 300
        assert "xadd" not in round_["send"][regime]["quart-wslb off"]["commands"]
        for row in round_["delivery"][regime].values():
            assert row["delivered_per_s"] > 0, row
    assert "on/off" in stdout and "recovery (on)" in stdout, stdout


def test_bench_metrics_smoke_measures_off_and_on(tmp_path: Path) -> None:
    """``python -m bench.metrics --smoke`` runs (it checks itself that Metrics observed
    every timed frame) and reports both ways in both regimes, and the in-process costs."""
    stdout = _smoke("bench.metrics", tmp_path)
    results = json.loads((tmp_path / "metrics.json").read_text())
    [round_] = results["sends"]["rounds"]
    assert results["sends"]["regimes"] == ["1 in flight", "32 in flight"]
    for regime in results["sends"]["regimes"]:
        assert set(round_[regime]) == {"off", "on"}
        assert all(row["sends_per_s"] > 0 for row in round_[regime].values()), round_
    assert all(value > 0 for value in results["in_process"].values()), results["in_process"]
    assert "on/off" in stdout and "with Metrics" in stdout, stdout


FANOUT_FIELDS = {
    "system", "n", "kind", "g", "real", "synthetic", "sends", "lost", "caller_ms_p50",
    "caller_ms_p99", "last_ms_p50", "redis_us_per_send", "redis_cpu_us_per_send",
    "egress_bytes_per_send", "instances_per_send", "ping_during_sends",
}  # fmt: skip


@pytest.fixture(name="fanout", scope="module")
def fixture_fanout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``python -m bench.fanout --smoke`` run for the module: its JSON."""
    out = tmp_path_factory.mktemp("fanout")
    stdout = _smoke("bench.fanout", out)
    assert "quart-wslb" in stdout and "PING max" in stdout, stdout
    results: dict[str, Any] = json.loads((out / "fanout.json").read_text())
    return results


def test_bench_fanout_smoke_measures_every_kind(fanout: dict[str, Any]) -> None:
    cells = [c for c in fanout["cells"] if c["system"] == "quart-wslb"]
    assert {(c["kind"], c["g"]) for c in cells} == {
        (kind, g) for kind in ("group", "path", "metadata") for g in (10, 100)
    }
    for cell in cells:
        assert FANOUT_FIELDS <= set(cell)
        assert cell["real"] + cell["synthetic"] == cell["g"], cell
        assert cell["lost"] == 0, cell
        assert len(cell["routed"]) == cell["sends"], cell
        assert cell["redis_us_per_send"] > 0 and cell["egress_bytes_per_send"] > 0
        assert cell["last_ms_p50"] > 0 and cell["caller_ms_p99"] >= cell["caller_ms_p50"]
        assert cell["ping_during_sends"]["pings"] > 0
    # 60 real clients at most: G = 100 is made up with records that have no socket.
    assert all(c["synthetic"] > 0 for c in cells if c["g"] == 100)


def test_bench_fanout_against_divides_cell_by_cell(fanout: dict[str, Any]) -> None:
    from bench.fanreport import format_against

    lines = format_against(fanout, fanout).splitlines()[3:]
    assert len(lines) == len(fanout["cells"])
    for line in lines:  # a run against itself: 1, or "-" where a figure is 0 or missing
        assert set(line.split()[4:]) <= {"1.00", "-"}, line


@pytest.mark.skipif(NO_PEER, reason="python-socketio is not installed (the bench extra)")
def test_bench_fanout_smoke_measures_python_socketio(fanout: dict[str, Any]) -> None:
    [cell] = [c for c in fanout["cells"] if c["system"] == "python-socketio"]
    assert FANOUT_FIELDS <= set(cell)
    assert (cell["kind"], cell["g"], cell["real"], cell["lost"]) == ("room", 10, 10, 0)
    [ratio] = fanout["ratios"]
    assert (ratio["n"], ratio["g"]) == (2, 10)
    assert ratio["egress"] > 0


def test_bench_fanout_plan_deals_members_into_nested_sets() -> None:
    from bench.members import Plan

    plan = Plan((10, 100, 1000), real=500)
    clients = plan.clients()
    assert len(clients) == 500
    assert clients[0].groups == ("fan10", "fan100", "fan1000")
    assert clients[50].path == "/ws/t100" and clients[50].metadata == {"f100": "1", "f1000": "1"}
    assert [plan.real_members("group", g) for g in (10, 100, 1000)] == [10, 100, 500]
    assert [plan.real_members("path", g) for g in (10, 100, 1000)] == [10, 90, 400]
    assert plan.target("path", 1000) == ("/ws/t1000", "")
    # No real client in the top tier: its path sends go to the largest tier that has some.
    assert Plan((10, 100, 1000), real=100).target("path", 1000) == ("/ws/t100", "")
