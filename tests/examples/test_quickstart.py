"""examples/quickstart.py runs and prints converged solves for every solver."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples import quickstart

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"
NUMBER = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


@pytest.fixture(scope="module")
def output() -> str:
    threads = torch.get_num_threads()
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        quickstart.main(["--quick", "--seed", "1"])
    assert torch.get_num_threads() == threads  # it runs on one thread, and gives the caller's count back
    return buffer.getvalue()


def solver_rows(text: str) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] in ("picard", "anderson", "broyden"):
            rows.setdefault(fields[0], []).append(line)
    return rows


def test_every_solver_appears_in_both_tables(output):
    rows = solver_rows(output)
    assert set(rows) == {"picard", "anderson", "broyden"}
    assert all(len(lines) == 2 for lines in rows.values())
    assert "ImplicitMLP(64, 128" in output and "Slow problem" in output


def test_every_solve_converged_below_tolerance_and_inverts(output):
    tables = output.split("Slow problem")
    for table, tol in ((tables[0], 1e-8), (tables[1].split("IFT backward")[0], 1e-6)):
        for lines in solver_rows(table).values():
            (line,) = lines
            fields = line.split()
            nstep_mean, nstep_max, residual, converged, inverse = fields[1:6]
            assert float(residual) <= tol
            assert converged == "100%"
            assert 1 <= float(nstep_mean) <= int(nstep_max)
            if inverse != "-":
                assert float(inverse) <= 10 * tol


def test_accelerated_solvers_beat_picard_on_the_slow_problem(output):
    slow = solver_rows(output.split("Slow problem")[1])
    mean = {name: float(lines[0].split()[1]) for name, lines in slow.items()}
    assert mean["anderson"] < mean["picard"] / 2
    assert mean["broyden"] < mean["picard"] / 2


def test_ift_backward_reports_a_converged_adjoint_solve(output):
    match = re.search(
        rf"backward_stats: nstep mean ({NUMBER}), max (\d+), max residual ({NUMBER}), converged (\d+)%", output
    )
    assert match is not None, output
    assert float(match.group(3)) <= 1e-8 and match.group(4) == "100"
    grads = re.search(rf"\|dL/dx\| = ({NUMBER}), \|dL/dtheta\| = ({NUMBER})", output)
    assert grads is not None and float(grads.group(1)) > 0 and float(grads.group(2)) > 0


def test_bad_input_is_one_line_and_status_2():
    # As the README runs it: a script, from any folder.
    done = subprocess.run([sys.executable, str(SCRIPT), "--seed", "x"], capture_output=True, text=True, cwd="/")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == ["quickstart.py: error: argument --seed: invalid int value: 'x'"]
