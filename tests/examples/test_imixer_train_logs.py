"""examples/imixer/train.py: progress records, metrics.csv, solver statistics per block, the plot, corrupt images."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tests.examples.test_imixer_train import TINY, _skip_plots, real_plots, run_main  # noqa: F401  (fixtures)

train = pytest.importorskip("examples.imixer.train")
from examples.imixer import data, engine, logs  # noqa: E402

TWO_BLOCKS = ["--model-kwargs", "embed_dim=8", "num_blocks=2"]


def history(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------
# Progress records


def test_log_interval_prints_a_record_every_n_steps_when_not_a_terminal(tmp_path: Path, capsys) -> None:
    # The default's IFT gradient: the records have an adjoint solve to report.
    status, _ = run_main(tmp_path, "--epochs", "1", "--log-interval", "4", *TWO_BLOCKS, name="records")
    assert status == 0
    records = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Train: ")]
    # digits: 1437 training images, batch 128 → 11 steps; records at 4, 8 and the last step.
    assert [line.split("]")[0] for line in records] == ["Train: 1/1 [ 4/11 ( 36%)", "Train: 1/1 [ 8/11 ( 73%)",
                                                        "Train: 1/1 [11/11 (100%)"]  # fmt: skip
    for line in records:
        for field in ("loss ", "lr ", " s/step", " img/s", "  fwd ", "  bwd "):
            assert field in line, (field, line)

    assert run_main(tmp_path, "--epochs", "1", "--log-interval", "11", "--backward", "shine", name="shine")[0] == 0
    (record,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Train: ")]
    assert "  fwd " in record and "  bwd " not in record  # SHINE without refinement: no adjoint solve, none invented

    assert run_main(tmp_path, "--epochs", "1", "--log-interval", "0", name="quiet")[0] == 0
    assert "Train: " not in capsys.readouterr().out


def test_a_terminal_gets_the_bar_instead_of_records(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert train.main([*TINY, "--output", str(tmp_path), "--epochs", "1", "--log-interval", "1"]) == 0
    captured = capsys.readouterr()
    assert "Train: " not in captured.out and "epoch 1/1" in captured.err  # tqdm writes to stderr


# ---------------------------------------------------------------------------------------------------
# metrics.jsonl, metrics.csv and the solver statistics


@pytest.fixture(scope="module")
def two_block_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    status, output = run_main(
        tmp_path_factory.mktemp("blocks"), "--epochs", "2", *TWO_BLOCKS, "--model-ema", "--backward", "ift"
    )
    assert status == 0
    return output


def test_metrics_csv_holds_the_same_numbers_as_metrics_jsonl(two_block_run: Path) -> None:
    with open(two_block_run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    entries = history(two_block_run)
    assert len(rows) == len(entries) == 2
    for row, entry in zip(rows, entries, strict=True):
        assert set(row) == set(entry)
        for key, value in entry.items():
            assert float(row[key]) == pytest.approx(value, rel=1e-12), key


def test_solver_statistics_per_block_for_forward_backward_and_eval(two_block_run: Path) -> None:
    for entry in history(two_block_run):
        for prefix in ("fwd", "bwd", "val_fwd"):  # backward IFT: an adjoint solve per block
            means = [entry[f"{prefix}_iters_b{block}"] for block in (0, 1)]
            maxes = [entry[f"{prefix}_iters_max_b{block}"] for block in (0, 1)]
            assert all(1 <= mean <= top <= 30 for mean, top in zip(means, maxes, strict=True)), (prefix, entry)
            assert entry[f"{prefix}_iters_mean"] == pytest.approx(sum(means) / 2)
            assert entry[f"{prefix}_iters_max"] == max(maxes)
            assert 0 <= entry[f"{prefix}_unconverged"] <= 1
            residuals = [entry[f"{prefix}_residual_max_b{block}"] for block in (0, 1)]
            assert entry[f"{prefix}_residual_max"] == max(residuals)
            assert "ema_val_fwd_iters_mean" not in entry  # the EMA's evaluation adds its top-1 only
        assert entry["solver_iters_mean"] == entry["fwd_iters_mean"]  # the earlier key, kept
        assert entry["solver_unconverged"] == entry["fwd_unconverged"] and "ema_val_top1" in entry


def test_reference_mode_records_exactly_n_forward_iterations_and_no_backward_solve(tmp_path: Path) -> None:
    status, output = run_main(tmp_path, "--epochs", "1", "--reference-iterations", "3", *TWO_BLOCKS)
    assert status == 0
    (entry,) = history(output)
    for block in (0, 1):
        assert entry[f"fwd_iters_b{block}"] == entry[f"fwd_iters_max_b{block}"] == 3
        assert entry[f"val_fwd_iters_b{block}"] == 3
    assert entry["fwd_unconverged"] == 0  # a fixed number of steps has no tolerance to miss
    assert not any(key.startswith("bwd_") for key in entry)  # unrolled: backpropagation, no adjoint solve


def test_solver_meter_agrees_with_the_models_own_solver_stats() -> None:
    """Batch by batch, the meter's per-block means equal IMixer.solver_stats() averaged over rows."""
    torch.manual_seed(0)
    net = timm.create_model("imixer_t2_8", num_classes=10, embed_dim=8, num_blocks=2, backward="ift")
    meter = engine.SolverMeter(2, torch.device("cpu"))
    expected_sum, expected_max = np.zeros(2), np.zeros(2)
    rows = 0
    net.train()
    for batch in (6, 10):
        loss = net(torch.randn(batch, 1, 8, 8)).square().mean()
        loss.backward()
        meter.add(net, "forward")
        meter.add(net, "backward")
        stats = net.solver_stats()
        batch_rows = net.implicit_layers()[0].stats.nstep.numel()
        expected_sum += [block["nstep_mean"] * batch_rows for block in stats]
        expected_max = np.maximum(expected_max, [block["nstep_max"] for block in stats])
        rows += batch_rows
    metrics = meter.metrics(["forward", "backward"])
    for block in (0, 1):
        assert metrics[f"fwd_iters_b{block}"] == pytest.approx(expected_sum[block] / rows)
        assert metrics[f"fwd_iters_max_b{block}"] == expected_max[block]
        backward = net.implicit_layers()[block].backward_stats
        assert metrics[f"bwd_iters_max_b{block}"] >= float(backward.nstep.max())
    assert math.isfinite(metrics["bwd_iters_mean"])


