"""What a solve returns: the per-sample :class:`SolverResult` and the :class:`Status` of each sample."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .budget import Budget

__all__ = ["STATUS_NAMES", "SolverResult", "Status"]


class Status(IntEnum):
    """Why a sample stopped: the codes of :attr:`SolverResult.status`.

    Attributes:
        converged: Its residual reached ``tol``.
        max_iter: It ran out of evaluations before reaching ``tol``.
        non_finite: ``f`` returned inf/NaN for it (its first evaluation included).
        diverged: Its residual ||f(z) - z|| grew past ``DIVERGENCE_FACTOR`` times the one at ``z0``.
        budget: A fixed-budget solve (``tol = 0``) ran the evaluations it was asked for: not a
            failure, since no tolerance was asked for.
    """

    converged = 0
    max_iter = 1
    non_finite = 2
    diverged = 3
    budget = 4

    @classmethod
    def successes(cls) -> tuple[Status, ...]:
        """The codes of a sample that did what it was asked: converged, or ran its fixed budget."""
        return (cls.converged, cls.budget)


STATUS_NAMES = tuple(status.name for status in Status)
"""The names of the :class:`Status` codes, by code (an alias kept for string-keyed reports)."""


@dataclass
class SolverResult:
    """The outcome of a fixed-point solve, per sample.

    Attributes:
        z: The best (lowest-residual) iterate of each sample, shape ``(B, ...)`` like ``z0``.
        nstep: Evaluations of ``f`` spent on each sample, ``LongTensor[B]``. A sample that satisfied
            the tolerance at ``z0`` has ``nstep == 1``.
        residual: Residual of each returned iterate, ``Tensor[B]`` (``rel``: ||f(z)-z|| / (||f(z)|| + eps),
            ``abs``: ||f(z)-z||).
        converged: Whether each sample's residual is at most ``tol``, ``BoolTensor[B]``.
        trace: The largest residual over the batch at each evaluation of ``f``, ``Tensor[K]``: every
            sample contributes the residual of its latest finite iterate (for plots of convergence).
        status: Why each sample stopped, ``LongTensor[B]`` of :class:`Status` codes. Defaults to
            converged/max_iter from ``converged`` for results built without it.
        spectral_radius: ρ(J_f) at each sample's fixed point, ``Tensor[B]``, where a layer was asked to
            estimate it (``spectral_radius_iters``); else None.
        adjoint_estimate: For solvers with quasi-Newton memory (Broyden, Anderson) asked to keep it
            (``keep_memory=True``), ``g ↦ u`` with u ≈ (I - J_f)⁻ᵀ g, shapes ``(B, ...)`` like ``z``,
            read from the solver's final memory (the SHINE estimate of the adjoint solve); else None.
            It holds that memory (2·memory·B·D numbers) alive; :meth:`detach` drops it.
        budget: The :class:`~implicitlayers.Budget` the solve ran with (None for results built by hand).
    """

    z: Tensor
    nstep: Tensor
    residual: Tensor
    converged: Tensor
    trace: Tensor
    status: Tensor | None = None
    spectral_radius: Tensor | None = None
    adjoint_estimate: Callable[[Tensor], Tensor] | None = field(default=None, repr=False, compare=False)
    budget: Budget | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.status is None:
            self.status = torch.where(self.converged, int(Status.converged), int(Status.max_iter))

    @property
    def succeeded(self) -> Tensor:
        """Whether each sample did what it was asked (converged, or ran its fixed budget), ``BoolTensor[B]``."""
        return (self.status == Status.converged) | (self.status == Status.budget)

    def detach(self) -> SolverResult:
        """Returns a copy whose tensors are detached from any autograd graph, without the solver's memory."""
        return SolverResult(
            self.z.detach(),
            self.nstep,
            self.residual.detach(),
            self.converged,
            self.trace.detach(),
            self.status,
            None if self.spectral_radius is None else self.spectral_radius.detach(),
            budget=self.budget,
        )

    def reasons(self) -> dict[str, int]:
        """How many samples stopped for each :class:`Status` (only those that occur), by name."""
        counts = torch.bincount(self.status.flatten().cpu(), minlength=len(Status)).tolist()
        return {name: count for name, count in zip(STATUS_NAMES, counts, strict=False) if count}

    def summary(self) -> dict[str, float]:
        """Batch statistics as plain floats: mean/max steps, max residual, and the fractions of samples
        that failed (``unconverged``: neither converged nor ran a fixed budget), were non-finite, or
        diverged."""
        batch = max(len(self.status), 1)
        return {
            "nstep_mean": float(self.nstep.float().mean()),
            "nstep_max": float(self.nstep.max()),
            "residual_max": float(self.residual.max()),
            "unconverged": float((~self.succeeded).sum()) / batch,
            "non_finite": float((self.status == Status.non_finite).sum()) / batch,
            "diverged": float((self.status == Status.diverged).sum()) / batch,
        }
