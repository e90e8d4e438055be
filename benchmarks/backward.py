"""Gradient modes side by side: error against the exact gradient, and time, on two problems (``--problem``).

    python -m benchmarks.backward [--problem mlp|imixer] [--quick] [--docs]

The problems, modes and outputs: ``benchmarks/README.md``, sections "Gradient modes on a DEQ layer" and "How exact
each gradient mode is on a trained iMixer".
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicitlayers as il
from benchmarks import common, render
from benchmarks import imixer_training as training
from examples.common import OneLineArgumentParser, int_range

DOCS = {"mlp": common.REPO / "docs" / "assets" / "backward", "imixer": training.DOCS_DIR}
NAMES = {"mlp": "backward_modes", "imixer": "imixer_backward"}
MODES: dict[str, dict[str, il.Gradient]] = {
    "mlp": {
        "ift": il.IFT(),
        "shine": il.Shine(),
        "shine, 2 refinements": il.Shine(refine=2),
        "shine, 5 refinements": il.Shine(refine=5),
        # The same adjoint budgets from a cold start (u = v): what the SHINE estimate is worth as a start.
        "ift, 2 adjoint steps": il.IFT(max_iter=2),
        "ift, 5 adjoint steps": il.IFT(max_iter=5),
        "phantom, 5 steps (λ 0.5)": il.Phantom(steps=5, damping=0.5),
        "jfb": il.JFB(),
    },
    "imixer": {
        "ift": il.IFT(),
        "ift, 2 adjoint steps": il.IFT(max_iter=2),
        "shine": il.Shine(),
        "shine + 2 refinements": il.Shine(refine=2),
        "phantom, 2 steps": il.Phantom(steps=2),
        "phantom, 5 steps": il.Phantom(steps=5),
        "jfb": il.JFB(),
    },
}
SETTINGS_SHOWN = ("solver", "backward", "tol", "activation", "coeff")  # the trained iMixer's, in the header
# --problem imixer's run sizes the command line leaves unset: the full run's, and --quick's (the test's, seconds).
FULL = {"epochs": 5, "batch": 64, "max_batches": None, "repeats": 5}
QUICK = {"epochs": 1, "batch": 32, "max_batches": 3, "repeats": 1}
EXACT = dict(solver=il.Anderson(), budget=il.Budget(max_iter=400, tol=1e-10), backward=il.IFT(max_iter=600, tol=1e-12))


def compare(gradient: Tensor, exact: Tensor) -> dict[str, float]:
    """Relative error and cosine of a flattened gradient against the exact one."""
    gradient, exact = gradient.double(), exact.double()
    error = float((gradient - exact).norm() / exact.norm())
    return {"relative_error": error, "cosine": float(F.cosine_similarity(gradient, exact, dim=0))}


# --------------------------------------------------------------------------------------- mlp
class Cell(nn.Module):
    """f(z, x) = tanh(W_sn z + U x) with ||W_sn||₂ = coeff exactly (the normalisation binds)."""

    def __init__(self, dim: int, coeff: float) -> None:
        super().__init__()
        self.mix = il.spectral_norm(nn.Linear(dim, dim, bias=False), coeff=coeff, n_power_iterations=50)
        self.inject = nn.Linear(dim, dim)
        with torch.no_grad():
            self.mix.parametrizations.weight.original.mul_(4.0)
        self.mix.parametrizations.weight[0].refine_(self.mix.parametrizations.weight.original)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.mix(z) + self.inject(x))


def layer_gradient(layer: il.ImplicitLayer, x: Tensor, cotangent: Tensor) -> tuple[Tensor, float]:
    """The gradient of <cotangent, layer(x)> in (x, parameters), flattened, and the backward's seconds."""
    x = x.clone().requires_grad_()
    out = layer(x)
    loss = (out * cotangent.to(out.dtype)).sum()
    common.synchronize(x.device)
    start = time.perf_counter()
    grads = torch.autograd.grad(loss, [x, *layer.parameters()])
    common.synchronize(x.device)
    return torch.cat([g.flatten().double() for g in grads]), time.perf_counter() - start


def measure_mlp(dim: int, batch: int, coeff: float, solver: str, repeats: int, seed: int,
                device: Any = "cpu") -> dict[str, Any]:  # fmt: skip
    torch.manual_seed(seed)
    cell = Cell(dim, coeff).eval().to(device)  # eval: the normalised weight is fixed, the same for every mode
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, dim, generator=generator).to(device)
    cotangent = torch.randn(batch, dim, generator=generator).to(device)
    exact_layer = il.ImplicitLayer(cell, solver=solver, tol=1e-12, max_iter=2000).double().eval()
    exact, _ = layer_gradient(exact_layer, x.double(), cotangent.double())
    cell.float()
    rows = []
    for name, gradient in MODES["mlp"].items():
        layer = il.ImplicitLayer(
            cell, solver=solver, tol=1e-4, max_iter=200, backward=gradient, on_nonconvergence="ignore"
        ).eval()  # fmt: skip  (capped adjoints miss tol)
        grad, _ = layer_gradient(layer, x, cotangent)  # warm-up, and the gradient compared
        seconds = statistics.median(layer_gradient(layer, x, cotangent)[1] for _ in range(repeats))
        rows.append({"mode": name, **compare(grad, exact), "backward_seconds": seconds,
                     "forward_nstep_max": int(layer.stats.nstep.max())})  # fmt: skip
    for row in rows:
        row["time_ratio_to_ift"] = row["backward_seconds"] / rows[0]["backward_seconds"]
    return {"dim": dim, "batch": batch, "coeff": coeff, "solver": solver, "modes": rows}


