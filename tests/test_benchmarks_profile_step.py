"""benchmarks/profile_step.py: a tiny run prints one profiler table per mode (never its timings)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_step.py"


def load():
    spec = importlib.util.spec_from_file_location("profile_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_tiny_run_reports_each_mode(tmp_path):
    module = load()
    out = tmp_path / "profile.md"
    modes = ["vanilla", "anderson/ift@0.001"]
    report = module.main(
        [
            "--size",
            "t4_32",
            "--modes",
            *modes,
            "--batch",
            "2",
            "--steps",
            "1",
            "--rows",
            "5",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert out.read_text(encoding="utf-8") == report
    headers = re.findall(
        r"^## t4_32 (\S+), batch 2, cpu: ([\d.]+) ms per profiled step, (\d+) operator calls", report, re.M
    )
    assert [mode for mode, _, _ in headers] == modes
    # The solved mode launches more operators per step than the vanilla Mixer: the count is real.
    assert int(headers[1][2]) > int(headers[0][2]) > 0
    assert "Self CPU" in report


def test_unknown_mode_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load().main(["--modes", "anderson/ift@1"])
    assert exit_info.value.code == 2
    assert "unknown" in capsys.readouterr().err
