"""How long a solve may run and when a sample has converged: the :class:`Budget`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import check_int_at_least

__all__ = ["STOP_MODES", "Budget"]

STOP_MODES = ("rel", "abs")


@dataclass(frozen=True)
class Budget:
    """A solve's budget, stopping test and loop mechanics, validated and immutable.

    Examples:
        >>> import implicitlayers as il
        >>> budget = il.Budget(max_iter=50, tol=1e-6)
        >>> budget.replace(tol=1e-8).tol
        1e-08

    Attributes:
        max_iter: Maximum evaluations of ``f`` (>= 1).
        tol: Each sample stops as soon as its residual is at most ``tol`` (>= 0). 0 asks for a fixed
            budget: exactly ``max_iter`` evaluations (:attr:`Status.budget`), unless a sample reaches
            an exact fixed point.
        stop_mode: ``"rel"``: ||f(z)-z|| / (||f(z)|| + 1e-12); ``"abs"``: ||f(z)-z||. ``"rel"``
            measures the step relative to the iterate's size, so for a map with no fixed point whose
            iterates grow without bound at a bounded step (f(z) = z + 1) it eventually falls below
            ``tol``: use ``"abs"`` where the scale of z is known and such maps are possible.
        sync_every: Evaluations per host synchronisation (>= 1). The driver reads its flags back to the
            host after the first evaluation, then every ``sync_every``-th and the last one; in between
            every decision is a masked tensor op, so a chunk of iterations is a fixed sequence of
            kernels with no data-dependent branch. Each sample's result is the same as with 1, up to
            rounding; the batch may run up to ``sync_every - 1`` evaluations past the moment its last
            sample stopped. 1 (default) is the fastest on a CPU.
        compact_rows: Evaluate ``f`` only on the samples still iterating once at most half of them are
            (needs ``f.rows(z_rows, index)``, which the layers provide; ``sync_every`` must be 1).
            Only for an ``f`` that treats samples independently and keeps no per-batch state.
        compile_backend: A ``torch.compile`` backend (``"inductor"``, ``"aot_eager"``, ...) that
            compiles each chunk of ``sync_every - 1`` evaluations between synchronisations into one
            graph (needs ``sync_every > 1``; each sample's result is that of the eager chunk, up to
            rounding); None (default) runs eagerly. The first solves of a new shape pay the
            compilation; a chunk specialises on the solver's bounded memory position, so a few
            graphs are compiled per shape.
    """

    max_iter: int = 30
    tol: float = 1e-4
    stop_mode: str = "rel"
    sync_every: int = 1
    compact_rows: bool = False
    compile_backend: str | None = None

    def __post_init__(self) -> None:
        check_int_at_least("max_iter", self.max_iter)
        tol = self.tol
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not (tol >= 0) or math.isinf(tol):
            raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
        if self.stop_mode not in STOP_MODES:
            raise ValueError(f"stop_mode must be one of {list(STOP_MODES)}, got {self.stop_mode!r}")
        check_int_at_least("sync_every", self.sync_every)
        if not isinstance(self.compact_rows, bool):
            raise ValueError(f"compact_rows must be True or False, got {self.compact_rows!r}")
        if self.compile_backend is not None:
            if not isinstance(self.compile_backend, str) or self.compile_backend not in torch.compiler.list_backends(
                exclude_tags=()
            ):
                raise ValueError(
                    "compile_backend must be None or a torch.compile backend "
                    f"({', '.join(torch.compiler.list_backends(exclude_tags=()))}), got {self.compile_backend!r}"
                )
            if self.sync_every < 2:
                raise ValueError(
                    "compile_backend compiles the evaluations between synchronisations: set sync_every >= 2"
                )
        if self.compact_rows and self.sync_every != 1:
            raise ValueError(
                "compact_rows=True needs sync_every=1 (choosing the rows reads the host), "
                f"got sync_every={self.sync_every}"
            )

    def replace(self, **changes: Any) -> Budget:
        """A copy with ``changes`` applied, validated again.

        Raises:
            ValueError: For an out-of-range value or an unknown field.
        """
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"Budget has no field(s) {unknown}; fields: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)
