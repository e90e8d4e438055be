"""Every table the benchmarks print, rendered from their JSON alone: no torch, no benchmark import.

The scripts print with these renderers and ``docs/scripts/`` renders the checked-in JSON with them, so a
published table is a function of its JSON (``tests/test_docs_numbers.py`` re-renders each one).
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

OURS = ("picard", "anderson", "broyden")
PAIRS = {"picard": "torchdeq.fixed_point_iter", "anderson": "torchdeq.anderson", "broyden": "torchdeq.broyden"}
GPU_KINDS = ("mixer", "reference-2", "imixer")  # the models benchmarks/gpu.py measures, by preset
VANILLA = ("vanilla", "mixer")  # the vanilla Mixer's row: its name before and after the one vocabulary


def fmt(value: Any, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items()) or "defaults"


def _row(*cells: Any) -> str:
    """A Markdown table row."""
    return "| " + " | ".join(map(str, cells)) + " |"


# ------------------------------------------------------------------------------ imixer_step
def step_markdown(results: dict[str, Any]) -> str:
    """The step benchmark's tables: per size the modes and the equal-residual pairs; the memory growth."""
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
            cells = [row["model"], row["mode"], f"{row['step_ms']:.1f}", f"{row['step_ratio_to_vanilla']:.2f}"]
            cells += [fmt(row["residual_max"], ".2e"), fmt(row["solver_residual_max"], ".2e"), iters]
            cells += [fmt(row["unconverged"], ".2f"), f"{row['saved_peak_mb']:.1f}"]
            cells += [fmt(row["cuda_peak_mb"], ".1f")] if cuda else []
            lines.append(_row(*cells, f"{row['images_per_s']:.1f}", f"{row['throughput_ratio_to_vanilla']:.2f}"))
        lines += [
            "",
            f"At equal inverse residual ({size}): each solved mode against the cheapest reference mode whose "
            "residual max is no larger (step < 1: faster; img/s > 1: more throughput).",
            "",
            "| mode | residual max | reference | its residual max | step × reference | img/s × reference |",
            "|---|---:|---|---:|---:|---:|",
        ]
        for c in block["equal_residual"]:
            lines.append(_row(c["mode"], f"{c['residual_max']:.2e}", c["reference"] or "none",
                              fmt(c["reference_residual_max"], ".2e"), fmt(c["step_ratio"], ".2f"),
                              fmt(c["throughput_ratio"], ".2f")))  # fmt: skip
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
        lines.append(_row(label, f"{two:.2f}", f"{sixteen:.2f}", f"{g['growth_16_over_2']:.2f}"))
    return "\n".join([*lines, "", f"Total {results['seconds']:.1f} s."])


# -------------------------------------------------------------------------- imixer_training
def worst(blocks: list[dict[str, Any]] | None, key: str) -> float | None:
    """Max of ``key`` over blocks (None when there are no blocks or no values)."""
    values = [block[key] for block in blocks or [] if block.get(key) is not None]
    return max(values) if values else None


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def seconds_by_seed(runs: list[dict[str, Any]], config: str) -> dict[int, float]:
    """The total training seconds of each seed's run of ``config``."""
    return {run["seed"]: sum(e["train_seconds"] for e in run["epochs"]) for run in runs if run["config"] == config}


def per_seed_ratios(runs: list[dict[str, Any]], config: str, baseline: str) -> list[float]:
    """``config``'s total training time over ``baseline``'s, seed by seed (both trained on the same batches)."""
    ours, theirs = seconds_by_seed(runs, config), seconds_by_seed(runs, baseline)
    return [ours[seed] / theirs[seed] for seed in ours if theirs.get(seed)]


