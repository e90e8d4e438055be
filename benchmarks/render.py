"""Every table the benchmarks print, rendered from their JSON alone: no torch, no benchmark import.

The benchmark scripts call these renderers on the results they have just written, and
``docs/scripts/benchmark_tables.py`` and ``docs/scripts/digits_runs.py`` call them on the checked-in JSON,
so a published table is a function of its JSON (``tests/test_docs_numbers.py`` re-renders each one).
Matplotlib is imported only by :func:`plot_training`.

**Which training configuration is the library's default.** ``imixer_training`` records, per
configuration, ``is_default``: whether ``IMixerSettings`` built from its options equals
``IMixerSettings()`` (computed when the benchmark ran, with the settings of that code), and the
results record those defaults under ``defaults``. :func:`default_config` trusts ``is_default``; a JSON
written before that field existed falls back to a configuration whose options are empty (the defaults
of its day, by construction). Nothing here reads the model's source.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

OURS = ("picard", "anderson", "broyden")
PAIRS = {"picard": "torchdeq.fixed_point_iter", "anderson": "torchdeq.anderson", "broyden": "torchdeq.broyden"}
VANILLA = ("vanilla", "mixer")  # the vanilla Mixer's row: its name before and after the one vocabulary
EPOCHS_SHOWN = (1, 5, 10, 15, 20)  # digits runs: the epochs whose largest iteration count is listed


def fmt(value: Any, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items()) or "defaults"


# ------------------------------------------------------------------------------ imixer_step
def step_markdown(results: dict[str, Any]) -> str:
    """The step benchmark's tables: per size the modes, the equal-residual pairs; memory growth; trained."""
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
            if cuda:
                cells.append(fmt(row["cuda_peak_mb"], ".1f"))
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
        for c in block["equal_residual"]:
            lines.append(
                f"| {c['mode']} | {c['residual_max']:.2e} | {c['reference'] or 'none'} | "
                f"{fmt(c['reference_residual_max'], '.2e')} | {fmt(c['step_ratio'], '.2f')} | "
                f"{fmt(c['throughput_ratio'], '.2f')} |"
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
                f"{fmt(row['init_nstep_max'], '.0f')} | {row['trained_step_ms']:.1f} | "
                f"{row['trained_ratio_to_vanilla']:.2f} | {fmt(row['trained_nstep_max'], '.0f')} |"
            )
    lines += ["", f"Total {results['seconds']:.1f} s."]
    return "\n".join(lines)


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