@pytest.mark.usefixtures("real_plots")
def test_the_plot_has_loss_accuracy_and_solver_panels(tmp_path: Path, two_block_run: Path) -> None:
    """(train.py draws it at the end of every run: see test_imixer_train.py's first test.)"""
    png_path = tmp_path / "training.png"
    assert logs.plot_training(history(two_block_run), png_path, "two blocks")
    png = png_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 2.5 * height  # three panels side by side: loss, accuracy, solver iterations


# ---------------------------------------------------------------------------------------------------
# Corrupt images: one line naming the file, exit 2 (see README "Corrupt images")


@pytest.fixture(scope="module")
def folder_with_a_corrupt_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corrupt")
    rng = np.random.default_rng(3)
    for split, count in (("train", 6), ("val", 2)):
        for label in ("ant", "bee"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / label / f"{i}.png")
    return root


@pytest.mark.parametrize(("split", "workers"), [("train", "1"), ("val", "0")])
def test_a_corrupt_image_stops_with_one_line_naming_it(
    tmp_path: Path, capsys, folder_with_a_corrupt_image: Path, split: str, workers: str
) -> None:
    bad = folder_with_a_corrupt_image / split / "bee" / "1.png"
    good = bad.read_bytes()
    bad.write_bytes(b"this is not a PNG")
    try:
        args = ["--dataset", "imagefolder", "--data-dir", str(folder_with_a_corrupt_image), "--img-size", "8"]
        status, _ = run_main(tmp_path, *args, "--epochs", "1", "-b", "4", "-j", workers)
    finally:
        bad.write_bytes(good)
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot read image {bad}: cannot identify image file" in err, err
    assert "--resume auto" in err


def test_a_data_error_from_a_loader_worker_keeps_its_one_line() -> None:
    """PyTorch re-raises a worker's exception as type(error)("Caught ... Original Traceback ...")."""
    text = (
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n'
        "examples.imixer.data.DataError: cannot read image /d/a.png: truncated\n"
    )
    assert str(data.DataError(text)) == "cannot read image /d/a.png: truncated"
    assert str(data.DataError("plain message")) == "plain message"
