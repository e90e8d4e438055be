"""What the iMixer ``train.py`` records: the lines it prints, metrics files, TensorBoard, a plot.

The solver statistics they report are :class:`examples.imixer.engine.SolverMeter`'s.

* :func:`describe_model`, :func:`epoch_line` and :func:`solver_line` are the lines printed at the start, after
  each epoch and by ``--eval-only``.
* :func:`step_record` is the one-line progress record printed every ``--log-interval`` steps when the output
  is not a terminal (nohup, SLURM), in the spirit of timm's ``Train: epoch [step/steps (pct)] Loss ...``.
* :func:`write_metrics` rewrites ``metrics.jsonl`` and ``metrics.csv`` from the run's history.
* :class:`TensorBoardLog` writes scalars under ``tensorboard/`` when ``--tensorboard`` asks for it.
* :func:`plot_training` draws ``training.png``: loss, top-1 and each block's solver iterations per epoch.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

import implicitlayers as il
from examples.imixer.checkpoints import atomic_write, atomic_write_text


def describe_model(model: nn.Module) -> str:
    """One line naming the model's size and its token-mixer settings."""
    text = f"{sum(p.numel() for p in model.parameters()):,} parameters"
    settings = getattr(model, "implicit_settings", None)
    if settings:
        keys = ("solver", "backward", "tol", "max_iter", "coeff", "n_power_iterations", "hidden_ratio")
        text += ", token mixer: " + ", ".join(f"{key}={settings[key]}" for key in keys)
        if settings["reference_iterations"] is not None:
            text += f", reference_iterations={settings['reference_iterations']}"
        text += f" (Lipschitz bound of F: {il.lipschitz_bound(model.implicit_layers()[0].g):.3f})"
    return text


def epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    """The line printed after each epoch: loss, top-1, time, throughput and (for iMixers) solver iterations."""
    line = (f"epoch {metrics['epoch']:3d}/{epochs}  loss {metrics['train_loss']:.4f}  "
            f"val top-1 {metrics['val_top1']:6.2f}%  {metrics['epoch_seconds']:.1f}s  "
            f"{metrics['images_per_second']:.0f} img/s")  # fmt: skip
    if "fwd_iters_mean" in metrics:
        for label, prefix in (("fwd iters", "fwd"), ("bwd", "bwd"), ("val", "val_fwd")):
            if f"{prefix}_iters_mean" in metrics:
                line += f"  {label} {metrics[f'{prefix}_iters_mean']:.1f}/{metrics[f'{prefix}_iters_max']:.0f}"
        line += f"  unconverged {metrics['fwd_unconverged']:.1%}"
    return line


def solver_line(metrics: dict[str, Any], prefix: str) -> str:
    """``iterations mean/max 4.0/6 (per block 4.0/5 3.9/6 ...) ...`` for one phase's metrics (empty for the Mixer)."""
    if f"{prefix}_iters_mean" not in metrics:
        return ""
    blocks = sorted(int(key.rsplit("_b", 1)[1]) for key in metrics if key.startswith(f"{prefix}_iters_b"))
    per_block = " ".join(f"{metrics[f'{prefix}_iters_b{b}']:.1f}/{metrics[f'{prefix}_iters_max_b{b}']:.0f}"
                         for b in blocks)  # fmt: skip
    return (f"iterations mean/max {metrics[f'{prefix}_iters_mean']:.1f}/{metrics[f'{prefix}_iters_max']:.0f} "
            f"(per block {per_block}), unconverged {metrics[f'{prefix}_unconverged']:.1%}, "
            f"max residual {metrics[f'{prefix}_residual_max']:.2e}")  # fmt: skip


def step_record(
    *, epoch: int, epochs: int, step: int, steps: int, loss: float, loss_avg: float, lr: float,
    seconds_per_step: float, images_per_second: float, solver: dict[str, float],
) -> str:  # fmt: skip
    """One line of training progress (timm style), e.g.
    ``Train: 3/20 [  50/220 ( 23%)]  loss 0.812 (0.934)  lr 3.95e-03  0.081 s/step  1580 img/s  fwd 4.0/6  bwd 3.1/5``.

    ``loss`` is the last step's (of this process), ``loss_avg`` the epoch's running mean; iterations are the
    running mean/max over the epoch's steps so far, over all blocks.
    """
    line = (
        f"Train: {epoch}/{epochs} [{step:>{len(str(steps))}d}/{steps} ({100.0 * step / steps:3.0f}%)]  "
        f"loss {loss:#.4g} ({loss_avg:#.4g})  lr {lr:.3e}  {seconds_per_step:.3f} s/step  {images_per_second:.0f} img/s"
    )
    for prefix in ("fwd", "bwd"):
        if f"{prefix}_iters_mean" in solver:
            line += f"  {prefix} {solver[f'{prefix}_iters_mean']:.1f}/{solver[f'{prefix}_iters_max']:.0f}"
    return line


