"""What training does to the iMixer's implicit layers: iterations, inverse accuracy, contraction, cost (issue 11).

Usage: ``python -m benchmarks.imixer_training [--quick] [--tasks digits digits-hard] [--configs ...] [--docs]``,
or ``--render a.json b.json`` to re-render earlier results without training.
Method, measures and outputs: benchmarks/README.md, section "What training does to the iMixer".
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicitlayers as il
from benchmarks import common, render
from examples.common import OneLineArgumentParser, float_range, int_range
from examples.imixer import engine
from examples.imixer.data import DigitsDataset
from examples.imixer.imixer import IMixerSettings

TASKS = ("digits", "digits-hard")
DOCS_DIR = common.REPO / "docs" / "assets" / "imixer_training"
DEFAULT_CONFIGS = ("mixer", "imixer", "reference-2")
VAL_COPIES, VAL_DISTORTION_SEED = 4, 12345  # digits-hard's fixed validation set: 4 distorted copies of each digit
# Run sizes the command line leaves unset: the full run's, and --quick's (the test's run, seconds).
FULL = {"seeds": 3, "epochs": 5, "batch": 64, "max_batches": None, "val_limit": None, "diag_batch": 64, "threads": 2}
QUICK = {"seeds": 1, "epochs": 1, "batch": 32, "max_batches": 3, "val_limit": 128, "diag_batch": 8, "threads": 1}
TRUE_SOLVE = {"solver": "anderson", "tol": 1e-10, "max_iter": 300}  # the true inverse (1 - F)^{-1}(x), in float64
SPECTRAL_RADIUS_ITERS = 30
LOSS = nn.CrossEntropyLoss(label_smoothing=0.1)


def load_digits_tensors(img_size: int) -> dict[str, Tensor]:
    """scikit-learn's digits split of ``examples/imixer/data.py``, upscaled bilinearly to ``img_size``, in [0, 1].

    Returns ``train_x`` (1437, 1, S, S), ``train_y`` (1437,), ``val_x`` (360, 1, S, S) and ``val_y`` (360,).
    """
    tensors = {}
    for split, dataset in (("train", DigitsDataset(True)), ("val", DigitsDataset(False))):
        images = (torch.from_numpy(dataset.images).float() / 255.0).unsqueeze(1)
        if img_size != images.shape[-1]:
            images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
        tensors[f"{split}_x"], tensors[f"{split}_y"] = images.clamp(0.0, 1.0), torch.from_numpy(dataset.targets)
    return tensors


def distort(images: Tensor, generator: torch.Generator) -> Tensor:
    """``digits-hard``'s random warp, occluding square and noise of ``(B, 1, S, S)`` images in [0, 1]."""
    batch, _, size, _ = images.shape

    def uniform(n: int, low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(batch, -15.0, 15.0) * math.pi / 180.0
    scale, shear = uniform(batch, 0.9, 1.1), uniform(batch, -0.15, 0.15)
    shift = uniform(2 * batch, -1.0, 1.0).reshape(batch, 2) * 2.0 / size  # pixels → [-1, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # Output → input sampling map: rotation/scale composed with a shear along x, then a shift.
    row_x = torch.stack([cos, -sin + shear * cos, shift[:, 0]], dim=1)
    row_y = torch.stack([sin, cos + shear * sin, shift[:, 1]], dim=1)
    grid = F.affine_grid(torch.stack([row_x, row_y], dim=1), list(images.shape), align_corners=False)
    coarse = torch.randn(batch, 2, 4, 4, generator=generator) / size  # 0.5 px std in grid units (2 / size per px)
    elastic = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    out = F.grid_sample(images, grid + elastic.permute(0, 2, 3, 1), mode="bilinear", align_corners=False)
    # One occluding square per image with probability 0.5, filled with a uniform grey.
    side = torch.randint(3, 7, (batch,), generator=generator)
    top = (torch.rand(batch, generator=generator) * (size - side + 1)).floor().long()
    left = (torch.rand(batch, generator=generator) * (size - side + 1)).floor().long()
    grey, occlude = torch.rand(batch, generator=generator), torch.rand(batch, generator=generator) < 0.5
    pixels = torch.arange(size)
    inside_rows = (pixels >= top[:, None]) & (pixels < (top + side)[:, None])  # (B, S)
    inside_cols = (pixels >= left[:, None]) & (pixels < (left + side)[:, None])
    mask = (inside_rows[:, :, None] & inside_cols[:, None, :] & occlude[:, None, None]).unsqueeze(1)
    out = torch.where(mask, grey[:, None, None, None], out)
    return (out + 0.1 * torch.randn(out.shape, generator=generator)).clamp(0.0, 1.0)


class Task:
    """Training and validation tensors of one task of :data:`TASKS` (``val_limit``: keep the first N val images)."""

    def __init__(self, name: str, img_size: int, val_limit: int | None = None) -> None:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; choose from {TASKS}")
        self.name, data = name, load_digits_tensors(img_size)
        self.train_x, self.train_y, val_x, val_y = data["train_x"], data["train_y"], data["val_x"], data["val_y"]
        if name == "digits-hard":
            generator = torch.Generator().manual_seed(VAL_DISTORTION_SEED)
            val_x, val_y = torch.cat([distort(val_x, generator) for _ in range(VAL_COPIES)]), val_y.repeat(VAL_COPIES)
        # The models see [-1, 1]: mean 0.5, std 0.5, as their default configs.
        self.val_x, self.val_y = (val_x[:val_limit] - 0.5) / 0.5, val_y[:val_limit]

    def train_epoch(self, seed: int, epoch: int) -> tuple[Tensor, Tensor]:
        """The epoch's training images (normalised, shuffled) and labels; the same for every configuration."""
        generator = torch.Generator().manual_seed(1_000_003 * seed + epoch)
        order = torch.randperm(len(self.train_y), generator=generator)
        images = distort(self.train_x[order], generator) if self.name == "digits-hard" else self.train_x[order]
        return (images - 0.5) / 0.5, self.train_y[order]

    def steps_per_epoch(self, batch: int, max_batches: int | None) -> int:
        """Optimiser steps in one epoch of ``train_epoch`` batches (at most ``max_batches``)."""
        steps = math.ceil(len(self.train_y) / batch)
        return steps if max_batches is None else min(steps, max_batches)

    def describe(self) -> dict[str, Any]:
        hard = f"distort() afresh every epoch; validation distorted once (fixed seed), {VAL_COPIES} copies"
        augmentation = hard if self.name == "digits-hard" else "none"
        n_train, n_val, img_size = len(self.train_y), len(self.val_y), int(self.train_x.shape[-1])
        return dict(name=self.name, img_size=img_size, n_train=n_train, n_val=n_val, augmentation=augmentation)


def build_model(options: dict[str, Any], img_size: int, patch_size: int) -> nn.Module:
    """The configuration's model (call after seeding): the digits 4 × 128 shape, 1 channel, 10 classes."""
    shape = {"img_size": img_size, "in_chans": 1, "patch_size": patch_size, "num_blocks": 4, "embed_dim": 128}
    return common.create_model("t4_32", options, **shape)


def implicit_layers(net: nn.Module) -> list[il.ImplicitMLP]:
    """The token mixers' implicit layers (none for the vanilla mixer or a reference-0 model)."""
    settings = getattr(net, "implicit_settings", None)
    return [] if settings is None or settings["reference_iterations"] == 0 else engine.implicit_layers(net)


class IterationLog:
    """Per-block iteration counts of a sequence of solves (one record per forward or backward)."""

    def __init__(self, blocks: int) -> None:
        self.records: list[list[tuple[float, float, float]]] = [[] for _ in range(blocks)]

    def add(self, block: int, result: il.SolverResult | None) -> None:
        """Logs one solve of ``block`` (nothing if ``result`` is None); a fixed budget run (tol 0) is no failure."""
        if result is not None:
            nstep, unconverged = result.nstep.float(), float((~result.succeeded).float().mean())
            self.records[block].append((float(nstep.mean()), float(nstep.max()), unconverged))

    def summary(self) -> list[dict[str, float | None]] | None:
        """Per block: nstep_mean, nstep_max, nstep_max_mean, unconverged, count; None if nothing was logged."""
        if not any(self.records):
            return None
        out = []
        for records in self.records:
            means, maxes, unconverged = zip(*records, strict=True) if records else ((), (), ())
            out.append({
                "nstep_mean": statistics.fmean(means) if means else None, "nstep_max": max(maxes, default=None),
                "nstep_max_mean": statistics.fmean(maxes) if maxes else None,
                "unconverged": statistics.fmean(unconverged) if unconverged else None, "count": len(records),
            })  # fmt: skip
        return out


@torch.no_grad()
def block_diagnostics(layer: il.ImplicitMLP, x: Tensor, z: Tensor) -> dict[str, Any]:
    """Inverse residual and error, ρ(J_F(z*)) and Lipschitz bounds of one token mixer, in float64.

    Args:
        layer: The token mixer's implicit layer, in eval mode (its spectral norms reuse their vectors).
        x: The layer's input ``(..., T)``; each of its rows is one token-mixing problem z = x + F(z).
        z: The layer's output for ``x`` (``layer.stats`` are of that forward).
    """
    g = copy.deepcopy(layer.g).double().eval()
    rows, zr = x.reshape(-1, layer.features).double(), z.reshape(-1, layer.features).double()

    def f(v: Tensor) -> Tensor:
        return rows + g(v)

    inverse_residual = (zr - f(zr)).norm(dim=1) / zr.norm(dim=1).clamp_min(1e-30)
    true = il.solve(f, zr.clone(), **TRUE_SOLVE)
    inverse_error = (zr - true.z).norm(dim=1) / true.z.norm(dim=1).clamp_min(1e-30)
    radius = il.spectral_radius(f, true.z, iters=SPECTRAL_RADIUS_ITERS, generator=torch.Generator().manual_seed(0))
    # The bound for the current weights: exact spectral norms of the normalised linear layers, Lip of the rest.
    lipschitz_weights = math.prod(
        float(torch.linalg.matrix_norm(m.weight.double(), ord=2)) if isinstance(m, nn.Linear) else il.lipschitz_bound(m)
        for m in layer.g
    )
    return {
        "inverse_residual_max": float(inverse_residual.max()), "inverse_residual_mean": float(inverse_residual.mean()),
        "inverse_error_max": float(inverse_error.max()), "inverse_error_mean": float(inverse_error.mean()),
        "true_solve_residual_max": float(true.residual.max()),
        "true_solve_converged": float(true.converged.float().mean()),
        "spectral_radius_mean": float(radius.mean()), "spectral_radius_max": float(radius.max()),
        "lipschitz_bound": il.lipschitz_bound(layer.g), "lipschitz_weights": lipschitz_weights,
        "eval_tol": float(layer.stats.budget.tol), "unconverged": float((~layer.stats.succeeded).float().mean()),
    }  # fmt: skip


class Run:
    """One configuration trained under one seed by ``engine.train_one_epoch``, and its per-epoch records.

    ``args`` needs ``img_size``, ``patch_size``, ``lr`` and ``weight_decay``; ``steps`` counts the whole run's steps.
    """

    def __init__(self, name: str, options: dict[str, Any], seed: int, args: argparse.Namespace, steps: int) -> None:
        self.name, self.options, self.seed, self.epochs = name, options, seed, []
        torch.manual_seed(seed)
        self.net = build_model(options, args.img_size, args.patch_size)
        self.layers = implicit_layers(self.net)
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        one_cycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps)
        # engine.Trainer steps a timm scheduler after every update: step_update(num_updates).
        scheduler = SimpleNamespace(step_update=lambda num_updates: one_cycle.step())
        weight = float(options.get("jac_weight", 0.0))
        self.trainer = engine.Trainer(self.net, optimizer, scheduler, jacobian_weight=weight)

    def train_epoch(self, images: Tensor, labels: Tensor, batch: int, max_batches: int | None) -> dict[str, Any]:
        """One epoch on ``images`` ``(N, 1, S, S)`` in order, in at most ``max_batches`` batches."""
        forward, backward, jac_losses = IterationLog(len(self.layers)), IterationLog(len(self.layers)), []
        batches = [(images[s : s + batch], labels[s : s + batch]) for s in range(0, len(labels), batch)][:max_batches]

        def log(_index: int, _meters: engine.EpochMeters) -> None:
            for block, layer in enumerate(self.layers):
                forward.add(block, layer.stats)
                backward.add(block, layer.backward_stats)
                layer.backward_stats = None  # so that a mode without an adjoint solve logs nothing
            if self.trainer.jacobian_weight and (penalty := self.net.jacobian_loss()) is not None:
                jac_losses.append(float(penalty))

        metrics = engine.train_one_epoch(self.trainer, batches, LOSS, progress=log, clock=time.perf_counter)
        jac_loss = sum(jac_losses) / len(jac_losses) if jac_losses else None
        return {
            "train_loss": metrics["train_loss"], "jac_loss": jac_loss, "train_seconds": metrics["epoch_seconds"],
            "train_steps": len(batches), "train_forward": forward.summary(), "backward": backward.summary(),
        }  # fmt: skip

    @torch.no_grad()
    def evaluate(self, task: Task, diag_batch: int, eval_batch: int = 512) -> dict[str, Any]:
        """Val top-1, eval iterations, and :func:`block_diagnostics` of the first ``diag_batch`` val images."""
        self.net.eval()
        tick, forward, correct = time.perf_counter(), IterationLog(len(self.layers)), 0
        for start in range(0, len(task.val_y), eval_batch):
            logits = self.net(task.val_x[start : start + eval_batch])
            correct += int((logits.argmax(dim=1) == task.val_y[start : start + eval_batch]).sum())
            for block, layer in enumerate(self.layers):
                forward.add(block, layer.stats)
        record = {"val_top1": 100.0 * correct / len(task.val_y), "eval_forward": forward.summary(), "diagnostics": None}
        if self.layers:  # from the token mixers' inputs and outputs on the first diag_batch images
            captured: dict[nn.Module, tuple[Tensor, Tensor]] = {}

            def keep(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                captured[layer] = (inputs[0].detach(), output.detach())

            hooks = [layer.register_forward_hook(keep) for layer in self.layers]
            try:
                self.net(task.val_x[:diag_batch])
            finally:
                for hook in hooks:
                    hook.remove()
            record["diagnostics"] = [block_diagnostics(layer, *captured[layer]) for layer in self.layers]
        return record | {"eval_seconds": time.perf_counter() - tick}


def run_task(task: Task, configs: list[tuple[str, dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    """Trains every configuration for every seed, interleaved by epoch on the same batches; prints the progress."""
    steps = task.steps_per_epoch(args.batch, args.max_batches) * args.epochs
    untrained = {"train_loss": None, "jac_loss": None, "train_seconds": 0.0, "train_steps": 0}
    untrained |= {"train_forward": None, "backward": None}
    runs = []
    for seed in args.seeds:
        seed_runs = [Run(name, options, seed, args, steps) for name, options in configs]
        for run in seed_runs:
            run.epochs.append({"epoch": 0, **untrained, **run.evaluate(task, args.diag_batch)})
        for epoch in range(1, args.epochs + 1):
            images, labels = task.train_epoch(seed, epoch)
            for run in seed_runs:
                train = run.train_epoch(images, labels, args.batch, args.max_batches)
                run.epochs.append(record := {"epoch": epoch, **train, **run.evaluate(task, args.diag_batch)})
                residual = render.worst(record["diagnostics"], "inverse_residual_max")
                fwd_max = render.worst(record["train_forward"], "nstep_max")
                print(f"  {task.name:11s} seed {seed} epoch {epoch:2d} {run.name:18s} loss {record['train_loss']:.3f} "
                      f"val {record['val_top1']:6.2f} %  train {record['train_seconds']:6.1f} s  "
                      f"fwd max {fwd_max}  res {render.fmt(residual, '.1e')}", flush=True)  # fmt: skip
        runs += [{"config": run.name, "seed": seed, "epochs": run.epochs} for run in seed_runs]
    described = [dict(name=name, options=options, is_default=common.is_default(options)) for name, options in configs]
    summary = render.summarise(runs, [name for name, _ in configs])
    return {"task": task.describe(), "configs": described, "runs": runs, "summary": summary}


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[tuple[str, dict[str, Any]]]]:
    """The command line, its run sizes resolved (:data:`FULL` / :data:`QUICK`), and the validated configurations."""
    parser = OneLineArgumentParser(description="iMixer training dynamics: iterations, inverse accuracy, cost.")
    counts, sizes = int_range(1), int_range(0)  # for the run sizes, 0 means the set's value
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["digits"])
    configs = f"preset names {sorted(common.PRESETS)} or name=key:value,... (default {list(DEFAULT_CONFIGS)})"
    parser.add_argument("--configs", nargs="+", default=None, help=configs)
    parser.add_argument("--seeds", type=counts, default=None, help="number of seeds (default 3; 1 with --quick)")
    parser.add_argument("--epochs", type=counts, default=None, help="epochs (default 5; 1 with --quick)")
    parser.add_argument("--batch", type=sizes, default=None, help="batch size (default 64; 32 with --quick)")
    parser.add_argument("--lr", type=float_range(0.0, low_open=True), default=2e-3)
    parser.add_argument("--weight-decay", type=float_range(0.0), default=0.05)
    parser.add_argument("--img-size", type=counts, default=16)
    parser.add_argument("--patch-size", type=counts, default=2)
    parser.add_argument("--max-batches", type=sizes, default=None, help="training batches per epoch (default: all)")
    parser.add_argument("--val-limit", type=sizes, default=None, help="validation images kept (default: all)")
    parser.add_argument("--diag-batch", type=sizes, default=None, help="validation images of the diagnostics (64)")
    parser.add_argument("--threads", type=sizes, default=None, help="torch threads (default 2; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch of 3 batches of 32: for the test")
    parser.add_argument("--out", type=Path, default=common.RESULTS, help="output directory")
    parser.add_argument("--docs", action="store_true", help=f"also write the outputs to {DOCS_DIR}")
    render_help = "no training: re-render the table and plots of results JSONs (several: their tasks merged)"
    parser.add_argument("--render", metavar="JSON", nargs="+", type=Path, default=None, help=render_help)
    args = parser.parse_args(argv)
    if args.render:  # nothing else is used, or checked
        return args, []
    common.fill_run_sizes(args, FULL, QUICK)
    args.seeds = list(range(args.seeds))
    if args.img_size % args.patch_size:
        parser.error(f"--img-size {args.img_size} is not a multiple of --patch-size {args.patch_size}")
    try:
        configs = [common.parse_config(spec) for spec in (args.configs or DEFAULT_CONFIGS)]
        if "mixer" not in [name for name, _ in configs]:
            configs.insert(0, common.parse_config("mixer"))  # the baseline of the × mixer ratios, first
        names = [name for name, _ in configs]
        if len(set(names)) != len(names):
            raise ValueError(f"configuration names must be unique, got {names}")
    except ValueError as error:
        parser.error(str(error))
    return args, configs


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains (``--render``: re-reads JSONs), prints progress and tables, writes the outputs; returns the results."""
    args, configs = parse_args(argv)
    if args.render:
        results = render.merge([json.loads(path.read_text(encoding="utf-8")) for path in args.render])
    else:
        with common.measuring(args.threads), warnings.catch_warnings():
            warnings.simplefilter("ignore", il.LipschitzWarning)  # the bounds are recorded, not warned about
            start = time.perf_counter()
            keys = ("quick", "tasks", "seeds", "epochs", "batch", "lr", "weight_decay", "img_size", "patch_size")
            setup = {key: getattr(args, key) for key in (*keys, "max_batches", "val_limit", "diag_batch", "threads")}
            setup |= {"true_solve": TRUE_SOLVE, "spectral_radius_iters": SPECTRAL_RADIUS_ITERS}
            setup["defaults"] = IMixerSettings().to_dict()  # the library's defaults when this ran
            results = {"config": setup, "machine": (info := common.machine("cpu")), "tasks": {}}
            print(common.machine_line(info))
            for name in args.tasks:
                task = run_task(Task(name, args.img_size, args.val_limit), configs, args)
                results["tasks"][name] = task | {"epochs": args.epochs, "seeds": args.seeds}
            results["seconds"] = time.perf_counter() - start
    table = render.training_markdown(results)
    print(table)
    written = []
    for directory in [args.out, *([DOCS_DIR] if args.docs else [])]:
        written += common.write(directory, "imixer_training", results, table, indent=1)
        for name, task in results["tasks"].items():
            written.append(directory / f"imixer_training_{name}.png")
            render.plot_training(task, written[-1])
    if not args.render:
        print("wrote " + ", ".join(str(path) for path in written))
    return results


if __name__ == "__main__":
    main()
