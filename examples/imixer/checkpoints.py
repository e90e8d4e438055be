"""Run folders, the resolved run config and crash-safe checkpoints of the iMixer ``train.py``.

A run folder (``--output``/``--experiment``, by default ``runs/imixer/<YYYYmmdd-HHMMSS>-<model>-<dataset>``)
holds::

    args.yaml, config.json        the resolved config of the latest start (flags, model, versions, seed)
    checkpoints.json              the manifest: which checkpoint is "last" and which is "best"
    checkpoints/epoch-0003/       one checkpoint: model.safetensors (weights) + state.pt (training state)
    metrics.jsonl, metrics.csv, summary.json, training.png, tensorboard/

**Commit protocol.** A checkpoint is written into a fresh hidden folder ``checkpoints/.epoch-NNNN.<random>.tmp``,
renamed to an unused name ``checkpoints/epoch-NNNN[-k]``, and only then *committed* by atomically replacing
``checkpoints.json`` (write a temporary file, ``os.replace``). Readers follow the manifest only, so a crash at
any point (even ``kill -9``) leaves the previous manifest naming the previous complete checkpoint; the new
folder, if it got that far, is unreferenced. Unreferenced folders and stale ``*.tmp`` files are removed after
each commit and when a run starts. Checkpoint folders are never overwritten: the manifest replacement is the
only operation that changes what a reader sees.

**Why not timm's** ``CheckpointSaver``: it pickles the whole training state, the ``args`` namespace included, into
one ``.pth.tar`` that only ``torch.load(weights_only=False)`` reads, and it saves no random-generator state. Here
the weights are safetensors, the rest is read back with ``weights_only=True``, a manifest commits each checkpoint
atomically, and the generators are saved (:func:`save_training`) so that a resumed run is the uninterrupted one,
bit for bit.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import re
import secrets
import shutil
import sys
import tempfile
import time
from argparse import Namespace
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import timm
import torch
from timm.utils import unwrap_model

import implicitlayers as il
from examples.common import dataclass_flag, first_line
from examples.imixer.imixer import REFERENCE_COMPUTATION, IMixerSettings

MANIFEST = "checkpoints.json"
CHECKPOINT_DIR = "checkpoints"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
MANIFEST_FORMAT = 1


class CheckpointError(Exception):
    """A checkpoint or run folder is missing, corrupt, or does not match this run; reported in one line."""


# ---------------------------------------------------------------------------------------------------
# Atomic files


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Calls ``write(tmp_path)`` then renames onto ``path``: readers see the old file or the new one.

    Args:
        path: The file to (re)place.
        write: Writes the complete contents to the temporary path it is given (same folder as ``path``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _fsync_file(path: str | Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some platforms cannot open or sync folders; the rename is atomic there
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------------
# Run folders


def default_experiment_name(model: str, dataset: str, now: datetime | None = None) -> str:
    """``<YYYYmmdd-HHMMSS>-<model>-<dataset>``, timm's pattern (timm ends with the image size instead)."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{_slug(model)}-{_slug(dataset)}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_") or "x"


def claim_run_dir(parent: Path, name: str, unique: bool) -> Path:
    """Creates the run folder ``parent/name`` and returns it.

    Args:
        parent: Where run folders live (``--output``).
        name: The folder name (``--experiment`` or :func:`default_experiment_name`).
        unique: A generated name: if taken (two runs started in the same second), append ``-2``, ``-3``...
            A chosen name (``unique=False``) may already exist; the caller decides whether reusing it is fine.
    """
    parent.mkdir(parents=True, exist_ok=True)
    if not unique:
        (parent / name).mkdir(exist_ok=True)
        return parent / name
    for index in range(1, 1000):
        candidate = parent / (name if index == 1 else f"{name}-{index}")
        try:
            candidate.mkdir()  # atomic: exactly one process gets each name
        except FileExistsError:
            continue
        return candidate
    raise CheckpointError(f"could not create a new run folder for {name!r} under {parent}")


