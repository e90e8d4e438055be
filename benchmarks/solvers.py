"""Our fixed-point solvers side by side with TorchDEQ's, on one problem suite, in one run.

Problems (each a batch of independent samples, run in float32 and in float64):

- **imixer_init**: the token-mixer fixed point z = x + g(z) of an ``imixer_s16_224`` at initialisation,
  with real activations: a random image batch through the stem and the preceding blocks, then the
  block's norm1, the token transpose and fc1 give the rows x; g is that block's ``ImplicitMLP.g``
  (eval mode, so the spectral norms are fixed).
- **imixer_trained**: the same for an ``imixer_t2_8`` trained on scikit-learn's digits for a few epochs
  (AdamW, plain loop below), on a batch of test digits.
- **tanh_gauss_s{0.5,0.9,0.99}**: f(z) = tanh(W z + U x + b), W Gaussian scaled to ||W||_2 = s.
- **tanh_sym_s{0.5,0.9,0.99}**: :func:`implicitlayers.problems.symmetric_tanh_problem` (symmetric W,
  dominant eigenvalue -s, small drive): the slow case.
- **linear_root**: z = A z + b with A symmetric, ||A||_2 = 1.5 (eigenvalues in [-1.5, 0.5], so I - A is
  invertible) — plain iteration diverges.

Solvers: ours (``picard``, ``anderson``, ``broyden``, default options) and TorchDEQ's through
:mod:`implicitlayers.contrib.torchdeq` (``torchdeq.fixed_point_iter``, ``torchdeq.anderson``,
``torchdeq.broyden``, default options), all with the same tol, ``stop_mode="rel"`` and max_iter.

Per problem × dtype × solver: success rate (fraction of samples with residual <= tol, residual as
:func:`implicitlayers.residual` measures it for every solver), evaluations of f per sample (median, max of
``nstep``), wall time of the forward solve (median of ``--repeats`` runs) and the IFT backward time: the
median time of the adjoint solve u = v + J^T u at the returned z (J = ∂f/∂z, J^T u by one
``torch.autograd.grad`` VJP through a graph of f built once at z, v a fixed random cotangent), solved
with the same solver, tol and max_iter as the forward (its success rate is reported too). Building the
graph is not timed. Ratios ours/TorchDEQ pair picard/fixed_point_iter, anderson/anderson,
broyden/broyden.

Usage: ``python -m benchmarks.solvers [--quick] [--out DIR] [--repeats N] [--seed N] [--device cuda]``; writes
``solvers.json``, ``solvers.md`` and ``solvers_<problem>.png`` into ``DIR`` (default
``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import implicitlayers as il
from benchmarks import common, render
from benchmarks.render import OURS, PAIRS
from implicitlayers.contrib import torchdeq as il_torchdeq
from implicitlayers.problems import symmetric_tanh_problem

SOLVERS = [*OURS, *PAIRS.values()]
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOL = {"float32": 1e-5, "float64": 1e-8}
STOP_MODE = "rel"
NORMS = (0.5, 0.9, 0.99)
LINEAR_NORM = 1.5


@dataclass
class Problem:
    """A batched fixed-point problem z = f(z): ``make(dtype, device)`` returns (f, z0) there."""

    name: str
    description: str
    make: Callable[[torch.dtype, torch.device], tuple[Callable[[Tensor], Tensor], Tensor]]


# ------------------------------------------------------------------------------------ problems
def _token_mixer_problem(net: torch.nn.Module, images: Tensor, block: int, rows: int | None) -> tuple[Any, Tensor]:
    """The rows x and map g of block ``block``'s token mixer, for ``images`` through ``net`` (eval)."""
    net.eval()
    with torch.no_grad():
        h = net.stem(images)
        for i in range(block):
            h = net.blocks[i](h)
        mixer = net.blocks[block].mlp_tokens
        x = mixer.fc1(net.blocks[block].norm1(h).transpose(1, 2))
        x = x.reshape(-1, x.shape[-1])
    if rows is not None:
        x = x[:rows]
    g = mixer.implicit.g
    return g, x.detach().clone()


def _from_g(
    g: torch.nn.Module, x: Tensor
) -> Callable[[torch.dtype, torch.device], tuple[Callable[[Tensor], Tensor], Tensor]]:
    copies: dict[tuple[torch.dtype, torch.device], torch.nn.Module] = {}

    def make(dtype: torch.dtype, device: torch.device) -> tuple[Callable[[Tensor], Tensor], Tensor]:
        if (dtype, device) not in copies:
            copies[dtype, device] = copy.deepcopy(g).to(device=device, dtype=dtype).eval().requires_grad_(False)
        gd, xd = copies[dtype, device], x.to(device=device, dtype=dtype)
        return (lambda z: xd + gd(z)), xd.clone()

    return make


