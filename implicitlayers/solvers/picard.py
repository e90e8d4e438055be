"""Picard (plain fixed-point) iteration: z_{k+1} = (1 - λ) z_k + λ f(z_k)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .base import Solver

__all__ = ["Picard"]


@dataclass(frozen=True)
class Picard(Solver):
    """Plain fixed-point iteration, optionally damped.

    Cost per iteration: one evaluation of ``f``, no memory beyond the iterate. Converges linearly at
    the contraction rate of ``f``; the fastest choice when that rate is small (say below 0.3), hopeless
    when ``f`` is not a contraction.

    Attributes:
        damping: λ in (0, 1]; 1 is the undamped iteration z <- f(z). Damping can rescue maps whose
            Jacobian has eigenvalues near -1 (oscillation) at the price of slower progress elsewhere.
    """

    damping: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not 0 < self.damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {self.damping!r}")

    def step(self, state: Any, z: Tensor, fz: Tensor, active: Tensor) -> tuple[Tensor, Any]:
        if self.damping == 1.0:
            return fz, None
        return z + self.damping * (fz - z), None
