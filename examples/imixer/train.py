"""Train and evaluate the iMixer (or a vanilla MLP-Mixer baseline) with timm's training components.

With no arguments it trains ``imixer_t2_8`` on scikit-learn's bundled 8×8 digits (no download) and
prints the final validation top-1 — about 2 minutes on 2 CPU cores. The defaults are that small
recipe; ``examples/imixer/README.md`` lists the CIFAR-10 recipes and the ImageNet-folder run.

    python examples/imixer/train.py                               # iMixer on digits
    python examples/imixer/train.py --model mixer_t2_8            # the vanilla baseline, same recipe
    torchrun --nproc_per_node=4 examples/imixer/train.py --model imixer_s16_224 --dataset torch/cifar10 -b 512 ...

Flags follow timm's ``train.py`` (``-b`` is the batch size *per process*, ``-j`` the loader workers,
``--output`` the parent folder and ``--experiment`` the run folder's name). Each run writes into its own
folder, by default ``runs/imixer/<YYYYmmdd-HHMMSS>-<model>-<dataset>``: ``args.yaml``/``config.json`` (the
resolved config), ``metrics.jsonl``/``metrics.csv`` (one line per epoch), ``summary.json``, ``training.png``
and checkpoints committed through the manifest ``checkpoints.json`` (see :mod:`examples.imixer.checkpoints`).
``--resume auto`` continues the run named by ``--experiment``, or else the latest run under ``--output`` of
the same model, data and implicit settings. Bad input (a flag out of range, unknown names, missing data, a
corrupt image or checkpoint) exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, ParseKwargs, accuracy
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: import the package from the repository root instead
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import implicitlayers as il
from examples.imixer import checkpoints as ckpt
from examples.imixer import data, logs
from examples.imixer import imixer as imixer_model  # noqa: F401  (registers imixer_* and mixer_t* in timm)
from examples.imixer.checkpoints import CheckpointError, atomic_write  # noqa: F401  (convert.py imports them here)

IMPLICIT_FLAGS = {
    "solver": "solver",
    "backward": "backward",
    "max_iter": "max_iter",
    "tol": "tol",
    "h_ratio": "hidden_ratio",
    "coeff": "coeff",
    "n_power": "n_power_iterations",
    "activation": "activation",
    "shine_refine": "shine_refine",
    "compact_rows": "compact_rows",
    "backward_solver": "backward_solver",
    "backward_max_iter": "backward_max_iter",
    "backward_tol": "backward_tol",
    "eval_max_iter": "eval_max_iter",
    "eval_tol": "eval_tol",
    "jacobian_penalty": "jacobian_penalty",
    "sync_every": "sync_every",
    "reference_iterations": "reference_iterations",
}
# The flag that sets each implicit setting, for messages.
SETTING_FLAGS = {kwarg: "--" + flag.replace("_", "-") for flag, kwarg in IMPLICIT_FLAGS.items()}

# The flags that define the learning-rate schedule: a resumed run restores the saved schedule only if they agree.
SCHEDULE_FLAGS = ("sched", "epochs", "warmup_epochs", "warmup_lr", "min_lr", "lr")

# timm schedules that step per update (this script calls step_update every step). "plateau" steps per epoch
# on a metric, "wsd"/"rsqrt" need decay settings this script does not expose.
SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly", "constant")


class UsageError(Exception):
    """Bad command-line input; reported as one line with exit status 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on error; one line is easier to read in logs and CI."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


