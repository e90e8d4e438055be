"""What every solver shares: the result type, the residual, and the iteration driver.

A built-in solver is a small object with an explicit state and a single ``step`` (the
:class:`StepRule` protocol). :func:`iterate` owns everything else — evaluating ``f``, measuring
each sample's residual, freezing samples that converged or produced non-finite values, keeping
the best iterate — so a new method only has to say how it proposes the next iterate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from ..errors import check_int_at_least

__all__ = [
    "DIVERGENCE_FACTOR",
    "STATUS_NAMES",
    "STOP_MODES",
    "SolverResult",
    "StepRule",
    "iterate",
    "residual",
    "unit_rows",
    "validate_solve_args",
    "weighted_sum",
]

STOP_MODES = ("rel", "abs")

# Added to ||f(z)|| in the relative residual so that z = f(z) = 0 counts as converged.
RESIDUAL_EPS = 1e-12

STATUS_NAMES = ("converged", "max_iter", "non_finite", "diverged")
"""What ``SolverResult.status`` codes mean, by index: 0 converged; 1 ran out of ``max_iter`` (or was
never asked to converge); 2 ``f`` returned inf/NaN for that sample; 3 its absolute residual grew past
:data:`DIVERGENCE_FACTOR` times the one at ``z0``."""

DIVERGENCE_FACTOR = 1e8
"""A sample whose ||f(z) - z|| exceeds this multiple of its ||f(z0) - z0|| is stopped as diverged.

