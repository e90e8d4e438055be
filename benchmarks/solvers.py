"""Our fixed-point solvers side by side with TorchDEQ's, on one problem suite, in one run.

Usage: ``python -m benchmarks.solvers [--quick] [--out DIR] [--device cuda] ...`` (``--help``: every flag) writes
``solvers.json``, ``solvers.md`` and plots to DIR; what it measures: benchmarks/README.md, "Solvers: ours vs TorchDEQ".
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import implicitlayers as il
from benchmarks import common, render
from benchmarks.render import OURS, PAIRS
from examples.common import OneLineArgumentParser, int_range
from implicitlayers.contrib import torchdeq as il_torchdeq
from implicitlayers.problems import symmetric_tanh_problem

SOLVERS = [*OURS, *PAIRS.values()]
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOL = {"float32": 1e-5, "float64": 1e-8}
STOP_MODE = "rel"
NORMS = (0.5, 0.9, 0.99)
LINEAR_NORM = 1.5
Fn = Callable[[Tensor], Tensor]


@dataclass
class Problem:
    """A batched fixed-point problem z = f(z): ``make(dtype, device)`` returns (f, z0) there."""

    name: str
    description: str
    make: Callable[[torch.dtype, torch.device], tuple[Fn, Tensor]]


def _token_mixer(name: str, about: str, net: Any, images: Tensor, block: int, rows: int | None) -> Problem:
    """z = x + g(z) of block ``block``'s token mixer, x its fc1 output for ``images`` through ``net`` (eval mode)."""
    net.eval()
    with torch.no_grad():
        h = net.stem(images)
        for previous in net.blocks[:block]:
            h = previous(h)
        mixer = net.blocks[block].mlp_tokens
        x = mixer.fc1(net.blocks[block].norm1(h).transpose(1, 2))
        x = x.reshape(-1, x.shape[-1])[:rows].clone()

    def make(dtype: torch.dtype, device: torch.device) -> tuple[Fn, Tensor]:
        g = copy.deepcopy(mixer.implicit.g).to(device=device, dtype=dtype).eval().requires_grad_(False)
        xd = x.to(device=device, dtype=dtype)
        return (lambda z: xd + g(z)), xd.clone()

    return Problem(name, f"{about}, block {block}, {x.shape[0]} rows of dim {x.shape[1]}", make)


def imixer_init_problem(seed: int, images: int, block: int, rows: int | None) -> Problem:
    import timm

    from examples.imixer import imixer  # noqa: F401  (registers the imixer_* models with timm)

    torch.manual_seed(seed)
    net = timm.create_model("imixer_s16_224")
    return _token_mixer("imixer_init", "imixer_s16_224 at init", net, torch.randn(images, 3, 224, 224), block, rows)


def imixer_trained_problem(
    seed: int, epochs: int, max_steps: int | None, images: int, block: int
) -> tuple[Problem, dict]:
    """Block ``block``'s token mixer of an ``imixer_t2_8`` trained on digits (the example's engine); with its info."""
    import timm
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from examples.imixer import engine, imixer  # noqa: F401  (imixer registers the imixer_* models with timm)

    torch.manual_seed(seed)
    digits = load_digits()
    pixels = torch.tensor(digits.images / 16.0 * 2 - 1, dtype=torch.float32)[:, None]
    labels = torch.tensor(digits.target, dtype=torch.long)
    split = train_test_split(range(len(labels)), test_size=0.2, random_state=seed, stratify=digits.target)
    train, test = map(torch.tensor, split)
    net = timm.create_model("imixer_t2_8")
    trainer = engine.Trainer(net, torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.05))
    start = time.perf_counter()
    for epoch in range(epochs):  # batches of 64, reshuffled every epoch, at most max_steps updates in all
        if max_steps is not None and trainer.updates >= max_steps:
            break
        batches = [(pixels[b], labels[b]) for b in train[torch.randperm(len(train))].split(64)]
        if max_steps is not None:
            batches = batches[: max_steps - trainer.updates]
        engine.train_one_epoch(trainer, batches, torch.nn.CrossEntropyLoss(), epoch=epoch)
    net.eval()
    with torch.no_grad():
        accuracy = float((net(pixels[test]).argmax(1) == labels[test]).float().mean())
    info = {"steps": trainer.updates, "epochs": epochs, "train_seconds": time.perf_counter() - start}
    info["test_accuracy"] = accuracy
    about = f"imixer_t2_8 trained on digits ({trainer.updates} steps, test acc {accuracy:.3f})"
    return _token_mixer("imixer_trained", about, net, pixels[test][:images], block, None), info


