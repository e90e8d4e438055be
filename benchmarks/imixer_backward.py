"""How exact and how fast each gradient mode is on a *trained* iMixer's token mixers (issue 11, item 3).

Trains one configuration on the digits 4 × 128 recipe of ``benchmarks/imixer_training.py`` (its task,
model and schedule), then, on one fixed training batch of the trained model, computes the gradient of
the loss with respect to every parameter under each gradient mode and compares it with the exact one:

* **exact**: a float64 copy of the model, every token mixer solved by Anderson to a relative residual
  of 1e-10 and differentiated by the implicit function theorem with the adjoint solved to 1e-12: the
  gradient of the true (1 - F)⁻¹ at the trained weights;
* **the modes**, on the float32 model as trained: its forward solve (``tol`` and ``max_iter`` of the
  configuration), then ``ift`` (adjoint to the same ``tol``), ``ift`` capped at 2 adjoint steps,
  ``shine`` (the forward Anderson memory's inverse-Jacobian estimate) alone and with 2 refinement
  steps, ``phantom`` with 2 and 5 steps, and ``jfb`` (the identity in place of (I - J_F)⁻ᵀ).

Per mode: the relative error ‖g - g*‖ / ‖g*‖ and the cosine of the angle between g and g* over all
parameters, and the median over ``--repeats`` of the forward and the backward time of the whole model
(seconds, ``--threads`` torch threads). The model is in eval mode for every measurement, so the
spectral normalisation's power iteration does not move the weights between modes (eval mode solves
with ``eval_tol`` / ``eval_max_iter``, set here to the configuration's training budget).

Outputs (``--out``, default ``benchmarks/results/``; ``--docs`` also writes them to
``docs/assets/imixer_training/``): ``imixer_backward.json`` and ``imixer_backward.md``.

Usage::

    python benchmarks/imixer_backward.py                          # the library default, digits-hard, 5 epochs
    python benchmarks/imixer_backward.py --config "solver:anderson,backward:ift,tol:0.001" --epochs 8
    python benchmarks/imixer_backward.py --quick                  # the test's run: 1 epoch of 3 batches
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import imixer_training as training  # noqa: E402  (task, model and schedule of the trajectory benchmark)

import implicitlayers as il  # noqa: E402

DOCS_DIR = training.DOCS_DIR
SETTINGS_SHOWN = ("solver", "backward", "tol", "activation", "coeff")  # the trained model's, in the header
EXACT = {
    "solver": il.Anderson(),
    "budget": il.Budget(max_iter=400, tol=1e-10),
    "backward": il.IFT(max_iter=600, tol=1e-12),
}
# Gradient modes compared with the exact gradient, set on every token mixer.
MODES: dict[str, il.Gradient] = {
    "ift": il.IFT(),
    "ift, 2 adjoint steps": il.IFT(max_iter=2),
    "shine": il.Shine(),
    "shine + 2 refinements": il.Shine(refine=2),
    "phantom, 2 steps": il.Phantom(steps=2),
    "phantom, 5 steps": il.Phantom(steps=5),
    "jfb": il.JFB(),
}


def configure(net: nn.Module, **settings: Any) -> None:
    """Sets ``solver``/``budget``/``backward`` on every token mixer (validated); eval mode uses ``budget``."""
    for layer in net.implicit_layers():
        for key, value in settings.items():
            setattr(layer, key, value)
        layer.eval_budget = None
        layer.on_nonconvergence = "ignore"  # capped adjoints miss their tolerance by design


def flat_gradient(net: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, float, float]:
    """``(∂loss/∂θ flattened, forward seconds, backward seconds)`` of the label-smoothed loss."""
    net.zero_grad(set_to_none=True)
    tick = time.perf_counter()
    loss = F.cross_entropy(net(x), y, label_smoothing=0.1)
    middle = time.perf_counter()
    loss.backward()
    end = time.perf_counter()
    grads = [p.grad.reshape(-1) for p in net.parameters() if p.grad is not None]
    return torch.cat(grads).double(), middle - tick, end - middle


def compare_modes(net: nn.Module, x: Tensor, y: Tensor, repeats: int) -> dict[str, Any]:
    """The exact gradient, then each mode's error, cosine and median times."""
    net.eval()
    exact_net = copy.deepcopy(net).double()
    configure(exact_net, **EXACT)
    exact, _, _ = flat_gradient(exact_net, x.double(), y)
    exact_converged = all(bool(layer.stats.converged.all()) for layer in exact_net.implicit_layers())
    rows = []
    for name, gradient in MODES.items():
        if gradient.needs_memory and not net.implicit_layers()[0].solver.keeps_memory:
            continue
        model = copy.deepcopy(net)
        configure(model, backward=gradient)
        forward, backward = [], []
        for _ in range(repeats):
            grad, seconds_forward, seconds_backward = flat_gradient(model, x, y)
            forward.append(seconds_forward)
            backward.append(seconds_backward)
        error = float((grad - exact).norm() / exact.norm())
        cosine = float(torch.dot(grad, exact) / (grad.norm() * exact.norm()))
        iterations = [float(layer.stats.nstep.max()) for layer in model.implicit_layers()]
        rows.append(
            {
                "mode": name,
                "settings": repr(gradient),
                "relative_error": error,
                "cosine": cosine,
                "forward_seconds": statistics.median(forward),
                "backward_seconds": statistics.median(backward),
                "forward_iterations_max": max(iterations),
            }
        )
    ift_backward = next(row["backward_seconds"] for row in rows if row["mode"] == "ift")
    for row in rows:
        row["backward_vs_ift"] = row["backward_seconds"] / ift_backward
    return {"exact_solves_converged": exact_converged, "modes": rows}


