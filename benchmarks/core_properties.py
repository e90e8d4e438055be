"""The numbers behind three core properties of implicitlayers, on fixed seeds, in float64.

Usage: ``python -m benchmarks.core_properties [--quick] [--seed N] [--json PATH]``. What P3 (inverse accuracy),
P4 (IFT gradients) and P7 (acceleration) measure and when each holds: benchmarks/README.md, "Core properties".
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

import implicitlayers as il
from benchmarks import common, render
from examples.common import OneLineArgumentParser
from implicitlayers.problems import symmetric_tanh_problem

SOLVERS = ["picard", "anderson", "broyden"]
P3_TOL, P3_THRESHOLD = 1e-10, 1e-8
P4_TOL, P4_THRESHOLD, P4_UNROLLED_STEPS = 1e-12, 1e-6, 300
P7_TOL, P7_MAX_RATIO, P7_MAX_ITER = 1e-6, 1 / 3, 2000


def relative_error(estimate: Tensor, reference: Tensor) -> float:
    """||estimate - reference|| / ||reference|| over all entries."""
    return float(torch.linalg.vector_norm(estimate - reference) / torch.linalg.vector_norm(reference))


def max_sample_relative_error(estimate: Tensor, reference: Tensor) -> float:
    """The largest per-sample ||estimate_b - reference_b|| / ||reference_b||."""
    diff = torch.linalg.vector_norm((estimate - reference).flatten(1), dim=1)
    return float((diff / torch.linalg.vector_norm(reference.flatten(1), dim=1)).max())


def inverse_accuracy(seed: int, batch: int, features: int, hidden: int) -> dict[str, Any]:
    """P3: ``inverse(forward(x))`` against x for a GELU ``ImplicitMLP`` and an ELU ``InvertibleResidual``."""
    torch.manual_seed(seed)
    mlp = il.ImplicitMLP(features, hidden, activation="gelu", coeff=0.7, tol=P3_TOL, max_iter=200).double().eval()
    branch = nn.Sequential(il.spectral_norm(nn.Linear(features, hidden), 0.7), nn.ELU(),
                           il.spectral_norm(nn.Linear(hidden, features), 0.7))  # fmt: skip
    block = il.InvertibleResidual(branch, tol=P3_TOL, max_iter=200).double().eval()
    x = torch.randn(batch, features, dtype=torch.float64)
    errors: dict[str, dict[str, float]] = {"implicit_mlp": {}, "invertible_residual": {}}
    with torch.no_grad():
        for solver in SOLVERS:
            mlp.solver = block.solver = solver
            errors["implicit_mlp"][solver] = max_sample_relative_error(mlp.inverse(mlp(x)), x)
            errors["invertible_residual"][solver] = max_sample_relative_error(block.inverse(block(x)), x)
    bounds = {"implicit_mlp": il.lipschitz_bound(mlp.g), "invertible_residual": il.lipschitz_bound(branch)}
    return {"tol": P3_TOL, "threshold": P3_THRESHOLD, "lipschitz_bound": bounds, "max_rel_error": errors,
            "holds": max(max(per_solver.values()) for per_solver in errors.values()) <= P3_THRESHOLD}  # fmt: skip


class TanhCell(nn.Module):
    """f(z, x) = tanh(z Wᵀ + x Vᵀ + b) with ||W||_2 = 0.6 at initialisation."""

    def __init__(self, dim: int, generator: torch.Generator) -> None:
        super().__init__()
        randn = partial(torch.randn, generator=generator, dtype=torch.float64)
        w = randn(dim, dim)
        self.w = nn.Parameter(0.6 * w / torch.linalg.matrix_norm(w, ord=2))
        self.v = nn.Parameter(randn(dim, dim) / math.sqrt(dim))
        self.b = nn.Parameter(0.1 * randn(dim))

    @staticmethod
    def apply(z: Tensor, x: Tensor, w: Tensor, v: Tensor, b: Tensor) -> Tensor:
        return torch.tanh(z @ w.T + x @ v.T + b)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.apply(z, x, self.w, self.v, self.b)


def layer_gradients(layer: il.ImplicitLayer, x: Tensor, cotangent: Tensor) -> tuple[Tensor, Tensor]:
    """(dL/dparams flattened, dL/dx) for L = <cotangent, layer(x)>."""
    xr = x.clone().requires_grad_()
    grads = torch.autograd.grad((layer(xr) * cotangent).sum(), [xr, *layer.f.parameters()])
    return torch.cat([g.reshape(-1) for g in grads[1:]]), grads[0]


def closed_form_gradients(cell: TanhCell, x: Tensor, cotangent: Tensor) -> tuple[Tensor, Tensor]:
    """dz/dx = (I - ∂f/∂z)^{-1} ∂f/∂x and dz/dθ = (I - ∂f/∂z)^{-1} ∂f/∂θ per sample, contracted with the cotangent."""
    params = [p.detach() for p in cell.parameters()]
    with torch.no_grad():
        z = il.solve(lambda z: cell(z, x), torch.zeros_like(x), solver="anderson", tol=1e-15, max_iter=500).z
    jacobian = jacrev(TanhCell.apply, argnums=tuple(range(2 + len(params))))  # per sample, w.r.t. z, x and θ
    jacobians = vmap(jacobian, in_dims=(0, 0, *([None] * len(params))))(z, x, *params)
    system = torch.eye(z.shape[1], dtype=z.dtype) - jacobians[0]  # (B, d, d)
    dz_dx = torch.linalg.solve(system, jacobians[1])  # (B, d, d_x)
    df_dtheta = torch.cat([j.reshape(*z.shape, -1) for j in jacobians[2:]], dim=2)  # (B, d, n_params)
    dz_dtheta = torch.linalg.solve(system, df_dtheta)
    return torch.einsum("bi,bij->j", cotangent, dz_dtheta), torch.einsum("bi,bij->bj", cotangent, dz_dx)


def gradient_accuracy(seed: int, batch: int, dim: int) -> dict[str, Any]:
    """P4: IFT gradients, per adjoint solver, against autograd through unrolled Picard and the closed form."""
    generator = torch.Generator().manual_seed(seed)
    cell = TanhCell(dim, generator)
    x = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    cotangent = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    unrolled = il.ImplicitLayer(cell, backward="unrolled", tol=0.0, max_iter=P4_UNROLLED_STEPS)
    references = {"unrolled": layer_gradients(unrolled, x, cotangent)}
    references["closed_form"] = closed_form_gradients(cell, x, cotangent)

    def errors(grads: tuple[Tensor, Tensor], *against: str) -> dict[str, float]:
        return {f"vs_{name}_{part}": relative_error(grads[i], references[name][i])
                for name in against for i, part in enumerate(("params", "inputs"))}  # fmt: skip

    rows = {"unrolled": errors(references["unrolled"], "closed_form")}
    for solver in SOLVERS:
        layer = il.ImplicitLayer(cell, solver=solver, backward="ift", tol=P4_TOL, max_iter=200)
        rows[f"ift_{solver}"] = errors(layer_gradients(layer, x, cotangent), "unrolled", "closed_form")
    return {"tol": P4_TOL, "unrolled_steps": P4_UNROLLED_STEPS, "threshold": P4_THRESHOLD, "rel_error": rows,
            "holds": max(max(row.values()) for row in rows.values()) <= P4_THRESHOLD}  # fmt: skip


def acceleration(seeds: Sequence[int], batch: int, dim: int) -> dict[str, Any]:
    """P7: median evaluations of f per sample on the slow symmetric tanh problem, and their ratios to Picard's."""
    runs: dict[str, list[il.SolverResult]] = {solver: [] for solver in SOLVERS}
    for seed in seeds:
        f = symmetric_tanh_problem(dim, batch, seed=seed)
        for solver in SOLVERS:
            runs[solver].append(il.solve(f, torch.zeros_like(f.drive), solver=solver, tol=P7_TOL, max_iter=P7_MAX_ITER))
    median = {name: float(torch.cat([r.nstep for r in rs]).double().median()) for name, rs in runs.items()}
    fraction = {name: float(torch.cat([r.converged for r in rs]).double().mean()) for name, rs in runs.items()}
    ratios = {name: median[name] / median["picard"] for name in ("anderson", "broyden")}
    holds = all(r <= P7_MAX_RATIO for r in ratios.values()) and all(f == 1.0 for f in fraction.values())
    return {"tol": P7_TOL, "max_iter": P7_MAX_ITER, "samples": batch * len(seeds), "median_nstep": median,
            "converged_fraction": fraction, "ratio_to_picard": ratios, "max_ratio": P7_MAX_RATIO,
            "holds": holds}  # fmt: skip


