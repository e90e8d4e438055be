"""Run the iMixer digits trainings the docs quote and record what they measured.

Each run is ``python examples/imixer/train.py --output <work>/<key>-<i> --no-progress <options>``
(the default digits recipe: ``imixer_t2_8`` on scikit-learn's 8x8 digits, 20 epochs). Every setting
runs ``--repeats`` times, the settings interleaved, one run at a time on one machine; each time is
the fastest repeat's (all are kept), and ``deterministic_each`` keeps every repeat's accuracies and
iteration counts, so that the table and the tests can check that they agree (they do not take the
script's word for it). The script finds each run's ``summary.json`` and ``metrics.jsonl`` anywhere under
the folder it passed as ``--output`` (train.py may put them in a per-run subfolder), and writes

- ``docs/assets/imixer/digits_runs.json``: the machine, the commit, and per run its accuracy, its
  times and the solver's iterations per epoch;
- ``docs/assets/imixer/digits_runs.md``: the table the iMixer page includes (``--8<--``), rendered
  from the JSON by :func:`digits_table` (no torch).

The README and the docs quote these numbers; ``tests/test_docs_numbers.py`` compares every quote
with the JSON and the table with ``digits_table(json)``. Times depend on the machine and on what
else runs on it; accuracies and iteration counts are deterministic for a given commit and torch
build (fixed seed, one thread).

    python -m docs.scripts.digits_runs             # every run, a few minutes on 2 CPU cores
    python -m docs.scripts.digits_runs --render    # only re-render the table from the JSON
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from examples.common import OneLineArgumentParser, int_range

ROOT = Path(__file__).resolve().parents[2]
EPOCHS_SHOWN = (1, 5, 10, 15, 20)  # the epochs whose largest iteration count the table lists
OUT_DIR = ROOT / "docs" / "assets" / "imixer"
TRAIN = Path("examples") / "imixer" / "train.py"


@dataclass(frozen=True)
class Run:
    key: str
    label: str
    options: tuple[str, ...]


def _default_label() -> str:
    """The library default's settings in words, read from ``IMixerSettings()`` when the runs are made."""
    from examples.imixer.imixer import IMixerSettings

    defaults = IMixerSettings()
    tol = f"{defaults.tol:.0e}".replace("e-0", "e-")
    activation = ACTIVATION_NAMES[defaults.activation]
    return f"{defaults.solver} / {defaults.backward}, tol {tol}, {activation} (the default)"


ACTIVATION_NAMES = {"gelu": "GELU", "lipswish": "LipSwish"}

# The default, then one setting changed at a time, then the reference loop and the vanilla Mixer.
RUNS = (
    Run("default", "the default", ()),  # labelled by _default_label() when run
    Run("tol_1e-3", "tol 1e-3", ("--tol", "1e-3")),
    Run("picard", "Picard solver", ("--solver", "picard")),
    Run("broyden", "Broyden solver", ("--solver", "broyden")),
    Run("shine", "SHINE gradient (approximate)", ("--backward", "shine")),
    Run("jfb", "JFB gradient (approximate)", ("--backward", "jfb")),
    Run("lipswish", "LipSwish in F (not the paper's map)", ("--activation", "lipswish")),
    Run("reference_2", "reference loop, 2 Picard steps", ("--reference-iterations", "2")),
    Run("mixer_t2_8", "vanilla MLP-Mixer `mixer_t2_8`", ("--model", "mixer_t2_8")),
)