def find_latest_run(parent: Path, identity: Mapping[str, Any]) -> Path | None:
    """The run folder under ``parent`` with a committed checkpoint of the same identity, saved last.

    Args:
        parent: Where run folders live (``--output``).
        identity: ``model``, ``dataset`` and ``implicit`` (the model's implicit settings, or None); a run
            matches when its manifest records the same three.

    Returns:
        The matching folder whose last checkpoint was committed most recently, or None.
    """
    if not parent.is_dir():
        return None
    found: list[tuple[float, str, Path]] = []
    for child in parent.iterdir():
        try:
            manifest = read_manifest(child)
        except CheckpointError:
            continue  # another run's damage is reported when that run is named explicitly
        if manifest is not None and _same_identity(manifest.get("identity", {}), identity):
            found.append((float(manifest.get("saved_at", 0.0)), child.name, child))
    return max(found)[2] if found else None


def _same_identity(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether a saved run is one ``wanted`` describes: the same model and data, and the implicit settings
    ``wanted`` names (the flags given; settings not named follow the run)."""
    if any(_jsonable(saved.get(key)) != _jsonable(wanted.get(key)) for key in ("model", "dataset")):
        return False
    settings, asked = saved.get("implicit"), wanted.get("implicit")
    if settings is None or asked is None:
        return settings is None and asked is None
    settings = complete_settings(settings)
    return all(_jsonable(settings.get(key)) == _jsonable(value) for key, value in asked.items())


def _jsonable(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``checkpoints.json``, or None when the run has committed no checkpoint yet.

    Raises:
        CheckpointError: The manifest is unreadable or names a checkpoint folder that is missing.
    """
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {path}: {first_line(error)}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("last"), dict):
        raise CheckpointError(f"{path} is not a checkpoint manifest (no 'last' entry)")
    for tag in ("last", "best"):
        entry = manifest.get(tag)
        if entry is None:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise CheckpointError(f"{path}: entry {tag!r} has no checkpoint path")
        if not (path.parent / entry["path"] / WEIGHTS).is_file():
            raise CheckpointError(f"{path}: {tag} checkpoint {entry['path']} is missing")
    return manifest


