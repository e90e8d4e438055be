"""benchmarks/core_properties.py: a small run, its printed report and JSON schema, and the properties."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "core_properties.py"
SOLVERS = ["picard", "anderson", "broyden"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("core_properties", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path_factory.mktemp("bench") / "results.json"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        returned = module.main(["--quick", "--json", str(path)])
    return returned, json.loads(path.read_text()), buffer.getvalue()


def test_json_matches_the_returned_results_and_has_the_schema(run):
    returned, loaded, _ = run
    assert set(loaded) == {"config", "p3_inverse", "p4_gradients", "p7_acceleration", "all_hold", "seconds"}
    assert loaded["config"]["dtype"] == "float64" and loaded["config"]["quick"] is True
    assert loaded["p3_inverse"]["max_rel_error"] == returned["p3_inverse"]["max_rel_error"]
    assert set(loaded["p3_inverse"]["max_rel_error"]) == {"implicit_mlp", "invertible_residual"}
    for per_solver in loaded["p3_inverse"]["max_rel_error"].values():
        assert set(per_solver) == set(SOLVERS)
    assert set(loaded["p4_gradients"]["rel_error"]) == {"unrolled", *(f"ift_{s}" for s in SOLVERS)}
    p7 = loaded["p7_acceleration"]
    assert set(p7["median_nstep"]) == set(SOLVERS) and set(p7["ratio_to_picard"]) == {"anderson", "broyden"}


def test_report_prints_every_section_and_verdict(run):
    _, loaded, text = run
    for heading in ("P3 inverse accuracy", "P4 IFT gradients", "P7 slow problem", "all properties hold: True"):
        assert heading in text
    assert text.count("holds: True") == 3
    for solver in SOLVERS:
        assert f"ift_{solver}" in text
    assert f"ratio to picard {loaded['p7_acceleration']['ratio_to_picard']['anderson']:.3f}" in text


def test_p3_inverses_are_accurate(run):
    _, loaded, _ = run
    for per_solver in loaded["p3_inverse"]["max_rel_error"].values():
        for error in per_solver.values():
            assert 0 <= error <= 1e-8
    assert all(bound < 1 for bound in loaded["p3_inverse"]["lipschitz_bound"].values())


def test_p4_ift_gradients_match_unrolled_and_closed_form(run):
    _, loaded, _ = run
    rows = loaded["p4_gradients"]["rel_error"]
    for name, row in rows.items():
        assert len(row) == (2 if name == "unrolled" else 4)
        for error in row.values():
            assert 0 <= error <= 1e-6, (name, row)


def test_p7_accelerated_solvers_need_at_most_a_third_of_picards_evaluations(run):
    _, loaded, _ = run
    p7 = loaded["p7_acceleration"]
    assert all(fraction == 1.0 for fraction in p7["converged_fraction"].values())
    median = p7["median_nstep"]
    assert median["anderson"] <= median["picard"] / 3
    assert median["broyden"] <= median["picard"] / 3
    assert p7["ratio_to_picard"]["anderson"] == pytest.approx(median["anderson"] / median["picard"])
    assert loaded["all_hold"] is True
