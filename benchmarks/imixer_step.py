"""iMixer training step, peak memory, inverse residual and inference throughput against timm's Mixer (issue 4).

    python -m benchmarks.imixer_step [--quick] [--device cpu|cuda] [--configs ...] [--profile] [--out DIR]

What each number means: benchmarks/README.md, "iMixer training step, memory and throughput" and "Where a
training step's time goes".
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import implicitlayers as il
from benchmarks import common, render
from examples.common import OneLineArgumentParser, int_range

MAX_ITER = 30
# Batch per size on CPU and on CUDA (a GPU needs larger batches to be busy at all).
SIZES = {
    "t4_32": {"img_size": 32, "batch": 32, "cuda_batch": 256},
    "s16_224": {"img_size": 224, "batch": 8, "cuda_batch": 64},
}
QUICK_CONFIGS = [
    "mixer", "imixer", "reference-1", "reference-2", "anderson-ift-0.001", "picard-jfb-0.001", "broyden-phantom-0.001",
]  # fmt: skip
MB = 2**20
# How the JSON's config describes the two measures.
MEASURES = {
    "memory_measure": "saved_peak_mb: peak bytes of distinct storages saved by autograd for backward "
    "(saved_tensors_hooks, parameters excluded); cuda_peak_mb: torch.cuda.max_memory_allocated",
    "residual_measure": "max over blocks and rows of ||x + g(z) - z|| / ||x + g(z)||, recomputed",
}


def grid() -> dict[str, dict[str, Any]]:
    """The solved configurations ``<solver>-<backward>-<tol>`` (SHINE needs a solver that keeps memory)."""
    return {
        f"{s}-{b}-{tol:g}": {"solver": s, "backward": b, "tol": tol, "max_iter": MAX_ITER}
        for tol in (1e-2, 1e-3, 1e-4)
        for s in ("broyden", "anderson", "picard")
        for b in ("ift", "phantom", "jfb", "shine")
        if not (b == "shine" and not il.as_solver(s).keeps_memory)
    }


def all_configs() -> dict[str, dict[str, Any]]:
    """Every configuration of a full run, by name: mixer, imixer, the reference loops and the grid."""
    presets = ["mixer", "imixer", *(f"reference-{n}" for n in (1, 2, 3, 4, 8))]
    return {name: dict(common.PRESETS[name]) for name in presets} | grid()


def parse(spec: str) -> tuple[str, dict[str, Any]]:
    """A grid name (:func:`grid`), a preset or ``name=key:value,...`` (``benchmarks/common.py``)."""
    solved = grid()
    return (spec, solved[spec]) if spec in solved else common.parse_config(spec)


def build(size: str, options: dict[str, Any], device: torch.device, **shape: Any) -> nn.Module:
    """The seeded ``size`` model of a configuration (timm's Mixer or the iMixer), ``shape`` overriding its shape."""
    torch.manual_seed(0)
    return common.create_model(size, options, **shape).to(device)


def random_batch(batch: int, channels: int, img_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Seeded random images and labels: every model of a run sees the same batch."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, channels, img_size, img_size, generator=generator).to(device)
    return images, torch.randint(0, 10, (batch,), generator=generator).to(device)


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(net(images), labels).backward()
    optimizer.step()


class SavedTensorMeter:
    """Peak bytes of the distinct storages autograd holds for backward (parameters excluded): a storage counts from
    the first :class:`_Holder` of one of its tensors to the release of the last (a weakref finalizer sees it)."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.excluded = {p.untyped_storage().data_ptr() for p in params}
        self.holders: dict[tuple[str, int], int] = {}  # (device, storage address) -> holders alive
        self.live = self.peak = 0

    def pack(self, tensor: Tensor) -> _Holder:
        holder, storage = _Holder(tensor), tensor.untyped_storage()
        if storage.data_ptr() in self.excluded or tensor.device.type == "meta":
            return holder
        key, nbytes = (str(tensor.device), storage.data_ptr()), storage.nbytes()
        if key not in self.holders:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.holders[key] = self.holders.get(key, 0) + 1
        weakref.finalize(holder, self._release, key, nbytes)
        return holder

    def _release(self, key: tuple[str, int], nbytes: int) -> None:
        self.holders[key] -= 1
        if not self.holders[key]:
            del self.holders[key]
            self.live -= nbytes


class _Holder:
    """A saved tensor, kept by autograd until it releases it. Detached: with its ``grad_fn``, an operation's saved
    output (sigmoid's, say) would make a cycle (holder → output → its node → holder) that the garbage collector
    cannot see through, and the storage would never count as released."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor.detach()


def step_memory(net: nn.Module, images: Tensor, labels: Tensor, device: torch.device) -> dict[str, float | None]:
    """``saved_peak_mb`` (what autograd saves) and, on CUDA, ``cuda_peak_mb`` of one training step."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    train_step(net, optimizer, images, labels)  # optimiser state exists before the measured step
    meter = SavedTensorMeter(list(net.parameters()))
    common.synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda holder: holder.tensor):
        train_step(net, optimizer, images, labels)
    common.synchronize(device)
    cuda_peak = torch.cuda.max_memory_allocated(device) / MB if device.type == "cuda" else None
    return {"saved_peak_mb": meter.peak / MB, "cuda_peak_mb": cuda_peak}


def inverse_residuals(net: nn.Module, images: Tensor) -> dict[str, float | None]:
    """Each token mixer's ||x + g(z) - z|| / ||x + g(z)|| per row (one token-mixing problem), after a training-mode
    forward: max over blocks and rows, median over the worst block's rows, and what the solvers reported."""
    rows: list[Tensor] = []  # per block, each row's relative residual

    def check(layer: nn.Module, inputs: tuple[Tensor, ...], z: Tensor) -> None:
        # Recomputed as each block's forward ends, before anything else runs its g: eval mode reuses this
        # forward's power-iteration vectors, so g has the same normalised weights that produced z.
        layer.g.eval()
        try:
            fz = (inputs[0] + layer.g(z)).flatten(0, -2).double()
        finally:
            layer.g.train()
        residual = torch.linalg.vector_norm(fz - z.flatten(0, -2).double(), dim=-1)
        rows.append(residual / torch.linalg.vector_norm(fz, dim=-1).clamp_min(1e-30))

    hooks = [block.mlp_tokens.implicit.register_forward_hook(check) for block in net.blocks]
    try:
        net.train()
        with torch.no_grad():
            net(images)
    finally:
        for hook in hooks:
            hook.remove()
    if len(rows) != len(net.blocks):
        raise RuntimeError(f"expected one token-mixer solve per block ({len(net.blocks)}), saw {len(rows)}")
    worst = max(rows, key=lambda block_rows: float(block_rows.max()))
    stats = net.solver_stats()
    return {
        "residual_max": float(worst.max()),
        "residual_median": float(worst.median()),
        "solver_residual_max": max(s["residual_max"] for s in stats),
        "nstep_mean": statistics.fmean(s["nstep_mean"] for s in stats),
        "nstep_max": max(s["nstep_max"] for s in stats),
        "unconverged": max(s["unconverged"] for s in stats),
    }


def measure(size: str, name: str, options: dict[str, Any], batch: int, device: torch.device, warmup: int,
            repeats: int) -> dict[str, Any]:  # fmt: skip
    """One configuration's row: step time, inverse residual, memory and eval-mode images per second."""
    net = build(size, options, device).train()
    images, labels = random_batch(batch, 3, SIZES[size]["img_size"], device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    step_s = common.timed(lambda: train_step(net, optimizer, images, labels), device, warmup, repeats)[0]
    mixer = options.get("model") == "mixer"
    row = {"model": f"{'mixer' if mixer else 'imixer'}_{size}", "mode": name, "options": options}
    row["step_ms"] = 1e3 * step_s
    solved = ("residual_max", "residual_median", "solver_residual_max", "nstep_mean", "nstep_max", "unconverged")
    row |= dict.fromkeys(solved) if mixer else inverse_residuals(net, images)  # the Mixer solves nothing
    row |= step_memory(net, images, labels, device)
    net.eval()
    with torch.no_grad():
        row["images_per_s"] = batch / common.timed(lambda: net(images), device, warmup, repeats)[0]
    net.train()
    return row


def profile(size: str, name: str, options: dict[str, Any], batch: int, device: torch.device, rows: int = 15) -> str:
    """The profiler table of one training step (after a warm-up step), with a one-line header."""
    net = build(size, options, device).train()
    images, labels = random_batch(batch, 3, SIZES[size]["img_size"], device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    train_step(net, optimizer, images, labels)  # warm-up (allocator, optimiser state)
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    common.synchronize(device)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        train_step(net, optimizer, images, labels)
        common.synchronize(device)
    ms, averages = 1e3 * (time.perf_counter() - start), prof.key_averages()
    calls = sum(event.count for event in averages)
    table = averages.table(sort_by=f"self_{'cuda' if cuda else 'cpu'}_time_total", row_limit=rows)
    header = f"## {size} {name}, batch {batch}, {device}: {ms:.1f} ms per profiled step"
    return f"{header}, {calls:.0f} operator calls per step\n\n```text\n{table}\n```\n"


def memory_growth(size: str, batch: int, device: torch.device) -> dict[str, Any]:
    """saved_peak_mb of anderson/ift (tol 0: every iteration runs) and the reference loop at 2 and 16 iterations."""
    images, labels = random_batch(batch, 3, SIZES[size]["img_size"], device)
    out: dict[str, Any] = {"model": f"imixer_{size}", "batch": batch, "ift": {}, "reference": {}}
    for n in (2, 16):
        ift = build(size, {"solver": "anderson", "backward": "ift", "tol": 0.0, "max_iter": n}, device)
        out["ift"][str(n)] = step_memory(ift, images, labels, device)
        out["ift"][str(n)]["nstep_max"] = max(s["nstep_max"] for s in ift.solver_stats())
        reference = build(size, {"reference_iterations": n}, device)
        out["reference"][str(n)] = step_memory(reference, images, labels, device)
    for kind in ("ift", "reference"):
        out[kind]["growth_16_over_2"] = out[kind]["16"]["saved_peak_mb"] / out[kind]["2"]["saved_peak_mb"]
    return out


def equal_residual(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each solved configuration against the reference loop with the fewest steps whose residual_max is no larger
    (None if none is): ``step_ratio`` below 1 means faster, ``throughput_ratio`` above 1 more throughput."""
    references = [row for row in rows if "reference_iterations" in row["options"]]
    references.sort(key=lambda row: row["options"]["reference_iterations"])
    comparisons = []
    for row in rows:
        if row["options"].get("model") == "mixer" or "reference_iterations" in row["options"]:
            continue
        ref = next((ref for ref in references if ref["residual_max"] <= row["residual_max"]), None)
        comparisons.append(
            {
                "mode": row["mode"],
                "residual_max": row["residual_max"],
                "reference": None if ref is None else ref["mode"],
                "reference_residual_max": None if ref is None else ref["residual_max"],
                "step_ratio": None if ref is None else row["step_ms"] / ref["step_ms"],
                "throughput_ratio": None if ref is None else row["images_per_s"] / ref["images_per_s"],
            }
        )
    return comparisons


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints the markdown table, writes JSON and markdown; returns the results."""
    parser = OneLineArgumentParser(description="iMixer training step / memory / throughput vs timm's Mixer.")
    parser.add_argument("--quick", action="store_true", help="t4_32 only, batch 4, seven configurations, 2 repeats")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=common.RESULTS, help="output directory")
    parser.add_argument("--repeats", type=int_range(1), default=None, help="timed repeats (default 2 quick, 5 full)")
    parser.add_argument("--warmup", type=int_range(0), default=None, help="untimed steps (default 1 quick, 2 full)")
    parser.add_argument("--threads", type=int_range(1), default=None, help="torch threads (default: torch's; 1 quick)")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=None, help="model sizes to run")
    parser.add_argument("--configs", nargs="+", default=None,
                        help="grid names, presets or name=key:value,... (default: all; mixer always runs)")  # fmt: skip
    parser.add_argument("--batch", type=int_range(1), default=None, help="batch size for every model size")
    parser.add_argument("--profile", action="store_true", help="also profile one step per configuration")
    args = parser.parse_args(argv)
    try:
        configs = dict(parse(spec) for spec in args.configs) if args.configs else None
    except ValueError as error:
        parser.error(f"--configs: {error}")
    configs = configs or ({name: parse(name)[1] for name in QUICK_CONFIGS} if args.quick else all_configs())
    configs = {"mixer": common.PRESETS["mixer"]} | {k: v for k, v in configs.items() if v.get("model") != "mixer"}
    device = torch.device(args.device)
    repeats = args.repeats or (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    sizes = args.sizes or (["t4_32"] if args.quick else ["t4_32", "s16_224"])
    # --quick: one thread (on a shared machine, another process makes two-thread runs 10-40x slower in bursts)
    with common.measuring(args.threads or (1 if args.quick else None)):
        start = time.perf_counter()
        setup = {"quick": args.quick, "device": str(device), "repeats": repeats, "warmup": warmup}
        setup |= {"max_iter": MAX_ITER, "modes": list(configs), "optimizer": "AdamW(lr=1e-3)"} | MEASURES
        results: dict[str, Any] = {"config": setup, "machine": (info := common.machine(device)), "models": {}}
        print(f"{common.machine_line(info)} | {info['device']} ({info['device_name']})", flush=True)
        profiles = []
        for size in sizes:
            batch = args.batch or (4 if args.quick else SIZES[size]["cuda_batch" if device.type == "cuda" else "batch"])
            rows: list[dict[str, Any]] = []
            for name, options in configs.items():  # the Mixer first: every row divides by its numbers
                rows.append(row := measure(size, name, options, batch, device, warmup, repeats))
                row["step_ratio_to_vanilla"] = row["step_ms"] / rows[0]["step_ms"]
                row["throughput_ratio_to_vanilla"] = row["images_per_s"] / rows[0]["images_per_s"]
                print(f"  {row['model']:16s} {name:22s} step {row['step_ms']:9.1f} ms  residual "
                      f"{render.fmt(row['residual_max'], '.2e'):>9s}  {row['images_per_s']:8.1f} img/s",
                      flush=True)  # fmt: skip
                if args.profile:
                    profiles.append(profile(size, name, options, batch, device))
            results["models"][size] = {"batch": batch, "img_size": SIZES[size]["img_size"], "rows": rows}
            results["models"][size]["equal_residual"] = equal_residual(rows)
        growth_size = "s16_224" if "s16_224" in sizes and not args.quick else "t4_32"
        growth_batch = results["models"][growth_size]["batch"] if growth_size in results["models"] else 4
        results["memory_growth"] = memory_growth(growth_size, growth_batch, device)
    results["seconds"] = time.perf_counter() - start
    print(table := render.step_markdown(results))
    common.write(args.out, "imixer_step", results, table)
    if profiles:
        (args.out / "imixer_step_profile.md").write_text("\n".join(profiles), encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