def remove_stale(run_dir: Path) -> list[str]:
    """Deletes what a crash can leave behind: unreferenced checkpoint folders and ``.*.tmp`` files.

    Only the process that writes checkpoints (rank 0) may call this, and only while no other process writes
    into the same run folder.

    Returns:
        The names removed (for tests and logs).
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    referenced = {Path(manifest[tag]["path"]).name for tag in ("last", "best") if manifest and manifest.get(tag)}
    removed = []
    for path in run_dir.glob(".*.tmp"):  # atomic_write's temporary files
        path.unlink(missing_ok=True)
        removed.append(path.name)
    folder = run_dir / CHECKPOINT_DIR
    if folder.is_dir():
        for child in folder.iterdir():
            if child.name in referenced:
                continue
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(f"{CHECKPOINT_DIR}/{child.name}")
    return sorted(removed)


# ---------------------------------------------------------------------------------------------------
# Writing a checkpoint


def commit_checkpoint(
    run_dir: Path,
    *,
    epoch: int,
    weights: dict[str, torch.Tensor],
    metadata: dict[str, str],
    training_state: dict[str, Any],
    identity: Mapping[str, Any],
    is_best: bool,
    best_top1: float,
) -> Path:
    """Writes the checkpoint of ``epoch`` (epochs completed) and commits it as ``last`` (and ``best`` when
    ``is_best``, with ``best_top1``); returns its folder.

    ``weights`` (contiguous CPU tensors) and their safetensors ``metadata`` (str → str) go to ``model.safetensors``,
    ``training_state`` to ``state.pt`` (read back with ``weights_only=True``); the manifest records ``identity``,
    what ``--resume auto`` matches runs by. The steps, each a function so tests can interrupt between them:
    :func:`_write_state`, :func:`_write_weights` (into a fresh hidden folder), :func:`_publish` (rename to its final
    name), :func:`_write_manifest` (the commit), :func:`remove_stale` (cleanup).
    """
    run_dir = Path(run_dir)
    folder = run_dir / CHECKPOINT_DIR
    folder.mkdir(exist_ok=True)
    previous = read_manifest(run_dir)
    staging = folder / f".epoch-{epoch:04d}.{secrets.token_hex(4)}.tmp"
    staging.mkdir()
    _write_state(staging / STATE, training_state)
    _write_weights(staging / WEIGHTS, weights, metadata)
    final = _publish(staging, folder, epoch)
    entry = {"epoch": epoch, "path": f"{CHECKPOINT_DIR}/{final.name}"}
    best = {**entry, "val_top1": best_top1} if is_best or previous is None else previous.get("best")
    manifest = {
        "format": MANIFEST_FORMAT,
        "identity": dict(identity),
        "saved_at": time.time(),
        "last": {**entry, "val_top1": _finite_or_none(metadata.get("val_top1"))},
        "best": best,
    }
    _write_manifest(run_dir, manifest)
    remove_stale(run_dir)
    return final


def _finite_or_none(text: str | None) -> float | None:
    try:
        value = float(text)  # None: TypeError
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _write_state(path: Path, training_state: dict[str, Any]) -> None:
    torch.save(training_state, path)
    _fsync_file(path)


def _write_weights(path: Path, weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    safetensors.torch.save_file(weights, str(path), metadata)
    _fsync_file(path)


def _publish(staging: Path, folder: Path, epoch: int) -> Path:
    """Renames the complete staging folder to the first unused ``epoch-NNNN[-k]`` (never replacing one)."""
    base = f"epoch-{epoch:04d}"
    for index in range(1, 1000):
        final = folder / (base if index == 1 else f"{base}-{index}")
        if final.exists():
            continue
        os.rename(staging, final)
        _fsync_dir(folder)
        return final
    raise CheckpointError(f"no free checkpoint name for epoch {epoch} under {folder}")


def _write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(run_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    _fsync_dir(run_dir)


# ---------------------------------------------------------------------------------------------------
# Finding and reading a checkpoint


@dataclass
class CheckpointRef:
    """Where one checkpoint's files are.

    Attributes:
        weights: The ``.safetensors`` file.
        state: The training-state file, or None for weights alone (a converted reference checkpoint).
        label: How to name it in messages.
    """

    weights: Path
    state: Path | None
    label: str

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata (str → str); raises :class:`CheckpointError` for an unreadable file."""
        if not self.weights.is_file():
            raise CheckpointError(f"no checkpoint at {self.weights}")
        try:
            with safetensors.safe_open(str(self.weights), "pt") as handle:
                return dict(handle.metadata() or {})
        except Exception as error:  # safetensors raises its own error types for a torn or foreign file
            raise CheckpointError(f"cannot read {self.weights}: {first_line(error)}") from None

    def config(self) -> dict[str, Any] | None:
        """The run config stored with the weights (JSON in the metadata), or None for older/converted files."""
        text = self.metadata().get("config")
        if text is None:
            return None
        try:
            config = json.loads(text)
        except json.JSONDecodeError:
            raise CheckpointError(f"{self.weights}: its stored config is not valid JSON") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{self.weights}: its stored config is not a JSON object")
        return config

    def load_weights(self) -> dict[str, torch.Tensor]:
        """The tensors; raises :class:`CheckpointError` for an unreadable file."""
        self.metadata()
        try:
            return safetensors.torch.load_file(str(self.weights))
        except Exception as error:
            raise CheckpointError(f"cannot read {self.weights}: {first_line(error)}") from None

    def load_state(self) -> dict[str, Any]:
        """``state.pt`` read with ``torch.load(weights_only=True)``, its entries checked (:data:`STATE_FIELDS`)."""
        if self.state is None or not self.state.is_file():
            raise CheckpointError(
                f"{self.weights} has no training state next to it ({STATE} or <name>.state.pt): "
                "it can be evaluated (--eval-only) but not resumed"
            )
        try:
            saved = torch.load(self.state, map_location="cpu", weights_only=True)
        except Exception as error:  # unpickling errors come in many types; all mean "unusable file"
            raise CheckpointError(f"cannot read {self.state}: {first_line(error)}") from None
        if not isinstance(saved, dict):
            raise CheckpointError(f"{self.state} is not a training state (a {type(saved).__name__}, not a dict)")
        _check_training_state(saved, self.state)
        return saved


