"""Train and evaluate the iMixer (or a vanilla MLP-Mixer baseline) with timm's training components.

With no arguments it trains ``imixer_t2_8`` on scikit-learn's bundled 8×8 digits (no download) and
prints the final validation top-1 — about 2 minutes on 2 CPU cores. The defaults are that small
recipe; ``examples/imixer/README.md`` lists the CIFAR-10 recipes and the ImageNet-folder run.

    python examples/imixer/train.py                               # iMixer on digits
    python examples/imixer/train.py --model mixer_t2_8            # the vanilla baseline, same recipe
    torchrun --nproc_per_node=4 examples/imixer/train.py --model imixer_s16_224 --dataset torch/cifar10 -b 512 ...

Flags follow timm's ``train.py`` (``-b`` is the batch size *per process*, ``-j`` the loader workers,
``--output`` the parent folder and ``--experiment`` the run folder's name); the implicit token mixer's flags
are :class:`~examples.imixer.imixer.IMixerSettings`' fields. Each run writes into its own folder, by default
``runs/imixer/<YYYYmmdd-HHMMSS>-<model>-<dataset>``: ``args.yaml``/``config.json`` (the resolved config),
``metrics.jsonl``/``metrics.csv`` (one line per epoch), ``summary.json``, ``training.png`` and checkpoints
committed through the manifest ``checkpoints.json`` (see :mod:`examples.imixer.checkpoints`). ``--resume auto``
continues the run named by ``--experiment``, or else the latest run under ``--output`` of the same model, data
and implicit settings. Bad input (a flag out of range, unknown names, missing data, a corrupt image or
checkpoint) exits with status 2 and one line. The training loop itself is :mod:`examples.imixer.engine`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, ParseKwargs, init_distributed_device, is_primary, random_seed
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: import the package from the repository root instead
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import implicitlayers as il
from examples.common import (
    DefaultsHelpFormatter,
    OneLineArgumentParser,
    UsageError,
    add_dataclass_flags,
    dataclass_flag,
    first_line,
    float_range,
    given_fields,
    int_range,
)
from examples.imixer import checkpoints as ckpt
from examples.imixer import data, engine, logs
from examples.imixer.checkpoints import CheckpointError
from examples.imixer.engine import NonFiniteLoss
from examples.imixer.imixer import IMixerSettings  # importing the module registers imixer_* and mixer_t* in timm

# timm schedules that step per update (the engine calls step_update every step). "plateau" steps per epoch
# on a metric, "wsd"/"rsqrt" need decay settings this script does not expose.
SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly", "constant")

# The implicit flags are IMixerSettings' fields (--max-iter sets max_iter). Earlier spellings that differ:
FLAG_ALIASES = {"hidden_ratio": "--h-ratio", "n_power_iterations": "--n-power"}
# Settings that name something the library registers: the help lists the names, an unknown one is refused.
SETTING_CHOICES: dict[str, Callable[[], Any]] = {
    "solver": il.available_solvers, "backward_solver": il.available_solvers,
    "backward": lambda: list(il.GRADIENT_MODES), "activation": lambda: sorted(il.layers.invertible.ACTIVATIONS),
}  # fmt: skip
SETTINGS = tuple(setting.name for setting in dataclasses.fields(IMixerSettings))


# ---------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (timm ``train.py`` names); defaults are the digits recipe (see README)."""
    # fmt: off
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter,
                                   raise_errors=True)
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="digits", metavar="NAME", help=f"one of {', '.join(data.DATASETS)}; "
                       "timm spellings torch/cifar10, torch/cifar100, torch/food101, torch/image_folder are accepted")
    group.add_argument("--data-dir", default=None, metavar="DIR", help="dataset root (None: only digits needs none)")
    group.add_argument("--dataset-download", "--download", dest="dataset_download", action="store_true",
                       help="let torchvision download CIFAR/Food-101 into --data-dir")
    group.add_argument("--num-classes", type=int_range(1), default=None, metavar="N",
                       help="classifier outputs; must equal the dataset's classes (None: the dataset's)")
    group.add_argument("--img-size", type=int_range(1), default=None, metavar="N",
                       help="input size, a multiple of the patch size (None: the model's)")
    group.add_argument("-j", "--workers", type=int_range(0), default=0, metavar="N",
                       help="data-loader worker processes per training process")
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="imixer_t2_8", metavar="MODEL",
                       help="timm model name (imixer_* or mixer_t* registered by examples.imixer)")
    group.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                       help="extra timm.create_model keyword arguments")
    group.add_argument("--drop-path", type=float_range(0, 1, high_open=True), default=0.0, metavar="PCT",
                       help="stochastic depth rate")
    group = parser.add_argument_group("implicit token mixer (imixer_* models; not given: the model's default)")
    add_dataclass_flags(group, IMixerSettings, aliases=FLAG_ALIASES, choices=SETTING_CHOICES)
    group.add_argument("--jacobian-weight", type=float_range(0), default=1.0, metavar="W",
                       help="weight of the Jacobian penalty in the loss (with --jacobian-penalty)")
    group.add_argument("--allow-implicit-mismatch", action="store_true",
                       help="load a checkpoint trained with other structural implicit settings (warns)")
    group = parser.add_argument_group("optimiser and schedule")
    group.add_argument("--opt", default="adamw", metavar="OPTIMIZER", help="timm optimizer name")
    group.add_argument("--lr", type=float_range(0, low_open=True), default=4e-3, metavar="LR", help="learning rate")
    group.add_argument("--weight-decay", type=float_range(0), default=0.05, help="weight decay")
    group.add_argument("--clip-grad", type=float_range(0, low_open=True), default=None, metavar="NORM",
                       help="clip the gradient norm to this value (None: no clipping)")
    group.add_argument("--sched", default="cosine", metavar="SCHEDULER", help=f"one of {', '.join(SCHEDULES)}")
    group.add_argument("--epochs", type=int_range(1), default=20, metavar="N", help="epochs to train")
    group.add_argument("--warmup-epochs", type=int_range(0), default=2, metavar="N", help="linear warm-up epochs")
    group.add_argument("--warmup-lr", type=float_range(0), default=1e-5, metavar="LR", help="warm-up start lr")
    group.add_argument("--min-lr", type=float_range(0), default=1e-5, metavar="LR", help="lower lr bound")
    group.add_argument("-b", "--batch-size", type=int_range(1), default=128, metavar="N",
                       help="batch size per process (global batch: N x processes)")
    group = parser.add_argument_group("augmentation and regularisation")
    group.add_argument("--no-aug", action="store_true", help="no random training augmentation")
    group.add_argument("--aa", default=None, metavar="NAME", help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    group.add_argument("--reprob", type=float_range(0, 1), default=0.0, metavar="PCT",
                       help="random erasing probability")
    group.add_argument("--scale", type=float_range(0, 1, low_open=True), nargs=2, default=None, metavar="PCT",
                       help="random-resized-crop scale range (None: (0.8, 1) for digits, timm's (0.08, 1) else)")
    group.add_argument("--hflip", type=float_range(0, 1), default=None, metavar="PROB",
                       help="horizontal flip probability (None: 0 for digits, else 0.5)")
    group.add_argument("--smoothing", type=float_range(0, 1, high_open=True), default=0.0, help="label smoothing")
    group.add_argument("--mixup", type=float_range(0), default=0.0, metavar="ALPHA", help="mixup alpha (0: off)")
    group.add_argument("--cutmix", type=float_range(0), default=0.0, metavar="ALPHA", help="cutmix alpha (0: off)")
    group.add_argument("--model-ema", action="store_true", help="keep and evaluate an EMA of the weights")
    group.add_argument("--model-ema-decay", type=float_range(0, 1, low_open=True, high_open=True), default=0.999,
                       help="EMA decay per step")
    group = parser.add_argument_group("device")
    group.add_argument("--device", default="auto", metavar="DEVICE",
                       help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N (torchrun: each process its "
                       "local rank's GPU)")
    group.add_argument("--amp", action="store_true", help="bf16 autocast on CPU, fp16 + GradScaler on CUDA")
    group.add_argument("--threads", type=int_range(1), default=None, metavar="N",
                       help="torch CPU threads (None: 1 for digits on CPU, else torch's)")
    group = parser.add_argument_group("outputs, resume, logging")
    group.add_argument("--seed", type=int_range(0, 2**32 - 1), default=0, help="random seed (all processes)")
    group.add_argument("--output", default=os.path.join("runs", "imixer"), metavar="PATH",
                       help="parent folder of the run folders")
    group.add_argument("--experiment", default=None, metavar="NAME",
                       help="run folder name under --output (None: <YYYYmmdd-HHMMSS>-<model>-<dataset>)")
    group.add_argument("--resume", default=None, metavar="PATH",
                       help="'auto' (the --experiment run, else the latest matching run under --output), a run "
                       "folder, RUN/last, RUN/best, a checkpoint folder or a .safetensors file")
    group.add_argument("--eval-only", action="store_true", help="evaluate the --resume checkpoint and exit")
    group.add_argument("--log-interval", type=int_range(0), default=50, metavar="N",
                       help="print a progress line every N steps when stdout is not a terminal (0: never)")
    group.add_argument("--no-progress", action="store_true", help="no tqdm bar (progress lines instead)")
    group.add_argument("--tensorboard", action="store_true",
                       help="also write TensorBoard scalars to RUN/tensorboard (needs the tensorboard package)")
    # fmt: on
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parses and validates the command line; raises :class:`UsageError` for bad input."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except ValueError as error:  # ParseKwargs given an item without "="
        raise UsageError(f"bad --model-kwargs item ({error}); use key=value") from None
    args.settings = given_fields(args, IMixerSettings)  # only the implicit flags given, "none" included
    if not timm.is_model(args.model):
        raise UsageError(f"unknown model {args.model!r}; e.g. imixer_t2_8, imixer_t4_32, imixer_s16_224, mixer_t2_8")
    dataset = data.canonical(args.dataset)
    if dataset is None:
        raise UsageError(
            f"unknown --dataset {args.dataset!r}; choose one of {', '.join(data.DATASETS)} "
            f"(or timm's {', '.join(name for name in data.DATASET_ALIASES if name.startswith('torch/'))})"
        )
    args.dataset = dataset
    if args.settings:
        if not is_imixer(args.model):
            raise UsageError(f"implicit flags apply to imixer_* models only, not {args.model!r}")
        check_settings(args, argv)
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
    if args.experiment is not None and (args.experiment in ("", ".", "..") or {"/", os.sep} & set(args.experiment)):
        raise UsageError(f"--experiment {args.experiment!r} must be a folder name (no path separators)")
    args.device = resolve_device(args.device)
    if args.eval_only and not args.resume:
        raise UsageError("--eval-only needs --resume (a checkpoint or 'auto')")
    if args.tensorboard and not logs.tensorboard_available():
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard (or drop the flag)")
    return args


def check_settings(args: argparse.Namespace, argv: list[str]) -> None:
    """Validates the implicit flags with ``IMixerSettings.build``, together with any settings in ``--model-kwargs``
    (as the model will: the gradient mode must suit the solver); its error becomes one line naming the flag."""
    flags = {name: f"--model-kwargs {name}" for name in args.model_kwargs if name in SETTINGS}
    for name in args.settings:  # the spelling given: the alias, or the field's
        alias = FLAG_ALIASES.get(name)
        flags[name] = alias if any(text.split("=")[0] == alias for text in argv) else dataclass_flag(name)
    given = {name: args.model_kwargs[name] for name in flags if name in args.model_kwargs} | args.settings
    message = settings_error(given)
    if message is not None:  # the settings that fail alone with the same error, else all of them
        culprits = [name for name in given if settings_error({name: given[name]}) == message] or list(given)
        expected = re.sub(r"^\w+ must be ", "expected ", message)
        raise UsageError(f"argument {'/'.join(flags[name] for name in culprits)}: {expected}")


def settings_error(settings: dict[str, Any]) -> str | None:
    """The first line of ``IMixerSettings.build``'s error for ``settings``, or None when they are valid."""
    try:
        IMixerSettings.build(**settings)
    except (ValueError, TypeError) as error:
        return first_line(error)
    return None


def is_imixer(model_name: str) -> bool:
    """Whether a registered model is an iMixer (takes the implicit flags)."""
    return timm.models.get_pretrained_cfg(model_name).architecture.startswith("imixer")


# ---------------------------------------------------------------------------------------------------
# Processes, data, model, optimiser


@dataclass
class Runtime:
    """Where this process runs: device, rank and world size (timm's ``is_primary`` reads ``rank``)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(text: str) -> str:
    """``--device``: ``auto`` is CUDA when available, else the CPU; a CUDA device must exist."""
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {text!r}: expected auto, cpu, cuda or cuda:N")
    available = torch.cuda.device_count()
    if device.type == "cuda" and (available == 0 or (device.index or 0) >= available):
        raise UsageError(f"--device {text!r}: this machine has {available} CUDA device(s); use --device cpu")
    return text


def init_runtime(device: str) -> Runtime:
    """timm's DDP set-up when launched by torchrun or SLURM (nccl on CUDA, gloo on CPU); else one process."""
    env = argparse.Namespace(device=device, dist_backend="nccl" if device.startswith("cuda") else "gloo")
    device = init_distributed_device(env)  # sets env.rank and env.world_size (not the flags: they are saved)
    return Runtime(device, env.rank, env.world_size)


def set_threads(args: argparse.Namespace, runtime: Runtime) -> None:
    """One CPU thread for digits: its matrices are tiny, and on a shared 2-core machine two OpenMP
    threads waiting on each other made a training step 5x slower (measured: 2.6 s vs 0.47 s)."""
    threads = args.threads or (1 if args.dataset == "digits" and runtime.device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)


def build_model(args: argparse.Namespace, loaders: data.Loaders) -> nn.Module:
    """``timm.create_model`` with the dataset's classes, channels and size, and the implicit flags."""
    try:
        model = timm.create_model(
            args.model, num_classes=loaders.num_classes, in_chans=loaders.in_chans, img_size=loaders.img_size,
            drop_path_rate=args.drop_path, **{**args.model_kwargs, **args.settings},
        )  # fmt: skip
    except (ValueError, TypeError, AssertionError, RuntimeError, ZeroDivisionError) as error:
        # The layers name a bad setting (ValueError); TypeError: an unknown kwarg; the others: impossible shapes
        # from --model-kwargs (e.g. embed_dim=0).
        raise UsageError(f"cannot build {args.model}: {first_line(error)}") from None
    patch = getattr(getattr(model, "stem", None), "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    if isinstance(patch, int) and loaders.img_size % patch:
        raise UsageError(f"--img-size {loaders.img_size} is not a multiple of {args.model}'s patch size {patch}")
    return model


@dataclass
class TrainState(engine.Trainer):
    """The engine's :class:`~examples.imixer.engine.Trainer` and the run's progress: all that a checkpoint holds."""

    epoch: int = 0
    best_top1: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0  # training time summed over all sessions, up to the last completed epoch


def build_state(args: argparse.Namespace, model: nn.Module, updates_per_epoch: int, device: torch.device) -> TrainState:
    """Optimiser, per-update schedule, AMP scaler and EMA from timm."""
    try:
        optimizer = create_optimizer_v2(model, args.opt, lr=args.lr, weight_decay=args.weight_decay)
    except (ImportError, ValueError, AssertionError, RuntimeError, TypeError) as error:
        raise UsageError(f"--opt {args.opt!r} cannot be created here: {first_line(error)}") from None
    scheduler, _ = create_scheduler_v2(
        optimizer, args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
        min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=updates_per_epoch,
    )  # fmt: skip
    # fp16 needs loss scaling; bf16 (the CPU choice) has fp32's range and does not.
    scaler = NativeScaler() if args.amp and device.type == "cuda" else None
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    return TrainState(model, optimizer, scheduler, scaler, ema, clip_grad=args.clip_grad,
                      jacobian_weight=args.jacobian_weight, amp=args.amp)  # fmt: skip


def build_loss(args: argparse.Namespace, mixup: Mixup | None) -> nn.Module:
    """timm's soft-target loss under mixup (which already smooths), label smoothing, or plain CE."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss()


def build_mixup(args: argparse.Namespace, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix, or None when both alphas are 0."""
    if args.mixup <= 0 and args.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                 num_classes=num_classes)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Training and evaluation: the engine, with this script's progress output


def train_step(
    runtime: Runtime, state: TrainState, images: Tensor, target: Tensor, loss_fn: nn.Module, mixup: Mixup | None,
    step: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """:func:`engine.train_step` on this process's device.

    ``step``, the index in the epoch, is not needed for the update; it is there for a caller that interrupts a
    run at a chosen step (the resume tests replace this function).
    """
    images, target = images.to(runtime.device, non_blocking=True), target.to(runtime.device, non_blocking=True)
    return engine.train_step(state, images, target, loss_fn, mixup, distributed=runtime.distributed)


def train_one_epoch(
    args: argparse.Namespace, state: TrainState, loaders: data.Loaders, runtime: Runtime, loss_fn: nn.Module,
    mixup: Mixup | None,
) -> dict[str, Any]:  # fmt: skip
    """One pass over the training set (:func:`engine.train_one_epoch`); returns its metrics (this process's shard).

    Progress: a tqdm bar on a terminal; otherwise (nohup, SLURM, ``--no-progress``) one line every
    ``--log-interval`` steps and at the last step.
    """
    loaders.train_sampler.set_epoch(state.epoch)
    steps = len(loaders.train)
    state.updates = state.epoch * steps  # the schedule is a function of the update count, which resumes with the epoch
    show_bar = is_primary(runtime) and not args.no_progress and sys.stdout.isatty()
    print_steps = is_primary(runtime) and not show_bar and args.log_interval > 0
    bar = tqdm(desc=f"epoch {state.epoch + 1}/{args.epochs}", disable=not show_bar, leave=False, total=steps)
    last = {"time": time.time(), "step": 0}  # of the last progress line

    def progress(index: int, meters: engine.EpochMeters) -> None:
        bar.update()
        if show_bar:
            bar.set_postfix(loss=f"{meters.loss.avg:.3f}", acc=f"{meters.top1.avg:.1f}")
        if print_steps and ((index + 1) % args.log_interval == 0 or index + 1 == steps):
            now = time.time()
            per_step = (now - last["time"]) / (index + 1 - last["step"])
            log(runtime, logs.step_record(
                epoch=state.epoch + 1, epochs=args.epochs, step=index + 1, steps=steps, loss=meters.loss.val,
                loss_avg=meters.loss.avg, lr=state.optimizer.param_groups[0]["lr"], seconds_per_step=per_step,
                images_per_second=args.batch_size * runtime.world_size / per_step,
                solver=meters.solver.metrics(["forward", "backward"]),
            ))  # fmt: skip
            last.update(time=now, step=index + 1)

    def step(images: Tensor, target: Tensor, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return train_step(runtime, state, images, target, loss_fn, mixup, index)

    try:
        return engine.train_one_epoch(state, loaders.train, loss_fn, mixup, device=runtime.device, epoch=state.epoch,
                                      world_size=runtime.world_size, step=step, progress=progress,
                                      clock=time.time)  # fmt: skip
    finally:
        bar.close()


def validate(
    args: argparse.Namespace, model: nn.Module, loader: DataLoader, runtime: Runtime, solver_stats: bool = True
) -> dict[str, float]:
    """:func:`engine.validate` over the whole validation set, summed over processes."""
    return engine.validate(model, loader, device=runtime.device, amp=args.amp, distributed=runtime.distributed,
                           solver_stats=solver_stats)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Driver (the run's files: examples.imixer.checkpoints)


def check_compatible(ref: ckpt.CheckpointRef, args: argparse.Namespace, model: nn.Module, runtime: Runtime) -> None:
    """:func:`checkpoints.check_compatible` (refuses another function), with one warning line for other settings."""
    notes = ckpt.check_compatible(ref, model, args.model, args.allow_implicit_mismatch)
    if notes and is_primary(runtime):
        print(f"train.py: warning: {ref.label} differs from this run: {'; '.join(notes)}", file=sys.stderr, flush=True)


def log(runtime: Runtime, message: str) -> None:
    """Prints on rank 0 only (on stdout, as before: timm's logging setup would send it to stderr)."""
    if is_primary(runtime):
        print(message, flush=True)


def share_from_rank0(runtime: Runtime, compute: Callable[..., Any], *args: Any) -> Any:
    """Runs ``compute(*args)`` on rank 0 only and gives every process its result (or its CheckpointError)."""
    if not runtime.distributed:
        return compute(*args)
    box: list[Any] = [None]
    if is_primary(runtime):
        try:
            box[0] = ("ok", compute(*args))
        except CheckpointError as error:
            box[0] = ("error", str(error))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise CheckpointError(value)
    return value


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Builds everything, trains (or evaluates) and writes the outputs; returns the summary (or eval metrics)."""
    runtime = init_runtime(args.device)
    set_threads(args, runtime)
    random_seed(args.seed)  # every process the same: DDP must start from one model
    loaders = data.build_loaders(args, runtime)
    # Resuming (or evaluating) continues with the checkpoint's implicit settings wherever no flag was given:
    # a run trained under other defaults goes on as it was trained.
    settings = IMixerSettings.build(**args.settings).to_dict() if is_imixer(args.model) else None
    wanted = ckpt.run_identity(args, loaders.img_size, settings)  # what --resume auto (no --experiment) matches
    saved = share_from_rank0(runtime, ckpt.settings_to_resume, Path(args.output), args.experiment, args.resume, wanted)
    if saved and is_imixer(args.model):
        args.settings = ckpt.settings_with_checkpoint(args.settings, args.model_kwargs, saved)
    model = build_model(args, loaders).to(runtime.device)
    log(runtime, f"{args.model} on {args.dataset} ({loaders.img_size}px, {loaders.num_classes} classes, batch "
                 f"{args.batch_size} x {runtime.world_size} process(es)): {logs.describe_model(model)}")  # fmt: skip
    state = build_state(args, model, len(loaders.train), runtime.device)
    identity = ckpt.run_identity(args, loaders.img_size, getattr(model, "implicit_settings", None))
    if args.eval_only:
        return evaluate_checkpoint(args, state, loaders, runtime, wanted)
    run_dir, ref = share_from_rank0(runtime, ckpt.locate_run, Path(args.output), args.experiment, args.resume, wanted)
    if ref is not None:
        check_compatible(ref, args, state.model, runtime)
        ckpt.restore_training(ref, state, vars(args))
        log(runtime, f"resumed from {ref.label} after epoch {state.epoch} "
                     f"({state.wall_seconds:.1f} s of training so far)")  # fmt: skip
    config = ckpt.resolved_config(args, model, loaders, runtime.world_size, runtime.device, run_dir,
                                  ref.label if ref else None)  # fmt: skip
    if is_primary(runtime):
        ckpt.write_config(run_dir, config)
        ckpt.remove_stale(run_dir)  # what a crash of an earlier session left behind
    log(runtime, f"run folder {run_dir}")
    if runtime.distributed:
        state.model = DistributedDataParallel(model)
    try:
        return fit(args, state, loaders, runtime, run_dir, config, identity)
    except NonFiniteLoss as error:
        raise NonFiniteLoss(f"{error}; stopped, the last good checkpoint is kept in {run_dir}") from None


def evaluate_checkpoint(
    args: argparse.Namespace, state: TrainState, loaders: data.Loaders, runtime: Runtime, identity: dict[str, Any]
) -> dict[str, Any]:
    """``--eval-only``: loads the weights, evaluates, prints the checkpoint's epoch, accuracy and solver stats."""
    ref = ckpt.checkpoint_to_evaluate(Path(args.output), args.experiment, args.resume, identity)
    check_compatible(ref, args, state.model, runtime)
    metadata = ckpt.load_weights(ref, state.model, args.model)
    epoch = int(metadata["epoch"]) if metadata.get("epoch", "").isdigit() else None
    metrics = {"epoch": epoch, "checkpoint": str(ref.weights), **validate(args, state.model, loaders.val, runtime)}
    trained = f"after epoch {epoch}" if epoch is not None else "epoch unknown (no training metadata)"
    log(runtime, f"eval of {ref.label} ({trained}): top-1 {metrics['val_top1']:.2f}%  "
                 f"top-5 {metrics['val_top5']:.2f}%  loss {metrics['val_loss']:.4f}")  # fmt: skip
    solver = logs.solver_line(metrics, "val_fwd")
    if solver:
        log(runtime, f"eval solver: {solver}")
    return metrics


def fit(
    args: argparse.Namespace, state: TrainState, loaders: data.Loaders, runtime: Runtime, run_dir: Path,
    config: dict[str, Any], identity: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The epoch loop: train, evaluate, log, checkpoint; then the summary and the plot."""
    mixup = build_mixup(args, loaders.num_classes)
    loss_fn = build_loss(args, mixup)
    tensorboard = logs.TensorBoardLog(run_dir) if args.tensorboard and is_primary(runtime) else None
    session_start, wall_before = time.time(), state.wall_seconds
    try:
        while state.epoch < args.epochs:
            metrics = train_one_epoch(args, state, loaders, runtime, loss_fn, mixup)
            metrics.update(validate(args, state.model, loaders.val, runtime))
            if state.ema is not None:
                ema_metrics = validate(args, state.ema.module, loaders.val, runtime, solver_stats=False)
                metrics["ema_val_top1"] = ema_metrics["val_top1"]
            state.epoch += 1
            state.wall_seconds = wall_before + (time.time() - session_start)
            record_epoch(args, state, metrics, runtime, run_dir, config, identity)
            if tensorboard is not None:
                tensorboard.add_epoch(state.history[-1])
    finally:
        if tensorboard is not None:
            tensorboard.close()
    final = state.history[-1] if state.history else {}
    best_epoch = max(state.history, key=lambda entry: entry["val_top1"])["epoch"] if state.history else None
    summary = {
        "model": args.model, "final_top1": final.get("val_top1"), "best_top1": state.best_top1, "epochs": state.epoch,
        "wall_seconds": state.wall_seconds, "args": vars(args), "dataset": args.dataset,
        "final_top5": final.get("val_top5"), "best_epoch": best_epoch, "session_seconds": time.time() - session_start,
        "run_dir": str(run_dir), "implicit_settings": config["model"]["implicit_settings"],
        "versions": config["versions"],
    }  # fmt: skip
    if is_primary(runtime):
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
    log(runtime, logs.epoch_line(metrics, args.epochs))
    if is_primary(runtime):
        logs.write_metrics(run_dir, state.history)
        ckpt.save_training(run_dir, state, args=vars(args), config=config, identity=identity, is_best=is_best)


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit status (2 for bad input, 1 for a non-finite loss)."""
    try:
        args = parse_args(argv)
        try:
            run(args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except (UsageError, data.DataError, CheckpointError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLoss as error:
        print(f"train.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