def _find_one(folder: Path, name: str) -> Path:
    found = sorted(folder.rglob(name), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {name} under {folder}")
    return found[-1]


def machine() -> dict[str, object]:
    """The run's provenance (``benchmarks/common.py``), in the fields the table's caption reads."""
    import sklearn

    from benchmarks.common import machine as benchmark_machine

    info = benchmark_machine("cpu")
    return {
        "date_utc": info["date_utc"][:10],
        "commit": (info["git_commit"] or "unknown")[:12],
        "code_modified": bool(info["git_dirty"]),
        "platform": info["platform"],
        "cpus": info["cpu_count"],
        "python": info["python"],
        "torch": info["torch"],
        "timm": info["timm"],
        "sklearn": sklearn.__version__,
    }


def run_once(run: Run, output: Path) -> dict[str, object]:
    """One training run; what it measured, read back from the files train.py wrote."""
    command = [sys.executable, str(TRAIN), "--output", str(output), "--no-progress", *run.options]
    print("$", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    process_seconds = time.perf_counter() - start
    summary = json.loads(_find_one(output, "summary.json").read_text(encoding="utf-8"))
    lines = _find_one(output, "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    epochs = [json.loads(line) for line in lines if line.strip()]
    last = epochs[-1]
    solved = last.get("solver_iters_max") is not None
    return {
        "model": summary["model"],
        "epochs": summary["epochs"],
        "final_top1": summary["final_top1"],
        "best_top1": summary["best_top1"],
        "train_seconds": summary["wall_seconds"],
        "process_seconds": process_seconds,
        "epoch_seconds_mean": sum(e["epoch_seconds"] for e in epochs) / len(epochs),
        "iters_mean_final": last["solver_iters_mean"] if solved else None,
        "iters_max_final": last["solver_iters_max"] if solved else None,
        "iters_max_by_epoch": [e.get("solver_iters_max") for e in epochs],
        "residual_max_final": last.get("solver_residual_max"),
        "unconverged_final": last.get("solver_unconverged"),
    }


# What a repeat of the same run must reproduce exactly (seeded, one thread).
DETERMINISTIC = ("final_top1", "best_top1", "iters_mean_final", "iters_max_final", "iters_max_by_epoch")
TIMES = ("train_seconds", "process_seconds", "epoch_seconds_mean")


def combine(run: Run, repeats: list[dict[str, object]]) -> dict[str, object]:
    """One record per run: the first repeat's results; of each time, the fastest repeat's and all.

    The fastest of a few runs is the one least disturbed by whatever else ran on the machine.
    """
    first = repeats[0]
    record: dict[str, object] = {"key": run.key, "label": run.label, "options": " ".join(run.options)}
    record.update(first)
    for name in TIMES:
        record[name] = min(float(r[name]) for r in repeats)
        record[f"{name}_each"] = [float(r[name]) for r in repeats]
    record["repeats"] = len(repeats)
    record["deterministic_each"] = [{name: r[name] for name in DETERMINISTIC} for r in repeats]
    return record


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
            shown = [by_epoch[e - 1] for e in EPOCHS_SHOWN if e <= len(by_epoch)]
            trend = " → ".join("–" if value is None else f"{value:.0f}" for value in shown)
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


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="where train.py writes (default: a temp dir)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    parser.add_argument("--repeats", type=int_range(1), default=3, help="runs of each setting, interleaved (default 3)")
    parser.add_argument("--render", action="store_true", help="only re-render the table from the JSON")
    args = parser.parse_args(argv)
    json_path, md_path = args.out_dir / "digits_runs.json", args.out_dir / "digits_runs.md"

    if not args.render:
        with tempfile.TemporaryDirectory(prefix="digits_runs_") as tmp:
            work = args.work or Path(tmp)
            made = (replace(RUNS[0], label=_default_label()), *RUNS[1:])
            done: dict[str, list[dict[str, object]]] = {run.key: [] for run in made}
            for repeat in range(args.repeats):  # interleaved, so a busy spell hits every setting
                for run in made:
                    done[run.key].append(run_once(run, work / f"{run.key}-{repeat}"))
        runs = [combine(run, done[run.key]) for run in made]
        record = {"machine": machine(), "repeats": args.repeats, "runs": runs}
        args.out_dir.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    record = json.loads(json_path.read_text(encoding="utf-8"))
    md_path.write_text(digits_table(record), encoding="utf-8")
    print(md_path.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
