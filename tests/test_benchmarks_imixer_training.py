"""benchmarks/imixer_training.py: a --quick run, its JSON schema and the properties its numbers must have."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from benchmarks import common, render
from benchmarks import imixer_training as training

DOCS = common.REPO / "docs" / "assets" / "imixer_training"
EPOCH_KEYS = {
    "epoch",
    "train_loss",
    "jac_loss",
    "train_seconds",
    "train_steps",
    "train_forward",
    "backward",
    "val_top1",
    "eval_forward",
    "diagnostics",
    "eval_seconds",
}
ITERATION_KEYS = {"nstep_mean", "nstep_max", "nstep_max_mean", "unconverged", "count"}
DIAGNOSTIC_KEYS = {
    "inverse_residual_max",
    "inverse_residual_mean",
    "inverse_error_max",
    "inverse_error_mean",
    "true_solve_residual_max",
    "true_solve_converged",
    "spectral_radius_mean",
    "spectral_radius_max",
    "lipschitz_bound",
    "lipschitz_weights",
    "eval_tol",
    "unconverged",
}
GELU_LIPSCHITZ = 1.12891


@pytest.fixture(scope="module")
def module():
    return training


@pytest.fixture(scope="module")
def run(module, tmp_path_factory):
    out = tmp_path_factory.mktemp("imixer_training")
    buffer = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(buffer):
            returned = module.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return returned, out, buffer.getvalue()


def finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def runs_of(results, name):
    return [run for run in results["tasks"]["digits"]["runs"] if run["config"] == name]


def test_files_and_schema(module, run):
    returned, out, printed = run
    for name in ("imixer_training.json", "imixer_training.md", "imixer_training_digits.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    loaded = json.loads((out / "imixer_training.json").read_text())
    assert loaded == json.loads(json.dumps(returned))
    assert set(loaded) == {"config", "machine", "tasks", "seconds"}
    assert loaded["config"]["quick"] is True and loaded["config"]["seeds"] == [0]
    assert loaded["machine"]["torch_threads"] == 1
    task = loaded["tasks"]["digits"]
    assert set(task) == {"task", "configs", "runs", "summary", "epochs", "seeds"}
    assert task["epochs"] == 1 and task["seeds"] == [0]
    assert task["task"]["n_train"] == 1437 and task["task"]["n_val"] == 128 and task["task"]["img_size"] == 16
    assert [c["name"] for c in task["configs"]] == list(module.DEFAULT_CONFIGS) == ["mixer", "imixer", "reference-2"]
    # The default row is marked when the benchmark runs, for the torch-free renderer.
    assert [c["is_default"] for c in task["configs"]] == [False, True, False]
    assert render.default_config(task) == "imixer"
    assert loaded["config"]["defaults"]["tol"] == common.settings({}).tol
    assert [(r["config"], r["seed"]) for r in task["runs"]] == [("mixer", 0), ("imixer", 0), ("reference-2", 0)]
    for record in (e for r in task["runs"] for e in r["epochs"]):
        assert set(record) == EPOCH_KEYS
        assert 0.0 <= record["val_top1"] <= 100.0
    for run_ in task["runs"]:
        assert [e["epoch"] for e in run_["epochs"]] == [0, 1]
        trained = run_["epochs"][1]
        assert trained["train_steps"] == 3 and trained["train_seconds"] > 0 and finite(trained["train_loss"])
    assert (out / "imixer_training.md").read_text().strip() in printed


def test_the_vanilla_mixer_has_no_solver_numbers(run):
    (mixer,) = runs_of(run[0], "mixer")
    for record in mixer["epochs"]:
        assert record["train_forward"] is None and record["backward"] is None
        assert record["eval_forward"] is None and record["diagnostics"] is None


def test_iteration_counts(run):
    results = run[0]
    (solved,) = runs_of(results, "imixer")
    (reference,) = runs_of(results, "reference-2")
    for run_ in (solved, reference):
        trained = run_["epochs"][1]
        for kind in ("train_forward", "eval_forward"):
            assert len(trained[kind]) == 4  # one entry per block
            for block in trained[kind]:
                assert set(block) == ITERATION_KEYS
                assert 1 <= block["nstep_mean"] <= block["nstep_max_mean"] <= block["nstep_max"] <= 30
                assert block["unconverged"] == 0.0
        assert [b["count"] for b in trained["train_forward"]] == [3] * 4
    # The reference loop runs exactly its n steps and solves no adjoint equation; the default's IFT gradient
    # solves one per block and training batch.
    for block in reference["epochs"][1]["train_forward"] + reference["epochs"][1]["eval_forward"]:
        assert block["nstep_mean"] == block["nstep_max"] == 2
    assert reference["epochs"][1]["backward"] is None
    backward = solved["epochs"][1]["backward"]
    assert len(backward) == 4
    for block in backward:
        assert block["count"] == 3 and 1 <= block["nstep_mean"] <= block["nstep_max"] and block["unconverged"] == 0


def test_adjoint_iterations_are_logged(module):
    """An IFT run records one adjoint solve per block and training batch."""
    import argparse

    args = argparse.Namespace(img_size=16, patch_size=2, lr=2e-3, weight_decay=0.05)
    task = module.Task("digits", 16, val_limit=32)
    run_ = module.Run("exact", dict(common.PRESETS["exact"]), 0, args, steps=2)
    record = run_.train_epoch(*task.train_epoch(0, 1), 16, 2)
    assert len(record["backward"]) == 4
    for block in record["backward"]:
        assert block["count"] == 2 and 1 <= block["nstep_mean"] <= block["nstep_max"]


def test_inverse_residuals_spectral_radii_and_bounds(run):
    results = run[0]
    (solved,) = runs_of(results, "imixer")
    (reference,) = runs_of(results, "reference-2")
    for run_ in (solved, reference):
        for record in run_["epochs"]:
            for block in record["diagnostics"]:
                assert set(block) == DIAGNOSTIC_KEYS and all(finite(v) for v in block.values()), block
                # z* is the true inverse to float64 accuracy.
                assert block["true_solve_converged"] == 1.0 and block["true_solve_residual_max"] <= 1e-10
                # "Certified": coeff² · Lip(act)², whatever the weights (both use the paper's GELU).
                assert block["lipschitz_bound"] == pytest.approx(0.81 * GELU_LIPSCHITZ**2, rel=1e-9)
                assert finite(block["lipschitz_weights"]) and block["lipschitz_weights"] > 0
                # Each power-iteration growth factor is a ‖Jᵀv‖ ≤ ‖J_F‖₂ ≤ the weights' Lipschitz bound.
                assert 0 < block["spectral_radius_mean"] <= block["spectral_radius_max"]
                assert block["spectral_radius_max"] <= block["lipschitz_weights"] * (1 + 1e-9)
        # At construction the power-iteration vectors are exact (an SVD) and xavier-initialised weights have
        # norm above coeff, so each normalised layer has norm coeff: the two bounds coincide.
        for block in run_["epochs"][0]["diagnostics"]:
            assert block["lipschitz_weights"] == pytest.approx(block["lipschitz_bound"], rel=1e-5)
    for solved_epoch, reference_epoch in zip(solved["epochs"], reference["epochs"], strict=True):
        for s, r in zip(solved_epoch["diagnostics"], reference_epoch["diagnostics"], strict=True):
            # The solved mode returns f(z_k) with ||f(z_k) - z_k|| <= tol ||f(z_k)||, so its output misses
            # z = x + F(z) by at most Lip(F) · tol (relative): the bound that tol promises.
            assert s["unconverged"] == 0.0
            assert 0 <= s["inverse_residual_max"] <= s["lipschitz_weights"] * s["eval_tol"] * (1 + 1e-6)
            # Two Picard steps leave a measurable, finite miss. (Not necessarily larger than the solved mode's:
            # with the same GELU weights a tol-1e-2 solve may stop at the very iterate two Picard steps reach.)
            assert 1e-6 < r["inverse_residual_mean"] <= r["inverse_residual_max"] < 1.0
            assert 1e-6 < r["inverse_error_mean"] <= r["inverse_error_max"] < 1.0


def test_summary_and_table_agree_with_the_runs(module, run):
    results, out, _ = run
    task = results["tasks"]["digits"]
    assert task["summary"] == render.summarise(task["runs"], [c["name"] for c in task["configs"]])
    table = (out / "imixer_training.md").read_text()
    assert table.strip() == render.training_markdown(json.loads((out / "imixer_training.json").read_text())).strip()
    rows = {
        line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| ")
    }
    for summary in task["summary"]:
        name = summary["config"]
        (run_,) = runs_of(results, name)
        cells = rows[name]
        assert summary["val_top1_mean"] == run_["epochs"][-1]["val_top1"]
        assert cells[2] == f"{summary['val_top1_mean']:.2f}"  # one seed: no ± std
        assert cells[4] == f"{summary['ratio_to_mixer_mean']:.2f}"
        mixer_seconds = runs_of(results, "mixer")[0]["epochs"][1]["train_seconds"]
        assert summary["ratio_to_mixer_mean"] == pytest.approx(run_["epochs"][1]["train_seconds"] / mixer_seconds)
        if name != "mixer":
            worst = max(b["inverse_residual_max"] for b in run_["epochs"][-1]["diagnostics"])
            assert summary["inverse_residual_end"] == worst
            assert f"→ {worst:.2e}" in cells[8]
    assert rows["mixer"][4] == "1.00"


def test_checked_in_docs_results_agree_with_their_table():
    path = DOCS / "imixer_training.json"
    if not path.is_file():
        pytest.skip("no published results")
    results = json.loads(path.read_text())
    assert results["config"]["quick"] is False and len(results["config"]["seeds"]) >= 3
    assert (DOCS / "imixer_training.md").read_text().strip() == render.training_markdown(results).strip()
    for name, task in results["tasks"].items():
        assert (DOCS / f"imixer_training_{name}.png").is_file()
        assert task["summary"] == render.summarise(task["runs"], [c["name"] for c in task["configs"]])


def test_render_merges_several_runs(module, run, tmp_path, capsys):
    """``--render`` re-renders earlier JSONs without training, their tasks merged."""
    _, out, _ = run
    results = json.loads((out / "imixer_training.json").read_text())
    other = json.loads(json.dumps(results))
    other["tasks"] = {"digits-hard": {**other["tasks"]["digits"], "epochs": 7}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    merged = module.main(["--render", str(out / "imixer_training.json"), str(tmp_path / "other.json"),
                          "--out", str(tmp_path / "rendered")])  # fmt: skip
    assert list(merged["tasks"]) == ["digits", "digits-hard"] and merged["tasks"]["digits-hard"]["epochs"] == 7
    assert merged["seconds"] == 2 * results["seconds"]
    table = (tmp_path / "rendered" / "imixer_training.md").read_text()
    assert table.strip() == render.training_markdown(merged).strip() and "## digits-hard" in table
    assert (tmp_path / "rendered" / "imixer_training_digits-hard.png").is_file()


def test_configuration_parsing_and_levers(module):
    assert common.parse_config("reference-2") == ("reference-2", {"reference_iterations": 2})
    name, options = common.parse_config("lip=activation:lipswish,coeff:0.8,jac_weight:0.5,tol:1e-2")
    assert name == "lip" and options == {"activation": "lipswish", "coeff": 0.8, "jac_weight": 0.5, "tol": 0.01}
    assert common.parse_config("plain=") == ("plain", {})
    bad_specs = ("nonsense", "x=colour:red", "x=tol", "=tol:1", "x=solver:picard,backward:shine", "x=activation:sine")
    for bad in (*bad_specs, "x=model:mixer,tol:0.1", "x=reference_iterations:2,tol:0.5"):
        with pytest.raises(ValueError):
            common.parse_config(bad)
    # The defaults are decided by the settings dataclass, whatever the spelling.
    assert common.is_default({}) and common.is_default({"activation": "gelu", "backward": "ift", "tol": 0.01})
    assert not common.is_default({"tol": 1e-3}) and not common.is_default({"model": "mixer"})
    assert not common.is_default({"jac_weight": 0.5})
    torch.manual_seed(0)
    net = module.build_model({**options, "shine_refine": 0, "eval_tol": 1e-4}, 16, 2)
    layers = module.implicit_layers(net)
    assert len(layers) == 4
    for layer in layers:
        kinds = [
            "LipSwish" if isinstance(m, module.il.LipSwish) else "Linear" if isinstance(m, torch.nn.Linear) else "?"
            for m in layer.g
        ]
        assert kinds == ["LipSwish", "Linear", "LipSwish", "Linear"]
        assert layer.jacobian_penalty == 1 and layer.tol == 0.01 and layer.eval_budget.tol == 1e-4
        assert module.il.lipschitz_bound(layer.g) == pytest.approx(0.8**2 * (1.09984 / 1.1) ** 2)
    assert module.implicit_layers(module.build_model({"model": "mixer"}, 16, 2)) == []


def test_hard_task_distortion_is_seeded_and_in_range(module):
    clean = module.load_digits_tensors(16)["val_x"][:16]
    first = module.distort(clean, torch.Generator().manual_seed(3))
    again = module.distort(clean, torch.Generator().manual_seed(3))
    other = module.distort(clean, torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == clean.shape and float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    assert float((first - clean).abs().mean()) > 0.05
