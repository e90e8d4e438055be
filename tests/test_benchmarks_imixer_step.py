"""benchmarks/imixer_step.py: a --quick run, its files and JSON schema (never its timings), and its profile."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re

import pytest
import torch

from benchmarks import imixer_step, render

ROW_NUMBERS = ["step_ms", "step_ratio_to_vanilla", "saved_peak_mb", "images_per_s", "throughput_ratio_to_vanilla"]
ROW_SOLVER = ["residual_max", "residual_median", "solver_residual_max", "nstep_mean", "nstep_max", "unconverged"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("imixer_step")
    buffer = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # not --quick's one thread, so that a leak shows
    try:
        with contextlib.redirect_stdout(buffer):
            returned = imixer_step.main(["--quick", "--device", "cpu", "--out", str(out)])
        assert torch.get_num_threads() == 2, "main() left torch's thread count changed"
    finally:
        torch.set_num_threads(threads)
    return imixer_step, returned, out, buffer.getvalue()


def finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def test_files_exist_and_json_matches_the_returned_results(run):
    _, returned, out, printed = run
    assert (out / "imixer_step.json").is_file() and (out / "imixer_step.md").is_file()
    loaded = json.loads((out / "imixer_step.json").read_text())
    assert set(loaded) == {"config", "machine", "models", "memory_growth", "seconds"}
    assert loaded["models"] == json.loads(json.dumps(returned["models"]))
    table = (out / "imixer_step.md").read_text()
    assert "| model | mode | step ms |" in table and table.strip() in printed
    assert table == render.step_markdown(loaded) + "\n"
    for key in ("cpu_count", "torch", "device", "date_utc", "torch_threads"):
        assert key in loaded["machine"]
    assert loaded["machine"]["device"] == "cpu" and loaded["config"]["quick"] is True


def test_rows_have_the_models_modes_and_finite_numbers(run):
    module, returned, _, _ = run
    assert set(returned["models"]) == {"t4_32"}
    block = returned["models"]["t4_32"]
    assert block["batch"] == 4 and block["img_size"] == 32
    assert [row["mode"] for row in block["rows"]] == module.QUICK_CONFIGS
    for row in block["rows"]:
        assert row["model"] == ("mixer_t4_32" if row["mode"] == "mixer" else "imixer_t4_32")
        assert row["options"] == module.parse(row["mode"])[1]
        assert all(finite(row[key]) and row[key] > 0 for key in ROW_NUMBERS), row
        assert row["cuda_peak_mb"] is None
        if row["mode"] == "mixer":
            assert row["step_ratio_to_vanilla"] == 1.0
            assert all(row[key] is None for key in ROW_SOLVER)
        else:
            assert all(finite(row[key]) for key in ROW_SOLVER), row
    # The solved modes report the residual they reach, recomputed independently of the solver.
    for row in block["rows"]:
        if "tol" in row["options"]:
            assert row["residual_max"] <= 1.5e-3 and row["unconverged"] == 0.0


def test_full_configuration_list_and_memory_growth(run):
    module, returned, _, _ = run
    configs = module.all_configs()
    # mixer, imixer; references 1, 2, 3, 4, 8; per tol (1e-2..1e-4): 3 solvers × (ift, phantom, jfb) + shine with
    # broyden, anderson
    assert len(configs) == 2 + 5 + 3 * (3 * 3 + 2) and list(configs)[:2] == ["mixer", "imixer"]
    assert configs["imixer"] == {} and configs["reference-8"] == {"reference_iterations": 8}
    assert "picard-shine-0.001" not in configs and "anderson-shine-0.001" in configs
    assert {"reference-1", "reference-8", "broyden-ift-0.001", "picard-jfb-0.0001"} <= set(configs)
    assert configs["picard-jfb-0.0001"] == {"solver": "picard", "backward": "jfb", "tol": 1e-4, "max_iter": 30}
    assert module.parse("x=tol:0.05") == ("x", {"tol": 0.05})
    with pytest.raises(ValueError):
        module.parse("picard/jfb@0.001")  # the old spelling is gone
    growth = returned["memory_growth"]
    assert growth["model"] == "imixer_t4_32"
    for kind in ("ift", "reference"):
        assert set(growth[kind]) == {"2", "16", "growth_16_over_2"}
        assert finite(growth[kind]["growth_16_over_2"])
        assert all(finite(growth[kind][n]["saved_peak_mb"]) for n in ("2", "16"))
    assert growth["ift"]["16"]["nstep_max"] == 16  # tol 0 forced every iteration
    # Deterministic byte counts, not timings: IFT's saved activations do not depend on the iterations.
    assert growth["ift"]["growth_16_over_2"] <= 1.05 < growth["reference"]["growth_16_over_2"]


def test_equal_residual_pairs_each_solved_mode_with_the_cheapest_accurate_reference(run):
    module, returned, _, _ = run
    rows = returned["models"]["t4_32"]["rows"]
    by_mode = {row["mode"]: row for row in rows}
    for comparison in returned["models"]["t4_32"]["equal_residual"]:
        assert comparison["mode"] in by_mode and not comparison["mode"].startswith(("mixer", "reference"))
        if comparison["reference"] is None:
            continue
        ours, ref = by_mode[comparison["mode"]], by_mode[comparison["reference"]]
        assert ref["residual_max"] <= ours["residual_max"]
        assert comparison["step_ratio"] == ours["step_ms"] / ref["step_ms"]
    # The function itself on a hand-made table: reference-2 is the cheapest with residual <= 1e-3.
    table = [
        {"mode": "mixer", "residual_max": None, "step_ms": 1.0, "images_per_s": 10.0},
        {"mode": "reference-4", "residual_max": 1e-6, "step_ms": 4.0, "images_per_s": 2.0},
        {"mode": "reference-1", "residual_max": 1e-2, "step_ms": 2.0, "images_per_s": 5.0},
        {"mode": "reference-2", "residual_max": 5e-4, "step_ms": 3.0, "images_per_s": 4.0},
        {"mode": "anderson-ift-0.001", "residual_max": 1e-3, "step_ms": 1.5, "images_per_s": 8.0},
        {"mode": "picard-jfb-0.0001", "residual_max": 1e-7, "step_ms": 1.5, "images_per_s": 8.0},
    ]
    for row in table:
        row["options"] = module.parse(row["mode"])[1]
    first, second = module.equal_residual(table)
    assert (first["reference"], first["step_ratio"], first["throughput_ratio"]) == ("reference-2", 0.5, 2.0)
    assert second["reference"] is None and second["step_ratio"] is None


def test_a_profile_reports_each_configuration():
    sections = [
        imixer_step.profile("t4_32", name, imixer_step.parse(name)[1], 2, torch.device("cpu"), rows=5)
        for name in ("mixer", "anderson-ift-0.001")
    ]
    headers = [
        re.findall(r"^## t4_32 (\S+), batch 2, cpu: ([\d.]+) ms per profiled step, (\d+) operator calls", s, re.M)
        for s in sections
    ]
    assert [h[0][0] for h in headers] == ["mixer", "anderson-ift-0.001"]
    # The solved mode launches more operators per step than the vanilla Mixer: the count is real.
    assert int(headers[1][0][2]) > int(headers[0][0][2]) > 0
    assert all("Self CPU" in section for section in sections)


def test_an_unknown_configuration_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        imixer_step.main(["--configs", "anderson/ift@1"])
    assert exit_info.value.code == 2
    assert "unknown" in capsys.readouterr().err
