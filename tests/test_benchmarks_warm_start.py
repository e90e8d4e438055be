"""benchmarks/warm_start.py: a quick run's schema and its evaluation counts (never its timings)."""

from __future__ import annotations

import json

import torch

from benchmarks import warm_start


def test_a_quick_run_reports_cold_and_warm_solves(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # not the run's one thread, so that a leak shows
    try:
        results = warm_start.main(["--quick", "--out", str(tmp_path)])
        assert torch.get_num_threads() == 2, "main() left torch's thread count changed"
    finally:
        torch.set_num_threads(threads)
    assert "| σ | cold evaluations |" in capsys.readouterr().out
    assert json.loads((tmp_path / "warm_start.json").read_text()) == json.loads(json.dumps(results))
    rows = results["rows"]
    assert [row["sigma"] for row in rows] == [0.01, 0.1, 1.0]
    for row in rows:
        assert row["cold_evaluations"] > 0 and row["warm_evaluations"] > 0
        assert row["evaluation_ratio"] == row["warm_evaluations"] / row["cold_evaluations"]
    # The closest frames gain the most from starting at the previous fixed point.
    assert rows[0]["warm_evaluations"] < rows[0]["cold_evaluations"]
