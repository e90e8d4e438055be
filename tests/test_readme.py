"""The README's usage example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def test_readme_usage_example_runs(capsys):
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    assert "tensor(" in capsys.readouterr().out


def test_readme_commands_are_the_ones_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = re.search(r"```bash\n(python -m pip install .*pytest)\n```", README.read_text())
    assert test_command is not None
    assert test_command.group(1) in ci
