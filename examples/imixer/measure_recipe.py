"""Measures the step rate of the single-GPU CIFAR-10 recipe (``imixer_t4_32`` / ``mixer_t4_32``) on this machine.

    python examples/imixer/measure_recipe.py                  # writes examples/imixer/recipes/cifar10_t4_32.json

It runs ``train.py``'s own pieces with the recipe's exact flags (``train.parse_args``, ``data.build_loaders``,
``build_model``, ``build_state``, then ``train_step`` and ``validate``) over a small CIFAR-10-format folder of
random 32×32 images written to a temporary directory, so it needs neither the real data set nor a download, on
the GPU when there is one and else on the CPU. Per model it records the median and mean seconds of a training
step (forward, loss, backward, clipping, optimiser, EMA — everything ``train_one_epoch`` does per batch) and of
loading a batch (the recipe's augmentation, in this process), the evaluation throughput, and the projection to
one CIFAR-10 epoch (50,000 training images, 10,000 validation images) and to the whole run *on this machine*.
Random images make the solver's iteration counts those of an untrained model on noise, not of CIFAR-10 in
training; the JSON says so. The record of the machine is :func:`examples.common.machine_info`'s.

The README's "Single-GPU CIFAR-10" section quotes the JSON this script writes; the commands it lists are
:func:`recipe_command` of :data:`RECIPE_FLAGS`.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.utils import random_seed

if __package__ in (None, ""):  # run as a script: import the package from the repository root instead
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from examples.common import OneLineArgumentParser, UsageError, int_range, load_average, machine_info
from examples.imixer import checkpoints, data, train

RECIPE = "cifar10_t4_32"
MODELS = ("imixer_t4_32", "mixer_t4_32")
# The recipe (train.py flags) apart from --model, --experiment and the data location.
RECIPE_FLAGS = [
    "--dataset", "torch/cifar10", "--epochs", "100", "-b", "128", "--opt", "adamw", "--lr", "1e-3",
    "--weight-decay", "0.05", "--sched", "cosine", "--warmup-epochs", "5", "--warmup-lr", "1e-6", "--min-lr", "1e-5",
    "--drop-path", "0.1", "--aa", "rand-m9-mstd0.5-inc1", "--scale", "0.35", "1", "--reprob", "0.25",
    "--smoothing", "0.1", "--mixup", "0.8", "--cutmix", "1.0", "--clip-grad", "5.0", "--amp", "-j", "8",
]  # fmt: skip
CIFAR10_TRAIN, CIFAR10_VAL = 50_000, 10_000
DEFAULT_OUT = Path(__file__).resolve().parent / "recipes" / f"{RECIPE}.json"


def recipe_command(model: str) -> str:
    """The README's command line for ``model``."""
    flags = " ".join(RECIPE_FLAGS)
    return (
        f"python examples/imixer/train.py --model {model} --data-dir data/cifar10 --dataset-download "
        f"{flags} --experiment cifar10-{model}"
    )


