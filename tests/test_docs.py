"""The documentation cannot rot: its examples run, and the site builds strictly.

- Every ```python block of a docs page is executed, in order, in one namespace per page, from the
  repository root (the iMixer page imports examples/imixer by path, as its README does).
- ``mkdocs build --strict`` succeeds (skipped where the ``docs`` extra is not installed), every
  public name has an API anchor, and KaTeX is served from the site itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import implicitlayers as il

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# The pages whose examples must exist and run (the list); any other page's blocks run too.
REQUIRED_PAGES = ("index.md", "custom-layers.md", "imixer.md")
PAGES_NEEDING = {"imixer.md": ("timm", "sklearn")}
BUILD_TIMEOUT_S = 300


def python_blocks(markdown: str) -> list[str]:
    """The bodies of the top-level ```python fences, in order."""
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.DOTALL | re.MULTILINE)


def pages_with_examples() -> list[str]:
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if python_blocks(p.read_text(encoding="utf-8"))}
    return sorted(pages | set(REQUIRED_PAGES))


@pytest.mark.parametrize("page", pages_with_examples())
def test_page_examples_run(page: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for module in PAGES_NEEDING.get(page, ()):
        pytest.importorskip(module)
    path = DOCS / page
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    assert blocks, f"{page} has no python example"
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))  # pages may add examples/imixer
    registry = dict(il.solvers.base._REGISTRY)  # pages may register solvers
    namespace: dict[str, object] = {"__name__": f"docs.{page}"}
    try:
        for index, block in enumerate(blocks):
            # dont_inherit: the page runs as a user runs it, without this module's __future__ flags.
            exec(compile(block, f"{path}[block {index}]", "exec", dont_inherit=True), namespace)
    finally:
        il.solvers.base._REGISTRY.clear()
        il.solvers.base._REGISTRY.update(registry)
    assert capsys.readouterr().out, f"{page}'s examples print nothing"
    # What a block prints, it also checks: a reader sees the output, the test sees the property.
    unchecked = [index for index, block in enumerate(blocks) if "print(" in block and "assert " not in block]
    assert not unchecked, f"{page}: blocks {unchecked} print without asserting anything"


# Pages maintained elsewhere, whose code lines this test does not police.
LINE_LENGTH_EXEMPT = ("deq.md", "torchdeq.md")
CODE_LINE_LENGTH = 80  # what the text column shows at 1280 px without scrolling


def test_code_lines_fit_the_column() -> None:
    """No line of a fenced block is cut off at the edge of the text column."""
    long_lines = []
    for path in sorted(DOCS.rglob("*.md")):
        if path.name in LINE_LENGTH_EXEMPT or "assets" in path.parts:
            continue
        inside = False
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith("```"):
                inside = not inside
            elif inside and len(line) > CODE_LINE_LENGTH:
                long_lines.append(f"{path.relative_to(DOCS)}:{number} ({len(line)} characters)")
    assert not long_lines, long_lines


def test_required_pages_have_examples() -> None:
    for page in REQUIRED_PAGES:
        assert python_blocks((DOCS / page).read_text(encoding="utf-8")), page


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]

    # Pages are plain files, so site/index.html works from file:// without a server.
    assert (site / "index.html").is_file() and (site / "concepts" / "gradients.html").is_file()
    # Math is rendered by the bundled KaTeX, not a CDN.
    for asset in ("assets/katex/katex.min.js", "assets/katex/katex.min.css", "assets/javascripts/katex-init.js"):
        assert (site / asset).is_file(), asset
    assert list((site / "assets" / "katex" / "fonts").glob("KaTeX_Main-Regular.woff2"))
    gradients = (site / "concepts" / "gradients.html").read_text(encoding="utf-8")
    assert 'class="arithmatex"' in gradients and "assets/katex/katex.min.js" in gradients
    assert "cdn.jsdelivr" not in gradients and "unpkg.com" not in gradients
    # Every public name has an entry in the API reference.
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    missing = [name for name in il.__all__ if f'id="implicitlayers.{name}"' not in api]
    assert not missing, missing
    from implicitlayers.contrib import torchdeq as contrib_torchdeq

    contrib = (site / "api" / "torchdeq.html").read_text(encoding="utf-8")
    prefix = "implicitlayers.contrib.torchdeq"
    missing = [name for name in contrib_torchdeq.__all__ if f'id="{prefix}.{name}"' not in contrib]
    assert not missing, missing
    # Sphinx roles in docstrings were turned into links or code (docs/scripts/griffe_sphinx_roles.py).
    assert ":class:`" not in api and ":func:`" not in api and ":func:`" not in contrib
    # Doctest examples are code blocks, not ">>>" read as nested block quotes.
    assert "<blockquote>" not in api and "<blockquote>" not in contrib
    # Tables of contents are plain text: a heading with math needs a data-toc-label.
    for page in site.rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        for toc in re.findall(r'<nav class="md-nav md-nav--secondary".*?</nav>', html, flags=re.DOTALL):
            labels = re.sub(r"<[^>]+>", " ", toc)
            assert "\\(" not in labels and "$" not in labels, f"{page.relative_to(site)}: math in the TOC"
    # The layout fixes (wide tables scroll, long lines wrap in the API reference) are served.
    assert (site / "assets" / "stylesheets" / "extra.css").is_file()
    assert "assets/stylesheets/extra.css" in gradients


def test_contributing_page_states_the_hypothesis_profiles() -> None:
    conftest = (ROOT / "tests" / "conftest.py").read_text(encoding="utf-8")
    profiles = dict(re.findall(r'register_profile\("(\w+)", max_examples=(\d+)', conftest))
    assert set(profiles) == {"ci", "dev", "thorough"}
    page = (DOCS / "contributing.md").read_text(encoding="utf-8")
    for name, examples in profiles.items():
        assert f"| `{name}` | {examples} |" in page, f"docs/contributing.md: profile {name} runs {examples} examples"


def test_imixer_page_commands_use_existing_options() -> None:
    """Every --option in the iMixer page's shell commands is one train.py or convert.py defines."""
    scripts = [ROOT / "examples" / "imixer" / name for name in ("train.py", "convert.py")]
    if not all(script.is_file() for script in scripts):
        pytest.skip("examples/imixer is not there")
    defined = set()
    for script in scripts:
        defined |= set(re.findall(r'"(--[a-z0-9-]+)"', script.read_text(encoding="utf-8")))
    page = (DOCS / "imixer.md").read_text(encoding="utf-8")
    commands = "\n".join(re.findall(r"^```bash\n(.*?)^```", page, flags=re.DOTALL | re.MULTILINE))
    used = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9_-]*)", commands)) - {"--nproc_per_node"}
    assert used, "no options found"
    assert used <= defined, sorted(used - defined)