Accelerated solvers may overshoot for a few steps, by orders of magnitude at most; eight orders of
magnitude above the start is growth without bound (for z = 2z + 1 from 0 it takes 27 steps)."""


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
        status: Why each sample stopped, ``LongTensor[B]`` indexing :data:`STATUS_NAMES`:
            converged, max_iter, non_finite or diverged. Defaults to converged/max_iter from
            ``converged`` for results built without it.
        spectral_radius: ρ(J_f) at each sample's fixed point, ``Tensor[B]``, where a layer was asked to
            estimate it (``spectral_radius_iters``); else None.
        adjoint_estimate: For quasi-Newton solvers (Broyden, Anderson), ``g ↦ u`` with
            u ≈ (I - J_f)⁻ᵀ g, shapes ``(B, ...)`` like ``z``, read from the solver's final memory
            (the SHINE estimate of the adjoint solve); else None. Not kept by :meth:`detach`.
    """

    z: Tensor
    nstep: Tensor
    residual: Tensor
    converged: Tensor
    trace: Tensor
    status: Tensor | None = None
    spectral_radius: Tensor | None = None
    adjoint_estimate: Callable[[Tensor], Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.status is None:
            self.status = (~self.converged).long()

    def detach(self) -> SolverResult:
        """Returns a copy whose tensors are detached from any autograd graph."""
        return SolverResult(
            self.z.detach(),
            self.nstep,
            self.residual.detach(),
            self.converged,
            self.trace.detach(),
            self.status,
            None if self.spectral_radius is None else self.spectral_radius.detach(),
        )

    def reasons(self) -> dict[str, int]:
        """How many samples stopped for each reason of :data:`STATUS_NAMES` (only those that occur)."""
        counts = torch.bincount(self.status.flatten().cpu(), minlength=len(STATUS_NAMES)).tolist()
        return {name: count for name, count in zip(STATUS_NAMES, counts, strict=False) if count}

    def summary(self) -> dict[str, float]:
        """Batch statistics as plain floats: mean/max steps, max residual, fractions unconverged,
        non-finite and diverged."""
        batch = max(len(self.status), 1)
        return {
            "nstep_mean": float(self.nstep.float().mean()),
            "nstep_max": float(self.nstep.max()),
            "residual_max": float(self.residual.max()),
            "unconverged": float((~self.converged).float().mean()),
            "non_finite": float((self.status == 2).sum()) / batch,
            "diverged": float((self.status == 3).sum()) / batch,
        }


class StepRule(Protocol):
    """How a solver proposes the next iterate.

    ``step`` receives the current iterate ``z`` and ``fz = f(z)`` (both flattened to ``(B, D)``, in the
    working dtype, with non-finite samples already replaced by a harmless value) and the mask of samples
    still iterating. It returns the next iterate for every sample (frozen samples are ignored) and its
    new state. ``state`` is ``None`` on the first call.
    """

    def step(self, state: Any, z: Tensor, fz: Tensor, active: Tensor) -> tuple[Tensor, Any]: ...


def adjoint_estimate(
    rule: StepRule, state: Any, shape: torch.Size, dtype: torch.dtype
) -> Callable[[Tensor], Tensor] | None:
    """The rule's estimate of g ↦ (I - J_f)⁻ᵀ g from its final ``state``, on tensors of ``shape``.

    A rule offers one by defining ``adjoint_estimate(state)``, which maps flat ``(B, D)`` cotangents
    in the working ``dtype`` to flat estimates; rules without one, or with no state yet, give None.
    """
    flat_estimate = getattr(rule, "adjoint_estimate", None)
    if flat_estimate is None or state is None:
        return None
    flat = flat_estimate(state)
    if flat is None:
        return None

    def estimate(cotangent: Tensor) -> Tensor:
        rows = cotangent.reshape(shape[0], math.prod(shape[1:])).to(dtype)
        return flat(rows).reshape(cotangent.shape).to(cotangent.dtype)

    return estimate


def measure(z: Tensor, fz: Tensor, stop_mode: str = "rel") -> tuple[Tensor, Tensor]:
    """``(residual, usable)`` per sample in one plain pass: no host synchronisation, no rescaling.

    ``usable`` is False where a norm overflowed or f(z) is not finite, so that such a residual is
    never taken for convergence (the solvers' driver then measures again, overflow-safe).
    """
    work = torch.promote_types(z.dtype, torch.float32)
    z2 = z.reshape(z.shape[0], math.prod(z.shape[1:])).to(work)
    f2 = fz.reshape(fz.shape[0], math.prod(fz.shape[1:])).to(work)
    res, _, usable = _residuals(z2, f2, stop_mode, robust=False)
    return res, usable


def residual(z: Tensor, fz: Tensor, stop_mode: str = "rel") -> Tensor:
    """Per-sample residual of ``z`` for the map that sent it to ``fz``, free of overflow.

    Norms are computed without squaring overflow (float32 iterates of 1e20 have finite residuals), so
    the residual is inf or NaN only where ``z`` or ``fz`` is.

    Args:
        z: Iterate, shape ``(B, ...)``.
        fz: ``f(z)``, same shape.
        stop_mode: ``"rel"`` for ||f(z)-z|| / (||f(z)|| + 1e-12), ``"abs"`` for ||f(z)-z||.

    Returns:
        Residuals, shape ``(B,)``, float64.
    """
    work = torch.promote_types(z.dtype, torch.float32)
    z2 = z.reshape(z.shape[0], math.prod(z.shape[1:])).to(work)
    f2 = fz.reshape(fz.shape[0], math.prod(fz.shape[1:])).to(work)
    return _residuals(z2, f2, stop_mode, robust=True)[0].double()


def row_norms(x: Tensor, robust: bool = True) -> Tensor:
    """2-norms of the rows of ``x`` (B, D).

    With ``robust`` the rows are scaled by their largest magnitude first, so that squaring cannot
    overflow (float32 near 1e19, float64 near 1e154) nor underflow, and the result is float64;
    otherwise one plain pass in x's dtype.
    """
    if not robust or x.shape[0] == 0:
        return torch.linalg.vector_norm(x, dim=1)
    scale = x.abs().amax(dim=1, keepdim=True)
    scaled = x / scale.clamp_min(torch.finfo(x.dtype).tiny)
    return torch.linalg.vector_norm(scaled.double(), dim=1) * scale[:, 0].double()


def unit_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x / ||x||, ||x||)`` per row of ``x`` (B, D), without overflow or underflow, in x's dtype.

    Each row is scaled by its largest magnitude before the squares are summed, so rows near the
    dtype's largest (or smallest) values are handled; a zero row gives a zero unit vector and norm 0.
    """
    scale = x.abs().amax(dim=1, keepdim=True) if x.shape[1] else x.new_zeros(x.shape[0], 1)
    scaled = x / scale.clamp_min(torch.finfo(x.dtype).tiny)
    norm = torch.linalg.vector_norm(scaled, dim=1, keepdim=True)
    unit = torch.where(norm > 0, scaled / norm.clamp_min(torch.finfo(x.dtype).tiny), 0.0)
    return unit, (norm * scale)[:, 0]


def underflow_floor(x: Tensor) -> float:
    """A plain 2-norm of a row of ``x`` (B, D) below this may have lost accuracy to underflow.

    A norm of at least 1024·√(tiny·D) has an entry whose square is normal, and the entries whose
    squares underflow add at most D·tiny to a sum of at least 2²⁰·D·tiny: the norm is then accurate
    to 1e-6 relative. (float32: ≈ 1e-16·√D; float64: ≈ 1e-151·√D.)
    """
    return 1024.0 * math.sqrt(torch.finfo(x.dtype).tiny * max(math.prod(x.shape[1:]), 1))


def _residuals(z: Tensor, fz: Tensor, stop_mode: str, robust: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(residual, ||f(z) - z||, usable)`` per row of flat ``(B, D)`` tensors (see :func:`row_norms`).

    ``usable`` is False where a norm is inf or NaN: a relative residual with an overflowed ||f(z)||
    would read 0, and an overflow must never pass for convergence.
    """
    diff = row_norms(fz - z, robust)
    if stop_mode == "abs":
        return diff, diff, diff < math.inf
    image = row_norms(fz, robust)
    return diff / (image + RESIDUAL_EPS), diff, (diff + image) < math.inf


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
    all_finite: bool  # every sample's f(z) finite (the mask itself is the tracker's ``finite``)
    n_active: int  # samples still iterating