def write_cifar10_folder(root: Path, train_images: int, val_images: int, seed: int = 0) -> Path:
    """torchvision's ``cifar-10-batches-py`` layout holding random 32×32 images (5 training batches, 1 test batch).

    Args:
        root: Where to create ``cifar-10-batches-py``.
        train_images: Training images in all (split over the 5 batch files; a multiple of 5).
        val_images: Test images.
        seed: Seed of the pixels and labels.

    Returns:
        ``root`` (pass it as ``--data-dir``).
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def batch(count: int) -> dict[str, Any]:
        labels = rng.integers(0, 10, count).tolist()
        return {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8), "labels": labels, "batch_label": "noise"}

    files = {f"data_batch_{index}": batch(train_images // 5) for index in range(1, 6)}
    files["test_batch"] = batch(val_images)
    files["batches.meta"] = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": train_images // 5}
    for name, content in files.items():
        (folder / name).write_bytes(pickle.dumps(content))
    return root


def measure_model(model_name: str, flags: list[str], data_dir: Path, steps: int, warmup: int) -> dict[str, Any]:
    """Times ``steps`` real training steps of ``model_name`` (after ``warmup`` unmeasured ones) and one evaluation
    pass, with ``flags`` (the recipe's, and any such as ``--threads``) on ``data_dir`` (:func:`write_cifar10_folder`).

    Returns:
        Seconds per step (median, mean, each of the measured steps), seconds per batch of data loading, images per
        second, evaluation images per second and the projections to CIFAR-10.
    """
    argv = ["--model", model_name, *flags, "--data-dir", str(data_dir), "-j", "0"]
    args = train.parse_args(argv)
    runtime = train.Runtime(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    train.set_threads(args, runtime)
    random_seed(args.seed)
    loaders = data.build_loaders(args, runtime)
    model = train.build_model(args, loaders).to(runtime.device)
    state = train.build_state(args, model, len(loaders.train), runtime.device)
    mixup = train.build_mixup(args, loaders.num_classes)
    loss_fn = train.build_loss(args, mixup)
    model.train()
    step_seconds, data_seconds = [], []
    iterator = iter(loaders.train)
    for step in range(warmup + steps):
        start = time.perf_counter()
        try:
            images, target = next(iterator)
        except StopIteration:
            iterator = iter(loaders.train)
            images, target = next(iterator)
        loaded = time.perf_counter()
        train.train_step(runtime, state, images, target, loss_fn, mixup, step)  # steps the schedule too
        if runtime.device.type == "cuda":  # wait for the queued GPU work: the step's time is its own
            torch.cuda.synchronize(runtime.device)
        done = time.perf_counter()
        if step >= warmup:
            data_seconds.append(loaded - start)
            step_seconds.append(done - loaded)
    start = time.perf_counter()
    metrics = train.validate(args, model, loaders.val, runtime)
    eval_seconds = time.perf_counter() - start
    step_median = statistics.median(step_seconds)
    data_mean = statistics.fmean(data_seconds)
    steps_per_epoch = CIFAR10_TRAIN // args.batch_size
    eval_images_per_second = loaders.val_images / eval_seconds
    epoch_seconds = steps_per_epoch * (step_median + data_mean) + CIFAR10_VAL / eval_images_per_second
    result = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "implicit_settings": getattr(model, "implicit_settings", None),
        "train_step_seconds_median": step_median,
        "train_step_seconds_mean": statistics.fmean(step_seconds),
        "train_step_seconds": step_seconds,
        "data_seconds_per_step_mean": data_mean,
        "train_images_per_second": args.batch_size / step_median,
        "eval_images_per_second": eval_images_per_second,
        "cifar10_steps_per_epoch": steps_per_epoch,
        "projected_epoch_minutes": epoch_seconds / 60,  # steps × (step + data) + validation, on this machine
        "projected_run_hours": args.epochs * epoch_seconds / 3600,
    }
    if "val_fwd_iters_mean" in metrics:
        result["eval_forward_iterations_mean_on_noise"] = metrics["val_fwd_iters_mean"]
    return result


def measure(steps: int, warmup: int, threads: int | None, amp: bool = True, command: str = "") -> dict[str, Any]:
    """Measures both models; returns the JSON document (``command``: how it was invoked, for the record)."""
    flags = [flag for flag in RECIPE_FLAGS if amp or flag != "--amp"]
    flags += [] if threads is None else ["--threads", str(threads)]
    load_before = load_average()
    with tempfile.TemporaryDirectory() as folder:
        data_dir = write_cifar10_folder(Path(folder), train_images=640, val_images=256)
        models = {name: measure_model(name, flags, data_dir, steps, warmup) for name in MODELS}
    args, machine = train.parse_args(["--model", MODELS[0], *RECIPE_FLAGS]), machine_info()
    cuda = machine["device"].startswith("cuda")
    device = f"cuda: {machine['device_name']}" if cuda else "cpu (no GPU was available: GPU time not measured)"
    autocast = f"{'float16' if cuda else 'bfloat16'} (train.py --amp on {'CUDA' if cuda else 'CPU'})"
    return {
        "recipe": RECIPE,
        "commands": {name: recipe_command(name) for name in MODELS},
        "flags": RECIPE_FLAGS,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "img_size": 32,
        "amp": amp,
        "measured": {
            **machine,
            "device": device,
            "autocast": autocast if amp else "none (float32)",
            "command": command,
            "load_average_1min": {"before": load_before, "after": machine["load_average_1min"]},
            "steps_measured": steps,
            "warmup_steps": warmup,
            "data": "random 32x32 images in CIFAR-10 format (iteration counts are an untrained model's on noise)",
            "data_loading": "in the training process (-j 0); the recipe's -j 8 loads in parallel workers",
        },
        "models": models,
    }


def readme_table(document: dict[str, Any]) -> str:
    """The Markdown table of the README's "Single-GPU CIFAR-10" section, from the JSON :func:`measure` returns."""
    where = "GPU" if document["measured"]["device"].startswith("cuda") else "CPU"
    lines = [
        f"| model | s/step (median of {document['measured']['steps_measured']}) | train img/s | data s/step | "
        f"eval img/s | {where}: min/epoch | {where}: h for {document['epochs']} epochs |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, m in document["models"].items():
        lines.append(
            f"| `{model}` | {m['train_step_seconds_median']:.2f} | {m['train_images_per_second']:.0f} | "
            f"{m['data_seconds_per_step_mean']:.3f} | {m['eval_images_per_second']:.0f} | "
            f"{m['projected_epoch_minutes']:.1f} | {m['projected_run_hours']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit status 2 with one line on bad input."""
    parser = OneLineArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter, raise_errors=True
    )
    parser.add_argument("--steps", type=int_range(1), default=20, help="measured training steps per model")
    parser.add_argument("--warmup", type=int_range(0), default=3, help="unmeasured steps first")
    parser.add_argument("--threads", type=int_range(1), default=None, help="torch CPU threads (None: torch's)")
    parser.add_argument("--no-amp", action="store_true", help="measure float32 instead of the recipe's --amp")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON to write")
    try:
        args = parser.parse_args(argv)
        command = " ".join(["python examples/imixer/measure_recipe.py", *(sys.argv[1:] if argv is None else argv)])
        result = measure(args.steps, args.warmup, args.threads, amp=not args.no_amp, command=command)
    except (UsageError, data.DataError) as error:
        print(f"measure_recipe.py: error: {error}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    checkpoints.atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    for name, m in result["models"].items():
        print(f"{name}: {m['train_step_seconds_median']:.3f} s/step (batch {result['batch_size']}, "
              f"{m['train_images_per_second']:.0f} img/s), data {m['data_seconds_per_step_mean']:.3f} s/step, "
              f"eval {m['eval_images_per_second']:.0f} img/s -> {m['projected_epoch_minutes']:.1f} min/epoch, "
              f"{m['projected_run_hours']:.1f} h for {result['epochs']} epochs")  # fmt: skip
    print(f"measured on {result['measured']['device']}; wrote {args.out}\n\n{readme_table(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
