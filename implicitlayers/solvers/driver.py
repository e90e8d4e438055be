"""The one iteration driver every built-in solver runs: :func:`iterate`.

A solver only says how it proposes the next iterate (:class:`StepRule`); the driver owns everything
else — evaluating ``f``, measuring each sample's residual, freezing samples that converged, failed or
diverged, keeping each sample's best iterate, deciding when to read flags back to the host — so each
guarantee is written, and tested, once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from .budget import Budget
from .norms import RESIDUAL_EPS, residuals, underflow_floor
from .result import SolverResult, Status

__all__ = ["DIVERGENCE_FACTOR", "StepRule", "host_counts", "iterate", "working_dtype"]

DIVERGENCE_FACTOR = 1e8
"""A sample whose ||f(z) - z|| exceeds this multiple of its ||f(z0) - z0|| is stopped as diverged.

Accelerated solvers may overshoot for a few steps, by orders of magnitude at most; eight orders of
magnitude above the start is growth without bound (for z = 2z + 1 from 0 it takes 27 steps)."""


class StepRule(Protocol):
    """How a solver proposes the next iterate.

    ``step`` receives the current iterate ``z`` and ``fz = f(z)`` (both flattened to ``(B, D)``, in the
    working dtype, with non-finite samples already replaced by a harmless value) and the mask of samples
    still iterating. It returns the next iterate for every sample (frozen samples are ignored) and its
    new state. ``state`` is ``None`` on the first call. A rule with quasi-Newton memory may also define
    ``adjoint_estimate(state)``, mapping flat ``(B, D)`` cotangents g to estimates of (I - J_f)⁻ᵀ g.
    """

    def step(self, state: Any, z: Tensor, fz: Tensor, active: Tensor) -> tuple[Tensor, Any]: ...


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype solvers iterate in: float32 at least, so bf16/fp16 inputs do not stall at 1e-2."""
    if not dtype.is_floating_point:
        raise ValueError(f"z0 must be a floating-point tensor, got dtype {dtype}")
    return torch.promote_types(dtype, torch.float32)


def host_counts(flags: list[Tensor]) -> list[int]:
    """How many samples each boolean ``(B,)`` flag holds: the driver's one host synchronisation per step."""
    return torch.stack(flags).sum(dim=1).tolist()