class _Step(NamedTuple):
    """One evaluation's measurements, before they are recorded."""

    res: Tensor
    diff: Tensor  # ||f(z) - z||
    finite: Tensor
    counted: Tensor
    better: Tensor
    active: Tensor
    diverged: Tensor | None  # measured only with care
    counts: list[int]  # samples better, finite, still active
    needs_care: bool


def host_counts(flags: list[Tensor]) -> list[int]:
    """How many samples each boolean ``(B,)`` flag holds: the driver's one host synchronisation per step."""
    return torch.stack(flags).sum(dim=1).tolist()


class _Tracker:
    """Per-sample bookkeeping: residuals, best iterate, the freeze mask, stop reasons and the trace."""

    def __init__(self, z0: Tensor, tol: float, stop_mode: str) -> None:
        batch = z0.shape[0]
        self.tol = tol
        self.stop_mode = stop_mode
        self.best_z = z0  # the driver's own copy: iterates may alias it, never the caller's z0
        # Residuals are kept in the working dtype (one dtype for every op of the usual step); an
        # overflow-safe measurement larger than its largest finite value saturates there.
        self.best_residual = torch.full((batch,), math.inf, dtype=z0.dtype, device=z0.device)
        self.nstep = torch.zeros(batch, dtype=torch.long, device=z0.device)
        self.active = torch.ones(batch, dtype=torch.bool, device=z0.device)
        self.latest_residual = torch.full((batch,), math.inf, dtype=z0.dtype, device=z0.device)
        self.divergence_limit: Tensor | None = None  # DIVERGENCE_FACTOR · ||f(z0) - z0|| per sample
        self.status = torch.ones(batch, dtype=torch.long, device=z0.device)  # max_iter until shown otherwise
        self.trace: list[Tensor] = []
        self.finite = self.active  # the latest evaluation's finiteness mask

    def update(self, z: Tensor, fz: Tensor, sync: bool = True) -> _Progress | None:
        """Records ``fz = f(z)`` for the active samples; returns the batch flags the driver branches on.

        With ``sync=False`` nothing is read back to the host: the step is measured overflow-safe with
        stop reasons (the careful path, which needs no branch), every update is a masked select, and
        ``None`` is returned, since the batch flags are unknown until the next synchronised step.
        """
        if not sync:
            self._record(self._measure(z, fz, careful=True, sync=False), z, every_sample_better=False)
            return None
        # As few tensor ops as possible: on small problems each op's dispatch costs more than its
        # arithmetic, and on a GPU each is a kernel launch. So the usual step measures norms in one
        # plain pass; only when a norm overflowed (or f returned inf/NaN) or a residual grew past the
        # divergence limit is the step measured again, overflow-safe, with stop reasons.
        step = self._measure(z, fz, careful=False)
        if step.needs_care:
            step = self._measure(z, fz, careful=True)
        n_better, n_finite, n_active = step.counts
        batch = len(step.res)
        self._record(step, z, every_sample_better=n_better == batch)
        return _Progress(n_finite == batch, n_active)

    def _record(self, step: _Step, z: Tensor, every_sample_better: bool) -> None:
        batch = len(step.res)
        if self.divergence_limit is None:
            self.divergence_limit = DIVERGENCE_FACTOR * step.diff
        if step.diverged is not None:  # measured with care: stop reasons are known
            failed = torch.where(step.diverged, 3, self.status)
            self.status = torch.where(self.active & ~step.finite, 2, failed)
        self.nstep += self.active
        self.active = step.active
        self.finite = step.finite
        self.latest_residual = torch.where(step.counted, step.res, self.latest_residual)
        self.trace.append(self.latest_residual.max() if batch else self.latest_residual.new_zeros(()))
        self.best_residual = torch.where(step.better, step.res, self.best_residual)
        # While every sample improves (the usual case), the best iterate is z itself: skip a full pass.
        self.best_z = z if every_sample_better else torch.where(step.better[:, None], z, self.best_z)

    def _measure(self, z: Tensor, fz: Tensor, careful: bool, sync: bool = True) -> _Step:
        res, diff, finite = _residuals(z, fz, self.stop_mode, robust=careful)
        if careful:
            largest = torch.finfo(z.dtype).max
            res, diff = res.clamp(max=largest).to(z.dtype), diff.clamp(max=largest).to(z.dtype)
        counted = self.active & finite  # samples whose evaluation this was, and usable
        better = counted & (res < self.best_residual)
        active = counted & (res > self.tol)
        flags = [better, finite, active]
        diverged = None
        if careful:
            # The first evaluation sets the divergence limit, so nothing has diverged yet; but a
            # non-finite f(z0) is already a stop reason, recorded like any later one.
            if self.divergence_limit is None:
                diverged = torch.zeros_like(counted)
            else:
                diverged = counted & (diff > self.divergence_limit)
                active = active & ~diverged
                flags[2] = active
        else:
            # Measure with care where a sample passed the divergence limit, or where its plain norm
            # is so small that squaring its entries may have underflowed (at tiny scales such a step
            # would read 0, "converged"; with tol = 0, a fixed budget, only an exact 0 stops a sample).
            suspicious = diff < (underflow_floor(z) if self.tol > 0 else 0.0)
            if self.divergence_limit is not None:
                suspicious = suspicious | (diff > self.divergence_limit)
            flags.append(suspicious)
        if not sync:
            return _Step(res, diff, finite, counted, better, active, diverged, [], False)
        # One host synchronisation for every flag the driver branches on.
        counts = host_counts(flags)
        needs_care = not careful and (counts[1] < len(res) or counts[3] > 0)
        return _Step(res, diff, finite, counted, better, active, diverged, counts[:3], needs_care)

    def result(self, shape: torch.Size, dtype: torch.dtype) -> SolverResult:
        # A sample whose very first f(z0) was non-finite has no finite residual: report inf, return z0.
        converged = self.best_residual <= self.tol  # exactly when some iterate met the tolerance
        return SolverResult(
            z=self.best_z.reshape(shape).to(dtype),
            nstep=self.nstep,
            residual=self.best_residual,
            converged=converged,
            trace=torch.stack(self.trace),
            status=torch.where(converged, 0, self.status),
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
    sync_every: int = 1,
) -> SolverResult:
    """Runs a step rule until every sample converges, fails or ``max_iter`` evaluations of ``f`` are spent.

    Args:
        f: Map whose fixed point is sought; called on tensors of ``z0``'s shape (and dtype). A map may
            also offer ``f.rows(z_rows, index)``, f evaluated on the samples ``index`` only (``z_rows``
            holds those samples): once at most half of the samples are still iterating, only those
            are evaluated, and the frozen ones cost nothing.
        z0: Initial iterate, shape ``(B, ...)``; dim 0 indexes independent samples.
        rule: Proposes the next iterate from the current one (see :class:`StepRule`).
        max_iter: Maximum number of evaluations of ``f``.
        tol: Tolerance on each sample's residual.
        stop_mode: ``"rel"`` or ``"abs"`` (see :func:`residual`).
        sync_every: Evaluations per host synchronisation. The driver reads its flags back to the host
            (to stop once every sample has stopped) after the first evaluation, then every
            ``sync_every``-th and the last one; in between, every decision is a masked tensor op, so
            a chunk of iterations is a fixed sequence of kernels with no data-dependent branch, which
            CUDA graphs and ``torch.compile`` can capture and fuse. Each sample's result (iterate,
            ``nstep``, residual, status) is the same as with 1, up to rounding (chunks measure norms
            overflow-safe); only the batch may run up to ``sync_every - 1`` evaluations past the moment
            its last sample stopped. 1 (default) synchronises after every evaluation, the fastest on a
            CPU. ``f.rows`` is used only with 1 (choosing rows needs the host).

    Returns:
        The per-sample :class:`SolverResult`, ``z`` in ``z0``'s shape and dtype (float32 at least).
        Nothing is recorded by autograd: differentiate through :class:`~implicitlayers.ImplicitLayer`.

    Raises:
        ValueError: If ``f(z0)`` does not have ``z0``'s shape.
    """
    check_int_at_least("sync_every", sync_every)
    with torch.no_grad():
        if z0.device.type == "meta":
            return _shapes_only(f, z0, rule)
        return _iterate(f, z0, rule, max_iter=max_iter, tol=tol, stop_mode=stop_mode, sync_every=sync_every)


