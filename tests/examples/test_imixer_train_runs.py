"""examples/imixer/train.py: run folders, resume, the saved config, implicit-settings checks, crash-safe checkpoints.

Tiny digits runs (one or two epochs, ``embed_dim=8``, one block), in-process.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from tests.examples.test_imixer_train import (  # noqa: F401  (_skip_plots: an autouse fixture)
    TINY,
    _skip_plots,
    assert_same_training,
    checkpoint_files,
    run_main,
    saved_state,
    weights,
)

train = pytest.importorskip("examples.imixer.train")
from examples.imixer import checkpoints  # noqa: E402


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its contents."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def history(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def main_in(parent: Path, *args: str) -> int:
    """``train.main`` with the tiny model under ``--output parent`` (no --experiment unless given)."""
    return train.main([*TINY, "--output", str(parent), "--no-progress", *args])


STEP_SECONDS = 1.0  # what one training step costs on the fake clock


class FakeClock:
    """Stands in for train.py's ``time`` module: time passes only in training steps, ``STEP_SECONDS`` each."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    clock, train_step = FakeClock(), train.train_step

    def timed_step(*args):
        clock.now += STEP_SECONDS
        return train_step(*args)

    monkeypatch.setattr(train, "time", clock)
    monkeypatch.setattr(train, "train_step", timed_step)
    return clock


# ---------------------------------------------------------------------------------------------------
# Run folders


def test_runs_get_their_own_folders_and_never_overwrite_each_other(tmp_path: Path, capsys) -> None:
    """The issue's case: the default run, then ``--reference-iterations 2``, must both survive."""
    assert main_in(tmp_path, "--epochs", "1") == 0
    (first,) = tmp_path.iterdir()
    before = fingerprint(first)
    assert main_in(tmp_path, "--epochs", "1", "--reference-iterations", "2") == 0
    folders = sorted(path.name for path in tmp_path.iterdir())
    assert len(folders) == 2 and all("-imixer_t2_8-digits" in name for name in folders)
    assert fingerprint(first) == before  # metrics, summary, config and checkpoints untouched

    # A chosen --experiment that already holds a run is refused (one line), and left as it was.
    assert main_in(tmp_path, "--epochs", "1", "--experiment", "named") == 0
    named = fingerprint(tmp_path / "named")
    capsys.readouterr()
    assert main_in(tmp_path, "--epochs", "1", "--experiment", "named") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a run" in err and "--resume auto" in err
    assert fingerprint(tmp_path / "named") == named


def test_generated_names_never_collide(tmp_path: Path) -> None:
    """Runs started in the same second get -2, -3 ... (mkdir is atomic: one process wins each name)."""
    name = checkpoints.default_experiment_name("imixer_t4_32", "cifar10")
    folders = [checkpoints.claim_run_dir(tmp_path, name, unique=True) for _ in range(3)]
    assert [folder.name for folder in folders] == [name, f"{name}-2", f"{name}-3"]
    assert name[:8].isdigit() and name[8] == "-" and name.endswith("-imixer_t4_32-cifar10")