def iterate(
    f: Callable[[Tensor], Tensor], z0: Tensor, rule: StepRule, budget: Budget, *, keep_memory: bool = False
) -> SolverResult:
    """Runs a step rule until every sample converges, fails or ``budget.max_iter`` evaluations are spent.

    Args:
        f: Map whose fixed point is sought; called on tensors of ``z0``'s shape (and dtype). With
            ``budget.compact_rows`` it must also offer ``f.rows(z_rows, index)``, f evaluated on the
            samples ``index`` only (``z_rows`` holds those samples): once at most half of the samples
            are still iterating, only those are evaluated.
        z0: Initial iterate, shape ``(B, ...)``; dim 0 indexes independent samples.
        rule: Proposes the next iterate from the current one (see :class:`StepRule`).
        budget: Evaluations, tolerance, stopping test and loop mechanics (see :class:`Budget`).
        keep_memory: Attach the rule's estimate of the adjoint, read from its final memory, as
            ``adjoint_estimate`` (it keeps that memory alive while the result is held).

    Returns:
        The per-sample :class:`SolverResult`, ``z`` in ``z0``'s shape and dtype (float32 at least).
        Nothing is recorded by autograd: differentiate through :func:`implicitlayers.implicit_fixed_point`
        or a layer. On the meta device one evaluation of ``f`` checks shapes and every field is a meta
        tensor of its real shape, with no value.

    Raises:
        ValueError: If ``f(z0)`` does not have ``z0``'s shape, or ``compact_rows`` is asked for an ``f``
            without ``rows``.
    """
    if budget.compact_rows and not callable(getattr(f, "rows", None)):
        raise ValueError("Budget(compact_rows=True) needs f.rows(z_rows, index), f on a subset of the samples")
    with torch.no_grad():
        if z0.device.type == "meta":
            return _shapes_only(f, z0, rule if keep_memory else None)
        return _iterate(f, z0, rule, budget, keep_memory)


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
        self.status = torch.full((batch,), int(Status.max_iter), dtype=torch.long, device=z0.device)
        self.trace: list[Tensor] = []
        self.finite = self.active  # the latest evaluation's finiteness mask
        self.underflow = underflow_risk(z0, tol, stop_mode)

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
        # plain pass; only when a norm overflowed (or f returned inf/NaN), may have underflowed, or
        # a residual grew past the divergence limit is the step measured again, with stop reasons.
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
            failed = torch.where(step.diverged, int(Status.diverged), self.status)
            self.status = torch.where(self.active & ~step.finite, int(Status.non_finite), failed)
        self.nstep += self.active
        self.active = step.active
        self.finite = step.finite
        self.latest_residual = torch.where(step.counted, step.res, self.latest_residual)
        self.trace.append(self.latest_residual.max() if batch else self.latest_residual.new_zeros(()))
        self.best_residual = torch.where(step.better, step.res, self.best_residual)
        # While every sample improves (the usual case), the best iterate is z itself: skip a full pass.
        self.best_z = z if every_sample_better else torch.where(step.better[:, None], z, self.best_z)

    def _measure(self, z: Tensor, fz: Tensor, careful: bool, sync: bool = True) -> _Step:
        res, diff, finite = residuals(z, fz, self.stop_mode, robust=careful)
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
            # may have underflowed in a way that could pass for convergence (see underflow_risk).
            suspicious = diff < self.underflow if self.underflow else None
            if self.divergence_limit is not None:
                beyond = diff > self.divergence_limit
                suspicious = beyond if suspicious is None else suspicious | beyond
            if suspicious is not None:
                flags.append(suspicious)
        if not sync:
            return _Step(res, diff, finite, counted, better, active, diverged, [], False)
        # One host synchronisation for every flag the driver branches on.
        counts = host_counts(flags)
        needs_care = not careful and (counts[1] < len(res) or (len(counts) > 3 and counts[3] > 0))
        return _Step(res, diff, finite, counted, better, active, diverged, counts[:3], needs_care)

    def result(self, shape: torch.Size, dtype: torch.dtype) -> SolverResult:
        # A sample whose very first f(z0) was non-finite has no finite residual: report inf, return z0.
        converged = self.best_residual <= self.tol  # exactly when some iterate met the tolerance
        status = torch.where(converged, int(Status.converged), self.status)
        if self.tol == 0:  # a fixed budget asked for: running out of it is what was asked
            status = torch.where(status == Status.max_iter, int(Status.budget), status)
        return SolverResult(
            z=self.best_z.reshape(shape).to(dtype),
            nstep=self.nstep,
            residual=self.best_residual,
            converged=converged,
            trace=torch.stack(self.trace),
            status=status,
        )


def underflow_risk(z: Tensor, tol: float, stop_mode: str) -> float:
    """The step norm ||f(z) - z|| below which a plain measurement must be redone with care; 0: never.

    Squaring tiny entries underflows, so a plain norm below :func:`underflow_floor` may read 0: a
    false "converged" only if ``tol`` lies within that band. In ``"abs"`` mode that is tol below the
    floor; in ``"rel"`` mode, where the residual is ||f(z) - z|| / (||f(z)|| + 1e-12), tol below the
    floor / 1e-12 (never in float64, and below ~1e-3 in float32). With tol = 0 (a fixed budget) only
    an exact 0 stops a sample, and an underflow stops none early.
    """
    if tol == 0:
        return 0.0
    floor = underflow_floor(z)
    bound = floor if stop_mode == "abs" else floor / RESIDUAL_EPS
    return floor if tol < bound else 0.0