def _iterate(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    rule: StepRule,
    *,
    max_iter: int,
    tol: float,
    stop_mode: str,
    sync_every: int,
) -> SolverResult:
    shape, device_type = z0.shape, z0.device.type
    dtype = working_dtype(z0.dtype)
    # A private copy: the best iterate may be z itself, which must not alias the caller's tensor.
    z = z0.detach().reshape(shape[0], math.prod(shape[1:])).to(dtype, copy=True)  # -1 fails on an empty batch
    tracker = _Tracker(z, tol, stop_mode)
    state = None
    rows = getattr(f, "rows", None)
    n_active = shape[0]
    for evaluation in range(max_iter):
        # The first evaluation, every sync_every-th and the last read the flags back to the host;
        # the evaluations between them run without a synchronisation (see iterate).
        sync = evaluation == 0 or evaluation == max_iter - 1 or evaluation % sync_every == 0
        if rows is not None and sync_every == 1 and evaluation > 0 and 2 * n_active <= shape[0]:
            fz = _evaluate_rows(rows, z, tracker.active, shape, z0.dtype, dtype)
        else:
            fz = _evaluate(f, z, shape, z0.dtype, dtype, first=evaluation == 0)
        # The solver's own arithmetic must not be autocast to bf16: histories and Gram matrices
        # would lose the precision the tolerance asks for.
        with torch.autocast(device_type, enabled=False):
            progress = tracker.update(z, fz, sync=sync)
            if progress is None:  # unknown flags: assume the worst, with masks instead of branches
                all_finite, all_active = False, False
            else:
                n_active = progress.n_active
                if evaluation == max_iter - 1 or n_active == 0:
                    break
                all_finite, all_active = progress.all_finite, n_active == shape[0]
            if not all_finite:
                # Non-finite samples are frozen; give the rule a zero residual there so nothing
                # non-finite enters its history and leaks through batched linear algebra.
                fz = torch.where(tracker.finite[:, None], fz, z)
            proposal, state = rule.step(state, z, fz, tracker.active)
            z = proposal if all_active else torch.where(tracker.active[:, None], proposal, tracker.best_z)
    result = tracker.result(shape, dtype)
    result.adjoint_estimate = adjoint_estimate(rule, state, shape, dtype)
    return result