def run_mlp(args: argparse.Namespace) -> list[dict[str, Any]]:
    dim, batch, repeats = (16, 8, 1) if args.quick else (64, 128, 9)
    settings = [(0.9, "anderson"), (0.99, "anderson"), (0.99, "broyden")]
    return [measure_mlp(dim, batch, coeff, solver, repeats, args.seed) for coeff, solver in settings]


# ------------------------------------------------------------------------------------ imixer
def configure(net: nn.Module, **settings: Any) -> None:
    """Sets ``solver``/``budget``/``backward`` on every token mixer; eval mode uses ``budget``."""
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
    return torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.grad is not None]), middle - tick, end - middle


def compare_modes(net: nn.Module, x: Tensor, y: Tensor, repeats: int) -> dict[str, Any]:
    """The exact gradient, then each mode's error, cosine and median times."""
    net.eval()
    exact_net = copy.deepcopy(net).double()
    configure(exact_net, **EXACT)
    exact = flat_gradient(exact_net, x.double(), y)[0]
    exact_converged = all(bool(layer.stats.converged.all()) for layer in exact_net.implicit_layers())
    rows = []
    for name, gradient in MODES["imixer"].items():
        if gradient.needs_memory and not net.implicit_layers()[0].solver.keeps_memory:
            continue
        model = copy.deepcopy(net)
        configure(model, backward=gradient)
        runs = [flat_gradient(model, x, y) for _ in range(repeats)]
        iterations = max(float(layer.stats.nstep.max()) for layer in model.implicit_layers())
        rows.append({"mode": name, "settings": repr(gradient), "kind": type(gradient).__name__,
                     "solved_exactly": isinstance(gradient, il.IFT) and gradient.max_iter is None,
                     "transforms": gradient.transforms, **compare(runs[-1][0], exact),
                     "forward_seconds": statistics.median(run[1] for run in runs),
                     "backward_seconds": statistics.median(run[2] for run in runs),
                     "forward_iterations_max": iterations})  # fmt: skip
    ift_backward = next(row["backward_seconds"] for row in rows if row["mode"] == "ift")
    for row in rows:
        row["backward_vs_ift"] = row["backward_seconds"] / ift_backward
    return {"exact_solves_converged": exact_converged, "modes": rows}


def run_imixer(args: argparse.Namespace) -> dict[str, Any]:
    """Trains the configuration ``args.epochs`` epochs under ``args.seed``, then compares the modes."""
    _, options = common.parse_config(f"trained={args.config}")
    task = training.Task(args.task, 16)
    recipe = argparse.Namespace(img_size=16, patch_size=2, lr=2e-3, weight_decay=0.05)
    print(f"training {render.options_text(options)} on {args.task} for {args.epochs} epochs", flush=True)
    run = training.Run("trained", options, args.seed, recipe, args.epochs * task.steps_per_epoch(args.batch,
                       args.max_batches))  # fmt: skip
    for epoch in range(1, args.epochs + 1):
        record = run.train_epoch(*task.train_epoch(args.seed, epoch), args.batch, args.max_batches)
        print(f"  epoch {epoch}: loss {record['train_loss']:.3f}, {record['train_seconds']:.1f} s", flush=True)
    images, labels = task.train_epoch(args.seed, args.epochs + 1)
    batch = 16 if args.quick else args.batch
    results = {"machine": common.machine("cpu") | {"threads": args.threads}, "options": options}
    results["settings"] = {key: run.net.implicit_settings[key] for key in SETTINGS_SHOWN}
    results |= {"task": args.task, "epochs": args.epochs, "seed": args.seed, "batch": batch, "repeats": args.repeats}
    return results | compare_modes(run.net, images[:batch], labels[:batch], args.repeats)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, checked, its run sizes resolved (:data:`FULL` / :data:`QUICK`, a value given wins)."""
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", choices=sorted(MODES), default="mlp", help="the DEQ layer or a trained iMixer")
    parser.add_argument("--quick", action="store_true", help="small problem / 1 epoch of 3 batches, 1 repeat")
    parser.add_argument("--out", type=Path, default=common.RESULTS, help="output folder")
    parser.add_argument("--docs", action="store_true", help="also write the results to the docs' assets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int_range(1), default=1, help="torch threads (side-by-side ratios: 1)")
    imixer = parser.add_argument_group("--problem imixer")
    imixer.add_argument("--config", default="", help="key:value,... (default: the library's defaults)")
    imixer.add_argument("--task", choices=training.TASKS, default="digits-hard")
    imixer.add_argument("--epochs", type=int_range(1), default=None, help="training epochs (default 5; 1 quick)")
    imixer.add_argument("--batch", type=int_range(1), default=None, help="batch size (default 64; 32 quick)")
    imixer.add_argument("--max-batches", type=int_range(1), default=None,
                        help="training batches per epoch (default: all; 3 quick)")  # fmt: skip
    imixer.add_argument("--repeats", type=int_range(1), default=None, help="timed repeats (default 5; 1 quick)")
    args = parser.parse_args(argv)
    common.fill_run_sizes(args, FULL, QUICK)
    try:
        common.parse_config(f"trained={args.config}")
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: Sequence[str] | None = None) -> Any:
    """Measures the ``--problem``'s gradient modes, prints the table, writes JSON and Markdown; returns the results."""
    args = parse_args(argv)
    with common.measuring(args.threads):
        results = run_mlp(args) if args.problem == "mlp" else run_imixer(args)
    table = render.backward_mlp_markdown(results) if args.problem == "mlp" else render.backward_imixer_markdown(results)
    print(table)
    for folder in [args.out, *([DOCS[args.problem]] if args.docs else [])]:
        common.write(folder, NAMES[args.problem], results, table)
    return results


if __name__ == "__main__":
    main()
