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
path, ``--threads`` torch threads (2 by default; on a 2-core machine shared with other jobs one
thread is several times faster and steadier). Every configuration of one seed starts from
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

**Configurations** (``--configs``): preset names (:data:`PRESETS`) or ``name=key:value,...`` with the
keys of :data:`OPTION_KEYS`; ``mixer`` is always run (first) as the baseline of the ratios.

* model options: ``model`` (``imixer`` or ``mixer``), and every field of the iMixer's
  :class:`IMixerSettings` (``solver``, ``backward``, ``tol``, ``max_iter``, ``activation``,
  ``shine_refine``, ``backward_tol``, ``eval_tol``, ``reference_iterations``, ...), passed to
  ``timm.create_model`` and validated by :meth:`IMixerSettings.build` before any training;
* training options: ``jac_weight`` (weight of the Jacobian penalty added to the loss: the sum over
  blocks of the layers' ``jacobian_loss``, ‖J_F(z*)‖_F²/dim, Bai et al. 2021) and ``jac_samples``
  (its Hutchinson samples per forward, default 1).

**Measured, per epoch, configuration, seed and block** (``imixer_training.json`` holds every number):

* ``train_loss`` (mean smoothed cross-entropy over the epoch's batches), ``val_top1`` (%),
  ``train_seconds`` (sum over the epoch's steps of forward + loss + backward + optimiser and schedule
  step; data preparation and all diagnostics excluded), ``jac_loss``.
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

``--render JSON`` re-renders the table and plots of an earlier run's JSON without training.

``--quick`` (the test's run, seconds): 1 seed, 1 epoch of 3 batches of 32, 128 validation images,
a diagnostic batch of 8, ``digits`` with mixer, imixer and reference-2, 1 thread.

Usage::

    python benchmarks/imixer_training.py                      # digits, 3 seeds, 5 epochs, 3 configs
    python benchmarks/imixer_training.py --tasks digits digits-hard --docs
    python benchmarks/imixer_training.py --configs imixer reference-2 "lipswish=activation:lipswish" \\
        "jac=jac_weight:0.5" "shine=solver:broyden,backward:shine,shine_refine:2" --seeds 2 --epochs 8
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import sys
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import imixer_step  # noqa: E402  (the machine description both benchmarks record)

import implicitlayers as il  # noqa: E402
from examples.imixer import imixer as imixer_model  # noqa: E402  (registers imixer_t4_32 / mixer_t4_32)

TASKS = ("digits", "digits-hard")
DOCS_DIR = REPO / "docs" / "assets" / "imixer_training"
NUM_CLASSES = 10
VAL_COPIES = 4  # distorted copies of each validation digit in digits-hard
VAL_DISTORTION_SEED = 12345  # the fixed digits-hard validation set

# Option keys a configuration may set: the iMixer's settings fields, and the training loop's.
MODEL_KEYS = tuple(field.name for field in dataclasses.fields(imixer_model.IMixerSettings))
TRAINING_KEYS = ("jac_weight", "jac_samples")
OPTION_KEYS = ("model", *MODEL_KEYS, *TRAINING_KEYS)

PRESETS: dict[str, dict[str, Any]] = {
    "mixer": {"model": "mixer"},
    "imixer": {},  # the library's defaults
    "exact": {"solver": "anderson", "backward": "ift", "tol": 1e-3, "activation": "gelu"},  # the paper's map, IFT
    "reference-1": {"reference_iterations": 1},
    "reference-2": {"reference_iterations": 2},
    "reference-4": {"reference_iterations": 4},
    "picard-jfb-1e-2": {"solver": "picard", "backward": "jfb", "tol": 1e-2},
    "anderson-1e-2": {"tol": 1e-2},
    "lipswish": {"activation": "lipswish"},
    "coeff-0.85": {"coeff": 0.85},
    "jac-0.5": {"jac_weight": 0.5},
    "shine-2": {"solver": "broyden", "backward": "shine", "shine_refine": 2},
}
DEFAULT_CONFIGS = ("mixer", "imixer", "reference-2")
QUICK = {"batch": 32, "max_batches": 3, "val_limit": 128, "diag_batch": 8, "threads": 1}
# The true inverse (1 - F)^{-1}(x) the diagnostics compare against.
TRUE_SOLVE = {"solver": "anderson", "tol": 1e-10, "max_iter": 300}
SPECTRAL_RADIUS_ITERS = 30


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


# -------------------------------------------------------------------------------- configurations
def parse_value(text: str) -> Any:
    """``"2"`` → 2, ``"1e-3"`` → 0.001, ``"true"`` → True, ``"none"`` → None, else the string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_config(spec: str) -> tuple[str, dict[str, Any]]:
    """A preset name, or ``name=key:value,...`` (``name=`` alone: the defaults); checks the keys.

    Raises:
        ValueError: Unknown preset, malformed item or unknown key.
    """
    if "=" not in spec:
        if spec not in PRESETS:
            raise ValueError(
                f"unknown configuration {spec!r}: presets are {sorted(PRESETS)}, or use name=key:value,..."
            )
        return spec, dict(PRESETS[spec])
    name, _, body = spec.partition("=")
    if not name:
        raise ValueError(f"configuration {spec!r} has no name before '='")
    options: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"configuration {spec!r}: item {item!r} is not key:value")
        if key not in OPTION_KEYS:
            raise ValueError(f"configuration {spec!r}: unknown key {key!r}; known: {list(OPTION_KEYS)}")
        options[key] = parse_value(value)
    return name, options


def validate_options(name: str, options: dict[str, Any]) -> None:
    """Builds a throwaway layer with the options, so bad values fail before any training."""
    model = options.get("model", "imixer")
    if model not in ("imixer", "mixer"):
        raise ValueError(f"configuration {name!r}: model must be 'imixer' or 'mixer', got {model!r}")
    if model == "mixer":
        extra = sorted(set(options) - {"model"})
        if extra:
            raise ValueError(f"configuration {name!r}: the vanilla mixer takes no options, got {extra}")
        return
    fields = {k: options[k] for k in MODEL_KEYS if k in options and k != "reference_iterations"}
    if options.get("jac_weight", 0.0):
        fields["jacobian_penalty"] = options.get("jac_samples", 1)
    try:
        imixer_model.IMixerSettings.build(options.get("reference_iterations"), **fields)
    except (ValueError, TypeError) as error:
        raise ValueError(f"configuration {name!r}: {error}") from None


def build_model(options: dict[str, Any], img_size: int, patch_size: int) -> nn.Module:
    """The configuration's model (call after seeding); layer options set on every token mixer."""
    shape = {
        "img_size": img_size,
        "in_chans": 1,
        "patch_size": patch_size,
        "num_blocks": 4,
        "embed_dim": 128,
        "num_classes": NUM_CLASSES,
    }
    if options.get("model", "imixer") == "mixer":
        return timm.create_model("mixer_t4_32", **shape)
    fields = {k: options[k] for k in MODEL_KEYS if k in options}
    if options.get("jac_weight", 0.0):
        fields["jacobian_penalty"] = int(options.get("jac_samples", 1))
    return timm.create_model("imixer_t4_32", **shape, **fields)


def implicit_layers(net: nn.Module) -> list[il.ImplicitMLP]:
    """The token mixers' implicit layers (none for the vanilla mixer or a reference-0 model)."""
    if not hasattr(net, "implicit_layers"):
        return []
    if net.implicit_settings["reference_iterations"] == 0:
        return []
    return net.implicit_layers()


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
class Run:
    """One configuration trained under one seed: model, optimiser, schedule and the per-epoch records."""

    def __init__(self, name: str, options: dict[str, Any], seed: int, args: argparse.Namespace, steps: int) -> None:
        self.name, self.options, self.seed = name, options, seed
        torch.manual_seed(seed)
        self.net = build_model(options, args.img_size, args.patch_size)
        self.layers = implicit_layers(self.net)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        self.schedule = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=args.lr, total_steps=steps)
        self.jac_weight = float(options.get("jac_weight", 0.0))
        self.epochs: list[dict[str, Any]] = []

    def train_epoch(self, images: Tensor, labels: Tensor, batch: int, max_batches: int | None) -> dict[str, Any]:
        self.net.train()
        forward, backward = IterationLog(len(self.layers)), IterationLog(len(self.layers))
        losses, jac_losses, seconds = [], [], 0.0
        starts = list(range(0, len(labels), batch))[:max_batches]
        for start in starts:
            x, y = images[start : start + batch], labels[start : start + batch]
            for layer in self.layers:
                layer.backward_stats = None  # so that a mode without an adjoint solve logs nothing
            tick = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.net(x), y, label_smoothing=0.1)
            jac = None
            if self.jac_weight:
                jac = sum(layer.jacobian_loss for layer in self.layers if layer.jacobian_loss is not None)
                total = loss + self.jac_weight * jac
            else:
                total = loss
            total.backward()
            self.optimizer.step()
            self.schedule.step()
            seconds += time.perf_counter() - tick
            losses.append(float(loss.detach()))
            if jac is not None:
                jac_losses.append(float(jac.detach()))
            for block, layer in enumerate(self.layers):
                forward.add(block, layer.stats)
                backward.add(block, layer.backward_stats)
        return {
            "train_loss": statistics.fmean(losses),
            "jac_loss": statistics.fmean(jac_losses) if jac_losses else None,
            "train_seconds": seconds,
            "train_steps": len(starts),
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
                log(
                    f"  {task.name:11s} seed {seed} epoch {epoch:2d} {run.name:18s} loss {record['train_loss']:.3f} "
                    f"val {record['val_top1']:6.2f} %  train {record['train_seconds']:6.1f} s  "
                    f"fwd max {_worst(record['train_forward'], 'nstep_max')}  "
                    f"res {_fmt(_worst(record['diagnostics'], 'inverse_residual_max'), '.1e')}"
                )
        runs += [{"config": run.name, "seed": seed, "epochs": run.epochs} for run in seed_runs]
    return {
        "task": task.describe(),
        "configs": [{"name": name, "options": options} for name, options in configs],
        "runs": runs,
        "summary": summarise(runs, [name for name, _ in configs]),
    }


# --------------------------------------------------------------------------------------- summaries
def _worst(blocks: list[dict[str, Any]] | None, key: str) -> float | None:
    """Max of ``key`` over blocks (None when there are no blocks or no values)."""
    values = [block[key] for block in blocks or [] if block.get(key) is not None]
    return max(values) if values else None


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(runs: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Per configuration, means (± sample std over seeds) of the table's quantities."""
    by_config = {name: [run for run in runs if run["config"] == name] for name in names}
    mixer_seconds = {run["seed"]: sum(e["train_seconds"] for e in run["epochs"]) for run in by_config.get("mixer", [])}
    rows = []
    for name, config_runs in by_config.items():
        total = {run["seed"]: sum(e["train_seconds"] for e in run["epochs"]) for run in config_runs}
        epochs = len(config_runs[0]["epochs"]) - 1
        first, last = [run["epochs"][0] for run in config_runs], [run["epochs"][-1] for run in config_runs]
        row: dict[str, Any] = {"config": name, "seeds": len(config_runs), "epochs": epochs}
        row["val_top1_mean"], row["val_top1_std"] = _mean_std([e["val_top1"] for e in last])
        row["train_seconds_per_epoch"] = statistics.fmean(total.values()) / max(epochs, 1)
        ratios = [total[seed] / mixer_seconds[seed] for seed in total if mixer_seconds.get(seed)]
        row["ratio_to_mixer_mean"], row["ratio_to_mixer_std"] = _mean_std(ratios)
        quantities = {
            "eval_fwd_max_init": [_worst(e["eval_forward"], "nstep_max") for e in first],
            "eval_fwd_max_end": [_worst(e["eval_forward"], "nstep_max") for e in last],
            "train_fwd_mean_end": [_worst(e["train_forward"], "nstep_mean") for e in last],
            "train_fwd_max_mean_end": [_worst(e["train_forward"], "nstep_max_mean") for e in last],
            "train_fwd_max_end": [_worst(e["train_forward"], "nstep_max") for e in last],
            "bwd_mean_end": [_worst(e["backward"], "nstep_mean") for e in last],
            "bwd_max_end": [_worst(e["backward"], "nstep_max") for e in last],
            "inverse_residual_init": [_worst(e["diagnostics"], "inverse_residual_max") for e in first],
            "inverse_residual_end": [_worst(e["diagnostics"], "inverse_residual_max") for e in last],
            "inverse_error_end": [_worst(e["diagnostics"], "inverse_error_max") for e in last],
            "spectral_radius_init": [_worst(e["diagnostics"], "spectral_radius_max") for e in first],
            "spectral_radius_end": [_worst(e["diagnostics"], "spectral_radius_max") for e in last],
            "lipschitz_bound_end": [_worst(e["diagnostics"], "lipschitz_bound") for e in last],
            "lipschitz_weights_end": [_worst(e["diagnostics"], "lipschitz_weights") for e in last],
        }
        for key, values in quantities.items():
            row[key] = _mean_std(values)[0]
        rows.append(row)
    return rows


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pm(mean: float | None, std: float | None, spec: str) -> str:
    if mean is None:
        return "-"
    return f"{mean:{spec}} ± {std:{spec}}" if std is not None else f"{mean:{spec}}"


def _pair(a: float | None, b: float | None, spec: str, sep: str = " / ") -> str:
    return "-" if a is None and b is None else f"{_fmt(a, spec)}{sep}{_fmt(b, spec)}"


def options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items()) or "defaults"


TABLE_HEADER = (
    "| config | options | val top-1 % | train s / epoch | × mixer | eval fwd iters, worst block max: init → end "
    "| train fwd iters end: mean / slowest row (mean, max) | bwd iters end: mean / max "
    "| inverse residual: init → end | ‖z − z*‖ / ‖z*‖ end | ρ(J_F) max: init → end | Lip bound: certified / weights |"
)


def markdown(results: dict[str, Any]) -> str:
    """The summary tables, one per task (a function of the JSON alone, so the test can re-derive it)."""
    info, setup = results["machine"], results["config"]
    lines = [
        f"# iMixer training dynamics ({info['date_utc']} UTC, {info['cpu_count']} CPUs, "
        f"{info['torch_threads']} torch threads, torch {info['torch']}, timm {info['timm']})",
        "",
        f"Model: imixer_t4_32 / mixer_t4_32 with num_blocks 4, embed_dim 128, img_size {setup['img_size']}, "
        f"patch {setup['patch_size']}. Recipe: AdamW lr {setup['lr']:g} (one-cycle), weight decay "
        f"{setup['weight_decay']:g}, batch {setup['batch']}, label smoothing 0.1{' (quick)' if setup['quick'] else ''}"
        ". Val top-1 and ratios: mean ± std over "
        "seeds; iterations, residuals, ρ and bounds: worst block, mean over seeds; inverse residual = max over "
        "rows of ‖z − x − F(z)‖ / ‖z‖, z* = the float64 solve of z = x + F(z).",
    ]
    for task_name, task in results["tasks"].items():
        described = task["task"]
        options = {config["name"]: config["options"] for config in task["configs"]}
        lines += [
            "",
            f"## {task_name} ({described['n_train']} train / {described['n_val']} val images, "
            f"augmentation: {described['augmentation']}; {task.get('epochs', setup['epochs'])} epochs, "
            f"seeds {task.get('seeds', setup['seeds'])})",
            "",
            TABLE_HEADER,
            "|" + "---|" * 2 + "---:|" * 10,
        ]
        for row in task["summary"]:
            lines.append(
                "| "
                + " | ".join(
                    [
                        row["config"],
                        options_text(options[row["config"]]),
                        _pm(row["val_top1_mean"], row["val_top1_std"], ".2f"),
                        _fmt(row["train_seconds_per_epoch"], ".2f"),
                        _pm(row["ratio_to_mixer_mean"], row["ratio_to_mixer_std"], ".2f"),
                        _pair(row["eval_fwd_max_init"], row["eval_fwd_max_end"], ".1f", " → "),
                        "-"
                        if row["train_fwd_mean_end"] is None
                        else f"{row['train_fwd_mean_end']:.2f} / "
                        f"{row['train_fwd_max_mean_end']:.2f}, {row['train_fwd_max_end']:.1f}",
                        _pair(row["bwd_mean_end"], row["bwd_max_end"], ".2f"),
                        _pair(row["inverse_residual_init"], row["inverse_residual_end"], ".2e", " → "),
                        _fmt(row["inverse_error_end"], ".2e"),
                        _pair(row["spectral_radius_init"], row["spectral_radius_end"], ".3f", " → "),
                        _pair(row["lipschitz_bound_end"], row["lipschitz_weights_end"], ".3f"),
                    ]
                )
                + " |"
            )
    lines += ["", f"Total {results['seconds']:.0f} s."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- plots
def _curve(runs: list[dict[str, Any]], value: Callable[[dict[str, Any]], float | None]) -> tuple[list, list]:
    """Epochs and the mean over seeds of ``value(epoch record)`` where every seed has a value."""
    epochs, means = [], []
    for index in range(len(runs[0]["epochs"])):
        values = [value(run["epochs"][index]) for run in runs]
        if values and all(v is not None for v in values):
            epochs.append(runs[0]["epochs"][index]["epoch"])
            means.append(statistics.fmean(values))
    return epochs, means


def plot(task: dict[str, Any], path: Path) -> None:
    """Six panels per epoch, one line per configuration (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    panels = [
        ("val top-1 (%)", lambda e: e["val_top1"], "linear"),
        (
            "train fwd iterations, worst block\n(mean over forwards of the slowest row)",
            lambda e: _worst(e["train_forward"], "nstep_max_mean"),
            "linear",
        ),
        (
            "bwd iterations, worst block\n(mean over backwards of the slowest row)",
            lambda e: _worst(e["backward"], "nstep_max_mean"),
            "linear",
        ),
        (
            "ρ(J_F(z*)) max over rows, worst block\n(dashed: Lipschitz bound of the weights)",
            lambda e: _worst(e["diagnostics"], "spectral_radius_max"),
            "linear",
        ),
        (
            "inverse residual ‖z − x − F(z)‖/‖z‖\n(max over rows, worst block)",
            lambda e: _worst(e["diagnostics"], "inverse_residual_max"),
            "log",
        ),
        ("train loss", lambda e: e["train_loss"], "linear"),
    ]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = [config["name"] for config in task["configs"]]
    for ax, (title, value, scale) in zip(axes.flat, panels, strict=True):
        for index, name in enumerate(names):
            runs = [run for run in task["runs"] if run["config"] == name]
            color = colors[index % len(colors)]
            epochs, means = _curve(runs, value)
            if epochs:
                ax.plot(epochs, means, marker="o", ms=3, color=color, label=name)
            if title.startswith("ρ"):
                epochs, means = _curve(runs, lambda e: _worst(e["diagnostics"], "lipschitz_weights"))
                if epochs:
                    ax.plot(epochs, means, ls="--", color=color, lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"iMixer training dynamics: {task['task']['name']} (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- main
def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from several runs' (say, one task per run, each with its own epochs).

    The first run's machine and settings head the table; every task keeps its own epochs and seeds,
    and its ratios are those of its own run (measured side by side there). A task in several runs is
    taken from the last. Total seconds add up.
    """
    merged = copy.deepcopy(runs[0])
    for run in runs[1:]:
        for name, task in run["tasks"].items():
            merged["tasks"][name] = {"epochs": run["config"]["epochs"], "seeds": run["config"]["seeds"], **task}
        merged["seconds"] += run["seconds"]
    return merged


def write_outputs(results: dict[str, Any], table: str, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "imixer_training.json", directory / "imixer_training.md"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    paths[1].write_text(table + "\n", encoding="utf-8")
    for name, task in results["tasks"].items():
        paths.append(directory / f"imixer_training_{name}.png")
        plot(task, paths[-1])
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints progress and the tables, writes the outputs; returns the results."""
    parser = argparse.ArgumentParser(description="iMixer training dynamics: iterations, inverse accuracy, cost.")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["digits"])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=None,
        help=f"preset names {sorted(PRESETS)} or name=key:value,... (default {list(DEFAULT_CONFIGS)})",
    )
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
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="output directory")
    parser.add_argument("--docs", action="store_true", help=f"also write the outputs to {DOCS_DIR.relative_to(REPO)}")
    parser.add_argument(
        "--render",
        metavar="JSON",
        nargs="+",
        default=None,
        help="no training: re-render the table and plots of results JSONs (several: their tasks merged)",
    )
    args = parser.parse_args(argv)
    if args.render:
        results = merge([json.loads(Path(path).read_text(encoding="utf-8")) for path in args.render])
        table = markdown(results)
        print(table)
        for directory in [Path(args.out)] + ([DOCS_DIR] if args.docs else []):
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
        configs = [parse_config(spec) for spec in (args.configs or DEFAULT_CONFIGS)]
        if "mixer" not in [name for name, _ in configs]:
            configs.insert(0, ("mixer", dict(PRESETS["mixer"])))
        names = [name for name, _ in configs]
        if len(set(names)) != len(names):
            raise ValueError(f"configuration names must be unique, got {names}")
        for name, options in configs:
            validate_options(name, options)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "config": {
            "quick": args.quick,
            "tasks": args.tasks,
            "seeds": args.seeds,
            "epochs": args.epochs,
            "batch": args.batch,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "img_size": args.img_size,
            "patch_size": args.patch_size,
            "max_batches": args.max_batches,
            "val_limit": args.val_limit,
            "diag_batch": args.diag_batch,
            "threads": args.threads,
            "true_solve": TRUE_SOLVE,
            "spectral_radius_iters": SPECTRAL_RADIUS_ITERS,
        },
        "machine": imixer_step.machine_info(torch.device("cpu")),
        "tasks": {},
    }
    info = results["machine"]
    print(
        f"{info['date_utc']} UTC | {info['platform']} | {info['cpu_count']} CPUs ({info['torch_threads']} threads) "
        f"| torch {info['torch']} | timm {info['timm']}",
        flush=True,
    )
    with warnings.catch_warnings():
        # Unconverged solves are recorded (``unconverged``), not warned about.
        warnings.simplefilter("ignore", il.ConvergenceWarning)
        warnings.simplefilter("ignore", il.LipschitzWarning)
        for task_name in args.tasks:
            task = Task(task_name, args.img_size, args.val_limit)
            results["tasks"][task_name] = run_task(task, configs, args, lambda line: print(line, flush=True))
            results["tasks"][task_name].update(epochs=args.epochs, seeds=args.seeds)
    results["seconds"] = time.perf_counter() - start
    table = markdown(results)
    print(table)
    written = write_outputs(results, table, Path(args.out))
    if args.docs:
        written += write_outputs(results, table, DOCS_DIR)
    print("wrote " + ", ".join(str(path) for path in written))
    return results


if __name__ == "__main__":
    main()
