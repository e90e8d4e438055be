"""What every solver shares: the result type, the residual, and the iteration driver.

A built-in solver is a small object with an explicit state and a single ``step`` (the
:class:`StepRule` protocol). :func:`iterate` owns everything else — evaluating ``f``, measuring
each sample's residual, freezing samples that converged or produced non-finite values, keeping
the best iterate — so a new method only has to say how it proposes the next iterate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from ..errors import check_int_at_least

__all__ = [
    "STOP_MODES",
    "SolverResult",
    "StepRule",
    "iterate",
    "residual",
    "validate_solve_args",
    "weighted_sum",
]

STOP_MODES = ("rel", "abs")

# Added to ||f(z)|| in the relative residual so that z = f(z) = 0 counts as converged.
RESIDUAL_EPS = 1e-12


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
    """

    z: Tensor
    nstep: Tensor
    residual: Tensor
    converged: Tensor
    trace: Tensor

    def detach(self) -> SolverResult:
        """Returns a copy whose tensors are detached from any autograd graph."""
        return SolverResult(self.z.detach(), self.nstep, self.residual.detach(), self.converged, self.trace.detach())

    def summary(self) -> dict[str, float]:
        """Batch statistics as plain floats: mean/max steps, max residual, fraction unconverged."""
        return {
            "nstep_mean": float(self.nstep.float().mean()),
            "nstep_max": float(self.nstep.max()),
            "residual_max": float(self.residual.max()),
            "unconverged": float((~self.converged).float().mean()),
        }


class StepRule(Protocol):
    """How a solver proposes the next iterate.

    ``step`` receives the current iterate ``z`` and ``fz = f(z)`` (both flattened to ``(B, D)``, in the
    working dtype, with non-finite samples already replaced by a harmless value) and the mask of samples
    still iterating. It returns the next iterate for every sample (frozen samples are ignored) and its
    new state. ``state`` is ``None`` on the first call.
    """

    def step(self, state: Any, z: Tensor, fz: Tensor, active: Tensor) -> tuple[Tensor, Any]: ...


def residual(z: Tensor, fz: Tensor, stop_mode: str = "rel") -> Tensor:
    """Per-sample residual of ``z`` for the map that sent it to ``fz``.

    Args:
        z: Iterate, shape ``(B, ...)``.
        fz: ``f(z)``, same shape.
        stop_mode: ``"rel"`` for ||f(z)-z|| / (||f(z)|| + 1e-12), ``"abs"`` for ||f(z)-z||.

    Returns:
        Residuals, shape ``(B,)``, in at least float32.
    """
    work = torch.promote_types(z.dtype, torch.float32)
    z2 = z.reshape(z.shape[0], math.prod(z.shape[1:])).to(work)
    f2 = fz.reshape(fz.shape[0], math.prod(fz.shape[1:])).to(work)
    diff = torch.linalg.vector_norm(f2 - z2, dim=1)
    if stop_mode == "abs":
        return diff
    return diff / (torch.linalg.vector_norm(f2, dim=1) + RESIDUAL_EPS)