# ---------------------------------------------------------------------------------------------------
# Command line


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers in ``[low, high]``; anything else is one line naming the flag."""
    accepted = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value {text!r}; expected {accepted}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def float_range(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """An argparse ``type`` accepting finite floats in the interval given (open or closed at each end)."""
    left = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    right = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    accepted = (
        "a finite number"
        + (f" {left}" if left else "")
        + (" and" if left and right else "")
        + (f" {right}" if right else "")
    )

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid float value {text!r}; expected {accepted}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (timm ``train.py`` names); defaults are the digits recipe (see README)."""
    parser = OneLineArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        default="digits",
        metavar="NAME",
        help=f"one of {', '.join(data.DATASETS)}; timm spellings torch/cifar10, torch/cifar100, "
        "torch/food101, torch/image_folder are accepted",
    )
    group.add_argument("--data-dir", default=None, metavar="DIR", help="dataset root (None: only digits needs none)")
    group.add_argument(
        "--dataset-download",
        "--download",
        dest="dataset_download",
        action="store_true",
        help="let torchvision download CIFAR/Food-101 into --data-dir",
    )
    group.add_argument(
        "--num-classes",
        type=int_range(1),
        default=None,
        metavar="N",
        help="classifier outputs; must equal the dataset's classes (None: the dataset's)",
    )
    group.add_argument(
        "--img-size",
        type=int_range(1),
        default=None,
        metavar="N",
        help="input size, a multiple of the patch size (None: the model's)",
    )
    group.add_argument(
        "-j",
        "--workers",
        type=int_range(0),
        default=0,
        metavar="N",
        help="data-loader worker processes per training process",
    )
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default="imixer_t2_8",
        metavar="MODEL",
        help="timm model name (imixer_* or mixer_t* registered by examples.imixer)",
    )
    group.add_argument(
        "--model-kwargs",
        nargs="*",
        default={},
        action=ParseKwargs,
        metavar="KEY=VALUE",
        help="extra timm.create_model keyword arguments",
    )
    group.add_argument(
        "--drop-path", type=float_range(0, 1, high_open=True), default=0.0, metavar="PCT", help="stochastic depth rate"
    )
    implicit = parser.add_argument_group("implicit token mixer (imixer_* models; None: the model's default)")
    implicit.add_argument("--solver", default=None, help=f"one of {', '.join(il.available_solvers())}")
    implicit.add_argument("--backward", default=None, help=f"one of {', '.join(il.GRADIENT_MODES)}")
    implicit.add_argument("--max-iter", type=int_range(1), default=None, metavar="N", help="solver iteration cap")
    implicit.add_argument("--tol", type=float_range(0), default=None, help="relative residual to stop at")
    implicit.add_argument("--h-ratio", type=float_range(0, low_open=True), default=None, help="hidden_ratio H/T")
    implicit.add_argument(
        "--coeff",
        type=float_range(0, 1, low_open=True, high_open=True),
        default=None,
        help="spectral-norm bound of F's layers ((1 - F)^-1 needs Lip(F) < 1)",
    )
    implicit.add_argument(
        "--n-power", type=int_range(1), default=None, metavar="N", help="power iterations per training forward"
    )
    implicit.add_argument(
        "--activation",
        choices=sorted(il.layers.invertible.ACTIVATIONS),
        default=None,
        help="F's activation (None: gelu, the paper's; lipswish certifies Lip(F) < 1)",
    )
    implicit.add_argument(
        "--shine-refine", type=int_range(0), default=None, metavar="N", help="refinement steps of --backward shine"
    )
    implicit.add_argument(
        "--compact-rows",
        action="store_true",
        default=None,
        help="evaluate F only on the rows still iterating once at most half are",
    )
    implicit.add_argument("--backward-solver", default=None, help="solver of the adjoint equation (None: --solver's)")
    implicit.add_argument(
        "--backward-max-iter", type=int_range(1), default=None, metavar="N", help="adjoint iteration cap"
    )
    implicit.add_argument("--backward-tol", type=float_range(0), default=None, help="adjoint tolerance")
    implicit.add_argument(
        "--eval-max-iter", type=int_range(1), default=None, metavar="N", help="iteration cap in evaluation"
    )
    implicit.add_argument("--eval-tol", type=float_range(0), default=None, help="tolerance in evaluation")
    implicit.add_argument(
        "--jacobian-penalty",
        type=int_range(0),
        default=None,
        metavar="N",
        help="Hutchinson samples of the Jacobian penalty ||J_F||_F^2 per forward (0: off)",
    )
    implicit.add_argument(
        "--jacobian-weight",
        type=float_range(0),
        default=1.0,
        metavar="W",
        help="weight of the Jacobian penalty in the loss (with --jacobian-penalty)",
    )
    implicit.add_argument(
        "--sync-every",
        type=int_range(1),
        default=None,
        metavar="N",
        help="solver evaluations per host synchronisation (GPU: chunks CUDA graphs can capture)",
    )
    implicit.add_argument(
        "--reference-iterations",
        type=int_range(0),
        default=None,
        metavar="N",
        help="run the reference loop: N Picard steps, backpropagated through",
    )
    implicit.add_argument(
        "--allow-implicit-mismatch",
        action="store_true",
        help="load a checkpoint trained with other structural implicit settings (warns)",
    )
    group = parser.add_argument_group("optimiser and schedule")
    group.add_argument("--opt", default="adamw", metavar="OPTIMIZER", help="timm optimizer name")
    group.add_argument("--lr", type=float_range(0, low_open=True), default=4e-3, metavar="LR", help="learning rate")
    group.add_argument("--weight-decay", type=float_range(0), default=0.05, help="weight decay")
    group.add_argument(
        "--clip-grad",
        type=float_range(0, low_open=True),
        default=None,
        metavar="NORM",
        help="clip the gradient norm to this value (None: no clipping)",
    )
    group.add_argument("--sched", default="cosine", metavar="SCHEDULER", help=f"one of {', '.join(SCHEDULES)}")
    group.add_argument("--epochs", type=int_range(1), default=20, metavar="N", help="epochs to train")
    group.add_argument("--warmup-epochs", type=int_range(0), default=2, metavar="N", help="linear warm-up epochs")
    group.add_argument("--warmup-lr", type=float_range(0), default=1e-5, metavar="LR", help="warm-up start lr")
    group.add_argument("--min-lr", type=float_range(0), default=1e-5, metavar="LR", help="lower lr bound")
    group.add_argument(
        "-b",
        "--batch-size",
        type=int_range(1),
        default=128,
        metavar="N",
        help="batch size per process (global batch: N x processes)",
    )
    group = parser.add_argument_group("augmentation and regularisation")
    group.add_argument("--no-aug", action="store_true", help="no random training augmentation")
    group.add_argument("--aa", default=None, metavar="NAME", help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    group.add_argument(
        "--reprob", type=float_range(0, 1), default=0.0, metavar="PCT", help="random erasing probability"
    )
    group.add_argument(
        "--scale",
        type=float_range(0, 1, low_open=True),
        nargs=2,
        default=None,
        metavar="PCT",
        help="random-resized-crop scale range (None: (0.8, 1) for digits, timm's (0.08, 1) else)",
    )
    group.add_argument(
        "--hflip",
        type=float_range(0, 1),
        default=None,
        metavar="PROB",
        help="horizontal flip probability (None: 0 for digits, else 0.5)",
    )
    group.add_argument("--smoothing", type=float_range(0, 1, high_open=True), default=0.0, help="label smoothing")
    group.add_argument("--mixup", type=float_range(0), default=0.0, metavar="ALPHA", help="mixup alpha (0: off)")
    group.add_argument("--cutmix", type=float_range(0), default=0.0, metavar="ALPHA", help="cutmix alpha (0: off)")
    group.add_argument("--model-ema", action="store_true", help="keep and evaluate an EMA of the weights")
    group.add_argument(
        "--model-ema-decay",
        type=float_range(0, 1, low_open=True, high_open=True),
        default=0.999,
        help="EMA decay per step",
    )
    group = parser.add_argument_group("device")
    group.add_argument("--amp", action="store_true", help="bf16 autocast on CPU, fp16 + GradScaler on CUDA")
    group.add_argument(
        "--threads",
        type=int_range(1),
        default=None,
        metavar="N",
        help="torch CPU threads (None: 1 for digits on CPU, else torch's)",
    )
    group = parser.add_argument_group("outputs, resume, logging")
    group.add_argument("--seed", type=int_range(0, 2**32 - 1), default=0, help="random seed (all processes)")
    group.add_argument(
        "--output", default=os.path.join("runs", "imixer"), metavar="PATH", help="parent folder of the run folders"
    )
    group.add_argument(
        "--experiment",
        default=None,
        metavar="NAME",
        help="run folder name under --output (None: <YYYYmmdd-HHMMSS>-<model>-<dataset>)",
    )
    group.add_argument(
        "--resume",
        default=None,
        metavar="PATH",
        help="'auto' (the --experiment run, else the latest matching run under --output), a run "
        "folder, RUN/last, RUN/best, a checkpoint folder or a .safetensors file",
    )
    group.add_argument("--eval-only", action="store_true", help="evaluate the --resume checkpoint and exit")
    group.add_argument(
        "--log-interval",
        type=int_range(0),
        default=50,
        metavar="N",
        help="print a progress line every N steps when stdout is not a terminal (0: never)",
    )
    group.add_argument("--no-progress", action="store_true", help="no tqdm bar (progress lines instead)")
    group.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard scalars to RUN/tensorboard (needs the tensorboard package)",
    )
    return parser  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parses and validates the command line; raises :class:`UsageError` for bad input."""
    try:
        args = build_parser().parse_args(argv)
    except ValueError as error:  # ParseKwargs given an item without "="
        raise UsageError(f"bad --model-kwargs item ({error}); use key=value") from None
    if not timm.is_model(args.model):
        raise UsageError(f"unknown model {args.model!r}; e.g. imixer_t2_8, imixer_t4_32, imixer_s16_224, mixer_t2_8")
    dataset = data.canonical(args.dataset)
    if dataset is None:
        raise UsageError(
            f"unknown --dataset {args.dataset!r}; choose one of {', '.join(data.DATASETS)} "
            f"(or timm's {', '.join(name for name in data.DATASET_ALIASES if name.startswith('torch/'))})"
        )
    args.dataset = dataset
    if args.solver is not None and args.solver not in il.available_solvers():
        raise UsageError(f"unknown solver {args.solver!r}; choose one of {', '.join(il.available_solvers())}")
    if args.backward_solver is not None and args.backward_solver not in il.available_solvers():
        raise UsageError(
            f"unknown backward solver {args.backward_solver!r}; choose one of {', '.join(il.available_solvers())}"
        )
    if args.backward is not None and args.backward not in il.GRADIENT_MODES:
        raise UsageError(f"unknown backward {args.backward!r}; choose one of {', '.join(il.GRADIENT_MODES)}")
    if implicit_kwargs(args) and not is_imixer(args.model):
        raise UsageError(f"implicit flags apply to imixer_* models only, not {args.model!r}")
    *prefix, optimizer_name = args.opt.lower().split("_")  # timm accepts a "lookahead_" prefix
    if optimizer_name not in list_optimizers() or prefix not in ([], ["lookahead"]):
        raise UsageError(f"unknown --opt {args.opt!r}; e.g. adamw, sgd, lamb, lion (timm.optim.list_optimizers())")
    if args.sched not in SCHEDULES:
        raise UsageError(f"--sched {args.sched!r} is not supported; choose one of {', '.join(SCHEDULES)} "
                         "(this script steps the schedule every update)")  # fmt: skip
    if args.min_lr > args.lr:
        raise UsageError(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}; the schedule decays from lr to min-lr")
    if args.scale is not None and args.scale[0] > args.scale[1]:
        raise UsageError(f"--scale {args.scale[0]:g} {args.scale[1]:g}: expected MIN MAX with MIN <= MAX")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise UsageError(f"--mixup/--cutmix need an even --batch-size, got {args.batch_size}")
    if args.experiment is not None and (
        args.experiment in ("", ".", "..") or "/" in args.experiment or os.sep in args.experiment
    ):
        raise UsageError(f"--experiment {args.experiment!r} must be a folder name (no path separators)")
    if args.eval_only and not args.resume:
        raise UsageError("--eval-only needs --resume (a checkpoint or 'auto')")
    if args.tensorboard and not logs.tensorboard_available():
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard (or drop the flag)")
    return args


def is_imixer(model_name: str) -> bool:
    """Whether a registered model is an iMixer (takes the implicit flags)."""
    return timm.models.get_pretrained_cfg(model_name).architecture.startswith("imixer")


def implicit_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The implicit flags that were given, as IMixer keyword arguments."""
    return {kwarg: getattr(args, flag) for flag, kwarg in IMPLICIT_FLAGS.items() if getattr(args, flag) is not None}


