"""Train a convolutional DEQ on scikit-learn's digits, with and without Jacobian regularisation, and against TorchDEQ.

    python examples/deq/train.py            # three runs, about 2 minutes on one CPU core; writes runs/deq/
    python examples/deq/train.py --docs     # the same, into docs/assets/deq/ (the documentation's copy)

The model (``examples/deq/model.py``) is a conv stem, an equilibrium layer z* = f(z*, x) whose f is an
MDEQ-style residual cell (two weight-normalised 3×3 convolutions, GroupNorm, ReLU, variational
dropout) and a pooled linear head. The script trains it three times with the same seed, data order,
solver (Anderson), budgets and epochs:

1. ``implicitlayers``: :class:`implicitlayers.ImplicitLayer`, IFT backward;
2. ``implicitlayers_jac``: the same plus ``gamma * layer.jacobian_loss`` (``jacobian_penalty=1``:
   a Hutchinson estimate of ‖J_f(z*)‖²_F / dim, Bai et al. 2021) added to the loss;
3. ``torchdeq``: the same cell inside TorchDEQ's ``get_deq(ift=True, ...)`` (skipped, with a message,
   when ``torchdeq`` is not installed).

Per epoch it records the training loss, the validation accuracy (mean over the validation split),
the solver's forward steps (mean and max over samples, training and validation), the adjoint solve's
steps, the fraction of unconverged samples, and the wall and CPU time; at the end, on the
validation fixed points, the Jacobian penalty and an Arnoldi estimate of the spectral radius
ρ(J_f(z*)), measured alike for the three models with :func:`implicitlayers.jacobian_penalty` and
:func:`implicitlayers.spectral_radius`.

Writes ``results.json``, ``summary.md`` (the comparison table), ``setup.md`` (one sentence on the
run) and ``deq_digits.png`` into ``--out``. Bad arguments exit with status 2 and one line.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor

if __package__ in (None, ""):  # run as a script: import the package from the repository root instead
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import implicitlayers as il
from examples.common import OneLineArgumentParser, must_be, positive_float, positive_int, recorded_flags, write_results
from examples.deq.model import DEQClassifier, SolveReport, build_classifier

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DOCS_OUT = ROOT / "docs" / "assets" / "deq"
DEFAULT_OUT = ROOT / "runs" / "deq"  # runs/ is ignored by git
FIGURE = "deq_digits.png"
GROUPS = 4  # GroupNorm groups of the stem and the cell


@dataclass(frozen=True)
class RunSpec:
    """One of the compared trainings.

    Attributes:
        name: Key in ``results["runs"]``.
        label: How tables and plots name it.
        backend: ``"implicitlayers"`` or ``"torchdeq"``.
        gamma: Weight of the Jacobian penalty in the loss (0: none).
    """

    name: str
    label: str
    backend: str
    gamma: float = 0.0


# What scikit-learn's random_state accepts.
seed_int = must_be(int, "an integer in [0, 2**32)", lambda value: 0 <= value < 2**32)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked: every error is one line and exit status 2."""
    parser = OneLineArgumentParser(
        prog="train.py", description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--epochs", type=positive_int, default=12, help="training epochs of every run")
    parser.add_argument("--channels", type=positive_int, default=32, help="width of the stem and the cell")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="training batch size")
    parser.add_argument("--lr", type=positive_float, default=5e-3, help="Adam learning rate (cosine decay)")
    parser.add_argument("--gamma", type=positive_float, default=2.0, help="weight of the Jacobian penalty")
    parser.add_argument("--dropout", type=float, default=0.1, help="variational dropout in the cell, in [0, 1)")
    parser.add_argument("--solver", choices=("anderson", "broyden"), default="anderson", help="forward/adjoint solver")
    parser.add_argument("--max-iter", type=positive_int, default=30, help="forward evaluations of f (training)")
    parser.add_argument("--eval-max-iter", type=positive_int, default=None, help="in eval mode (default: max-iter)")
    parser.add_argument("--backward-max-iter", type=positive_int, default=30, help="adjoint iterations")
    parser.add_argument("--tol", type=positive_float, default=1e-3, help="relative residual tolerance")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation share of the 1797 digits")
    parser.add_argument("--train-subset", type=positive_int, default=None, help="use only this many training images")
    parser.add_argument("--double", action="store_true", help="train in float64")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (see the docs page)")
    parser.add_argument("--skip-torchdeq", action="store_true", help="leave out the TorchDEQ run")
    parser.add_argument("--seed", type=seed_int, default=0, help="random seed (weights, data order, split)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--docs", action="store_true", help="write into docs/assets/deq (the documentation's copy)")
    parser.add_argument("--quick", action="store_true", help="a tiny run for tests: 1 epoch, 256 images, width 8")
    args = parser.parse_args(argv)
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0.01 <= args.val_fraction <= 0.99:  # a stratified split needs every class on both sides
        parser.error(f"--val-fraction must be in [0.01, 0.99], got {args.val_fraction}")
    if args.quick:
        args.epochs, args.channels, args.train_subset = 1, 8, 256
    if args.channels % GROUPS:
        parser.error(f"--channels must be a multiple of {GROUPS} (GroupNorm groups), got {args.channels}")
    if args.eval_max_iter is None:
        args.eval_max_iter = args.max_iter
    if args.docs:
        args.out = DOCS_OUT
    return args


