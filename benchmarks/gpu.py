"""The prepared GPU run: eager and compiled training steps against timm's Mixer, and the gradient modes.

    python -m benchmarks.gpu --out benchmarks/results/gpu      # on one GPU, a few minutes
    python -m benchmarks.gpu --device cpu --quick --out /tmp/gpu   # the test's run: the same code, seconds

What it measures and why: benchmarks/README.md, "The prepared GPU run".
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import backward, common, imixer_step, render, solvers
from examples.common import OneLineArgumentParser, first_line

SHAPES = {
    "s16_224": {"model": "s16_224", "kwargs": {}, "batch": 8, "channels": 3, "img_size": 224},
    "t4_28": {"model": "t4_32", "batch": 32, "channels": 1, "img_size": 28,
              "kwargs": {"img_size": 28, "in_chans": 1, "patch_size": 4, "num_blocks": 4, "embed_dim": 128}},
}  # fmt: skip
KINDS = render.GPU_KINDS  # timm's Mixer, the reference loop (two Picard steps), the library's defaults


def build(kind: str, shape: dict[str, Any], device: torch.device) -> nn.Module:
    return imixer_step.build(shape["model"], common.PRESETS[kind], device, **shape["kwargs"])


def step_times(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
               backend: str | None, mode: str | None, repeats: int) -> dict[str, float | None]:  # fmt: skip
    """Median step milliseconds, operators per step and, compiled with ``backend``, the first step's seconds."""
    if backend is not None:  # a cold compile of this model alone: no graphs, shapes or kernels from the last one
        torch._dynamo.reset()
    model = net if backend is None else torch.compile(net, backend=backend, mode=mode, dynamic=False)
    step = partial(imixer_step.train_step, model, torch.optim.AdamW(net.parameters(), lr=1e-3), images, labels)
    compile_s = None if backend is None else common.timed(step, device, 0, 1)[0]  # tracing, code generation, step
    seconds = common.timed(step, device, 1, repeats)[0]
    return {"step_ms": 1e3 * seconds, "compile_s": compile_s, "operator_calls": operator_calls(step, device)}


def operator_calls(step: Callable[[], None], device: torch.device) -> int:
    """Operators a training step runs (AdamW's included): the kernels launched on CUDA; on a CPU, the outermost ATen
    operators (not their own sub-operators; in a graph inductor compiled, the operators it did not fuse)."""
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profile:
        step()
        common.synchronize(device)
    if cuda:
        return sum(event.device_type == torch.autograd.DeviceType.CUDA for event in profile.events())
    return sum(event.name.startswith("aten::") and not _inside_aten(event) for event in profile.events())


def _inside_aten(event: Any) -> bool:
    """Whether a profiler event runs inside another ATen operator (aten::linear's aten::t, ...)."""
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith("aten::"):
        parent = parent.cpu_parent
    return parent is not None


def measure_shape(name: str, shape: dict[str, Any], device: torch.device, backend: str, repeats: int) -> dict[str, Any]:
    """One shape's row: each kind's memory, then its steps eager, compiled (and on CUDA with CUDA graphs), residuals."""
    images, labels = imixer_step.random_batch(shape["batch"], shape["channels"], shape["img_size"], device)
    row: dict[str, Any] = {"shape": name, "batch": shape["batch"]}
    for kind in KINDS:  # first, before any compiled graph or CUDA-graph pool holds memory: an eager step's
        memory = imixer_step.step_memory(build(kind, shape, device), images, labels, device)
        row |= {f"{kind}_{key}": value for key, value in memory.items()}
    modes = {"eager": (None, None), "compiled": (backend, None)}
    if device.type == "cuda":
        modes["cudagraphs"] = (backend, "reduce-overhead")
    for mode, (compiler, compile_mode) in modes.items():
        for kind in KINDS:
            times = step_times(build(kind, shape, device), images, labels, device, compiler, compile_mode, repeats)
            row |= {f"{kind}_{mode}_{key}": value for key, value in times.items()}
        row[f"{mode}_ratio_to_mixer"] = row[f"imixer_{mode}_step_ms"] / row[f"mixer_{mode}_step_ms"]
        row[f"{mode}_ratio_to_reference"] = row[f"imixer_{mode}_step_ms"] / row[f"reference-2_{mode}_step_ms"]
    row["operator_calls_ratio_to_mixer"] = row["imixer_compiled_operator_calls"] / row["mixer_compiled_operator_calls"]
    row |= imixer_step.inverse_residuals(build("imixer", shape, device), images)
    reference = imixer_step.inverse_residuals(build("reference-2", shape, device), images)
    return row | {"reference_residual_max": reference["residual_max"]}