def resolve_checkpoint(spec: str | Path) -> CheckpointRef:
    """Finds the checkpoint named by ``--resume`` (anything but ``auto``).

    Accepted: a run folder (its last checkpoint); ``RUN/last``, ``RUN/best`` or ``RUN/checkpoints.json``;
    a checkpoint folder ``RUN/checkpoints/epoch-NNNN``; its ``model.safetensors``; a ``.safetensors`` file
    alone (weights only, e.g. from ``convert.py``); and the older layout ``<tag>.safetensors`` +
    ``<tag>.state.pt`` by either file or the common prefix.

    Raises:
        CheckpointError: Nothing usable at ``spec``.
    """
    path = Path(spec)
    if path.is_dir():
        if (path / MANIFEST).is_file() or (path / CHECKPOINT_DIR).is_dir():
            return _from_manifest(path, "last")
        if (path / WEIGHTS).is_file():
            return CheckpointRef(path / WEIGHTS, path / STATE, str(path))
        raise CheckpointError(f"no checkpoint in {path} (expected {MANIFEST} or {WEIGHTS})")
    if path.name == MANIFEST:
        return _from_manifest(path.parent, "last")
    if path.name in ("last", "best") and (path.parent / MANIFEST).is_file():
        return _from_manifest(path.parent, path.name)
    if path.name == WEIGHTS and path.is_file():
        return CheckpointRef(path, path.with_name(STATE), str(path.parent))
    for suffix in (".safetensors", ".state.pt"):  # the older <tag>.safetensors + <tag>.state.pt layout
        if path.name.endswith(suffix):
            path = path.with_name(path.name[: -len(suffix)])
    weights = path.with_name(path.name + ".safetensors")
    if not weights.is_file():
        raise CheckpointError(f"no checkpoint at {spec} (give a run folder, RUN/last, RUN/best or a .safetensors)")
    state = path.with_name(path.name + ".state.pt")
    return CheckpointRef(weights, state if state.is_file() else None, str(weights))


def _from_manifest(run_dir: Path, tag: str) -> CheckpointRef:
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise CheckpointError(f"{run_dir} has no committed checkpoint ({MANIFEST} missing)")
    entry = manifest.get(tag)
    if entry is None:
        raise CheckpointError(f"{run_dir / MANIFEST} has no {tag!r} checkpoint")
    folder = run_dir / entry["path"]
    return CheckpointRef(folder / WEIGHTS, folder / STATE, f"{run_dir}/{tag} ({entry['path']})")


def locate_run(
    parent: Path, experiment: str | None, resume: str | None, identity: Mapping[str, Any]
) -> tuple[Path, CheckpointRef | None]:
    """The run folder to write into (created) and the checkpoint to resume from, if any.

    * ``experiment``: the folder ``parent/experiment``. ``resume="auto"`` continues it when it holds a committed
      checkpoint and starts it otherwise; without ``resume`` a folder that already holds a run is refused
      (runs never overwrite each other).
    * no ``experiment``: ``resume="auto"`` continues the latest run under ``parent`` of the same ``identity``
      (:func:`find_latest_run`); otherwise (or when there is none) a new folder
      ``parent/<YYYYmmdd-HHMMSS>-<model>-<dataset>`` is created.
    * ``resume=PATH`` loads that checkpoint (:func:`resolve_checkpoint`) and writes into the folder chosen as above.

    ``parent``, ``experiment`` and ``resume`` are ``--output``, ``--experiment`` and ``--resume``; ``identity`` is
    :func:`run_identity`'s.

    Raises:
        CheckpointError: The named run folder holds a run and would be overwritten, or the checkpoint is unusable.
    """
    ref = resolve_checkpoint(resume) if resume not in (None, "auto") else None
    if experiment:
        run_dir = parent / experiment
        manifest = read_manifest(run_dir)
        if resume == "auto" and manifest is not None:
            ref = resolve_checkpoint(run_dir)
        elif manifest is not None and not (ref and ref.weights.resolve().is_relative_to(run_dir.resolve())):
            raise CheckpointError(
                f"{run_dir} already holds a run (epoch {manifest['last'].get('epoch')}): continue it with "
                "--resume auto, or choose another --experiment"
            )
        return claim_run_dir(parent, experiment, unique=False), ref
    if resume == "auto":
        found = find_latest_run(parent, identity)
        if found is not None:
            return found, resolve_checkpoint(found)
    name = default_experiment_name(identity["model"], identity["dataset"])
    return claim_run_dir(parent, name, unique=True), ref