def _columns(history: Sequence[dict[str, Any]]) -> list[str]:
    """Every key of the history, in order of first appearance (EMA and solver keys appear in some runs only)."""
    columns: dict[str, None] = {}
    for entry in history:
        columns.update(dict.fromkeys(entry))
    return list(columns)


def write_metrics(run_dir: Path, history: Sequence[dict[str, Any]]) -> None:
    """Rewrites ``metrics.jsonl`` (one JSON object per epoch) and ``metrics.csv`` (one row per epoch, a column
    per key; empty where an epoch lacks one) from the whole history, each atomically.

    Rewriting from the checkpointed history means a resumed run never repeats or loses an epoch's line. timm's
    ``update_summary`` appends a row per call, in place (a run resumed from a checkpoint older than the file's
    last row would repeat epochs, and a crash mid-write tears the file), under its own ``train_``/``eval_`` names.
    """
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(entry) + "\n" for entry in history))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(history), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run_dir / "metrics.csv", buffer.getvalue())


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package (needed by ``torch.utils.tensorboard``) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
    """Scalars per epoch under ``<run>/tensorboard`` (``train/``, ``val/``, ``solver/`` groups).

    Args:
        run_dir: The run folder.
    """

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def add_epoch(self, metrics: dict[str, Any]) -> None:
        """Writes the epoch's numeric metrics at step ``metrics["epoch"]``."""
        epoch = int(metrics["epoch"])
        for key, value in metrics.items():
            if key == "epoch" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            group = "solver" if key.startswith(("fwd_", "bwd_", "val_fwd_", "solver_")) else key.split("_")[0]
            self.writer.add_scalar(f"{group}/{key}", value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def plot_training(history: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    """Draws loss, top-1 and (for iMixers) each block's solver iterations per epoch of ``history`` into the PNG
    ``path`` (atomically) under ``title``; returns False, writing nothing, when matplotlib is not installed."""
    if not history or importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [entry["epoch"] for entry in history]
    blocks = sorted({int(key.rsplit("_b", 1)[1]) for entry in history for key in entry if _is_block_iters(key)})
    panels = 3 if blocks else 2
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8), layout="constrained")
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        axes[0].plot(epochs, _series(history, key), marker=".", label=label)
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
    for key, label in (("train_top1", "train"), ("val_top1", "val"), ("ema_val_top1", "val (EMA)")):
        if any(key in entry for entry in history):
            axes[1].plot(epochs, _series(history, key), marker=".", label=label)
    axes[1].set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
    if blocks:
        colours = plt.get_cmap("viridis")([0.9 * index / max(len(blocks) - 1, 1) for index in range(len(blocks))])
        styles = (("fwd", "-", "train forward"), ("bwd", "--", "train backward"), ("val_fwd", ":", "eval forward"))
        for colour, block in zip(colours, blocks, strict=True):  # legend: blocks by colour, phases by style
            axes[2].plot([], [], "-", color=colour, label=f"block {block}")
            for prefix, style, _ in styles:
                key = f"{prefix}_iters_b{block}"
                if any(key in entry for entry in history):
                    axes[2].plot(epochs, _series(history, key), style, color=colour, marker=".")
        for prefix, style, label in styles:
            if any(f"{prefix}_iters_b{blocks[0]}" in entry for entry in history):
                axes[2].plot([], [], style, color="grey", label=label)
        axes[2].set(xlabel="epoch", ylabel="iterations per solve (mean)", title="solver iterations per block")
    for axis in axes:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(title, fontsize="medium")
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
    return True


def _is_block_iters(key: str) -> bool:
    head, _, block = key.rpartition("_b")
    return block.isdigit() and head in ("fwd_iters", "bwd_iters", "val_fwd_iters")


def _series(history: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(entry[key]) if key in entry and entry[key] is not None else math.nan for entry in history]