def _shapes_only(f: Callable[[Tensor], Tensor], z0: Tensor, rule: StepRule) -> SolverResult:
    """The solve on the meta device, which holds shapes and no values: one evaluation checks f's shape.

    Every field has its real shape and dtype and, like every meta tensor, no value: shape inference
    (``torch.device("meta")`` model construction, FLOP counters) runs through a solve, and nothing
    that needs a value (convergence, a branch on a residual) can be read from it by mistake.
    """
    shape = z0.shape
    dtype = working_dtype(z0.dtype)
    z = z0.detach().reshape(shape[0], math.prod(shape[1:])).to(dtype)
    fz = _evaluate(f, z, shape, z0.dtype, dtype, first=True)
    per_sample = torch.empty(shape[0], device="meta")
    result = SolverResult(
        z=fz.reshape(shape).to(dtype),
        nstep=per_sample.long(),
        residual=per_sample.to(dtype),
        converged=per_sample.bool(),
        trace=torch.empty(1, dtype=dtype, device="meta"),
        status=per_sample.long(),
    )
    if getattr(rule, "adjoint_estimate", None) is not None:
        result.adjoint_estimate = torch.clone  # the estimate's shape: that of its cotangent
    return result


def _evaluate_rows(
    rows: Callable[[Tensor, Tensor], Tensor],
    z: Tensor,
    active: Tensor,
    shape: torch.Size,
    f_dtype: torch.dtype,
    dtype: torch.dtype,
) -> Tensor:
    """f on the active samples only; a frozen sample gets f(z) = z (a zero residual nobody reads)."""
    index = active.nonzero()[:, 0]
    selected = z.index_select(0, index)
    fz = rows(selected.reshape(len(index), *shape[1:]).to(f_dtype), index)
    if not isinstance(fz, Tensor) or fz.shape != (len(index), *shape[1:]):
        raise ValueError(
            f"f.rows returned {type(fz).__name__} of shape {tuple(getattr(fz, 'shape', ()))} for "
            f"{len(index)} samples; it must return f on exactly those samples, shaped like them"
        )
    return z.index_copy(0, index, fz.detach().reshape(len(index), -1).to(dtype))


def _evaluate(
    f: Callable[[Tensor], Tensor], z: Tensor, shape: torch.Size, f_dtype: torch.dtype, dtype: torch.dtype, first: bool
) -> Tensor:
    # f sees iterates in the dtype it was given (z0's: a half module gets half inputs), while the
    # driver keeps its own copy in the working dtype.
    fz = f(z.reshape(shape).to(f_dtype))
    if not isinstance(fz, Tensor):
        raise TypeError(f"f must return a Tensor, got {type(fz).__name__}")
    if first and fz.shape != shape:
        raise ValueError(
            f"f(z0) has shape {tuple(fz.shape)} but z0 has shape {tuple(shape)}; "
            "f must map a tensor to a tensor of the same shape"
        )
    return fz.detach().reshape(shape[0], math.prod(shape[1:])).to(dtype)
