"""Defaults named in the docs and in ``train.py --help`` are the code's.

Prose names a default with a marker around the value, ``<!--default:KEY-->`1e-2`<!--/default-->``
(invisible on the rendered page), and this test compares every marked value with the code. KEY is

- ``imixer.FIELD``: ``IMixerSettings()``'s field (the iMixer's defaults, which ``create_model`` uses);
- ``Budget.FIELD``, ``Anderson.FIELD``, ...: the field of the library object built with no arguments;
- ``ImplicitMLP.PARAM``, ``solve.PARAM``, ...: the parameter's default in the signature;
- ``train.DEST``: ``examples/imixer/train.py``'s default for the flag stored in DEST;
- ``deq.NAME.FIELD``: a default object of ``examples/deq/model.py`` (``deq.BUDGET.tol``).

A sentence that says "default" next to a setting's name and a value must carry a marker, so that a
new, unchecked claim fails here rather than drift when the code changes. Lines copied verbatim from a
generated file under ``docs/assets`` are the generator's (and ``test_docs_numbers.py`` checks the copy).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import timm

import implicitlayers as il
from examples.imixer import train
from examples.imixer.imixer import IMixerSettings

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "examples").glob("**/README.md")]
    + [path for path in (ROOT / "docs").glob("**/*.md") if "assets" not in path.parts]
)
MARKER = re.compile(r"<!--default:([\w.\-]+)-->(.*?)<!--/default-->", flags=re.DOTALL)
# A sentence claiming a default: "default" near a setting's name and a value.
SETTING_WORDS = re.compile(
    r"\b(tol|max_iter|max-iter|solver|activation|backward|gradient|memory|coeff|damping|n_power_iterations|"
    r"n-power|hidden_ratio|h-ratio|lr|epochs|batch)\b",
    flags=re.IGNORECASE,
)
VALUES = re.compile(
    r"(?<![\w.])(\d+(\.\d+)?(e-?\d+)?|anderson|broyden|picard|ift|shine|jfb|phantom|unrolled|gelu|lipswish)(?![\w])",
    flags=re.IGNORECASE,
)


def code_default(key: str) -> Any:
    """The code's default for a marker's KEY (see the module docstring)."""
    owner, _, name = key.partition(".")
    if owner == "imixer":
        return getattr(IMixerSettings(), name)
    if owner == "train":
        return train.build_parser().get_default(name)
    if owner == "deq":
        from examples.deq import model as deq_model

        value = deq_model
        for attribute in name.split("."):
            value = getattr(value, attribute)
        return value
    target = getattr(il, owner)
    if inspect.isclass(target) and dataclasses.is_dataclass(target):
        return getattr(target(), name)
    return inspect.signature(target).parameters[name].default


def generated_lines() -> set[str]:
    """Every line of the generated snippets under ``docs/assets`` (pages may copy them verbatim)."""
    return {
        line.strip()
        for path in (ROOT / "docs" / "assets").glob("**/*.md")
        for line in path.read_text(encoding="utf-8").splitlines()
        if len(line.strip()) > 20 and not line.lstrip().startswith("```")
    }


def same_value(text: str, value: Any) -> bool:
    """Whether the docs' text states ``value`` (1e-2 and 0.01 alike; quotes and backticks ignored)."""
    text = re.sub(r"^\w+=", "", text.strip().strip("`")).strip("\"'")  # `memory=5` states 5
    if isinstance(value, il.Solver):
        value = value.name if hasattr(value, "name") else type(value).__name__.lower()
    if isinstance(value, bool) or value is None:
        return text == str(value)
    if isinstance(value, (int, float)):
        try:
            return float(text) == pytest.approx(float(value), rel=1e-12)
        except ValueError:
            return False
    return text.lower() == str(value).lower()


def markers() -> list[tuple[str, str, str]]:
    return [
        (str(page.relative_to(ROOT)), key, text)
        for page in PAGES
        for key, text in MARKER.findall(page.read_text(encoding="utf-8"))
    ]


def prose_sentences(text: str) -> list[str]:
    """Sentences outside fenced code blocks (a table row counts as one sentence)."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        for line in paragraph.splitlines() if paragraph.lstrip().startswith("|") else [paragraph]:
            sentences += re.split(r"(?<=[.;:])\s+(?=[A-Z`*(-])", " ".join(line.split()))
    return sentences


def test_the_pages_mark_defaults():
    assert len(markers()) >= 20, "the pages name defaults only through markers"


@pytest.mark.parametrize(("page", "key", "text"), markers(), ids=lambda v: v if "/" not in v else None)
def test_a_marked_default_is_the_codes(page, key, text):
    value = code_default(key)
    assert same_value(text, value), f"{page}: says the default {key} is {text.strip()!r}; the code's is {value!r}"


def test_every_default_claim_is_marked():
    unmarked, generated = [], generated_lines()
    for page in PAGES:
        text = "\n".join(
            line for line in page.read_text(encoding="utf-8").splitlines() if line.strip() not in generated
        )
        for sentence in prose_sentences(text):
            plain = MARKER.sub("", sentence)
            if "<!--default:" in sentence or not re.search(r"\bdefaults?\b", plain, flags=re.IGNORECASE):
                continue
            if SETTING_WORDS.search(plain) and VALUES.search(plain):
                unmarked.append(f"{page.relative_to(ROOT)}: {sentence[:160]}")
    assert not unmarked, "default claims without a <!--default:KEY--> marker:\n" + "\n".join(unmarked)


def test_every_default_in_a_defaults_column_is_marked():
    """A table with a "default" column states a default in each row: each must be marked."""
    unmarked = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
        for table in re.findall(r"(?:^\|.*\|[ \t]*\n)+", text, flags=re.MULTILINE):
            rows = [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in table.splitlines()]
            columns = [i for i, cell in enumerate(rows[0]) if re.search(r"\bdefaults?\b", cell, re.IGNORECASE)]
            for row in rows[2:]:
                for i in columns:
                    cell = row[i] if i < len(row) else ""
                    if cell not in ("", "-", "–", "—") and "<!--default:" not in cell:
                        unmarked.append(f"{page.relative_to(ROOT)}: {' | '.join(row)[:160]}")
    assert not unmarked, "defaults-column cells without a marker:\n" + "\n".join(unmarked)


def test_help_states_the_models_defaults():
    """``--help`` shows each implicit flag's default, and that default is what ``create_model`` builds."""
    parser = train.build_parser()
    help_text = " ".join(parser.format_help().split())
    defaults = IMixerSettings()
    assert timm.create_model("imixer_t2_8").settings == defaults
    for setting in dataclasses.fields(IMixerSettings):
        actions = [action for action in parser._actions if action.dest == setting.name]
        assert actions, f"no flag for {setting.name}"
        for action in actions:
            stated = f"(default: {getattr(defaults, setting.name)})"
            assert action.help.endswith(stated), (action.option_strings, action.help)
            assert " ".join(action.help.split()) in help_text
