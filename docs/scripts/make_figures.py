"""Generates the documentation's figures into docs/assets/figures/.

    python -m docs.scripts.make_figures

- ``residual_trace.png``: the largest per-sample residual over the batch after each evaluation of f
  (``SolverResult.trace``), for picard, anderson and broyden, on two problems:
  an ``ImplicitMLP``'s z = x + g(z) (GELU, coeff 0.9, as in the iMixer token mixer, at initialisation)
  and the slow symmetric tanh problem of ``benchmarks/core_properties.py`` (z = tanh(W z + U x),
  W symmetric with dominant eigenvalue -0.99).
- ``residual_trace.json``: what the Solvers page quotes from that figure, per problem and solver:
  the evaluations of f (``nstep`` max), whether every sample converged, the last residual of the
  trace, and the first evaluation at which the trace reached 1e-4 (``tests/test_docs_numbers.py``
  checks the page against it).
- ``imixer_block.png``: the iMixer block diagram.

Everything runs in float64 on fixed seeds on the CPU, in a few seconds.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

import implicitlayers as il
from implicitlayers.problems import symmetric_tanh_problem

OUT = Path(__file__).resolve().parents[1] / "assets" / "figures"
SOLVERS = ("picard", "anderson", "broyden")
COLORS = {"picard": "#1f77b4", "anderson": "#d62728", "broyden": "#2ca02c"}
TOL = 1e-10


def implicit_mlp_problem(seed: int = 0, batch: int = 64, features: int = 64, hidden: int = 128):
    """z = x + g(z) for an ImplicitMLP's g (GELU, pre-activation, coeff 0.9) at initialisation."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", il.LipschitzWarning)  # certified bound ≈ 1.03, see Concepts
        layer = il.ImplicitMLP(features, hidden, coeff=0.9).double().eval()
    x = torch.randn(batch, features, dtype=torch.float64)
    return (lambda z: x + layer.g(z)), x.clone()


def _slow_tanh_problem():
    """z = tanh(W z + U x), W symmetric, dominant eigenvalue -0.99 (as benchmarks/core_properties.py)."""
    f = symmetric_tanh_problem(64, 16, seed=0)
    return f, torch.zeros_like(f.drive)


# Figure panel titles, and the keys of residual_trace.json.
TITLES = {
    "implicit_mlp": "ImplicitMLP z = x + g(z)  (GELU, coeff 0.9, 64 features)",
    "slow_tanh": "slow tanh problem  (symmetric W, eigenvalue -0.99)",
}


def residual_traces() -> dict[str, dict[str, il.SolverResult]]:
    problems = {
        TITLES["implicit_mlp"]: (implicit_mlp_problem(), 40),
        TITLES["slow_tanh"]: (_slow_tanh_problem(), 400),
    }
    results = {}
    with torch.no_grad():
        for title, ((f, z0), max_iter) in problems.items():
            results[title] = {s: il.solve(f, z0, solver=s, tol=TOL, max_iter=max_iter) for s in SOLVERS}
    return results


def plot_residuals(results: dict[str, dict[str, il.SolverResult]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(11, 4.2), constrained_layout=True)
    for ax, (title, per_solver) in zip(axes, results.items(), strict=True):
        for solver, res in per_solver.items():
            trace = res.trace.double().clamp_min(1e-17).numpy()
            verdict = "all" if bool(res.converged.all()) else "not all"
            label = f"{solver}  (max nstep {int(res.nstep.max())}, {verdict} converged)"
            ax.semilogy(range(1, len(trace) + 1), trace, color=COLORS[solver], lw=1.8, label=label)
        ax.axhline(TOL, color="gray", ls="--", lw=1)
        ax.text(1, TOL * 1.8, f"tol {TOL:g}", color="gray", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("evaluations of f")
        ax.set_ylabel("largest relative residual over the batch")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle("SolverResult.trace per solver (float64, tol 1e-10)", fontsize=11)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def trace_summary(results: dict[str, dict[str, il.SolverResult]]) -> dict[str, dict[str, dict]]:
    """Per problem key and solver: the numbers the Solvers page quotes from the figure."""
    summary = {}
    for key, title in TITLES.items():
        summary[key] = {}
        for solver, res in results[title].items():
            trace = res.trace.double()
            reached = (trace <= 1e-4).nonzero()
            summary[key][solver] = {
                "nstep_max": int(res.nstep.max()),
                "all_converged": bool(res.converged.all()),
                "last_residual": float(trace[-1]),
                "evaluations_to_1e-4": int(reached[0]) + 1 if len(reached) else None,
            }
    return {"tol": TOL, "problems": summary}


def _box(ax, x, y, w, h, text, color, fontsize=9):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec="#333", lw=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, start, end, style="-|>", color="#333", rad=0.0, ls="-"):
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle=style,
            mutation_scale=12,
            color=color,
            lw=1.2,
            connectionstyle=f"arc3,rad={rad}",
            linestyle=ls,
        )
    )


