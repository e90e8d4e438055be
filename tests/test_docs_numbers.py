"""Measured numbers in the docs come from generated files, and the docs quote them faithfully.

- The generated snippets the pages include (``--8<--``) are exactly what their scripts render from
  the checked-in JSON: ``docs/assets/imixer/digits_runs.md`` (``docs/scripts/digits_runs.py``) and
  ``docs/assets/benchmarks/**`` (``docs/scripts/benchmark_tables.py``).
- Every number a page or the README quotes in its prose from a measurement is listed in ``CLAIMS``
  with where it comes from, and must equal that value as the page formats it.
- A sweep over the audited pages finds every measurement-looking number (percentages, ratios
  "N×", seconds, minutes, ms, MB, img/s) outside code blocks and math; each must be one of the
  claims or an explicitly listed constant (a tolerance, a target, an analytic bound). A number
  typed in by hand therefore fails until it is tied to its source.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "docs" / "assets"


def _module(name: str):
    path = ROOT / "docs" / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"docs_scripts_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@cache
def _json(relative: str) -> dict:
    return json.loads((ASSETS / relative).read_text(encoding="utf-8"))


def digits() -> dict[str, dict]:
    return {run["key"]: run for run in _json("imixer/digits_runs.json")["runs"]}


def cpu_step(size: str) -> dict[str, dict]:
    return {row["mode"]: row for row in _json(f"benchmarks/cpu/step_{size}.json")["models"][size]["rows"]}


@cache
def trace(problem: str, solver: str) -> dict:
    return _json("figures/residual_trace.json")["problems"][problem][solver]


def core() -> dict:
    return _json("benchmarks/cpu/core_properties.json")


def _f(spec: str) -> Callable[[float], str]:
    return lambda value: format(value, spec)


# ------------------------------------------------------------------ analytic numbers
# Multiply-adds per image of imixer_s16_224 (Benchmarks page, "Where the time goes"): N tokens,
# C channels, T = C/2 token-MLP width, H = 2T hidden width of F, 8 blocks, 16x16 patches of 3 channels.
N, C, DEPTH = 196, 512, 8
T, H = C // 2, C
F_MACS = DEPTH * C * 2 * T * H
VANILLA_MACS = 16 * 16 * 3 * C * N + DEPTH * (2 * N * T * C + 2 * N * C * 4 * C)
UNITS = 3 * VANILLA_MACS / F_MACS  # a training step (backward = twice the forward) in evaluations of F


def floor(units: float) -> float:
    return (UNITS + units) / UNITS


@dataclass(frozen=True)
class Claim:
    """``pattern`` (whitespace-insensitive) matches in ``page``; its groups equal ``expected()``."""

    page: str
    pattern: str
    expected: Callable[[], tuple[str, ...]]


def _digits_top1(key: str) -> str:
    return f"{digits()[key]['final_top1']:.2f}"


def _default_seconds() -> str:
    return f"{digits()['default']['train_seconds']:.0f}"


def _iters_trend(key: str) -> tuple[str, str]:
    by_epoch = digits()[key]["iters_max_by_epoch"]
    return f"{by_epoch[0]:.0f}", f"{by_epoch[-1]:.0f}"


def _recipe(name: str) -> dict:
    path = ROOT / "examples" / "imixer" / "recipes" / "cifar10_t4_32.json"
    return json.loads(path.read_text(encoding="utf-8"))["models"][name]


def _recipe_step(name: str) -> float:
    return _recipe(name)["train_step_seconds_median"]


def _recipe_row(name: str) -> tuple[str, ...]:
    m = _recipe(name)
    return (
        f"{m['train_step_seconds_median']:.2f}",
        f"{m['train_images_per_second']:.0f}",
        f"{m['data_seconds_per_step_mean']:.3f}",
        f"{m['eval_images_per_second']:.0f}",
        f"{m['projected_epoch_minutes']:.1f}",
        f"{m['projected_run_hours']:.1f}",
    )


CLAIMS = [
    # The digits runs (docs/assets/imixer/digits_runs.json).
    Claim(
        "README.md",
        r"(\d+) s of training on 2 CPU cores and (\d+\.\d+) % validation top-1",
        lambda: (_default_seconds(), _digits_top1("default")),
    ),
    Claim(
        "README.md",
        r"reference loop of two Picard steps reached (\d+\.\d+) % and the vanilla Mixer (\d+\.\d+) % in the same",
        lambda: (_digits_top1("reference_2"), _digits_top1("mixer_t2_8")),
    ),
    Claim(
        "docs/index.md",
        r"(\d+) s of training on 2 CPU cores and (\d+\.\d+) % validation top-1",
        lambda: (_default_seconds(), _digits_top1("default")),
    ),
    *(
        Claim(
            page,
            r"\(?(\d+\.\d) instead of (\d+\.\d) (?:forward iterations )?per solve",
            lambda: (
                f"{digits()['tol_1e-3']['iters_mean_final']:.1f}",
                f"{digits()['default']['iters_mean_final']:.1f}",
            ),
        )
        for page in ("docs/troubleshooting.md",)
    ),
    Claim(
        "docs/concepts/solvers.md",
        r"largest iteration count went from (\d+) to (\d+) over training, Picard's from (\d+) to (\d+)",
        lambda: (*_iters_trend("default"), *_iters_trend("picard")),
    ),
    # The flows example's recorded run (docs/assets/flows/results.json).
    Claim(
        "README.md",
        r"log-determinant estimators; (\d+) s in the recorded run",
        lambda: (f"{_json('flows/results.json')['seconds']:.0f}",),
    ),
    # The Solvers page's figure (docs/assets/figures/residual_trace.json, docs/scripts/make_figures.py).
    Claim(
        "docs/concepts/solvers.md",
        r"all three solvers need the same (\d+) evaluations",
        lambda: tuple({str(trace("implicit_mlp", s)["nstep_max"]) for s in ("picard", "anderson", "broyden")}),
    ),
    Claim(
        "docs/concepts/solvers.md",
        r"Picard needs (\d+) evaluations to reach \$10\^\{-4\}\$ and stops at its cap of (\d+) with the "
        r"residual still at (\S+), while Anderson reaches \$10\^\{-10\}\$ in (\d+) evaluations and Broyden in (\d+)\.",
        lambda: (
            str(trace("slow_tanh", "picard")["evaluations_to_1e-4"]),
            str(trace("slow_tanh", "picard")["nstep_max"]),
            f"{trace('slow_tanh', 'picard')['last_residual']:.0e}",
            str(trace("slow_tanh", "anderson")["nstep_max"]),
            str(trace("slow_tanh", "broyden")["nstep_max"]),
        ),
    ),
    # benchmarks/core_properties.py (docs/assets/benchmarks/cpu/core_properties.json).
    Claim(
        "docs/concepts/solvers.md",
        r"medians of (\d+) \(picard\), (\d+) \(anderson\) and (\d+) \(broyden\) evaluations",
        lambda: tuple(f"{core()['p7_acceleration']['median_nstep'][s]:.0f}" for s in ("picard", "anderson", "broyden")),
    ),
    Claim(
        "docs/concepts/solvers.md",
        r"a median of (\d\.\d+)× Picard's evaluations",
        lambda: (f"{core()['p7_acceleration']['ratio_to_picard']['broyden']:.3f}",),
    ),
    Claim(
        "docs/benchmarks.md",
        r"Anderson needs (\d+\.\d)× and Broyden (\d+\.\d)× fewer evaluations",
        lambda: tuple(f"{1 / core()['p7_acceleration']['ratio_to_picard'][s]:.1f}" for s in ("anderson", "broyden")),
    ),
    # benchmarks/imixer_step.py: CPU JSON and the kept H200 tables.
    Claim(
        "docs/imixer.md",
        r"output is (\S+) after one step, (\S+) after two and (\S+) after three",
        lambda: tuple(f"{cpu_step('s16_224')[f'reference-{n}']['residual_max']:.2e}" for n in (1, 2, 3)),
    ),
    # The CIFAR-10 recipe's measured step (examples/imixer/recipes/cifar10_t4_32.json, measure_recipe.py).
    *(
        Claim(
            "examples/imixer/README.md",
            rf"\| `{name}` \| (\d\.\d\d) \| (\d+) \| (\d\.\d+) \| (\d+) \| (\d+\.\d) \| (\d+\.\d) \|",
            lambda name=name: _recipe_row(name),
        )
        for name in ("imixer_t4_32", "mixer_t4_32")
    ),
    Claim(
        "examples/imixer/README.md",
        r"Per step the iMixer costs (\d\.\d\d)× the vanilla Mixer here",
        lambda: (f"{_recipe_step('imixer_t4_32') / _recipe_step('mixer_t4_32'):.2f}",),
    ),
    # Analytic: multiply-adds and the arithmetic floor of a training step (formulas above).
    Claim(
        "docs/benchmarks.md",
        r"= (\d\.\d\d) G, the whole vanilla forward (\d\.\d\d) G",
        lambda: (f"{F_MACS / 1e9:.2f}", f"{VANILLA_MACS / 1e9:.2f}"),
    ),
    Claim("docs/benchmarks.md", r"against the vanilla step's ≈ (\d+\.\d):", lambda: (f"{UNITS:.1f}",)),
    Claim("docs/benchmarks.md", r"= 5 units, so at least (\d\.\d\d)×", lambda: (f"{floor(5):.2f}",)),
    Claim("docs/benchmarks.md", r"at tol 1e-3: at least (\d\.\d\d)×", lambda: (f"{floor(8):.2f}",)),
    Claim(
        "docs/benchmarks.md",
        r"(\d\.\d\d)× for n = 2 and (\d\.\d\d)× for n = 4",
        lambda: (f"{floor(6):.2f}", f"{floor(12):.2f}"),
    ),
    Claim(
        "docs/concepts/gradients.md",
        r"at a contraction rate of 0\.07, about (\d+)× smaller",
        lambda: (f"{1 / 0.07:.0f}",),
    ),
    Claim("docs/concepts/invertible.md", r"At \$L = 0\.81\$ .*? at most (\d\.\d)×", lambda: (f"{1 / (1 - 0.81):.1f}",)),
]

# The pages whose numbers are audited (deq.md and torchdeq.md have their own owners).
AUDITED = sorted(
    [
        "README.md",
        "benchmarks/README.md",
        *(str(p.relative_to(ROOT)) for p in (ROOT / "examples").rglob("README.md")),
        *(
            str(p.relative_to(ROOT))
            for p in (ROOT / "docs").rglob("*.md")
            if p.name not in ("deq.md", "torchdeq.md") and "assets" not in p.parts
        ),
    ]
)

# Numbers that look like measurements but are not: settings, targets, thresholds, examples.
CONSTANTS = {
    "README.md": ["88.56 %", "89.07 %", "87.48 %"],  # published results (Ota & Taki)
    "docs/gpu.md": ["8 minutes"],  # the time the prepared script is sized for, not a measurement
    "benchmarks/README.md": ["0.7×"],  # the threshold the solver summary counts against
    "examples/imixer/README.md": ["88.56 %", "89.07 %", "87.48 %"],  # published results (Ota & Taki)
    "docs/benchmarks.md": ["≤ 1.5×", "≤ 0.7×", "≤ 5 %", "≤ 1.2×", "143 GB"],  # targets; the GPU's memory
    "docs/troubleshooting.md": ["12.5%"],  # the text of an example warning
    "docs/imixer.md": ["88.56 %", "89.07 %", "87.48 %"],  # published results (Ota & Taki)
}

# Measurement-looking: a number with a unit of time, memory, throughput, a percentage or a ratio
# ("8×8" is a size, not a ratio).
MEASURE = re.compile(
    r"(?<![\w.^{-])(?:≤ |≥ )?\d[\d,]*(?:\.\d+)?(?:\s?%|×(?!\d)|\s?(?:s|ms|µs|MB|GB|img/s|seconds|minutes?)\b)"
)


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _prose(text: str) -> str:
    """The page without fenced code, inline code, math and snippet lines."""
    text = re.sub(r"^([ \t]*)```.*?^\1```", " ", text, flags=re.DOTALL | re.MULTILINE)
    text = re.sub(r"\$\$.*?\$\$", " ", text, flags=re.DOTALL)
    text = re.sub(r"\$[^$\n]+\$", " ", text)
    text = re.sub(r"`[^`\n]+`", " ", text)
    text = re.sub(r"^\s*--8<--.*$", " ", text, flags=re.MULTILINE)
    return _normalise(text)


def _read(page: str) -> str:
    return (ROOT / page).read_text(encoding="utf-8")


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: f"{c.page}:{c.pattern[:40]}")
def test_quoted_number_matches_its_source(claim: Claim) -> None:
    text = _normalise(_read(claim.page))
    matches = list(re.finditer(claim.pattern, text))
    assert matches, f"{claim.page}: no text matches {claim.pattern!r} (reworded? update CLAIMS)"
    expected = claim.expected()
    for match in matches:
        assert match.groups() == expected, f"{claim.page} quotes {match.groups()}, the source says {expected}"


@pytest.mark.parametrize("page", AUDITED)
def test_every_measured_number_has_a_source(page: str) -> None:
    original = _normalise(_read(page))
    covered: list[str] = []
    for claim in CLAIMS:
        if claim.page == page:
            covered += [m.group(0) for m in re.finditer(claim.pattern, original)]
    unexplained = []
    for match in MEASURE.finditer(_prose(_read(page))):
        token = match.group(0)
        if token in CONSTANTS.get(page, []) or any(token in quote for quote in covered):
            continue
        unexplained.append(token)
    assert not unexplained, (
        f"{page} quotes {unexplained} with no source: include the generated file (--8<--), or add a "
        "Claim tying the number to its JSON in tests/test_docs_numbers.py"
    )


def test_digits_table_is_rendered_from_the_record() -> None:
    record = _json("imixer/digits_runs.json")
    script = _module("digits_runs")
    assert (ASSETS / "imixer" / "digits_runs.md").read_text(encoding="utf-8") == script.digits_table(record)
    assert [run["key"] for run in record["runs"]] == [run.key for run in script.RUNS]


def test_digits_runs_are_reproducible_and_agree_with_the_page() -> None:
    runs = digits()
    # A seeded, single-threaded run gives the same accuracy and iterations every time: read from every
    # repeat's own numbers, not from a flag the generating script sets about itself.
    for key, run in runs.items():
        each = run["deterministic_each"]
        assert len(each) == run["repeats"] >= 2, key
        for repeat in each[1:]:
            assert repeat == each[0], f"{key}: a repeat gave {repeat}, the first {each[0]}"
        assert {name: run[name] for name in each[0]} == each[0], f"{key}: the record is not its repeats'"
    # What the iMixer and Solvers pages conclude from the table: Anderson's iterations grow far less than
    # Picard's through training.
    assert runs["picard"]["iters_max_final"] > runs["default"]["iters_max_final"]


def test_benchmark_tables_are_rendered_from_the_outputs() -> None:
    pytest.importorskip("timm")
    tables = _module("benchmark_tables")
    for name, text in tables.render_all().items():
        assert (tables.ASSETS / name).read_text(encoding="utf-8") == text, (
            f"{name}: run docs/scripts/benchmark_tables.py"
        )


def test_core_properties_orders_of_magnitude() -> None:
    """The Benchmarks page reads the P3 and P4 errors as about 1e-11 and 1e-13."""
    results = core()
    p3 = max(e for per_solver in results["p3_inverse"]["max_rel_error"].values() for e in per_solver.values())
    assert 1e-12 <= p3 < 1e-10
    p4 = max(e for row in results["p4_gradients"]["rel_error"].values() for e in row.values())
    assert 1e-14 <= p4 < 1e-12
    assert results["all_hold"]


def test_figure_record_matches_the_figure_script() -> None:
    """residual_trace.json and the figure come from one run of make_figures.py (same solvers, tol)."""
    figures = _module("make_figures")
    record = _json("figures/residual_trace.json")
    assert record["tol"] == figures.TOL
    assert set(record["problems"]) == set(figures.TITLES)
    assert all(set(per) == set(figures.SOLVERS) for per in record["problems"].values())


def test_the_imixer_readme_quotes_the_generated_digits_table_verbatim():
    root = Path(__file__).resolve().parents[1]
    table = (root / "docs" / "assets" / "imixer" / "digits_runs.md").read_text(encoding="utf-8").strip()
    readme = (root / "examples" / "imixer" / "README.md").read_text(encoding="utf-8")
    assert table in readme
