"""benchmarks/backward_modes.py: a quick run's schema and gradient errors (never its timings)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "backward_modes.py"


def _module():
    spec = importlib.util.spec_from_file_location("backward_modes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_quick_run_compares_every_mode_with_the_exact_gradient(tmp_path, capsys):
    module = _module()
    results = module.main(["--quick", "--out", str(tmp_path)])
    assert "| gradient mode | relative error |" in capsys.readouterr().out
    assert json.loads((tmp_path / "backward_modes.json").read_text()) == json.loads(json.dumps(results))
    for setting in results:
        errors = {row["mode"]: row["relative_error"] for row in setting["modes"]}
        assert list(errors) == list(module.MODES)
        assert errors["ift"] < 1e-3  # solved to the forward tolerance, against float64 at 1e-12
        # Refinement converges to the IFT gradient; the estimate alone beats JFB's u = v.
        assert errors["shine, 5 refinements"] < errors["shine, 2 refinements"] < errors["shine"]
        assert errors["shine"] <= errors["jfb"]
        assert all(row["time_ratio_to_ift"] > 0 for row in setting["modes"])


def test_the_published_tables_are_the_published_json():
    published = json.loads((REPO / "docs" / "assets" / "backward" / "backward_modes.json").read_text())
    table = (REPO / "docs" / "assets" / "backward" / "backward_modes.md").read_text()
    assert table == _module().markdown(published)
