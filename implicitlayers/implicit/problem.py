"""One call of the primitive: the fixed-point problem, and what its forward solve leaves for the backward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..solvers import Budget, Solver, SolverResult
from .binding import PureFunction

__all__ = ["ForwardRecord", "Outbox", "Problem", "is_transformed", "make_problem"]


def is_transformed(*tensors: Any) -> bool:
    """Whether any tensor is being transformed by :mod:`torch.func` (vmap, grad, jvp, ...)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(isinstance(t, Tensor) and wrapped(t) for t in tensors)


class ForwardRecord(NamedTuple):
    """What a forward solve learnt, for its backward.

    Attributes:
        z_best: The solver's best iterate z*, detached.
        captures: Whether f reads tensors that require grad without receiving them as inputs.
        estimate: The forward solver's estimate of g ↦ (I - J)⁻ᵀ g, where the gradient mode asked
            for the solver's memory (SHINE); else None.
    """

    z_best: Tensor
    captures: bool
    estimate: Callable[[Tensor], Tensor] | None


@dataclass
class Outbox:
    """Carries the forward's results to ``setup_context``.

    A ``torch.autograd.Function`` that supports torch.func has a ``forward`` without ``ctx``; the
    forward writes its immutable :class:`ForwardRecord` here once and ``setup_context`` moves the
    recorded graph of f onto ``ctx`` (so that it dies with the graph of the call, not with the problem).
    """

    record: ForwardRecord | None = None
    graph: tuple[Tensor, list[Tensor], Tensor] | None = None


@dataclass(frozen=True)
class Problem:
    """Everything the autograd Functions share for one call of the primitive; immutable.

    Attributes:
        f: The pure function ``f(z, *inputs)``.
        per_sample: For each input, whether its dim 0 indexes the samples (used by vmap).
        solver: The forward solver.
        budget: The forward solve's budget.
        gradient: How z* is differentiated, a :class:`~implicitlayers.implicit.gradients.Gradient` (typed
            ``Any``: this module is the package's bottom layer and imports none above it, not even for types).
        on_forward: Called with the forward solve's detached result.
        on_backward: Called with each adjoint or tangent solve's detached result.
        record_graph: Keep the forward's last evaluation of f with its graph for the first backward.
        detect_captures: Find out, at the forward's first evaluation, whether f captures tensors.
        outbox: Where the forward leaves its :class:`ForwardRecord`.
    """

    f: PureFunction
    per_sample: tuple[bool, ...]
    solver: Solver
    budget: Budget
    gradient: Any
    on_forward: Callable[[SolverResult], None] | None = None
    on_backward: Callable[[SolverResult], None] | None = None
    record_graph: bool = False
    detect_captures: bool = False
    outbox: Outbox = field(default_factory=Outbox, compare=False, repr=False)


def make_problem(
    f: PureFunction,
    z0: Tensor,
    inputs: Sequence[Tensor],
    per_sample: Sequence[bool] | None,
    solver: Solver,
    budget: Budget,
    gradient: Any,
    on_forward: Callable[[SolverResult], None] | None,
    on_backward: Callable[[SolverResult], None] | None,
) -> Problem:
    """A :class:`Problem`, deciding whether the first-order path can reuse the forward's graph."""
    per_sample = tuple(per_sample) if per_sample is not None else (False,) * len(inputs)
    if len(per_sample) != len(inputs):
        raise ValueError(f"per_sample must have one flag per input ({len(inputs)}), got {len(per_sample)}")
    plain = torch.is_grad_enabled() and not is_transformed(z0, *inputs)
    differentiated = gradient.differentiates
    return Problem(
        f,
        per_sample,
        solver,
        budget,
        gradient,
        on_forward,
        on_backward,
        record_graph=differentiated and plain and any(i.requires_grad for i in inputs),
        detect_captures=differentiated and plain,
    )
