"""The iMixer example's training loop: one update, one epoch, evaluation, and the solvers' statistics.

Nothing here reads a command line: ``train.py`` drives it from its flags, and any other script can drive it
with a model, an optimiser, a (timm) schedule and a loader of ``(images, labels)`` batches::

    trainer = engine.Trainer(model, optimizer, scheduler, clip_grad=5.0)
    for epoch in range(epochs):
        metrics = engine.train_one_epoch(trainer, train_loader, nn.CrossEntropyLoss(), device=device, epoch=epoch)
        metrics |= engine.validate(model, val_loader, device=device)

The pieces are timm's where timm has them (``AverageMeter``, ``accuracy``, ``NativeScaler``, ``dispatch_clip_grad``,
``ModelEmaV3``, ``unwrap_model``); the :class:`SolverMeter` is this example's own: timm knows nothing of solvers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.utils import AverageMeter, ModelEmaV3, NativeScaler, accuracy, dispatch_clip_grad, unwrap_model
from torch import Tensor, nn

# Phases of the solver statistics and the prefix of their metric names.
SOLVER_PHASES = {"forward": "fwd", "backward": "bwd", "eval": "val_fwd"}
# Per phase: [sum of iterations over rows, max iterations, max residual, unconverged rows, rows]
_SUM, _MAX_ITERS, _MAX_RESIDUAL, _UNCONVERGED, _ROWS = range(5)


class NonFiniteLoss(Exception):
    """The loss became NaN/inf; the message names the epoch and step."""


@dataclass
class Trainer:
    """What one training step updates, and how.

    Attributes:
        model: The model (possibly wrapped in DistributedDataParallel).
        optimizer: Its optimiser.
        scheduler: A timm scheduler stepped after every update (``step_update``), or None.
        scaler: timm's ``NativeScaler`` for fp16 autocast (loss scaling), or None.
        ema: timm's ``ModelEmaV3`` updated after every step, or None.
        clip_grad: Clip the gradient norm to this value (None: no clipping).
        jacobian_weight: Weight of ``model.jacobian_loss()`` (the iMixer's Jacobian penalty) in the loss.
        amp: Autocast the forward: bf16 on CPU, fp16 on CUDA (give a ``scaler`` there).
        updates: Optimiser steps taken so far: what the schedule is a function of.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    scaler: NativeScaler | None = None
    ema: ModelEmaV3 | None = None
    clip_grad: float | None = None
    jacobian_weight: float = 1.0
    amp: bool = False
    updates: int = 0


def autocast(enabled: bool, device: torch.device) -> Any:
    """bf16 autocast on CPU, fp16 on CUDA; a no-op when not ``enabled``."""
    if not enabled:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def train_step(
    trainer: Trainer, images: Tensor, target: Tensor, loss_fn: nn.Module, mixup: Mixup | None = None,
    *, distributed: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """One update: mixup/cutmix, forward, loss, finiteness check, backward, clipping, optimiser, EMA, schedule.

    The loss is ``loss_fn(logits, target) + jacobian_weight * model.jacobian_loss()`` when the model computed
    a Jacobian penalty (an iMixer with ``jacobian_penalty > 0``).

    Args:
        trainer: What the step updates (its model in training mode).
        images: ``(B, C, H, W)``, on the model's device.
        target: ``(B,)`` class indices, on the same device.
        loss_fn: ``(logits (B, K), target) -> scalar``; the target is soft, ``(B, K)``, under mixup.
        mixup: timm's Mixup/CutMix, or None.
        distributed: Agree on the finiteness check across DDP processes (all stop together).

    Returns:
        ``(loss, logits (B, K), target)``, detached; ``target`` as the loss saw it (``(B, K)`` under mixup).

    Raises:
        NonFiniteLoss: The loss is NaN or infinite (on any process); nothing was updated.
    """
    model = trainer.model
    if mixup is not None:
        images, target = mixup(images, target)
    with autocast(trainer.amp, images.device):
        logits = model(images)
        loss = loss_fn(logits, target)
        jacobian_loss = getattr(unwrap_model(model), "jacobian_loss", lambda: None)()
        if jacobian_loss is not None:
            loss = loss + trainer.jacobian_weight * jacobian_loss
    bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
    if distributed:  # all processes must stop together, or the others hang in the next all-reduce
        dist.all_reduce(bad)
    if bad.item() > 0:
        raise NonFiniteLoss("non-finite loss")
    trainer.optimizer.zero_grad(set_to_none=True)
    if trainer.scaler is not None:  # scaled backward, then unscale, clip, step and update the scale
        trainer.scaler(loss, trainer.optimizer, clip_grad=trainer.clip_grad, parameters=model.parameters())
    else:
        loss.backward()
        if trainer.clip_grad is not None:
            dispatch_clip_grad(model.parameters(), trainer.clip_grad)
        trainer.optimizer.step()
    if trainer.ema is not None:
        trainer.ema.update(unwrap_model(model))
    trainer.updates += 1
    if trainer.scheduler is not None:
        trainer.scheduler.step_update(num_updates=trainer.updates)
    return loss.detach(), logits.detach(), target


@dataclass
class EpochMeters:
    """The running statistics of one training epoch (this process's batches).

    Attributes:
        loss: The loss per sample (``val``: the last batch's, ``avg``: the epoch's so far).
        top1: Training top-1 in percent, against the hard labels (the larger share under mixup).
        solver: Each block's solver statistics, forward and backward.
    """

    loss: AverageMeter = field(default_factory=AverageMeter)
    top1: AverageMeter = field(default_factory=AverageMeter)
    solver: SolverMeter | None = None


def train_one_epoch(
    trainer: Trainer, loader: Iterable[tuple[Tensor, Tensor]], loss_fn: nn.Module, mixup: Mixup | None = None, *,
    device: torch.device | str = "cpu", epoch: int = 0, world_size: int = 1,
    step: Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor, Tensor]] | None = None,
    progress: Callable[[int, EpochMeters], None] | None = None, clock: Callable[[], float] = time.time,
) -> dict[str, float]:  # fmt: skip
    """One pass over ``loader``: a :func:`train_step` per batch; returns the epoch's training metrics.

    Args:
        trainer: What is trained.
        loader: ``(images (B, C, H, W), labels (B,))`` batches; with DDP, this process's shard.
        loss_fn, mixup: As in :func:`train_step`.
        device: Where the batches go.
        epoch: The epoch's index (from 0), for messages.
        world_size: DDP processes (the throughput counts them all; more than one agrees on finiteness).
        step: Runs one step instead of ``train_step``, ``(images, labels, index in the epoch) -> (loss, logits,
            target)`` with the batch still on the loader's device, for a caller that instruments or interrupts it.
        progress: Called after each step with its index and the meters.
        clock: Seconds now (``epoch_seconds`` is measured on it).

    Returns:
        ``train_loss``, ``train_top1``, ``epoch_seconds``, ``images_per_second`` (all processes) and, for an
        iMixer, the solver statistics :meth:`SolverMeter.metrics` names (``fwd_*``, ``bwd_*``), with the
        training forward's over the blocks also under the keys of earlier versions (``solver_*``).

    Raises:
        NonFiniteLoss: Naming the epoch and step.
    """
    device = torch.device(device)
    trainer.model.train()
    meters = EpochMeters(solver=SolverMeter(len(implicit_layers(trainer.model)), device))
    if step is None:

        def step(images: Tensor, labels: Tensor, index: int) -> tuple[Tensor, Tensor, Tensor]:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            return train_step(trainer, images, labels, loss_fn, mixup, distributed=world_size > 1)

    start = clock()
    with batches(loader) as iterator:
        for index, (images, labels) in enumerate(iterator):
            try:
                loss, logits, target = step(images, labels, index)
            except NonFiniteLoss:
                raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1}, step {index + 1}") from None
            hard = target.argmax(dim=1) if target.dim() == 2 else target
            meters.loss.update(float(loss), len(hard))
            meters.top1.update(float(accuracy(logits, hard)[0]), len(hard))
            meters.solver.add(trainer.model, "forward")
            meters.solver.add(trainer.model, "backward")
            if progress is not None:
                progress(index, meters)
    seconds = clock() - start
    metrics = {"train_loss": meters.loss.avg, "train_top1": meters.top1.avg, "epoch_seconds": seconds}
    metrics["images_per_second"] = meters.loss.count * world_size / seconds
    solver = meters.solver.metrics(["forward", "backward"])
    if solver:  # the keys of earlier versions: the training forward's statistics over the blocks
        metrics.update({f"solver_{key}": solver[f"fwd_{key}"]
                        for key in ("iters_mean", "iters_max", "residual_max", "unconverged")})  # fmt: skip
    return metrics | solver


