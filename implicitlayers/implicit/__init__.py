"""The implicit-function primitive: z* = f(z*, θ) as one autograd citizen, and the gradient modes.

:func:`implicit_fixed_point` solves z = f(z, *inputs) and returns f(z*) with the derivative the
gradient mode defines (:class:`IFT`: those of the true fixed point z*(inputs) under every way PyTorch
differentiates). JAX's ``custom_root`` is the model: one residual function with explicit parameters,
a forward solver, and linear solves for the derivatives.

The package, by concern:

* ``binding``: a module's computation as a pure function of explicit tensors (:class:`ModuleFunction`);
* ``derivatives``: explicit derivatives of f by :mod:`torch.func`;
* ``problem``: one call's immutable :class:`~implicitlayers.implicit.problem.Problem` and the forward's record;
* ``functions``: the three autograd Functions (forward, adjoint and tangent solves);
* ``linear``: the adjoint and tangent equations, and :class:`Adjoint`, what a mode's adjoint receives;
* ``vmap``: folding a vmapped dimension into the batch;
* ``captures``: tensors f reads without receiving them;
* ``steps``: phantom steps and the unrolled loop;
* ``gradients``: the gradient modes, :class:`IFT`, :class:`Shine`, :class:`JFB`, :class:`Phantom`, :class:`Unrolled`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from ..solvers import Budget, Solver, SolverResult, as_solver
from .binding import ModuleFunction, PureFunction, bind
from .gradients import GRADIENT_MODES, IFT, JFB, Gradient, Phantom, Shine, Unrolled, as_gradient
from .linear import Adjoint
from .problem import is_transformed, make_problem
from .steps import phantom_steps, unrolled_picard

__all__ = [
    "GRADIENT_MODES",
    "IFT",
    "JFB",
    "Adjoint",
    "Gradient",
    "ModuleFunction",
    "Phantom",
    "Shine",
    "Unrolled",
    "as_gradient",
    "bind",
    "check_compatible",
    "implicit_fixed_point",
    "is_transformed",
    "phantom_steps",
    "unrolled_picard",
]

_RENAMED = {
    "forward": "solver=... and budget=il.Budget(...)",
    "adjoint": "backward=il.IFT(solver=..., max_iter=..., tol=...)",
    "refine": "backward=il.Shine(refine=...)",
}


def implicit_fixed_point(
    f: PureFunction,
    z0: Tensor,
    *inputs: Tensor,
    per_sample: Sequence[bool] | None = None,
    solver: str | Solver = "anderson",
    budget: Budget | None = None,
    backward: str | Gradient = "ift",
    on_forward: Callable[[SolverResult], None] | None = None,
    on_backward: Callable[[SolverResult], None] | None = None,
    **removed: Any,
) -> Tensor:
    """Solves z = f(z, *inputs) and returns f(z*), differentiable in ``inputs`` as ``backward`` says.

    With :class:`IFT` (the default) the derivatives are those of the exact fixed point z*(inputs)
    under reverse mode of any order, forward mode and :mod:`torch.func` (``grad``, ``vjp``, ``jvp``,
    ``jacrev``, ``jacfwd``, ``hessian``, ``vmap``).

    Examples:
        >>> import torch, implicitlayers as il
        >>> f = lambda z, x, w: torch.tanh(w * z) + x
        >>> x, w = torch.randn(3, 4, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
        >>> tight = il.Budget(tol=1e-12, max_iter=100)
        >>> def z_star(w):
        ...     return il.implicit_fixed_point(f, torch.zeros_like(x), x, w, per_sample=(True, False), budget=tight)
        >>> torch.func.jacrev(z_star)(w).shape
        torch.Size([3, 4])

    Args:
        f: ``f(z, *inputs) -> Tensor`` shaped like ``z``; sample b of the output may depend only on
            sample b of z (and of per-sample inputs). Tensors that need derivatives must reach f as
            ``inputs``: a closure over a tensor that requires grad gets its exact first-order
            gradient, but higher orders, forward mode and torch.func raise for it. A
            :class:`ModuleFunction` makes a module's tensors explicit.
        z0: Initial guess, shape ``(B, ...)``; no gradient flows to it (z* does not depend on it).
        *inputs: The tensors f depends on (x, parameters, ...).
        per_sample: For each input, whether its dim 0 indexes the samples like z's (x) or it is shared
            by all samples (a weight). Used by ``vmap``, which folds the mapped dimension into the
            batch when every mapped tensor is per-sample and solves once per index otherwise.
            Default: all shared.
        solver: The forward solver (an :class:`~implicitlayers.Solver` or a name).
        budget: The forward solve's :class:`~implicitlayers.Budget` (default ``Budget()``).
        backward: The gradient mode (a :class:`Gradient` or a name of :data:`GRADIENT_MODES`).
        on_forward: Called with the forward solve's detached :class:`~implicitlayers.SolverResult`.
        on_backward: Called with every adjoint or tangent solve's detached result.

    Returns:
        f(z*), shape and dtype of f's output (for :class:`Unrolled`, the last iterate).

    Raises:
        RuntimeError: If f reads a tensor that a torch.func transform is tracking without receiving
            it as an input, or the mode is first-order only and a transform is active.
        TypeError: For a keyword of the earlier interface (the message names the new spelling).
    """
    for name in removed:
        if name in _RENAMED:
            raise TypeError(f"implicit_fixed_point() no longer takes {name}=; use {_RENAMED[name]}")
        raise TypeError(f"implicit_fixed_point() got an unexpected keyword argument {name!r}")
    solver = as_solver(solver)
    gradient = as_gradient(backward)
    check_compatible(solver, gradient)
    problem = make_problem(f, z0, inputs, per_sample, solver, budget or Budget(), gradient, on_forward, on_backward)
    return gradient.fixed_point(problem, z0, inputs)


def check_compatible(solver: Solver, gradient: Gradient) -> None:
    """Raises ``ValueError`` when ``gradient`` needs the solver's memory and ``solver`` keeps none."""
    if gradient.needs_memory and not solver.keeps_memory:
        raise ValueError(gradient.memory_message(solver))
