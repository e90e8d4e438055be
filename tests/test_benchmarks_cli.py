"""Every benchmark's command line: bad input exits with status 2 and one line naming the flag, before any work."""

from __future__ import annotations

import importlib

import pytest

from benchmarks import backward, imixer_training

BAD_INPUT = [
    ("imixer_step", ["--repeats", "-1"], "--repeats"),
    ("imixer_step", ["--warmup", "-1"], "--warmup"),
    ("imixer_step", ["--threads", "0"], "--threads"),
    ("imixer_step", ["--batch", "0"], "--batch"),
    ("imixer_step", ["--configs", "x=colour:red"], "--configs"),
    ("solvers", ["--repeats", "0"], "--repeats"),
    ("solvers", ["--max-iter", "-5"], "--max-iter"),
    ("solvers", ["--threads", "0"], "--threads"),
    ("backward", ["--threads", "0"], "--threads"),
    ("backward", ["--problem", "imixer", "--epochs", "0"], "--epochs"),
    ("backward", ["--problem", "imixer", "--batch", "0"], "--batch"),
    ("backward", ["--problem", "imixer", "--max-batches", "-1"], "--max-batches"),
    ("backward", ["--problem", "imixer", "--repeats", "0"], "--repeats"),
    ("backward", ["--problem", "imixer", "--config", "tol:-1"], "tol"),
    ("imixer_training", ["--lr", "0"], "--lr"),
    ("imixer_training", ["--weight-decay", "nan"], "--weight-decay"),
    ("imixer_training", ["--threads", "-1"], "--threads"),
    ("imixer_training", ["--img-size", "0"], "--img-size"),
    ("imixer_training", ["--patch-size", "0"], "--patch-size"),
    ("imixer_training", ["--img-size", "15"], "--img-size"),
    ("imixer_training", ["--val-limit", "-3"], "--val-limit"),
    ("imixer_training", ["--seeds", "0"], "--seeds"),
    ("imixer_training", ["--epochs", "0"], "--epochs"),
    ("imixer_training", ["--configs", "imixer", "imixer"], "unique"),
    ("warm_start", ["--seed", "x"], "--seed"),
    ("core_properties", ["--seed", "1.5"], "--seed"),
    ("gpu", ["--device", "abacus"], "--device"),
    ("revisions", ["--rounds", "0", "--base", "HEAD"], "--rounds"),
    ("revisions", ["--base", "no-such-revision-anywhere", "--rounds", "1"], "--base"),
]


@pytest.mark.parametrize(("module", "argv", "named"), BAD_INPUT, ids=[f"{m} {' '.join(a)}" for m, a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_status_2(module, argv, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"benchmarks.{module}").main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and named in lines[0], captured.err


def test_a_value_given_explicitly_wins_over_quick():
    args = backward.parse_args(["--problem", "imixer", "--quick", "--epochs", "2", "--repeats", "3"])
    assert (args.epochs, args.repeats, args.batch, args.max_batches) == (2, 3, 32, 3)
    args = backward.parse_args(["--problem", "imixer"])
    assert (args.epochs, args.repeats, args.batch, args.max_batches) == (5, 5, 64, None)
    args, _ = imixer_training.parse_args(["--quick", "--batch", "16", "--val-limit", "0"])
    assert (args.batch, args.val_limit, args.epochs, args.seeds) == (16, 128, 1, [0])