def run(seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """Computes the three properties; ``quick`` shrinks the problems (used by the tests)."""
    start = time.perf_counter()
    results: dict[str, Any] = {
        "config": {"seed": seed, "quick": quick, "dtype": "float64", "torch": torch.__version__},
        "p3_inverse": inverse_accuracy(
            seed, batch=16 if quick else 64, features=16 if quick else 32, hidden=32 if quick else 64
        ),
        "p4_gradients": gradient_accuracy(seed, batch=3 if quick else 8, dim=4 if quick else 8),
        "p7_acceleration": acceleration(
            [seed] if quick else [seed, seed + 1, seed + 2], batch=8 if quick else 16, dim=64
        ),
    }
    results["all_hold"] = all(results[key]["holds"] for key in ("p3_inverse", "p4_gradients", "p7_acceleration"))
    results["seconds"] = time.perf_counter() - start
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Prints the report (and writes JSON with ``--json PATH``); returns the results."""
    parser = OneLineArgumentParser(description="Numbers behind implicitlayers' core properties P3, P4, P7.")
    parser.add_argument("--seed", type=int, default=0, help="base seed")
    parser.add_argument("--quick", action="store_true", help="smaller problems (seconds)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    # Tiny problems: one thread avoids thread start-up dominating the run time.
    with common.measuring(threads=1):
        results = run(seed=args.seed, quick=args.quick)
    print(render.core_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
