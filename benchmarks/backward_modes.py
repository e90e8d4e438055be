"""Gradient modes side by side: error against the exact gradient, and backward time.

    python benchmarks/backward_modes.py            # about a minute on 2 CPU cores
    python benchmarks/backward_modes.py --quick    # a few seconds, for the tests
    python benchmarks/backward_modes.py --docs     # also writes docs/assets/backward/

A DEQ layer z = tanh(W_sn z + U x), with ||W_sn||₂ = ``coeff`` (0.9: a moderate contraction; 0.99: a
slow one), is solved in float32 by the same forward solver for every mode (Anderson or Broyden, tol
1e-4, the layers' defaults), and differentiated by each gradient mode: ``ift`` (the adjoint solved to
the forward tolerance), ``shine`` with 0, 2 and 5 refinement steps (Ramzi et al., 2022: the adjoint
read from the forward solver's memory), ``ift`` capped at 2 and 5 adjoint steps from the usual cold
start (what the SHINE estimate is worth as a starting point), ``phantom`` with 5 damped steps and
``jfb``.

For each mode: the relative error of the gradient of a random linear loss in (x, U, W) against the
exact gradient (IFT in float64 at tol 1e-12, same weights and inputs), its cosine similarity, and the
median backward time over repeats with its ratio to ``ift``'s, all measured side by side in one run.
Results go to ``backward_modes.json`` and ``backward_modes.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import implicitlayers as il

REPO = Path(__file__).resolve().parents[1]
DOCS_ASSETS = REPO / "docs" / "assets" / "backward"

MODES: dict[str, dict[str, Any]] = {
    "ift": {"backward": il.IFT()},
    "shine": {"backward": il.Shine()},
    "shine, 2 refinements": {"backward": il.Shine(refine=2)},
    "shine, 5 refinements": {"backward": il.Shine(refine=5)},
    # The same adjoint budgets from a cold start (u = v): what the SHINE estimate is worth as a start.
    "ift, 2 adjoint steps": {"backward": il.IFT(max_iter=2), "on_nonconvergence": "ignore"},
    "ift, 5 adjoint steps": {"backward": il.IFT(max_iter=5), "on_nonconvergence": "ignore"},
    "phantom, 5 steps (λ 0.5)": {"backward": il.Phantom(steps=5, damping=0.5)},
    "jfb": {"backward": il.JFB()},
}


class Cell(nn.Module):
    """f(z, x) = tanh(W_sn z + U x) with ||W_sn||₂ = coeff exactly (the normalisation binds)."""

    def __init__(self, dim: int, coeff: float) -> None:
        super().__init__()
        self.mix = il.spectral_norm(nn.Linear(dim, dim, bias=False), coeff=coeff, n_power_iterations=50)
        self.inject = nn.Linear(dim, dim)
        with torch.no_grad():
            self.mix.parametrizations.weight.original.mul_(4.0)
        self.mix.parametrizations.weight[0].refine_(self.mix.parametrizations.weight.original)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(z) + self.inject(x))


def gradient(layer: il.ImplicitLayer, x: torch.Tensor, cotangent: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The gradient of <cotangent, layer(x)> in (x, parameters), flattened, and the backward's seconds."""
    x = x.clone().requires_grad_()
    out = layer(x)
    loss = (out * cotangent.to(out.dtype)).sum()
    start = time.perf_counter()
    grads = torch.autograd.grad(loss, [x, *layer.parameters()])
    seconds = time.perf_counter() - start
    return torch.cat([g.flatten().double() for g in grads]), seconds


def measure(dim: int, batch: int, coeff: float, solver: str, repeats: int, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    cell = Cell(dim, coeff).eval()  # eval: the normalised weight is fixed, the same for every mode
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, dim, generator=generator)
    cotangent = torch.randn(batch, dim, generator=generator)
    exact_layer = il.ImplicitLayer(cell, solver=solver, tol=1e-12, max_iter=2000).double().eval()
    exact, _ = gradient(exact_layer, x.double(), cotangent.double())
    cell.float()
    rows = []
    for name, options in MODES.items():
        layer = il.ImplicitLayer(cell, solver=solver, tol=1e-4, max_iter=200, **options).eval()
        grad, _ = gradient(layer, x, cotangent)  # warm-up, and the gradient compared
        seconds = statistics.median(gradient(layer, x, cotangent)[1] for _ in range(repeats))
        rows.append(
            {
                "mode": name,
                "relative_error": float((grad - exact).norm() / exact.norm()),
                "cosine": float(torch.nn.functional.cosine_similarity(grad, exact, dim=0)),
                "backward_seconds": seconds,
                "forward_nstep_max": int(layer.stats.nstep.max()),
            }
        )
    ift_seconds = rows[0]["backward_seconds"]
    for row in rows:
        row["time_ratio_to_ift"] = row["backward_seconds"] / ift_seconds
    return {"dim": dim, "batch": batch, "coeff": coeff, "solver": solver, "modes": rows}


def markdown(results: list[dict[str, Any]]) -> str:
    """One table per setting: mode, relative error, cosine, backward time and its ratio to ift."""
    lines = []
    for setting in results:
        lines += [
            f"**{setting['solver']}, ‖W‖₂ = {setting['coeff']}** (D = {setting['dim']}, B = {setting['batch']}, "
            f"forward tol 1e-4, {setting['modes'][0]['forward_nstep_max']} forward iterations)",
            "",
            "| gradient mode | relative error | cosine | backward ms (median) | × ift |",
            "|---|---|---|---|---|",
        ]
        for row in setting["modes"]:
            lines.append(
                f"| {row['mode']} | {row['relative_error']:.2e} | {row['cosine']:.5f} | "
                f"{1000 * row['backward_seconds']:.2f} | {row['time_ratio_to_ift']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small problem, 1 repeat")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output folder")
    parser.add_argument("--docs", action="store_true", help=f"also write the results to {DOCS_ASSETS}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # side-by-side ratios on a shared machine: one thread each
    dim, batch, repeats = (16, 8, 1) if args.quick else (64, 128, 9)
    settings = [(0.9, "anderson"), (0.99, "anderson"), (0.99, "broyden")]
    results = [measure(dim, batch, coeff, solver, repeats, args.seed) for coeff, solver in settings]
    table = markdown(results)
    print(table)
    folders = [args.out, *([DOCS_ASSETS] if args.docs else [])]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "backward_modes.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (folder / "backward_modes.md").write_text(table, encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
