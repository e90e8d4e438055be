"""What training does to the iMixer's implicit layers: iterations, inverse accuracy, contraction, cost.

Trains several configurations side by side on one recipe and records, per epoch and per
configuration, how the solves behave as the weights move (issue 11, item 1): a tool for choosing
defaults, not a claim about any one of them.

**Model: the digits 4 × 128 recipe.** timm's ``imixer_t4_32`` / ``mixer_t4_32`` with ``num_blocks=4``,
``embed_dim=128``, ``in_chans=1``, 10 classes, at ``img_size=16``, ``patch_size=2`` (``--img-size`` /
``--patch-size`` change it). The 8×8 digits are upscaled bilinearly to 16 px and cut into 2×2
patches, giving 64 tokens: the token count of ``imixer_t4_32`` at 32 px and close to the 49 of the
held-out 28 px / patch 4 measurement, so the token mixers (N = 64 → T = 64, F: 64 → 128 → 64) and the
channel MLPs have the shapes, hence the cost shares and the × mixer ratios, of that measurement. The
implicit layer's cost does not depend on the token count, the channel MLP's does: fewer tokens
(16 px / patch 4) would inflate the ratios. 16 px rather than 32 px / patch 4 (also 64 tokens)
because the upscaled digits carry no more information at 32 px and the stem and data are 4× smaller.

**Recipe.** AdamW (lr 2e-3, weight decay 0.05) with a one-cycle schedule over the run, batch 64
(23 steps per epoch: batch 128 would leave only 60 steps in 5 epochs, too few for the weights, and
with them the iteration counts, to move), cross-entropy with label smoothing 0.1, no dropout or drop
path, trained by ``examples/imixer/engine.py``'s loop (``train_one_epoch``), ``--threads`` torch threads
(2 by default; on a 2-core machine shared with other jobs one thread is several times faster and
steadier). Every configuration of one seed starts from
``torch.manual_seed(seed)`` and sees the same batches in the same order (and, for ``digits-hard``,
the same distortions); the configurations are trained in turn *epoch by epoch* (epoch 1 of each,
then epoch 2 of each, ...), so a burst of load on a shared machine hits all of them alike and the
× mixer time ratios are measured side by side.

**Tasks** (``--tasks``; real data only, nothing downloaded: scikit-learn's bundled 1797 digits with
the stratified 80/20 split of ``examples/imixer/data.py``, 1437 training and 360 validation images).

* ``digits``: the plain images, no augmentation. It saturates near 98 %, so it measures the solves'
  behaviour and cost more than accuracy.
* ``digits-hard``: every image is distorted by a random, batched, seeded transform (:func:`distort`):
  an affine map (rotation ±15°, scale 0.9–1.1, shear ±0.15, translation ±1 px at 16 px), a smooth
  elastic displacement (a 4×4 grid of N(0, (0.5 px)²) displacements upsampled bicubically), bilinear
  resampling, an occluding square (side 3–6 px, filled with a uniform grey, probability 0.5) and
  Gaussian pixel noise (σ = 0.1 on the [0, 1] scale, clamped). Training images are drawn afresh every
  epoch (generator seeded by seed and epoch, shared by the configurations); the validation set is
  fixed for every run: each of the 360 validation digits distorted 4 times with the same distribution
  from a generator of fixed seed (1440 images). Accuracy lands far below saturation (about 65 % after
  5 epochs, seed std about 2 points in the published run), where the configurations' trainability
  shows; separating configurations by a few points takes more epochs or seeds than that run had.

**Configurations** (``--configs``): presets or ``name=key:value,...``; ``mixer`` is always run (first)
as the baseline of the ratios; the vocabulary of ``benchmarks/common.py`` (the fields of
``IMixerSettings``, ``model``, and ``jac_weight`` / ``jac_samples``: the weight of the Jacobian
penalty ‖J_F(z*)‖_F²/dim added to the loss, Bai et al. 2021, and its Hutchinson samples per forward),
validated before any training. Each configuration records
``is_default``: whether its settings equal ``IMixerSettings()`` (how the renderer finds the default row).

**Measured, per epoch, configuration, seed and block** (``imixer_training.json`` holds every number):

* ``train_loss`` (the engine's mean per image of the smoothed cross-entropy, penalty included),
  ``val_top1`` (%), ``train_seconds`` (the engine's epoch time: the steps and the per-step solver
  statistics; evaluation and diagnostics excluded), ``jac_loss``.
* ``train_forward``: forward iterations of the epoch's training forwards: ``nstep_mean`` (mean over
  forwards of the rows' mean), ``nstep_max`` (max over forwards and rows), ``nstep_max_mean`` (mean over
  forwards of the slowest row: what a batched solve costs), ``unconverged`` (mean fraction of rows
  that missed ``tol``; 0 for a fixed-count solve, tol 0); ``backward``: the same for the adjoint
  solves (the layers' ``backward_stats``; ``None`` where the mode has no adjoint solve: unrolled, JFB,
  phantom); ``eval_forward``: the same over the validation forwards.
* ``diagnostics``, at eval on a fixed validation batch (``--diag-batch`` images), from each token
  mixer's input x (= fc1 output) and output z, row by row (one row = one token-mixing problem):
  ``inverse_residual_max`` / ``_mean``: ||z - x - F(z)|| / ||z||, how far z is from solving
  z = x + F(z) — for reference models, how far the n-step z is from (1 - F)⁻¹(x); the solved mode
  returns F's image of its best iterate, so there it is at most Lip(F)·``eval_tol``;
  ``inverse_error_max`` / ``_mean``: ||z - z*|| / ||z*|| against z* = (1 - F)⁻¹(x) solved in float64
  (Anderson from z to a relative residual of 1e-10, at most 300 iterations;
  ``true_solve_residual_max`` and ``true_solve_converged`` tell whether it got there);
  ``spectral_radius_mean`` / ``_max``: ρ(J_F(z*)) by :func:`il.spectral_radius` (30 Arnoldi steps, fixed
  generator), the asymptotic contraction rate that sets the iteration counts; ``lipschitz_bound``:
  :func:`il.lipschitz_bound` of F (the certified bound for every weight the normalisation allows:
  coeff² · Lip(act)²); ``lipschitz_weights``: the bound for the current weights, the product of the
  exact spectral norms of F's two normalised weight matrices and Lip(act)² (above coeff² · Lip(act)²
  when the power-iteration estimate σ̂ lags behind the weights); ``unconverged``: fraction of that
  batch's rows that missed the eval tolerance.
* Epoch 0 is the untrained model: its evaluation only.

**Outputs** (``--out``, default ``benchmarks/results/``; ``--docs`` also writes them to
``docs/assets/imixer_training/``): ``imixer_training.json``, ``imixer_training.md`` (per task a table:
val top-1 mean ± std over seeds, train seconds per epoch and × mixer (the mean over seeds of the ratio
of total train times, same seed, same run), worst-block forward iterations at init and at the end,
backward iterations, inverse residual and inverse error, ρ and the bounds at the end) and
``imixer_training_<task>.png`` (val accuracy, worst-block training forward iterations, backward
iterations, ρ(J_F) with the weights bound, inverse residual and training loss per epoch; one line per
configuration, mean over seeds).

``--render JSON...`` re-renders the table and plots of an earlier run's JSON without training.

``--quick`` (the test's run, seconds): 1 seed, 1 epoch of 3 batches of 32, 128 validation images,
a diagnostic batch of 8, ``digits`` with mixer, imixer and reference-2, 1 thread.

Usage::

    python -m benchmarks.imixer_training                      # digits, 3 seeds, 5 epochs, 3 configs
    python -m benchmarks.imixer_training --tasks digits digits-hard --docs
    python -m benchmarks.imixer_training --configs imixer reference-2 "lipswish=activation:lipswish" \\
        "jac=jac_weight:0.5" "shine=solver:broyden,backward:shine,shine_refine:2" --seeds 2 --epochs 8
    python -m benchmarks.imixer_training --render a.json b.json   # no training; tasks merged
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicitlayers as il
from benchmarks import common, render
from examples.imixer import engine
from examples.imixer.imixer import IMixerSettings  # also registers imixer_t4_32 / mixer_t4_32 with timm

TASKS = ("digits", "digits-hard")
DOCS_DIR = common.REPO / "docs" / "assets" / "imixer_training"
NUM_CLASSES = 10
VAL_COPIES = 4  # distorted copies of each validation digit in digits-hard
VAL_DISTORTION_SEED = 12345  # the fixed digits-hard validation set
DEFAULT_CONFIGS = ("mixer", "imixer", "reference-2")
QUICK = {"batch": 32, "max_batches": 3, "val_limit": 128, "diag_batch": 8, "threads": 1}
# The true inverse (1 - F)^{-1}(x) the diagnostics compare against.
TRUE_SOLVE = {"solver": "anderson", "tol": 1e-10, "max_iter": 300}
SPECTRAL_RADIUS_ITERS = 30
LOSS = nn.CrossEntropyLoss(label_smoothing=0.1)


# ----------------------------------------------------------------------------------------- data
def load_digits_tensors(img_size: int) -> dict[str, Tensor]:
    """scikit-learn's digits split as in ``examples/imixer/data.py``, upscaled to ``img_size``, in [0, 1].

    Returns:
        ``train_x`` (1437, 1, S, S), ``train_y``, ``val_x`` (360, 1, S, S), ``val_y``.
    """
    from examples.imixer.data import DigitsDataset

    tensors = {}
    for split, train in (("train", True), ("val", False)):
        dataset = DigitsDataset(train)
        images = torch.from_numpy(dataset.images.astype(np.float32) / 255.0).unsqueeze(1)
        if img_size != images.shape[-1]:
            images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
        tensors[f"{split}_x"] = images.clamp(0.0, 1.0)
        tensors[f"{split}_y"] = torch.from_numpy(dataset.targets)
    return tensors


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def distort(images: Tensor, generator: torch.Generator) -> Tensor:
    """The ``digits-hard`` distortion of a batch of ``(B, 1, S, S)`` images in [0, 1] (see module doc).

    Args:
        images: Clean images in [0, 1].
        generator: Source of every random draw (CPU), so a seed fixes the result.

    Returns:
        Distorted images, same shape, in [0, 1].
    """
    batch, _, size, _ = images.shape
    angle = _uniform(generator, batch, -15.0, 15.0) * math.pi / 180.0
    scale = _uniform(generator, batch, 0.9, 1.1)
    shear = _uniform(generator, batch, -0.15, 0.15)
    shift = _uniform(generator, 2 * batch, -1.0, 1.0).reshape(batch, 2) * 2.0 / size  # pixels → [-1, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # Output → input sampling map: rotation/scale composed with a shear along x, then a shift.
    theta = torch.stack(
        [
            torch.stack([cos, -sin + shear * cos, shift[:, 0]], dim=1),
            torch.stack([sin, cos + shear * sin, shift[:, 1]], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    coarse = torch.randn(batch, 2, 4, 4, generator=generator) * 1.0 / size  # 0.5 px std, in grid units
    elastic = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    out = F.grid_sample(images, grid + elastic.permute(0, 2, 3, 1), mode="bilinear", align_corners=False)
    # One occluding square per image with probability 0.5, filled with a uniform grey.
    side = torch.randint(3, 7, (batch,), generator=generator)
    top = (torch.rand(batch, generator=generator) * (size - side + 1)).floor().long()
    left = (torch.rand(batch, generator=generator) * (size - side + 1)).floor().long()
    grey = torch.rand(batch, generator=generator)
    occlude = torch.rand(batch, generator=generator) < 0.5
    rows = torch.arange(size)
    inside_rows = (rows[None, :] >= top[:, None]) & (rows[None, :] < (top + side)[:, None])
    inside_cols = (rows[None, :] >= left[:, None]) & (rows[None, :] < (left + side)[:, None])
    mask = (inside_rows[:, :, None] & inside_cols[:, None, :] & occlude[:, None, None]).unsqueeze(1)
    out = torch.where(mask, grey[:, None, None, None].expand_as(out), out)
    noise = 0.1 * torch.randn(out.shape, generator=generator)
    return (out + noise).clamp(0.0, 1.0)


def normalise(images: Tensor) -> Tensor:
    """[0, 1] → [-1, 1] (mean 0.5, std 0.5, as the models' default configs)."""
    return (images - 0.5) / 0.5


class Task:
    """Training and validation tensors of one task.

    Args:
        name: One of :data:`TASKS`.
        img_size: Image side after upscaling.
        val_limit: Keep only the first this many validation images (``None``: all).
    """

    def __init__(self, name: str, img_size: int, val_limit: int | None = None) -> None:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; choose from {TASKS}")
        self.name = name
        data = load_digits_tensors(img_size)
        self.train_x, self.train_y = data["train_x"], data["train_y"]
        val_x, val_y = data["val_x"], data["val_y"]
        if name == "digits-hard":
            generator = torch.Generator().manual_seed(VAL_DISTORTION_SEED)
            val_x = torch.cat([distort(val_x, generator) for _ in range(VAL_COPIES)])
            val_y = val_y.repeat(VAL_COPIES)
        if val_limit is not None:
            val_x, val_y = val_x[:val_limit], val_y[:val_limit]
        self.val_x, self.val_y = normalise(val_x), val_y

    def train_epoch(self, seed: int, epoch: int) -> tuple[Tensor, Tensor]:
        """The epoch's training images (normalised, shuffled) and labels; the same for every configuration."""
        generator = torch.Generator().manual_seed(1_000_003 * seed + epoch)
        order = torch.randperm(len(self.train_y), generator=generator)
        images = self.train_x[order]
        if self.name == "digits-hard":
            images = distort(images, generator)
        return normalise(images), self.train_y[order]

    def steps_per_epoch(self, batch: int, max_batches: int | None) -> int:
        """Optimiser steps in one epoch of ``train_epoch`` batches (at most ``max_batches``)."""
        steps = math.ceil(len(self.train_y) / batch)
        return steps if max_batches is None else min(steps, max_batches)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "img_size": int(self.train_x.shape[-1]),
            "n_train": len(self.train_y),
            "n_val": len(self.val_y),
            "augmentation": f"distort() afresh every epoch; validation distorted once (fixed seed), {VAL_COPIES} copies"
            if self.name == "digits-hard"
            else "none",
        }


