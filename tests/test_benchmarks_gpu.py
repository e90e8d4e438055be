"""benchmarks/gpu.py: the prepared GPU script's dry run on the CPU (``--device cpu --quick``) writes its files."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from benchmarks import common, render


def test_a_quick_cpu_run_writes_the_step_and_gradient_results(tmp_path):
    # A subprocess, as the command is run: it sets torch's threads and compiles, which must not leak into other tests.
    command = [sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--quick", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=common.REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert (tmp_path / "gpu.md").read_text() == render.gpu_markdown(results)
    assert {"git_commit", "date_utc", "torch", "timm", "device"} <= set(results["machine"])
    assert results["machine"]["device"] == "cpu" and results["config"]["backend"] == "aot_eager"
    (step,) = results["steps"]
    assert step["shape"] == "t4_28" and step["batch"] == 4
    assert "cudagraphs_ratio_to_mixer" not in step  # CUDA graphs only on CUDA
    assert set(results["phase_seconds"]) == {"t4_28", "solvers", "backward"}  # each phase written as it ends
    for mode in ("eager", "compiled"):
        # Each ratio divides by the model it names (not, say, by the last one measured).
        ratio = step[f"imixer_{mode}_step_ms"] / step[f"mixer_{mode}_step_ms"]
        assert math.isclose(step[f"{mode}_ratio_to_mixer"], ratio)
        ratio = step[f"imixer_{mode}_step_ms"] / step[f"reference-2_{mode}_step_ms"]
        assert math.isclose(step[f"{mode}_ratio_to_reference"], ratio)
        # Operators actually run: the iMixer's solves and the loop add to the Mixer's; with aot_eager nothing
        # is fused, so compiled and eager steps call about as many outermost operators.
        assert 0 < step[f"mixer_{mode}_operator_calls"] < step[f"reference-2_{mode}_operator_calls"]
        assert step[f"mixer_{mode}_operator_calls"] < step[f"imixer_{mode}_operator_calls"]
    calls = step["imixer_compiled_operator_calls"] / step["mixer_compiled_operator_calls"]
    assert math.isclose(step["operator_calls_ratio_to_mixer"], calls)
    # The loop and the solve save more than the Mixer, which saves something; no CUDA peak on a CPU.
    assert 0 < step["mixer_saved_peak_mb"] < step["reference-2_saved_peak_mb"]
    assert step["mixer_saved_peak_mb"] < step["imixer_saved_peak_mb"] and step["imixer_cuda_peak_mb"] is None
    pairs = {(row["ours"], row["torchdeq"]) for row in results["solvers"]}
    assert pairs == {("anderson", "torchdeq.anderson"), ("broyden", "torchdeq.broyden")}
    assert all(row["time_median_s"] > 0 for row in results["solvers"])
    assert step["imixer_eager_compile_s"] is None and step["mixer_compiled_compile_s"] is not None
    # The default solves its token mixers to its tolerance (the recomputed residual, every row).
    assert 0 < step["residual_max"] <= common.settings({}).tol and step["unconverged"] == 0.0
    for setting in results["backward"]:
        errors = {row["mode"]: row["relative_error"] for row in setting["modes"]}
        assert errors["ift"] < 1e-3 and errors["shine, 5 refinements"] < errors["shine"]
    assert "| t4_28 | 4 |" in done.stdout