def checkpoint_to_evaluate(
    parent: Path, experiment: str | None, resume: str, identity: Mapping[str, Any], required: bool = True
) -> CheckpointRef | None:
    """The checkpoint ``--eval-only`` reads: ``resume`` as a path, or for ``"auto"`` the run :func:`locate_run`
    would continue (nothing is created); None when ``"auto"`` finds none and it is not ``required``.

    Raises:
        CheckpointError: There is none (and one is ``required``), or it is unusable.
    """
    if resume != "auto":
        return resolve_checkpoint(resume)
    run_dir = parent / experiment if experiment else find_latest_run(parent, identity)
    if run_dir is None or read_manifest(run_dir) is None:
        if not required:
            return None
        where = run_dir or f"{parent} (for {identity['model']} on {identity['dataset']} with these settings)"
        raise CheckpointError(f"--resume auto found no checkpoint to evaluate in {where}")
    return resolve_checkpoint(run_dir)


# ---------------------------------------------------------------------------------------------------
# train.py's run: what identifies it, and its resolved config


def run_identity(args: Namespace, img_size: int, implicit: Mapping[str, Any] | None) -> dict[str, Any]:
    """What makes two runs continuations of each other (``--resume auto`` only picks a run with the same): the
    flags' model, data and model kwargs, the input size and the model's ``implicit_settings`` (None: no iMixer)."""
    return {
        "model": args.model, "dataset": args.dataset,
        "data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None, "img_size": img_size,
        "model_kwargs": {key: repr(value) for key, value in sorted(args.model_kwargs.items())},
        "implicit": None if implicit is None else dict(implicit),
    }  # fmt: skip


def resolved_config(
    args: Namespace, model: torch.nn.Module, loaders: Any, world_size: int, device: torch.device,
    run_dir: Path | None, resumed_from: str | None,
) -> dict[str, Any]:  # fmt: skip
    """All flags, the model's resolved settings, the data, the versions and the seed: ``args.yaml``/``config.json``
    and the ``config`` stored in every checkpoint (``loaders``: train.py's ``Loaders``)."""
    config = {
        "args": vars(args), "seed": args.seed,
        "model": {"name": args.model, "architecture": timm.models.get_pretrained_cfg(args.model).architecture,
                  "num_classes": loaders.num_classes, "in_chans": loaders.in_chans, "img_size": loaders.img_size,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "implicit_settings": getattr(model, "implicit_settings", None)},
        "data": {"dataset": args.dataset, "train_images": loaders.train_images, "val_images": loaders.val_images,
                 "batch_size_per_process": args.batch_size, "global_batch_size": args.batch_size * world_size,
                 "steps_per_epoch": len(loaders.train)},
        "run": {"dir": str(run_dir) if run_dir is not None else None,
                "started": datetime.now().isoformat(timespec="seconds"), "resumed_from": resumed_from,
                "world_size": world_size, "device": str(device), "command": " ".join(sys.argv)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                     "implicitlayers": il.__version__, "numpy": np.__version__},
    }  # fmt: skip
    return json.loads(json.dumps(config, default=repr))  # plain JSON types (tuples → lists), for YAML too