def solver_ratios(device: torch.device, quick: bool) -> list[dict[str, Any]] | str:
    """Our Anderson and Broyden against TorchDEQ's on a tanh map, float32 (``benchmarks/solvers.py``'s cases)."""
    if importlib.util.find_spec("torchdeq") is None:
        return "torchdeq is not installed"
    dim, batch, repeats = (16, 8, 1) if quick else (64, 256, 9)
    solvers.il_torchdeq.register()  # TorchDEQ's solvers under the names "torchdeq.*"
    problem = solvers.tanh_gaussian_problem(0, dim, batch, 0.9)
    names = ["anderson", "broyden", render.PAIRS["anderson"], render.PAIRS["broyden"]]
    return solvers.ratios([solvers.run_case(problem, "float32", name, 100, repeats, 0, device) for name in names])


def gradient_modes(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    """``benchmarks/backward.py --problem mlp``'s modes on the device."""
    dim, batch, repeats = (16, 8, 1) if quick else (64, 128, 9)
    settings = ((0.9, "anderson"), (0.99, "broyden"))  # a moderate and a slow contraction
    return [backward.measure_mlp(dim, batch, coeff, solver, repeats, 0, device) for coeff, solver in settings]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="where to measure (default cuda)")
    parser.add_argument("--quick", action="store_true", help="the 28 px model at batch 4, 2 repeats: for the test")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "gpu", help="output folder")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {first_line(error)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu for a dry run)")
    shapes = {"t4_28": SHAPES["t4_28"] | {"batch": 4}} if args.quick else SHAPES
    repeats = 2 if args.quick else 10
    # On a CPU, --quick compiles with aot_eager: inductor's C++ code generation alone takes minutes on 2 cores.
    backend = "aot_eager" if args.quick and device.type == "cpu" else "inductor"
    # Inductor's on-disk caches would make a compile after the first run a cache read: compile from scratch.
    torch._inductor.config.fx_graph_cache = False
    torch._inductor.config.autotune_local_cache = False
    start = time.perf_counter()
    results: dict[str, Any] = {"config": {"quick": args.quick, "repeats": repeats, "backend": backend}}
    results |= {"machine": common.machine(device), "steps": [], "solvers": "not reached", "backward": []}
    results["phase_seconds"] = {}

    def save(phase: str, phase_start: float) -> None:
        """Writes the files after each phase: a run cut short keeps what it measured."""
        results["phase_seconds"][phase] = time.perf_counter() - phase_start
        results["seconds"] = time.perf_counter() - start
        common.write(args.out, "gpu", results, render.gpu_markdown(results))

    with common.measuring(threads=1 if args.quick else None):
        for name, shape in shapes.items():
            phase_start = time.perf_counter()
            results["steps"].append(measure_shape(name, shape, device, backend, repeats))
            save(name, phase_start)
        for phase, run in {"solvers": solver_ratios, "backward": gradient_modes}.items():
            phase_start = time.perf_counter()
            results[phase] = run(device, args.quick)
            save(phase, phase_start)
    print(render.gpu_markdown(results))
    return results


if __name__ == "__main__":
    main()
