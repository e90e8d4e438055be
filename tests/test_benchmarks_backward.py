"""benchmarks/backward.py: quick runs of both problems, their files, and the ordering the gradient modes'
definitions imply (never the timings); the published tables are rendered from the published JSON."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest

from benchmarks import backward, common, render

ROOT = common.REPO


@pytest.fixture(scope="module")
def imixer_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("imixer_backward")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        returned = backward.main(["--problem", "imixer", "--quick", "--config",
                                  "solver:anderson,backward:ift,tol:0.001", "--out", str(out)])  # fmt: skip
    return returned, out, buffer.getvalue()


def test_a_quick_mlp_run_compares_every_mode_with_the_exact_gradient(tmp_path, capsys):
    results = backward.main(["--quick", "--out", str(tmp_path)])
    assert "| gradient mode | relative error |" in capsys.readouterr().out
    assert json.loads((tmp_path / "backward_modes.json").read_text()) == json.loads(json.dumps(results))
    assert (tmp_path / "backward_modes.md").read_text() == render.backward_mlp_markdown(results)
    for setting in results:
        errors = {row["mode"]: row["relative_error"] for row in setting["modes"]}
        assert list(errors) == list(backward.MODES["mlp"])
        assert errors["ift"] < 1e-3  # solved to the forward tolerance, against float64 at 1e-12
        # Refinement converges to the IFT gradient; the estimate alone beats JFB's u = v.
        assert errors["shine, 5 refinements"] < errors["shine, 2 refinements"] < errors["shine"]
        assert errors["shine"] <= errors["jfb"]
        assert all(row["time_ratio_to_ift"] > 0 for row in setting["modes"])


def test_the_published_mlp_tables_are_the_published_json():
    published = json.loads((ROOT / "docs" / "assets" / "backward" / "backward_modes.json").read_text())
    table = (ROOT / "docs" / "assets" / "backward" / "backward_modes.md").read_text()
    assert table == render.backward_mlp_markdown(published)


def test_imixer_files_match_the_returned_results(imixer_run):
    returned, out, printed = imixer_run
    loaded = json.loads((out / "imixer_backward.json").read_text())
    assert loaded == json.loads(json.dumps(returned))
    table = (out / "imixer_backward.md").read_text()
    assert table == render.backward_imixer_markdown(loaded) and table.strip() in printed
    assert [row["mode"] for row in loaded["modes"]] == list(backward.MODES["imixer"])  # Anderson: SHINE included


def test_the_imixer_modes_rank_as_their_definitions_say(imixer_run):
    returned, _, _ = imixer_run
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


def test_the_published_imixer_table_is_rendered_from_its_json():
    docs = ROOT / "docs" / "assets" / "imixer_training"
    results = json.loads((docs / "imixer_backward.json").read_text())
    assert (docs / "imixer_backward.md").read_text() == render.backward_imixer_markdown(results)
    rows = {row["mode"]: row for row in results["modes"]}
    # On the trained maps too: IFT closest, SHINE's estimate closer than JFB, refinement closes the gap.
    assert rows["ift"]["relative_error"] < rows["shine + 2 refinements"]["relative_error"]
    assert rows["shine + 2 refinements"]["relative_error"] < rows["shine"]["relative_error"]
    assert rows["shine"]["relative_error"] < rows["jfb"]["relative_error"]