# ---------------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class Runtime:
    """Where this process runs: device, rank and world size."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_runtime() -> Runtime:
    """Initialises DDP when launched by torchrun (nccl on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available()
    if world_size == 1:
        return Runtime(torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Runtime(device, dist.get_rank(), dist.get_world_size())


def set_threads(args: argparse.Namespace, runtime: Runtime) -> None:
    """One CPU thread for digits: its matrices are tiny, and on a shared 2-core machine two OpenMP
    threads waiting on each other made a training step 5x slower (measured: 2.6 s vs 0.47 s)."""
    threads = args.threads or (1 if args.dataset == "digits" and runtime.device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (every process the same: DDP must start from one model)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# Data


@dataclass
class Loaders:
    """The data loaders and what the model must be built for."""

    train: DataLoader
    val: DataLoader
    train_sampler: DistributedSampler
    num_classes: int
    in_chans: int
    img_size: int
    train_images: int
    val_images: int


def build_loaders(args: argparse.Namespace, runtime: Runtime) -> Loaders:
    """timm transforms at ``--img-size`` over the chosen dataset, sharded over DDP processes.

    Each process loads ``--batch-size`` images per step (timm's convention), so the global batch is
    ``batch_size × world_size``. The training sampler is a DistributedSampler even in one process, so one
    process with batch 2B and two processes with batch B each see the same samples in every step: without
    random augmentation, drop-path or mixup the results are the same up to float rounding (with them, each
    process draws its own random numbers, so the runs are equivalent in distribution, not bit for bit).
    """
    cfg = timm.models.get_pretrained_cfg(args.model)
    img_size = args.img_size if args.img_size is not None else cfg.input_size[-1]
    in_chans = 1 if args.dataset == "digits" else 3
    mean, std = (cfg.mean[0],) * in_chans, (cfg.std[0],) * in_chans
    # Digits are not mirror-symmetric and only 8 pixels wide: no flips, mild crops.
    hflip = args.hflip if args.hflip is not None else (0.0 if args.dataset == "digits" else 0.5)
    scale = tuple(args.scale) if args.scale else ((0.8, 1.0) if args.dataset == "digits" else None)
    common = {"input_size": (in_chans, img_size, img_size), "interpolation": cfg.interpolation, "mean": mean}
    if args.aa:
        data.patch_timm_posterize()  # timm + Pillow >= 11 raise on 0 posterize bits mid-training otherwise
    try:
        train_tf = create_transform(
            **common, std=std, is_training=True, no_aug=args.no_aug, hflip=hflip, scale=scale,
            auto_augment=args.aa, re_prob=args.reprob, re_mode="pixel", color_jitter=0.0 if in_chans == 1 else 0.4,
            crop_pct=1.0,
        )  # fmt: skip
    except (AssertionError, ValueError, KeyError, IndexError) as error:  # timm asserts on an unknown policy
        where = f"--aa {args.aa!r}" if args.aa else "the training transform"
        raise UsageError(f"{where}: {_first_line(error)} (e.g. rand-m9-mstd0.5-inc1, augmix, original)") from None
    eval_tf = create_transform(**common, std=std, is_training=False, crop_pct=cfg.crop_pct)
    splits = data.build_datasets(args.dataset, args.data_dir, train_tf, eval_tf, download=args.dataset_download)
    if args.num_classes is not None and args.num_classes != splits.num_classes:
        raise UsageError(f"--num-classes {args.num_classes} does not match the {splits.num_classes} classes of "
                         f"{args.dataset} (omit --num-classes to use the dataset's)")  # fmt: skip
    per_process = args.batch_size
    sampler = DistributedSampler(splits.train, runtime.world_size, runtime.rank, shuffle=True, seed=args.seed)
    if len(sampler) < per_process:
        raise data.DataError(
            f"{len(splits.train)} training images give {len(sampler)} per process, fewer than one batch of "
            f"{per_process} (--batch-size is per process)"
        )
    loader_args = {"num_workers": args.workers, "pin_memory": runtime.device.type == "cuda"}
    train = DataLoader(splits.train, per_process, sampler=sampler, drop_last=True, **loader_args)
    # Evaluation shards without padding (DistributedSampler would repeat samples); counts are summed.
    val_shard = Subset(splits.val, range(runtime.rank, len(splits.val), runtime.world_size))
    val = DataLoader(val_shard, max(per_process, 64), shuffle=False, **loader_args)
    return Loaders(train, val, sampler, splits.num_classes, in_chans, img_size, len(splits.train), len(splits.val))


# ---------------------------------------------------------------------------------------------------
# Model, optimiser, schedule


def build_model(args: argparse.Namespace, loaders: Loaders) -> nn.Module:
    """``timm.create_model`` with the dataset's classes, channels and size, and the implicit flags."""
    try:
        model = timm.create_model(
            args.model,
            num_classes=loaders.num_classes,
            in_chans=loaders.in_chans,
            img_size=loaders.img_size,
            drop_path_rate=args.drop_path,
            **{**args.model_kwargs, **implicit_kwargs(args)},
        )
    except (ValueError, TypeError, AssertionError, RuntimeError, ZeroDivisionError) as error:
        # The layers name a bad setting (ValueError); TypeError: an unknown kwarg; the others: impossible shapes
        # from --model-kwargs (e.g. embed_dim=0).
        raise UsageError(f"cannot build {args.model}: {_first_line(error)}") from None
    patch = getattr(getattr(model, "stem", None), "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    if isinstance(patch, int) and loaders.img_size % patch:
        raise UsageError(f"--img-size {loaders.img_size} is not a multiple of {args.model}'s patch size {patch}")
    return model


@dataclass
class TrainState:
    """Everything that changes during training (and is checkpointed)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    ema: ModelEmaV3 | None
    epoch: int = 0
    best_top1: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0  # training time summed over all sessions, up to the last completed epoch


def build_state(args: argparse.Namespace, model: nn.Module, updates_per_epoch: int, device: torch.device) -> TrainState:
    """Optimiser, per-step schedule, AMP scaler and EMA from timm."""
    try:
        optimizer = create_optimizer_v2(model, args.opt, lr=args.lr, weight_decay=args.weight_decay)
    except (ImportError, ValueError, AssertionError, RuntimeError, TypeError) as error:
        raise UsageError(f"--opt {args.opt!r} cannot be created here: {_first_line(error)}") from None
    scheduler, _ = create_scheduler_v2(
        optimizer, args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
        min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=updates_per_epoch,
    )  # fmt: skip
    # fp16 needs loss scaling; bf16 (the CPU choice) has fp32's range and does not.
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    return TrainState(model, optimizer, scheduler, scaler, ema)


def autocast(args: argparse.Namespace, device: torch.device) -> Any:
    """bf16 autocast on CPU, fp16 on CUDA (with the scaler); a no-op without ``--amp``."""
    if not args.amp:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def build_loss(args: argparse.Namespace, mixup: Mixup | None) -> nn.Module:
    """timm's soft-target loss under mixup (which already smooths), label smoothing, or plain CE."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(args.smoothing)
    return nn.CrossEntropyLoss()


def build_mixup(args: argparse.Namespace, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix, or None when both alphas are 0."""
    if args.mixup <= 0 and args.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing, num_classes=num_classes
    )


# ---------------------------------------------------------------------------------------------------
# Training and evaluation


class NonFiniteLoss(Exception):
    """The loss became NaN/inf; the message names the epoch and step."""


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@dataclass
class EpochMeter:
    """Running sums of one training epoch (this process's shard)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    samples: int = 0
    last_loss: float = math.nan

    def update(self, loss: Tensor, logits: Tensor, target: Tensor) -> None:
        batch = target.shape[0]
        self.last_loss = float(loss)
        self.loss_sum += self.last_loss * batch
        hard = target.argmax(dim=1) if target.dim() == 2 else target
        self.correct += float((logits.argmax(dim=1) == hard).sum())
        self.samples += batch

    def loss(self) -> float:
        return self.loss_sum / max(self.samples, 1)

    def acc(self) -> float:
        return 100.0 * self.correct / max(self.samples, 1)


def train_step(
    args: argparse.Namespace, state: TrainState, images: Tensor, target: Tensor, loss_fn: nn.Module,
    mixup: Mixup | None, runtime: Runtime, step: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """One optimisation step on one batch: mixup, forward, finiteness check, backward, clip, step, EMA.

    Returns:
        ``(loss, logits, target)``, detached; ``target`` as used by the loss (soft under mixup).
    """
    images, target = images.to(runtime.device, non_blocking=True), target.to(runtime.device, non_blocking=True)
    if mixup is not None:
        images, target = mixup(images, target)
    with autocast(args, runtime.device):
        logits = state.model(images)
        loss = loss_fn(logits, target)
        jacobian_loss = getattr(unwrap(state.model), "jacobian_loss", lambda: None)()
        if jacobian_loss is not None:
            loss = loss + args.jacobian_weight * jacobian_loss
    check_finite(loss, state.epoch, step, runtime)
    backward_and_step(args, state, loss)
    return loss.detach(), logits.detach(), target


def train_one_epoch(
    args: argparse.Namespace, state: TrainState, loaders: Loaders, runtime: Runtime, loss_fn: nn.Module,
    mixup: Mixup | None,
) -> dict[str, Any]:  # fmt: skip
    """One pass over the training set; returns the epoch's training metrics (this process's shard).

    Progress: a tqdm bar on a terminal; otherwise (nohup, SLURM, ``--no-progress``) one line every
    ``--log-interval`` steps and at the last step.
    """
    model = state.model
    model.train()
    loaders.train_sampler.set_epoch(state.epoch)
    meter, solver = EpochMeter(), logs.SolverMeter(len(logs.implicit_layers(model)), runtime.device)
    start = last_time = time.time()
    last_step = 0
    steps = len(loaders.train)
    updates = state.epoch * steps
    show_bar = runtime.is_main and not args.no_progress and sys.stdout.isatty()
    print_steps = runtime.is_main and not show_bar and args.log_interval > 0
    with batches(loaders.train) as iterator:
        bar = tqdm(iterator, desc=f"epoch {state.epoch + 1}/{args.epochs}", disable=not show_bar, leave=False,
                   total=steps)  # fmt: skip
        for step, (images, target) in enumerate(bar):
            loss, logits, soft_target = train_step(args, state, images, target, loss_fn, mixup, runtime, step)
            updates += 1
            state.scheduler.step_update(num_updates=updates)
            meter.update(loss, logits, soft_target)
            solver.add(model, "forward")
            solver.add(model, "backward")
            if show_bar:
                bar.set_postfix(loss=f"{meter.loss():.3f}", acc=f"{meter.acc():.1f}")
            if print_steps and ((step + 1) % args.log_interval == 0 or step + 1 == steps):
                now = time.time()
                per_step = (now - last_time) / (step + 1 - last_step)
                log(runtime, logs.step_record(
                    epoch=state.epoch + 1, epochs=args.epochs, step=step + 1, steps=steps, loss=meter.last_loss,
                    loss_avg=meter.loss(), lr=state.optimizer.param_groups[0]["lr"], seconds_per_step=per_step,
                    images_per_second=args.batch_size * runtime.world_size / per_step,
                    solver=solver.metrics(["forward", "backward"]),
                ))  # fmt: skip
                last_time, last_step = now, step + 1
        bar.close()
    seconds = time.time() - start
    metrics = {"train_loss": meter.loss(), "train_top1": meter.acc(), "epoch_seconds": seconds}
    metrics["images_per_second"] = meter.samples * runtime.world_size / seconds
    solver_metrics = solver.metrics(["forward", "backward"])
    if solver_metrics:  # the keys of earlier versions: the training forward's statistics over the blocks
        metrics.update({
            "solver_iters_mean": solver_metrics["fwd_iters_mean"],
            "solver_iters_max": solver_metrics["fwd_iters_max"],
            "solver_residual_max": solver_metrics["fwd_residual_max"],
            "solver_unconverged": solver_metrics["fwd_unconverged"],
        })  # fmt: skip
    metrics.update(solver_metrics)
    return metrics


@contextmanager
def batches(loader: DataLoader) -> Iterator[Iterator[Any]]:
    """The loader's iterator, whose worker processes are shut down as soon as the loop ends, however it ends.

    A loop left by an exception (a corrupt image, a non-finite loss) otherwise keeps the workers until the
    garbage collector finds the iterator, and shutting them down from there waited 5 s per worker here.
    """
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # multi-process iterators only; safe to repeat
        if shutdown is not None:
            shutdown()


def check_finite(loss: Tensor, epoch: int, step: int, runtime: Runtime) -> None:
    """Raises :class:`NonFiniteLoss` on every process if any process's loss is not finite."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach())) else 1.0], device=runtime.device)
    if runtime.distributed:  # all processes must stop together, or the others hang in the next all-reduce
        dist.all_reduce(bad)
    if float(bad) > 0:
        raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1}, step {step + 1}")


def backward_and_step(args: argparse.Namespace, state: TrainState, loss: Tensor) -> None:
    """Backward (scaled under fp16), optional gradient clipping, optimiser step, EMA update."""
    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler is not None:
        state.scaler.scale(loss).backward()
        state.scaler.unscale_(state.optimizer)
    else:
        loss.backward()
    if args.clip_grad is not None:
        nn.utils.clip_grad_norm_(state.model.parameters(), args.clip_grad)
    if state.scaler is not None:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    if state.ema is not None:
        state.ema.update(unwrap(state.model))


@torch.no_grad()
def evaluate(
    args: argparse.Namespace, model: nn.Module, loader: DataLoader, runtime: Runtime, solver_stats: bool = True
) -> dict[str, float]:
    """Top-1/top-5 (percent), loss and (for iMixers) each block's eval-mode solver statistics over the whole
    validation set, summed over processes (``val_fwd_*`` keys, see :meth:`logs.SolverMeter.metrics`)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)  # loss, top1, top5, samples
    solver = logs.SolverMeter(len(logs.implicit_layers(model)), runtime.device)
    with batches(loader) as iterator:
        for images, target in iterator:
            images, target = images.to(runtime.device), target.to(runtime.device)
            with autocast(args, runtime.device):
                logits = model(images)
            if solver_stats:
                solver.add(model, "eval")
            logits = logits.float()
            top1, top5 = accuracy(logits, target, topk=(1, min(5, logits.shape[1])))
            batch = target.shape[0]
            loss = nn.functional.cross_entropy(logits, target, reduction="sum")
            totals += torch.stack([loss.double(), top1.double() * batch / 100, top5.double() * batch / 100,
                                   torch.tensor(batch, dtype=torch.float64, device=runtime.device)])  # fmt: skip
    if runtime.distributed:
        dist.all_reduce(totals)
    loss, top1, top5, samples = totals.tolist()
    metrics = {"val_loss": loss / samples, "val_top1": 100 * top1 / samples, "val_top5": 100 * top5 / samples}
    if solver_stats:
        solver.reduce(runtime.distributed)
        metrics.update(solver.metrics(["eval"]))
    return metrics


# ---------------------------------------------------------------------------------------------------
# Checkpoints and the run folder


def run_identity(args: argparse.Namespace, model: nn.Module, loaders: Loaders) -> dict[str, Any]:
    """What makes two runs continuations of each other: ``--resume auto`` only picks a run with the same."""
    return {
        "model": args.model,
        "dataset": args.dataset,
        "data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None,
        "img_size": loaders.img_size,
        "model_kwargs": {key: repr(value) for key, value in sorted(args.model_kwargs.items())},
        "implicit": getattr(model, "implicit_settings", None),
    }


def resolved_config(
    args: argparse.Namespace, model: nn.Module, loaders: Loaders, runtime: Runtime, run_dir: Path | None,
    resumed_from: str | None,
) -> dict[str, Any]:  # fmt: skip
    """All flags, the model's resolved settings, the data, the versions and the seed: ``args.yaml``/``config.json``
    and the ``config`` stored in every checkpoint."""
    config = {
        "args": vars(args),
        "seed": args.seed,
        "model": {
            "name": args.model,
            "architecture": timm.models.get_pretrained_cfg(args.model).architecture,
            "num_classes": loaders.num_classes,
            "in_chans": loaders.in_chans,
            "img_size": loaders.img_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "implicit_settings": getattr(model, "implicit_settings", None),
        },
        "data": {
            "dataset": args.dataset,
            "train_images": loaders.train_images,
            "val_images": loaders.val_images,
            "batch_size_per_process": args.batch_size,
            "global_batch_size": args.batch_size * runtime.world_size,
            "steps_per_epoch": len(loaders.train),
        },
        "run": {
            "dir": str(run_dir) if run_dir is not None else None,
            "started": datetime.now().isoformat(timespec="seconds"),
            "resumed_from": resumed_from,
            "world_size": runtime.world_size,
            "device": str(runtime.device),
            "command": " ".join(sys.argv),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "implicitlayers": il.__version__,
            "numpy": np.__version__,
        },
    }
    return json.loads(json.dumps(config, default=repr))  # plain JSON types (tuples → lists), for YAML too


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """``config.json`` always; ``args.yaml`` (timm's name) when PyYAML is importable (timm depends on it)."""
    ckpt.atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2) + "\n")
    try:
        import yaml
    except ImportError:
        return
    ckpt.atomic_write_text(run_dir / "args.yaml", yaml.safe_dump(config, sort_keys=False, default_flow_style=False))


def save_checkpoint(
    run_dir: Path, state: TrainState, args: argparse.Namespace, config: dict[str, Any], identity: dict[str, Any],
    is_best: bool,
) -> Path:  # fmt: skip
    """Commits a checkpoint of ``state`` as ``last`` (and ``best``) through the run's manifest.

    Weights go to ``model.safetensors`` with metadata (epoch, model, val top-1, the config as JSON), the rest
    to ``state.pt`` (read back with ``weights_only=True``); see :func:`checkpoints.commit_checkpoint`.
    """
    model = unwrap(state.model)
    config_text = json.dumps(config)
    training_state = {
        "epoch": state.epoch,
        "best_top1": state.best_top1,
        "wall_seconds": state.wall_seconds,
        "history": json.dumps(state.history),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "ema": state.ema.state_dict() if state.ema is not None else None,
        "rng": {"torch": torch.get_rng_state(), "numpy": json.dumps(_numpy_rng()), "python": repr(random.getstate())},
        "args": json.dumps(vars(args), default=repr),
        "config": config_text,
    }
    if torch.cuda.is_available():
        training_state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    weights = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    val_top1 = state.history[-1]["val_top1"] if state.history else math.nan
    metadata = {"epoch": str(state.epoch), "model": args.model, "val_top1": repr(val_top1), "config": config_text}
    return ckpt.commit_checkpoint(
        run_dir, epoch=state.epoch, weights=weights, metadata=metadata, training_state=training_state,
        identity=identity, is_best=is_best, best_top1=state.best_top1,
    )  # fmt: skip


def _numpy_rng() -> list[Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), pos, has_gauss, cached]


def locate_run(args: argparse.Namespace, identity: dict[str, Any]) -> tuple[Path, ckpt.CheckpointRef | None]:
    """The run folder to write into (created) and the checkpoint to resume from, if any.

    * ``--experiment NAME``: the folder ``OUTPUT/NAME``. ``--resume auto`` continues it when it holds a committed
      checkpoint and starts it otherwise; without ``--resume`` a folder that already holds a run is refused
      (runs never overwrite each other).
    * no ``--experiment``: ``--resume auto`` continues the latest run under ``OUTPUT`` with the same model,
      data, image size, model kwargs and implicit settings; otherwise (or when there is none) a new folder
      ``OUTPUT/<YYYYmmdd-HHMMSS>-<model>-<dataset>`` is created.
    * ``--resume PATH`` loads that checkpoint and writes into the folder chosen as above.

    Raises:
        CheckpointError: The named run folder holds a run and would be overwritten, or the checkpoint is unusable.
    """
    parent = Path(args.output)
    resume_path = args.resume if args.resume not in (None, "auto") else None
    ref = ckpt.resolve_checkpoint(resume_path) if resume_path else None
    if args.experiment:
        run_dir = parent / args.experiment
        manifest = ckpt.read_manifest(run_dir) if run_dir.is_dir() else None
        if args.resume == "auto" and manifest is not None:
            ref = ckpt.resolve_checkpoint(run_dir)
        elif manifest is not None and not (ref is not None and _inside(ref.weights, run_dir)):
            raise CheckpointError(
                f"{run_dir} already holds a run (epoch {manifest['last'].get('epoch')}): continue it with "
                "--resume auto, or choose another --experiment"
            )
        return ckpt.claim_run_dir(parent, args.experiment, unique=False), ref
    if args.resume == "auto":
        found = ckpt.find_latest_run(parent, identity)
        if found is not None:
            return found, ckpt.resolve_checkpoint(found)
    name = ckpt.default_experiment_name(args.model, args.dataset)
    return ckpt.claim_run_dir(parent, name, unique=True), ref


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def checkpoint_to_evaluate(args: argparse.Namespace, identity: dict[str, Any]) -> ckpt.CheckpointRef:
    """The checkpoint ``--eval-only`` reads: ``--resume PATH``, or for ``auto`` the run :func:`locate_run` would
    continue (nothing is created)."""
    if args.resume != "auto":
        return ckpt.resolve_checkpoint(args.resume)
    parent = Path(args.output)
    run_dir = parent / args.experiment if args.experiment else ckpt.find_latest_run(parent, identity)
    if run_dir is None or ckpt.read_manifest(run_dir) is None:
        where = run_dir if run_dir is not None else f"{parent} (for {args.model} on {args.dataset} with these settings)"
        raise CheckpointError(f"--resume auto found no checkpoint to evaluate in {where}")
    return ckpt.resolve_checkpoint(run_dir)


def check_compatible(ref: ckpt.CheckpointRef, args: argparse.Namespace, model: nn.Module, runtime: Runtime) -> None:
    """Compares the checkpoint's implicit settings (stored config, or convert.py's metadata) with this model's.

    Structural differences (reference loop vs solve, hidden_ratio, coeff: another function) refuse the
    checkpoint unless ``--allow-implicit-mismatch``; numerical ones (solver, tolerance, budget, gradient mode,
    power iterations) and a different model name print one warning line.

    Raises:
        CheckpointError: A structural mismatch.
    """
    metadata, config = ref.metadata(), ref.config()
    saved = ckpt.saved_implicit_settings(metadata, config)
    structural, numerical = ckpt.implicit_mismatches(saved, getattr(unwrap(model), "implicit_settings", None))
    if structural and not args.allow_implicit_mismatch:
        flags = ", ".join(_flag_for(key, saved[key]) for key in ckpt.STRUCTURAL_SETTINGS if key in saved
                          and any(text.startswith(f"{key} ") for text in structural))  # fmt: skip
        raise CheckpointError(
            f"{ref.label} was trained with other implicit settings: {'; '.join(structural)}; pass the same flags "
            f"({flags}) or --allow-implicit-mismatch to load it anyway"
        )
    notes = structural + numerical
    saved_model = metadata.get("model")
    if saved_model and saved_model != args.model:
        notes.append(f"model {saved_model} (checkpoint) vs {args.model} (now)")
    if notes:
        warn(runtime, f"{ref.label} differs from this run: {'; '.join(notes)}")


def _flag_for(key: str, value: Any) -> str:
    flag = SETTING_FLAGS.get(key, key)
    return f"no {flag}" if value is None else f"{flag} {value}"


def load_checkpoint(ref: ckpt.CheckpointRef, args: argparse.Namespace, state: TrainState, runtime: Runtime) -> None:
    """Restores the weights and the whole training state from ``ref`` into ``state``.

    Raises:
        CheckpointError: Missing, unreadable, torn, mismatched or malformed checkpoint.
    """
    check_compatible(ref, args, state.model, runtime)
    metadata = ref.metadata()
    load_weights(ref, args, state.model)
    saved = ref.load_state()
    _validate_training_state(saved, ref.state)
    if str(saved["epoch"]) != metadata.get("epoch"):
        raise CheckpointError(f"{ref.state} (epoch {saved['epoch']}) and its weights (epoch "
                              f"{metadata.get('epoch')}) differ: the checkpoint is torn")  # fmt: skip
    try:
        state.optimizer.load_state_dict(saved["optimizer"])
        # timm schedules are functions of the update count, which resumes with the epoch. Restoring the saved
        # one matters only for the same plan (timm's load_state_dict copies attributes, whatever the class); with
        # another --epochs, --sched or lr setting the fresh schedule takes over at the same update count.
        saved_args = json.loads(saved["args"])
        if all(saved_args.get(key) == getattr(args, key) for key in SCHEDULE_FLAGS):
            state.scheduler.load_state_dict(saved["scheduler"])
        if state.scaler is not None and saved["scaler"] is not None:
            state.scaler.load_state_dict(saved["scaler"])
        if state.ema is not None and saved["ema"] is not None:
            state.ema.load_state_dict(saved["ema"])
        history = json.loads(saved["history"])
        restore_rng(saved["rng"])
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError, SyntaxError) as error:
        raise CheckpointError(f"{ref.state} does not match this run: {_first_line(error)}") from None
    if not isinstance(history, list):
        raise CheckpointError(f"{ref.state}: its history is not a list of epochs")
    state.epoch, state.best_top1 = int(saved["epoch"]), float(saved["best_top1"])
    state.history = history
    state.wall_seconds = float(saved.get("wall_seconds", 0.0))


# What state.pt must hold, and the types (checked before anything is restored).
STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "epoch": (int,),
    "best_top1": (float, int),
    "history": (str,),
    "optimizer": (dict,),
    "scheduler": (dict,),
    "scaler": (dict, type(None)),
    "ema": (dict, type(None)),
    "rng": (dict,),
    "args": (str,),
}


def _validate_training_state(saved: dict[str, Any], path: Path | None) -> None:
    for key, types in STATE_FIELDS.items():
        if key not in saved:
            raise CheckpointError(f"{path} is not a training state of this script: no {key!r} entry")
        if not isinstance(saved[key], types) or isinstance(saved[key], bool):
            raise CheckpointError(f"{path}: {key!r} is a {type(saved[key]).__name__}, not a training-state entry")
    rng = saved["rng"]
    if (
        not isinstance(rng.get("torch"), Tensor)
        or not isinstance(rng.get("numpy"), str)
        or not isinstance(rng.get("python"), str)
    ):
        raise CheckpointError(f"{path}: 'rng' does not hold the torch, numpy and python generator states")


def load_weights(ref: ckpt.CheckpointRef, args: argparse.Namespace, model: nn.Module) -> None:
    """Loads the weights strictly into the (unwrapped) model."""
    weights = ref.load_weights()
    try:
        unwrap(model).load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"{ref.weights} does not match model {args.model}: {_first_line(error)}") from None


