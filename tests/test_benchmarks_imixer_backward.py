"""benchmarks/imixer_backward.py: a --quick run, its files and the properties its numbers must have."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "imixer_backward.py"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("imixer_backward", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("imixer_backward")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        returned = module.main(["--quick", "--config", "solver:anderson,backward:ift,tol:0.001", "--out", str(out)])
    return module, returned, out, buffer.getvalue()


def test_files_match_the_returned_results(run):
    module, returned, out, printed = run
    loaded = json.loads((out / "imixer_backward.json").read_text())
    assert loaded == json.loads(json.dumps(returned))
    table = (out / "imixer_backward.md").read_text()
    assert table == module.markdown(loaded) and table.strip() in printed
    assert [row["mode"] for row in loaded["modes"]] == list(module.MODES)  # Anderson: SHINE included


def test_the_modes_rank_as_their_definitions_say(run):
    _, returned, _, _ = run
    assert returned["exact_solves_converged"]
    rows = {row["mode"]: row for row in returned["modes"]}
    for row in rows.values():
        assert math.isfinite(row["relative_error"]) and -1.0 <= row["cosine"] <= 1.0 + 1e-12
        assert row["forward_seconds"] > 0 and row["backward_seconds"] > 0
    # IFT solved to the forward's tolerance is the gradient of the true inverse up to that tolerance;
    # the approximations that never solve the adjoint (JFB, SHINE's estimate alone) are far coarser.
    assert rows["ift"]["relative_error"] < 1e-2
    assert rows["ift"]["relative_error"] < rows["jfb"]["relative_error"]
    assert rows["ift"]["relative_error"] < rows["shine"]["relative_error"]
    # More phantom steps approach the IFT gradient (a Neumann series of a contraction).
    assert rows["phantom, 5 steps"]["relative_error"] < rows["phantom, 2 steps"]["relative_error"]
    assert rows["ift"]["backward_vs_ift"] == 1.0


def test_the_published_table_is_rendered_from_its_json(run):
    module, _, _, _ = run
    docs = Path(__file__).resolve().parents[1] / "docs" / "assets" / "imixer_training"
    results = json.loads((docs / "imixer_backward.json").read_text())
    assert (docs / "imixer_backward.md").read_text() == module.markdown(results)
    rows = {row["mode"]: row for row in results["modes"]}
    # On the trained maps too: IFT closest, SHINE's estimate closer than JFB, refinement closes the gap.
    assert rows["ift"]["relative_error"] < rows["shine + 2 refinements"]["relative_error"]
    assert rows["shine + 2 refinements"]["relative_error"] < rows["shine"]["relative_error"]
    assert rows["shine"]["relative_error"] < rows["jfb"]["relative_error"]
