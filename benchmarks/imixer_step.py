"""iMixer training-step time, peak memory, inverse accuracy and inference throughput (issue 4).

For ``imixer_s16_224`` and ``imixer_t4_32`` (``examples/imixer/imixer.py``) and timm's vanilla
``mixer_s16_224`` / ``mixer_t4_32`` of the same shapes, in one run, per configuration (``--configs``, the
vocabulary of ``benchmarks/common.py``; the ``mixer`` row always runs first):

- **Configurations.** ``mixer`` (timm's MLP-Mixer); ``imixer`` (the library's defaults);
  ``reference-n`` (the reference loop: exactly n Picard steps, autograd through the loop) for
  n = 1, 2, 3, 4, 8; and the grid ``<solver>-<backward>-<tol>`` (:func:`grid`) for solver ∈ {broyden,
  anderson, picard}, backward ∈ {ift, phantom, jfb, shine} (shine with broyden and anderson only),
  tol ∈ {1e-2, 1e-3, 1e-4}, max_iter 30 (the layers return f(z*), so the residual reached is about a
  tenth of tol at initialisation). Any ``name=key:value,...`` runs too.
- **Equal residual.** Each solved configuration against the cheapest reference loop whose residual max
  is no larger: the ratios of step time and of throughput.
- **Training step.** Forward + cross-entropy backward + AdamW step on a random batch; the median of
  ``--repeats`` timed steps after ``--warmup`` untimed ones; ``× vanilla`` is that median over the
  vanilla mixer's median of the same size, measured earlier in the same run.
- **Peak memory.** ``saved_peak_mb``, on every device: the peak, over one training step, of the bytes
  of the distinct tensor storages held by autograd for backward (every tensor packed through
  :func:`torch.autograd.graph.saved_tensors_hooks`, deduplicated by storage, counted from when it is
  saved until autograd releases it; parameter storages excluded). It is the activation memory of
  the step, deterministic, and independent of the allocator; solver work buffers created under
  ``no_grad`` (Anderson/Broyden history) are not in it, nor is anything allocated during backward.
  On CUDA also ``cuda_peak_mb``: ``torch.cuda.max_memory_allocated`` over one step (parameters,
  gradients and optimiser state included), after ``reset_peak_memory_stats``.
- **Inverse residual actually reached.** After a training-mode forward (untimed), for every block the
  token mixer's input x (= fc1 output) and output z are captured and the true relative residual
  ||x + g(z) - z|| / ||x + g(z)|| is recomputed per row (one row = one token-mixing problem) with the
  same normalised weights. ``residual_max`` is the max over blocks and rows, ``residual_median`` the
  median over rows of the worst block; ``solver_residual_max`` is what the solver itself reported (for
  the reference loop, the residual of the iterate before the last step, hence larger).
- **Inference.** Images per second in eval mode under ``no_grad`` (median of ``--repeats`` forwards),
  and the ratio to the vanilla mixer's throughput.
- **After training** (CPU; ``--trained-epochs``, default 5): ``mixer``, ``imixer`` and ``reference-2``
  trained on the digits 4 × 128 recipe of ``benchmarks/imixer_training.py`` (``digits-hard``), their
  step timed at initialisation and after training, with the worst block's forward iterations
  (:func:`trained_steps`): iteration counts grow with training.
- **IFT memory vs iterations.** ``saved_peak_mb`` for anderson/ift with tol 0 (every iteration runs)
  at max_iter 2 and 16, against the reference loop with 2 and 16 steps: IFT should not grow, the
  reference loop grows linearly.
- **Profile** (``--profile``): one training step per configuration under ``torch.profiler`` (after a
  warm-up step): the step's wall time, the operator calls per step, and the operators with the largest
  self time (CUDA time on a GPU), in ``imixer_step_profile.md``: how many operators a solved token
  mixer launches per iteration, and which of them cost time.

``--quick`` (the test's run, well under a minute on 2 CPU cores): ``imixer_t4_32`` / ``mixer_t4_32`` at
batch 4, :data:`QUICK_CONFIGS`, 2 timed repeats, one torch thread (on a shared machine a second
process's threads make two-thread runs 10-40x slower in bursts). The full run uses all of torch's
threads (``--threads`` overrides), batch 32 for t4_32 and 8 for s16_224 on CPU, 256 and 64 on CUDA
(``--batch`` overrides), and every configuration of :func:`all_configs`.

Usage: ``python -m benchmarks.imixer_step [--quick] [--device cpu|cuda] [--configs ...] [--profile]``.
Writes ``imixer_step.json`` and ``imixer_step.md`` into ``--out`` (default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

import implicitlayers as il
from benchmarks import common, render
from benchmarks import imixer_training as training
from examples.imixer import imixer as imixer_model  # noqa: F401  (registers the imixer_* / mixer_t* timm models)

SOLVERS = ["broyden", "anderson", "picard"]
BACKWARDS = ["ift", "phantom", "jfb", "shine"]
TOLS = [1e-2, 1e-3, 1e-4]
MAX_ITER = 30
# Batch per size on CPU and on CUDA (a GPU needs larger batches to be busy at all).
SIZES = {
    "t4_32": {"img_size": 32, "batch": 32, "cuda_batch": 256},
    "s16_224": {"img_size": 224, "batch": 8, "cuda_batch": 64},
}
QUICK_CONFIGS = [
    "mixer", "imixer", "reference-1", "reference-2", "anderson-ift-0.001", "picard-jfb-0.001", "broyden-phantom-0.001",
]  # fmt: skip
TRAINED = ("mixer", "imixer", "reference-2")
MB = 2**20


# ---------------------------------------------------------------------------- configurations
def grid() -> dict[str, dict[str, Any]]:
    """The solved configurations ``<solver>-<backward>-<tol>`` (SHINE needs a solver that keeps memory)."""
    return {
        f"{s}-{b}-{tol:g}": {"solver": s, "backward": b, "tol": tol, "max_iter": MAX_ITER}
        for tol in TOLS
        for s in SOLVERS
        for b in BACKWARDS
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


def is_mixer(options: dict[str, Any]) -> bool:
    return options.get("model") == "mixer"


def build(size: str, options: dict[str, Any], device: torch.device, **shape: Any) -> nn.Module:
    """The ``size`` model of a configuration (seeded), ``shape`` overriding its registered shape."""
    torch.manual_seed(0)
    if is_mixer(options):
        return timm.create_model(f"mixer_{size}", num_classes=10, **shape).to(device)
    return timm.create_model(f"imixer_{size}", num_classes=10, **common.model_kwargs(options), **shape).to(device)


def random_batch(batch: int, channels: int, img_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Seeded random images and labels: every model of a run sees the same batch."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, channels, img_size, img_size, generator=generator).to(device)
    return images, torch.randint(0, 10, (batch,), generator=generator).to(device)


def batch_of(size: str, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    return random_batch(batch, 3, SIZES[size]["img_size"], device)


# ---------------------------------------------------------------------------------- measures
def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(net(images), labels).backward()
    optimizer.step()


class SavedTensorMeter:
    """Peak bytes of distinct storages held by autograd for backward (parameters excluded).

    Each saved tensor is packed into a small holder object that autograd keeps until it releases the
    saved tensor; a weakref finalizer on the holder decrements that storage's reference count, and the
    storage's bytes count from its first holder's creation to its last holder's release.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.excluded = {p.untyped_storage().data_ptr() for p in params}
        self.holders: dict[tuple[str, int], int] = {}
        self.live = self.peak = 0

    def _release(self, key: tuple[str, int], nbytes: int) -> None:
        self.holders[key] -= 1
        if self.holders[key] == 0:
            del self.holders[key]
            self.live -= nbytes

    def pack(self, tensor: Tensor) -> Any:
        holder = _Holder(tensor)
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self.excluded or tensor.device.type == "meta":
            return holder
        key, nbytes = (str(tensor.device), storage.data_ptr()), storage.nbytes()
        if key not in self.holders:
            self.holders[key] = 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.holders[key] += 1
        weakref.finalize(holder, self._release, key, nbytes)
        return holder

    @staticmethod
    def unpack(holder: Any) -> Tensor:
        return holder.tensor