@torch.no_grad()
def validate(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], *, device: torch.device | str = "cpu",
    amp: bool = False, distributed: bool = False, solver_stats: bool = True,
) -> dict[str, float]:  # fmt: skip
    """Top-1 and top-5 (percent), loss and (for an iMixer) each block's eval-mode solver statistics.

    Args:
        model: The model (put in eval mode).
        loader: ``(images (B, C, H, W), labels (B,))`` batches; with DDP, this process's shard.
        device: Where the batches go.
        amp: Autocast as in training.
        distributed: Sum over the DDP processes' shards.
        solver_stats: Add the ``val_fwd_*`` keys of :meth:`SolverMeter.metrics`.

    Returns:
        ``val_loss``, ``val_top1``, ``val_top5`` over the whole validation set, and the ``val_fwd_*`` statistics.
    """
    device = torch.device(device)
    model.eval()
    # Sums, not timm's reduce_tensor (a mean of the processes' means): the shards differ by up to one image.
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, samples
    solver = SolverMeter(len(implicit_layers(model)), device)
    with batches(loader) as iterator:
        for images, labels in iterator:
            images, labels = images.to(device), labels.to(device)
            with autocast(amp, device):
                logits = model(images)
            if solver_stats:
                solver.add(model, "eval")
            logits = logits.float()
            top1, top5 = accuracy(logits, labels, topk=(1, min(5, logits.shape[1])))
            batch = torch.tensor(len(labels), dtype=torch.float64, device=device)
            loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
            totals += torch.stack([loss.double(), top1.double() * batch / 100, top5.double() * batch / 100, batch])
    if distributed:
        dist.all_reduce(totals)
    loss, top1, top5, samples = totals.tolist()
    metrics = {"val_loss": loss / samples, "val_top1": 100 * top1 / samples, "val_top5": 100 * top5 / samples}
    if solver_stats:
        solver.reduce(distributed)
        metrics.update(solver.metrics(["eval"]))
    return metrics


