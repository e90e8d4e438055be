"""examples/imixer/measure_recipe.py and the README's "Single-GPU CIFAR-10" section that quotes its JSON."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

measure_recipe = pytest.importorskip("examples.imixer.measure_recipe")

README = Path(measure_recipe.__file__).with_name("README.md")


def test_the_real_training_step_runs_with_the_recipe_flags(tmp_path: Path) -> None:
    """Two measured steps of the recipe on noise (its flags parse and build: RandAugment, mixup, AMP, AdamW,
    clipping), at a batch of 8 so that it stays quick."""
    data_dir = measure_recipe.write_cifar10_folder(tmp_path, train_images=40, val_images=16)
    flags = [*measure_recipe.RECIPE_FLAGS, "-b", "8", "--threads", "1"]
    result = measure_recipe.measure_model("mixer_t4_32", flags, data_dir, steps=2, warmup=0)
    assert len(result["train_step_seconds"]) == 2 and result["train_step_seconds_median"] > 0
    assert result["train_images_per_second"] == pytest.approx(8 / result["train_step_seconds_median"])
    assert result["cifar10_steps_per_epoch"] == 50_000 // 8
    assert result["implicit_settings"] is None and result["parameters"] > 0


def test_the_recipe_json_is_consistent_and_the_readme_quotes_it() -> None:
    document = json.loads(measure_recipe.DEFAULT_OUT.read_text())
    readme = README.read_text()
    assert document["flags"] == measure_recipe.RECIPE_FLAGS  # the JSON measured today's recipe
    assert "GPU time not measured" in document["measured"]["device"] or document["measured"]["device"].startswith(
        "cuda"
    )
    for model, numbers in document["models"].items():
        command = measure_recipe.recipe_command(model)
        assert document["commands"][model] == command
        assert command in " ".join(readme.replace("\\\n", " ").split())  # the README's command, line breaks aside
        median, data = numbers["train_step_seconds_median"], numbers["data_seconds_per_step_mean"]
        assert median == statistics.median(numbers["train_step_seconds"])
        assert numbers["train_images_per_second"] == pytest.approx(document["batch_size"] / median)
        epoch = numbers["cifar10_steps_per_epoch"] * (median + data) + 10_000 / numbers["eval_images_per_second"]
        assert numbers["projected_epoch_minutes"] == pytest.approx(epoch / 60)
        assert numbers["projected_run_hours"] == pytest.approx(document["epochs"] * epoch / 3600)
    assert measure_recipe.readme_table(document) in readme  # the numbers quoted are the file's
