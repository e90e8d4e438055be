"""Where a training step's time goes: torch.profiler over iMixer / Mixer steps, top operators printed.

Profiles ``--steps`` training steps (forward + cross-entropy backward + AdamW step, after one warm-up
step) of each ``--modes`` entry, using the models and modes of ``benchmarks/imixer_step.py``
(``vanilla``, ``reference-n``, ``<solver>/<backward>@tol``), and prints per mode the operators with
the largest self time (CPU, and CUDA on a GPU), the number of operator calls per step, and the
step's wall time. This is the evidence behind the speed discussion in ``docs/benchmarks.md``: how many
operators a solved token mixer launches per iteration, and which of them cost time.

Usage: ``python benchmarks/profile_step.py [--size s16_224] [--modes vanilla anderson/ift@0.001]
[--device cpu|cuda] [--batch N] [--steps N] [--rows N] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import imixer_step  # the models, modes and training step of the step benchmark

DEFAULT_MODES = ["vanilla", "reference-4", "anderson/ift@0.001", "anderson/jfb@0.001"]


def profile_mode(size: str, mode: str, batch: int, device: torch.device, steps: int, rows: int) -> str:
    """The profiler table of ``steps`` training steps of one mode, with a one-line header."""
    net = imixer_step.build(size, mode, device)
    net.train()
    generator = torch.Generator().manual_seed(1)
    img_size = imixer_step.SIZES[size]["img_size"]
    images = torch.randn(batch, 3, img_size, img_size, generator=generator).to(device)
    labels = torch.randint(0, 10, (batch,), generator=generator).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    imixer_step.train_step(net, optimizer, images, labels)  # warm-up (allocator, optimiser state)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    imixer_step.synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            imixer_step.train_step(net, optimizer, images, labels)
        imixer_step.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    averages = prof.key_averages()
    calls = sum(event.count for event in averages) / steps
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    header = (
        f"## {size} {mode}, batch {batch}, {device}: {1e3 * seconds:.1f} ms per profiled step, "
        f"{calls:.0f} operator calls per step"
    )
    return header + "\n\n```text\n" + averages.table(sort_by=sort_by, row_limit=rows) + "\n```\n"


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="Top operators of iMixer training steps (torch.profiler).")
    parser.add_argument("--size", choices=sorted(imixer_step.SIZES), default="s16_224")
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: the step benchmark's batch for the device")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps per mode")
    parser.add_argument("--rows", type=int, default=15, help="operators listed per mode")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    known = imixer_step.all_modes()
    unknown = [mode for mode in args.modes if mode not in known]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; accepted: {known}")
    for name in ("steps", "rows", "threads", "batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = args.batch or imixer_step.SIZES[args.size]["cuda_batch" if device.type == "cuda" else "batch"]
    sections = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", imixer_step.imixer_model.il.ConvergenceWarning)
        for mode in args.modes:
            section = profile_mode(args.size, mode, batch, device, args.steps, args.rows)
            print(section, flush=True)
            sections.append(section)
    report = "\n".join(sections)
    if args.out:
        Path(args.out).write_text(report, encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