# ------------------------------------------------------------------------------------- models
def build_model(options: dict[str, Any], img_size: int, patch_size: int) -> nn.Module:
    """The configuration's model (call after seeding): the digits 4 × 128 shape."""
    shape = {"img_size": img_size, "in_chans": 1, "patch_size": patch_size, "num_blocks": 4, "embed_dim": 128}
    if options.get("model", "imixer") == "mixer":
        return timm.create_model("mixer_t4_32", num_classes=NUM_CLASSES, **shape)
    return timm.create_model("imixer_t4_32", num_classes=NUM_CLASSES, **shape, **common.model_kwargs(options))


def implicit_layers(net: nn.Module) -> list[il.ImplicitMLP]:
    """The token mixers' implicit layers (none for the vanilla mixer or a reference-0 model)."""
    settings = getattr(net, "implicit_settings", None)
    return [] if settings is None or settings["reference_iterations"] == 0 else engine.implicit_layers(net)


# ------------------------------------------------------------------------------------ statistics
class IterationLog:
    """Per-block iteration counts of a sequence of solves (one record per forward or backward)."""

    def __init__(self, blocks: int) -> None:
        self.records: list[list[tuple[float, float, float]]] = [[] for _ in range(blocks)]

    def add(self, block: int, result: il.SolverResult | None) -> None:
        """Logs one solve of ``block`` (nothing if ``result`` is None); a fixed budget run (tol 0) is no failure."""
        if result is None:
            return
        nstep = result.nstep.float()
        unconverged = float((~result.succeeded).float().mean())
        self.records[block].append((float(nstep.mean()), float(nstep.max()), unconverged))

    def summary(self) -> list[dict[str, float]] | None:
        """Per block: nstep_mean, nstep_max, nstep_max_mean, unconverged, count; None if nothing was logged."""
        if not self.records or not any(self.records):
            return None
        out = []
        for records in self.records:
            means, maxes, unconverged = zip(*records, strict=True) if records else ((), (), ())
            out.append(
                {
                    "nstep_mean": statistics.fmean(means) if means else None,
                    "nstep_max": max(maxes) if maxes else None,
                    "nstep_max_mean": statistics.fmean(maxes) if maxes else None,
                    "unconverged": statistics.fmean(unconverged) if unconverged else None,
                    "count": len(records),
                }
            )
        return out


