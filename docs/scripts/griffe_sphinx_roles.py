"""Griffe extension used by mkdocs.yml: turns Sphinx roles in docstrings into Markdown.

The package's docstrings are Google style but cross-reference with Sphinx roles
(``:class:`ImplicitLayer```, ``:func:`~implicitlayers.solve```), which Markdown would print
verbatim. This rewrites each role, before mkdocstrings parses the docstring, into

- an autorefs link ``[`solve`][implicitlayers.solve]`` when the target is a name the API reference
  renders (``implicitlayers.__all__`` and ``implicitlayers.contrib.torchdeq.__all__``), so links
  never dangle under ``mkdocs build --strict``;
- inline code otherwise (``:mod:`implicitlayers.backward``` becomes ```implicitlayers.backward```).

It also fences doctest runs (``>>>`` lines and their output) as ```` ```pycon ```` code blocks: in a
Google ``Example:`` section (singular — griffe parses doctests only in ``Examples:``) Markdown would
otherwise read ``>>>`` as nested block quotes and run the code into one paragraph.

Only the rendered text changes; the source docstrings are untouched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([^`]+)`")
DOCUMENTED_MODULES = ("implicitlayers", "implicitlayers.contrib.torchdeq")


def fence_doctests(text: str) -> str:
    """Wraps each run of doctest lines (a ``>>>`` line up to the next blank line) in a pycon fence."""
    if ">>>" not in text or "```" in text:
        return text
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        if not line.lstrip().startswith(">>>"):
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(line.lstrip())]
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    def __init__(self) -> None:
        super().__init__()
        self.documented: dict[str, set[str]] = {}

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.path != "implicitlayers":
            return
        for path in DOCUMENTED_MODULES:
            module = pkg if path == pkg.path else pkg[path.split(".", 1)[1]]
            self.documented[path] = {str(name) for name in (module.exports or ())}
        self._rewrite(pkg, seen=set())

    def _resolve(self, target: str, module_path: str) -> str | None:
        if "." in target:
            prefix, _, name = target.rpartition(".")
            return target if name in self.documented.get(prefix, ()) else None
        # A bare name: the module's own public names first, then the top-level package's.
        for prefix in (module_path, "implicitlayers"):
            if target in self.documented.get(prefix, ()):
                return f"{prefix}.{target}"
        return None

    def _replace(self, text: str, module_path: str) -> str:
        def substitute(match: re.Match[str]) -> str:
            short, target = match.group(1) == "~", match.group(2).strip()
            label = target.rsplit(".", 1)[-1] if short else target
            resolved = self._resolve(target, module_path)
            return f"[`{label}`][{resolved}]" if resolved else f"`{label}`"

        return fence_doctests(ROLE.sub(substitute, text))

    def _rewrite(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = self._replace(obj.docstring.value, obj.module.path)
        for member in obj.members.values():
            if isinstance(member, griffe.Alias):
                continue  # rewritten where it is defined
            self._rewrite(member, seen)