# The training table's per-block quantities: summary key, epoch (0: the first, -1: the last), record part, key.
SUMMARY_QUANTITIES = [
    ("eval_fwd_max_init", 0, "eval_forward", "nstep_max"),
    ("eval_fwd_max_end", -1, "eval_forward", "nstep_max"),
    ("train_fwd_mean_end", -1, "train_forward", "nstep_mean"),
    ("train_fwd_max_mean_end", -1, "train_forward", "nstep_max_mean"),
    ("train_fwd_max_end", -1, "train_forward", "nstep_max"),
    ("bwd_mean_end", -1, "backward", "nstep_mean"),
    ("bwd_max_end", -1, "backward", "nstep_max"),
    ("inverse_residual_init", 0, "diagnostics", "inverse_residual_max"),
    ("inverse_residual_end", -1, "diagnostics", "inverse_residual_max"),
    ("inverse_error_end", -1, "diagnostics", "inverse_error_max"),
    ("spectral_radius_init", 0, "diagnostics", "spectral_radius_max"),
    ("spectral_radius_end", -1, "diagnostics", "spectral_radius_max"),
    ("lipschitz_bound_end", -1, "diagnostics", "lipschitz_bound"),
    ("lipschitz_weights_end", -1, "diagnostics", "lipschitz_weights"),
]