# --------------------------------------------------------------------------------------- data
@dataclass
class Digits:
    """The standardised 8×8 digits, split into training and validation sets."""

    train_images: Tensor
    train_labels: Tensor
    val_images: Tensor
    val_labels: Tensor


def load_data(val_fraction: float, seed: int, train_subset: int | None, dtype: torch.dtype) -> Digits:
    """scikit-learn's bundled digits (no download) as images ``(N, 1, 8, 8)`` of ``dtype`` and labels ``(N,)``: a
    stratified split (``val_fraction`` of the 1797 held out for validation, by ``seed``), the first ``train_subset``
    training images (None: all), standardised with the training statistics."""
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=dtype)[:, None] / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    indices = torch.arange(len(labels)).numpy()
    train_idx, val_idx = train_test_split(indices, test_size=val_fraction, random_state=seed, stratify=labels.numpy())
    train_idx = train_idx[:train_subset] if train_subset else train_idx
    train_images, val_images = images[train_idx], images[val_idx]
    mean, std = train_images.mean(), train_images.std()
    return Digits((train_images - mean) / std, labels[train_idx], (val_images - mean) / std, labels[val_idx])


# ------------------------------------------------------------------------------------ training
def _stats(values: list[Tensor]) -> tuple[float, float]:
    joined = torch.cat([v.float() for v in values])
    return float(joined.mean()), float(joined.max())


def _unconverged(reports: list[SolveReport]) -> float:
    return float(torch.cat([(~r.converged).float() for r in reports]).mean())


@torch.no_grad()
def evaluate(model: DEQClassifier, digits: Digits) -> dict[str, float]:
    """Validation accuracy and loss (means over the split) and the eval-mode forward solve's steps."""
    model.eval()
    logits = model(digits.val_images)
    report = model.equilibrium.forward_report()
    return {
        "val_accuracy": float((logits.argmax(1) == digits.val_labels).float().mean()),
        "val_loss": float(F.cross_entropy(logits, digits.val_labels)),
        "val_forward_steps_mean": float(report.nstep.float().mean()),
        "val_forward_steps_max": float(report.nstep.max()),
        "val_unconverged": float((~report.converged).float().mean()),
    }


def measure_jacobian(model: DEQClassifier, images: Tensor, seed: int) -> dict[str, float]:
    """‖J_f(z*)‖²_F / dim and ρ(J_f(z*)) at the fixed points of the validation ``images``, measured alike for
    every backend (``seed``: of the Hutchinson and Arnoldi start vectors): ``jacobian_penalty`` (mean over samples,
    8 Hutchinson vectors each), ``spectral_radius_mean`` and ``spectral_radius_max`` (30 Arnoldi steps a sample)."""
    model.eval()
    with torch.no_grad():
        x = model.injection(images)
        z_star = model.equilibrium(x)
    cell_at_x = partial(model.cell, x=x)
    generator = torch.Generator().manual_seed(seed)
    penalty = il.jacobian_penalty(cell_at_x, z_star, samples=8, generator=generator).detach()
    radius = il.spectral_radius(cell_at_x, z_star, iters=30, generator=generator)
    return {
        "jacobian_penalty": float(penalty.mean()),
        "spectral_radius_mean": float(radius.mean()),
        "spectral_radius_max": float(radius.max()),
    }