def restore_rng(rng: dict[str, Any]) -> None:
    """Puts the random generators back where the checkpointed run had them."""
    torch.set_rng_state(rng["torch"])
    kind, keys, pos, has_gauss, cached = json.loads(rng["numpy"])
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = _parse_python_rng(rng["python"])
    random.setstate((version, internal, gauss))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _parse_python_rng(text: str) -> tuple[int, tuple[int, ...], float | None]:
    return ast.literal_eval(text)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------------
# Driver


def log(runtime: Runtime, message: str) -> None:
    """Prints on rank 0 only."""
    if runtime.is_main:
        print(message, flush=True)


def warn(runtime: Runtime, message: str) -> None:
    """One warning line on stderr, rank 0 only."""
    if runtime.is_main:
        print(f"train.py: warning: {message}", file=sys.stderr, flush=True)


def describe(model: nn.Module) -> str:
    """One line naming the model, its size and its token-mixer settings."""
    params = sum(p.numel() for p in model.parameters())
    text = f"{params:,} parameters"
    settings = getattr(model, "implicit_settings", None)
    if settings:
        keys = ("solver", "backward", "tol", "max_iter", "coeff", "n_power_iterations", "hidden_ratio")
        text += ", token mixer: " + ", ".join(f"{key}={settings[key]}" for key in keys)
        if settings["reference_iterations"] is not None:
            text += f", reference_iterations={settings['reference_iterations']}"
        text += f" (Lipschitz bound of F: {il.lipschitz_bound(model.implicit_layers()[0].g):.3f})"
    return text