def _iterate(
    f: Callable[[Tensor], Tensor], z0: Tensor, rule: StepRule, budget: Budget, keep_memory: bool
) -> SolverResult:
    shape, device_type = z0.shape, z0.device.type
    max_iter, sync_every = budget.max_iter, budget.sync_every
    dtype = working_dtype(z0.dtype)
    # A private copy: the best iterate may be z itself, which must not alias the caller's tensor.
    z = z0.detach().reshape(shape[0], math.prod(shape[1:])).to(dtype, copy=True)  # -1 fails on an empty batch
    tracker = _Tracker(z, budget.tol, budget.stop_mode)
    state = None
    rows = f.rows if budget.compact_rows and sync_every == 1 else None
    chunk = _compiled_chunk(budget.compile_backend) if budget.compile_backend else None
    n_active = shape[0]
    evaluation = 0
    while evaluation < max_iter:
        # The first evaluation, every sync_every-th and the last read the flags back to the host;
        # the evaluations between them run without a synchronisation (see Budget.sync_every).
        sync = evaluation == 0 or evaluation == max_iter - 1 or evaluation % sync_every == 0
        if not sync:
            # Up to the next synchronisation: with a compile backend, one compiled graph.
            steps = min(sync_every - evaluation % sync_every, max_iter - 1 - evaluation)
            run = _unsynced_iterations if chunk is None else chunk
            # The chunk starts from an empty trace (a compiled chunk would specialise on its length).
            trace, tracker.trace = tracker.trace, []
            z, state = run(getattr(f, "untracked", f), rule, z, state, tracker, steps, shape, z0.dtype)
            tracker.trace = trace + tracker.trace
            evaluation += steps
            continue
        if rows is not None and evaluation > 0 and 2 * n_active <= shape[0]:
            fz = _evaluate_rows(rows, z, tracker.active, shape, z0.dtype, dtype)
        else:
            fz = _evaluate(f, z, shape, z0.dtype, dtype, first=evaluation == 0)
        evaluation += 1
        # The solver's own arithmetic must not be autocast to bf16: histories and Gram matrices
        # would lose the precision the tolerance asks for.
        with torch.autocast(device_type, enabled=False):
            progress = tracker.update(z, fz)
            n_active = progress.n_active
            if evaluation == max_iter or n_active == 0:
                break
            if not progress.all_finite:
                # Non-finite samples are frozen; give the rule a zero residual there so nothing
                # non-finite enters its history and leaks through batched linear algebra.
                fz = torch.where(tracker.finite[:, None], fz, z)
            proposal, state = rule.step(state, z, fz, tracker.active)
            all_active = n_active == shape[0]
            z = proposal if all_active else torch.where(tracker.active[:, None], proposal, tracker.best_z)
    result = tracker.result(shape, dtype)
    result.budget = budget
    if keep_memory:
        result.adjoint_estimate = _adjoint_estimate(rule, state, shape, dtype)
    return result


def _unsynced_iterations(
    f: Callable[[Tensor], Tensor],
    rule: StepRule,
    z: Tensor,
    state: Any,
    tracker: _Tracker,
    steps: int,
    shape: torch.Size,
    f_dtype: torch.dtype,
) -> tuple[Tensor, Any]:
    """``steps`` evaluations with no host synchronisation: every decision is a masked tensor op.

    A fixed sequence of kernels with no data-dependent branch, so that ``torch.compile`` traces it
    as one graph (:func:`_compiled_chunk`) and a GPU can capture it.
    """
    for _ in range(steps):
        fz = _evaluate(f, z, shape, f_dtype, z.dtype, first=False)
        with torch.autocast(z.device.type, enabled=False):
            tracker.update(z, fz, sync=False)
            fz = torch.where(tracker.finite[:, None], fz, z)
            proposal, state = rule.step(state, z, fz, tracker.active)
            z = torch.where(tracker.active[:, None], proposal, tracker.best_z)
    return z, state


_COMPILED_CHUNKS: dict[str, Callable[..., tuple[Tensor, Any]]] = {}


def _compiled_chunk(backend: str) -> Callable[..., tuple[Tensor, Any]]:
    """:func:`_unsynced_iterations` compiled by ``torch.compile`` with ``backend``, once per process.

    ``fullgraph=True``: a chunk that cannot be traced as one graph is an error, not a silent split.
    """
    if backend not in _COMPILED_CHUNKS:
        _COMPILED_CHUNKS[backend] = torch.compile(_unsynced_iterations, backend=backend, fullgraph=True)
    return _COMPILED_CHUNKS[backend]


def _adjoint_estimate(
    rule: StepRule, state: Any, shape: torch.Size, dtype: torch.dtype
) -> Callable[[Tensor], Tensor] | None:
    """The rule's estimate of g ↦ (I - J_f)⁻ᵀ g from its final ``state``, on tensors of ``shape``.

    A rule that stopped before its first step has an empty memory, whose estimate of the inverse
    Jacobian is the identity (J_f taken as 0): u = g.
    """
    flat_estimate = getattr(rule, "adjoint_estimate", None)
    if flat_estimate is None:
        return None
    if state is None:
        return torch.clone
    flat = flat_estimate(state)
    if flat is None:
        return None

    def estimate(cotangent: Tensor) -> Tensor:
        rows = cotangent.reshape(shape[0], math.prod(shape[1:])).to(dtype)
        return flat(rows).reshape(cotangent.shape).to(cotangent.dtype)

    return estimate


def _shapes_only(f: Callable[[Tensor], Tensor], z0: Tensor, memory: StepRule | None) -> SolverResult:
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
    if memory is not None and getattr(memory, "adjoint_estimate", None) is not None:
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