def write_config(run_dir: Path, config: Mapping[str, Any]) -> None:
    """``config.json`` always; ``args.yaml`` (timm's name) when PyYAML is importable (timm depends on it)."""
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2) + "\n")
    try:
        import yaml
    except ImportError:
        return
    atomic_write_text(run_dir / "args.yaml", yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False))


# ---------------------------------------------------------------------------------------------------
# train.py's training state: what state.pt holds, written and restored


# What state.pt must hold, and the types (checked before anything is restored).
STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "epoch": (int,), "best_top1": (float, int), "history": (str,), "optimizer": (dict,), "scheduler": (dict,),
    "scaler": (dict, type(None)), "ema": (dict, type(None)), "rng": (dict,), "args": (str,),
}  # fmt: skip
# The flags that define the learning-rate schedule: a resumed run restores the saved schedule only if they agree.
SCHEDULE_FLAGS = ("sched", "epochs", "warmup_epochs", "warmup_lr", "min_lr", "lr")


def save_training(
    run_dir: Path, state: Any, *, args: Mapping[str, Any], config: Mapping[str, Any], identity: Mapping[str, Any],
    is_best: bool,
) -> Path:  # fmt: skip
    """Commits a checkpoint of ``state`` (train.py's ``TrainState``: an engine ``Trainer`` with ``epoch``,
    ``best_top1``, ``history`` and ``wall_seconds``) as ``last`` (and ``best`` when ``is_best``).

    Weights go to ``model.safetensors`` with metadata (epoch, model, val top-1, the config as JSON); the optimiser,
    schedule, scaler, EMA, history, flags (``args``) and the random generators' states to ``state.pt``.
    """
    config_text = json.dumps(config)
    training_state = {
        "epoch": state.epoch, "best_top1": state.best_top1, "wall_seconds": state.wall_seconds,
        "history": json.dumps(state.history), "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "ema": state.ema.state_dict() if state.ema is not None else None,
        "rng": _capture_rng(), "args": json.dumps(dict(args), default=repr), "config": config_text,
    }  # fmt: skip
    weights = {key: value.detach().cpu().contiguous() for key, value in unwrap_model(state.model).state_dict().items()}
    val_top1 = state.history[-1]["val_top1"] if state.history else math.nan
    metadata = {"epoch": str(state.epoch), "model": args["model"], "val_top1": repr(val_top1), "config": config_text}
    return commit_checkpoint(
        run_dir, epoch=state.epoch, weights=weights, metadata=metadata, training_state=training_state,
        identity=identity, is_best=is_best, best_top1=state.best_top1,
    )  # fmt: skip


def load_weights(ref: CheckpointRef, model: torch.nn.Module, model_name: str) -> dict[str, str]:
    """Loads the checkpoint's weights strictly into the (unwrapped) model; returns its metadata.

    Raises:
        CheckpointError: Unreadable, or not this model's.
    """
    metadata, weights = ref.metadata(), ref.load_weights()
    try:
        unwrap_model(model).load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"{ref.weights} does not match model {model_name}: {first_line(error)}") from None
    return metadata