def lipschitz_of_weights(g: nn.Module) -> float:
    """Lipschitz bound of g for its current weights: exact spectral norms of the (normalised) linear layers."""
    bound = 1.0
    with torch.no_grad():
        for child in g:
            if isinstance(child, nn.Linear):
                bound *= float(torch.linalg.matrix_norm(child.weight.double(), ord=2))
            else:
                bound *= il.lipschitz_bound(child)
    return bound


@torch.no_grad()
def block_diagnostics(layer: il.ImplicitMLP, x: Tensor, z: Tensor) -> dict[str, Any]:
    """Inverse residual, distance to the true inverse, ρ(J_F(z*)) and bounds of one token mixer (eval mode).

    Args:
        layer: The token mixer's implicit layer (in eval mode: its spectral norms reuse their vectors).
        x: The layer's input, ``(..., T)``.
        z: The layer's output for ``x``.
    """
    g = copy.deepcopy(layer.g).double().eval()
    rows = x.reshape(-1, layer.features).double()
    zr = z.reshape(-1, layer.features).double()

    def f(v: Tensor) -> Tensor:
        return rows + g(v)

    inverse_residual = (zr - f(zr)).norm(dim=1) / zr.norm(dim=1).clamp_min(1e-30)
    true = il.solve(f, zr.clone(), **TRUE_SOLVE)
    z_star = true.z
    inverse_error = (zr - z_star).norm(dim=1) / z_star.norm(dim=1).clamp_min(1e-30)
    radius = il.spectral_radius(f, z_star, iters=SPECTRAL_RADIUS_ITERS, generator=torch.Generator().manual_seed(0))
    stats = layer.stats  # of the forward that produced z
    return {
        "inverse_residual_max": float(inverse_residual.max()),
        "inverse_residual_mean": float(inverse_residual.mean()),
        "inverse_error_max": float(inverse_error.max()),
        "inverse_error_mean": float(inverse_error.mean()),
        "true_solve_residual_max": float(true.residual.max()),
        "true_solve_converged": float(true.converged.float().mean()),
        "spectral_radius_mean": float(radius.mean()),
        "spectral_radius_max": float(radius.max()),
        "lipschitz_bound": il.lipschitz_bound(layer.g),
        "lipschitz_weights": lipschitz_of_weights(layer.g),
        "eval_tol": float(stats.budget.tol),
        "unconverged": float((~stats.succeeded).float().mean()),
    }