def imixer_init_problem(seed: int, images: int, block: int, rows: int | None) -> Problem:
    import timm

    from examples.imixer import imixer  # noqa: F401  (registers the imixer_* models with timm)

    torch.manual_seed(seed)
    net = timm.create_model("imixer_s16_224")
    g, x = _token_mixer_problem(net, torch.randn(images, 3, 224, 224), block, rows)
    return Problem(
        "imixer_init",
        f"imixer_s16_224 at init, block {block}, {x.shape[0]} rows of dim {x.shape[1]}",
        _from_g(g, x),
    )


def train_digits_imixer(seed: int, epochs: int, max_steps: int | None, batch_size: int = 64) -> tuple[Any, dict]:
    """An ``imixer_t2_8`` trained on scikit-learn's digits (AdamW, lr 3e-3); returns it and test data."""
    import numpy as np
    import timm
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from examples.imixer import imixer  # noqa: F401  (registers the imixer_* models with timm)

    torch.manual_seed(seed)
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0 * 2 - 1, dtype=torch.float32)[:, None]
    targets = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        np.arange(len(images)), test_size=0.2, random_state=seed, stratify=digits.target
    )
    net = timm.create_model("imixer_t2_8")
    optimiser = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.05)
    steps, start = 0, time.perf_counter()
    net.train()
    for _ in range(epochs):
        order = torch.tensor(train_idx)[torch.randperm(len(train_idx))]
        for i in range(0, len(order), batch_size):
            batch = order[i : i + batch_size]
            loss = torch.nn.functional.cross_entropy(net(images[batch]), targets[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        if max_steps is not None and steps >= max_steps:
            break
    net.eval()
    test = torch.tensor(test_idx)
    with torch.no_grad():
        accuracy = float((net(images[test]).argmax(1) == targets[test]).float().mean())
    info = {"steps": steps, "epochs": epochs, "train_seconds": time.perf_counter() - start, "test_accuracy": accuracy}
    return net, {"info": info, "images": images[test]}


def imixer_trained_problem(
    seed: int, epochs: int, max_steps: int | None, images: int, block: int
) -> tuple[Problem, dict]:
    net, data = train_digits_imixer(seed, epochs, max_steps)
    g, x = _token_mixer_problem(net, data["images"][:images], block, None)
    problem = Problem(
        "imixer_trained",
        f"imixer_t2_8 trained on digits ({data['info']['steps']} steps, test acc "
        f"{data['info']['test_accuracy']:.3f}), block {block}, {x.shape[0]} rows of dim {x.shape[1]}",
        _from_g(g, x),
    )
    return problem, data["info"]


def _scaled(matrix: Tensor, norm: float) -> Tensor:
    return norm * matrix / torch.linalg.matrix_norm(matrix, ord=2)


def tanh_gaussian_problem(seed: int, dim: int, batch: int, norm: float) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    w = _scaled(torch.randn(dim, dim, generator=generator, dtype=torch.float64), norm)
    u = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)
    x = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    b = 0.1 * torch.randn(dim, generator=generator, dtype=torch.float64)
    drive = x @ u.T + b

    def make(dtype: torch.dtype, device: torch.device) -> tuple[Callable[[Tensor], Tensor], Tensor]:
        wd, dd = w.to(device=device, dtype=dtype), drive.to(device=device, dtype=dtype)
        return (lambda z: torch.tanh(z @ wd.T + dd)), torch.zeros_like(dd)

    return Problem(f"tanh_gauss_s{norm}", f"tanh(Wz+Ux+b), Gaussian W, ||W||={norm}, B={batch}, D={dim}", make)


def tanh_symmetric_problem(seed: int, dim: int, batch: int, norm: float) -> Problem:
    base = symmetric_tanh_problem(dim, batch, seed=seed, norm=norm, dtype=torch.float64)

    def make(dtype: torch.dtype, device: torch.device) -> tuple[Callable[[Tensor], Tensor], Tensor]:
        wd, dd = base.weight.to(device=device, dtype=dtype), base.drive.to(device=device, dtype=dtype)
        return (lambda z: torch.tanh(z @ wd.T + dd)), torch.zeros_like(dd)

    return Problem(
        f"tanh_sym_s{norm}",
        f"symmetric_tanh_problem (symmetric W, small drive), ||W||={norm}, B={batch}, D={dim}",
        make,
    )


def linear_root_problem(seed: int, dim: int, batch: int) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    eig = torch.linspace(-LINEAR_NORM, 0.5, dim, dtype=torch.float64)
    a = q @ torch.diag(eig) @ q.T
    b = torch.randn(batch, dim, generator=generator, dtype=torch.float64)

    def make(dtype: torch.dtype, device: torch.device) -> tuple[Callable[[Tensor], Tensor], Tensor]:
        ad, bd = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
        return (lambda z: z @ ad.T + bd), torch.zeros_like(bd)

    return Problem(
        "linear_root",
        f"z = Az + b, A symmetric, eigenvalues in [-{LINEAR_NORM}, 0.5] (||A||={LINEAR_NORM}), B={batch}, D={dim}",
        make,
    )


# ------------------------------------------------------------------------------------ measuring
def adjoint_solve_fn(
    f: Callable[[Tensor], Tensor], z: Tensor, solver: str, max_iter: int, tol: float, seed: int
) -> Callable[[], il.SolverResult]:
    """The IFT backward: solve u = v + J^T u at z with ``solver`` (J^T u by an autograd VJP)."""
    zg = z.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        fz = f(zg)
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(z)

    def adjoint(u: Tensor) -> Tensor:
        (vjp,) = torch.autograd.grad(fz, zg, u.to(fz.dtype), retain_graph=True)
        return v + vjp

    return lambda: il.solve(adjoint, v.clone(), solver=solver, max_iter=max_iter, tol=tol, stop_mode=STOP_MODE)


def run_case(
    problem: Problem, dtype_name: str, solver: str, max_iter: int, repeats: int, seed: int, device: torch.device
) -> dict:
    f, z0 = problem.make(DTYPES[dtype_name], device)
    tol = TOL[dtype_name]
    forward_time, forward_times, result = common.timed(
        lambda: il.solve(f, z0, solver=solver, max_iter=max_iter, tol=tol, stop_mode=STOP_MODE), device, 1, repeats
    )
    # The adjoint is only meaningful at a finite solution; a diverged solve reports nothing for it.
    finite = bool(torch.isfinite(result.z).all())
    backward: dict[str, Any] = {"backward_time_median_s": None, "backward_success_rate": None}
    if finite:
        solve_adjoint = adjoint_solve_fn(f, result.z, solver, max_iter, tol, seed)
        backward_time, _, adjoint = common.timed(solve_adjoint, device, 1, repeats)
        backward = {
            "backward_time_median_s": backward_time,
            "backward_success_rate": float(adjoint.converged.float().mean()),
            "backward_nstep_median": float(adjoint.nstep.float().median()),
        }
    residuals = result.residual.float()
    return {
        "problem": problem.name,
        "dtype": dtype_name,
        "solver": solver,
        "family": "torchdeq" if solver.startswith("torchdeq.") else "ours",
        "tol": tol,
        "max_iter": max_iter,
        "batch": int(z0.shape[0]),
        "success_rate": float(result.converged.float().mean()),
        "nstep_median": float(result.nstep.float().median()),
        "nstep_max": int(result.nstep.max()),
        "residual_max": float(residuals.max()) if bool(torch.isfinite(residuals).all()) else None,
        "time_median_s": forward_time,
        "times_s": forward_times,
        **backward,
        "trace": [float(t) if math.isfinite(float(t)) else None for t in result.trace],
    }


def ratios(results: list[dict]) -> list[dict]:
    """ours/torchdeq for same-named solvers, per problem and dtype."""
    index = {(r["problem"], r["dtype"], r["solver"]): r for r in results}
    out = []
    for (problem, dtype, solver), ours in index.items():
        if solver not in PAIRS or (problem, dtype, PAIRS[solver]) not in index:
            continue
        theirs = index[(problem, dtype, PAIRS[solver])]
        entry = {"problem": problem, "dtype": dtype, "ours": solver, "torchdeq": PAIRS[solver]}
        for key in ("time_median_s", "backward_time_median_s", "nstep_median"):
            a, b = ours[key], theirs[key]
            entry[key] = a / b if a is not None and b else None
        entry["success_rate_diff"] = ours["success_rate"] - theirs["success_rate"]
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------ reporting
def plot_traces(results: list[dict], problems: Sequence[Problem], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for problem in problems:
        fig, axes = plt.subplots(1, len(DTYPES), figsize=(5 * len(DTYPES), 3.6), sharey=True, squeeze=False)
        for ax, dtype_name in zip(axes[0], DTYPES, strict=True):
            for r in results:
                if r["problem"] != problem.name or r["dtype"] != dtype_name:
                    continue
                trace = [math.nan if t is None else max(t, 1e-300) for t in r["trace"]]
                style = "-" if r["family"] == "ours" else "--"
                ax.semilogy(range(1, len(trace) + 1), trace, style, label=r["solver"])
            ax.axhline(TOL[dtype_name], color="grey", lw=0.8, ls=":")
            ax.set_title(f"{problem.name} ({dtype_name})")
            ax.set_xlabel("iteration")
        axes[0][0].set_ylabel("max relative residual over batch")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"solvers_{problem.name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path.name)
    return paths


def _torchdeq_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchdeq")
    except PackageNotFoundError:  # pragma: no cover - metadata missing
        return "unknown"


# ------------------------------------------------------------------------------------ main
def build_problems(args: argparse.Namespace) -> tuple[list[Problem], dict]:
    quick, seed = args.quick, args.seed
    dim, batch = (32, 16) if quick else (64, 64)
    norms = (0.9, 0.99) if quick else NORMS
    problems = [
        imixer_init_problem(seed, images=1, block=0 if quick else 4, rows=64 if quick else 512),
    ]
    trained, train_info = imixer_trained_problem(
        seed, epochs=1 if quick else 5, max_steps=8 if quick else None, images=4 if quick else 32, block=1
    )
    problems.append(trained)
    problems += [tanh_gaussian_problem(seed, dim, batch, s) for s in norms]
    problems += [tanh_symmetric_problem(seed, dim, batch, s) for s in norms]
    problems.append(linear_root_problem(seed, dim, batch))
    return problems, train_info


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small problems, 3 repeats, a short training run")
    parser.add_argument("--out", type=Path, default=common.RESULTS, help="output directory")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 5; --quick: 3)")
    parser.add_argument("--max-iter", type=int, default=None, help="iteration cap (default 500; --quick: 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the solves run (default cpu)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: these small problems are op-overhead bound)"
    )
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.max_iter = args.max_iter or (100 if args.quick else 500)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    il_torchdeq.register()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    info = common.machine(device) | {"torchdeq": _torchdeq_version()}
    print(
        f"machine: {info['device_name']}, {info['cpu_count']} CPUs ({info['torch_threads']} torch threads), "
        f"torch {info['torch']}, "
        f"torchdeq {info['torchdeq']}, {info['platform']}, {info['date_utc']}"
    )
    problems, train_info = build_problems(args)
    print(f"problems built in {time.perf_counter() - start:.1f} s", flush=True)
    results = []
    for problem in problems:
        print(f"{problem.name}: {problem.description}", flush=True)
        for dtype_name in DTYPES:
            for solver in SOLVERS:
                results.append(run_case(problem, dtype_name, solver, args.max_iter, args.repeats, args.seed, device))
    pair_ratios = ratios(results)
    table = render.solvers_table(results, pair_ratios)
    summary = render.solvers_summary(results, pair_ratios)
    plots = plot_traces(results, problems, out)
    report = {
        "machine": info,
        "settings": {
            "quick": args.quick,
            "seed": args.seed,
            "repeats": args.repeats,
            "threads": args.threads,
            "max_iter": args.max_iter,
            "tol": TOL,
            "stop_mode": STOP_MODE,
            "backward": "adjoint solve u = v + J^T u at the returned z, same solver/tol/max_iter, "
            "J^T u by torch.autograd.grad through one graph of f (graph construction not timed)",
        },
        "training": train_info,
        "problems": [{"name": p.name, "description": p.description} for p in problems],
        "solvers": SOLVERS,
        "results": results,
        "ratios": pair_ratios,
        "plots": plots,
        "seconds": time.perf_counter() - start,
    }
    header = (
        f"# Solvers: ours vs TorchDEQ\n\n{info['device_name']}, {info['cpu_count']} CPUs, "
        f"torch {info['torch']}, torchdeq {info['torchdeq']}, "
        f"{info['date_utc']}; tol {TOL} ({STOP_MODE}), max_iter {args.max_iter}, median of {args.repeats} runs, "
        f"{args.threads} torch thread(s)"
        f"{' (--quick)' if args.quick else ''}.\n\n"
    )
    (out / "solvers.md").write_text(header + "## Summary\n\n" + summary + "\n\n## All cases\n\n" + table + "\n")
    (out / "solvers.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table)
    print(summary)
    print(f"wrote {out / 'solvers.json'}, {out / 'solvers.md'} and {len(plots)} plots in {report['seconds']:.1f} s")
    return report


if __name__ == "__main__":
    main()
