"""examples/imixer/train.py: every data path, outputs, resume, DDP, bad input, the default command.

Runs use tiny models (``--model-kwargs embed_dim=8 num_blocks=1``) and one or two epochs; most call
``train.main`` in-process, and the CLI-level checks (exit status, one-line errors, torchrun) use
subprocesses. Run folders, the config and crash-safe checkpoints are tested in
``test_imixer_train_runs.py``; flag validation in ``test_imixer_train_flags.py``; logs, solver statistics
and corrupt images in ``test_imixer_train_logs.py``. Those files import the helpers below.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from timm.layers import DropPath

train = pytest.importorskip("examples.imixer.train")
from examples.imixer import checkpoints, engine  # noqa: E402  (after the importorskip)
from examples.imixer.data import build_loaders  # noqa: E402

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


@dataclass(repr=False)  # its tensors would flood assertion messages
class Probe:
    """What the steps of one instrumented run (:func:`probe_run`) saw."""

    rng: tuple = ()  # (torch, numpy, python) generator states when the first epoch began
    loader_images: list[torch.Tensor] = field(default_factory=list)  # each batch as the loader gave it
    model_inputs: list[torch.Tensor] = field(default_factory=list)  # ... as the model saw it in training
    loss_targets: list[torch.Tensor] = field(default_factory=list)  # the targets the loss compared with
    losses: list[float] = field(default_factory=list)
    head_dtypes: list[tuple[bool, torch.dtype]] = field(default_factory=list)  # (training?, the head's output dtype)
    dropped_samples: int = 0  # samples whose residual branch drop-path zeroed in training
    step_grad_norms: list[float] = field(default_factory=list)  # the gradient norm each optimizer step applied
    initial_weights: dict[str, torch.Tensor] = field(default_factory=dict)


def probe_run(tmp_path: Path, *args: str, name: str = "run") -> tuple[int, Path, Probe]:
    """:func:`run_main`, recording through train.py's own seams what each training step saw."""
    probe = Probe()
    train_one_epoch, train_step = train.train_one_epoch, train.train_step
    build_model, build_state, build_loss = train.build_model, train.build_state, train.build_loss

    def first_epoch(args, state, *rest):
        if not probe.rng:
            probe.rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        return train_one_epoch(args, state, *rest)

    def step(*args):  # (runtime, state, images, target, loss_fn, mixup, step)
        probe.loader_images.append(args[2].clone())
        return train_step(*args)

    def model(*args, **kwargs):
        built = build_model(*args, **kwargs)
        probe.initial_weights = {key: value.clone() for key, value in built.state_dict().items()}

        def model_input(module, inputs):
            if module.training:
                probe.model_inputs.append(inputs[0].detach().clone())

        def head_output(module, inputs, output):
            probe.head_dtypes.append((module.training, output.dtype))

        def drop_path(module, inputs, output):
            if module.training:
                kept = inputs[0].flatten(1).ne(0).any(1)
                probe.dropped_samples += int((output.flatten(1).eq(0).all(1) & kept).sum())

        built.register_forward_pre_hook(model_input)
        built.get_classifier().register_forward_hook(head_output)
        for module in built.modules():
            if isinstance(module, DropPath):
                module.register_forward_hook(drop_path)
        return built

    def state(*args, **kwargs):
        built = build_state(*args, **kwargs)

        def grad_norm(optimizer, args, kwargs):
            grads = [p.grad.double() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            probe.step_grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

        built.optimizer.register_step_pre_hook(grad_norm)
        return built

    def loss(*args, **kwargs):
        loss_fn = build_loss(*args, **kwargs)

        def recorded(logits, target):
            value = loss_fn(logits, target)
            probe.loss_targets.append(target.detach().clone())
            probe.losses.append(float(value.detach()))
            return value

        return recorded

    with pytest.MonkeyPatch.context() as patch:
        for attribute, replacement in [("train_one_epoch", first_epoch), ("train_step", step), ("build_model", model),
                                       ("build_state", state), ("build_loss", loss)]:  # fmt: skip
            patch.setattr(train, attribute, replacement)
        status, output = run_main(tmp_path, *args, name=name)
    return status, output, probe


def first_batch(argv: list[str], rng: tuple) -> torch.Tensor:
    """The images of the first training batch that the loader of ``argv`` yields from the generator states ``rng``."""
    loaders = build_loaders(train.parse_args(argv), train.Runtime(torch.device("cpu")))
    loaders.train_sampler.set_epoch(0)
    torch.set_rng_state(rng[0])
    np.random.set_state(rng[1])
    random.setstate(rng[2])
    with engine.batches(loaders.train) as iterator:
        return next(iterator)[0]


def _without_flag(argv: list[str], flag: str) -> list[str]:
    index = argv.index(flag)
    return argv[:index] + argv[index + 2 :]


def test_one_epoch_on_a_cifar10_directory_with_every_regulariser(tmp_path: Path, cifar10_dir: Path) -> None:
    """Each flag is seen to act on the run: augmentation on the batches, mixup/cutmix and smoothing on the inputs and
    targets, drop-path on the residual branches, clipping on the gradient applied, the EMA on its weights."""
    data = ["--dataset", "cifar10", "--data-dir", str(cifar10_dir), "--img-size", "8", "--batch-size", "8"]
    augment = [*data, "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25"]
    clip = 0.05
    flags = [*augment, "--epochs", "1", "--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1",
             "--drop-path", "0.1", "--model-ema"]  # fmt: skip
    status, output, probe = probe_run(tmp_path, *flags, "--clip-grad", str(clip))
    assert status == 0 and len(probe.losses) == 5  # 40 images, batches of 8
    metrics = json.loads((output / "metrics.jsonl").read_text())
    assert "ema_val_top1" in metrics and metrics["train_loss"] > 0

    # Augmentation: the loader's first batch, drawn again from the same generator states, is the run's with the
    # flags and another one without either of them.
    assert torch.equal(first_batch([*TINY, *augment], probe.rng), probe.loader_images[0])
    for flag in ("--aa", "--reprob"):
        assert not torch.equal(first_batch([*TINY, *_without_flag(augment, flag)], probe.rng), probe.loader_images[0])

    # Mixup/CutMix: the model sees mixed images and the loss soft targets: two classes share each row of most
    # batches (the pair's labels), and label smoothing leaves 0.1 / 10 on every class.
    assert len(probe.model_inputs) == len(probe.loader_images) == 5
    assert all(
        not torch.equal(seen, given) for seen, given in zip(probe.model_inputs, probe.loader_images, strict=True)
    )
    targets = torch.cat(probe.loss_targets).double()
    assert targets.shape == (40, 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(40, dtype=torch.float64), rtol=0, atol=1e-6)
    assert targets.min() >= 0.01 - 1e-6
    assert int((targets > 0.01 + 0.05).sum(1).eq(2).sum()) >= 10  # rows mixing two labels

    # Drop-path zeroed whole samples' residual branches (0.1 of 2 branches x 40 samples: ~8 expected).
    assert probe.dropped_samples > 0

    # Clipping: every applied gradient is within the bound; the same run without --clip-grad steps with more.
    assert max(probe.step_grad_norms) <= clip * (1 + 1e-4) and len(probe.step_grad_norms) == 5
    status, _, unclipped = probe_run(tmp_path, *flags, name="unclipped")
    assert status == 0 and torch.equal(unclipped.model_inputs[0], probe.model_inputs[0])  # the same first step
    assert min(unclipped.step_grad_norms) > 2 * clip

    # The EMA moved from the initial weights towards the trained ones, but lags them.
    ema = {key.removeprefix("module."): value for key, value in saved_state(output)["ema"].items()}
    final, initial = weights(output), probe.initial_weights
    distance = lambda a, b: sum(float((a[k].double() - b[k].double()).square().sum()) for k in final)  # noqa: E731
    assert distance(ema, initial) > 0 and 0 < distance(ema, final) < distance(initial, final)


def test_one_epoch_on_cifar100_format_is_rejected_cleanly_without_data(tmp_path: Path, capsys) -> None:
    status, _ = run_main(tmp_path, "--dataset", "cifar100", "--data-dir", str(tmp_path))
    assert status == 2
    assert "cifar-100-python" in capsys.readouterr().err


def test_one_epoch_on_an_image_folder_with_amp(tmp_path: Path, image_folder: Path) -> None:
    """--amp on CPU: the model computes in bfloat16 under autocast (training and evaluation), its weights and
    inputs stay float32, and the loss stays finite."""
    args = ["--dataset", "imagefolder", "--data-dir", str(image_folder), "--img-size", "8", "--epochs", "1"]
    status, output, probe = probe_run(tmp_path, *args, "--batch-size", "4", "--amp")
    assert status == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["epochs"] == 1
    assert weights(output)["head.weight"].shape == (3, 8)  # three class folders
    assert len(probe.losses) == 6 and all(math.isfinite(loss) for loss in probe.losses)  # 24 images, batches of 4
    assert {dtype for training, dtype in probe.head_dtypes if training} == {torch.bfloat16}
    assert {dtype for training, dtype in probe.head_dtypes if not training} == {torch.bfloat16}
    assert {images.dtype for images in probe.model_inputs} == {torch.float32}
    assert {tensor.dtype for tensor in weights(output).values()} == {torch.float32}
    assert math.isfinite(json.loads((output / "metrics.jsonl").read_text())["val_loss"])


def test_one_epoch_on_a_food101_directory(tmp_path: Path, food101_dir: Path) -> None:
    args = ["--dataset", "food101", "--data-dir", str(food101_dir), "--img-size", "8", "--epochs", "1"]
    status, output = run_main(tmp_path, *args, "--batch-size", "4")
    assert status == 0
    assert weights(output)["head.weight"].shape == (2, 8)
    data = json.loads((output / "config.json").read_text())["data"]
    assert (data["train_images"], data["val_images"]) == (8, 4)  # the splits of meta/{train,test}.json


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


# Metrics that measure time: they differ between any two runs, and are checked with a fake clock in
# test_imixer_train_runs.py.
WALL_CLOCK_KEYS = {"epoch_seconds", "images_per_second"}
# state.pt entries that name the session (paths, flags, start time) or its time rather than the training.
SESSION_STATE_KEYS = {"args", "config", "wall_seconds"}


def timeless(rows: list[dict]) -> list[dict]:
    """Metrics rows without the wall-clock columns."""
    return [{key: value for key, value in row.items() if key not in WALL_CLOCK_KEYS} for row in rows]


def metric_rows(output: Path) -> tuple[list[dict], list[dict]]:
    """The rows of metrics.jsonl and of metrics.csv (text), without the wall-clock columns."""
    jsonl = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    with open(output / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return timeless(jsonl), timeless(rows)


def assert_identical(expected: object, actual: object, where: str = "") -> None:
    """Bitwise equality of nested dicts, lists and tensors (dtype and shape included)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert (expected.dtype, expected.shape) == (actual.dtype, actual.shape), where
        if not torch.equal(expected, actual):
            raise AssertionError(f"{where}: {(expected != actual).sum().item()} of {expected.numel()} entries differ")
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and expected.keys() == actual.keys(), where
        for key in expected:
            assert_identical(expected[key], actual[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(expected) is type(actual) and len(expected) == len(actual), where
        for index, (left, right) in enumerate(zip(expected, actual, strict=True)):
            assert_identical(left, right, f"{where}[{index}]")
    else:
        assert type(expected) is type(actual) and expected == actual, f"{where}: {expected!r} != {actual!r}"


def assert_same_training(reference: Path, other: Path) -> None:
    """``other`` ended exactly where the run ``reference`` did: the weights, every training-state entry of the
    last checkpoint (optimizer, scheduler, EMA, scaler, RNG, epoch, best top-1, history), and the metrics
    files, the manifest (last and best) and the summary, all bitwise; only wall-clock times and the session's own
    paths and flags may differ."""
    assert_identical(weights(reference), weights(other), "weights")
    assert_identical(weights(reference, "best"), weights(other, "best"), "best weights")
    manifests = [checkpoints.read_manifest(output) for output in (reference, other)]
    assert_identical(*(_without(manifest, "saved_at") for manifest in manifests), "manifest")
    expected, actual = saved_state(reference), saved_state(other)
    assert expected.keys() == actual.keys()
    for key in expected.keys() - SESSION_STATE_KEYS - {"history"}:
        assert_identical(expected[key], actual[key], key)
    assert_identical(timeless(json.loads(expected["history"])), timeless(json.loads(actual["history"])), "history")
    assert_identical(metric_rows(reference), metric_rows(other), "metrics files")
    summaries = [json.loads((output / "summary.json").read_text()) for output in (reference, other)]
    for key in ("epochs", "final_top1", "final_top5", "best_top1", "best_epoch"):
        assert_identical(summaries[0][key], summaries[1][key], f"summary {key}")


def test_resume_reproduces_an_uninterrupted_run_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A run killed during warm-up and resumed ends bitwise where the uninterrupted run does (README: identical on
    CPU): weights, EMA, every AdamW tensor and step count, the schedule, the RNG states and the metrics.

    Every generator is in use: drop-path draws from torch's, Mixup/CutMix from NumPy's, the crops from Python's;
    clipping at 0.05 binds (the gradient norms are about 0.1). The kill comes before step 3 of epoch 2, so the
    two updates and the random draws made since the epoch-1 checkpoint are lost with the process. (A kill right
    after a checkpoint: the crash tests of test_imixer_train_runs.py.)
    """
    common = ["--epochs", "3", "--warmup-epochs", "2", "--model-ema", "--drop-path", "0.1", "--mixup", "0.8",
              "--cutmix", "1.0", "--smoothing", "0.1", "--clip-grad", "0.05"]  # fmt: skip
    assert run_main(tmp_path, *common, name="straight")[0] == 0

    train_step, train_one_epoch = train.train_step, train.train_one_epoch

    def crashing(*args):
        if args[1].epoch == 1 and args[-1] == 2:  # (args, state, ..., step): step 3 of epoch 2
            raise Interrupted
        return train_step(*args)

    with monkeypatch.context() as patch:
        patch.setattr(train, "train_step", crashing)
        with pytest.raises(Interrupted):
            run_main(tmp_path, *common, name="resumed")
    assert saved_state(tmp_path / "resumed")["epoch"] == 1
    capsys.readouterr()
    trained = []

    def counting(args, state, *rest):
        trained.append(state.epoch + 1)
        return train_one_epoch(args, state, *rest)

    monkeypatch.setattr(train, "train_one_epoch", counting)
    assert run_main(tmp_path, *common, "--resume", "auto", name="resumed")[0] == 0
    assert trained == [2, 3] and "after epoch 1" in capsys.readouterr().out  # resumed, not retrained from scratch

    assert_same_training(tmp_path / "straight", tmp_path / "resumed")
    history = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in history] == [1, 2, 3] and "ema_val_top1" in history[-1]
    # The checkpoint was taken half-way through the linear warm-up (11 of 22 updates from 1e-5 to 4e-3).
    assert history[0]["lr"] == pytest.approx(1e-5 + (4e-3 - 1e-5) * 11 / 22, rel=1e-9)
    assert saved_state(tmp_path / "resumed")["ema"]


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
