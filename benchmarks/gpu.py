"""The prepared GPU run: eager and compiled training steps against timm's Mixer, and the gradient modes.

    python -m benchmarks.gpu --out benchmarks/results/gpu      # on one GPU, a few minutes
    python -m benchmarks.gpu --device cpu --quick --out /tmp/gpu   # the test's run: the same code, seconds

One command for a machine with a GPU lent for a few minutes, writing ``gpu.json`` and ``gpu.md`` into
``--out`` with the machine, commit and date (``benchmarks/common.py``):

- **Step.** For ``imixer_s16_224`` at batch 8 (224 px) and the small 28 px model (``imixer_t4_32`` shape
  with ``img_size=28``, ``in_chans=1``, ``patch_size=4``, 4 blocks of dim 128, batch 32; the workload of
  ``benchmarks/revisions.py``): the training step (forward, cross-entropy backward, AdamW) of the iMixer
  with the library's defaults, of the reference loop (``reference_iterations=2``) and of timm's MlpMixer of
  the same shape, eager, under ``torch.compile`` and, on CUDA, with CUDA graphs (``mode="reduce-overhead"``),
  each run the same way; ``× mixer`` and ``× reference-2`` divide the iMixer's step by theirs. ``compile s``
  is the first compiled step (tracing and code generation included), the step times are medians after
  warm-up. Each solve is one graph break (``docs/compile.md``), so CUDA graphs capture the graphs around
  the solves only.
- **Operators.** The operators one training step runs (``operator_calls``), eager and compiled: kernels on
  CUDA, on a CPU the ATen operators called (in a compiled step, those left unfused).
- **Memory.** What autograd saves in an eager step, and the device's peak on CUDA, for the three models.
- **Inverse residual.** The recomputed ‖x + g(z) − z‖ / ‖x + g(z)‖, max over blocks and rows, after a
  training-mode forward, of the default and of the reference loop (``imixer_step.inverse_residuals``).
- **Solvers.** Our Anderson and Broyden against TorchDEQ's on a float32 tanh map (``benchmarks/solvers.py``'s
  cases): forward and adjoint time ratios, success difference.
- **Gradient modes.** ``benchmarks/backward.py --problem mlp`` on the device: each mode's error against
  the exact gradient and its backward time relative to the IFT's.

``--quick`` keeps only the 28 px model at batch 4 with 2 repeats, one torch thread and the small gradient
problem; on a CPU it compiles with the ``aot_eager`` backend (graph capture and autograd tracing without
inductor's C++ code generation, which alone takes minutes on 2 cores), recorded as ``backend``.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import implicitlayers as il
from benchmarks import backward, common, imixer_step, render, solvers

SHAPES = {
    "s16_224": {"model": "s16_224", "kwargs": {}, "batch": 8, "channels": 3, "img_size": 224},
    "t4_28": {
        "model": "t4_32",
        "kwargs": {"img_size": 28, "in_chans": 1, "patch_size": 4, "num_blocks": 4, "embed_dim": 128},
        "batch": 32,
        "channels": 1,
        "img_size": 28,
    },
}


# What a step is measured for (presets of benchmarks/common.py): timm's Mixer, the reference loop (two Picard
# steps) and the library's defaults.
KINDS = ("mixer", "reference-2", "imixer")


def build(kind: str, shape: dict[str, Any], device: torch.device) -> nn.Module:
    return imixer_step.build(shape["model"], common.PRESETS[kind], device, **shape["kwargs"])


def step_times(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
               backend: str | None, mode: str | None, repeats: int) -> dict[str, float | None]:  # fmt: skip
    """Median step seconds (and the first step's, the compile time, when compiled with ``backend``)."""
    compiled = backend is not None
    if compiled:  # a cold compile of this model alone: no graphs, shapes or cached kernels from the last one
        torch._dynamo.reset()
    model = torch.compile(net, backend=backend, mode=mode, dynamic=False) if compiled else net
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    compile_s = None
    if compiled:
        start = time.perf_counter()
        imixer_step.train_step(model, optimizer, images, labels)
        common.synchronize(device)
        compile_s = time.perf_counter() - start

    def step() -> None:
        imixer_step.train_step(model, optimizer, images, labels)

    seconds = common.timed(step, device, 1, repeats)[0]
    return {"step_ms": 1e3 * seconds, "compile_s": compile_s, "operator_calls": operator_calls(step, device)}


def operator_calls(step: Callable[[], None], device: torch.device) -> int:
    """Operators one training step runs (AdamW's included): kernels launched on CUDA; on a CPU, the outermost
    ATen operators called (an operator's own sub-operators not counted; in a graph inductor compiled, its fused
    C++ kernels replace operators, so they count what was not fused)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        step()
        common.synchronize(device)
    events = profile.events()
    if device.type == "cuda":
        return sum(event.device_type == torch.autograd.DeviceType.CUDA for event in events)
    return sum(event.name.startswith("aten::") and not _inside_aten(event) for event in events)


def _inside_aten(event: Any) -> bool:
    """Whether a profiler event runs inside another ATen operator (aten::linear's aten::t, ...)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def modes(device: torch.device, backend: str) -> dict[str, tuple[str | None, str | None]]:
    """How a step is run: eager, compiled, and on CUDA with CUDA graphs (``reduce-overhead``)."""
    found = {"eager": (None, None), "compiled": (backend, None)}
    if device.type == "cuda":
        found["cudagraphs"] = (backend, "reduce-overhead")
    return found


def measure_shape(name: str, shape: dict[str, Any], device: torch.device, backend: str, repeats: int) -> dict[str, Any]:
    images, labels = imixer_step.random_batch(shape["batch"], shape["channels"], shape["img_size"], device)
    row: dict[str, Any] = {"shape": name, "batch": shape["batch"]}
    for kind in KINDS:  # first, before any compiled graph or CUDA-graph pool holds memory: an eager step's
        memory = imixer_step.step_memory(build(kind, shape, device), images, labels, device)
        row |= {f"{kind}_{key}": value for key, value in memory.items()}
    for mode, (compiled, compile_mode) in modes(device, backend).items():
        for kind in KINDS:
            times = step_times(build(kind, shape, device), images, labels, device, compiled, compile_mode, repeats)
            row[f"{kind}_{mode}_step_ms"] = times["step_ms"]
            row[f"{kind}_{mode}_compile_s"] = times["compile_s"]
            row[f"{kind}_{mode}_operator_calls"] = times["operator_calls"]
        row[f"{mode}_ratio_to_mixer"] = row[f"imixer_{mode}_step_ms"] / row[f"mixer_{mode}_step_ms"]
        row[f"{mode}_ratio_to_reference"] = row[f"imixer_{mode}_step_ms"] / row[f"reference-2_{mode}_step_ms"]
    row["operator_calls_ratio_to_mixer"] = row["imixer_compiled_operator_calls"] / row["mixer_compiled_operator_calls"]
    row |= imixer_step.inverse_residuals(build("imixer", shape, device), images)
    row["reference_residual_max"] = imixer_step.inverse_residuals(build("reference-2", shape, device), images)[
        "residual_max"
    ]
    return row


def solver_ratios(device: torch.device, quick: bool) -> list[dict[str, Any]] | str:
    """Our Anderson and Broyden against TorchDEQ's on a tanh map, float32 (``benchmarks/solvers.py``'s cases)."""
    if importlib.util.find_spec("torchdeq") is None:
        return "torchdeq is not installed"
    dim, batch, repeats = (16, 8, 1) if quick else (64, 256, 9)
    solvers.il_torchdeq.register()  # TorchDEQ's solvers under the names "torchdeq.*"
    problem = solvers.tanh_gaussian_problem(0, dim, batch, 0.9)
    names = ["anderson", "broyden", render.PAIRS["anderson"], render.PAIRS["broyden"]]
    cases = [solvers.run_case(problem, "float32", name, 100, repeats, 0, device) for name in names]
    return solvers.ratios(cases)


def markdown(results: dict[str, Any]) -> str:
    info = results["machine"]
    first = results["steps"][0]
    step_modes = [mode for mode in ("eager", "compiled", "cudagraphs") if f"{mode}_ratio_to_mixer" in first]
    lines = [
        f"# The GPU run ({info['date_utc']} UTC, {info['device_name']}, commit {info['git_commit']}"
        f"{' with local changes' if info['git_dirty'] else ''}, torch {info['torch']}, timm {info['timm']}"
        f"{', quick' if results['config']['quick'] else ''})",
        "",
        "Training steps of the iMixer with the library's defaults and of the reference loop (`reference-2`), "
        "against timm's Mixer of the same shape run the same way (median of "
        f"{results['config']['repeats']} steps after warm-up; torch.compile backend {results['config']['backend']}"
        "; `cudagraphs`: mode `reduce-overhead`). Memory: what autograd saves in an eager step (and the "
        "device's peak on CUDA). Residual: the recomputed relative inverse residual, max over blocks and rows.",
        "",
        "| shape | batch | step | iMixer ms | × mixer | × reference-2 | compile s (iMixer) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in results["steps"]:
        for mode in step_modes:
            lines.append(
                f"| {r['shape']} | {r['batch']} | {mode} | {r[f'imixer_{mode}_step_ms']:.1f} "
                f"| {r[f'{mode}_ratio_to_mixer']:.2f} | {r[f'{mode}_ratio_to_reference']:.2f} "
                f"| {render.fmt(r[f'imixer_{mode}_compile_s'], '.1f', '–')} |"
            )
    lines += ["", "| shape | saved MB: mixer / reference-2 / iMixer | device peak MB | residual: iMixer / reference-2 "
              "| iters max | compiled step's operators: mixer / reference-2 / iMixer (× mixer) |",
              "|---|---|---|---|---:|---|"]  # fmt: skip
    for r in results["steps"]:
        saved = " / ".join(f"{r[f'{kind}_saved_peak_mb']:.1f}" for kind in KINDS)
        peak = " / ".join(render.fmt(r[f"{kind}_cuda_peak_mb"], ".0f", "–") for kind in KINDS)
        lines.append(
            f"| {r['shape']} | {saved} | {peak} | {r['residual_max']:.2e} / {r['reference_residual_max']:.2e} "
            f"| {r['nstep_max']:.0f} | {' / '.join(str(r[f'{kind}_compiled_operator_calls']) for kind in KINDS)} "
            f"({r['operator_calls_ratio_to_mixer']:.2f}) |"
        )
    lines += ["", "## Solvers against TorchDEQ (float32 tanh map, time ratio ours / theirs)", ""]
    if isinstance(results["solvers"], str):
        lines.append(f"Not run: {results['solvers']}.")
    else:
        lines += ["| ours | TorchDEQ | forward time × | backward time × | success difference |"]
        lines += ["|---|---|---:|---:|---:|"]
        for r in results["solvers"]:
            lines.append(
                f"| {r['ours']} | {r['torchdeq']} | {render.fmt(r['time_median_s'], '.2f', '–')} "
                f"| {render.fmt(r['backward_time_median_s'], '.2f', '–')} | {r['success_rate_diff']:+.2f} |"
            )
    return "\n".join([*lines, "", "## Gradient modes", "", render.backward_mlp_markdown(results["backward"])])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="where to measure (default cuda)")
    parser.add_argument("--quick", action="store_true", help="the 28 px model at batch 4, 2 repeats: for the test")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "gpu", help="output folder")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu for a dry run)")
    shapes = {"t4_28": SHAPES["t4_28"] | {"batch": 4}} if args.quick else SHAPES
    repeats = 2 if args.quick else 10
    backend = "aot_eager" if args.quick and device.type == "cpu" else "inductor"
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if args.quick else threads)
    start = time.perf_counter()
    setup = {"quick": args.quick, "repeats": repeats, "backend": backend}
    results: dict[str, Any] = {"config": setup, "machine": common.machine(device)}
    # Inductor's on-disk caches would make a compile after the first run a cache read: compile from scratch.
    torch._inductor.config.fx_graph_cache = False
    torch._inductor.config.autotune_local_cache = False
    results |= {"steps": [], "solvers": "not reached", "backward": [], "phase_seconds": {}}
    dim, batch, backward_repeats = (16, 8, 1) if args.quick else (64, 128, 9)
    phases = [
        *((name, lambda shape=shape, name=name: results["steps"].append(
            measure_shape(name, shape, device, backend, repeats))) for name, shape in shapes.items()),
        ("solvers", lambda: results.update(solvers=solver_ratios(device, args.quick))),
        ("backward", lambda: results.update(backward=[
            backward.measure_mlp(dim, batch, coeff, solver, backward_repeats, 0, device)
            for coeff, solver in ((0.9, "anderson"), (0.99, "broyden"))])),
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", il.ConvergenceWarning)
        for phase, run in phases:  # written after each phase: a run cut short keeps what it measured
            phase_start = time.perf_counter()
            run()
            results["phase_seconds"][phase] = time.perf_counter() - phase_start
            results["seconds"] = time.perf_counter() - start
            common.write(args.out, "gpu", results, markdown(results))
    torch.set_num_threads(threads)
    table = markdown(results)
    print(table)
    return results


if __name__ == "__main__":
    main()
