"""examples/imixer/train.py: every data path, outputs, resume, DDP, bad input, the default command.

Runs use tiny models (``--model-kwargs embed_dim=8 num_blocks=1``) and one or two epochs; most call
``train.main`` in-process, and the CLI-level checks (exit status, one-line errors, torchrun) use
subprocesses. Run folders, the config and crash-safe checkpoints are tested in
``test_imixer_train_runs.py``; flag validation in ``test_imixer_train_flags.py``; logs, solver statistics
and corrupt images in ``test_imixer_train_logs.py``. Those files import the helpers below.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

train = pytest.importorskip("examples.imixer.train")
from examples.imixer import checkpoints  # noqa: E402  (after the importorskip)

SCRIPT = Path(train.__file__).resolve()
# One thread: on a small shared machine two OpenMP threads of tiny matrices wait on each other.
TINY = ["--model-kwargs", "embed_dim=8", "num_blocks=1", "--warmup-epochs", "0", "--threads", "1"]
METRIC_KEYS = {
    "epoch", "lr", "train_loss", "val_top1", "val_top5", "epoch_seconds", "images_per_second",
    "solver_iters_mean", "solver_iters_max", "solver_residual_max", "solver_unconverged",
}  # fmt: skip


@pytest.fixture
def real_plots() -> None:
    """Requested by the tests that check training.png (the others skip drawing it)."""


@pytest.fixture(autouse=True)
def _skip_plots(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Drawing training.png takes about half of a tiny run's time; only tests using ``real_plots`` draw it."""
    if "real_plots" not in request.fixturenames:
        monkeypatch.setattr(train.logs, "plot_training", lambda *args, **kwargs: False)


def run_main(tmp_path: Path, *args: str, name: str = "run") -> tuple[int, Path]:
    """``train.main`` with the tiny model, writing into the run folder ``tmp_path/name``."""
    output = tmp_path / name
    return train.main([*TINY, "--output", str(tmp_path), "--experiment", name, "--no-progress", *args]), output


def checkpoint_files(output: Path, tag: str = "last") -> tuple[Path, Path]:
    """(weights, state) of the run's ``last`` or ``best`` checkpoint, found through its manifest."""
    manifest = json.loads((output / checkpoints.MANIFEST).read_text())
    folder = output / manifest[tag]["path"]
    return folder / checkpoints.WEIGHTS, folder / checkpoints.STATE


def weights(output: Path, tag: str = "last") -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(checkpoint_files(output, tag)[0]))


def saved_state(output: Path, tag: str = "last") -> dict:
    return torch.load(checkpoint_files(output, tag)[1], weights_only=True)