def test_resume_auto_continues_the_latest_run_with_the_same_settings(
    tmp_path: Path, capsys, fake_clock: FakeClock
) -> None:
    """Times come from a fake clock on which each training step takes ``STEP_SECONDS`` (11 steps per epoch)."""
    epoch = 11 * STEP_SECONDS  # 1437 digits // batch 128
    assert main_in(tmp_path, "--epochs", "1") == 0
    (solved,) = tmp_path.iterdir()
    first = json.loads((solved / "summary.json").read_text())
    assert first["wall_seconds"] == first["session_seconds"] == history(solved)[0]["epoch_seconds"] == epoch
    assert history(solved)[0]["images_per_second"] == 11 * 128 / epoch
    assert main_in(tmp_path, "--epochs", "1", "--reference-iterations", "2", "--experiment", "ref") == 0
    ref_before = fingerprint(tmp_path / "ref")

    # Without --experiment: the latest run of this model, data and implicit settings (not the newer ref run).
    capsys.readouterr()
    assert main_in(tmp_path, "--epochs", "2", "--resume", "auto") == 0
    assert f"after epoch 1 ({epoch:.1f} s of training so far)" in capsys.readouterr().out
    assert [entry["epoch"] for entry in history(solved)] == [1, 2]
    assert fingerprint(tmp_path / "ref") == ref_before
    # The total training time goes on from the checkpoint's: this session's one epoch on top of the first's.
    second = json.loads((solved / "summary.json").read_text())
    assert history(solved)[1]["epoch_seconds"] == second["session_seconds"] == epoch
    assert second["wall_seconds"] == saved_state(solved)["wall_seconds"] == 2 * epoch
    # Resuming the finished run trains nothing and keeps the recorded total exactly.
    assert main_in(tmp_path, "--epochs", "2", "--resume", "auto") == 0
    third = json.loads((solved / "summary.json").read_text())
    assert (third["wall_seconds"], third["session_seconds"], third["epochs"]) == (2 * epoch, 0.0, 2)
    # With --experiment: that folder.
    assert main_in(tmp_path, "--epochs", "2", "--resume", "auto", "--reference-iterations", "2",
                   "--experiment", "ref") == 0  # fmt: skip
    assert [entry["epoch"] for entry in history(tmp_path / "ref")] == [1, 2]
    # No matching run (another model): a new folder, from scratch.
    capsys.readouterr()
    assert main_in(tmp_path, "--epochs", "1", "--resume", "auto", "--model", "mixer_t2_8") == 0
    assert "resumed" not in capsys.readouterr().out
    assert len(list(tmp_path.iterdir())) == 3


def test_resume_from_a_path_writes_into_a_new_folder(tmp_path: Path, one_epoch: Path) -> None:
    source = one_epoch
    before = fingerprint(source)
    assert run_main(tmp_path, "--epochs", "2", "--resume", str(source / "last"), name="continued")[0] == 0
    assert fingerprint(source) == before
    assert [entry["epoch"] for entry in history(tmp_path / "continued")] == [1, 2]
    config = json.loads((tmp_path / "continued" / "config.json").read_text())
    assert config["run"]["resumed_from"].startswith(str(source / "last"))


# ---------------------------------------------------------------------------------------------------
# The resolved config


