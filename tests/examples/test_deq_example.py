"""examples/deq/train.py: a quick run's outputs, TorchDEQ's optional run, the Jacobian penalty's effect,
argument errors, and the docs' copy of the numbers."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from examples.deq import train
from examples.deq.model import build_classifier

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "deq" / "train.py"
DOCS_COPY = ROOT / "docs" / "assets" / "deq"
OUTPUTS = ("results.json", "summary.md", "setup.md", train.FIGURE)
RUN_NAMES = ["implicitlayers", "implicitlayers_jac", "torchdeq"]
EPOCH_KEYS = {
    "epoch", "train_loss", "train_jacobian_loss", "forward_steps_mean", "forward_steps_max", "forward_unconverged",
    "backward_steps_mean", "backward_steps_max", "backward_unconverged", "f_calls_per_step", "val_accuracy",
    "val_loss", "val_forward_steps_mean", "val_forward_steps_max", "val_unconverged", "seconds", "cpu_seconds",
}  # fmt: skip


def torchdeq_installed() -> bool:
    return train.torchdeq_missing() is None


def check_outputs(folder: Path, results: dict) -> None:
    """Files present, the markdown rendered from the JSON, every recorded number in range."""
    for name in OUTPUTS:
        assert (folder / name).is_file(), name
    assert (folder / train.FIGURE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((folder / "results.json").read_text(encoding="utf-8")) == results
    assert (folder / "summary.md").read_text(encoding="utf-8") == train.summary_table(results)
    assert (folder / "setup.md").read_text(encoding="utf-8") == train.setup_line(results)
    assert list(results["runs"]) == RUN_NAMES
    table = (folder / "summary.md").read_text(encoding="utf-8").splitlines()
    assert len(table) == 2 + len(RUN_NAMES)
    config = results["config"]
    for (name, run), row in zip(results["runs"].items(), table[2:], strict=True):
        assert row.startswith(f"| {run['label']} |")
        if "skipped" in run:
            continue
        assert len(run["epochs"]) == config["epochs"]
        assert (run["gamma"] > 0) == (name == "implicitlayers_jac")
        for epoch in run["epochs"]:
            assert set(epoch) == EPOCH_KEYS
            assert 0 <= epoch["val_accuracy"] <= 1 and epoch["train_loss"] > 0
            assert 1 <= epoch["forward_steps_mean"] <= epoch["forward_steps_max"] <= config["max_iter"]
            assert 1 <= epoch["val_forward_steps_mean"] <= epoch["val_forward_steps_max"] <= config["eval_max_iter"]
            assert 1 <= epoch["backward_steps_mean"] <= epoch["backward_steps_max"] <= config["backward_max_iter"]
            # A batch is evaluated until its slowest sample stops: at least the mean per-sample steps.
            assert epoch["f_calls_per_step"] >= epoch["forward_steps_mean"]
            assert (epoch["train_jacobian_loss"] is not None) == (run["gamma"] > 0)
        last = run["epochs"][-1]
        assert f"| {100 * last['val_accuracy']:.2f} % |" in row
        assert f"| {run['final']['jacobian_penalty']:.4f} |" in row
        assert run["final"]["jacobian_penalty"] > 0 and run["final"]["spectral_radius_mean"] > 0


def test_a_quick_run_writes_consistent_results(tmp_path, capsys):
    results = train.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| run | val accuracy |" in out and "wrote results.json" in out
    check_outputs(tmp_path, results)
    assert results["data"] == {"train": 256, "val": 360}
    assert ("skipped" in results["runs"]["torchdeq"]) != torchdeq_installed()


def test_without_torchdeq_its_run_is_skipped_with_a_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdeq", None)  # makes `import torchdeq` raise ImportError
    results = train.main(["--quick", "--out", str(tmp_path)])
    assert "TorchDEQ `get_deq`: skipped, torchdeq is not installed (pip install torchdeq)" in capsys.readouterr().out
    assert results["runs"]["torchdeq"]["skipped"].startswith("torchdeq is not installed")
    assert results["torchdeq"] is None
    check_outputs(tmp_path, results)
    assert "skipped: torchdeq is not installed" in (tmp_path / "summary.md").read_text(encoding="utf-8")


def test_torchdeq_and_implicitlayers_models_start_from_the_same_weights():
    pytest.importorskip("torchdeq")
    models = []
    for backend in ("implicitlayers", "torchdeq"):
        torch.manual_seed(0)
        models.append(build_classifier(backend, 8))
    for part in ("stem", "head"):
        first, second = (getattr(m, part).state_dict() for m in models)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    first, second = (m.cell.state_dict() for m in models)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_the_jacobian_penalty_lowers_the_jacobian_and_the_iterations():
    """Same seed, data and budget; float64 so that the comparison is not at the mercy of rounding.

    Measured on x86-64 (seeds 0-3): the penalty ratio is 0.59-0.75 and the validation solve is 3.7-6.9
    steps shorter, so the margins below (0.85, 2 steps) are wide.
    """
    args = train.parse_args(
        ["--double", "--train-subset", "256", "--channels", "8", "--epochs", "2", "--gamma", "20", "--skip-torchdeq"]
    )
    digits = train.load_data(args.val_fraction, args.seed, args.train_subset, torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            plain = train.train_run(train.RunSpec("plain", "plain", "implicitlayers"), digits, args)
            penalised = train.train_run(train.RunSpec("jac", "jac", "implicitlayers", args.gamma), digits, args)
    finally:
        torch.set_num_threads(threads)
    assert penalised["final"]["jacobian_penalty"] < 0.85 * plain["final"]["jacobian_penalty"]
    assert penalised["final"]["spectral_radius_mean"] < plain["final"]["spectral_radius_mean"]
    steps = [run["epochs"][-1]["val_forward_steps_mean"] for run in (plain, penalised)]
    assert steps[1] < steps[0] - 2, steps


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "--epochs: must be an integer >= 1, got 0"),
        (["--lr", "-1"], "--lr: must be a finite number > 0, got -1"),
        (["--tol", "nan"], "--tol: must be a finite number > 0, got nan"),
        (["--gamma", "abc"], "--gamma: must be a finite number > 0, got abc"),
        (["--channels", "6"], "--channels must be a multiple of 4"),
        (["--dropout", "1"], "--dropout must be in [0, 1)"),
        (["--val-fraction", "0"], "--val-fraction must be in [0.01, 0.99]"),
        (["--seed", "-1"], "--seed: must be an integer in [0, 2**32), got -1"),
        (["--solver", "newton"], "--solver: invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_the_script_rejects_bad_arguments_without_a_traceback():
    command = [sys.executable, str(SCRIPT), "--batch-size", "-3"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        "train.py: error: argument --batch-size: must be an integer >= 1, got -3"
    ]


def test_the_docs_quote_the_generated_files():
    results = json.loads((DOCS_COPY / "results.json").read_text(encoding="utf-8"))
    check_outputs(DOCS_COPY, results)
    defaults = train.parse_args([])
    config = results["config"]
    assert not config["quick"] and config["train_subset"] is None  # the documented run is the default recipe
    for key in ("epochs", "channels", "lr", "gamma", "max_iter", "tol", "solver", "threads"):
        assert config[key] == getattr(defaults, key), key
    assert "skipped" not in results["runs"]["torchdeq"]
    # The page says that the penalty shortens the solves and lowers the Jacobian: the numbers must agree.
    plain, penalised = results["runs"]["implicitlayers"], results["runs"]["implicitlayers_jac"]
    for key in ("jacobian_penalty", "spectral_radius_mean"):
        assert penalised["final"][key] < plain["final"][key], key
    for key in ("forward_steps_mean", "val_forward_steps_mean"):
        assert penalised["epochs"][-1][key] < plain["epochs"][-1][key], key
    page = (ROOT / "docs" / "deq.md").read_text(encoding="utf-8")
    for name in ("summary.md", "setup.md"):
        assert f'--8<-- "docs/assets/deq/{name}"' in page, name
    assert f"(assets/deq/{train.FIGURE})" in page