def describe_solver(metrics: dict[str, Any], prefix: str) -> str:
    """``iters 4.0/6 per block 4.0/5 3.9/6 ...`` for one phase's metrics (empty for the vanilla Mixer)."""
    if f"{prefix}_iters_mean" not in metrics:
        return ""
    blocks = sorted(int(key.rsplit("_b", 1)[1]) for key in metrics if key.startswith(f"{prefix}_iters_b"))
    per_block = " ".join(f"{metrics[f'{prefix}_iters_b{b}']:.1f}/{metrics[f'{prefix}_iters_max_b{b}']:.0f}"
                         for b in blocks)  # fmt: skip
    return (f"iterations mean/max {metrics[f'{prefix}_iters_mean']:.1f}/{metrics[f'{prefix}_iters_max']:.0f} "
            f"(per block {per_block}), unconverged {metrics[f'{prefix}_unconverged']:.1%}, "
            f"max residual {metrics[f'{prefix}_residual_max']:.2e}")  # fmt: skip


def share_from_rank0(runtime: Runtime, compute: Callable[[], Any]) -> Any:
    """Runs ``compute`` on rank 0 only and gives every process its result (or its CheckpointError)."""
    if not runtime.distributed:
        return compute()
    box: list[Any] = [None]
    if runtime.is_main:
        try:
            box[0] = ("ok", compute())
        except CheckpointError as error:
            box[0] = ("error", str(error))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise CheckpointError(value)
    return value


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Builds everything, trains (or evaluates) and writes the outputs; returns the summary (or eval metrics)."""
    runtime = init_runtime()
    set_threads(args, runtime)
    seed_everything(args.seed)
    loaders = build_loaders(args, runtime)
    model = build_model(args, loaders).to(runtime.device)
    log(runtime, f"{args.model} on {args.dataset} ({loaders.img_size}px, {loaders.num_classes} classes, "
                 f"batch {args.batch_size} x {runtime.world_size} process(es)): {describe(model)}")  # fmt: skip
    state = build_state(args, model, len(loaders.train), runtime.device)
    identity = run_identity(args, model, loaders)
    if args.eval_only:
        return evaluate_checkpoint(args, state, loaders, runtime, identity)

    def locate() -> tuple[str, tuple[str, str | None, str] | None]:
        run_dir, ref = locate_run(args, identity)
        return str(run_dir), (str(ref.weights), str(ref.state) if ref.state else None, ref.label) if ref else None

    run_dir_text, ref_parts = share_from_rank0(runtime, locate)
    run_dir = Path(run_dir_text)
    ref = None
    if ref_parts is not None:
        weights, state_path, label = ref_parts
        ref = ckpt.CheckpointRef(Path(weights), Path(state_path) if state_path else None, label)
        load_checkpoint(ref, args, state, runtime)
        log(runtime, f"resumed from {ref.label} after epoch {state.epoch} "
                     f"({state.wall_seconds:.1f} s of training so far)")  # fmt: skip
    config = resolved_config(args, model, loaders, runtime, run_dir, ref.label if ref else None)
    if runtime.is_main:
        write_config(run_dir, config)
        ckpt.remove_stale(run_dir)  # what a crash of an earlier session left behind
    log(runtime, f"run folder {run_dir}")
    if runtime.distributed:
        state.model = DistributedDataParallel(model)
    try:
        return fit(args, state, loaders, runtime, run_dir, config, identity)
    except NonFiniteLoss as error:
        raise NonFiniteLoss(f"{error}; stopped, the last good checkpoint is kept in {run_dir}") from None


def evaluate_checkpoint(
    args: argparse.Namespace, state: TrainState, loaders: Loaders, runtime: Runtime, identity: dict[str, Any]
) -> dict[str, Any]:
    """``--eval-only``: loads the weights, evaluates, prints the checkpoint's epoch, accuracy and solver stats."""
    ref = checkpoint_to_evaluate(args, identity)
    check_compatible(ref, args, state.model, runtime)
    metadata = ref.metadata()
    load_weights(ref, args, state.model)
    epoch = int(metadata["epoch"]) if metadata.get("epoch", "").isdigit() else None
    metrics: dict[str, Any] = {"epoch": epoch, "checkpoint": str(ref.weights)}
    metrics.update(evaluate(args, state.model, loaders.val, runtime))
    trained = f"after epoch {epoch}" if epoch is not None else "epoch unknown (no training metadata)"
    log(runtime, f"eval of {ref.label} ({trained}): top-1 {metrics['val_top1']:.2f}%  "
                 f"top-5 {metrics['val_top5']:.2f}%  loss {metrics['val_loss']:.4f}")  # fmt: skip
    solver = describe_solver(metrics, "val_fwd")
    if solver:
        log(runtime, f"eval solver: {solver}")
    return metrics


