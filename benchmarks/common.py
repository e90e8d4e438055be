"""What the benchmarks share: provenance, timing, output files and the one configuration vocabulary.

A configuration is a preset name (:data:`PRESETS`) or ``name=key:value,...``: each key a field of the iMixer's
:class:`~examples.imixer.imixer.IMixerSettings`, ``model`` (``imixer`` or timm's vanilla ``mixer``) or a training
option (:data:`TRAINING_KEYS`: the Jacobian penalty's weight and samples), validated by building the settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from examples.common import REPOSITORY as REPO
from examples.common import machine_info

RESULTS = REPO / "benchmarks" / "results"
TRAINING_KEYS = ("jac_weight", "jac_samples")
PRESETS: dict[str, dict[str, Any]] = {
    "mixer": {"model": "mixer"},
    "imixer": {},  # the library's defaults
    "exact": {"solver": "anderson", "backward": "ift", "tol": 1e-3, "activation": "gelu"},  # the paper's map, IFT
    **{f"reference-{n}": {"reference_iterations": n} for n in (1, 2, 3, 4, 8)},
    "picard-jfb-1e-2": {"solver": "picard", "backward": "jfb", "tol": 1e-2},
    "anderson-1e-2": {"tol": 1e-2},
    "lipswish": {"activation": "lipswish"},
    "coeff-0.85": {"coeff": 0.85},
    "jac-0.5": {"jac_weight": 0.5},
    "shine-2": {"solver": "broyden", "backward": "shine", "shine_refine": 2},
}


def machine(device: Any = None) -> dict[str, Any]:
    """Where and when a measurement ran (:func:`examples.common.machine_info`), with timm's version."""
    import timm

    info = machine_info(device)
    info["date_utc"] = info["date_utc"].replace("T", " ").removesuffix("+00:00")
    return info | {"timm": timm.__version__}


def machine_line(info: dict[str, Any]) -> str:
    """One line of :func:`machine`'s record for a run's log: date, platform, CPUs and threads, versions."""
    threads = f"{info['cpu_count']} CPUs ({info['torch_threads']} threads)"
    return f"{info['date_utc']} UTC | {info['platform']} | {threads} | torch {info['torch']} | timm {info['timm']}"


def synchronize(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def measuring(threads: int | None = None) -> Iterator[None]:
    """The block runs on ``threads`` torch threads (None: as many as now), without the layers'
    ``ConvergenceWarning`` (the benchmarks record unconverged solves instead); both restored afterwards."""
    import torch

    import implicitlayers as il

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", il.ConvergenceWarning)
            yield
    finally:
        torch.set_num_threads(previous)


def fill_run_sizes(args: Any, full: dict[str, Any], quick: dict[str, Any]) -> None:
    """Sets each run size ``args`` leaves unset (None, or 0 where its flag accepts 0) to the value of ``--quick``'s
    set or of the full run's: a value given explicitly wins over either."""
    for key, default in (quick if args.quick else full).items():
        if not getattr(args, key):
            setattr(args, key, default)


def timed(fn: Callable[[], Any], device: Any = "cpu", warmup: int = 1, repeats: int = 5) -> tuple[float, list, Any]:
    """``(median seconds, every time, the last call's result)`` of ``repeats`` calls after ``warmup``."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


def write(folder: Path, name: str, results: Any, markdown: str, indent: int = 2) -> list[Path]:
    """Writes ``NAME.json`` and ``NAME.md`` into ``folder`` (created); returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.json", folder / f"{name}.md"]
    paths[0].write_text(json.dumps(results, indent=indent) + "\n", encoding="utf-8")
    paths[1].write_text(markdown if markdown.endswith("\n") else markdown + "\n", encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------- configurations
def parse_value(text: str) -> Any:
    """``"2"`` → 2, ``"1e-3"`` → 0.001, ``"true"`` → True, ``"none"`` → None, else the string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


def parse_config(spec: str) -> tuple[str, dict[str, Any]]:
    """A preset name, or ``name=key:value,...`` (``name=`` alone: the defaults), validated.

    Raises:
        ValueError: Unknown preset, malformed item, unknown key or invalid value, naming the configuration.
    """
    if "=" not in spec:
        if spec not in PRESETS:
            raise ValueError(f"unknown configuration {spec!r}: presets are {sorted(PRESETS)}, or name=key:value,...")
        return spec, dict(PRESETS[spec])
    name, _, body = spec.partition("=")
    if not name:
        raise ValueError(f"configuration {spec!r} has no name before '='")
    options: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"configuration {spec!r}: item {item!r} is not key:value")
        options[key] = parse_value(value)
    settings(options, name)
    return name, options


def settings(options: dict[str, Any], name: str = "configuration") -> Any:
    """The ``IMixerSettings`` a configuration's options mean (None for the vanilla Mixer), validated.

    Raises:
        ValueError: An unknown key or an invalid value (the dataclass's message, naming ``name``).
    """
    from examples.imixer.imixer import IMixerSettings

    known = ("model", *(field.name for field in dataclasses.fields(IMixerSettings)), *TRAINING_KEYS)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"configuration {name!r}: unknown key(s) {unknown}; known: {list(known)}")
    model = options.get("model", "imixer")
    if model not in ("imixer", "mixer"):
        raise ValueError(f"configuration {name!r}: model must be 'imixer' or 'mixer', got {model!r}")
    if model == "mixer":
        if set(options) - {"model"}:
            raise ValueError(f"configuration {name!r}: the vanilla mixer takes no options, got {sorted(options)}")
        return None
    fields = model_kwargs(options)
    try:
        return IMixerSettings.build(fields.pop("reference_iterations", None), **fields)
    except (ValueError, TypeError) as error:
        raise ValueError(f"configuration {name!r}: {error}") from None


def model_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """The ``timm.create_model`` keywords of an iMixer configuration (the Jacobian penalty's samples included)."""
    fields = {key: value for key, value in options.items() if key not in ("model", *TRAINING_KEYS)}
    if options.get("jac_weight", 0.0):
        fields["jacobian_penalty"] = int(options.get("jac_samples", 1))
    return fields


def create_model(size: str, options: dict[str, Any], **shape: Any) -> Any:
    """timm's ``mixer_<size>`` or ``imixer_<size>`` built for a configuration, 10 classes, ``shape`` overriding the
    registered shape. Seed torch before: the weights are drawn from its global generator."""
    import timm

    from examples.imixer import imixer  # noqa: F401  (registers the imixer_* / mixer_t* models with timm)

    if options.get("model") == "mixer":
        return timm.create_model(f"mixer_{size}", num_classes=10, **shape)
    return timm.create_model(f"imixer_{size}", num_classes=10, **model_kwargs(options), **shape)


def is_default(options: dict[str, Any]) -> bool:
    """Whether a configuration trains the library's defaults: its settings equal ``IMixerSettings()``."""
    from examples.imixer.imixer import IMixerSettings

    return not options.get("jac_weight") and settings(options) == IMixerSettings()
