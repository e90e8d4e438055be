"""Train and evaluate the iMixer (or a vanilla MLP-Mixer baseline) with timm's training components.

With no arguments it trains ``imixer_t2_8`` on scikit-learn's bundled 8×8 digits (no download) and
prints the final validation top-1 — about 2 minutes on 2 CPU cores. The defaults are that small
recipe; ``examples/imixer/README.md`` lists the paper's CIFAR-10 recipe and the ImageNet-folder run.

    python examples/imixer/train.py                               # iMixer on digits
    python examples/imixer/train.py --model mixer_t2_8            # the vanilla baseline, same recipe
    torchrun --nproc_per_node=4 examples/imixer/train.py --model imixer_s16_224 --dataset cifar10 ...

Outputs (``--output``): ``metrics.jsonl`` (one line per epoch), ``summary.json``, and the ``last`` and
``best`` checkpoints — weights as ``<tag>.safetensors``, training state as ``<tag>.state.pt`` (loaded
with ``weights_only=True``), each written atomically. ``--resume auto`` continues from ``last``.
Bad input (unknown names, missing data, a corrupt checkpoint) exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import timm
import torch
import torch.distributed as dist
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, ParseKwargs, accuracy
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: import the package from the repository root instead
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import implicitlayers as il
from examples.imixer import data
from examples.imixer import imixer as imixer_model  # noqa: F401  (registers imixer_* and mixer_t* in timm)

IMPLICIT_FLAGS = {
    "solver": "solver",
    "backward": "backward",
    "max_iter": "max_iter",
    "tol": "tol",
    "h_ratio": "hidden_ratio",
    "coeff": "coeff",
    "n_power": "n_power_iterations",
    "reference_iterations": "reference_iterations",
}


class UsageError(Exception):
    """Bad command-line input; reported as one line with exit status 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on error; one line is easier to read in logs and CI."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; defaults are the digits recipe (measured, see README)."""
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model", default="imixer_t2_8", help="timm model name (imixer_* or mixer_* registered by model.py)")
    add("--dataset", default="digits", help=f"one of {', '.join(data.DATASETS)}")
    add("--data-dir", default=None, help="dataset root (not needed for digits)")
    add("--download", action="store_true", help="let torchvision download CIFAR/Food-101")
    add("--model-kwargs", nargs="*", default={}, action=ParseKwargs, help="extra create_model kwargs, key=value")
    add("--num-classes", type=int, default=None, help="default: the dataset's")
    add("--img-size", type=int, default=None, help="default: the model's input size")
    add("--epochs", type=int, default=20)
    add("--batch-size", type=int, default=128, help="global batch size (split over DDP processes)")
    add("--opt", default="adamw")
    add("--lr", type=float, default=4e-3)
    add("--weight-decay", type=float, default=0.05)
    add("--sched", default="cosine")
    add("--warmup-epochs", type=int, default=2)
    add("--warmup-lr", type=float, default=1e-5)
    add("--min-lr", type=float, default=1e-5)
    add("--drop-path", type=float, default=0.0)
    add("--smoothing", type=float, default=0.0, help="label smoothing")
    add("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    add("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    add("--no-aug", action="store_true", help="no random training augmentation (resize and normalise only)")
    add("--aa", default=None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    add("--reprob", type=float, default=0.0, help="random erasing probability")
    add("--scale", type=float, nargs=2, default=None, help="random-resized-crop scale range (timm default)")
    add("--hflip", type=float, default=None, help="horizontal flip probability (0 for digits, else 0.5)")
    add("--amp", action="store_true", help="bf16 autocast on CPU, fp16 + GradScaler on CUDA")
    add("--clip-grad", type=float, default=None, help="clip the gradient norm to this value")
    add("--model-ema", action="store_true", help="keep and evaluate an EMA of the weights")
    add("--model-ema-decay", type=float, default=0.999)
    add("--workers", type=int, default=0, help="data-loader worker processes")
    add("--threads", type=int, default=None, help="torch CPU threads (default: 1 for digits, else torch's)")
    add("--seed", type=int, default=0)
    add("--output", default=None, help="output directory (default: runs/imixer/<model>-<dataset>)")
    add("--resume", default=None, help="'auto' (OUTPUT/last) or a checkpoint path")
    add("--eval-only", action="store_true", help="evaluate the --resume checkpoint and exit")
    add("--no-progress", action="store_true", help="no tqdm bars")
    implicit = parser.add_argument_group("implicit token mixer (imixer_* models)")
    implicit.add_argument("--solver", default=None, help=f"one of {', '.join(il.available_solvers())}")
    implicit.add_argument("--backward", default=None, help=f"one of {', '.join(il.GRADIENT_MODES)}")
    implicit.add_argument("--max-iter", type=int, default=None)
    implicit.add_argument("--tol", type=float, default=None)
    implicit.add_argument("--h-ratio", type=float, default=None, help="hidden_ratio H/T")
    implicit.add_argument("--coeff", type=float, default=None, help="spectral-norm bound")
    implicit.add_argument("--n-power", type=int, default=None, help="power iterations per training step")
    implicit.add_argument("--reference-iterations", type=int, default=None, help="run the reference loop")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parses and validates the command line; raises :class:`UsageError` for bad input."""
    try:
        args = build_parser().parse_args(argv)
    except ValueError as error:  # ParseKwargs given an item without "="
        raise UsageError(f"bad --model-kwargs item ({error}); use key=value") from None
    if not timm.is_model(args.model):
        raise UsageError(f"unknown model {args.model!r}; e.g. imixer_t2_8, imixer_s16_224, mixer_t2_8")
    if args.dataset not in data.DATASETS:
        raise UsageError(f"unknown dataset {args.dataset!r}; choose one of {', '.join(data.DATASETS)}")
    if args.solver is not None and args.solver not in il.available_solvers():
        raise UsageError(f"unknown solver {args.solver!r}; choose one of {', '.join(il.available_solvers())}")
    if args.backward is not None and args.backward not in il.GRADIENT_MODES:
        raise UsageError(f"unknown backward {args.backward!r}; choose one of {', '.join(il.GRADIENT_MODES)}")
    if implicit_kwargs(args) and not is_imixer(args.model):
        raise UsageError(f"implicit flags apply to imixer_* models only, not {args.model!r}")
    if args.epochs < 1 or args.batch_size < 1:
        raise UsageError("--epochs and --batch-size must be >= 1")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise UsageError("mixup/cutmix need an even --batch-size")
    if args.eval_only and not args.resume:
        raise UsageError("--eval-only needs --resume (a checkpoint or 'auto')")
    args.output = args.output or os.path.join("runs", "imixer", f"{args.model}-{args.dataset}")
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


def build_loaders(args: argparse.Namespace, runtime: Runtime) -> Loaders:
    """timm transforms at ``--img-size`` over the chosen dataset, sharded over DDP processes.

    The training sampler is a DistributedSampler even in one process, so one process with batch B and
    N processes with B/N each see the same samples in every step: without random augmentation,
    drop-path or mixup the results are the same up to float rounding (with them, each process draws
    its own random numbers, so the runs are equivalent in distribution, not bit for bit).
    """
    cfg = timm.models.get_pretrained_cfg(args.model)
    img_size = args.img_size or cfg.input_size[-1]
    in_chans = 1 if args.dataset == "digits" else 3
    mean, std = (cfg.mean[0],) * in_chans, (cfg.std[0],) * in_chans
    # Digits are not mirror-symmetric and only 8 pixels wide: no flips, mild crops.
    hflip = args.hflip if args.hflip is not None else (0.0 if args.dataset == "digits" else 0.5)
    scale = tuple(args.scale) if args.scale else ((0.8, 1.0) if args.dataset == "digits" else None)
    common = {"input_size": (in_chans, img_size, img_size), "interpolation": cfg.interpolation, "mean": mean}
    train_tf = create_transform(
        **common, std=std, is_training=True, no_aug=args.no_aug, hflip=hflip, scale=scale, auto_augment=args.aa,
        re_prob=args.reprob, re_mode="pixel", color_jitter=0.0 if in_chans == 1 else 0.4, crop_pct=1.0,
    )  # fmt: skip
    eval_tf = create_transform(**common, std=std, is_training=False, crop_pct=cfg.crop_pct)
    splits = data.build_datasets(args.dataset, args.data_dir, train_tf, eval_tf, download=args.download)
    if args.batch_size % runtime.world_size:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by {runtime.world_size} processes")
    per_process = args.batch_size // runtime.world_size
    sampler = DistributedSampler(splits.train, runtime.world_size, runtime.rank, shuffle=True, seed=args.seed)
    if len(sampler) < per_process:
        raise data.DataError(f"{len(splits.train)} training images are fewer than one batch of {args.batch_size}")
    loader_args = {"num_workers": args.workers, "pin_memory": runtime.device.type == "cuda"}
    train = DataLoader(splits.train, per_process, sampler=sampler, drop_last=True, **loader_args)
    # Evaluation shards without padding (DistributedSampler would repeat samples); counts are summed.
    val_shard = Subset(splits.val, range(runtime.rank, len(splits.val), runtime.world_size))
    val = DataLoader(val_shard, max(per_process, 64), shuffle=False, **loader_args)
    return Loaders(train, val, sampler, args.num_classes or splits.num_classes, in_chans, img_size)


# ---------------------------------------------------------------------------------------------------
# Model, optimiser, schedule


def build_model(args: argparse.Namespace, loaders: Loaders) -> nn.Module:
    """``timm.create_model`` with the dataset's classes, channels and size, and the implicit flags."""
    try:
        return timm.create_model(
            args.model,
            num_classes=loaders.num_classes,
            in_chans=loaders.in_chans,
            img_size=loaders.img_size,
            drop_path_rate=args.drop_path,
            **{**args.model_kwargs, **implicit_kwargs(args)},
        )
    except (ValueError, TypeError) as error:  # the layers name a bad setting; TypeError: unknown kwarg
        raise UsageError(str(error)) from None


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


def build_state(args: argparse.Namespace, model: nn.Module, updates_per_epoch: int, device: torch.device) -> TrainState:
    """Optimiser, per-step schedule, AMP scaler and EMA from timm."""
    optimizer = create_optimizer_v2(model, args.opt, lr=args.lr, weight_decay=args.weight_decay)
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


def solver_summary(model: nn.Module) -> dict[str, float]:
    """Mean/max iterations, max residual and unconverged fraction over the blocks (empty for Mixer)."""
    stats_fn = getattr(unwrap(model), "solver_stats", None)
    blocks = [s for s in stats_fn() if s] if stats_fn else []
    if not blocks:
        return {}
    return {
        "solver_iters_mean": float(np.mean([s["nstep_mean"] for s in blocks])),
        "solver_iters_max": max(s["nstep_max"] for s in blocks),
        "solver_residual_max": max(s["residual_max"] for s in blocks),
        "solver_unconverged": max(s["unconverged"] for s in blocks),
    }


@dataclass
class EpochMeter:
    """Running sums of one training epoch."""

    loss_sum: float = 0.0
    correct: float = 0.0
    samples: int = 0
    solver: dict[str, list[float]] = field(default_factory=dict)

    def update(self, loss: Tensor, logits: Tensor, target: Tensor, model: nn.Module) -> None:
        batch = target.shape[0]
        self.loss_sum += float(loss) * batch
        hard = target.argmax(dim=1) if target.dim() == 2 else target
        self.correct += float((logits.argmax(dim=1) == hard).sum())
        self.samples += batch
        for key, value in solver_summary(model).items():
            self.solver.setdefault(key, []).append(value)

    def postfix(self, start: float) -> dict[str, str]:
        shown = {"loss": f"{self.loss_sum / max(self.samples, 1):.3f}", "acc": f"{self.acc():.1f}"}
        shown["img/s"] = f"{self.samples / max(time.time() - start, 1e-9):.0f}"
        if "solver_iters_mean" in self.solver:
            shown["iters"] = f"{self.solver['solver_iters_mean'][-1]:.1f}"
        return shown

    def acc(self) -> float:
        return 100.0 * self.correct / max(self.samples, 1)


def train_one_epoch(
    args: argparse.Namespace, state: TrainState, model: nn.Module, loaders: Loaders, runtime: Runtime,
    loss_fn: nn.Module, mixup: Mixup | None,
) -> dict[str, Any]:  # fmt: skip
    """One pass over the training set; returns the epoch's training metrics (this process's shard)."""
    model.train()
    loaders.train_sampler.set_epoch(state.epoch)
    meter, start = EpochMeter(), time.time()
    updates = state.epoch * len(loaders.train)
    show = runtime.is_main and not args.no_progress and sys.stdout.isatty()
    bar = tqdm(loaders.train, desc=f"epoch {state.epoch + 1}/{args.epochs}", disable=not show, leave=False)
    for step, (images, target) in enumerate(bar):
        images, target = images.to(runtime.device), target.to(runtime.device)
        if mixup is not None:
            images, target = mixup(images, target)
        with autocast(args, runtime.device):
            logits = model(images)
            loss = loss_fn(logits, target)
        check_finite(loss, state.epoch, step, runtime)
        backward_and_step(args, state, loss)
        updates += 1
        state.scheduler.step_update(num_updates=updates)
        meter.update(loss.detach(), logits.detach(), target, model)
        bar.set_postfix(meter.postfix(start))
    bar.close()
    seconds = time.time() - start
    metrics = {"train_loss": meter.loss_sum / meter.samples, "train_top1": meter.acc(), "epoch_seconds": seconds}
    metrics["images_per_second"] = meter.samples * runtime.world_size / seconds
    metrics.update({key: float(np.mean(values)) for key, values in meter.solver.items() if key.endswith("mean")})
    metrics.update({key: float(np.max(values)) for key, values in meter.solver.items() if not key.endswith("mean")})
    return metrics


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
def evaluate(args: argparse.Namespace, model: nn.Module, loader: DataLoader, runtime: Runtime) -> dict[str, float]:
    """Top-1/top-5 (percent) and loss over the whole validation set, summed over processes."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)  # loss, top1, top5, samples
    for images, target in loader:
        images, target = images.to(runtime.device), target.to(runtime.device)
        with autocast(args, runtime.device):
            logits = model(images)
        logits = logits.float()
        top1, top5 = accuracy(logits, target, topk=(1, min(5, logits.shape[1])))
        batch = target.shape[0]
        loss = nn.functional.cross_entropy(logits, target, reduction="sum")
        totals += torch.tensor(
            [float(loss), float(top1) * batch / 100, float(top5) * batch / 100, batch], **_f64(runtime)
        )
    if runtime.distributed:
        dist.all_reduce(totals)
    loss, top1, top5, samples = totals.tolist()
    return {"val_loss": loss / samples, "val_top1": 100 * top1 / samples, "val_top5": 100 * top5 / samples}


def _f64(runtime: Runtime) -> dict[str, Any]:
    return {"dtype": torch.float64, "device": runtime.device}


# ---------------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointError(Exception):
    """A checkpoint is missing, corrupt or does not match the model."""


def atomic_write(path: Path, write: Any) -> None:
    """Calls ``write(tmp_path)`` then renames onto ``path``: readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(output: Path, tag: str, state: TrainState, args: argparse.Namespace) -> None:
    """Writes ``<tag>.state.pt`` then ``<tag>.safetensors``, each atomically.

    Both carry the epoch; a crash between the two renames leaves an epoch mismatch that
    :func:`load_checkpoint` reports instead of silently mixing two epochs.
    """
    model = unwrap(state.model)
    training_state = {
        "epoch": state.epoch,
        "best_top1": state.best_top1,
        "history": json.dumps(state.history),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "ema": state.ema.state_dict() if state.ema is not None else None,
        "rng": {"torch": torch.get_rng_state(), "numpy": json.dumps(_numpy_rng()), "python": repr(random.getstate())},
        "args": json.dumps(vars(args)),
    }
    if torch.cuda.is_available():
        training_state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    atomic_write(output / f"{tag}.state.pt", lambda tmp: torch.save(training_state, tmp))
    weights = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    metadata = {"epoch": str(state.epoch), "model": args.model}
    atomic_write(output / f"{tag}.safetensors", lambda tmp: safetensors.torch.save_file(weights, tmp, metadata))


def _numpy_rng() -> list[Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), pos, has_gauss, cached]


def checkpoint_paths(resume: str, output: str) -> tuple[Path, Path]:
    """(weights, state) paths for ``--resume`` ('auto', a prefix, or either file)."""
    base = Path(output) / "last" if resume == "auto" else Path(resume)
    name = base.name
    for suffix in (".safetensors", ".state.pt"):
        if name.endswith(suffix):
            base = base.with_name(name[: -len(suffix)])
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".state.pt")