def plot_imixer_block(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(11, 6.0))
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 6.0)
    ax.axis("off")
    blue, orange, green, grey = "#dbe8f6", "#fde3c8", "#d9f0d3", "#eeeeee"

    # Top row: the block.
    y = 4.3
    _box(ax, 0.1, y, 0.9, 0.6, "x\n(B, N, C)", grey)
    _box(ax, 1.3, y, 0.9, 0.6, "LayerNorm", grey)
    _box(ax, 2.5, y, 2.2, 0.6, "token mixer (iMLP)\nalong N, per channel", orange)
    _box(ax, 5.0, y, 0.6, 0.6, "+", grey, 12)
    _box(ax, 5.9, y, 0.9, 0.6, "LayerNorm", grey)
    _box(ax, 7.1, y, 2.0, 0.6, "channel MLP\nC → 4C → C, GELU", blue)
    _box(ax, 9.4, y, 0.6, 0.6, "+", grey, 12)
    _box(ax, 10.2, y, 0.7, 0.6, "x'", grey)
    mid = y + 0.3
    for a, b in ((1.0, 1.3), (2.2, 2.5), (4.7, 5.0), (5.6, 5.9), (6.8, 7.1), (9.1, 9.4), (10.0, 10.2)):
        _arrow(ax, (a, mid), (b, mid))
    _arrow(ax, (0.55, y + 0.6), (5.3, y + 0.6), rad=-0.25)
    _arrow(ax, (5.3, y + 0.6), (9.7, y + 0.6), rad=-0.25)
    ax.text(1.9, 5.75, "skip (DropPath on the branch)", fontsize=8, color="#555")
    ax.text(6.4, 5.75, "skip (DropPath on the branch)", fontsize=8, color="#555")

    # Bottom: the token mixer expanded.
    _arrow(ax, (3.6, y), (3.6, 3.55), ls="--", color="#888")
    ax.add_patch(
        FancyBboxPatch(
            (0.1, 0.15), 10.8, 3.3, boxstyle="round,pad=0.02,rounding_size=0.1", fc="#fffaf3", ec="#d9a066", lw=1.2
        )
    )
    ax.text(
        0.3,
        3.15,
        "token mixer, on u = LN(x)ᵀ  (each of the C channels is a row of N tokens)",
        fontsize=9,
        weight="bold",
    )
    yb = 1.9
    _box(ax, 0.3, yb, 0.8, 0.6, "u\n(N)", grey)
    _box(ax, 1.4, yb, 1.1, 0.6, "fc1\nN → T", green)
    _box(ax, 2.9, yb - 0.15, 3.2, 0.9, "z = (1 − F)⁻¹(x_in)\nsolve z = x_in + F(z)\n(ImplicitMLP)", orange, 9)
    _box(ax, 6.5, yb, 0.8, 0.6, "GELU", grey)
    _box(ax, 7.6, yb, 1.1, 0.6, "fc2\nT → N", green)
    _box(ax, 9.1, yb, 1.1, 0.6, "out\n(N)", grey)
    midb = yb + 0.3
    for a, b in ((1.1, 1.4), (2.5, 2.9), (6.1, 6.5), (7.3, 7.6), (8.7, 9.1)):
        _arrow(ax, (a, midb), (b, midb))
    ax.text(2.55, midb + 0.08, "x_in", fontsize=8)
    # F feedback loop.
    _box(
        ax,
        2.5,
        0.35,
        4.0,
        0.7,
        "F = Linear_sn(H → T) ∘ GELU ∘ Linear_sn(T → H) ∘ GELU\nspectral norm ≤ coeff (0.9) per linear layer",
        "#f6d5d5",
        8,
    )
    _arrow(ax, (5.6, yb - 0.15), (5.6, 1.05), color="#b03030")
    _arrow(ax, (3.4, 1.05), (3.4, yb - 0.15), color="#b03030")
    ax.text(5.7, 1.35, "z", fontsize=9, color="#b03030")
    ax.text(2.7, 1.35, "F(z)", fontsize=9, color="#b03030")
    ax.text(
        6.75,
        0.4,
        "reference code: n_iter Picard steps\nz ← x_in + F(z), autograd through the loop\n"
        "implicitlayers default: anderson to a\ntolerance, IFT gradient",
        fontsize=8,
        color="#555",
    )
    ax.text(6.4, 2.75, "T = C/2,  H = hidden_ratio · T", fontsize=8, color="#555")
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    results = residual_traces()
    for title, per_solver in results.items():
        summary = ", ".join(f"{s}: nstep max {int(r.nstep.max())}" for s, r in per_solver.items())
        print(f"{title}: {summary}")
    plot_residuals(results, OUT / "residual_trace.png")
    summary = json.dumps(trace_summary(results), indent=2) + "\n"
    (OUT / "residual_trace.json").write_text(summary, encoding="utf-8")
    plot_imixer_block(OUT / "imixer_block.png")
    print(f"wrote residual_trace.png, residual_trace.json and imixer_block.png to {OUT}")


if __name__ == "__main__":
    main()