def train_run(spec: RunSpec, digits: Digits, args: argparse.Namespace) -> dict[str, Any]:
    """Trains one model from the shared seed and returns its per-epoch record and final measures.

    Every run starts from the same weights (the seed is reset before the model is built, and the
    backends consume no random numbers at construction) and sees the batches in the same order.
    """
    budget = il.Budget(max_iter=args.max_iter, tol=args.tol)
    settings = {
        "solver": il.Anderson(memory=6) if args.solver == "anderson" else il.as_solver(args.solver),
        "budget": budget,
        "eval_budget": budget.replace(max_iter=args.eval_max_iter),
        "backward": il.IFT(max_iter=args.backward_max_iter, tol=args.tol),
        "groups": GROUPS,
        "dropout": args.dropout,
    }
    torch.manual_seed(args.seed)
    model = build_classifier(spec.backend, args.channels, **settings, jacobian_penalty=1 if spec.gamma else 0)
    model = model.to(digits.train_images.dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = math.ceil(len(digits.train_labels) / args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(args.seed)
    epochs = []
    print(f"--- {spec.label}", flush=True)
    for epoch in range(1, args.epochs + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        model.train()
        losses, penalties, forward, backward, evaluations = [], [], [], [], []
        for batch in torch.randperm(len(digits.train_labels), generator=order).split(args.batch_size):
            before = model.cell.evaluations
            logits = model(digits.train_images[batch])
            loss = F.cross_entropy(logits, digits.train_labels[batch])
            total = loss
            if spec.gamma:
                penalty = model.equilibrium.jacobian_loss.mean()
                total = total + spec.gamma * penalty
                penalties.append(float(penalty.detach()))
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            forward.append(model.equilibrium.forward_report())
            backward.append(model.equilibrium.backward_report())
            evaluations.append(model.cell.evaluations - before)
        seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
        forward_mean, forward_max = _stats([r.nstep for r in forward])
        backward_mean, backward_max = _stats([r.nstep for r in backward])
        record = {
            "epoch": epoch,
            "train_loss": sum(losses) / len(losses),
            "train_jacobian_loss": sum(penalties) / len(penalties) if penalties else None,
            "forward_steps_mean": forward_mean,
            "forward_steps_max": forward_max,
            "forward_unconverged": _unconverged(forward),
            "backward_steps_mean": backward_mean,
            "backward_steps_max": backward_max,
            "backward_unconverged": _unconverged(backward),
            # Every call of the cell per training batch (forward solve, penalty VJP, TorchDEQ's IFT
            # re-evaluation): a batch is evaluated until its slowest sample stops.
            "f_calls_per_step": sum(evaluations) / len(evaluations),
            **evaluate(model, digits),
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
        }
        epochs.append(record)
        print(
            f"epoch {epoch:2d}  loss {record['train_loss']:.4f}  val acc {record['val_accuracy']:.4f}  "
            f"forward steps {forward_mean:.1f}/{forward_max:.0f}  backward {backward_mean:.1f}/{backward_max:.0f}  "
            f"unconverged {record['forward_unconverged']:.1%}  ({seconds:.1f} s, {cpu_seconds:.1f} s CPU)",
            flush=True,
        )
    final = measure_jacobian(model, digits.val_images, args.seed)
    print(
        f"val ||J||_F^2/d {final['jacobian_penalty']:.4f}, spectral radius "
        f"{final['spectral_radius_mean']:.3f} (max {final['spectral_radius_max']:.3f})",
        flush=True,
    )
    return {
        "label": spec.label,
        "backend": spec.backend,
        "gamma": spec.gamma,
        "epochs": epochs,
        "final": final,
        "train_seconds": sum(e["seconds"] for e in epochs),
        "train_cpu_seconds": sum(e["cpu_seconds"] for e in epochs),
    }


def run_specs(gamma: float) -> list[RunSpec]:
    """The three compared trainings, in table order."""
    return [
        RunSpec("implicitlayers", "implicitlayers", "implicitlayers"),
        RunSpec("implicitlayers_jac", f"implicitlayers + Jacobian penalty (γ = {gamma:g})", "implicitlayers", gamma),
        RunSpec("torchdeq", "TorchDEQ `get_deq`", "torchdeq"),
    ]


def torchdeq_missing() -> str | None:
    """Why the TorchDEQ run cannot happen (None when it can)."""
    try:
        import torchdeq  # noqa: F401
    except ImportError:
        return "torchdeq is not installed (pip install torchdeq)"
    return None


# ------------------------------------------------------------------------------------ reports
def summary_table(results: dict[str, Any]) -> str:
    """The comparison table (the docs include this file verbatim).

    Per run: the last epoch's validation accuracy and solver steps (forward steps are per sample;
    *f calls per batch* counts every evaluation of the cell in a training step, which is what the
    batch costs), the Jacobian measures at the validation fixed points, and the training time.
    """
    lines = [
        "| run | val accuracy | forward steps, mean / max | f calls per batch | val forward steps, mean / max | "
        "backward steps, mean / max | unconverged: forward / adjoint / val | ‖J‖²_F / d | ρ(J), mean / max | "
        "train time (wall / CPU) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in results["runs"].values():
        if "skipped" in run:
            lines.append(f"| {run['label']} | skipped: {run['skipped']} |" + " |" * 8)
            continue
        last, final = run["epochs"][-1], run["final"]
        lines.append(
            f"| {run['label']} | {100 * last['val_accuracy']:.2f} % "
            f"| {last['forward_steps_mean']:.1f} / {last['forward_steps_max']:.0f} "
            f"| {last['f_calls_per_step']:.1f} "
            f"| {last['val_forward_steps_mean']:.1f} / {last['val_forward_steps_max']:.0f} "
            f"| {last['backward_steps_mean']:.1f} / {last['backward_steps_max']:.0f} "
            f"| {100 * last['forward_unconverged']:.1f} % / {100 * last['backward_unconverged']:.1f} % "
            f"/ {100 * last['val_unconverged']:.1f} % "
            f"| {final['jacobian_penalty']:.4f} "
            f"| {final['spectral_radius_mean']:.3f} / {final['spectral_radius_max']:.3f} "
            f"| {run['train_seconds']:.0f} s / {run['train_cpu_seconds']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def setup_line(results: dict[str, Any]) -> str:
    """One sentence describing the run (the docs include this file verbatim)."""
    config, data = results["config"], results["data"]
    return (
        f"{data['train']} training and {data['val']} validation digits; width {config['channels']}, "
        f"variational dropout {config['dropout']:g}, {config['epochs']} epochs of batch {config['batch_size']}, "
        f"Adam at {config['lr']:g} (cosine), "
        f"{config['solver'].capitalize()} with `max_iter={config['max_iter']}`, `tol={config['tol']:g}` "
        f"(relative), IFT backward with `backward_max_iter={config['backward_max_iter']}`, "
        f"{'float64' if config['double'] else 'float32'}, {config['threads']} torch thread(s), seed "
        f"{config['seed']}; {results['seconds']:.0f} s ({results['cpu_seconds']:.0f} s of CPU) for the whole "
        f"script on this machine "
        f"(torch {results['torch']}, torchdeq {results['torchdeq'] or 'absent'}).\n"
    )


def plot(results: dict[str, Any], path: Path) -> None:
    """Forward steps, adjoint steps and validation accuracy per epoch, one line per run."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    colors = {"implicitlayers": "tab:blue", "implicitlayers_jac": "tab:green", "torchdeq": "tab:red"}
    for name, run in results["runs"].items():
        if "skipped" in run:
            continue
        epochs = [e["epoch"] for e in run["epochs"]]
        color = colors.get(name)
        label = run["label"].replace("`", "")
        axes[0].plot(epochs, [e["forward_steps_mean"] for e in run["epochs"]], "-o", color=color, label=label)
        axes[0].plot(epochs, [e["forward_steps_max"] for e in run["epochs"]], ":", color=color)
        axes[1].plot(epochs, [e["backward_steps_mean"] for e in run["epochs"]], "-o", color=color, label=label)
        axes[2].plot(epochs, [100 * e["val_accuracy"] for e in run["epochs"]], "-o", color=color, label=label)
    axes[0].set_title("forward solver steps per sample\n(training; mean —, max ···)")
    axes[1].set_title("adjoint (backward) solver steps\n(training, mean)")
    axes[2].set_title("validation accuracy (%)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[2].legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the comparison and writes its files; returns the results (also saved as ``results.json``)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    # The convolutions are tiny (8×8 maps): a second thread gains little, and on a shared machine
    # every OpenMP barrier waits for the slowest thread, so one thread gives steadier timings.
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    start, cpu_start = time.perf_counter(), time.process_time()
    dtype = torch.float64 if args.double else torch.float32
    digits = load_data(args.val_fraction, args.seed, args.train_subset, dtype)
    print(f"digits: {len(digits.train_labels)} train / {len(digits.val_labels)} val images")
    runs: dict[str, Any] = {}
    missing = "left out (--skip-torchdeq)" if args.skip_torchdeq else torchdeq_missing()
    for spec in run_specs(args.gamma):
        if spec.backend == "torchdeq" and missing:
            print(f"--- {spec.label}: skipped, {missing}", flush=True)
            runs[spec.name] = {"label": spec.label, "backend": spec.backend, "skipped": missing}
            continue
        runs[spec.name] = train_run(spec, digits, args)
    results = {
        "config": recorded_flags(args),
        "data": {"train": len(digits.train_labels), "val": len(digits.val_labels)},
        "runs": runs,
        "seconds": 0.0,
        "cpu_seconds": 0.0,
        "torch": torch.__version__,
        "torchdeq": None if missing else importlib.metadata.version("torchdeq"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / FIGURE)
    results["seconds"] = time.perf_counter() - start
    results["cpu_seconds"] = time.process_time() - cpu_start
    table = summary_table(results)
    print(table, end="")
    write_results(args.out, results, {"summary.md": table, "setup.md": setup_line(results)}, ensure_ascii=False)
    print(f"wrote results.json, summary.md, setup.md and {FIGURE} to {args.out} ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
