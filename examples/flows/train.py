"""Train an invertible residual flow on 2-D toy data and measure its log-determinant estimators.

    python examples/flows/train.py                     # two moons, about 2.5 minutes on 2 CPU cores
    python examples/flows/train.py --dataset circles   # or: mixture (eight Gaussians on a circle)
    python examples/flows/train.py --docs              # regenerate the documentation's figure and table

The flow is ActNorm followed by ``--blocks`` pairs of (InvertibleResidual, ActNorm); each residual
branch g is a LipSwish MLP with spectrally normalised layers (Lip(g) < 1, so every block is invertible
and its log-determinant series converges). Training maximises the exact log-likelihood (two
dimensions: the Jacobian is 2×2). Then the script

1. reports the test log-likelihood (nats per sample, mean ± standard error);
2. measures each estimator of log|det| against ``"exact"`` on test points of the trained flow: bias
   and standard deviation of log p(x) over repeated draws, and the time of one value-and-gradient
   step relative to exact;
3. plots the data, the learned density and samples drawn by inverting every block (a per-sample
   fixed-point solve; its convergence is reported).

Writes ``results.json``, ``estimators.md`` (the estimator table), ``summary.md`` (the headline
numbers) and ``flow_<dataset>.png`` into ``--out`` (``--docs``: ``docs/assets/flows/``, which the
documentation includes verbatim). Bad arguments exit with status 2 and one line.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import make_circles, make_moons
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: import the package from the repository root instead
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import implicitlayers as il
from examples.common import OneLineArgumentParser, positive_float, positive_int, recorded_flags, write_results

HERE = Path(__file__).resolve().parent
DOCS_OUT = HERE.parents[1] / "docs" / "assets" / "flows"
DATASETS = ("moons", "circles", "mixture")
# (estimator, terms) pairs measured against "exact".
ESTIMATOR_GRID = [("series", 1), ("series", 2), ("series", 4), ("series", 8), ("roulette", 1), ("roulette", 2)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--dataset", choices=DATASETS, default="moons", help="2-D data set")
    parser.add_argument("--blocks", type=positive_int, default=10, help="invertible residual blocks")
    parser.add_argument("--hidden", type=positive_int, default=128, help="width of each residual branch")
    parser.add_argument("--coeff", type=positive_float, default=0.97, help="spectral-norm bound per linear layer")
    parser.add_argument("--steps", type=positive_int, default=3000, help="training steps")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="training batch size")
    parser.add_argument("--lr", type=positive_float, default=2e-3, help="Adam learning rate (cosine decay)")
    parser.add_argument("--train-size", type=positive_int, default=8000, help="training points")
    parser.add_argument("--test-size", type=positive_int, default=2000, help="test points")
    parser.add_argument("--draws", type=positive_int, default=50, help="estimator draws per test point")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    parser.add_argument("--docs", action="store_true", help="write into docs/assets/flows (the documentation's copy)")
    parser.add_argument("--quick", action="store_true", help="a tiny run for tests: 2 blocks, 30 steps")
    args = parser.parse_args(argv)
    if args.coeff >= 1:
        parser.error(f"--coeff must be < 1 for the blocks to be invertible, got {args.coeff}")
    if args.quick:
        args.blocks, args.hidden, args.steps, args.train_size, args.test_size, args.draws = 2, 16, 30, 512, 256, 5
    if args.docs:
        args.out = DOCS_OUT
    return args


# --------------------------------------------------------------------------------------- data
def make_data(name: str, n: int, seed: int) -> Tensor:
    """``n`` points of a 2-D data set, float64."""
    if name == "moons":
        points = make_moons(n, noise=0.05, random_state=seed)[0]
    elif name == "circles":
        points = make_circles(n, noise=0.04, factor=0.5, random_state=seed)[0] * 2
    else:
        rng = np.random.default_rng(seed)
        angles = 2 * np.pi * rng.integers(0, 8, n) / 8
        points = 2 * np.stack([np.cos(angles), np.sin(angles)], axis=1) + 0.2 * rng.standard_normal((n, 2))
    return torch.as_tensor(points, dtype=torch.float64)


# -------------------------------------------------------------------------------------- model
def build_flow(blocks: int, hidden: int, coeff: float) -> il.ResidualFlow:
    layers: list[nn.Module] = [il.ActNorm(2)]
    for _ in range(blocks):
        g = nn.Sequential(
            il.spectral_norm(nn.Linear(2, hidden), coeff),
            il.LipSwish(),
            il.spectral_norm(nn.Linear(hidden, hidden), coeff),
            il.LipSwish(),
            il.spectral_norm(nn.Linear(hidden, 2), coeff),
        )
        layers += [il.InvertibleResidual(g, solver="broyden", tol=1e-10, max_iter=100), il.ActNorm(2)]
    return il.ResidualFlow(layers, base=2).double()


def train(flow: il.ResidualFlow, data: Tensor, args: argparse.Namespace) -> list[dict[str, float]]:
    optimizer = torch.optim.Adam(flow.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    curve, start = [], time.perf_counter()
    every = max(args.steps // 10, 1)
    flow.train()
    for step in range(1, args.steps + 1):
        batch = data[torch.randint(0, len(data), (args.batch_size,), generator=generator)]
        loss = -flow.log_prob(batch, estimator="exact").mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % every == 0 or step == args.steps:
            curve.append({"step": step, "nll": float(loss.detach()), "seconds": time.perf_counter() - start})
            print(f"step {step:5d}  train nll {curve[-1]['nll']:.4f}  ({curve[-1]['seconds']:.1f} s)", flush=True)
    flow.eval()
    return curve


# ----------------------------------------------------------------------------------- measures
def test_loglik(flow: il.ResidualFlow, test: Tensor) -> tuple[float, float]:
    with torch.no_grad():
        values = torch.cat([flow.log_prob(chunk, estimator="exact") for chunk in test.split(1024)])
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


def step_seconds(flow: il.ResidualFlow, points: Tensor, repeats: int = 5, **options: Any) -> float:
    """Median seconds of one value-and-gradient step of -log p on ``points``."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        loss = -flow.log_prob(points, **options).mean()
        loss.backward()
        times.append(time.perf_counter() - start)
    flow.zero_grad()
    return statistics.median(times[1:])


