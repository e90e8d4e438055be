"""What the iMixer ``train.py`` records: solver statistics, per-step records, metrics files, TensorBoard, a plot.

* :class:`SolverMeter` accumulates each block's solver statistics (forward in training, backward in
  training, forward in evaluation) on the device and synchronises once when asked for the totals.
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

import torch
from torch import nn

from examples.imixer.checkpoints import atomic_write, atomic_write_text

__all__ = [
    "SOLVER_PHASES",
    "SolverMeter",
    "TensorBoardLog",
    "plot_training",
    "step_record",
    "tensorboard_available",
    "write_metrics",
]

# Phases of the solver statistics and the prefix of their metric names.
SOLVER_PHASES = {"forward": "fwd", "backward": "bwd", "eval": "val_fwd"}
# Per phase: [sum of iterations over rows, max iterations, max residual, unconverged rows, rows]
_SUM, _MAX_ITERS, _MAX_RESIDUAL, _UNCONVERGED, _ROWS = range(5)


def implicit_layers(model: nn.Module) -> list[nn.Module]:
    """The model's implicit layers, one per block (empty for the vanilla Mixer)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    layers = getattr(model, "implicit_layers", None)
    return list(layers()) if callable(layers) else []


class SolverMeter:
    """Per-block solver statistics accumulated on the device over many batches.

    Rows are the layer's solve rows (for the token mixer: batch × channels). Iterations are evaluations of
    F per row (``SolverResult.nstep``); a row is unconverged when its residual missed the tolerance. Reference
    mode (tolerance 0, a fixed number of steps) has no tolerance to miss: its rows count as converged, as in
    ``IMixer.solver_stats``.

    Args:
        blocks: Number of implicit layers.
        device: Where the running totals live.
    """

    def __init__(self, blocks: int, device: torch.device) -> None:
        self.blocks = blocks
        self.device = device
        self.totals = {phase: torch.zeros(blocks, 5, dtype=torch.float64, device=device) for phase in SOLVER_PHASES}
        self.seen = dict.fromkeys(SOLVER_PHASES, False)

    def add(self, model: nn.Module, phase: str) -> None:
        """Adds the last forward's (``forward``/``eval``) or backward's (``backward``) statistics."""
        for index, layer in enumerate(implicit_layers(model)):
            result = layer.backward_stats if phase == "backward" else layer.stats
            if result is None:
                continue
            nstep = result.nstep.reshape(-1).to(torch.float64)
            # A fixed budget (the reference loop, tol 0) ran what it was asked: Status.budget, no failure.
            unconverged = (~result.succeeded).reshape(-1).sum().to(torch.float64)
            row = self.totals[phase][index]
            row[_SUM] += nstep.sum()
            row[_MAX_ITERS] = torch.maximum(row[_MAX_ITERS], nstep.max())
            row[_MAX_RESIDUAL] = torch.maximum(row[_MAX_RESIDUAL], result.residual.detach().max().to(torch.float64))
            row[_UNCONVERGED] += unconverged
            row[_ROWS] += nstep.numel()
            self.seen[phase] = True

    def reduce(self, distributed: bool) -> None:
        """Sums (and maxes) the totals over DDP processes, for evaluation over a sharded validation set."""
        if not distributed:
            return
        import torch.distributed as dist

        for phase, totals in self.totals.items():
            sums = totals[:, [_SUM, _UNCONVERGED, _ROWS]].contiguous()
            maxes = totals[:, [_MAX_ITERS, _MAX_RESIDUAL]].contiguous()
            dist.all_reduce(sums)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
            totals[:, [_SUM, _UNCONVERGED, _ROWS]] = sums
            totals[:, [_MAX_ITERS, _MAX_RESIDUAL]] = maxes
            seen = torch.tensor([1.0 if self.seen[phase] else 0.0], device=self.device)
            dist.all_reduce(seen, op=dist.ReduceOp.MAX)
            self.seen[phase] = bool(seen.item())

    def metrics(self, phases: Sequence[str]) -> dict[str, float]:
        """Flat metrics for ``phases``: per block ``<p>_iters_b<i>`` (mean), ``<p>_iters_max_b<i>``,
        ``<p>_residual_max_b<i>``, ``<p>_unconverged_b<i>`` (fraction of rows), and over the blocks
        ``<p>_iters_mean`` (mean of block means), ``<p>_iters_max``, ``<p>_residual_max``, ``<p>_unconverged``
        (largest block fraction), where ``<p>`` is ``fwd``, ``bwd`` or ``val_fwd``. One synchronisation."""
        out: dict[str, float] = {}
        for phase in phases:
            if not self.seen[phase]:
                continue
            prefix = SOLVER_PHASES[phase]
            table = self.totals[phase].tolist()
            used = [(index, row) for index, row in enumerate(table) if row[_ROWS] > 0]
            for index, row in used:
                out[f"{prefix}_iters_b{index}"] = row[_SUM] / row[_ROWS]
                out[f"{prefix}_iters_max_b{index}"] = row[_MAX_ITERS]
                out[f"{prefix}_residual_max_b{index}"] = row[_MAX_RESIDUAL]
                out[f"{prefix}_unconverged_b{index}"] = row[_UNCONVERGED] / row[_ROWS]
            out[f"{prefix}_iters_mean"] = sum(row[_SUM] / row[_ROWS] for _, row in used) / len(used)
            out[f"{prefix}_iters_max"] = max(row[_MAX_ITERS] for _, row in used)
            out[f"{prefix}_residual_max"] = max(row[_MAX_RESIDUAL] for _, row in used)
            out[f"{prefix}_unconverged"] = max(row[_UNCONVERGED] / row[_ROWS] for _, row in used)
        return out


def step_record(
    *,
    epoch: int,
    epochs: int,
    step: int,
    steps: int,
    loss: float,
    loss_avg: float,
    lr: float,
    seconds_per_step: float,
    images_per_second: float,
    solver: dict[str, float],
) -> str:
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

    Rewriting from the checkpointed history means a resumed run never repeats or loses an epoch's line.
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
    """Draws loss, top-1 and (for iMixers) each block's solver iterations per epoch into a PNG.

    Args:
        history: The per-epoch metrics.
        path: The PNG (written atomically).
        title: The figure title.

    Returns:
        False when matplotlib is not installed (nothing written), else True.
    """
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
        for colour, block in zip(colours, blocks, strict=True):
            for prefix, style, _ in styles:
                key = f"{prefix}_iters_b{block}"
                if any(key in entry for entry in history):
                    axes[2].plot(epochs, _series(history, key), style, color=colour, marker=".")
        for colour, block in zip(colours, blocks, strict=True):  # legend entries: blocks by colour, phase by style
            axes[2].plot([], [], "-", color=colour, label=f"block {block}")
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