class _Holder:
    """A saved tensor, detached: holding it with its ``grad_fn`` would make a reference cycle when
    autograd saves an operation's own output (sigmoid's, say: holder → output → its node → holder),
    which the garbage collector cannot see through, so the storage would never count as released."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor.detach()


def step_memory(net: nn.Module, images: Tensor, labels: Tensor, device: torch.device) -> dict[str, float | None]:
    """saved_peak_mb (and cuda_peak_mb on CUDA) of one training step."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    train_step(net, optimizer, images, labels)  # optimiser state exists before the measured step
    meter = SavedTensorMeter(list(net.parameters()))
    if device.type == "cuda":
        common.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        train_step(net, optimizer, images, labels)
    cuda_peak = None
    if device.type == "cuda":
        common.synchronize(device)
        cuda_peak = torch.cuda.max_memory_allocated(device) / MB
    return {"saved_peak_mb": meter.peak / MB, "cuda_peak_mb": cuda_peak}


def inverse_residuals(net: nn.Module, images: Tensor) -> dict[str, float | None]:
    """True relative residual of every token mixer's z after a training-mode forward (see module doc)."""
    layers = [block.mlp_tokens.implicit for block in net.blocks]
    captured: list[tuple[Tensor, Tensor]] = []
    hooks = [
        layer.register_forward_hook(lambda _m, inputs, output: captured.append((inputs[0].detach(), output.detach())))
        for layer in layers
    ]
    try:
        net.train()
        with torch.no_grad():
            net(images)
    finally:
        for hook in hooks:
            hook.remove()
    worst_per_block = []
    per_block_rows = []
    with torch.no_grad():
        for layer, (x, z) in zip(layers, captured, strict=True):
            layer.g.eval()  # reuse this forward's power-iteration vectors: the same normalised weights
            try:
                fz = (x + layer.g(z)).flatten(0, -2).double()
            finally:
                layer.g.train()
            rows = torch.linalg.vector_norm(fz - z.flatten(0, -2).double(), dim=-1)
            rows = rows / torch.linalg.vector_norm(fz, dim=-1).clamp_min(1e-30)
            worst_per_block.append(float(rows.max()))
            per_block_rows.append(rows)
    worst = max(range(len(layers)), key=lambda i: worst_per_block[i])
    stats = net.solver_stats()
    return {
        "residual_max": max(worst_per_block),
        "residual_median": float(per_block_rows[worst].median()),
        "solver_residual_max": max(s["residual_max"] for s in stats),
        "nstep_mean": statistics.fmean(s["nstep_mean"] for s in stats),
        "nstep_max": max(s["nstep_max"] for s in stats),
        "unconverged": max(s["unconverged"] for s in stats),
    }


