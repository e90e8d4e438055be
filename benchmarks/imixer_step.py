"""iMixer training-step time, peak memory, inverse accuracy and inference throughput (issue 4).

For ``imixer_s16_224`` and ``imixer_t4_32`` (``examples/imixer/imixer.py``) and their vanilla timm
baselines ``mixer_s16_224`` / ``mixer_t4_32``, in one run:

- **Modes.** ``vanilla`` (timm's MLP-Mixer of the same shape); ``default`` (the iMixer with the
  library's default settings, ``imixer.IMPLICIT_DEFAULTS``); ``reference-n`` (the reference loop:
  exactly n Picard steps, autograd through the loop) for n = 1, 2, 3, 4, 8; ``<solver>/<backward>@tol``
  (the solved mode) for solver ∈ {broyden, anderson, picard}, backward ∈ {ift, phantom, jfb, shine}
  (shine with broyden and anderson only),
  tol ∈ {1e-2, 1e-3, 1e-4}, max_iter 30 (the layers return f(z*), so the residual reached is
  about a tenth of tol at initialisation).
- **Equal residual.** Each solved mode against the cheapest reference mode whose residual max is no
  larger: the ratios of step time and of throughput.
- **Training step.** Forward + cross-entropy backward + AdamW step on a random batch; the median of
  ``--repeats`` timed steps after ``--warmup`` untimed ones; ``ratio`` is that median over the
  vanilla mixer's median of the same size, measured earlier in the same run.
- **Peak memory.** ``saved_peak_mb``, on every device: the peak, over one training step, of the bytes
  of the distinct tensor storages held by autograd for backward (every tensor packed through
  :func:`torch.autograd.graph.saved_tensors_hooks`, deduplicated by storage, counted from when it is
  saved until autograd releases it; parameter storages excluded). It is the activation memory of
  the step, deterministic, and independent of the allocator; solver work buffers created under
  ``no_grad`` (Anderson/Broyden history) are not in it, nor is anything allocated during backward.
  On CUDA also ``cuda_peak_mb``:
  ``torch.cuda.max_memory_allocated`` over one step (parameters, gradients and optimiser state
  included), after ``reset_peak_memory_stats``.
- **Inverse residual actually reached.** After a training-mode forward (untimed, separate from the
  timed steps), for every block the token mixer's implicit layer input x (= fc1 output) and output z
  are captured and the true relative residual ||x + g(z) - z|| / ||x + g(z)|| is recomputed per row
  (one row = one token-mixing problem) with the same normalised weights (g in eval mode, so the
  spectral norm reuses the power-iteration vectors of that forward). ``residual_max`` is the max over
  blocks and rows, ``residual_median`` the median over rows of the worst block; ``solver_residual_max``
  is what the solver itself reported (in reference mode that is the residual of the
  iterate before the last step, hence larger). Reference mode gets the same recomputation.
- **Inference.** Images per second in eval mode under ``no_grad`` (median of ``--repeats`` forwards),
  and the ratio to the vanilla mixer's throughput.
- **After training** (CPU; ``--trained-epochs``, default 5): ``vanilla``, ``default`` and
  ``reference-2`` trained on the digits 4 × 128 recipe of ``benchmarks/imixer_training.py``
  (``digits-hard``), their step timed at initialisation and after training side by side with the
  worst block's forward iterations (see :func:`trained_steps`): iteration counts grow with training.
- **IFT memory vs iterations.** ``saved_peak_mb`` for ``anderson/ift`` with tol 0 (every iteration
  runs) at max_iter 2 and 16, against ``reference-2`` and ``reference-16``: IFT should not grow,
  the reference loop grows linearly.

``--quick`` (the test's run, well under a minute on 2 CPU cores): only ``imixer_t4_32`` /
``mixer_t4_32`` at batch 4, the modes vanilla, default, reference-1/2, anderson/ift, picard/jfb and
broyden/phantom at tol 1e-3, 2 timed repeats, one torch thread (on a shared machine a second
process's threads make two-thread runs 10-40x slower in bursts), and the memory comparison on
t4_32. The full run uses all of torch's threads (``--threads`` overrides),
batch 32 for t4_32 and batch 8 for s16_224 (224x224) on CPU, 256 and 64 on CUDA (``--batch``
overrides), and every mode (``--modes`` selects some; vanilla always runs).

Usage: ``python benchmarks/imixer_step.py [--quick] [--device cpu|cuda] [--out DIR] [--repeats N]``.
Writes ``imixer_step.json`` and ``imixer_step.md`` into ``--out`` (default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import implicitlayers as il  # noqa: E402
from examples.imixer import imixer as imixer_model  # noqa: E402  (registers the imixer_* / mixer_t* timm models)

SOLVERS = ["broyden", "anderson", "picard"]
BACKWARDS = ["ift", "phantom", "jfb", "shine"]
TOLS = [1e-2, 1e-3, 1e-4]
REFERENCE_ITERATIONS = [1, 2, 3, 4, 8]
MAX_ITER = 30
# Batch per size on CPU and on CUDA (a GPU needs larger batches to be busy at all).
SIZES = {
    "t4_32": {"img_size": 32, "batch": 32, "cuda_batch": 256},
    "s16_224": {"img_size": 224, "batch": 8, "cuda_batch": 64},
}
QUICK_MODES = [
    "vanilla",
    "default",
    "reference-1",
    "reference-2",
    "anderson/ift@0.001",
    "picard/jfb@0.001",
    "broyden/phantom@0.001",
]
MB = 2**20


# ------------------------------------------------------------------------------------ modes
def all_modes() -> list[str]:
    modes = ["vanilla", "default"] + [f"reference-{n}" for n in REFERENCE_ITERATIONS]
    # SHINE reads the forward solver's quasi-Newton memory, which Picard does not keep.
    modes += [
        f"{s}/{b}@{tol:g}"
        for tol in TOLS
        for s in SOLVERS
        for b in BACKWARDS
        if not (b == "shine" and not il.as_solver(s).keeps_memory)
    ]
    return modes


def mode_kwargs(mode: str) -> dict[str, Any]:
    """create_model keyword arguments of an iMixer mode (not ``vanilla``); ``default``: the library's."""
    if mode == "default":
        return {}
    if mode.startswith("reference-"):
        return {"reference_iterations": int(mode.removeprefix("reference-"))}
    method, tol = mode.split("@")
    solver, backward = method.split("/")
    return {"solver": solver, "backward": backward, "tol": float(tol), "max_iter": MAX_ITER}