# --------------------------------------------------------------------------------------- training
class OneCycle:
    """torch's one-cycle schedule, stepped the way ``engine.Trainer`` steps timm's (``step_update``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, steps: int) -> None:
        self.schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)

    def step_update(self, num_updates: int) -> None:
        self.schedule.step()


class Run:
    """One configuration trained under one seed by ``engine.train_one_epoch``, and its per-epoch records."""

    def __init__(self, name: str, options: dict[str, Any], seed: int, args: argparse.Namespace, steps: int) -> None:
        self.name, self.options, self.seed = name, options, seed
        torch.manual_seed(seed)
        self.net = build_model(options, args.img_size, args.patch_size)
        self.layers = implicit_layers(self.net)
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        weight = float(options.get("jac_weight", 0.0))
        self.trainer = engine.Trainer(self.net, optimizer, OneCycle(optimizer, args.lr, steps), jacobian_weight=weight)
        self.epochs: list[dict[str, Any]] = []

    def train_epoch(self, images: Tensor, labels: Tensor, batch: int, max_batches: int | None) -> dict[str, Any]:
        forward, backward = IterationLog(len(self.layers)), IterationLog(len(self.layers))
        jac_losses: list[float] = []
        batches = [(images[s : s + batch], labels[s : s + batch]) for s in range(0, len(labels), batch)]
        batches = batches[:max_batches]

        def log(_index: int, _meters: engine.EpochMeters) -> None:
            for block, layer in enumerate(self.layers):
                forward.add(block, layer.stats)
                backward.add(block, layer.backward_stats)
                layer.backward_stats = None  # so that a mode without an adjoint solve logs nothing
            if self.trainer.jacobian_weight and (penalty := self.net.jacobian_loss()) is not None:
                jac_losses.append(float(penalty))

        metrics = engine.train_one_epoch(self.trainer, batches, LOSS, progress=log, clock=time.perf_counter)
        return {
            "train_loss": metrics["train_loss"],
            "jac_loss": sum(jac_losses) / len(jac_losses) if jac_losses else None,
            "train_seconds": metrics["epoch_seconds"],
            "train_steps": len(batches),
            "train_forward": forward.summary(),
            "backward": backward.summary(),
        }

    @torch.no_grad()
    def evaluate(self, task: Task, diag_batch: int, eval_batch: int = 512) -> dict[str, Any]:
        self.net.eval()
        tick = time.perf_counter()
        forward = IterationLog(len(self.layers))
        correct = 0
        for start in range(0, len(task.val_y), eval_batch):
            logits = self.net(task.val_x[start : start + eval_batch])
            correct += int((logits.argmax(dim=1) == task.val_y[start : start + eval_batch]).sum())
            for block, layer in enumerate(self.layers):
                forward.add(block, layer.stats)
        record = {
            "val_top1": 100.0 * correct / len(task.val_y),
            "eval_forward": forward.summary(),
            "diagnostics": self.diagnose(task.val_x[:diag_batch]) if self.layers else None,
        }
        record["eval_seconds"] = time.perf_counter() - tick
        return record

    def diagnose(self, images: Tensor) -> list[dict[str, Any]]:
        captured: list[tuple[Tensor, Tensor] | None] = [None] * len(self.layers)

        def hook(block: int) -> Callable:
            def keep(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                captured[block] = (inputs[0].detach(), output.detach())

            return keep

        handles = [layer.register_forward_hook(hook(block)) for block, layer in enumerate(self.layers)]
        try:
            self.net(images)
        finally:
            for handle in handles:
                handle.remove()
        return [block_diagnostics(layer, *captured[block]) for block, layer in enumerate(self.layers)]


def run_task(
    task: Task, configs: list[tuple[str, dict[str, Any]]], args: argparse.Namespace, log: Callable[[str], None]
) -> dict[str, Any]:
    """Trains every configuration for every seed, interleaved by epoch; returns the task's results."""
    steps_per_epoch = task.steps_per_epoch(args.batch, args.max_batches)
    runs = []
    for seed in args.seeds:
        seed_runs = [Run(name, options, seed, args, steps_per_epoch * args.epochs) for name, options in configs]
        for run in seed_runs:
            untrained = {"train_loss": None, "jac_loss": None, "train_seconds": 0.0, "train_steps": 0}
            untrained.update(train_forward=None, backward=None)
            run.epochs.append({"epoch": 0, **untrained, **run.evaluate(task, args.diag_batch)})
        for epoch in range(1, args.epochs + 1):
            images, labels = task.train_epoch(seed, epoch)
            for run in seed_runs:
                record = {"epoch": epoch, **run.train_epoch(images, labels, args.batch, args.max_batches)}
                record.update(run.evaluate(task, args.diag_batch))
                run.epochs.append(record)
                residual = render.worst(record["diagnostics"], "inverse_residual_max")
                log(
                    f"  {task.name:11s} seed {seed} epoch {epoch:2d} {run.name:18s} loss {record['train_loss']:.3f} "
                    f"val {record['val_top1']:6.2f} %  train {record['train_seconds']:6.1f} s  "
                    f"fwd max {render.worst(record['train_forward'], 'nstep_max')}  res {render.fmt(residual, '.1e')}"
                )
        runs += [{"config": run.name, "seed": seed, "epochs": run.epochs} for run in seed_runs]
    return {
        "task": task.describe(),
        "configs": [
            {"name": name, "options": options, "is_default": common.is_default(options)} for name, options in configs
        ],
        "runs": runs,
        "summary": render.summarise(runs, [name for name, _ in configs]),
    }


