"""Anderson acceleration (type II, Walker & Ni 2011), per sample."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import check_int_at_least
from .base import Solver
from .norms import row_scale, weighted_sum

__all__ = ["Anderson"]


class AndersonState(NamedTuple):
    """The last ``memory`` images and residuals (slot order, not chronological) and their Gram matrix."""

    f: Tensor  # (memory, B, D) images f(z_j)
    g: Tensor  # (memory, B, D) scaled residuals g_j = (f(z_j) - z_j) / s
    gram: Tensor  # (B, memory, memory) float64, <g_i, g_j>
    filled: int  # slots holding a pair of this solve (at most memory)
    slot: int  # the slot the next pair is written to
    # Both are bounded by memory (an iteration count is not), so a compiled chunk of iterations
    # specialises on a bounded number of values (see Budget.compile_chunks).
    inverse_scale: Tensor  # (B, 1) 1/s: one over the largest magnitude of each sample's first residual


@dataclass(frozen=True)
class Anderson(Solver):
    """Anderson acceleration: mix the last ``memory`` images so as to minimise the mixed residual.

    With residuals G_i = f(z_i) - z_i of the last n iterates, the weights α (summing to one) minimise
    ||Σ α_i G_i||; the next iterate is (1 - β) Σ α_i z_i + β Σ α_i f(z_i). Each sample solves its own
    n×n least-squares system, so samples never influence each other.

    Cost per iteration: one evaluation of ``f`` plus O(n·D) work per sample (the Gram matrix is updated
    one row at a time); memory 2·n·D per sample.
    It wins on smooth maps with a contraction rate close to one, where it often needs a small fraction
    of Picard's iterations; it cannot find fixed points of maps that are not locally contractive.

    Attributes:
        memory: Number of past iterates mixed (m >= 1; 1 is Picard).
        damping: β in (0, 1].
        regularization: Tikhonov term added to the Gram matrix, relative to the newest residual's
            squared norm, so the solver behaves the same for a sample and for that sample scaled by
            any factor, and keeps converging as the residuals shrink.
    """

    keeps_memory = True

    memory: int = 5
    damping: float = 1.0
    regularization: float = 1e-8

    def __post_init__(self) -> None:
        check_int_at_least("memory", self.memory)
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not 0 < self.damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {self.damping!r}")
        if not isinstance(self.regularization, (int, float)) or not self.regularization >= 0.0:
            raise ValueError(f"regularization must be >= 0, got {self.regularization!r}")

    def step(self, state: AndersonState | None, z: Tensor, fz: Tensor, active: Tensor) -> tuple[Tensor, AndersonState]:
        if state is None:
            batch, dim = z.shape
            # Residuals are stored divided by their sample's first residual's largest magnitude, so
            # the Gram matrix's products neither overflow nor underflow at any scale of the iterates
            # (the mixing weights do not depend on a sample's scale).
            state = AndersonState(
                f=z.new_empty(self.memory, batch, dim),
                g=z.new_empty(self.memory, batch, dim),
                gram=z.new_zeros(batch, self.memory, self.memory, dtype=torch.float64),
                filled=0,
                slot=0,
                inverse_scale=1.0 / row_scale(fz - z),
            )
        slot = state.slot
        n = min(state.filled + 1, self.memory)
        g = (fz - z) * state.inverse_scale
        if state.filled == 0:
            # Every slot starts as a copy of the first pair: a sample that stops early keeps copies
            # (no secant information) in the slots it never reached, not uninitialised memory.
            state.f.copy_(fz.expand_as(state.f))
            state.g.copy_(g.expand_as(state.g))
        else:
            # A frozen sample keeps the history it stopped with (its proposals are ignored anyway),
            # so that the secant pairs of adjoint_estimate are its own, not copies of its last iterate.
            keep = active[:, None]
            torch.where(keep, g, state.g[slot], out=state.g[slot])
            torch.where(keep, fz, state.f[slot], out=state.f[slot])
        state = state._replace(filled=n, slot=(slot + 1) % self.memory)
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
            proposal -= (1.0 - self.damping) * weighted_sum(state.g[:n], weights) / state.inverse_scale
        return proposal, state

    def adjoint_estimate(self, state: AndersonState) -> Callable[[Tensor], Tensor]:
        """SHINE for Anderson: the multisecant inverse Jacobian of the history, transposed.

        Type-II Anderson is a quasi-Newton method whose estimate of (J_f - I)⁻¹ is
        H = -I + ΔF (ΔGᵀ ΔG)⁻¹ ΔGᵀ, with ΔF, ΔG the differences of the stored images and residuals
        (Fang & Saad, 2009); it is exact on the span of ΔG. So u = -Hᵀ g = g - ΔG (ΔGᵀ ΔG)⁻¹ ΔFᵀ g,
        one small least-squares system per sample and no evaluation of f.
        """
        n = state.filled
        return lambda cotangent: self._multisecant_adjoint(state, n, cotangent)

    def _multisecant_adjoint(self, state: AndersonState, n: int, cotangent: Tensor) -> Tensor:
        images, residuals = state.f[:n], state.g[:n]
        if images.shape[0] < 2:
            return cotangent.clone()
        # The stored residuals are scaled by 1/s; scale the images alike so each secant pair is too.
        image_steps = (images[1:] - images[0]).double() * state.inverse_scale.double()  # (n-1, B, D)
        residual_steps = (residuals[1:] - residuals[0]).double()
        # H is unchanged when a secant pair (ΔF_j, ΔG_j) is scaled; scaling each to ||ΔG_j|| = 1 keeps
        # the regularisation from erasing the small late steps of a converging solve.
        norms = torch.linalg.vector_norm(residual_steps, dim=2, keepdim=True)
        # A residual is rounded at the precision of the iterates it is the difference of, not at its
        # own: a pair whose ΔG is within that rounding (a step taken after convergence) carries no
        # secant information, only noise that the scaling would blow up. Such pairs are dropped.
        # (an upper bound of each sample's ||f_j||, without squares: √D times its largest magnitude)
        images_norm = images.abs().amax(dim=(0, 2)).double()[None, :, None] * math.sqrt(images.shape[2])
        noise = 64 * torch.finfo(images.dtype).eps * images_norm * state.inverse_scale.double()[None]
        informative = norms > noise
        scale = torch.where(informative, norms, math.inf)
        image_steps, residual_steps = image_steps / scale, residual_steps / scale
        gram = torch.einsum("ibd,jbd->bij", residual_steps, residual_steps)
        projections = torch.einsum("ibd,bd->bi", image_steps, cotangent.double())
        # Ridge at the precision of the stored history: directions its rounding cannot resolve get
        # no weight, the others keep the exact multisecant solution (exact on a linear map). A larger
        # ridge tames the estimate on low-dimensional nonlinear maps, where the late, near-collinear
        # steps of a solve resolve the fast modes only through the map's curvature (a 2-d ELU cell's
        # estimate came out 20x off), but it costs the exactness on linear maps (up to 0.2 off at
        # √eps): dimensions that small are not what SHINE is for, and IFT(start="estimate") corrects
        # a bad estimate by solving on to the tolerance.
        ridge = torch.finfo(residuals.dtype).eps * torch.eye(gram.shape[1], dtype=torch.float64, device=gram.device)
        coefficients, info = torch.linalg.solve_ex(gram + ridge, projections[..., None])
        coefficients = coefficients[..., 0]
        # A singular system gives no secant information: u = g there (a pair that never moved has
        # ΔG = 0 and gets a zero coefficient from the regularised system).
        usable = (info == 0)[:, None] & torch.isfinite(coefficients)
        coefficients = torch.where(usable, coefficients, 0.0).T  # (n-1, B)
        return (cotangent.double() - weighted_sum(residual_steps, coefficients)).to(cotangent.dtype)

    def _weights(self, gram: Tensor, newest: int) -> Tensor:
        """Mixing weights (B, n) that minimise ||Σ α_i G_i|| subject to Σ α_i = 1, from the float64 Gram."""
        n = gram.shape[1]
        # The n×n systems are tiny; solving them in float64 costs nothing and keeps the weights
        # meaningful when residuals are nearly collinear close to convergence. The Tikhonov term is
        # relative to the newest residual's squared norm: relative to the history's mean it swamped
        # the small late residuals of a converging solve, which then stalled (a 2-d linear map took
        # 9 evaluations from a warm start to 1e-12 instead of 4).
        scale = gram[:, newest, newest].clamp_min(torch.finfo(torch.float64).tiny)
        eye = torch.eye(n, dtype=torch.float64, device=gram.device)
        regularized = gram + (self.regularization * scale)[:, None, None] * eye
        weights, info = torch.linalg.solve_ex(regularized, torch.ones_like(gram[:, :, :1]))
        total = weights[..., 0].sum(dim=1)
        # A singular or non-finite system (a non-finite weight makes the sum inf or NaN) falls back to
        # a plain Picard step from the newest iterate.
        usable = (info == 0) & (total.abs() < math.inf) & (total != 0)
        return torch.where(usable[:, None], weights[..., 0] / total[:, None], eye[newest])