def train(args: argparse.Namespace, options: dict[str, Any], task: training.Task) -> training.Run:
    """The configuration trained for ``args.epochs`` epochs under seed ``args.seed``."""
    steps = args.epochs * task.steps_per_epoch(args.batch, args.max_batches)
    run = training.Run("trained", options, args.seed, args, steps=steps)
    for epoch in range(1, args.epochs + 1):
        images, labels = task.train_epoch(args.seed, epoch)
        record = run.train_epoch(images, labels, args.batch, args.max_batches)
        print(f"  epoch {epoch}: loss {record['train_loss']:.3f}, {record['train_seconds']:.1f} s", flush=True)
    return run


def markdown(results: dict[str, Any]) -> str:
    """The table of modes: error, cosine, times."""
    machine = results["machine"]
    lines = [
        f"# Gradient modes on the trained iMixer ({machine['date_utc']} UTC, {machine['threads']} torch threads, "
        f"torch {machine['torch']})",
        "",
        f"Configuration `{training.options_text(results['options'])}` "
        f"({', '.join(f'{k} {v}' for k, v in results['settings'].items())}) trained {results['epochs']} epochs on "
        f"`{results['task']}` (seed {results['seed']}, the recipe of `imixer_training.py`); one training batch of "
        f"{results['batch']} images, model in eval mode. Exact: float64, forward to 1e-10, adjoint to 1e-12 "
        f"(all solves converged: {results['exact_solves_converged']}). Times: median of {results['repeats']}, "
        "whole model.",
        "",
        "| mode | ‖g − g*‖ / ‖g*‖ | cosine(g, g*) | forward ms | backward ms | backward × ift |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in results["modes"]:
        lines.append(
            f"| {row['mode']} | {row['relative_error']:.2e} | {row['cosine']:.4f} | "
            f"{1e3 * row['forward_seconds']:.1f} | {1e3 * row['backward_seconds']:.1f} | {row['backward_vs_ift']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="", help="key:value,... of imixer_training.py (default: library default)")
    parser.add_argument("--task", choices=training.TASKS, default="digits-hard")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--max-batches", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1 epoch of 3 batches of 32, batch 16, 1 repeat")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--docs", action="store_true", help=f"also write the outputs to {DOCS_DIR.relative_to(REPO)}")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.batch, args.max_batches, args.repeats = 1, 32, 3, 1
    torch.set_num_threads(args.threads)
    _, options = training.parse_config(f"trained={args.config}" if args.config else "imixer")
    training.validate_options("trained", options)
    task = training.Task(args.task, args.img_size)
    print(f"training {training.options_text(options)} on {args.task} for {args.epochs} epochs", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", il.ConvergenceWarning)
        run = train(args, options, task)
        images, labels = task.train_epoch(args.seed, args.epochs + 1)
        batch = 16 if args.quick else args.batch
        comparison = compare_modes(run.net, images[:batch], labels[:batch], args.repeats)
    results = {
        "machine": training.imixer_step.machine_info(torch.device("cpu")) | {"threads": args.threads},
        "options": options,
        "settings": {key: run.net.implicit_settings[key] for key in SETTINGS_SHOWN},
        "task": args.task,
        "epochs": args.epochs,
        "seed": args.seed,
        "batch": batch,
        "repeats": args.repeats,
        **comparison,
    }
    table = markdown(results)
    print(table)
    directories = [Path(args.out)] + ([DOCS_DIR] if args.docs else [])
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "imixer_backward.json").write_text(json.dumps(results, indent=2) + "\n")
        (directory / "imixer_backward.md").write_text(table)
    return results


if __name__ == "__main__":
    main()
