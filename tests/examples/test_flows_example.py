"""examples/flows/train.py: a quick run's outputs, argument errors, and the docs' copy of its numbers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "flows" / "train.py"
DOCS_COPY = ROOT / "docs" / "assets" / "flows"


def load_script():
    spec = importlib.util.spec_from_file_location("flows_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_quick_run_writes_its_results(tmp_path, capsys):
    script = load_script()
    results = script.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "test log-likelihood" in out and "| estimator |" in out
    for name in ("results.json", "estimators.md", "summary.md", "flow_moons.png"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test_loglik"] == pytest.approx(results["test_loglik"])
    assert [row["estimator"] for row in saved["estimators"]] == ["exact"] + [e for e, _ in script.ESTIMATOR_GRID]
    assert all(row["std"] >= 0 and row["time_ratio"] > 0 for row in saved["estimators"])
    assert saved["sampling"]["unconverged_rows"] == 0
    assert (tmp_path / "estimators.md").read_text() == script.estimator_table(saved["estimators"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps: must be an integer >= 1"),
        (["--coeff", "1.5"], "--coeff must be < 1"),
        (["--lr", "-1"], "--lr: must be a finite number > 0"),
        (["--dataset", "spirals"], "--dataset: invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message):
    completed = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], completed.stderr


def test_the_docs_quote_the_generated_files():
    script = load_script()
    saved = json.loads((DOCS_COPY / "results.json").read_text())
    assert (DOCS_COPY / "estimators.md").read_text() == script.estimator_table(saved["estimators"])
    assert (DOCS_COPY / "summary.md").read_text() == script.summary_line(saved)
    assert (DOCS_COPY / f"flow_{saved['config']['dataset']}.png").is_file()
    assert not saved["config"]["quick"]  # the documented run is the default recipe, not the test's
    page = (ROOT / "docs" / "concepts" / "flows.md").read_text()
    assert '--8<-- "docs/assets/flows/estimators.md"' in page and '--8<-- "docs/assets/flows/summary.md"' in page