def test_config_is_saved_in_the_folder_and_in_every_checkpoint(one_epoch: Path) -> None:
    output = one_epoch
    config = json.loads((output / "config.json").read_text())
    assert yaml.safe_load((output / "args.yaml").read_text()) == config
    assert config["seed"] == 0 and config["args"]["drop_path"] == 0.1 and config["args"]["lr"] == 4e-3
    assert config["args"]["settings"] == {}  # the implicit flags as given (none); the model's resolved values below
    settings = config["model"]["implicit_settings"]
    assert settings["tol"] == 1e-2 and settings["solver"] == "anderson" and settings["reference_iterations"] is None
    assert (settings["backward"], settings["activation"]) == ("ift", "gelu")  # the model's defaults: the paper's
    assert settings["hidden_ratio"] == 2.0 and settings["max_iter"] == 30
    assert set(config["versions"]) >= {"torch", "timm", "implicitlayers"}
    assert config["versions"]["torch"] == torch.__version__
    assert config["data"]["train_images"] == 1437 and config["data"]["global_batch_size"] == 128
    weights_path, _ = checkpoint_files(output)
    with safetensors.safe_open(str(weights_path), "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["config"]) == config and metadata["epoch"] == "1"
    assert json.loads(saved_state(output)["config"]) == config


# ---------------------------------------------------------------------------------------------------
# Implicit settings checked on load


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    status, output = run_main(tmp_path_factory.mktemp("ref"), "--epochs", "1", "--reference-iterations", "2")
    assert status == 0
    return output


def test_a_checkpoint_is_evaluated_and_resumed_with_its_own_structural_settings(
    reference_run: Path, tmp_path: Path, capsys
) -> None:
    best = str(reference_run / "best")
    # No flag: the checkpoint's settings (here the reference loop, reference_iterations 2).
    assert train.main([*TINY, "--eval-only", "--resume", best]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "(after epoch 1)" in captured.out

    # A flag naming another function is refused, in one line naming the flag that would match.
    assert train.main([*TINY, "--eval-only", "--resume", best, "--reference-iterations", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "reference_iterations 2 (checkpoint) vs None (now)" in err
    assert "--reference-iterations 2" in err and "--allow-implicit-mismatch" in err

    # Allowed, the weights load into the solved map of the same F (the paper's GELU)...
    assert train.main([*TINY, "--eval-only", "--resume", best, "--reference-iterations", "none",
                       "--allow-implicit-mismatch"]) == 0  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("train.py: warning:") and "reference_iterations" in err
    # ... but not into a LipSwish F, whose β the checkpoint lacks: refused, one error line.
    assert train.main([*TINY, "--eval-only", "--resume", best, "--reference-iterations", "none",
                       "--activation", "lipswish", "--allow-implicit-mismatch"]) == 2  # fmt: skip
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("train.py: error:") and "does not match model imixer_t2_8" in lines[-1]

    # Resuming training with another structural setting is refused the same way.
    shutil.copytree(reference_run, tmp_path / "run")
    assert run_main(tmp_path, "--epochs", "2", "--resume", "auto", "--reference-iterations", "3")[0] == 2
    assert "reference_iterations 2 (checkpoint) vs 3 (now)" in capsys.readouterr().err


def test_a_run_of_earlier_defaults_resumes_and_evaluates_with_its_settings(tmp_path: Path, capsys) -> None:
    # Runs saved under the earlier default (LipSwish in F, SHINE gradients) record those settings: they
    # evaluate and resume as trained, with no flag; a flag for the paper's GELU is refused as another F.
    status, output = run_main(tmp_path, "--epochs", "1", "--activation", "lipswish", "--backward", "shine")
    assert status == 0
    settings = json.loads((output / "config.json").read_text())["model"]["implicit_settings"]
    assert settings["activation"] == "lipswish" and settings["backward"] == "shine"
    capsys.readouterr()
    best = str(output / "best")
    assert train.main([*TINY, "--eval-only", "--resume", best]) == 0
    assert capsys.readouterr().err == ""
    assert train.main([*TINY, "--eval-only", "--resume", best, "--activation", "gelu"]) == 2  # another F
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "activation lipswish (checkpoint) vs gelu (now)" in err
    assert "--activation lipswish" in err
    # Training goes on in the same folder with the run's own settings, with no warning.
    assert run_main(tmp_path, "--epochs", "2", "--resume", "auto", name="run")[0] == 0
    assert capsys.readouterr().err == ""
    assert [entry["epoch"] for entry in history(output)] == [1, 2]
    resumed = json.loads(saved_state(output)["config"])["model"]["implicit_settings"]
    assert (resumed["activation"], resumed["backward"]) == ("lipswish", "shine")


def test_numerical_setting_changes_warn_and_go_on(tmp_path: Path, one_epoch: Path, capsys) -> None:
    output = tmp_path / "run"
    shutil.copytree(one_epoch, output)
    assert run_main(tmp_path, "--epochs", "2", "--resume", "auto", "--tol", "1e-4", "--backward", "jfb")[0] == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tol 0.01 (checkpoint) vs 0.0001 (now)" in err
    assert "backward ift (checkpoint) vs jfb (now)" in err
    assert json.loads(saved_state(output)["config"])["model"]["implicit_settings"]["tol"] == 1e-4


def test_converted_weights_carry_reference_iterations(tmp_path: Path, reference_run: Path, capsys) -> None:
    """convert.py writes weights alone with metadata reference_iterations: checked, and eval-only works."""
    tensors = weights(reference_run)
    converted = tmp_path / "converted.safetensors"
    safetensors.torch.save_file(tensors, str(converted), {"model": "imixer_t2_8", "reference_iterations": "2"})
    assert train.main([*TINY, "--eval-only", "--resume", str(converted)]) == 0  # as converted: the loop, n = 2
    assert "epoch unknown" in capsys.readouterr().out
    assert train.main([*TINY, "--eval-only", "--resume", str(converted), "--reference-iterations", "none"]) == 2
    assert "reference_iterations 2 (checkpoint) vs None (now)" in capsys.readouterr().err
    # The converted loop computes with GELU: another activation is refused, not silently dropped.
    assert train.main([*TINY, "--eval-only", "--resume", str(converted), "--activation", "lipswish"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint's settings disagree: activation='lipswish' conflict with reference_iterations=2" in err
    assert "activation='gelu'" in err and len(err.strip().splitlines()) == 1
    # Weights alone cannot resume training: one line saying so.
    assert run_main(tmp_path, "--resume", str(converted), "--reference-iterations", "2")[0] == 2
    assert "can be evaluated (--eval-only) but not resumed" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Crash-safe checkpoints: a crash at any point of a commit leaves the last complete checkpoint in force


class Crash(BaseException):
    """Stands for kill -9: nothing in train.py catches it (BaseException), nothing is cleaned up."""


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    status, output = run_main(tmp_path_factory.mktemp("one"), "--epochs", "1", "--drop-path", "0.1")
    assert status == 0
    return output


CRASH_RUN = ["--epochs", "2", "--drop-path", "0.1"]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the 2-epoch run, uninterrupted."""
    status, output = run_main(tmp_path_factory.mktemp("two"), *CRASH_RUN)
    assert status == 0
    return output


@pytest.fixture(scope="module")
def first_of_two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same 2-epoch run killed right after its epoch-1 checkpoint was committed."""
    record_epoch = train.record_epoch

    def crash_after_epoch_1(*args, **kwargs):
        record_epoch(*args, **kwargs)
        raise Crash

    parent = tmp_path_factory.mktemp("first")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "record_epoch", crash_after_epoch_1)
        with pytest.raises(Crash):
            run_main(parent, *CRASH_RUN)
    assert saved_state(parent / "run")["epoch"] == 1
    return parent / "run"


def _leave_a_torn_manifest(run_dir: Path, manifest: dict) -> None:
    """kill -9 inside the manifest's atomic write: its temporary file is written, not yet renamed."""
    (run_dir / ".checkpoints.json.x1y2.tmp").write_text(json.dumps(manifest)[:40])
    raise Crash


CRASH_POINTS = {
    # step replaced: (when, does the epoch-2 checkpoint count afterwards?)
    "_write_state": ("before", False),
    "_write_weights": ("after", False),
    "_publish": ("after", False),
    "_write_manifest": ("during", False),
    "remove_stale": ("before", True),
}


@pytest.mark.parametrize("step", CRASH_POINTS)
def test_a_crash_at_any_point_of_a_commit_resumes_from_the_last_complete_checkpoint(
    step: str, tmp_path: Path, first_of_two: Path, two_epochs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The epoch-2 commit of a 2-epoch run is killed at ``step``; resumed, the run ends exactly where the same run
    never interrupted does (weights, optimizer, schedule, RNG, metrics: :func:`assert_same_training`)."""
    run_dir = tmp_path / "run"
    shutil.copytree(first_of_two, run_dir)
    when, committed = CRASH_POINTS[step]
    real = getattr(checkpoints, step)
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if step == "remove_stale" and calls["n"] == 1:  # run start: the cleanup of earlier sessions
            return real(*args, **kwargs)
        if when == "during":
            _leave_a_torn_manifest(*args)
        if when == "after":
            real(*args, **kwargs)
        raise Crash

    monkeypatch.setattr(checkpoints, step, crashing)
    (run_dir / ".summary.json.abc123.tmp").write_text("{")  # an older kill -9 during another atomic write
    with pytest.raises(Crash):
        run_main(tmp_path, *CRASH_RUN, "--resume", "auto")
    monkeypatch.setattr(checkpoints, step, real)

    manifest = checkpoints.read_manifest(run_dir)
    assert manifest["last"]["epoch"] == (2 if committed else 1)
    assert saved_state(run_dir)["epoch"] == manifest["last"]["epoch"]  # the pair always agrees

    assert run_main(tmp_path, *CRASH_RUN, "--resume", "auto")[0] == 0
    assert_same_training(two_epochs, run_dir)  # as if nothing had happened
    assert [entry["epoch"] for entry in history(run_dir)] == [1, 2]
    assert not list(run_dir.rglob("*.tmp")), "stale temporary files were left"
    referenced = {Path(checkpoints.read_manifest(run_dir)[tag]["path"]).name for tag in ("last", "best")}
    assert {path.name for path in (run_dir / "checkpoints").iterdir()} == referenced
