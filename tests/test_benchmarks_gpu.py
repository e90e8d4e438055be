"""benchmarks/gpu.py: the prepared GPU script's dry run on the CPU (``--device cpu --quick``) writes its files."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from benchmarks import common, gpu


def test_a_quick_cpu_run_writes_the_step_and_gradient_results(tmp_path):
    # A subprocess, as the command is run: it sets torch's threads and compiles, which must not leak into other tests.
    command = [sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--quick", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=common.REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert (tmp_path / "gpu.md").read_text() == gpu.markdown(results)
    assert {"git_commit", "date_utc", "torch", "timm", "device"} <= set(results["machine"])
    assert results["machine"]["device"] == "cpu" and results["config"]["backend"] == "aot_eager"
    (step,) = results["steps"]
    assert step["shape"] == "t4_28" and step["batch"] == 4
    assert "cudagraphs_ratio_to_mixer" not in step  # CUDA graphs only on CUDA
    for mode in ("eager", "compiled"):
        ratio = step[f"imixer_{mode}_step_ms"] / step[f"mixer_{mode}_step_ms"]
        assert math.isclose(step[f"{mode}_ratio_to_mixer"], ratio)
        ratio = step[f"imixer_{mode}_step_ms"] / step[f"reference-2_{mode}_step_ms"]
        assert math.isclose(step[f"{mode}_ratio_to_reference"], ratio)
    # The loop and the solve save more than the Mixer, which saves something; no CUDA peak on a CPU.
    assert 0 < step["mixer_saved_peak_mb"] < step["reference-2_saved_peak_mb"]
    assert step["mixer_saved_peak_mb"] < step["imixer_saved_peak_mb"] and step["imixer_cuda_peak_mb"] is None
    # The default solves to its tolerance; two Picard steps stop wherever they are.
    assert step["residual_max"] < step["reference_residual_max"]
    pairs = {(row["ours"], row["torchdeq"]) for row in results["solvers"]}
    assert pairs == {("anderson", "torchdeq.anderson"), ("broyden", "torchdeq.broyden")}
    assert all(row["time_median_s"] > 0 for row in results["solvers"])
    assert step["imixer_compiled_compile_s"] > 0 and step["imixer_eager_compile_s"] is None
    # The default solves its token mixers to its tolerance: the recomputed residual is about a tenth of it.
    assert 0 < step["residual_max"] <= common.settings({}).tol and step["unconverged"] == 0.0
    for setting in results["backward"]:
        errors = {row["mode"]: row["relative_error"] for row in setting["modes"]}
        assert errors["ift"] < 1e-3 and errors["shine, 5 refinements"] < errors["shine"]
    assert "| t4_28 | 4 |" in done.stdout