# -------------------------------------------------------------------------------------------- main
def write_outputs(results: dict[str, Any], table: str, directory: Path) -> list[Path]:
    paths = common.write(directory, "imixer_training", results, table, indent=1)
    for name, task in results["tasks"].items():
        paths.append(directory / f"imixer_training_{name}.png")
        render.plot_training(task, paths[-1])
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints progress and the tables, writes the outputs; returns the results."""
    parser = argparse.ArgumentParser(description="iMixer training dynamics: iterations, inverse accuracy, cost.")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["digits"])
    parser.add_argument(
        "--configs", nargs="+", default=None,
        help=f"preset names {sorted(common.PRESETS)} or name=key:value,... (default {list(DEFAULT_CONFIGS)})",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 5; 1 with --quick)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 64; 32 with --quick)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--max-batches", type=int, default=None, help="training batches per epoch (default: all)")
    parser.add_argument("--val-limit", type=int, default=None, help="validation images kept (default: all)")
    parser.add_argument("--diag-batch", type=int, default=None, help="validation images of the diagnostics (64)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch of 3 batches of 32: for the test")
    parser.add_argument("--out", type=Path, default=common.RESULTS, help="output directory")
    parser.add_argument("--docs", action="store_true", help=f"also write the outputs to {DOCS_DIR}")
    parser.add_argument(
        "--render", metavar="JSON", nargs="+", type=Path, default=None,
        help="no training: re-render the table and plots of results JSONs (several: their tasks merged)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    directories = [args.out] + ([DOCS_DIR] if args.docs else [])
    if args.render:
        import json

        results = render.merge([json.loads(path.read_text(encoding="utf-8")) for path in args.render])
        table = render.training_markdown(results)
        print(table)
        for directory in directories:
            write_outputs(results, table, directory)
        return results
    quick = QUICK if args.quick else {}
    args.seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    args.epochs = args.epochs if args.epochs is not None else (1 if args.quick else 5)
    args.batch = args.batch or quick.get("batch", 64)
    args.max_batches = args.max_batches or quick.get("max_batches")
    args.val_limit = args.val_limit or quick.get("val_limit")
    args.diag_batch = args.diag_batch or quick.get("diag_batch", 64)
    args.threads = args.threads or quick.get("threads", 2)
    if not args.seeds or args.epochs < 1 or args.batch < 1 or args.diag_batch < 1:
        parser.error("--seeds, --epochs, --batch and --diag-batch must be >= 1")
    if args.img_size % args.patch_size:
        parser.error(f"--img-size {args.img_size} is not a multiple of --patch-size {args.patch_size}")
    try:
        configs = [common.parse_config(spec) for spec in (args.configs or DEFAULT_CONFIGS)]
        if "mixer" not in [name for name, _ in configs]:
            configs.insert(0, common.parse_config("mixer"))
        names = [name for name, _ in configs]
        if len(set(names)) != len(names):
            raise ValueError(f"configuration names must be unique, got {names}")
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    setup = {key: getattr(args, key) for key in ("quick", "tasks", "seeds", "epochs", "batch", "lr", "weight_decay")}
    setup |= {key: getattr(args, key) for key in ("img_size", "patch_size", "max_batches", "val_limit", "diag_batch")}
    setup |= {"threads": args.threads, "true_solve": TRUE_SOLVE, "spectral_radius_iters": SPECTRAL_RADIUS_ITERS}
    setup["defaults"] = IMixerSettings().to_dict()  # the library's defaults when this ran
    results: dict[str, Any] = {"config": setup, "machine": common.machine("cpu"), "tasks": {}}
    info = results["machine"]
    threads = f"{info['cpu_count']} CPUs ({info['torch_threads']} threads)"
    print(f"{info['date_utc']} UTC | {info['platform']} | {threads} | torch {info['torch']} | timm {info['timm']}")
    with warnings.catch_warnings():
        # Unconverged solves are recorded (``unconverged``), not warned about.
        warnings.simplefilter("ignore", il.ConvergenceWarning)
        warnings.simplefilter("ignore", il.LipschitzWarning)
        for task_name in args.tasks:
            task = Task(task_name, args.img_size, args.val_limit)
            results["tasks"][task_name] = run_task(task, configs, args, lambda line: print(line, flush=True))
            results["tasks"][task_name].update(epochs=args.epochs, seeds=args.seeds)
    results["seconds"] = time.perf_counter() - start
    table = render.training_markdown(results)
    print(table)
    written = [path for directory in directories for path in write_outputs(results, table, directory)]
    print("wrote " + ", ".join(str(path) for path in written))
    return results


if __name__ == "__main__":
    main()
