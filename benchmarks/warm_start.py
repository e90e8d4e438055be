"""Warm starts on related inputs: evaluations of f and time with and without ``warm_start=True``.

Usage: ``python -m benchmarks.warm_start [--quick] [--out DIR] [--seed N]``; see benchmarks/README.md, "Warm starts"."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

import implicitlayers as il
from benchmarks import common, render
from benchmarks.backward import Cell
from examples.common import OneLineArgumentParser


def run_sequence(layer: il.ImplicitLayer, frames: list[torch.Tensor], warm: bool) -> int:
    """Evaluations of f over one pass, cold or warm from a reset start (a batched solve runs until its slowest row)."""
    layer.warm_start = warm
    layer.reset_warm_start()
    evaluations = 0
    with torch.no_grad():
        for x in frames:
            layer(x)
            evaluations += int(layer.stats.nstep.max())  # layer.stats: the solve it just ran
    return evaluations


def measure(sigma: float, dim: int, batch: int, frames: int, repeats: int, seed: int) -> dict:
    """Cold and warm passes (median seconds of ``repeats``) over inputs x_t = x_{t-1} + σ·ε_t, same weights."""
    torch.manual_seed(seed)
    layer = il.ImplicitLayer(Cell(dim, coeff=0.95), solver="anderson", tol=1e-5, max_iter=200).eval()
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(batch, dim, generator=generator)]
    for _ in range(frames - 1):
        inputs.append(inputs[-1] + sigma * torch.randn(batch, dim, generator=generator))
    cold_s, _, cold = common.timed(partial(run_sequence, layer, inputs, False), "cpu", 0, repeats)
    warm_s, _, warm = common.timed(partial(run_sequence, layer, inputs, True), "cpu", 0, repeats)
    return {"sigma": sigma, "cold_evaluations": cold, "cold_seconds": cold_s, "warm_evaluations": warm,
            "warm_seconds": warm_s, "evaluation_ratio": warm / cold, "time_ratio": warm_s / cold_s}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short sequences, 1 repeat")
    parser.add_argument("--out", type=Path, default=common.RESULTS, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = dict(dim=32, batch=8, frames=8, repeats=1) if args.quick else dict(dim=64, batch=32, frames=40, repeats=5)
    with common.measuring(threads=1):  # tiny solves: thread start-up would dominate
        results = {"config": config, "rows": [measure(sigma, seed=args.seed, **config) for sigma in (0.01, 0.1, 1.0)]}
    print(table := render.warm_start_table(results))
    common.write(args.out, "warm_start", results, table)
    return results


if __name__ == "__main__":
    main()
