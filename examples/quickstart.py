"""Quickstart: solve implicit layers with each built-in solver, then differentiate one with the IFT.

Run ``python examples/quickstart.py`` (``--quick`` for a smaller batch, ``--seed N`` for other weights).
It prints three things:

1. An :class:`implicitlayers.ImplicitMLP` (z = x + g(z), g a spectrally normalised GELU MLP with
   coeff 0.9) solved by ``picard``, ``anderson`` and ``broyden``: iterations, residuals, and how well
   the explicit inverse x = z - g(z) recovers the input.
2. A deliberately slow problem, z = tanh(W z + U x) with symmetric ||W||_2 = 0.99, where Picard's
   linear rate is close to one and Anderson/Broyden need several times fewer evaluations of f.
3. One backward pass through the layer with implicit-function-theorem (IFT) gradients, and the
   statistics of the adjoint solve it ran (``layer.backward_stats``).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: import the package from the repository root instead
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import implicitlayers as il
from examples.common import OneLineArgumentParser
from implicitlayers.problems import symmetric_tanh_problem

SOLVERS = ["picard", "anderson", "broyden"]
HEADER = (
    f"{'solver':<10} {'nstep mean':>10} {'nstep max':>9} {'max residual':>12} "
    f"{'converged':>9} {'inverse err':>11} {'wall ms':>8}"
)


def row(name: str, stats: il.SolverResult, inverse_error: float | None, wall_ms: float) -> str:
    summary = stats.summary()
    inverse = "-" if inverse_error is None else f"{inverse_error:.2e}"
    return (
        f"{name:<10} {summary['nstep_mean']:>10.1f} {int(summary['nstep_max']):>9d} {summary['residual_max']:>12.2e} "
        f"{1 - summary['unconverged']:>9.0%} {inverse:>11} {wall_ms:>8.1f}"
    )


def implicit_mlp_table(batch: int, tol: float, seed: int) -> None:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # coeff 0.9 with GELU is certified only to Lip(g) <= 1.03; it converges in practice.
        warnings.simplefilter("ignore", il.LipschitzWarning)
        layer = il.ImplicitMLP(64, 128, activation="gelu", coeff=0.9, tol=tol, max_iter=200).double().eval()
    x = torch.randn(batch, 64, dtype=torch.float64)
    print(f"ImplicitMLP(64, 128, gelu, coeff=0.9), batch {batch}, float64, tol {tol:g}")
    print(HEADER)
    with torch.no_grad():
        for solver in SOLVERS:
            layer.solver = solver
            start = time.perf_counter()
            z = layer(x)
            wall_ms = 1e3 * (time.perf_counter() - start)
            inverse_error = float((layer.inverse(z) - x).abs().max() / x.abs().max())
            print(row(solver, layer.stats, inverse_error, wall_ms))


def slow_problem_table(batch: int, tol: float, seed: int) -> None:
    f = symmetric_tanh_problem(64, batch, seed=seed)
    drive = f.drive
    print(f"\nSlow problem z = tanh(W z + U x), ||W||_2 = 0.99 (symmetric), batch {batch}, float64, tol {tol:g}")
    print(HEADER)
    for solver in SOLVERS:
        start = time.perf_counter()
        result = il.solve(f, torch.zeros_like(drive), solver=solver, tol=tol, max_iter=2000)
        wall_ms = 1e3 * (time.perf_counter() - start)
        print(row(solver, result, None, wall_ms))


def ift_backward(batch: int, tol: float, seed: int) -> None:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", il.LipschitzWarning)
        layer = il.ImplicitMLP(64, 128, activation="gelu", coeff=0.9, tol=tol, max_iter=200).double().eval()
    x = torch.randn(batch, 64, dtype=torch.float64, requires_grad=True)
    z = layer(x)
    loss = z.square().mean()
    loss.backward()
    stats = layer.backward_stats
    assert stats is not None
    summary = stats.summary()
    grad_norm = math.sqrt(sum(float(p.grad.square().sum()) for p in layer.parameters() if p.grad is not None))
    print(f"\nIFT backward (solver {layer.backward.solver or layer.solver!r}): loss {float(loss.detach()):.6f}")
    print(
        f"backward_stats: nstep mean {summary['nstep_mean']:.1f}, max {int(summary['nstep_max'])}, "
        f"max residual {summary['residual_max']:.2e}, converged {1 - summary['unconverged']:.0%}"
    )
    print(f"|dL/dx| = {float(x.grad.norm()):.4e}, |dL/dtheta| = {grad_norm:.4e}")


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the three demos; ``argv`` as for the command line (``--seed``, ``--quick``)."""
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    parser.add_argument("--quick", action="store_true", help="smaller batches (for tests)")
    args = parser.parse_args(argv)
    batch, tol, threads = 16 if args.quick else 256, 1e-8, torch.get_num_threads()
    # The problems are small: one thread avoids thread start-up costs dominating the timings.
    torch.set_num_threads(1)
    try:
        implicit_mlp_table(batch, tol, args.seed)
        slow_problem_table(8 if args.quick else 32, 1e-6, args.seed)
        ift_backward(batch, tol, args.seed)
    finally:  # a caller in the same process (a test) keeps its thread count
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
