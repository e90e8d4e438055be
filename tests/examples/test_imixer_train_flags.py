"""examples/imixer/train.py: every flag validated (one line naming the flag, exit 2), timm's flag names, --help.

Most cases fail while parsing (milliseconds); the few that need the data set or the model (class count, patch
size, augmentation policy, optimiser creation) build digits, which is bundled and quick.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from tests.examples.test_imixer_train import TINY, _skip_plots, run_main  # noqa: F401  (_skip_plots: autouse)

train = pytest.importorskip("examples.imixer.train")
from examples.imixer import logs  # noqa: E402
from examples.imixer.imixer import IMixerSettings  # noqa: E402

# (flags, what the one-line message must contain): each names the flag and what it accepts.
BAD_FLAGS = [
    (["--epochs", "0"], "argument --epochs: expected an integer >= 1, got 0"),
    (["--epochs", "2.5"], "argument --epochs: invalid int value '2.5'"),
    (["-b", "0"], "argument -b/--batch-size: expected an integer >= 1, got 0"),
    (["--batch-size", "-4"], "argument -b/--batch-size: expected an integer >= 1"),
    (["--lr", "-1"], "argument --lr: expected a finite number > 0, got -1"),
    (["--lr", "0"], "argument --lr: expected a finite number > 0"),
    (["--lr", "nan"], "argument --lr: expected a finite number > 0, got nan"),
    (["--lr", "inf"], "argument --lr: expected a finite number > 0, got inf"),
    (["--weight-decay", "-1"], "argument --weight-decay: expected a finite number >= 0"),
    (["--clip-grad", "-1"], "argument --clip-grad: expected a finite number > 0, got -1"),
    (["--clip-grad", "0"], "argument --clip-grad: expected a finite number > 0"),
    (["--warmup-epochs", "-1"], "argument --warmup-epochs: expected an integer >= 0"),
    (["--warmup-lr=-1e-5"], "argument --warmup-lr: expected a finite number >= 0, got -1e-5"),
    (["--warmup-lr", "-1e-5"], "argument --warmup-lr: expected one argument"),  # argparse: "-1e-5" looks like a flag
    (["--min-lr", "-1"], "argument --min-lr: expected a finite number >= 0"),
    (["--min-lr", "0.1", "--lr", "0.01"], "--min-lr 0.1 is above --lr 0.01"),
    (["--drop-path", "1"], "argument --drop-path: expected a finite number >= 0 and < 1, got 1"),
    (["--drop-path", "-0.1"], "argument --drop-path: expected a finite number >= 0 and < 1"),
    (["--smoothing", "1.5"], "argument --smoothing: expected a finite number >= 0 and < 1, got 1.5"),
    (["--smoothing", "-0.1"], "argument --smoothing"),
    (["--mixup", "-1"], "argument --mixup: expected a finite number >= 0, got -1"),
    (["--cutmix", "-0.5"], "argument --cutmix: expected a finite number >= 0"),
    (["--mixup", "0.8", "-b", "7"], "need an even --batch-size, got 7"),
    (["--reprob", "5"], "argument --reprob: expected a finite number >= 0 and <= 1, got 5"),
    (["--reprob", "-0.1"], "argument --reprob"),
    (["--hflip", "1.5"], "argument --hflip: expected a finite number >= 0 and <= 1"),
    (["--scale", "0", "1"], "argument --scale: expected a finite number > 0 and <= 1, got 0"),
    (["--scale", "0.5", "1.2"], "argument --scale: expected a finite number > 0 and <= 1, got 1.2"),
    (["--scale", "0.9", "0.5"], "--scale 0.9 0.5: expected MIN MAX with MIN <= MAX"),
    (["--model-ema-decay", "5"], "argument --model-ema-decay: expected a finite number > 0 and < 1, got 5"),
    (["--model-ema-decay", "1"], "argument --model-ema-decay"),
    (["-j", "-1"], "argument -j/--workers: expected an integer >= 0, got -1"),
    (["--workers", "x"], "argument -j/--workers: invalid int value 'x'"),
    (["--threads", "0"], "argument --threads: expected an integer >= 1"),
    (["--seed", "-1"], "argument --seed: expected an integer in [0, 4294967295], got -1"),
    (["--seed", str(2**32)], "argument --seed: expected an integer in [0, 4294967295]"),
    (["--log-interval", "-5"], "argument --log-interval: expected an integer >= 0"),
    (["--img-size", "0"], "argument --img-size: expected an integer >= 1, got 0"),
    (["--num-classes", "0"], "argument --num-classes: expected an integer >= 1, got 0"),
    (["--max-iter", "0"], "argument --max-iter: expected an integer >= 1"),
    (["--tol", "-1"], "argument --tol: expected a finite number >= 0, got -1"),
    (["--tol", "inf"], "argument --tol: expected a finite number >= 0"),
    (["--h-ratio", "0"], "argument --h-ratio: expected a finite number > 0"),
    (["--coeff", "1.5"], "argument --coeff: expected a finite number > 0 and < 1, got 1.5"),
    (["--coeff", "0"], "argument --coeff"),
    (["--n-power", "0"], "argument --n-power: expected an integer >= 1"),
    (["--reference-iterations", "-1"], "argument --reference-iterations: expected an integer >= 0"),
    (
        ["--reference-iterations", "2", "--solver", "broyden"],
        "argument --reference-iterations/--solver: solver='broyden' conflict with reference_iterations=2",
    ),
    (["--backward-solver", "newton"], "unknown backward solver 'newton'"),
    (["--backward-max-iter", "0"], "argument --backward-max-iter: expected an integer >= 1"),
    (["--backward-tol", "-1"], "argument --backward-tol: expected a finite number >= 0"),
    (["--eval-max-iter", "0"], "argument --eval-max-iter: expected an integer >= 1"),
    (["--eval-tol", "nan"], "argument --eval-tol: expected a finite number >= 0"),
    (["--jacobian-penalty", "-1"], "argument --jacobian-penalty: expected an integer >= 0"),
    (["--jacobian-weight", "-0.5"], "argument --jacobian-weight: expected a finite number >= 0"),
    (["--sync-every", "0"], "argument --sync-every: expected an integer >= 1, got 0"),
    (["--opt", "adamx"], "unknown --opt 'adamx'"),
    (["--opt", "ahead_adamw"], "unknown --opt 'ahead_adamw'"),
    (["--sched", "plateau"], "--sched 'plateau' is not supported; choose one of cosine"),
    (["--sched", "zigzag"], "--sched 'zigzag' is not supported"),
    (["--experiment", "a/b"], "--experiment 'a/b' must be a folder name"),
    (["--experiment", ".."], "must be a folder name"),
    (["--eval-only"], "--eval-only needs --resume"),
    (["--dataset", "torch/mnist"], "unknown --dataset 'torch/mnist'"),
]
# Checked after the data set or the model is built.
BAD_BUILD = [
    (["--num-classes", "3"], "--num-classes 3 does not match the 10 classes of digits"),
    (["--num-classes", "12"], "--num-classes 12 does not match the 10 classes of digits"),
    (["--img-size", "7"], "--img-size 7 is not a multiple of imixer_t2_8's patch size 2"),
    (["--aa", "bogus-policy"], "--aa 'bogus-policy'"),
    (["-b", "2000"], "fewer than one batch of 2000 (--batch-size is per process)"),
    (["--model-kwargs", "embed_dim=0"], "cannot build imixer_t2_8"),
]


@pytest.mark.parametrize(
    ("flags", "message"), BAD_FLAGS + BAD_BUILD, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_every_bad_flag_exits_2_with_one_line_naming_it(tmp_path, capsys, flags: list[str], message: str) -> None:
    assert train.main([*flags, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("train.py: error:") and message in err, err
    assert not any(tmp_path.iterdir()), "a rejected command must not create a run folder"


@pytest.mark.parametrize(
    "flags",
    [
        ["--reprob", "1", "--hflip", "0", "--smoothing", "0", "--mixup", "0", "--cutmix", "0"],
        ["--scale", "1", "1", "--drop-path", "0", "--weight-decay", "0", "--warmup-lr", "0", "--min-lr", "0"],
        ["--lr", "1e-5", "--min-lr", "1e-5", "--seed", str(2**32 - 1), "-j", "0", "--log-interval", "0"],
        ["--reference-iterations", "0"],
        ["--tol", "0", "--coeff", "0.999", "--max-iter", "1", "--n-power", "1"],
        ["--opt", "SGD", "--sched", "step", "--model-ema-decay", "0.5", "--clip-grad", "1e-3"],
        ["--opt", "lookahead_adamw", "--sched", "constant"],
    ],
)
def test_boundary_values_are_accepted(flags: list[str]) -> None:
    args = train.parse_args(flags)
    assert args.epochs == 20  # parsed, untouched defaults intact


def test_timm_flag_names_and_dataset_spellings() -> None:
    args = train.parse_args(["-b", "32", "-j", "3", "--dataset", "torch/cifar10", "--dataset-download"])
    assert (args.batch_size, args.workers, args.dataset, args.dataset_download) == (32, 3, "cifar10", True)
    assert train.parse_args(["--download"]).dataset_download  # the former name still works
    spellings = {"TORCH/CIFAR100": "cifar100", "torch/image_folder": "imagefolder", "folder": "imagefolder",
                 "torch/food101": "food101", "cifar10": "cifar10", "digits": "digits"}  # fmt: skip
    for spelling, name in spellings.items():
        assert train.parse_args(["--dataset", spelling]).dataset == name


def test_help_shows_the_defaults() -> None:
    text = " ".join(train.build_parser().format_help().split())  # unwrap argparse's line breaks
    expected_texts = [
        "-b N, --batch-size N batch size per process (global batch: N x processes) (default: 128)",
        "-j N, --workers N", "--lr LR learning rate (default: 0.004)", "(default: runs/imixer)",
        "--dataset-download, --download", "--log-interval N", "(default: 50)", "--experiment NAME",
    ]  # fmt: skip
    for expected in expected_texts:
        assert expected in text, expected
    # The implicit flags (IMixerSettings' fields) show the settings' real defaults, not "None" (they parse to None
    # when not given, so that the model's own defaults apply).
    defaults = IMixerSettings()
    for setting in dataclasses.fields(IMixerSettings):
        flag = "--" + setting.name.replace("_", "-")
        described = text.split(f" {flag} ", 1)[-1] if setting.type != "bool" else text.split(f" {flag}, ", 1)[-1]
        shown = re.search(r"\(default: ([^)]*)\)", described)
        assert shown and shown.group(1) == str(getattr(defaults, setting.name)), (flag, described[:200])


def test_tensorboard_requested_but_not_installed_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(logs, "tensorboard_available", lambda: False)  # as on a machine without it
    assert train.main(["--tensorboard", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install tensorboard" in err


@pytest.mark.skipif(not logs.tensorboard_available(), reason="tensorboard is not installed")
def test_tensorboard_writes_events(tmp_path) -> None:
    """Each epoch's numeric metrics become scalars at that epoch, grouped train/, val/, solver/ ..."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    status, output = run_main(tmp_path, "--epochs", "1", "--tensorboard")
    assert status == 0
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/train_loss", "val/val_top1", "lr/lr", "solver/fwd_iters_mean", "solver/val_fwd_iters_max"} <= tags
    history = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    for tag, key in (("train/train_loss", "train_loss"), ("val/val_top1", "val_top1"), ("lr/lr", "lr")):
        scalars = events.Scalars(tag)
        assert [scalar.step for scalar in scalars] == [1], tag
        # TensorBoard stores float32.
        assert [scalar.value for scalar in scalars] == pytest.approx([entry[key] for entry in history], rel=1e-6)