def fit(
    args: argparse.Namespace, state: TrainState, loaders: Loaders, runtime: Runtime, run_dir: Path,
    config: dict[str, Any], identity: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The epoch loop: train, evaluate, log, checkpoint; then the summary and the plot."""
    mixup = build_mixup(args, loaders.num_classes)
    loss_fn = build_loss(args, mixup)
    tensorboard = logs.TensorBoardLog(run_dir) if args.tensorboard and runtime.is_main else None
    session_start, wall_before = time.time(), state.wall_seconds
    try:
        while state.epoch < args.epochs:
            metrics = train_one_epoch(args, state, loaders, runtime, loss_fn, mixup)
            metrics.update(evaluate(args, state.model, loaders.val, runtime))
            if state.ema is not None:
                ema_metrics = evaluate(args, state.ema.module, loaders.val, runtime, solver_stats=False)
                metrics["ema_val_top1"] = ema_metrics["val_top1"]
            state.epoch += 1
            state.wall_seconds = wall_before + (time.time() - session_start)
            record_epoch(args, state, metrics, runtime, run_dir, config, identity)
            if tensorboard is not None:
                tensorboard.add_epoch(state.history[-1])
    finally:
        if tensorboard is not None:
            tensorboard.close()
    session = time.time() - session_start
    final = state.history[-1] if state.history else {}
    best_epoch = max(state.history, key=lambda entry: entry["val_top1"])["epoch"] if state.history else None
    summary = {
        "model": args.model,
        "final_top1": final.get("val_top1"),
        "best_top1": state.best_top1,
        "epochs": state.epoch,
        "wall_seconds": state.wall_seconds,
        "args": vars(args),
        "dataset": args.dataset,
        "final_top5": final.get("val_top5"),
        "best_epoch": best_epoch,
        "session_seconds": session,
        "run_dir": str(run_dir),
        "implicit_settings": config["model"]["implicit_settings"],
        "versions": config["versions"],
    }
    if runtime.is_main:
        ckpt.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=repr) + "\n")
        logs.plot_training(state.history, run_dir / "training.png", f"{args.model} on {args.dataset} ({run_dir.name})")
    final_text = f"{summary['final_top1']:.2f}%" if summary["final_top1"] is not None else "n/a"
    log(runtime, f"final val top-1 {final_text} (best {state.best_top1:.2f}%), {state.epoch} epochs, "
                 f"{state.wall_seconds:.1f} s of training in all; outputs in {run_dir}")  # fmt: skip
    return summary


def record_epoch(
    args: argparse.Namespace, state: TrainState, metrics: dict[str, Any], runtime: Runtime, run_dir: Path,
    config: dict[str, Any], identity: dict[str, Any],
) -> None:  # fmt: skip
    """Appends to the history, prints one line, rewrites metrics.jsonl/.csv and commits the checkpoint (rank 0)."""
    metrics = {"epoch": state.epoch, "lr": state.optimizer.param_groups[0]["lr"], **metrics}
    state.history.append(metrics)
    is_best = metrics["val_top1"] > state.best_top1
    state.best_top1 = max(state.best_top1, metrics["val_top1"])
    line = (f"epoch {state.epoch:3d}/{args.epochs}  loss {metrics['train_loss']:.4f}  "
            f"val top-1 {metrics['val_top1']:6.2f}%  {metrics['epoch_seconds']:.1f}s  "
            f"{metrics['images_per_second']:.0f} img/s")  # fmt: skip
    if "fwd_iters_mean" in metrics:
        line += f"  fwd iters {metrics['fwd_iters_mean']:.1f}/{metrics['fwd_iters_max']:.0f}"
        if "bwd_iters_mean" in metrics:
            line += f"  bwd {metrics['bwd_iters_mean']:.1f}/{metrics['bwd_iters_max']:.0f}"
        if "val_fwd_iters_mean" in metrics:
            line += f"  val {metrics['val_fwd_iters_mean']:.1f}/{metrics['val_fwd_iters_max']:.0f}"
        line += f"  unconverged {metrics['fwd_unconverged']:.1%}"
    log(runtime, line)
    if not runtime.is_main:
        return
    logs.write_metrics(run_dir, state.history)
    save_checkpoint(run_dir, state, args, config, identity, is_best)


@contextmanager
def distributed_cleanup() -> Iterator[None]:
    """Destroys the process group however the run ends."""
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit status (2 for bad input, 1 for a non-finite loss)."""
    try:
        args = parse_args(argv)
        with distributed_cleanup():
            run(args)
    except (UsageError, data.DataError, CheckpointError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLoss as error:
        print(f"train.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