def summarise(runs: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Per configuration, means (± sample std over seeds) of the training table's quantities."""
    by_config = {name: [run for run in runs if run["config"] == name] for name in names}
    rows = []
    for name, config_runs in by_config.items():
        epochs = len(config_runs[0]["epochs"]) - 1
        first, last = [run["epochs"][0] for run in config_runs], [run["epochs"][-1] for run in config_runs]
        row: dict[str, Any] = {"config": name, "seeds": len(config_runs), "epochs": epochs}
        row["val_top1_mean"], row["val_top1_std"] = mean_std([e["val_top1"] for e in last])
        row["train_seconds_per_epoch"] = statistics.fmean(seconds_by_seed(config_runs, name).values()) / max(epochs, 1)
        row["ratio_to_mixer_mean"], row["ratio_to_mixer_std"] = mean_std(per_seed_ratios(runs, name, "mixer"))
        quantities = {
            "eval_fwd_max_init": (first, "eval_forward", "nstep_max"),
            "eval_fwd_max_end": (last, "eval_forward", "nstep_max"),
            "train_fwd_mean_end": (last, "train_forward", "nstep_mean"),
            "train_fwd_max_mean_end": (last, "train_forward", "nstep_max_mean"),
            "train_fwd_max_end": (last, "train_forward", "nstep_max"),
            "bwd_mean_end": (last, "backward", "nstep_mean"),
            "bwd_max_end": (last, "backward", "nstep_max"),
            "inverse_residual_init": (first, "diagnostics", "inverse_residual_max"),
            "inverse_residual_end": (last, "diagnostics", "inverse_residual_max"),
            "inverse_error_end": (last, "diagnostics", "inverse_error_max"),
            "spectral_radius_init": (first, "diagnostics", "spectral_radius_max"),
            "spectral_radius_end": (last, "diagnostics", "spectral_radius_max"),
            "lipschitz_bound_end": (last, "diagnostics", "lipschitz_bound"),
            "lipschitz_weights_end": (last, "diagnostics", "lipschitz_weights"),
        }
        for key, (records, part, quantity) in quantities.items():
            row[key] = mean_std([worst(e[part], quantity) for e in records])[0]
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
        ]
        for row in task["summary"]:
            train_fwd = "-"
            if row["train_fwd_mean_end"] is not None:
                train_fwd = (
                    f"{row['train_fwd_mean_end']:.2f} / {row['train_fwd_max_mean_end']:.2f}, "
                    f"{row['train_fwd_max_end']:.1f}"
                )
            cells = [
                row["config"],
                options_text(options[row["config"]]),
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
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Total {results['seconds']:.0f} s."]
    return "\n".join(lines)


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
    """The name of the training task's configuration that ran the library's defaults (module docstring)."""
    configs = task["configs"]
    if any("is_default" in config for config in configs):
        found = [config["name"] for config in configs if config.get("is_default")]
    else:  # written before configurations recorded it: empty options were the defaults of that code
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


TRAINING_PANELS = [
    ("val top-1 (%)", lambda e: e["val_top1"], "linear"),
    (
        "train fwd iterations, worst block\n(mean over forwards of the slowest row)",
        lambda e: worst(e["train_forward"], "nstep_max_mean"),
        "linear",
    ),
    (
        "bwd iterations, worst block\n(mean over backwards of the slowest row)",
        lambda e: worst(e["backward"], "nstep_max_mean"),
        "linear",
    ),
    (
        "ρ(J_F(z*)) max over rows, worst block\n(dashed: Lipschitz bound of the weights)",
        lambda e: worst(e["diagnostics"], "spectral_radius_max"),
        "linear",
    ),
    (
        "inverse residual ‖z − x − F(z)‖/‖z‖\n(max over rows, worst block)",
        lambda e: worst(e["diagnostics"], "inverse_residual_max"),
        "log",
    ),
    ("train loss", lambda e: e["train_loss"], "linear"),
]


def plot_training(task: dict[str, Any], path: Path) -> None:
    """Six panels per epoch, one line per configuration (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = [config["name"] for config in task["configs"]]
    for ax, (title, value, scale) in zip(axes.flat, TRAINING_PANELS, strict=True):
        for index, name in enumerate(names):
            runs = [run for run in task["runs"] if run["config"] == name]
            color = colors[index % len(colors)]
            epochs, means = _curve(runs, value)
            if epochs:
                ax.plot(epochs, means, marker="o", ms=3, color=color, label=name)
            if title.startswith("ρ"):
                epochs, means = _curve(runs, lambda e: worst(e["diagnostics"], "lipschitz_weights"))
                if epochs:
                    ax.plot(epochs, means, ls="--", color=color, lw=1)
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
        ]
        for row in setting["modes"]:
            lines.append(
                f"| {row['mode']} | {row['relative_error']:.2e} | {row['cosine']:.5f} | "
                f"{1000 * row['backward_seconds']:.2f} | {row['time_ratio_to_ift']:.2f} |"
            )
        lines.append("")
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
    ]
    for row in results["modes"]:
        lines.append(
            f"| {row['mode']} | {row['relative_error']:.2e} | {row['cosine']:.4f} | "
            f"{1e3 * row['forward_seconds']:.1f} | {1e3 * row['backward_seconds']:.1f} | {row['backward_vs_ift']:.2f} |"
        )
    return "\n".join(lines) + "\n"


# When each kind of gradient mode is the one to pick (the editorial column of the choosing table).
PICK_WHEN = {
    "IFT": "the default: the gradient of the function evaluated, to the adjoint's tolerance; constant memory",
    "Shine": "the backward solve is the bottleneck; refinements move it towards the IFT's gradient",
    "Phantom": "an approximate gradient from a few damped steps; its cost grows with them (see its rows)",
    "JFB": "one backward through f at z*; the gradient is only a descent direction",
}


def choosing_table(results: dict[str, Any]) -> str:
    """ "Choosing a gradient mode": each mode's exactness, error and backward cost on the trained iMixer of
    ``backward --problem imixer`` (its JSON), what it supports, and when to pick it."""
    lines = [
        "| mode | exact? | ‖g − g*‖ / ‖g*‖ | backward × IFT | supports | pick it when |",
        "|---|---|---:|---:|---|---|",
    ]
    for row in results["modes"]:
        exact = "yes, to the adjoint's tolerance" if row["solved_exactly"] else "no: approximate"
        supports, pick = row["transforms"], PICK_WHEN.get(row["kind"], "")
        if row["kind"] == "IFT" and not row["solved_exactly"]:  # a capped adjoint solve
            supports = "every order and every transform, each derivative as approximate as the capped adjoint"
            pick = "a fixed adjoint budget: cheaper, and further from the IFT's gradient as the contraction slows"
        lines.append(
            f"| `{row['settings']}` | {exact} | {row['relative_error']:.1e} | {row['backward_vs_ift']:.2f} "
            f"| {supports} | {pick} |"
        )
    settings = ", ".join(f"{key} {value}" for key, value in results["settings"].items())
    return (
        "\n".join(lines)
        + f"\n\n*The iMixer ({settings}) trained {results['epochs']} epochs on `{results['task']}`; one batch of "
        f"{results['batch']} images against the float64 gradient solved to 1e-10 / 1e-12; backward times are "
        f"medians of {results['repeats']}, relative to the IFT's, on {results['machine']['date_utc'][:10]} "
        f"(commit `{str(results['machine'].get('git_commit'))[:12]}`). `python -m benchmarks.backward --problem "
        "imixer --docs`.*\n"
    )


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
        lines.append(
            f"| {r['problem']} | {r['dtype']} | {r['solver']} | {r['success_rate']:.2f} | {r['nstep_median']:.0f} "
            f"| {r['nstep_max']} | {1e3 * r['time_median_s']:.2f} | {fmt(bwd, '.2f', '–')} "
            f"| {fmt(r['backward_success_rate'], '.2f', '–')} | {fmt(ratio.get('time_median_s'), '.2f', '–')} "
            f"| {fmt(ratio.get('backward_time_median_s'), '.2f', '–')} |"
        )
    return "\n".join(lines)


def solvers_summary(results: list[dict], pair_ratios: list[dict]) -> str:
    """One row per problem and dtype: success and forward-time ratio of each solver against TorchDEQ's."""
    success = {(r["problem"], r["dtype"], r["solver"]): r["success_rate"] for r in results}
    ratio_index = {(r["problem"], r["dtype"], r["ours"]): r["time_median_s"] for r in pair_ratios}
    cases = list(dict.fromkeys((r["problem"], r["dtype"]) for r in results))
    header, rule = "| problem | dtype |", "|---|---|"
    for ours in OURS:
        header += f" {ours} success (td) | {ours} time × td |"
        rule += "---:|---:|"
    lines = [header, rule]
    for problem, dtype in cases:
        cells = [problem, dtype]
        for ours in OURS:
            theirs = success.get((problem, dtype, PAIRS[ours]))
            cells.append(f"{success[(problem, dtype, ours)]:.2f} ({fmt(theirs, '.2f', '–')})")
            cells.append(fmt(ratio_index.get((problem, dtype, ours)), ".2f", "–"))
        lines.append("| " + " | ".join(cells) + " |")
    for ours in ("anderson", "broyden"):
        values = [r["time_median_s"] for r in pair_ratios if r["ours"] == ours and r["time_median_s"] is not None]
        at_least = sum(r["success_rate_diff"] >= 0 for r in pair_ratios if r["ours"] == ours)
        lines.append("")
        lines.append(
            f"{ours}: time ≤ 0.7× TorchDEQ's in {sum(v <= 0.7 for v in values)} of {len(values)} cases "
            f"(median ratio {statistics.median(values):.2f}, max {max(values):.2f}); success ≥ TorchDEQ's in "
            f"{at_least} of {sum(r['ours'] == ours for r in pair_ratios)}."
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- core_properties
def core_report(results: dict[str, Any]) -> str:
    """The core-properties report: P3, P4 and P7 with their verdicts."""
    p3, p4, p7 = results["p3_inverse"], results["p4_gradients"], results["p7_acceleration"]
    solvers = list(next(iter(p3["max_rel_error"].values())))
    lines = [
        f"P3 inverse accuracy (tol {p3['tol']:g}; max per-sample ||x' - x|| / ||x||; holds if <= {p3['threshold']:g})",
        f"  {'layer':<20} " + " ".join(f"{s:>10}" for s in solvers),
    ]
    for layer, per_solver in p3["max_rel_error"].items():
        lines.append(f"  {layer:<20} " + " ".join(f"{per_solver[s]:>10.2e}" for s in solvers))
    lines.append(f"  holds: {p3['holds']}")
    lines.append(
        f"\nP4 IFT gradients (tol {p4['tol']:g}) vs unrolled Picard ({p4['unrolled_steps']} steps) and closed form; "
        f"relative errors, holds if <= {p4['threshold']:g}"
    )
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
        lines.append(
            f"| {r['sigma']:g} | {r['cold_evaluations']} | {r['warm_evaluations']} | {r['evaluation_ratio']:.2f} "
            f"| {r['cold_seconds']:.3f} | {r['warm_seconds']:.3f} | {r['time_ratio']:.2f} |"
        )
    return "\n".join(lines)


# -------------------------------------------------------------------------------- digits runs
def reproduced(run: dict) -> bool:
    """Whether every repeat of a digits run gave the same accuracies and iteration counts (its raw record)."""
    each = run["deterministic_each"]
    return len(each) >= 2 and all(repeat == each[0] for repeat in each)


def digits_table(record: dict) -> str:
    """The Markdown table (and its caption) of ``docs/assets/imixer/digits_runs.json``."""
    m = record["machine"]
    lines = [
        "| run | `train.py` options | val top-1 % | training s "
        "| iterations mean / max, last epoch "
        f"| max iterations at epochs {', '.join(map(str, EPOCHS_SHOWN))} |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in record["runs"]:
        options = f"`{r['options']}`" if r["options"] else "(none)"
        if r["iters_max_final"] is None:
            iters, trend = "–", "–"
        else:
            iters = f"{r['iters_mean_final']:.1f} / {r['iters_max_final']:.0f}"
            by_epoch = r["iters_max_by_epoch"]
            trend = " → ".join(fmt(by_epoch[e - 1], ".0f", "–") for e in EPOCHS_SHOWN if e <= len(by_epoch))
        mark = "" if reproduced(r) else " (one run)" if len(r["deterministic_each"]) < 2 else " (not reproduced)"
        lines.append(
            f"| {r['label']}{mark} | {options} | {r['final_top1']:.2f} | {r['train_seconds']:.0f} | {iters} | {trend} |"
        )
    modified = ", with local changes" if m["code_modified"] else ""
    caption = (
        f"*`python examples/imixer/train.py` with each row's options (20 epochs, batch 128, AdamW "
        f"4e-3, one torch thread), {record['repeats']} interleaved runs of each on {m['cpus']} "
        f"shared CPU cores, {m['date_utc']}, "
        f"commit `{m['commit']}`{modified}, torch {m['torch']}, timm {m['timm']}. "
        "Generated by `docs/scripts/digits_runs.py` into `docs/assets/imixer/digits_runs.json`. "
        "Training seconds are the fastest run's epoch loop (training, validation, checkpoints), without process "
        "start-up and building the data set; on a shared "
        "machine they vary by tens of percent between runs"
        + (
            ", the accuracies and iteration counts (the same in every run) do not.*"
            if all(reproduced(r) for r in record["runs"])
            else "; a row marked *not reproduced* gave other accuracies or iteration counts in another repeat.*"
        )
    )
    return "\n".join(lines) + "\n\n" + caption + "\n"