def restore_training(ref: CheckpointRef, state: Any, args: Mapping[str, Any]) -> None:
    """Restores the weights and the whole training state of a :func:`save_training` checkpoint into ``state``.

    timm schedules are functions of the update count, which resumes with the epoch. Restoring the saved one matters
    only for the same plan (timm's ``load_state_dict`` copies attributes, whatever the class): with other
    :data:`SCHEDULE_FLAGS` the fresh schedule takes over at the same update count.

    Raises:
        CheckpointError: Missing, unreadable, torn, mismatched or malformed checkpoint.
    """
    metadata = load_weights(ref, state.model, args["model"])
    saved = ref.load_state()
    if str(saved["epoch"]) != metadata.get("epoch"):
        raise CheckpointError(f"{ref.state} (epoch {saved['epoch']}) and its weights (epoch "
                              f"{metadata.get('epoch')}) differ: the checkpoint is torn")  # fmt: skip
    try:
        state.optimizer.load_state_dict(saved["optimizer"])
        saved_args = json.loads(saved["args"])
        if all(saved_args.get(key) == args[key] for key in SCHEDULE_FLAGS):
            state.scheduler.load_state_dict(saved["scheduler"])
        if state.scaler is not None and saved["scaler"] is not None:
            state.scaler.load_state_dict(saved["scaler"])
        if state.ema is not None and saved["ema"] is not None:
            state.ema.load_state_dict(saved["ema"])
        history = json.loads(saved["history"])
        _restore_rng(saved["rng"])
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError, SyntaxError) as error:
        raise CheckpointError(f"{ref.state} does not match this run: {first_line(error)}") from None
    if not isinstance(history, list):
        raise CheckpointError(f"{ref.state}: its history is not a list of epochs")
    state.epoch, state.best_top1, state.history = int(saved["epoch"]), float(saved["best_top1"]), history
    state.wall_seconds = float(saved.get("wall_seconds", 0.0))


def _check_training_state(saved: dict[str, Any], path: Path | None) -> None:
    for key, types in STATE_FIELDS.items():
        if key not in saved:
            raise CheckpointError(f"{path} is not a training state of this script: no {key!r} entry")
        if not isinstance(saved[key], types) or isinstance(saved[key], bool):
            raise CheckpointError(f"{path}: {key!r} is a {type(saved[key]).__name__}, not a training-state entry")
    rng = saved["rng"]
    if not (isinstance(rng.get("torch"), torch.Tensor) and isinstance(rng.get("numpy"), str)
            and isinstance(rng.get("python"), str)):  # fmt: skip
        raise CheckpointError(f"{path}: 'rng' does not hold the torch, numpy and python generator states")


def _capture_rng() -> dict[str, Any]:
    """The torch (and CUDA), NumPy and Python generator states; NumPy's and Python's as text (JSON and
    ``repr``), since ``torch.load(weights_only=True)`` refuses NumPy arrays."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = json.dumps([kind, keys.tolist(), pos, has_gauss, cached])
    rng = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": repr(random.getstate())}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    kind, keys, pos, has_gauss, cached = json.loads(rng["numpy"])
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(ast.literal_eval(rng["python"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ---------------------------------------------------------------------------------------------------
# Checking a checkpoint's settings against this run


def saved_implicit_settings(metadata: Mapping[str, str], config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The token mixers' settings a checkpoint was trained (or converted) with, or None when unknown.

    train.py stores the whole config (``config["model"]["implicit_settings"]``); ``convert.py`` stores
    ``reference_iterations`` in the metadata. See :func:`complete_settings` for settings it lacks.
    """
    if config is not None:
        settings = config.get("model", {}).get("implicit_settings")
        return complete_settings(settings) if isinstance(settings, dict) else None
    text = metadata.get("reference_iterations")
    if text in ("None", ""):
        return complete_settings({"reference_iterations": None})
    return complete_settings({"reference_iterations": int(text)}) if text is not None and text.isdigit() else None