def inference_throughput(net: nn.Module, images: Tensor, device: torch.device, warmup: int, repeats: int) -> float:
    net.eval()

    def forward() -> None:
        with torch.no_grad():
            net(images)

    seconds = common.timed(forward, device, warmup, repeats)[0]
    net.train()
    return images.shape[0] / seconds


def measure(size: str, name: str, options: dict[str, Any], batch: int, device: torch.device, warmup: int,
            repeats: int) -> dict[str, Any]:  # fmt: skip
    net = build(size, options, device).train()
    images, labels = batch_of(size, batch, device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    step_s = common.timed(lambda: train_step(net, optimizer, images, labels), device, warmup, repeats)[0]
    row: dict[str, Any] = {"model": f"{'mixer' if is_mixer(options) else 'imixer'}_{size}", "mode": name}
    row |= {"options": options, "step_ms": 1e3 * step_s}
    if is_mixer(options):
        row |= dict.fromkeys(["residual_max", "residual_median", "solver_residual_max", "nstep_mean"])
        row |= {"nstep_max": None, "unconverged": None}
    else:
        row |= inverse_residuals(net, images)
    row |= step_memory(net, images, labels, device)
    row["images_per_s"] = inference_throughput(net, images, device, warmup, repeats)
    return row


def profile(size: str, name: str, options: dict[str, Any], batch: int, device: torch.device, rows: int = 15) -> str:
    """The profiler table of one training step (after a warm-up step), with a one-line header."""
    from torch.profiler import ProfilerActivity

    net = build(size, options, device).train()
    images, labels = batch_of(size, batch, device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    train_step(net, optimizer, images, labels)  # warm-up (allocator, optimiser state)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    common.synchronize(device)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        train_step(net, optimizer, images, labels)
        common.synchronize(device)
    seconds = time.perf_counter() - start
    averages = prof.key_averages()
    calls = sum(event.count for event in averages)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    header = (
        f"## {size} {name}, batch {batch}, {device}: {1e3 * seconds:.1f} ms per profiled step, "
        f"{calls:.0f} operator calls per step"
    )
    return header + "\n\n```text\n" + averages.table(sort_by=sort_by, row_limit=rows) + "\n```\n"


def trained_steps(epochs: int, max_batches: int | None, warmup: int, repeats: int) -> dict[str, Any]:
    """The step at initialisation and after training, on the digits 4 × 128 recipe (CPU).

    Iteration counts grow as training moves the weights, so a step timed at initialisation understates
    what a solved mode costs later. Each of :data:`TRAINED` is trained for ``epochs`` epochs on
    ``digits-hard`` with the recipe, seed 0 and data order of ``benchmarks/imixer_training.py`` (its batch
    64), and its training step on one fixed batch is timed before and after (median of ``repeats``, the
    weights restored after each timed step so that every repeat times the same step).
    """
    options = argparse.Namespace(img_size=16, patch_size=2, lr=2e-3, weight_decay=0.05)
    task, batch = training.Task("digits-hard", options.img_size), 64
    steps_per_epoch = task.steps_per_epoch(batch, max_batches)
    images, labels = (tensor[:batch] for tensor in task.train_epoch(0, 0))
    rows = []
    for name in TRAINED:
        run = training.Run(name, dict(common.PRESETS[name]), 0, options, steps=epochs * steps_per_epoch)
        row: dict[str, Any] = {"mode": name}
        for when in ("init", "trained"):
            if when == "trained":
                for epoch in range(1, epochs + 1):
                    run.train_epoch(*task.train_epoch(0, epoch), batch, max_batches)
            row[f"{when}_step_ms"] = 1e3 * _frozen_step_seconds(run.net, images, labels, warmup, repeats)
            layers = training.implicit_layers(run.net)
            row[f"{when}_nstep_max"] = max((float(layer.stats.nstep.max()) for layer in layers), default=None)
        rows.append(row)
        print(f"  trained {name:12s} step {row['init_step_ms']:8.1f} ms at init, {row['trained_step_ms']:8.1f} ms "
              f"after {epochs} epochs", flush=True)  # fmt: skip
    for row in rows:
        for when in ("init", "trained"):
            row[f"{when}_ratio_to_vanilla"] = row[f"{when}_step_ms"] / rows[0][f"{when}_step_ms"]
    return {"task": "digits-hard", "epochs": epochs, "batch": batch, "max_batches": max_batches, "rows": rows}


def _frozen_step_seconds(net: nn.Module, images: Tensor, labels: Tensor, warmup: int, repeats: int) -> float:
    """Median seconds of one training step (forward, backward, AdamW) that leaves the model unchanged."""
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.train()

    def step() -> None:
        train_step(net, optimizer, images, labels)
        net.load_state_dict(saved)

    seconds = common.timed(step, "cpu", warmup, repeats)[0]
    for parameter in net.parameters():
        parameter.grad = None
    return seconds


def memory_growth(size: str, batch: int, device: torch.device) -> dict[str, Any]:
    """saved_peak_mb of anderson/ift (tol 0) and the reference loop at 2 and 16 iterations."""
    images, labels = batch_of(size, batch, device)
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
    """Each solved configuration against the cheapest reference loop at least as accurate.

    "At least as accurate" means a ``residual_max`` no larger than the solved configuration's; the cheapest
    such reference loop is the one with the fewest steps. Ratios below 1 mean the solved configuration is
    faster (``step_ratio``) or has more throughput than the reference (``throughput_ratio`` above 1).
    """
    references = sorted(
        (row for row in rows if "reference_iterations" in row["options"]),
        key=lambda row: row["options"]["reference_iterations"],
    )
    comparisons = []
    for row in rows:
        if is_mixer(row["options"]) or "reference_iterations" in row["options"]:
            continue
        match = next((ref for ref in references if ref["residual_max"] <= row["residual_max"]), None)
        comparisons.append(
            {
                "mode": row["mode"],
                "residual_max": row["residual_max"],
                "reference": None if match is None else match["mode"],
                "reference_residual_max": None if match is None else match["residual_max"],
                "step_ratio": None if match is None else row["step_ms"] / match["step_ms"],
                "throughput_ratio": None if match is None else row["images_per_s"] / match["images_per_s"],
            }
        )
    return comparisons


# ------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints the markdown table, writes JSON and markdown; returns the results."""
    parser = argparse.ArgumentParser(description="iMixer training step / memory / throughput vs timm's Mixer.")
    parser.add_argument("--quick", action="store_true", help="t4_32 only, batch 4, seven configurations, 2 repeats")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=common.RESULTS, help="output directory")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 2 quick, 5 full)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 1 quick, 2 full)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 quick)")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=None, help="model sizes to run")
    parser.add_argument("--configs", nargs="+", default=None,
                        help="grid names, presets or name=key:value,... (default: all; mixer always runs)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=None, help="batch size for every model size")
    parser.add_argument("--trained-epochs", type=int, default=None,
                        help="epochs of the digits recipe before the after-training step (1 of 3 batches with "
                        "--quick; 0 skips; CPU only)")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="also profile one step per configuration")
    args = parser.parse_args(argv)
    try:
        configs = dict(parse(spec) for spec in args.configs) if args.configs else None
    except ValueError as error:
        parser.error(f"--configs: {error}")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if configs is None:
        configs = {name: parse(name)[1] for name in QUICK_CONFIGS} if args.quick else all_configs()
    configs = {"mixer": common.PRESETS["mixer"]} | {k: v for k, v in configs.items() if not is_mixer(v)}
    trained_epochs = args.trained_epochs if args.trained_epochs is not None else (1 if args.quick else 5)
    device = torch.device(args.device)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    repeats = args.repeats or (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    sizes = args.sizes or (["t4_32"] if args.quick else ["t4_32", "s16_224"])
    start = time.perf_counter()
    setup = {"quick": args.quick, "device": str(device), "repeats": repeats, "warmup": warmup, "max_iter": MAX_ITER}
    setup |= {"modes": list(configs), "optimizer": "AdamW(lr=1e-3)"}
    setup["memory_measure"] = (
        "saved_peak_mb: peak bytes of distinct storages saved by autograd for backward "
        "(saved_tensors_hooks, parameters excluded); cuda_peak_mb: torch.cuda.max_memory_allocated"
    )
    setup["residual_measure"] = "max over blocks and rows of ||x + g(z) - z|| / ||x + g(z)||, recomputed"
    results: dict[str, Any] = {"config": setup, "machine": common.machine(device), "models": {}}
    info = results["machine"]
    threads = f"{info['cpu_count']} CPUs ({info['torch_threads']} threads)"
    print(f"{info['date_utc']} UTC | {info['platform']} | {threads} | torch {info['torch']} | timm {info['timm']} | "
          f"{info['device']} ({info['device_name']})", flush=True)  # fmt: skip
    profiles = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", il.ConvergenceWarning)
        for size in sizes:
            batch = args.batch or (4 if args.quick else SIZES[size]["cuda_batch" if device.type == "cuda" else "batch"])
            rows = []
            for name, options in configs.items():
                rows.append(measure(size, name, options, batch, device, warmup, repeats))
                print(f"  {rows[-1]['model']:16s} {name:22s} step {rows[-1]['step_ms']:9.1f} ms  residual "
                      f"{render.fmt(rows[-1]['residual_max'], '.2e'):>9s}  {rows[-1]['images_per_s']:8.1f} img/s",
                      flush=True)  # fmt: skip
                if args.profile:
                    profiles.append(profile(size, name, options, batch, device))
            for row in rows:
                row["step_ratio_to_vanilla"] = row["step_ms"] / rows[0]["step_ms"]
                row["throughput_ratio_to_vanilla"] = row["images_per_s"] / rows[0]["images_per_s"]
            results["models"][size] = {"batch": batch, "img_size": SIZES[size]["img_size"], "rows": rows}
            results["models"][size]["equal_residual"] = equal_residual(rows)
        growth_size = "s16_224" if "s16_224" in sizes and not args.quick else "t4_32"
        growth_batch = results["models"][growth_size]["batch"] if growth_size in results["models"] else 4
        results["memory_growth"] = memory_growth(growth_size, growth_batch, device)
        if trained_epochs and device.type == "cpu":
            results["trained"] = trained_steps(trained_epochs, 3 if args.quick else None, warmup, repeats)
    results["seconds"] = time.perf_counter() - start
    table = render.step_markdown(results)
    print(table)
    common.write(args.out, "imixer_step", results, table)
    if profiles:
        (args.out / "imixer_step_profile.md").write_text("\n".join(profiles), encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