def build(size: str, mode: str, device: torch.device, **overrides: Any) -> nn.Module:
    torch.manual_seed(0)
    if mode == "vanilla":
        net = timm.create_model(f"mixer_{size}", num_classes=10)
    else:
        net = timm.create_model(f"imixer_{size}", num_classes=10, **{**mode_kwargs(mode), **overrides})
    return net.to(device)


# ----------------------------------------------------------------------------------- measures
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(net(images), labels)
    loss.backward()
    optimizer.step()


def median_seconds(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        train_step(net, optimizer, images, labels)
    cuda_peak = None
    if device.type == "cuda":
        synchronize(device)
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

    seconds = median_seconds(forward, device, warmup, repeats)
    net.train()
    return images.shape[0] / seconds


def measure(size: str, mode: str, batch: int, device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    net = build(size, mode, device)
    generator = torch.Generator().manual_seed(1)
    img_size = SIZES[size]["img_size"]
    images = torch.randn(batch, 3, img_size, img_size, generator=generator).to(device)
    labels = torch.randint(0, 10, (batch,), generator=generator).to(device)
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    step_s = median_seconds(lambda: train_step(net, optimizer, images, labels), device, warmup, repeats)
    row: dict[str, Any] = {"model": f"{'mixer' if mode == 'vanilla' else 'imixer'}_{size}", "mode": mode}
    row["step_ms"] = 1e3 * step_s
    if mode == "vanilla":
        row.update(dict.fromkeys(["residual_max", "residual_median", "solver_residual_max", "nstep_mean"]))
        row.update(nstep_max=None, unconverged=None)
    else:
        row.update(inverse_residuals(net, images))
    row.update(step_memory(net, images, labels, device))
    row["images_per_s"] = inference_throughput(net, images, device, warmup, repeats)
    return row


TRAINED_MODES = {"vanilla": "mixer", "default": "imixer", "reference-2": "reference-2"}


def trained_steps(epochs: int, max_batches: int | None, warmup: int, repeats: int) -> dict[str, Any]:
    """The step at initialisation and after training, on the digits 4 × 128 recipe (CPU).

    Iteration counts grow as training moves the weights, so a step timed at initialisation understates
    what a solved mode costs later. Each of ``vanilla``, ``default`` and ``reference-2`` is trained for
    ``epochs`` epochs on ``digits-hard`` with the recipe, seed 0 and data order of
    ``benchmarks/imixer_training.py`` (its batch 64), and its training step on one fixed batch is timed
    before and after (median of ``repeats``, the weights restored after each timed step so that every
    repeat times the same step).
    """
    import imixer_training as training  # here: imixer_training imports this module

    options = argparse.Namespace(img_size=16, patch_size=2, lr=2e-3, weight_decay=0.05)
    task = training.Task("digits-hard", options.img_size)
    batch = 64
    steps_per_epoch = task.steps_per_epoch(batch, max_batches)
    images, labels = task.train_epoch(0, 0)
    images, labels = images[:batch], labels[:batch]
    rows = []
    for mode, preset in TRAINED_MODES.items():
        run = training.Run(mode, dict(training.PRESETS[preset]), 0, options, steps=epochs * steps_per_epoch)
        row: dict[str, Any] = {"mode": mode}
        for when in ("init", "trained"):
            if when == "trained":
                for epoch in range(1, epochs + 1):
                    run.train_epoch(*task.train_epoch(0, epoch), batch, max_batches)
            row[f"{when}_step_ms"] = 1e3 * _frozen_step_seconds(run, images, labels, warmup, repeats)
            layers = training.implicit_layers(run.net)
            row[f"{when}_nstep_max"] = max((float(layer.stats.nstep.max()) for layer in layers), default=None)
        rows.append(row)
        print(
            f"  trained {mode:12s} step {row['init_step_ms']:8.1f} ms at init, {row['trained_step_ms']:8.1f} ms "
            f"after {epochs} epochs",
            flush=True,
        )
    for row in rows:
        for when in ("init", "trained"):
            row[f"{when}_ratio_to_vanilla"] = row[f"{when}_step_ms"] / rows[0][f"{when}_step_ms"]
    return {"task": "digits-hard", "epochs": epochs, "batch": batch, "max_batches": max_batches, "rows": rows}


def _frozen_step_seconds(run: Any, images: Tensor, labels: Tensor, warmup: int, repeats: int) -> float:
    """Median seconds of one training step (forward, backward, AdamW) that leaves the run unchanged."""
    saved = {k: v.clone() for k, v in run.net.state_dict().items()}
    optimizer = torch.optim.AdamW(run.net.parameters(), lr=1e-3)
    run.net.train()

    def step() -> None:
        train_step(run.net, optimizer, images, labels)
        run.net.load_state_dict(saved)

    seconds = median_seconds(step, torch.device("cpu"), warmup, repeats)
    for parameter in run.net.parameters():
        parameter.grad = None
    return seconds


def memory_growth(size: str, batch: int, device: torch.device) -> dict[str, Any]:
    """saved_peak_mb of anderson/ift (tol 0) and the reference loop at 2 and 16 iterations."""
    img_size = SIZES[size]["img_size"]
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, img_size, img_size, generator=generator).to(device)
    labels = torch.randint(0, 10, (batch,), generator=generator).to(device)
    out: dict[str, Any] = {"model": f"imixer_{size}", "batch": batch, "ift": {}, "reference": {}}
    for n in (2, 16):
        ift = build(size, f"anderson/ift@{0:g}", device, max_iter=n)
        out["ift"][str(n)] = step_memory(ift, images, labels, device)
        out["ift"][str(n)]["nstep_max"] = max(s["nstep_max"] for s in ift.solver_stats())
        out["reference"][str(n)] = step_memory(build(size, f"reference-{n}", device), images, labels, device)
    for kind in ("ift", "reference"):
        out[kind]["growth_16_over_2"] = out[kind]["16"]["saved_peak_mb"] / out[kind]["2"]["saved_peak_mb"]
    return out


def equal_residual(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each solved mode against the cheapest reference mode at least as accurate.

    "At least as accurate" means a ``residual_max`` no larger than the solved mode's; the cheapest such
    reference mode is the one with the fewest iterations. Ratios below 1 mean the solved mode is
    faster (``step_ratio``) or has more throughput than the reference (``throughput_ratio`` above 1).
    """
    references = sorted(
        (row for row in rows if row["mode"].startswith("reference-")), key=lambda row: int(row["mode"].split("-")[1])
    )
    comparisons = []
    for row in rows:
        if row["mode"] == "vanilla" or row["mode"].startswith("reference-"):
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


# ------------------------------------------------------------------------------------- report
def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
    return info


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    info = results["machine"]
    lines = [
        f"# iMixer training step ({info['date_utc']} UTC, {info['device_name']}, {info['device']}, "
        f"{info['cpu_count']} CPUs, {info['torch_threads']} threads, torch {info['torch']})",
        "",
    ]
    cuda = info["device"].startswith("cuda")
    for size, block in results["models"].items():
        lines += [
            f"## {size}, batch {block['batch']} ({'quick' if results['config']['quick'] else 'full'} run)",
            "",
            "| model | mode | step ms | × vanilla | residual max | solver residual | iters mean/max | "
            "unconv. | saved peak MB" + (" | cuda peak MB" if cuda else "") + " | img/s | img/s × vanilla |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else "") + "---:|---:|",
        ]
        for row in block["rows"]:
            iters = "-" if row["nstep_mean"] is None else f"{row['nstep_mean']:.1f}/{row['nstep_max']:.0f}"
            cells = [
                row["model"],
                row["mode"],
                f"{row['step_ms']:.1f}",
                f"{row['step_ratio_to_vanilla']:.2f}",
                _fmt(row["residual_max"], ".2e"),
                _fmt(row["solver_residual_max"], ".2e"),
                iters,
                _fmt(row["unconverged"], ".2f"),
                f"{row['saved_peak_mb']:.1f}",
            ]
            if cuda:
                cells.append(_fmt(row["cuda_peak_mb"], ".1f"))
            cells += [f"{row['images_per_s']:.1f}", f"{row['throughput_ratio_to_vanilla']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            f"At equal inverse residual ({size}): each solved mode against the cheapest reference mode whose "
            "residual max is no larger (step < 1: faster; img/s > 1: more throughput).",
            "",
            "| mode | residual max | reference | its residual max | step × reference | img/s × reference |",
            "|---|---:|---|---:|---:|---:|",
        ]
        for comparison in block["equal_residual"]:
            lines.append(
                f"| {comparison['mode']} | {comparison['residual_max']:.2e} | {comparison['reference'] or 'none'} | "
                f"{_fmt(comparison['reference_residual_max'], '.2e')} | {_fmt(comparison['step_ratio'], '.2f')} | "
                f"{_fmt(comparison['throughput_ratio'], '.2f')} |"
            )
        lines.append("")
    growth = results["memory_growth"]
    lines += [
        f"## Saved-tensor peak vs iterations ({growth['model']}, batch {growth['batch']})",
        "",
        "| mode | max_iter 2 (MB) | max_iter 16 (MB) | 16 / 2 |",
        "|---|---:|---:|---:|",
    ]
    for kind, label in (("ift", "anderson/ift, tol 0"), ("reference", "reference-n")):
        g = growth[kind]
        two, sixteen = g["2"]["saved_peak_mb"], g["16"]["saved_peak_mb"]
        lines.append(f"| {label} | {two:.2f} | {sixteen:.2f} | {g['growth_16_over_2']:.2f} |")
    trained = results.get("trained")
    if trained:
        lines += [
            "",
            f"## The step at initialisation and after {trained['epochs']} epochs ({trained['task']}, digits 4 × 128 "
            f"recipe, batch {trained['batch']}, CPU)",
            "",
            "| mode | step ms at init | × vanilla | worst block's iterations | step ms trained | × vanilla | "
            "worst block's iterations |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in trained["rows"]:
            lines.append(
                f"| {row['mode']} | {row['init_step_ms']:.1f} | {row['init_ratio_to_vanilla']:.2f} | "
                f"{_fmt(row['init_nstep_max'], '.0f')} | {row['trained_step_ms']:.1f} | "
                f"{row['trained_ratio_to_vanilla']:.2f} | {_fmt(row['trained_nstep_max'], '.0f')} |"
            )
    lines += ["", f"Total {results['seconds']:.1f} s."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints the markdown table, writes JSON and markdown; returns the results."""
    parser = argparse.ArgumentParser(description="iMixer training step / memory / throughput vs timm's Mixer.")
    parser.add_argument("--quick", action="store_true", help="t4_32 only, batch 4, seven modes, 2 repeats")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="output directory")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 2 quick, 5 full)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 1 quick, 2 full)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --quick)"
    )
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=None, help="model sizes to run")
    parser.add_argument("--modes", nargs="+", default=None, help="modes to run (default: all; vanilla always runs)")
    parser.add_argument("--batch", type=int, default=None, help="batch size for every model size")
    parser.add_argument(
        "--trained-epochs",
        type=int,
        default=None,
        help="epochs of the digits recipe before the after-training step (default 5; 1 of 3 batches with "
        "--quick; 0 skips; CPU only)",
    )
    args = parser.parse_args(argv)
    if args.trained_epochs is None:
        args.trained_epochs = 1 if args.quick else 5
    known = all_modes()
    unknown = [mode for mode in args.modes or [] if mode not in known]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; accepted: {known}")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    device = torch.device(args.device)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    repeats = args.repeats or (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    sizes = args.sizes or (["t4_32"] if args.quick else ["t4_32", "s16_224"])
    modes = QUICK_MODES if args.quick else all_modes()
    if args.modes:
        modes = ["vanilla"] + [mode for mode in args.modes if mode != "vanilla"]
    start = time.perf_counter()
    results: dict[str, Any] = {
        "config": {
            "quick": args.quick,
            "device": str(device),
            "repeats": repeats,
            "warmup": warmup,
            "max_iter": MAX_ITER,
            "modes": modes,
            "optimizer": "AdamW(lr=1e-3)",
            "memory_measure": "saved_peak_mb: peak bytes of distinct storages saved by autograd for backward "
            "(saved_tensors_hooks, parameters excluded); cuda_peak_mb: torch.cuda.max_memory_allocated",
            "residual_measure": "max over blocks and rows of ||x + g(z) - z|| / ||x + g(z)||, recomputed",
        },
        "machine": machine_info(device),
        "models": {},
    }
    info = results["machine"]
    print(
        f"{info['date_utc']} UTC | {info['platform']} | {info['cpu_count']} CPUs ({info['torch_threads']} threads) | "
        f"torch {info['torch']} | timm {info['timm']} | device {info['device']} ({info['device_name']})",
        flush=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", imixer_model.il.ConvergenceWarning)
        for size in sizes:
            batch = args.batch or (4 if args.quick else SIZES[size]["cuda_batch" if device.type == "cuda" else "batch"])
            rows = []
            for mode in modes:
                row = measure(size, mode, batch, device, warmup, repeats)
                rows.append(row)
                print(
                    f"  {row['model']:16s} {mode:22s} step {row['step_ms']:9.1f} ms  "
                    f"residual {_fmt(row['residual_max'], '.2e'):>9s}  {row['images_per_s']:8.1f} img/s",
                    flush=True,
                )
            vanilla = rows[0]
            for row in rows:
                row["step_ratio_to_vanilla"] = row["step_ms"] / vanilla["step_ms"]
                row["throughput_ratio_to_vanilla"] = row["images_per_s"] / vanilla["images_per_s"]
            results["models"][size] = {
                "batch": batch,
                "img_size": SIZES[size]["img_size"],
                "rows": rows,
                "equal_residual": equal_residual(rows),
            }
        growth_size = "t4_32" if args.quick or "s16_224" not in sizes else "s16_224"
        growth_batch = results["models"][growth_size]["batch"] if growth_size in results["models"] else 4
        results["memory_growth"] = memory_growth(growth_size, growth_batch, device)
        if args.trained_epochs and device.type == "cpu":
            max_batches = 3 if args.quick else None
            results["trained"] = trained_steps(args.trained_epochs, max_batches, warmup, repeats)
    results["seconds"] = time.perf_counter() - start
    table = markdown(results)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "imixer_step.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    (out / "imixer_step.md").write_text(table + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
