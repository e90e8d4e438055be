"""Picard (plain fixed-point) iteration: z_{k+1} = (1 - λ) z_k + λ f(z_k)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from .base import SolverResult, iterate

__all__ = ["Picard", "picard"]


class Picard:
    """Plain fixed-point iteration, optionally damped.

    Cost per iteration: one evaluation of ``f``, no memory beyond the iterate. Converges linearly at
    the contraction rate of ``f``; the fastest choice when that rate is small (say below 0.3), hopeless
    when ``f`` is not a contraction.

    Args:
        damping: λ in (0, 1]; 1 is the undamped iteration z <- f(z). Damping can rescue maps whose
            Jacobian has eigenvalues near -1 (oscillation) at the price of slower progress elsewhere.
    """

    def __init__(self, damping: float = 1.0) -> None:
        if not 0.0 < damping <= 1.0:
            raise ValueError(f"damping must be in (0, 1], got {damping!r}")
        self.damping = damping

    def step(self, state: Any, z: Tensor, fz: Tensor, active: Tensor) -> tuple[Tensor, Any]:
        if self.damping == 1.0:
            return fz, None
        return z + self.damping * (fz - z), None


def picard(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    sync_every: int = 1,
    damping: float = 1.0,
) -> SolverResult:
    """Solves z = f(z) by (damped) fixed-point iteration. See :func:`implicitlayers.solve`."""
    return iterate(f, z0, Picard(damping), max_iter=max_iter, tol=tol, stop_mode=stop_mode, sync_every=sync_every)