def run_cli(*args: str, cwd: Path, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


# ---------------------------------------------------------------------------------------------------
# Fixtures: a CIFAR-10-format directory and an ImageFolder tree, made on the fly.


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchvision's cifar-10-batches-py layout with 8 images per training batch and 16 test images."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def batch(count: int) -> dict:
        labels = rng.integers(0, 10, count).tolist()
        # Class-dependent brightness so a model can learn something; not needed for the tests.
        images = rng.integers(0, 64, (count, 3072)) + np.repeat(np.array(labels)[:, None] * 19, 3072, axis=1)
        return {"data": images.astype(np.uint8), "labels": labels, "batch_label": "fixture"}

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as handle:
            pickle.dump(batch(16 if name == "test_batch" else 8), handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": 8}, handle)
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DATA_DIR/{train,val}/<class>/*.png with 3 classes, 8 training and 3 validation images each."""
    root = tmp_path_factory.mktemp("folders")
    rng = np.random.default_rng(1)
    for split, count in (("train", 8), ("val", 3)):
        for label in ("ant", "bee", "cat"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def food101_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchvision's food-101 layout (images/<class>/<id>.jpg, meta/{train,test}.json), 2 classes."""
    root = tmp_path_factory.mktemp("food")
    rng = np.random.default_rng(2)
    meta: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for label in ("apple_pie", "ramen"):
        (root / "food-101" / "images" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(
                root / "food-101" / "images" / label / f"{i}.jpg"
            )
            meta["train" if i < 4 else "test"].setdefault(label, []).append(f"{label}/{i}")
    (root / "food-101" / "meta").mkdir()
    for split, entries in meta.items():
        (root / "food-101" / "meta" / f"{split}.json").write_text(json.dumps(entries))
    return root


# ---------------------------------------------------------------------------------------------------
# Training on each data path and the outputs


def test_one_epoch_on_digits_writes_metrics_summary_and_checkpoints(tmp_path: Path, real_plots: None) -> None:
    status, output = run_main(tmp_path, "--epochs", "1")
    assert status == 0
    lines = (output / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and set(json.loads(lines[0])) >= METRIC_KEYS
    summary = json.loads((output / "summary.json").read_text())
    assert summary["model"] == "imixer_t2_8" and summary["epochs"] == 1
    assert 0 <= summary["final_top1"] <= 100 and summary["best_top1"] == summary["final_top1"]
    assert summary["args"]["dataset"] == "digits" and summary["wall_seconds"] > 0
    assert summary["run_dir"] == str(output) and summary["best_epoch"] == 1
    for tag in ("last", "best"):
        assert all(path.is_file() for path in checkpoint_files(output, tag))
    assert checkpoint_files(output, "last") == checkpoint_files(output, "best")  # one folder, referenced twice
    state = saved_state(output)
    assert state["epoch"] == 1 and "optimizer" in state and "rng" in state
    assert list((output / "checkpoints").iterdir()) == [checkpoint_files(output)[0].parent]
    assert not list(output.rglob("*.tmp")), "temporary checkpoint files were left behind"
    for name in ("config.json", "args.yaml", "metrics.csv"):
        assert (output / name).is_file(), name
    assert (output / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_epoch_on_a_cifar10_directory(tmp_path: Path, cifar10_dir: Path) -> None:
    args = ["--dataset", "cifar10", "--data-dir", str(cifar10_dir), "--img-size", "8", "--epochs", "1"]
    args += ["--batch-size", "8", "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--mixup", "0.8"]
    args += ["--cutmix", "1.0", "--smoothing", "0.1", "--drop-path", "0.1", "--model-ema", "--clip-grad", "1.0"]
    status, output = run_main(tmp_path, *args)
    assert status == 0
    metrics = json.loads((output / "metrics.jsonl").read_text())
    assert "ema_val_top1" in metrics and metrics["train_loss"] > 0
    assert saved_state(output)["ema"] is not None


def test_one_epoch_on_cifar100_format_is_rejected_cleanly_without_data(tmp_path: Path, capsys) -> None:
    status, _ = run_main(tmp_path, "--dataset", "cifar100", "--data-dir", str(tmp_path))
    assert status == 2
    assert "cifar-100-python" in capsys.readouterr().err


def test_one_epoch_on_an_image_folder(tmp_path: Path, image_folder: Path) -> None:
    args = ["--dataset", "imagefolder", "--data-dir", str(image_folder), "--img-size", "8", "--epochs", "1"]
    status, output = run_main(tmp_path, *args, "--batch-size", "4", "--amp")
    assert status == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["epochs"] == 1
    assert weights(output)["head.weight"].shape == (3, 8)  # three class folders


def test_one_epoch_on_a_food101_directory(tmp_path: Path, food101_dir: Path) -> None:
    args = ["--dataset", "food101", "--data-dir", str(food101_dir), "--img-size", "8", "--epochs", "1"]
    status, output = run_main(tmp_path, *args, "--batch-size", "4")
    assert status == 0
    assert weights(output)["head.weight"].shape == (2, 8)


def test_vanilla_mixer_trains(tmp_path: Path) -> None:
    """The baseline has no implicit layers: no solver keys (reference mode: test_imixer_train_logs.py)."""
    status, output = run_main(tmp_path, "--model", "mixer_t2_8", "--epochs", "1")
    assert status == 0
    metrics = json.loads((output / "metrics.jsonl").read_text())
    assert metrics["val_top1"] > 0 and not any("iters" in key for key in metrics)
    assert json.loads((output / "config.json").read_text())["model"]["implicit_settings"] is None


def test_the_jacobian_penalty_enters_the_loss_with_its_weight(tmp_path: Path) -> None:
    """Same seed, same Hutchinson draws: only --jacobian-weight differs, so the weights differ only if it counts."""
    flags = ["--epochs", "1", "--jacobian-penalty", "1", "--seed", "3"]
    assert run_main(tmp_path, *flags, "--jacobian-weight", "0", name="off")[0] == 0
    assert run_main(tmp_path, *flags, "--jacobian-weight", "0", name="off-again")[0] == 0
    assert run_main(tmp_path, *flags, "--jacobian-weight", "50", name="on")[0] == 0
    off, again, on = (weights(tmp_path / name) for name in ("off", "off-again", "on"))
    assert all(torch.equal(off[key], again[key]) for key in off)  # the runs are deterministic
    assert any(not torch.equal(off[key], on[key]) for key in off if "implicit" in key)
    config = json.loads((tmp_path / "on" / "config.json").read_text())
    assert config["model"]["implicit_settings"]["jacobian_penalty"] == 1


def test_randaugment_posterize_at_full_magnitude_is_a_black_image_not_an_error() -> None:
    """timm keeps 0 posterize bits at magnitude 10 of "inc1" policies (the recipes' rand-m9-mstd0.5-inc1 reaches it
    through its magnitude noise); Pillow >= 11 raises there, which stopped runs at a random step."""
    from timm.data import auto_augment

    train.data.patch_timm_posterize()
    image = Image.new("RGB", (4, 4), (200, 100, 50))
    black = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(image)
    assert black.mode == "RGB" and np.asarray(black).max() == 0
    two_bits = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5)(image)  # 4 - int(5 / 10 * 4)
    assert np.asarray(two_bits)[0, 0].tolist() == [200 & 0xC0, 100 & 0xC0, 50 & 0xC0]


# ---------------------------------------------------------------------------------------------------
# Resume and checkpoints


class Interrupted(Exception):
    pass


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    common = ["--epochs", "2", "--drop-path", "0.1", "--model-ema"]
    assert run_main(tmp_path, *common, name="straight")[0] == 0

    record_epoch = train.record_epoch

    def crash_after_first_epoch(*args, **kwargs):
        record_epoch(*args, **kwargs)
        raise Interrupted  # as if the process were killed after writing the epoch-1 checkpoint

    monkeypatch.setattr(train, "record_epoch", crash_after_first_epoch)
    with pytest.raises(Interrupted):
        run_main(tmp_path, *common, name="resumed")
    monkeypatch.setattr(train, "record_epoch", record_epoch)
    assert run_main(tmp_path, *common, "--resume", "auto", name="resumed")[0] == 0

    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_eval_only_reloads_the_best_checkpoint_and_reports_its_epoch_and_solver_stats(tmp_path: Path, capsys) -> None:
    status, output = run_main(tmp_path, "--epochs", "2")
    assert status == 0
    history = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    best = max(history, key=lambda entry: entry["val_top1"])
    capsys.readouterr()
    for spec in (output / "best", checkpoint_files(output, "best")[0]):
        assert train.main([*TINY, "--eval-only", "--resume", str(spec), "--output", str(tmp_path / "eval")]) == 0
        out = capsys.readouterr().out
        assert f"(after epoch {best['epoch']}): top-1 {best['val_top1']:.2f}%" in out, out
        # The eval-mode solver statistics of the checkpoint equal those recorded for that epoch.
        assert f"iterations mean/max {best['val_fwd_iters_mean']:.1f}/{best['val_fwd_iters_max']:.0f}" in out
    assert not (tmp_path / "eval").exists()  # --eval-only writes nothing


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    calls = {"n": 0}
    build_loss = train.build_loss

    def loss_that_explodes(*args, **kwargs):
        loss_fn = build_loss(*args, **kwargs)

        def exploding(logits, target):
            calls["n"] += 1
            loss = loss_fn(logits, target)
            return loss * float("nan") if calls["n"] == 25 else loss  # step 3 of epoch 2 (22 steps/epoch)

        return exploding

    monkeypatch.setattr(train, "build_loss", loss_that_explodes)
    status, output = run_main(tmp_path, "--epochs", "2", "--batch-size", "64")
    assert status == 1
    err = capsys.readouterr().err.strip()
    assert "epoch 2, step 3" in err and len(err.splitlines()) == 1 and str(output) in err
    assert saved_state(output)["epoch"] == 1


def _mutate_state(output: Path, change) -> None:
    state_path = checkpoint_files(output)[1]
    state = torch.load(state_path, weights_only=True)
    torch.save(change(state), state_path)


def _without(mapping: dict, key: str) -> dict:
    return {name: value for name, value in mapping.items() if name != key}


DAMAGE = {
    "garbage": lambda out: checkpoint_files(out)[0].write_bytes(b"not a safetensors file"),
    "torn": lambda out: _mutate_state(out, lambda state: {**state, "epoch": 7}),
    "state_not_a_dict": lambda out: torch.save([1, 2, 3], checkpoint_files(out)[1]),
    "state_missing_optimizer": lambda out: _mutate_state(out, lambda state: _without(state, "optimizer")),
    "state_wrong_types": lambda out: _mutate_state(out, lambda state: {**state, "history": [], "rng": {"torch": 1}}),
    "optimizer_of_another_model": lambda out: _mutate_state(out, lambda state: {**state, "optimizer": {"x": 1}}),
    "manifest_garbage": lambda out: (out / checkpoints.MANIFEST).write_text("{not json"),
    "manifest_names_missing_folder": lambda out: (out / checkpoints.MANIFEST).write_text(
        json.dumps({"last": {"epoch": 1, "path": "checkpoints/epoch-0009"}})
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny 1-epoch digits run, copied by the tests that damage it."""
    status, output = run_main(tmp_path_factory.mktemp("finished"), "--epochs", "1")
    assert status == 0
    return output


@pytest.mark.parametrize("damage", [*DAMAGE, "other_model"])
def test_bad_checkpoints_exit_2(tmp_path: Path, capsys, damage: str, finished_run: Path) -> None:
    output = tmp_path / "run"
    shutil.copytree(finished_run, output)
    extra = ["--model-kwargs", "embed_dim=12", "num_blocks=1"] if damage == "other_model" else []
    if damage in DAMAGE:
        DAMAGE[damage](output)
    capsys.readouterr()
    status = train.main([*TINY, *extra, "--output", str(tmp_path), "--experiment", "run", "--resume", "auto",
                         "--epochs", "2", "--no-progress"])  # fmt: skip
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("train.py: error:"), err


# ---------------------------------------------------------------------------------------------------
# Bad input, the CLI and distributed training


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "resnet_nonexistent"], "unknown model"),
        (["--dataset", "mnist"], "unknown --dataset 'mnist'"),
        (["--solver", "newton"], "unknown solver"),
        (["--backward", "adjoint"], "unknown backward"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "cifar-10-batches-py"),
        (["--dataset", "imagefolder", "--data-dir", "/nonexistent"], "DATA_DIR/train/<class>"),
        (["--model", "mixer_t2_8", "--tol", "1e-3"], "imixer_* models only"),
        (["--model-kwargs", "embed_dim"], "key=value"),
        (["--model-kwargs", "no_such_kwarg=1"], "no_such_kwarg"),
        (["--tol", "-1"], "tol"),
        (["--epochs", "two"], "invalid int"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    assert train.main([*args, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_cli_bad_input_has_no_traceback(tmp_path: Path) -> None:
    result = run_cli("--dataset", "cifar10", "--data-dir", str(tmp_path / "missing"), cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_default_command_with_reduced_epochs(tmp_path: Path) -> None:
    """`python examples/imixer/train.py` (the digits iMixer), cut to one epoch, in its default run folder.

    Not a terminal: no tqdm bar; progress lines every --log-interval (50) steps and at the last step, which for
    digits' 11 steps per epoch is the last step alone.
    """
    result = run_cli("--epochs", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "imixer_t2_8 on digits" in result.stdout and "final val top-1" in result.stdout
    (run_dir,) = (tmp_path / "runs" / "imixer").iterdir()
    assert run_dir.name.endswith("-imixer_t2_8-digits") and run_dir.name[:15].replace("-", "").isdigit()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_top1"] > 30  # one epoch of the real recipe is already far above chance
    assert result.stdout.count("Train: 1/1 [") == 1 and "Train: 1/1 [11/11 (100%)]" in result.stdout
    assert "\r" not in result.stdout  # no progress bar in a pipe


def test_ddp_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    """Two processes with batch 16 each (-b is per process) equal one process with batch 32, up to rounding.

    Random augmentation is off: each process draws its own crops, so with it the runs are equal in
    distribution only.

    Reference mode runs a fixed number of iterations, so rounding stays at rounding level. A solve to a
    tolerance would agree only to about that tolerance: a row whose residual lands near tol in one
    run may take one step more or less in the other (matmul rounding depends on the batch shape).
    """
    args = [
        *TINY,
        "--epochs",
        "1",
        "--no-progress",
        "--reference-iterations",
        "2",
        "--no-aug",
        "--output",
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT)]
    result = subprocess.run(
        [*command, *args, "--batch-size", "16", "--experiment", "ddp"], cwd=tmp_path, capture_output=True,
        text=True, timeout=240, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("final val top-1") == 1  # rank 0 logs alone
    assert (tmp_path / "ddp" / "summary.json").is_file()
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["data"]["global_batch_size"] == 32 and config["run"]["world_size"] == 2
    assert train.main([*args, "--batch-size", "32", "--experiment", "single"]) == 0
    ddp, single = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    for key in single:
        if key.endswith("mlp_tokens.fc2.bias"):
            # This bias adds the same value to every channel of a token, which the next LayerNorm (over
            # channels) removes: its true gradient is 0, and AdamW turns the rounding noise left in it
            # into full-size steps of either sign. Any two differently-rounded runs disagree here.
            continue
        torch.testing.assert_close(ddp[key], single[key], atol=1e-6, rtol=1e-5, msg=key)
    ddp_top1 = json.loads((tmp_path / "ddp" / "summary.json").read_text())["final_top1"]
    single_top1 = json.loads((tmp_path / "single" / "summary.json").read_text())["final_top1"]
    assert abs(ddp_top1 - single_top1) < 0.6  # at most two of 360 images flip