def _affine_problem(name: str, about: str, weight: Tensor, drive: Tensor, activation: Fn = torch.tanh) -> Problem:
    """f(z) = activation(z Wᵀ + drive) from z = 0; W and the drive are float64, cast to each dtype and device."""

    def make(dtype: torch.dtype, device: torch.device) -> tuple[Fn, Tensor]:
        w, d = weight.to(device=device, dtype=dtype), drive.to(device=device, dtype=dtype)
        return (lambda z: activation(z @ w.T + d)), torch.zeros_like(d)

    return Problem(name, about, make)


def tanh_gaussian_problem(seed: int, dim: int, batch: int, norm: float) -> Problem:
    randn = partial(torch.randn, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w, u, x, b = randn(dim, dim), randn(dim, dim) / math.sqrt(dim), randn(batch, dim), 0.1 * randn(dim)
    about = f"tanh(Wz+Ux+b), Gaussian W, ||W||={norm}, B={batch}, D={dim}"
    return _affine_problem(f"tanh_gauss_s{norm}", about, norm * w / torch.linalg.matrix_norm(w, ord=2), x @ u.T + b)


def tanh_symmetric_problem(seed: int, dim: int, batch: int, norm: float) -> Problem:
    base = symmetric_tanh_problem(dim, batch, seed=seed, norm=norm, dtype=torch.float64)
    about = f"symmetric_tanh_problem (symmetric W, small drive), ||W||={norm}, B={batch}, D={dim}"
    return _affine_problem(f"tanh_sym_s{norm}", about, base.weight, base.drive)


def linear_root_problem(seed: int, dim: int, batch: int) -> Problem:
    randn = partial(torch.randn, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(randn(dim, dim))
    a = q @ torch.diag(torch.linspace(-LINEAR_NORM, 0.5, dim, dtype=torch.float64)) @ q.T
    about = f"z = Az + b, A symmetric, eigenvalues in [-{LINEAR_NORM}, 0.5] (||A||={LINEAR_NORM}), B={batch}, D={dim}"
    return _affine_problem("linear_root", about, a, randn(batch, dim), activation=lambda t: t)


def run_case(
    problem: Problem, dtype_name: str, solver: str, max_iter: int, repeats: int, seed: int, device: torch.device
) -> dict:
    """One problem × dtype × solver: the forward solve and the IFT backward's adjoint solve, timed."""
    (f, z0), tol = problem.make(DTYPES[dtype_name], device), TOL[dtype_name]
    solve = partial(il.solve, solver=solver, max_iter=max_iter, tol=tol, stop_mode=STOP_MODE)
    forward_time, forward_times, result = common.timed(lambda: solve(f, z0), device, 1, repeats)
    backward: dict[str, Any] = {"backward_time_median_s": None, "backward_success_rate": None}
    if bool(torch.isfinite(result.z).all()):  # the adjoint only means something at a finite solution
        # u = v + Jᵀu at z, Jᵀu by a VJP through one graph of f (built here, not timed), v a fixed cotangent.
        zg = result.z.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            fz = f(zg)
        v = torch.randn(zg.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(zg)

        def adjoint(u: Tensor) -> Tensor:
            return v + torch.autograd.grad(fz, zg, u.to(fz.dtype), retain_graph=True)[0]

        seconds, _, solved = common.timed(lambda: solve(adjoint, v.clone()), device, 1, repeats)
        backward = {
            "backward_time_median_s": seconds,
            "backward_success_rate": float(solved.converged.float().mean()),
            "backward_nstep_median": float(solved.nstep.float().median()),
        }
    residuals, family = result.residual.float(), "torchdeq" if solver.startswith("torchdeq.") else "ours"
    return {
        "problem": problem.name,
        "dtype": dtype_name,
        "solver": solver,
        "family": family,
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
        if (theirs := index.get((problem, dtype, PAIRS.get(solver)))) is not None:
            entry = {"problem": problem, "dtype": dtype, "ours": solver, "torchdeq": PAIRS[solver]}
            for key in ("time_median_s", "backward_time_median_s", "nstep_median"):
                entry[key] = ours[key] / theirs[key] if ours[key] is not None and theirs[key] else None
            out.append(entry | {"success_rate_diff": ours["success_rate"] - theirs["success_rate"]})
    return out


def plot_traces(results: list[dict], problems: Sequence[Problem], out: Path) -> list[str]:
    """Writes ``solvers_<problem>.png`` (max residual over the batch per iteration, per dtype); returns the names."""
    import matplotlib.pyplot as plt

    plt.switch_backend("Agg")
    for problem in problems:
        fig, axes = plt.subplots(1, len(DTYPES), figsize=(5 * len(DTYPES), 3.6), sharey=True, squeeze=False)
        for ax, dtype_name in zip(axes[0], DTYPES, strict=True):
            cases = [r for r in results if (r["problem"], r["dtype"]) == (problem.name, dtype_name)]
            for r in cases:
                trace = [math.nan if t is None else max(t, 1e-300) for t in r["trace"]]
                ax.semilogy(range(1, len(trace) + 1), trace, "-" if r["family"] == "ours" else "--", label=r["solver"])
            ax.axhline(TOL[dtype_name], color="grey", lw=0.8, ls=":")
            ax.set(title=f"{problem.name} ({dtype_name})", xlabel="iteration")
        axes[0][0].set_ylabel("max relative residual over batch")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"solvers_{problem.name}.png", dpi=90)
        plt.close(fig)
    return [f"solvers_{problem.name}.png" for problem in problems]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="small problems, 3 repeats, a short training run")
    add("--out", type=Path, default=common.RESULTS, help="output directory")
    add("--repeats", type=int_range(1), default=None, help="timed runs per case (default 5; --quick: 3)")
    add("--max-iter", type=int_range(1), default=None, help="iteration cap (default 500; --quick: 100)")
    add("--seed", type=int, default=0)
    add("--device", choices=["cpu", "cuda"], default="cpu", help="where the solves run (default cpu)")
    add("--threads", type=int_range(1), default=1, help="torch threads (default 1: small problems, op-overhead bound)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.max_iter = args.max_iter or (100 if args.quick else 500)
    with common.measuring(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Builds the problems, solves every case, writes and prints the report; returns it."""
    start = time.perf_counter()
    il_torchdeq.register()
    out, device = args.out, torch.device(args.device)
    out.mkdir(parents=True, exist_ok=True)
    try:
        info = common.machine(device) | {"torchdeq": version("torchdeq")}
    except PackageNotFoundError:  # importable without package metadata
        info = common.machine(device) | {"torchdeq": "unknown"}
    machine = f"{info['device_name']}, {info['cpu_count']} CPUs"
    print(f"machine: {machine} ({info['torch_threads']} torch threads), torch {info['torch']}, "
          f"torchdeq {info['torchdeq']}, {info['platform']}, {info['date_utc']}")  # fmt: skip
    quick, seed = args.quick, args.seed
    dim, batch, norms = (32, 16, (0.9, 0.99)) if quick else (64, 64, NORMS)
    init = imixer_init_problem(seed, images=1, block=0 if quick else 4, rows=64 if quick else 512)
    trained, train_info = imixer_trained_problem(
        seed, epochs=1 if quick else 5, max_steps=8 if quick else None, images=4 if quick else 32, block=1
    )
    tanh = [build(seed, dim, batch, s) for build in (tanh_gaussian_problem, tanh_symmetric_problem) for s in norms]
    problems = [init, trained, *tanh, linear_root_problem(seed, dim, batch)]
    print(f"problems built in {time.perf_counter() - start:.1f} s", flush=True)
    case = partial(run_case, max_iter=args.max_iter, repeats=args.repeats, seed=seed, device=device)
    results = []
    for problem in problems:
        print(f"{problem.name}: {problem.description}", flush=True)
        results += [case(problem, dtype_name, solver) for dtype_name in DTYPES for solver in SOLVERS]
    pair_ratios = ratios(results)
    table, summary = render.solvers_table(results, pair_ratios), render.solvers_summary(results, pair_ratios)
    settings = {key: getattr(args, key) for key in ("quick", "seed", "repeats", "threads", "max_iter")}
    settings |= {"tol": TOL, "stop_mode": STOP_MODE, "backward": "adjoint solve u = v + J^T u at the returned z, "
                 "same solver/tol/max_iter, J^T u by torch.autograd.grad through one graph of f (graph construction "
                 "not timed)"}  # fmt: skip
    plots = plot_traces(results, problems, out)
    report = {
        "machine": info, "settings": settings, "training": train_info,
        "problems": [{"name": p.name, "description": p.description} for p in problems], "solvers": SOLVERS,
        "results": results, "ratios": pair_ratios, "plots": plots, "seconds": time.perf_counter() - start,
    }  # fmt: skip
    header = (f"# Solvers: ours vs TorchDEQ\n\n{machine}, torch {info['torch']}, torchdeq {info['torchdeq']}, "
              f"{info['date_utc']}; tol {TOL} ({STOP_MODE}), max_iter {args.max_iter}, median of {args.repeats} runs, "
              f"{args.threads} torch thread(s){' (--quick)' if args.quick else ''}.\n\n")  # fmt: skip
    common.write(out, "solvers", report, f"{header}## Summary\n\n{summary}\n\n## All cases\n\n{table}\n", indent=1)
    print(f"{table}\n{summary}")
    print(f"wrote {out / 'solvers.json'}, {out / 'solvers.md'} and {len(plots)} plots in {report['seconds']:.1f} s")
    return report


if __name__ == "__main__":
    main()
