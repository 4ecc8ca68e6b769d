"""Smoke test of the benchmark suite: its smallest run completes and reports sane figures.

It checks that ``python -m bench --smoke`` runs, not how fast anything is: the figures
are never part of pass/fail. Skipped unless the ``bench`` extra is installed; the
python-socketio part is skipped on its own when only that package is missing.
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


@pytest.fixture(name="smoke", scope="module")
def fixture_smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One ``python -m bench --smoke`` run for the whole module: its results and folder."""
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        pytest.fail(f"python -m bench --smoke failed:\n{done.stdout}\n{done.stderr[-4000:]}")
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