def measure_estimators(flow: il.ResidualFlow, test: Tensor, draws: int, seed: int) -> list[dict[str, Any]]:
    """Bias and spread of each estimator's log p against exact, and its step time relative to exact."""
    points = test[:512]
    with torch.no_grad():
        exact = flow.log_prob(points, estimator="exact")
    exact_seconds = step_seconds(flow, points, estimator="exact")
    rows = [{"estimator": "exact", "terms": None, "bias": 0.0, "abs_bias": 0.0, "std": 0.0, "time_ratio": 1.0}]
    generator = torch.Generator().manual_seed(seed)
    for estimator, terms in ESTIMATOR_GRID:
        options = {"estimator": estimator, "terms": terms, "generator": generator}
        with torch.no_grad():
            estimates = torch.stack([flow.log_prob(points, **options) for _ in range(draws)])
        error = estimates.mean(0) - exact
        rows.append(
            {
                "estimator": estimator,
                "terms": terms,
                "bias": float(error.mean()),  # signed: the series' truncation is systematic
                "abs_bias": float(error.abs().mean()),
                "std": float(estimates.std(0).mean()),  # per-point spread of one draw
                "time_ratio": step_seconds(flow, points, **options) / exact_seconds,
            }
        )
    return rows


def estimator_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of :func:`measure_estimators` (the docs include this file verbatim)."""
    lines = [
        "| estimator | terms | bias of log p (nats) | mean abs bias | std of one draw | step time × exact |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        terms = "–" if row["terms"] is None else str(row["terms"]) + ("+" if row["estimator"] == "roulette" else "")
        lines.append(
            f"| {row['estimator']} | {terms} | {row['bias']:+.4f} | {row['abs_bias']:.4f} | {row['std']:.4f} "
            f"| {row['time_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def summary_line(results: dict[str, Any]) -> str:
    """One sentence with the run's headline numbers (the docs include this file verbatim)."""
    config, sampling = results["config"], results["sampling"]
    unconverged = sampling["unconverged_rows"]
    converged = "all rows converged" if unconverged == 0 else f"{unconverged} rows unconverged"
    return (
        f"{config['dataset'].capitalize()}, {config['blocks']} residual blocks, {config['steps']} steps "
        f"({results['seconds']:.0f} s in all on this machine): test log-likelihood "
        f"**{results['test_loglik']:.3f} ± {results['test_loglik_stderr']:.3f}** nats per point; 2000 samples "
        f"drawn by inverting every block, {converged} (at most {sampling['max_steps']:.0f} Broyden steps).\n"
    )


