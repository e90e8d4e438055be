"""python -m benchmarks.solvers --quick: its output files and JSON schema (never its timings)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchdeq")
pytest.importorskip("timm")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
SOLVERS = [
    "picard",
    "anderson",
    "broyden",
    "torchdeq.fixed_point_iter",
    "torchdeq.anderson",
    "torchdeq.broyden",
]
QUICK_PROBLEMS = {
    "imixer_init",
    "imixer_trained",
    "tanh_gauss_s0.9",
    "tanh_gauss_s0.99",
    "tanh_sym_s0.9",
    "tanh_sym_s0.99",
    "linear_root",
}
RESULT_KEYS = {
    "problem",
    "dtype",
    "solver",
    "family",
    "tol",
    "max_iter",
    "batch",
    "success_rate",
    "nstep_median",
    "nstep_max",
    "residual_max",
    "time_median_s",
    "times_s",
    "backward_time_median_s",
    "backward_success_rate",
    "trace",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("solvers_bench")
    # A subprocess: the script sets torch's thread count, which must not leak into other tests.
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.solvers", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "solvers.json").read_text()), proc.stdout


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_output_files_exist(run):
    out, report, stdout = run
    assert (out / "solvers.md").read_text().count("\n|") >= len(report["results"])
    assert report["plots"] == [f"solvers_{p['name']}.png" for p in report["problems"]]
    for name in report["plots"]:
        assert (out / name).stat().st_size > 1000
    assert "machine:" in stdout and "| problem | dtype | solver |" in stdout


def test_json_schema(run):
    _, report, _ = run
    assert {"machine", "settings", "training", "problems", "solvers", "results", "ratios", "plots", "seconds"} <= set(
        report
    )
    assert {"cpu_count", "torch", "torchdeq", "date_utc"} <= set(report["machine"])
    assert report["settings"]["quick"] is True and report["settings"]["stop_mode"] == "rel"
    assert report["training"]["steps"] >= 1 and 0.0 <= report["training"]["test_accuracy"] <= 1.0
    assert {p["name"] for p in report["problems"]} == QUICK_PROBLEMS
    assert report["solvers"] == SOLVERS
    cases = {(r["problem"], r["dtype"], r["solver"]) for r in report["results"]}
    assert cases == {(p, d, s) for p in QUICK_PROBLEMS for d in ("float32", "float64") for s in SOLVERS}
    for r in report["results"]:
        assert set(r) >= RESULT_KEYS, r["solver"]
        assert r["family"] == ("torchdeq" if r["solver"].startswith("torchdeq.") else "ours")
        assert 0.0 <= r["success_rate"] <= 1.0
        assert 1 <= r["nstep_median"] <= r["nstep_max"] <= r["max_iter"]
        assert _finite(r["time_median_s"]) and r["time_median_s"] > 0
        assert len(r["times_s"]) == report["settings"]["repeats"] == 3
        assert len(r["trace"]) >= 1
        if r["backward_time_median_s"] is not None:
            assert _finite(r["backward_time_median_s"]) and 0.0 <= r["backward_success_rate"] <= 1.0
        if r["success_rate"] == 1.0:
            assert _finite(r["residual_max"]) and r["residual_max"] <= r["tol"]


def test_ratios_pair_same_named_solvers(run):
    _, report, _ = run
    pairs = {(r["ours"], r["torchdeq"]) for r in report["ratios"]}
    assert pairs == {
        ("picard", "torchdeq.fixed_point_iter"),
        ("anderson", "torchdeq.anderson"),
        ("broyden", "torchdeq.broyden"),
    }
    assert len(report["ratios"]) == len(QUICK_PROBLEMS) * 2 * 3
    for ratio in report["ratios"]:
        assert _finite(ratio["time_median_s"]) and ratio["time_median_s"] > 0
        assert _finite(ratio["nstep_median"])
        assert -1.0 <= ratio["success_rate_diff"] <= 1.0


def test_ours_converge_on_the_contractive_problems(run):
    """Not a timing: the accelerated solvers reach tol on every sample of the well-posed problems."""
    _, report, _ = run
    for r in report["results"]:
        if r["solver"] in ("anderson", "broyden"):
            assert r["success_rate"] == 1.0, (r["problem"], r["dtype"], r["solver"])