def summarise(runs: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Per configuration, means (± sample std over seeds) of the training table's quantities."""
    rows = []
    for name in names:
        config_runs = [run for run in runs if run["config"] == name]
        epochs = len(config_runs[0]["epochs"]) - 1
        row: dict[str, Any] = {"config": name, "seeds": len(config_runs), "epochs": epochs}
        row["val_top1_mean"], row["val_top1_std"] = mean_std([run["epochs"][-1]["val_top1"] for run in config_runs])
        row["train_seconds_per_epoch"] = statistics.fmean(seconds_by_seed(config_runs, name).values()) / max(epochs, 1)
        row["ratio_to_mixer_mean"], row["ratio_to_mixer_std"] = mean_std(per_seed_ratios(runs, name, "mixer"))
        for key, epoch, part, quantity in SUMMARY_QUANTITIES:
            row[key] = mean_std([worst(run["epochs"][epoch][part], quantity) for run in config_runs])[0]
        rows.append(row)
    return rows


def _pm(mean: float | None, std: float | None, spec: str) -> str:
    if mean is None:
        return "-"
    return f"{mean:{spec}} ± {std:{spec}}" if std is not None else f"{mean:{spec}}"


def _pair(a: float | None, b: float | None, spec: str, sep: str = " / ") -> str:
    return "-" if a is None and b is None else f"{fmt(a, spec)}{sep}{fmt(b, spec)}"


TRAINING_HEADER = (
    "| config | options | val top-1 % | train s / epoch | × mixer | eval fwd iters, worst block max: init → end "
    "| train fwd iters end: mean / slowest row (mean, max) | bwd iters end: mean / max "
    "| inverse residual: init → end | ‖z − z*‖ / ‖z*‖ end | ρ(J_F) max: init → end | Lip bound: certified / weights |"
)


def _training_row(row: dict[str, Any], options: dict[str, Any]) -> str:
    train_fwd = "-"
    if row["train_fwd_mean_end"] is not None:
        train_fwd = (
            f"{row['train_fwd_mean_end']:.2f} / {row['train_fwd_max_mean_end']:.2f}, {row['train_fwd_max_end']:.1f}"
        )
    return _row(
        row["config"],
        options_text(options),
        _pm(row["val_top1_mean"], row["val_top1_std"], ".2f"),
        fmt(row["train_seconds_per_epoch"], ".2f"),
        _pm(row["ratio_to_mixer_mean"], row["ratio_to_mixer_std"], ".2f"),
        _pair(row["eval_fwd_max_init"], row["eval_fwd_max_end"], ".1f", " → "),
        train_fwd,
        _pair(row["bwd_mean_end"], row["bwd_max_end"], ".2f"),
        _pair(row["inverse_residual_init"], row["inverse_residual_end"], ".2e", " → "),
        fmt(row["inverse_error_end"], ".2e"),
        _pair(row["spectral_radius_init"], row["spectral_radius_end"], ".3f", " → "),
        _pair(row["lipschitz_bound_end"], row["lipschitz_weights_end"], ".3f"),
    )


def training_markdown(results: dict[str, Any]) -> str:
    """The training benchmark's summary tables, one per task."""
    info, setup = results["machine"], results["config"]
    lines = [
        f"# iMixer training dynamics ({info['date_utc']} UTC, {info['cpu_count']} CPUs, "
        f"{info['torch_threads']} torch threads, torch {info['torch']}, timm {info['timm']})",
        "",
        f"Model: imixer_t4_32 / mixer_t4_32 with num_blocks 4, embed_dim 128, img_size {setup['img_size']}, "
        f"patch {setup['patch_size']}. Recipe: AdamW lr {setup['lr']:g} (one-cycle), weight decay "
        f"{setup['weight_decay']:g}, batch {setup['batch']}, label smoothing 0.1{' (quick)' if setup['quick'] else ''}"
        ". Val top-1 and ratios: mean ± std over "
        "seeds; iterations, residuals, ρ and bounds: worst block, mean over seeds; inverse residual = max over "
        "rows of ‖z − x − F(z)‖ / ‖z‖, z* = the float64 solve of z = x + F(z).",
    ]
    for task_name, task in results["tasks"].items():
        described = task["task"]
        options = {config["name"]: config["options"] for config in task["configs"]}
        lines += [
            "",
            f"## {task_name} ({described['n_train']} train / {described['n_val']} val images, "
            f"augmentation: {described['augmentation']}; {task.get('epochs', setup['epochs'])} epochs, "
            f"seeds {task.get('seeds', setup['seeds'])})",
            "",
            TRAINING_HEADER,
            "|" + "---|" * 2 + "---:|" * 10,
            *(_training_row(row, options[row["config"]]) for row in task["summary"]),
        ]
    return "\n".join([*lines, "", f"Total {results['seconds']:.0f} s."])


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One training results dict from several runs' (say, one task per run, each with its own epochs).

    The first run's machine and settings head the table; every task keeps its own epochs and seeds,
    and its ratios are those of its own run (measured side by side there). A task in several runs is
    taken from the last. Total seconds add up.
    """
    merged = copy.deepcopy(runs[0])
    for run in runs[1:]:
        for name, task in run["tasks"].items():
            merged["tasks"][name] = {"epochs": run["config"]["epochs"], "seeds": run["config"]["seeds"], **task}
        merged["seconds"] += run["seconds"]
    return merged


def default_config(task: dict[str, Any]) -> str:
    """The name of the training task's configuration that ran the library's defaults.

    ``imixer_training`` records per configuration ``is_default`` (its settings equal ``IMixerSettings()`` of the
    code that ran); a JSON from before that field falls back to empty options, the defaults of its day.
    """
    configs = task["configs"]
    if any("is_default" in config for config in configs):
        found = [config["name"] for config in configs if config.get("is_default")]
    else:
        found = [config["name"] for config in configs if config["options"] == {}]
    if not found:
        raise ValueError("the training run has no configuration with the library's default settings")
    return found[0]


def _curve(runs: list[dict[str, Any]], value: Callable[[dict[str, Any]], float | None]) -> tuple[list, list]:
    """Epochs and the mean over seeds of ``value(epoch record)`` where every seed has a value."""
    epochs, means = [], []
    for index in range(len(runs[0]["epochs"])):
        values = [value(run["epochs"][index]) for run in runs]
        if values and all(v is not None for v in values):
            epochs.append(runs[0]["epochs"][index]["epoch"])
            means.append(statistics.fmean(values))
    return epochs, means


# The training plot's panels: title, the epoch record's part (None: the record itself), its key, y scale.
TRAINING_PANELS = [
    ("val top-1 (%)", None, "val_top1", "linear"),
    ("train fwd iterations, worst block\n(mean over forwards of the slowest row)", "train_forward", "nstep_max_mean",
     "linear"),
    ("bwd iterations, worst block\n(mean over backwards of the slowest row)", "backward", "nstep_max_mean", "linear"),
    ("ρ(J_F(z*)) max over rows, worst block\n(dashed: Lipschitz bound of the weights)", "diagnostics",
     "spectral_radius_max", "linear"),
    ("inverse residual ‖z − x − F(z)‖/‖z‖\n(max over rows, worst block)", "diagnostics", "inverse_residual_max", "log"),
    ("train loss", None, "train_loss", "linear"),
]  # fmt: skip


def plot_training(task: dict[str, Any], path: Path) -> None:
    """Six panels per epoch, one line per configuration (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def value(part: str | None, key: str) -> Callable[[dict[str, Any]], float | None]:
        return lambda record: record[key] if part is None else worst(record[part], key)

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, part, key, scale) in zip(axes.flat, TRAINING_PANELS, strict=True):
        for index, config in enumerate(task["configs"]):
            runs = [run for run in task["runs"] if run["config"] == config["name"]]
            color = colors[index % len(colors)]
            curves = [(value(part, key), {"marker": "o", "ms": 3, "label": config["name"]})]
            if title.startswith("ρ"):
                curves.append((value("diagnostics", "lipschitz_weights"), {"ls": "--", "lw": 1}))
            for curve, style in curves:
                epochs, means = _curve(runs, curve)
                if epochs:
                    ax.plot(epochs, means, color=color, **style)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"iMixer training dynamics: {task['task']['name']} (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------- backward
def backward_mlp_markdown(results: list[dict[str, Any]]) -> str:
    """``backward --problem mlp``: one table per setting, mode, relative error, cosine, time and × ift."""
    lines = []
    for setting in results:
        lines += [
            f"**{setting['solver']}, ‖W‖₂ = {setting['coeff']}** (D = {setting['dim']}, B = {setting['batch']}, "
            f"forward tol 1e-4, {setting['modes'][0]['forward_nstep_max']} forward iterations)",
            "",
            "| gradient mode | relative error | cosine | backward ms (median) | × ift |",
            "|---|---|---|---|---|",
            *(
                _row(row["mode"], f"{row['relative_error']:.2e}", f"{row['cosine']:.5f}",
                     f"{1000 * row['backward_seconds']:.2f}", f"{row['time_ratio_to_ift']:.2f}")
                for row in setting["modes"]
            ),
            "",
        ]  # fmt: skip
    return "\n".join(lines)


def backward_imixer_markdown(results: dict[str, Any]) -> str:
    """``backward --problem imixer``: the modes on the trained iMixer, error, cosine, times."""
    machine = results["machine"]
    lines = [
        f"# Gradient modes on the trained iMixer ({machine['date_utc']} UTC, {machine['threads']} torch threads, "
        f"torch {machine['torch']})",
        "",
        f"Configuration `{options_text(results['options'])}` "
        f"({', '.join(f'{k} {v}' for k, v in results['settings'].items())}) trained {results['epochs']} epochs on "
        f"`{results['task']}` (seed {results['seed']}, the recipe of `imixer_training.py`); one training batch of "
        f"{results['batch']} images, model in eval mode. Exact: float64, forward to 1e-10, adjoint to 1e-12 "
        f"(all solves converged: {results['exact_solves_converged']}). Times: median of {results['repeats']}, "
        "whole model.",
        "",
        "| mode | ‖g − g*‖ / ‖g*‖ | cosine(g, g*) | forward ms | backward ms | backward × ift |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            _row(row["mode"], f"{row['relative_error']:.2e}", f"{row['cosine']:.4f}",
                 f"{1e3 * row['forward_seconds']:.1f}", f"{1e3 * row['backward_seconds']:.1f}",
                 f"{row['backward_vs_ift']:.2f}")
            for row in results["modes"]
        ),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- gpu