def complete_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Recorded settings with the ones they lack: ``activation`` absent means the paper's GELU (every
    checkpoint written before F's activation became a setting, and every converted reference checkpoint);
    a setting added later means its default, which is what those runs did."""
    return {**IMixerSettings().to_dict(), "activation": "gelu", **settings}


def settings_with_checkpoint(
    given: Mapping[str, Any], model_kwargs: Mapping[str, Any], saved: Mapping[str, Any]
) -> dict[str, Any]:
    """The implicit flags ``given``, completed by the checkpoint's settings ``saved`` wherever neither a flag nor
    ``--model-kwargs`` names them. Under a reference loop (given or saved) the options it fixes are left to it, so
    that ``--reference-iterations 3`` continues a run of 2 and a solved run can be evaluated as a loop.

    Raises:
        CheckpointError: A flag conflicts with the checkpoint's settings (``--activation`` on a reference loop).
    """
    names = {setting.name for setting in dataclasses.fields(IMixerSettings)}
    named = {name for name in names if name in given or name in model_kwargs}
    settings = {name: value for name, value in saved.items() if name in names and name not in named} | dict(given)
    if settings.get("reference_iterations") is not None:
        fixed = {*REFERENCE_COMPUTATION, "max_iter"}
        settings = {name: value for name, value in settings.items() if name in named or name not in fixed}
    try:
        IMixerSettings.build(**{**{k: v for k, v in model_kwargs.items() if k in names}, **settings})
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"the flags given and the checkpoint's settings disagree: {error}") from None
    return settings


def settings_to_resume(
    parent: Path, experiment: str | None, resume: str | None, wanted: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The implicit settings of the checkpoint this invocation will load (nothing is created), or None.

    The checkpoint is the one :func:`locate_run` (training) or :func:`checkpoint_to_evaluate` (``--eval-only``)
    picks: ``resume`` as a path, the ``experiment`` folder's with ``resume="auto"``, or the latest run under
    ``parent`` of ``wanted``'s identity (the settings this command would train with: that run has them). A
    checkpoint named by its path or folder is continued, or evaluated, with the settings it was trained
    with wherever no flag says otherwise; train.py builds the model with them.
    """
    ref = None if resume is None else checkpoint_to_evaluate(parent, experiment, resume, wanted, required=False)
    return None if ref is None else saved_implicit_settings(ref.metadata(), ref.config())


def implicit_mismatches(
    saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None
) -> tuple[list[str], list[str]]:
    """The differences between a checkpoint's implicit settings and this run's, split by severity.

    Args:
        saved: The checkpoint's settings (possibly partial), or None when unknown.
        current: This model's ``implicit_settings`` (None for the vanilla Mixer).

    Returns:
        ``(structural, numerical)``: ``"key: saved → current"`` texts; structural differences change the
        function the network computes (``IMixerSettings.STRUCTURAL``: a checkpoint trained with one value is
        another model under another), numerical ones how closely or how fast the same fixed point is computed.
    """
    if saved is None or current is None:
        return [], []
    structural, numerical = [], []
    for key, value in saved.items():
        if key not in current or _jsonable(current[key]) == _jsonable(value):
            continue
        text = f"{key} {value} (checkpoint) vs {current[key]} (now)"
        (structural if key in IMixerSettings.STRUCTURAL else numerical).append(text)
    return structural, numerical


def check_compatible(ref: CheckpointRef, model: torch.nn.Module, model_name: str, allow_mismatch: bool) -> list[str]:
    """Compares the checkpoint's implicit settings (its stored config, or convert.py's metadata) and model name
    with this run's.

    Structural differences (``IMixerSettings.STRUCTURAL``: another function) refuse the checkpoint unless
    ``allow_mismatch`` (``--allow-implicit-mismatch``); they, the numerical ones (solver, tolerance, budget,
    gradient mode, power iterations) and another model name are returned, for one warning line.

    Raises:
        CheckpointError: A structural mismatch, naming the flags that would match the checkpoint.
    """
    metadata = ref.metadata()
    saved = saved_implicit_settings(metadata, ref.config())
    structural, numerical = implicit_mismatches(saved, getattr(unwrap_model(model), "implicit_settings", None))
    if structural and not allow_mismatch:
        flags = []
        for key in IMixerSettings.STRUCTURAL:
            if any(text.startswith(f"{key} ") for text in structural):
                flag = dataclass_flag(key)  # train.py's flag of the setting
                flags.append(f"no {flag}" if saved[key] is None else f"{flag} {saved[key]}")
        raise CheckpointError(
            f"{ref.label} was trained with other implicit settings: {'; '.join(structural)}; pass the same flags "
            f"({', '.join(flags)}) or --allow-implicit-mismatch to load it anyway"
        )
    saved_model = metadata.get("model")
    if saved_model and saved_model != model_name:
        numerical.append(f"model {saved_model} (checkpoint) vs {model_name} (now)")
    return structural + numerical
