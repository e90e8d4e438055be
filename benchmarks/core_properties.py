"""The numbers behind three core properties of implicitlayers, on fixed seeds, in float64.

- **P3, inverse accuracy.** ``ImplicitMLP.inverse(ImplicitMLP(x))`` and
  ``InvertibleResidual.inverse(InvertibleResidual(x))`` recover x: the largest per-sample relative error
  ||x' - x|| / ||x|| at tol 1e-10, per solver, in certified-contractive settings (GELU, coeff 0.7:
  Lip(g) <= 0.62; ELU, coeff 0.7: Lip(g) <= 0.49). Holds when every error is <= 1e-8.
- **P4, IFT gradients.** Gradients of a fixed-point layer z = tanh(W z + V x + b) (||W||_2 = 0.6) with
  ``backward="ift"`` (forward and adjoint tol 1e-12) against (a) autograd through a long unrolled
  Picard solve (``backward="unrolled"``, tol 0, 300 steps) and (b) the closed form
  dz/dx = (I - ∂f/∂z)^{-1} ∂f/∂x (likewise for the parameters), built per sample with
  :func:`torch.func.jacrev`. Relative errors ||g - g_ref|| / ||g_ref|| for the parameters and the input,
  per adjoint solver. Holds when every error is <= 1e-6.
- **P7, acceleration.** On the slow problem z = tanh(W z + U x), W symmetric with ||W||_2 = 0.99 (its
  dominant eigenvalue -0.99, so the fixed point stays in tanh's near-linear range) and
  ||U x|| = 0.1·sqrt(d), at tol 1e-6: median evaluations of f per sample for picard, anderson and
  broyden (default options), and the ratios to picard. Holds when both ratios are <= 1/3 and every
  solve converged.

Usage: ``python -m benchmarks.core_properties [--quick] [--seed N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

import implicitlayers as il
from benchmarks import render
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


# ----------------------------------------------------------------------------------------- P3
def inverse_accuracy(seed: int, batch: int, features: int, hidden: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    mlp = il.ImplicitMLP(features, hidden, activation="gelu", coeff=0.7, tol=P3_TOL, max_iter=200)
    mlp = mlp.double().eval()
    branch = nn.Sequential(
        il.spectral_norm(nn.Linear(features, hidden), 0.7),
        nn.ELU(),
        il.spectral_norm(nn.Linear(hidden, features), 0.7),
    )
    block = il.InvertibleResidual(branch, tol=P3_TOL, max_iter=200).double().eval()
    x = torch.randn(batch, features, dtype=torch.float64)
    errors: dict[str, dict[str, float]] = {"implicit_mlp": {}, "invertible_residual": {}}
    with torch.no_grad():
        for solver in SOLVERS:
            mlp.solver = block.solver = solver
            errors["implicit_mlp"][solver] = max_sample_relative_error(mlp.inverse(mlp(x)), x)
            errors["invertible_residual"][solver] = max_sample_relative_error(block.inverse(block(x)), x)
    worst = max(max(per_solver.values()) for per_solver in errors.values())
    return {
        "tol": P3_TOL,
        "threshold": P3_THRESHOLD,
        "lipschitz_bound": {
            "implicit_mlp": il.lipschitz_bound(mlp.g),
            "invertible_residual": il.lipschitz_bound(branch),
        },
        "max_rel_error": errors,
        "holds": worst <= P3_THRESHOLD,
    }


# ----------------------------------------------------------------------------------------- P4
class TanhCell(nn.Module):
    """f(z, x) = tanh(z Wᵀ + x Vᵀ + b) with ||W||_2 = 0.6 at initialisation."""

    def __init__(self, dim: int, generator: torch.Generator) -> None:
        super().__init__()
        w = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        self.w = nn.Parameter(0.6 * w / torch.linalg.matrix_norm(w, ord=2))
        self.v = nn.Parameter(torch.randn(dim, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim))
        self.b = nn.Parameter(0.1 * torch.randn(dim, generator=generator, dtype=torch.float64))

    @staticmethod
    def apply(z: Tensor, x: Tensor, w: Tensor, v: Tensor, b: Tensor) -> Tensor:
        return torch.tanh(z @ w.T + x @ v.T + b)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.apply(z, x, self.w, self.v, self.b)


def layer_gradients(layer: il.ImplicitLayer, x: Tensor, cotangent: Tensor) -> tuple[Tensor, Tensor]:
    """(dL/dparams flattened, dL/dx) for L = <cotangent, layer(x)>."""
    xr = x.clone().requires_grad_()
    z = layer(xr)
    params = list(layer.f.parameters())
    grads = torch.autograd.grad((z * cotangent).sum(), [xr, *params])
    return torch.cat([g.reshape(-1) for g in grads[1:]]), grads[0]


def closed_form_gradients(cell: TanhCell, x: Tensor, cotangent: Tensor) -> tuple[Tensor, Tensor]:
    """dz/dx = (I - ∂f/∂z)^{-1} ∂f/∂x and dz/dθ = (I - ∂f/∂z)^{-1} ∂f/∂θ per sample, contracted with the cotangent."""
    params = [p.detach() for p in cell.parameters()]
    with torch.no_grad():
        z = il.solve(lambda z: cell(z, x), torch.zeros_like(x), solver="anderson", tol=1e-15, max_iter=500).z

    def single(z_b: Tensor, x_b: Tensor, *theta: Tensor) -> Tensor:
        return TanhCell.apply(z_b, x_b, *theta)

    in_dims = (0, 0, *([None] * len(params)))
    jacobians = vmap(jacrev(single, argnums=tuple(range(2 + len(params)))), in_dims=in_dims)(z, x, *params)
    batch, dim = z.shape
    eye = torch.eye(dim, dtype=z.dtype)
    system = eye - jacobians[0]  # (B, d, d)
    dz_dx = torch.linalg.solve(system, jacobians[1])  # (B, d, d_x)
    df_dtheta = torch.cat([j.reshape(batch, dim, -1) for j in jacobians[2:]], dim=2)  # (B, d, n_params)
    dz_dtheta = torch.linalg.solve(system, df_dtheta)
    grad_x = torch.einsum("bi,bij->bj", cotangent, dz_dx)
    grad_theta = torch.einsum("bi,bij->j", cotangent, dz_dtheta)
    return grad_theta, grad_x


def gradient_accuracy(seed: int, batch: int, dim: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    cell = TanhCell(dim, generator)
    x = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    cotangent = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    unrolled = il.ImplicitLayer(cell, backward="unrolled", tol=0.0, max_iter=P4_UNROLLED_STEPS)
    unrolled_theta, unrolled_x = layer_gradients(unrolled, x, cotangent)
    closed_theta, closed_x = closed_form_gradients(cell, x, cotangent)
    rows: dict[str, dict[str, float]] = {
        "unrolled": {
            "vs_closed_form_params": relative_error(unrolled_theta, closed_theta),
            "vs_closed_form_inputs": relative_error(unrolled_x, closed_x),
        }
    }
    for solver in SOLVERS:
        layer = il.ImplicitLayer(cell, solver=solver, backward="ift", tol=P4_TOL, max_iter=200)
        theta, grad_x = layer_gradients(layer, x, cotangent)
        rows[f"ift_{solver}"] = {
            "vs_unrolled_params": relative_error(theta, unrolled_theta),
            "vs_unrolled_inputs": relative_error(grad_x, unrolled_x),
            "vs_closed_form_params": relative_error(theta, closed_theta),
            "vs_closed_form_inputs": relative_error(grad_x, closed_x),
        }
    worst = max(max(row.values()) for row in rows.values())
    return {
        "tol": P4_TOL,
        "unrolled_steps": P4_UNROLLED_STEPS,
        "threshold": P4_THRESHOLD,
        "rel_error": rows,
        "holds": worst <= P4_THRESHOLD,
    }


# ----------------------------------------------------------------------------------------- P7
def acceleration(seeds: Sequence[int], batch: int, dim: int) -> dict[str, Any]:
    nsteps: dict[str, list[Tensor]] = {solver: [] for solver in SOLVERS}
    converged: dict[str, list[Tensor]] = {solver: [] for solver in SOLVERS}
    for seed in seeds:
        f = symmetric_tanh_problem(dim, batch, seed=seed)
        drive = f.drive
        for solver in SOLVERS:
            result = il.solve(f, torch.zeros_like(drive), solver=solver, tol=P7_TOL, max_iter=P7_MAX_ITER)
            nsteps[solver].append(result.nstep)
            converged[solver].append(result.converged)
    median = {name: float(torch.cat(values).double().median()) for name, values in nsteps.items()}
    fraction = {name: float(torch.cat(values).double().mean()) for name, values in converged.items()}
    ratios = {name: median[name] / median["picard"] for name in ("anderson", "broyden")}
    return {
        "tol": P7_TOL,
        "max_iter": P7_MAX_ITER,
        "samples": batch * len(seeds),
        "median_nstep": median,
        "converged_fraction": fraction,
        "ratio_to_picard": ratios,
        "max_ratio": P7_MAX_RATIO,
        "holds": all(r <= P7_MAX_RATIO for r in ratios.values()) and all(f == 1.0 for f in fraction.values()),
    }


# ----------------------------------------------------------------------------------------- CLI
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
    parser = argparse.ArgumentParser(description="Numbers behind implicitlayers' core properties P3, P4, P7.")
    parser.add_argument("--seed", type=int, default=0, help="base seed")
    parser.add_argument("--quick", action="store_true", help="smaller problems (seconds)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    # Tiny problems: one thread avoids thread start-up dominating the run time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = run(seed=args.seed, quick=args.quick)
    finally:
        torch.set_num_threads(threads)
    print(render.core_report(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
