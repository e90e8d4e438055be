"""Warm starts on related inputs: evaluations of f and time with and without ``warm_start=True``.

    python -m benchmarks.warm_start            # a few seconds on 2 CPU cores
    python -m benchmarks.warm_start --quick    # about a second, for the tests

A DEQ layer, z = tanh(W_sn z + U x) with ||W_sn||₂ = 0.95 (a slow contraction), runs over sequences
of related inputs x_t = x_{t-1} + σ·ε_t (frames of a video, steps of an iterative refinement), once
cold (every solve from z_init) and once warm (each solve from the previous output), in eval mode with
the same solver, tolerance and weights. Printed per σ: total evaluations of f, median seconds per
sequence, and warm/cold ratios; the same numbers go to ``warm_start.json`` / ``.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import implicitlayers as il
from benchmarks import common, render
from benchmarks.backward import Cell


def run_sequence(layer: il.ImplicitLayer, frames: list[torch.Tensor]) -> tuple[int, float]:
    layer.reset_warm_start()
    evaluations, start = 0, time.perf_counter()
    with torch.no_grad():
        for x in frames:
            layer(x)
            evaluations += int(layer.stats.nstep.max())  # a batched solve runs until its slowest row
    return evaluations, time.perf_counter() - start


def measure(dim: int, batch: int, length: int, sigma: float, repeats: int, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    layer = il.ImplicitLayer(Cell(dim, coeff=0.95), solver="anderson", tol=1e-5, max_iter=200).eval()
    generator = torch.Generator().manual_seed(seed)
    frames = [torch.randn(batch, dim, generator=generator)]
    for _ in range(length - 1):
        frames.append(frames[-1] + sigma * torch.randn(batch, dim, generator=generator))
    row: dict[str, Any] = {"sigma": sigma}
    for mode in ("cold", "warm"):
        layer.warm_start = mode == "warm"
        runs = [run_sequence(layer, frames) for _ in range(repeats)]
        row[f"{mode}_evaluations"] = runs[0][0]
        row[f"{mode}_seconds"] = statistics.median(seconds for _, seconds in runs)
    row["evaluation_ratio"] = row["warm_evaluations"] / row["cold_evaluations"]
    row["time_ratio"] = row["warm_seconds"] / row["cold_seconds"]
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short sequences, 1 repeat")
    parser.add_argument("--out", type=Path, default=common.RESULTS, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dim, batch, length, repeats = (32, 8, 8, 1) if args.quick else (64, 32, 40, 5)
    rows = [measure(dim, batch, length, sigma, repeats, args.seed) for sigma in (0.01, 0.1, 1.0)]
    results = {"config": {"dim": dim, "batch": batch, "frames": length, "repeats": repeats}, "rows": rows}
    table = render.warm_start_table(results)
    print(table)
    common.write(args.out, "warm_start", results, table)
    return results


if __name__ == "__main__":
    main()