def validate_solve_args(max_iter: int, tol: float, stop_mode: str) -> None:
    """Raises ``ValueError`` naming the argument when a solve's settings are out of range."""
    check_int_at_least("max_iter", max_iter)
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not (tol >= 0) or math.isinf(tol):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode must be one of {list(STOP_MODES)}, got {stop_mode!r}")


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype solvers iterate in: float32 at least, so bf16/fp16 inputs do not stall at 1e-2."""
    if not dtype.is_floating_point:
        raise ValueError(f"z0 must be a floating-point tensor, got dtype {dtype}")
    return torch.promote_types(dtype, torch.float32)


class _Progress(NamedTuple):
    finite: Tensor  # (B,) whether each sample's f(z) is finite
    all_finite: bool
    any_active: bool
    all_active: bool


class _Tracker:
    """Per-sample bookkeeping: residuals, best iterate, the freeze mask and the convergence trace."""

    def __init__(self, z0: Tensor, tol: float, stop_mode: str) -> None:
        batch = z0.shape[0]
        self.tol = tol
        self.stop_mode = stop_mode
        self.best_z = z0  # the driver's own copy: iterates may alias it, never the caller's z0
        self.best_residual = torch.full((batch,), math.inf, dtype=torch.float32, device=z0.device)
        self.nstep = torch.zeros(batch, dtype=torch.long, device=z0.device)
        self.active = torch.ones(batch, dtype=torch.bool, device=z0.device)
        self.latest_residual = torch.full((batch,), math.inf, dtype=torch.float32, device=z0.device)
        self.trace: list[Tensor] = []

    def update(self, z: Tensor, fz: Tensor) -> _Progress:
        """Records ``fz = f(z)`` for the active samples; returns the finiteness mask and batch flags."""
        # As few tensor ops as possible: on small problems each op's dispatch costs more than its
        # arithmetic, and on a GPU each is a kernel launch.
        res = residual(z, fz, self.stop_mode).float()
        # z is always finite here, so a non-finite f(z) makes the residual (a norm, >= 0) inf or NaN,
        # and `res < inf` is False for both: B comparisons instead of a pass over all of f(z).
        finite = res < math.inf
        counted = self.active & finite  # samples whose evaluation this was, and usable
        self.nstep += self.active
        better = counted & (res < self.best_residual)
        self.active = counted & (res > self.tol)
        self.latest_residual = torch.where(counted, res, self.latest_residual)
        self.trace.append(self.latest_residual.max() if len(res) else res.new_zeros(()))
        # One host synchronisation for every flag the driver branches on.
        batch = len(res)
        n_better, n_finite, n_active = torch.stack([better, finite, self.active]).sum(dim=1).tolist()
        self.best_residual = torch.where(better, res, self.best_residual)
        # While every sample improves (the usual case), the best iterate is z itself: skip a full pass.
        self.best_z = z if n_better == batch else torch.where(better[:, None], z, self.best_z)
        return _Progress(finite, n_finite == batch, n_active > 0, n_active == batch)

    def result(self, shape: torch.Size, dtype: torch.dtype) -> SolverResult:
        # A sample whose very first f(z0) was non-finite has no finite residual: report inf, return z0.
        return SolverResult(
            z=self.best_z.reshape(shape).to(dtype),
            nstep=self.nstep,
            residual=self.best_residual,
            # The best residual is <= tol exactly when some iterate met the tolerance.
            converged=self.best_residual <= self.tol,
            trace=torch.stack(self.trace),
        )


def weighted_sum(terms: Tensor, weights: Tensor) -> Tensor:
    """Σ_j weights[j, b] · terms[j, b, :] for terms ``(n, B, D)`` and weights ``(n, B)``; returns ``(B, D)``.

    The products of Anderson's mixing and of Broyden's low-rank updates, per sample.
    """
    if terms[0].numel() < _FUSED_SUM_LIMIT:
        # Small problems: one broadcast op, since dispatching n separate ops costs more.
        return (terms * weights[:, :, None]).sum(dim=0)
    # Large problems: n fused multiply-adds over contiguous (B, D) slices, with no (n, B, D)
    # temporary; on CPU 2-4x faster than the broadcast or bmm's (B, 1, n) x (B, n, D) products.
    total = terms[0] * weights[0, :, None]
    for j in range(1, terms.shape[0]):
        total.addcmul_(terms[j], weights[j, :, None])
    return total


# Elements per (B, D) slice above which weighted_sum loops over the n terms.
_FUSED_SUM_LIMIT = 1 << 16


def iterate(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    rule: StepRule,
    *,
    max_iter: int,
    tol: float,
    stop_mode: str,
) -> SolverResult:
    """Runs a step rule until every sample converges, fails or ``max_iter`` evaluations of ``f`` are spent.

    Args:
        f: Map whose fixed point is sought; called on tensors of ``z0``'s shape (and dtype).
        z0: Initial iterate, shape ``(B, ...)``; dim 0 indexes independent samples.
        rule: Proposes the next iterate from the current one (see :class:`StepRule`).
        max_iter: Maximum number of evaluations of ``f``.
        tol: Tolerance on each sample's residual.
        stop_mode: ``"rel"`` or ``"abs"`` (see :func:`residual`).

    Returns:
        The per-sample :class:`SolverResult`, ``z`` in ``z0``'s shape and dtype (float32 at least).
        Nothing is recorded by autograd: differentiate through :class:`~implicitlayers.ImplicitLayer`.

    Raises:
        ValueError: If ``f(z0)`` does not have ``z0``'s shape.
    """
    with torch.no_grad():
        return _iterate(f, z0, rule, max_iter=max_iter, tol=tol, stop_mode=stop_mode)


def _iterate(
    f: Callable[[Tensor], Tensor], z0: Tensor, rule: StepRule, *, max_iter: int, tol: float, stop_mode: str
) -> SolverResult:
    shape, device_type = z0.shape, z0.device.type
    dtype = working_dtype(z0.dtype)
    # A private copy: the best iterate may be z itself, which must not alias the caller's tensor.
    z = z0.detach().reshape(shape[0], math.prod(shape[1:])).to(dtype, copy=True)  # -1 fails on an empty batch
    tracker = _Tracker(z, tol, stop_mode)
    state = None
    for evaluation in range(max_iter):
        fz = _evaluate(f, z, shape, dtype, first=evaluation == 0)
        # The solver's own arithmetic must not be autocast to bf16: histories and Gram matrices
        # would lose the precision the tolerance asks for.
        with torch.autocast(device_type, enabled=False):
            progress = tracker.update(z, fz)
            if evaluation == max_iter - 1 or not progress.any_active:
                break
            if not progress.all_finite:
                # Non-finite samples are frozen; give the rule a zero residual there so nothing
                # non-finite enters its history and leaks through batched linear algebra.
                fz = torch.where(progress.finite[:, None], fz, z)
            proposal, state = rule.step(state, z, fz, tracker.active)
            z = proposal if progress.all_active else torch.where(tracker.active[:, None], proposal, tracker.best_z)
    return tracker.result(shape, dtype)


def _evaluate(f: Callable[[Tensor], Tensor], z: Tensor, shape: torch.Size, dtype: torch.dtype, first: bool) -> Tensor:
    fz = f(z.reshape(shape))
    if not isinstance(fz, Tensor):
        raise TypeError(f"f must return a Tensor, got {type(fz).__name__}")
    if first and fz.shape != shape:
        raise ValueError(
            f"f(z0) has shape {tuple(fz.shape)} but z0 has shape {tuple(shape)}; "
            "f must map a tensor to a tensor of the same shape"
        )
    return fz.detach().reshape(shape[0], math.prod(shape[1:])).to(dtype)