def gpu_markdown(results: dict[str, Any]) -> str:
    """``gpu.md``: the steps, the memory, residuals and operators, the solvers against TorchDEQ, the gradient modes."""
    info, config, steps = results["machine"], results["config"], results["steps"]
    modes = [mode for mode in ("eager", "compiled", "cudagraphs") if f"{mode}_ratio_to_mixer" in steps[0]]
    lines = [
        f"# The GPU run ({info['date_utc']} UTC, {info['device_name']}, commit {info['git_commit']}"
        f"{' with local changes' if info['git_dirty'] else ''}, torch {info['torch']}, timm {info['timm']}"
        f"{', quick' if config['quick'] else ''})",
        "",
        "Training steps of the iMixer with the library's defaults and of the reference loop (`reference-2`), against "
        f"timm's Mixer of the same shape run the same way (median of {config['repeats']} steps after warm-up; "
        f"torch.compile backend {config['backend']}; `cudagraphs`: mode `reduce-overhead`). Memory: what autograd "
        "saves in an eager step (and the device's peak on CUDA). Residual: the recomputed relative inverse residual, "
        "max over blocks and rows.",
        "",
        "| shape | batch | step | iMixer ms | × mixer | × reference-2 | compile s (iMixer) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in steps:
        lines += [f"| {r['shape']} | {r['batch']} | {mode} | {r[f'imixer_{mode}_step_ms']:.1f} | "
                  f"{r[f'{mode}_ratio_to_mixer']:.2f} | {r[f'{mode}_ratio_to_reference']:.2f} | "
                  f"{fmt(r[f'imixer_{mode}_compile_s'], '.1f', '–')} |" for mode in modes]  # fmt: skip
    lines += ["", "| shape | saved MB: mixer / reference-2 / iMixer | device peak MB | residual: iMixer / reference-2 "
              "| iters max | compiled step's operators: mixer / reference-2 / iMixer (× mixer) |",
              "|---|---|---|---|---:|---|"]  # fmt: skip
    for r in steps:
        saved = " / ".join(f"{r[f'{kind}_saved_peak_mb']:.1f}" for kind in GPU_KINDS)
        peak = " / ".join(fmt(r[f"{kind}_cuda_peak_mb"], ".0f", "–") for kind in GPU_KINDS)
        calls = " / ".join(str(r[f"{kind}_compiled_operator_calls"]) for kind in GPU_KINDS)
        lines.append(f"| {r['shape']} | {saved} | {peak} | {r['residual_max']:.2e} / {r['reference_residual_max']:.2e} "
                     f"| {r['nstep_max']:.0f} | {calls} ({r['operator_calls_ratio_to_mixer']:.2f}) |")  # fmt: skip
    lines += ["", "## Solvers against TorchDEQ (float32 tanh map, time ratio ours / theirs)", ""]
    if isinstance(results["solvers"], str):
        lines.append(f"Not run: {results['solvers']}.")
    else:
        lines += [
            "| ours | TorchDEQ | forward time × | backward time × | success difference |",
            "|---|---|---:|---:|---:|",
        ]
        for r in results["solvers"]:
            forward, adjoint = fmt(r["time_median_s"], ".2f", "–"), fmt(r["backward_time_median_s"], ".2f", "–")
            lines.append(f"| {r['ours']} | {r['torchdeq']} | {forward} | {adjoint} | {r['success_rate_diff']:+.2f} |")
    return "\n".join([*lines, "", "## Gradient modes", "", backward_mlp_markdown(results["backward"])])


# ------------------------------------------------------------------------------------ solvers
def solvers_table(results: list[dict], pair_ratios: list[dict]) -> str:
    """Every case: success, iterations, forward and backward times and the ratios to TorchDEQ."""
    ratio_index = {(r["problem"], r["dtype"], r["ours"]): r for r in pair_ratios}
    lines = [
        "| problem | dtype | solver | success | nstep med | nstep max | fwd ms (med) | bwd ms (med) | bwd success "
        "| fwd ratio ours/td | bwd ratio ours/td |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = ratio_index.get((r["problem"], r["dtype"], r["solver"]), {})
        bwd = None if r["backward_time_median_s"] is None else 1e3 * r["backward_time_median_s"]
        lines.append(_row(r["problem"], r["dtype"], r["solver"], f"{r['success_rate']:.2f}", f"{r['nstep_median']:.0f}",
                          r["nstep_max"], f"{1e3 * r['time_median_s']:.2f}", fmt(bwd, ".2f", "–"),
                          fmt(r["backward_success_rate"], ".2f", "–"), fmt(ratio.get("time_median_s"), ".2f", "–"),
                          fmt(ratio.get("backward_time_median_s"), ".2f", "–")))  # fmt: skip
    return "\n".join(lines)


def solvers_summary(results: list[dict], pair_ratios: list[dict]) -> str:
    """One row per problem and dtype: success and forward-time ratio of each solver against TorchDEQ's."""
    success = {(r["problem"], r["dtype"], r["solver"]): r["success_rate"] for r in results}
    ratio_index = {(r["problem"], r["dtype"], r["ours"]): r["time_median_s"] for r in pair_ratios}
    header = "| problem | dtype |" + "".join(f" {ours} success (td) | {ours} time × td |" for ours in OURS)
    lines = [header, "|---|---|" + "---:|---:|" * len(OURS)]
    for problem, dtype in dict.fromkeys((r["problem"], r["dtype"]) for r in results):
        cells = [problem, dtype]
        for ours in OURS:
            theirs = success.get((problem, dtype, PAIRS[ours]))
            cells.append(f"{success[(problem, dtype, ours)]:.2f} ({fmt(theirs, '.2f', '–')})")
            cells.append(fmt(ratio_index.get((problem, dtype, ours)), ".2f", "–"))
        lines.append(_row(*cells))
    for ours in ("anderson", "broyden"):
        values = [r["time_median_s"] for r in pair_ratios if r["ours"] == ours and r["time_median_s"] is not None]
        at_least = sum(r["success_rate_diff"] >= 0 for r in pair_ratios if r["ours"] == ours)
        lines += [
            "",
            f"{ours}: time ≤ 0.7× TorchDEQ's in {sum(v <= 0.7 for v in values)} of {len(values)} cases "
            f"(median ratio {statistics.median(values):.2f}, max {max(values):.2f}); success ≥ TorchDEQ's in "
            f"{at_least} of {sum(r['ours'] == ours for r in pair_ratios)}.",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- core_properties
def core_report(results: dict[str, Any]) -> str:
    """The core-properties report: P3, P4 and P7 with their verdicts."""
    p3, p4, p7 = results["p3_inverse"], results["p4_gradients"], results["p7_acceleration"]
    solvers = list(next(iter(p3["max_rel_error"].values())))
    lines = [
        f"P3 inverse accuracy (tol {p3['tol']:g}; max per-sample ||x' - x|| / ||x||; holds if <= {p3['threshold']:g})",
        f"  {'layer':<20} " + " ".join(f"{s:>10}" for s in solvers),
        *(f"  {layer:<20} " + " ".join(f"{errors[s]:>10.2e}" for s in solvers)
          for layer, errors in p3["max_rel_error"].items()),
        f"  holds: {p3['holds']}",
        f"\nP4 IFT gradients (tol {p4['tol']:g}) vs unrolled Picard ({p4['unrolled_steps']} steps) and closed form; "
        f"relative errors, holds if <= {p4['threshold']:g}",
    ]  # fmt: skip
    columns = ["vs_unrolled_params", "vs_unrolled_inputs", "vs_closed_form_params", "vs_closed_form_inputs"]
    lines.append(f"  {'gradient':<14} " + " ".join(f"{c:>22}" for c in columns))
    for name, row in p4["rel_error"].items():
        lines.append(f"  {name:<14} " + " ".join(f"{row[c]:>22.2e}" if c in row else f"{'-':>22}" for c in columns))
    lines.append(f"  holds: {p4['holds']}")
    lines.append(
        f"\nP7 slow problem (||W||_2 = 0.99, tol {p7['tol']:g}, {p7['samples']} samples): median evaluations of f; "
        f"holds if ratios <= {p7['max_ratio']:.3f}"
    )
    for name, median in p7["median_nstep"].items():
        ratio = p7["ratio_to_picard"].get(name)
        ratio_text = f"   ratio to picard {ratio:.3f}" if ratio is not None else ""
        lines.append(
            f"  {name:<17} median {median:>6.1f}   converged {p7['converged_fraction'][name]:>6.1%}{ratio_text}"
        )
    lines.append(f"  holds: {p7['holds']}")
    lines.append(f"\nall properties hold: {results['all_hold']}   ({results['seconds']:.1f} s)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- warm_start
def warm_start_table(results: dict[str, Any]) -> str:
    setup = results["config"]
    lines = [
        f"DEQ z = tanh(W z + U x), ||W|| = 0.95, D = {setup['dim']}, B = {setup['batch']}, {setup['frames']} frames, "
        "anderson tol 1e-5",
        "| σ | cold evaluations | warm evaluations | × | cold s | warm s | × |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        counts = [f"{r['sigma']:g}", r["cold_evaluations"], r["warm_evaluations"], f"{r['evaluation_ratio']:.2f}"]
        lines.append(_row(*counts, f"{r['cold_seconds']:.3f}", f"{r['warm_seconds']:.3f}", f"{r['time_ratio']:.2f}"))
    return "\n".join(lines)