@contextmanager
def batches(loader: Iterable[Any]) -> Iterator[Iterator[Any]]:
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


def implicit_layers(model: nn.Module) -> list[nn.Module]:
    """The model's implicit layers, one per block (empty for the vanilla Mixer)."""
    layers = getattr(unwrap_model(model), "implicit_layers", None)
    return list(layers()) if callable(layers) else []


class SolverMeter:
    """Per-block solver statistics accumulated on the device over many batches.

    Rows are the layer's solve rows (for the token mixer: batch × channels). Iterations are evaluations of
    F per row (``SolverResult.nstep``); a row is unconverged when its residual missed the tolerance. Reference
    mode (tolerance 0, a fixed number of steps) has no tolerance to miss: its rows count as converged, as in
    ``IMixer.solver_stats``.

    Args:
        blocks: Number of implicit layers.
        device: Where the running totals live.
    """

    def __init__(self, blocks: int, device: torch.device) -> None:
        self.blocks = blocks
        self.device = device
        self.totals = {phase: torch.zeros(blocks, 5, dtype=torch.float64, device=device) for phase in SOLVER_PHASES}
        self.seen = dict.fromkeys(SOLVER_PHASES, False)

    def add(self, model: nn.Module, phase: str) -> None:
        """Adds the last forward's (``forward``/``eval``) or backward's (``backward``) statistics."""
        for index, layer in enumerate(implicit_layers(model)):
            result = layer.backward_stats if phase == "backward" else layer.stats
            if result is None:
                continue
            nstep = result.nstep.reshape(-1).to(torch.float64)
            # A fixed budget (the reference loop, tol 0) ran what it was asked: Status.budget, no failure.
            unconverged = (~result.succeeded).reshape(-1).sum().to(torch.float64)
            row = self.totals[phase][index]
            row[_SUM] += nstep.sum()
            row[_MAX_ITERS] = torch.maximum(row[_MAX_ITERS], nstep.max())
            row[_MAX_RESIDUAL] = torch.maximum(row[_MAX_RESIDUAL], result.residual.detach().max().to(torch.float64))
            row[_UNCONVERGED] += unconverged
            row[_ROWS] += nstep.numel()
            self.seen[phase] = True

    def reduce(self, distributed: bool) -> None:
        """Sums (and maxes) the totals over DDP processes, for evaluation over a sharded validation set."""
        if not distributed:
            return
        for phase, totals in self.totals.items():
            sums = totals[:, [_SUM, _UNCONVERGED, _ROWS]].contiguous()
            maxes = totals[:, [_MAX_ITERS, _MAX_RESIDUAL]].contiguous()
            dist.all_reduce(sums)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
            totals[:, [_SUM, _UNCONVERGED, _ROWS]] = sums
            totals[:, [_MAX_ITERS, _MAX_RESIDUAL]] = maxes
            seen = torch.tensor([1.0 if self.seen[phase] else 0.0], device=self.device)
            dist.all_reduce(seen, op=dist.ReduceOp.MAX)
            self.seen[phase] = bool(seen.item())

    def metrics(self, phases: Sequence[str]) -> dict[str, float]:
        """Flat metrics for ``phases``: per block ``<p>_iters_b<i>`` (mean), ``<p>_iters_max_b<i>``,
        ``<p>_residual_max_b<i>``, ``<p>_unconverged_b<i>`` (fraction of rows), and over the blocks
        ``<p>_iters_mean`` (mean of block means), ``<p>_iters_max``, ``<p>_residual_max``, ``<p>_unconverged``
        (largest block fraction), where ``<p>`` is ``fwd``, ``bwd`` or ``val_fwd``. One synchronisation."""
        out: dict[str, float] = {}
        for phase in phases:
            if not self.seen[phase]:
                continue
            prefix = SOLVER_PHASES[phase]
            table = self.totals[phase].tolist()
            used = [(index, row) for index, row in enumerate(table) if row[_ROWS] > 0]
            for index, row in used:
                out[f"{prefix}_iters_b{index}"] = row[_SUM] / row[_ROWS]
                out[f"{prefix}_iters_max_b{index}"] = row[_MAX_ITERS]
                out[f"{prefix}_residual_max_b{index}"] = row[_MAX_RESIDUAL]
                out[f"{prefix}_unconverged_b{index}"] = row[_UNCONVERGED] / row[_ROWS]
            out[f"{prefix}_iters_mean"] = sum(row[_SUM] / row[_ROWS] for _, row in used) / len(used)
            out[f"{prefix}_iters_max"] = max(row[_MAX_ITERS] for _, row in used)
            out[f"{prefix}_residual_max"] = max(row[_MAX_RESIDUAL] for _, row in used)
            out[f"{prefix}_unconverged"] = max(row[_UNCONVERGED] / row[_ROWS] for _, row in used)
        return out
