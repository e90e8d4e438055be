"""Anderson acceleration (type II, Walker & Ni 2011), per sample."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import check_int_at_least
from .base import SolverResult, iterate, weighted_sum

__all__ = ["Anderson", "anderson"]


class AndersonState(NamedTuple):
    """The last ``memory`` images and residuals (slot order, not chronological) and their Gram matrix."""

    f: Tensor  # (memory, B, D) images f(z_j)
    g: Tensor  # (memory, B, D) residuals g_j = f(z_j) - z_j
    gram: Tensor  # (B, memory, memory) float64, <g_i, g_j>
    count: int  # iterations so far


class Anderson:
    """Anderson acceleration: mix the last ``memory`` images so as to minimise the mixed residual.

    With residuals G_i = f(z_i) - z_i of the last n iterates, the weights α (summing to one) minimise
    ||Σ α_i G_i||; the next iterate is (1 - β) Σ α_i z_i + β Σ α_i f(z_i). Each sample solves its own
    n×n least-squares system, so samples never influence each other.

    Cost per iteration: one evaluation of ``f`` plus O(n·D) work per sample (the Gram matrix is updated
    one row at a time); memory 2·n·D per sample.
    It wins on smooth maps with a contraction rate close to one, where it often needs a small fraction
    of Picard's iterations; it cannot find fixed points of maps that are not locally contractive.

    Args:
        memory: Number of past iterates mixed (m >= 1; 1 is Picard).
        damping: β in (0, 1].
        regularization: Tikhonov term added to the Gram matrix, relative to its mean diagonal, so the
            solver behaves the same for a sample and for that sample scaled by any factor.
    """

    def __init__(self, memory: int = 5, damping: float = 1.0, regularization: float = 1e-8) -> None:
        check_int_at_least("memory", memory)
        if not 0.0 < damping <= 1.0:
            raise ValueError(f"damping must be in (0, 1], got {damping!r}")
        if not regularization >= 0.0:
            raise ValueError(f"regularization must be >= 0, got {regularization!r}")
        self.memory = memory
        self.damping = damping
        self.regularization = regularization

    def step(self, state: AndersonState | None, z: Tensor, fz: Tensor, active: Tensor) -> tuple[Tensor, AndersonState]:
        if state is None:
            batch, dim = z.shape
            state = AndersonState(
                f=z.new_empty(self.memory, batch, dim),
                g=z.new_empty(self.memory, batch, dim),
                gram=z.new_zeros(batch, self.memory, self.memory, dtype=torch.float64),
                count=0,
            )
        slot = state.count % self.memory
        n = min(state.count + 1, self.memory)
        state.f[slot] = fz
        torch.sub(fz, z, out=state.g[slot])
        state = state._replace(count=state.count + 1)
        # Only the newest residual changed: update its row and column of the Gram matrix (n dot
        # products per sample instead of n²).
        row = torch.linalg.vecdot(state.g[:n], state.g[slot]).T.double()  # (B, n)
        state.gram[:, slot, :n] = row
        state.gram[:, :n, slot] = row
        if n == 1:  # α = (1): a (damped) Picard step, no system to solve
            return fz if self.damping == 1.0 else z + self.damping * (fz - z), state
        weights = self._weights(state.gram[:, :n, :n], slot).T.to(z.dtype)  # (n, B)
        # With history slots j: z_j = f_j - g_j, so the damped mix is Σ α_j f_j - (1 - β) Σ α_j g_j.
        proposal = weighted_sum(state.f[:n], weights)
        if self.damping != 1.0:
            proposal -= (1.0 - self.damping) * weighted_sum(state.g[:n], weights)
        return proposal, state

    def _weights(self, gram: Tensor, newest: int) -> Tensor:
        """Mixing weights (B, n) that minimise ||Σ α_i G_i|| subject to Σ α_i = 1, from the float64 Gram."""
        n = gram.shape[1]
        # The n×n systems are tiny; solving them in float64 costs nothing and keeps the weights
        # meaningful when residuals are nearly collinear close to convergence.
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        eye = torch.eye(n, dtype=torch.float64, device=gram.device)
        regularized = gram + (self.regularization * scale)[:, None, None] * eye
        weights, info = torch.linalg.solve_ex(regularized, torch.ones_like(gram[:, :, :1]))
        total = weights[..., 0].sum(dim=1)
        # A singular or non-finite system (a non-finite weight makes the sum inf or NaN) falls back to
        # a plain Picard step from the newest iterate.
        usable = (info == 0) & (total.abs() < math.inf) & (total != 0)
        return torch.where(usable[:, None], weights[..., 0] / total[:, None], eye[newest])


def anderson(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    memory: int = 5,
    damping: float = 1.0,
    regularization: float = 1e-8,
) -> SolverResult:
    """Solves z = f(z) with Anderson acceleration. See :class:`Anderson` and :func:`implicitlayers.solve`."""
    rule = Anderson(memory=memory, damping=damping, regularization=regularization)
    return iterate(f, z0, rule, max_iter=max_iter, tol=tol, stop_mode=stop_mode)
