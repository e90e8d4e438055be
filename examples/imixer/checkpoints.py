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
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

__all__ = [
    "CHECKPOINT_DIR",
    "MANIFEST",
    "STATE",
    "WEIGHTS",
    "CheckpointError",
    "CheckpointRef",
    "atomic_write",
    "claim_run_dir",
    "commit_checkpoint",
    "default_experiment_name",
    "find_latest_run",
    "implicit_mismatches",
    "read_manifest",
    "remove_stale",
    "resolve_checkpoint",
]

MANIFEST = "checkpoints.json"
CHECKPOINT_DIR = "checkpoints"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
MANIFEST_FORMAT = 1

# Implicit settings that change the function the network computes: a checkpoint trained with one value is a
# different model under another (the reference loop's n Picard steps are not the solved (1 - F)^-1; hidden_ratio
# changes shapes; coeff rescales every spectrally normalised weight). The others (solver, tolerance, budget,
# gradient mode, power iterations, start) change how closely or how fast the same fixed point is computed.
STRUCTURAL_SETTINGS = ("reference_iterations", "hidden_ratio", "coeff", "activation")


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
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
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
        if not (child / MANIFEST).is_file():
            continue
        try:
            manifest = read_manifest(child)
        except CheckpointError:
            continue  # another run's damage is reported when that run is named explicitly
        if manifest is not None and _same_identity(manifest.get("identity", {}), identity):
            found.append((float(manifest.get("saved_at", 0.0)), child.name, child))
    return max(found)[2] if found else None


def _same_identity(saved: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    return all(_jsonable(saved.get(key)) == _jsonable(current.get(key)) for key in ("model", "dataset", "implicit"))


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
        raise CheckpointError(f"cannot read {path}: {_first_line(error)}") from None
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
    referenced = set()
    if manifest is not None:
        referenced = {Path(manifest[tag]["path"]).name for tag in ("last", "best") if manifest.get(tag)}
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
    """Writes one checkpoint and commits it as ``last`` (and ``best`` when ``is_best``).

    The steps, each a function so tests can interrupt between them: :func:`_write_state`,
    :func:`_write_weights` (into a fresh hidden folder), :func:`_publish` (rename to its final name),
    :func:`_write_manifest` (the commit), :func:`remove_stale` (cleanup).

    Args:
        run_dir: The run folder.
        epoch: Epochs completed; names the folder.
        weights: The model's state dict (contiguous CPU tensors).
        metadata: safetensors metadata (str → str).
        training_state: What ``state.pt`` holds (loaded back with ``weights_only=True``).
        identity: ``model``, ``dataset``, ``implicit``: what ``--resume auto`` matches runs by.
        is_best: Whether this checkpoint becomes ``best``.
        best_top1: The best validation top-1 so far (recorded in the manifest).

    Returns:
        The committed checkpoint folder.
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
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


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
            raise CheckpointError(f"cannot read {self.weights}: {_first_line(error)}") from None

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
            raise CheckpointError(f"cannot read {self.weights}: {_first_line(error)}") from None

    def load_state(self) -> dict[str, Any]:
        """``state.pt`` read with ``torch.load(weights_only=True)``; must be a dict."""
        if self.state is None or not self.state.is_file():
            raise CheckpointError(
                f"{self.weights} has no training state next to it ({STATE} or <name>.state.pt): "
                "it can be evaluated (--eval-only) but not resumed"
            )
        try:
            saved = torch.load(self.state, map_location="cpu", weights_only=True)
        except Exception as error:  # unpickling errors come in many types; all mean "unusable file"
            raise CheckpointError(f"cannot read {self.state}: {_first_line(error)}") from None
        if not isinstance(saved, dict):
            raise CheckpointError(f"{self.state} is not a training state (a {type(saved).__name__}, not a dict)")
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


# ---------------------------------------------------------------------------------------------------
# Checking a checkpoint's settings against this run


def saved_implicit_settings(metadata: Mapping[str, str], config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The token mixers' settings a checkpoint was trained (or converted) with, or None when unknown.

    train.py stores the whole config (``config["model"]["implicit_settings"]``); ``convert.py`` stores
    ``reference_iterations`` in the metadata. Settings without ``activation`` (every checkpoint written
    before F's activation became a setting, and every converted reference checkpoint) mean the paper's
    GELU: saying so turns a missing-β load error into a structural mismatch with its flag.
    """
    settings = _recorded_implicit_settings(metadata, config)
    return None if settings is None else {"activation": "gelu", **settings}


def _recorded_implicit_settings(metadata: Mapping[str, str], config: Mapping[str, Any] | None) -> dict | None:
    if config is not None:
        settings = config.get("model", {}).get("implicit_settings")
        return dict(settings) if isinstance(settings, dict) else None
    text = metadata.get("reference_iterations")
    if text is None:
        return None
    if text in ("None", ""):
        return {"reference_iterations": None}
    return {"reference_iterations": int(text)} if text.isdigit() else None


def implicit_mismatches(
    saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None
) -> tuple[list[str], list[str]]:
    """The differences between a checkpoint's implicit settings and this run's, split by severity.

    Args:
        saved: The checkpoint's settings (possibly partial), or None when unknown.
        current: This model's ``implicit_settings`` (None for the vanilla Mixer).

    Returns:
        ``(structural, numerical)``: ``"key: saved → current"`` texts; structural differences change the
        function the network computes (:data:`STRUCTURAL_SETTINGS`), numerical ones how it is solved.
    """
    if saved is None or current is None:
        return [], []
    structural, numerical = [], []
    for key, value in saved.items():
        if key not in current or _jsonable(current[key]) == _jsonable(value):
            continue
        text = f"{key} {value} (checkpoint) vs {current[key]} (now)"
        (structural if key in STRUCTURAL_SETTINGS else numerical).append(text)
    return structural, numerical


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
