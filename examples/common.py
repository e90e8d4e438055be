"""What the example scripts share: one-line command-line errors, argparse types, flags from a dataclass, and
the record of the machine a measurement ran on.

Every script reports bad input as one line, ``<prog>: error: <message>``, with exit status 2 and no traceback
or usage block, so that a log or a CI run shows what was wrong in one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import platform
import re
import subprocess
import typing
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn, TypeVar

REPOSITORY = Path(__file__).resolve().parents[1]
T = TypeVar("T")


class UsageError(Exception):
    """Bad command-line input; reported as one line with exit status 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: argparse prints the whole usage block first.

    Args:
        *args: Those of ``argparse.ArgumentParser``.
        raise_errors: Raise :class:`UsageError` instead of exiting, for a ``main`` that returns its exit
            status (so that tests can call it) and reports the error itself.
        **kwargs: Those of ``argparse.ArgumentParser``.
    """

    def __init__(self, *args: object, raise_errors: bool = False, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.raise_errors = raise_errors

    def error(self, message: str) -> NoReturn:
        if self.raise_errors:
            raise UsageError(message)
        self.exit(2, f"{self.prog}: error: {message}\n")


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers in ``[low, high]``; anything else is one line naming the flag."""
    accepted = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value {text!r}; expected {accepted}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def float_range(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """An argparse ``type`` accepting finite floats in the interval given (open or closed at each end)."""
    left = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    right = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    accepted = "a finite number" + (f" {left}" if left else "") + (" and" if left and right else "")
    accepted += f" {right}" if right else ""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid float value {text!r}; expected {accepted}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


def must_be(convert: Callable[[str], T], accepted: str, valid: Callable[[T], bool]) -> Callable[[str], T]:
    """An argparse ``type``: ``convert(text)`` when it is ``valid``, else the error "must be <accepted>, got
    <text>" (the wording of the DEQ and flow scripts; :func:`int_range` and :func:`float_range` say "expected")."""

    def parse(text: str) -> T:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise argparse.ArgumentTypeError(f"must be {accepted}, got {text}")
        return value

    return parse


positive_int = must_be(int, "an integer >= 1", lambda value: value >= 1)
positive_float = must_be(float, "a finite number > 0", lambda value: value > 0 and math.isfinite(value))


def recorded_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as a results file records them: a path relative to the repository when it lies inside it."""
    return {key: _repository_relative(value) if isinstance(value, Path) else value for key, value in vars(args).items()}


def write_results(folder: Path, results: dict[str, Any], texts: Mapping[str, str], ensure_ascii: bool = True) -> None:
    """Writes ``results.json`` (indented) and each named text (Markdown tables, say) into ``folder``, UTF-8."""
    (folder / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=ensure_ascii) + "\n", "utf-8")
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")


def _repository_relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPOSITORY))
    except ValueError:
        return str(path)


def machine_info(device: Any = None) -> dict[str, Any]:
    """Where and when a measurement ran, for its record: the date (UTC), the repository's commit and whether
    tracked files differ from it, the platform, CPU, Python, torch and the device. torch is imported here, not
    with this module, so that a script's argument errors stay quick.

    Args:
        device: The device measured (a ``torch.device`` or its name; None: CUDA when available, else the CPU).
    """
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    commit, changes = _git("rev-parse", "HEAD"), _git("status", "--porcelain", "--untracked-files=no")
    cpu = _cpu_name()
    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": None if commit is None or changes is None else bool(changes),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_1min": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
    }


def load_average() -> float | None:
    """The 1-minute load average (other processes competing for the CPU make every step slower), if known."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    """``git``'s output in this repository, or None (no git, or not a checkout)."""
    try:
        done = subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


class _NotGiven:
    """The parsed default of a dataclass flag: the flag was not given (``none`` parses to None, a value)."""

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN = _NotGiven()


def given_fields(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """Removes the flags of ``cls``' fields (:func:`add_dataclass_flags`) from ``args``; returns those given."""
    given = {}
    for name in (setting.name for setting in dataclasses.fields(cls)):
        value = args.__dict__.pop(name, NOT_GIVEN)
        if value is not NOT_GIVEN:
            given[name] = value
    return given


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's ``(default: ...)`` after each help, unless the help states its default itself, as those of
    :func:`add_dataclass_flags` do (their parsed default is :data:`NOT_GIVEN`)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


def dataclass_flag(name: str) -> str:
    """The flag of a dataclass field: ``max_iter`` → ``--max-iter``."""
    return "--" + name.replace("_", "-")


def add_dataclass_flags(
    group: argparse._ArgumentGroup, cls: type, *, aliases: Mapping[str, str] | None = None,
    types: Mapping[str, Callable[[str], Any]] | None = None,
    choices: Mapping[str, Callable[[], Sequence[str]]] | None = None,
) -> None:  # fmt: skip
    """One flag per field of the dataclass ``cls`` (:func:`dataclass_flag`), typed by the field's annotation.

    Each help is the field's entry in the ``Attributes:`` section of ``cls``' docstring and states the field's
    default in ``cls()``; the parsed default is :data:`NOT_GIVEN`, so that the caller passes on only the flags
    given (:func:`given_fields`; use :class:`DefaultsHelpFormatter`). A field whose type allows None takes
    ``none`` (None, given); a bool field gets a ``--no-`` flag too.

    Args:
        group: Where the flags go.
        cls: A dataclass whose fields all have defaults.
        aliases: Another spelling of a field's flag (an earlier name), a flag of its own so that errors name it.
        types: An argparse type for a field in place of its annotation's (a range, say).
        choices: The names a field accepts (read when parsing, so names registered later count), for the help
            and for the message refusing any other.
    """
    aliases, types, choices = aliases or {}, types or {}, choices or {}
    defaults, hints = cls(), typing.get_type_hints(cls)
    docstring = inspect.cleandoc(cls.__doc__ or "").partition("Attributes:")[2]
    docs = dict(re.findall(r"^    (\w+): (.*(?:\n {8}.*)*)", docstring, flags=re.MULTILINE))
    for name in (setting.name for setting in dataclasses.fields(cls)):
        flag, hint, names = dataclass_flag(name), hints[name], choices.get(name)
        described = " ".join(docs.get(name, name.replace("_", " ")).replace("``", "").split()).rstrip(".")
        described += f": one of {', '.join(names())}" if names else ""
        default = f" (default: {getattr(defaults, name)})"
        helps = {flag: described + default, aliases.get(name): f"the same as {flag}{default}"}  # argparse formats %
        if hint is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=NOT_GIVEN,
                               help=helps[flag].replace("%", "%%"))  # fmt: skip
            continue
        kind = next(kind for kind in typing.get_args(hint) or (hint,) if kind is not type(None))
        parse = _field_type(name, kind, types.get(name, kind), type(None) in typing.get_args(hint), names)
        metavar = {int: "N", str: "NAME"}.get(kind)
        for spelling, text in helps.items():
            if spelling:
                group.add_argument(spelling, dest=name, type=parse, default=NOT_GIVEN, metavar=metavar,
                                   help=text.replace("%", "%%"))  # fmt: skip


def _field_type(
    name: str, kind: type, parse: Callable[[str], Any], optional: bool, names: Callable[[], Sequence[str]] | None
) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        if names is not None and text not in (known := list(names())):
            raise argparse.ArgumentTypeError(f"unknown {name.replace('_', ' ')} {text!r}; "
                                             f"choose one of {', '.join(known)}")  # fmt: skip
        return parse(text)

    convert.__name__ = kind.__name__  # argparse's "invalid int value" names it
    return convert
