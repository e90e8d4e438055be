"""Anderson acceleration (type II, Walker & Ni 2011), per sample."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import check_int_at_least
from .base import SolverResult, iterate

__all__ = ["Anderson", "anderson"]


class Anderson:
    """Anderson acceleration: mix the last ``memory`` images so as to minimise the mixed residual.

    With residuals G_i = f(z_i) - z_i of the last n iterates, the weights α (summing to one) minimise
    ||Σ α_i G_i||; the next iterate is (1 - β) Σ α_i z_i + β Σ α_i f(z_i). Each sample solves its own
    n×n least-squares system, so samples never influence each other.

    Cost per iteration: one evaluation of ``f`` plus O(n·D) work per sample; memory 2·n·D per sample.
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

    def step(
        self, state: tuple[Tensor, Tensor, int] | None, z: Tensor, fz: Tensor, active: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor, int]]:
        if state is None:
            batch, dim = z.shape
            state = (z.new_empty(batch, self.memory, dim), z.new_empty(batch, self.memory, dim), 0)
        history_z, history_f, count = state
        slot = count % self.memory
        history_z[:, slot] = z
        history_f[:, slot] = fz
        count += 1
        n = min(count, self.memory)
        alpha = self._weights(history_f[:, :n] - history_z[:, :n], slot)
        # Broadcast-and-sum beats bmm's (B, 1, n) x (B, n, D) products (~2x on CPU for many small rows).
        mixed_z = (alpha[:, :, None] * history_z[:, :n]).sum(dim=1)
        mixed_f = (alpha[:, :, None] * history_f[:, :n]).sum(dim=1)
        return mixed_z + self.damping * (mixed_f - mixed_z), (history_z, history_f, count)

    def _weights(self, residuals: Tensor, newest: int) -> Tensor:
        """Mixing weights (B, n) that minimise ||Σ α_i G_i|| subject to Σ α_i = 1."""
        batch, n, _ = residuals.shape
        # The n×n systems are tiny; solving them in float64 costs nothing and keeps the weights
        # meaningful when residuals are nearly collinear close to convergence.
        gram = torch.bmm(residuals, residuals.transpose(1, 2)).double()
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        eye = torch.eye(n, dtype=torch.float64, device=gram.device)
        gram = gram + (self.regularization * scale)[:, None, None] * eye
        ones = torch.ones(batch, n, 1, dtype=torch.float64, device=gram.device)
        weights, info = torch.linalg.solve_ex(gram, ones)
        alpha = weights[..., 0] / weights[..., 0].sum(dim=1, keepdim=True)
        # A singular or non-finite system falls back to a plain Picard step from the newest iterate.
        failed = (info != 0) | ~torch.isfinite(alpha).all(dim=1)
        picard_step = torch.zeros_like(alpha)
        picard_step[:, newest] = 1.0
        alpha = torch.where(failed[:, None], picard_step, alpha)
        return alpha.to(residuals.dtype)


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