# ---------------------------------------------------------------------------------------- plot
def plot(flow: il.ResidualFlow, test: Tensor, samples: Tensor, path: Path, title: str) -> None:
    lo, hi = test.min(0).values - 0.5, test.max(0).values + 0.5
    xs = torch.linspace(float(lo[0]), float(hi[0]), 160, dtype=torch.float64)
    ys = torch.linspace(float(lo[1]), float(hi[1]), 160, dtype=torch.float64)
    grid = torch.cartesian_prod(xs, ys)
    with torch.no_grad():
        density = torch.cat([flow.log_prob(c, estimator="exact").exp() for c in grid.split(4096)])
    test, samples, density = test.numpy(), samples.numpy(), density.reshape(160, 160).T.numpy()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), constrained_layout=True)
    axes[0].scatter(*test.T, s=2, alpha=0.5)
    axes[0].set_title(f"test data ({title})")
    extent = (float(xs[0]), float(xs[-1]), float(ys[0]), float(ys[-1]))
    axes[1].imshow(density, origin="lower", extent=extent, aspect="auto")
    axes[1].set_title("learned density p(x)")
    axes[2].scatter(*samples.T, s=2, alpha=0.5, color="tab:orange")
    axes[2].set_title("samples (inverse solves)")
    for ax in (axes[0], axes[2]):
        ax.set_xlim(float(lo[0]), float(hi[0]))
        ax.set_ylim(float(lo[1]), float(hi[1]))
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    start = time.perf_counter()
    data = make_data(args.dataset, args.train_size, args.seed)
    test = make_data(args.dataset, args.test_size, args.seed + 1)
    flow = build_flow(args.blocks, args.hidden, args.coeff)
    print(f"{args.dataset}: {len(data)} train / {len(test)} test points; {args.blocks} residual blocks")
    curve = train(flow, data, args)
    mean, error = test_loglik(flow, test)
    print(f"test log-likelihood {mean:.4f} ± {error:.4f} nats per point")
    samples = flow.sample(2000, generator=torch.Generator().manual_seed(args.seed + 2))
    unconverged = sum(int((~s.converged).sum()) for s in flow.sample_stats)
    steps = max(float(s.nstep.max()) for s in flow.sample_stats)
    print(
        f"sampling: {len(flow.sample_stats)} inverse solves, {unconverged} unconverged rows, at most {steps:.0f} steps"
    )
    rows = measure_estimators(flow, test, args.draws, args.seed)
    table = estimator_table(rows)
    print(table, end="")
    args.out.mkdir(parents=True, exist_ok=True)
    figure = args.out / f"flow_{args.dataset}.png"
    plot(flow, test, samples, figure, args.dataset)
    results = {
        "config": recorded_flags(args),
        "train_curve": curve,
        "test_loglik": mean,
        "test_loglik_stderr": error,
        "sampling": {"unconverged_rows": unconverged, "max_steps": steps},
        "estimators": rows,
        "seconds": time.perf_counter() - start,
        "torch": torch.__version__,
    }
    write_results(args.out, results, {"estimators.md": table, "summary.md": summary_line(results)})
    print(f"wrote {figure}, results.json and estimators.md to {args.out} ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