def load_checkpoint(resume: str, args: argparse.Namespace, state: TrainState, weights_only_ok: bool) -> None:
    """Restores weights (and, unless ``weights_only_ok``, the whole training state) into ``state``.

    Raises:
        CheckpointError: Missing, unreadable, torn or mismatched checkpoint.
    """
    weights_path, state_path = checkpoint_paths(resume, args.output)
    if not weights_path.is_file():
        raise CheckpointError(f"no checkpoint at {weights_path}")
    try:
        with safetensors.safe_open(str(weights_path), "pt") as handle:
            metadata = handle.metadata() or {}
        weights = safetensors.torch.load_file(str(weights_path))
    except Exception as error:  # safetensors raises its own error types for a torn or foreign file
        raise CheckpointError(f"cannot read {weights_path}: {_first_line(error)}") from None
    try:
        unwrap(state.model).load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"{weights_path} does not match model {args.model}: {_first_line(error)}") from None
    if weights_only_ok:
        return
    restore_training_state(state_path, metadata, state, args)


def restore_training_state(
    state_path: Path, metadata: dict[str, str], state: TrainState, args: argparse.Namespace
) -> None:
    """Loads ``<tag>.state.pt`` (``weights_only=True``) and restores optimiser, schedule, RNG, EMA."""
    try:
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types; all mean "unusable file"
        raise CheckpointError(f"cannot read {state_path}: {_first_line(error)}") from None
    if str(saved.get("epoch")) != metadata.get("epoch"):
        raise CheckpointError(f"{state_path} (epoch {saved.get('epoch')}) and its weights (epoch "
                              f"{metadata.get('epoch')}) differ: the checkpoint is torn")  # fmt: skip
    try:
        state.optimizer.load_state_dict(saved["optimizer"])
        # timm schedules are functions of the update count, which resumes with the epoch. Restoring the
        # saved one matters only for the same plan; with a new --epochs, the fresh schedule stretches to it.
        if json.loads(saved["args"]).get("epochs") == args.epochs:
            state.scheduler.load_state_dict(saved["scheduler"])
        if state.scaler is not None and saved["scaler"] is not None:
            state.scaler.load_state_dict(saved["scaler"])
        if state.ema is not None and saved["ema"] is not None:
            state.ema.load_state_dict(saved["ema"])
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{state_path} does not match this run: {_first_line(error)}") from None
    state.epoch, state.best_top1 = int(saved["epoch"]), float(saved["best_top1"])
    state.history = json.loads(saved["history"])
    restore_rng(saved["rng"])


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Builds everything, trains (or evaluates) and writes the outputs; returns the summary."""
    runtime = init_runtime()
    set_threads(args, runtime)
    seed_everything(args.seed)
    loaders = build_loaders(args, runtime)
    model = build_model(args, loaders).to(runtime.device)
    log(runtime, f"{args.model} on {args.dataset} ({loaders.img_size}px, {loaders.num_classes} classes): "
                 f"{describe(model)}")  # fmt: skip
    state = build_state(args, model, len(loaders.train), runtime.device)
    output = Path(args.output)
    if args.resume and (args.resume != "auto" or checkpoint_paths("auto", args.output)[0].is_file()):
        load_checkpoint(args.resume, args, state, weights_only_ok=args.eval_only)
        log(runtime, f"resumed from {checkpoint_paths(args.resume, args.output)[0]} after epoch {state.epoch}")
    if args.eval_only:
        metrics = evaluate(args, model, loaders.val, runtime)
        log(runtime, f"eval: top-1 {metrics['val_top1']:.2f}%  top-5 {metrics['val_top5']:.2f}%")
        return metrics
    if runtime.distributed:
        state.model = DistributedDataParallel(model)
    if runtime.is_main:
        output.mkdir(parents=True, exist_ok=True)
    return fit(args, state, loaders, runtime, output)


def fit(args: argparse.Namespace, state: TrainState, loaders: Loaders, runtime: Runtime, output: Path) -> dict:
    """The epoch loop: train, evaluate, log, checkpoint; then the summary."""
    mixup = build_mixup(args, loaders.num_classes)
    loss_fn = build_loss(args, mixup)
    start = time.time()
    while state.epoch < args.epochs:
        metrics = train_one_epoch(args, state, state.model, loaders, runtime, loss_fn, mixup)
        metrics.update(evaluate(args, state.model, loaders.val, runtime))
        if state.ema is not None:
            metrics["ema_val_top1"] = evaluate(args, state.ema.module, loaders.val, runtime)["val_top1"]
        state.epoch += 1
        record_epoch(args, state, metrics, runtime, output)
    wall = time.time() - start
    summary = {
        "model": args.model,
        "final_top1": state.history[-1]["val_top1"] if state.history else None,
        "best_top1": state.best_top1,
        "epochs": state.epoch,
        "wall_seconds": wall,
        "args": vars(args),
    }
    if runtime.is_main:
        atomic_write(output / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    log(runtime, f"final val top-1 {summary['final_top1']:.2f}% (best {state.best_top1:.2f}%), "
                 f"{state.epoch} epochs, {wall:.1f} s; outputs in {output}")  # fmt: skip
    return summary


def record_epoch(
    args: argparse.Namespace, state: TrainState, metrics: dict[str, Any], runtime: Runtime, output: Path
) -> None:
    """Appends to metrics.jsonl, prints one line and writes the last/best checkpoints (rank 0)."""
    metrics = {"epoch": state.epoch, "lr": state.optimizer.param_groups[0]["lr"], **metrics}
    state.history.append(metrics)
    is_best = metrics["val_top1"] > state.best_top1
    state.best_top1 = max(state.best_top1, metrics["val_top1"])
    line = (f"epoch {state.epoch:3d}/{args.epochs}  loss {metrics['train_loss']:.4f}  "
            f"val top-1 {metrics['val_top1']:6.2f}%  {metrics['epoch_seconds']:.1f}s  "
            f"{metrics['images_per_second']:.0f} img/s")  # fmt: skip
    if "solver_iters_mean" in metrics:
        line += f"  iters {metrics['solver_iters_mean']:.1f}/{metrics['solver_iters_max']:.0f}"
        line += f"  unconverged {metrics['solver_unconverged']:.1%}"
    log(runtime, line)
    if not runtime.is_main:
        return
    # Rewritten from the checkpointed history, so a resumed run never repeats or loses an epoch's line.
    lines = "".join(json.dumps(entry) + "\n" for entry in state.history)
    atomic_write(output / "metrics.jsonl", lambda tmp: Path(tmp).write_text(lines, encoding="utf-8"))
    save_checkpoint(output, "last", state, args)
    if is_best:
        save_checkpoint(output, "best", state, args)


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
        print(f"train.py: {error}; stopped, the last good checkpoint is kept in {args.output}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
