"""ImplicitLayer: a layer whose output is the fixed point z* = f(z*, x), and the function form fixed_point."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..implicit import Gradient
from ..solvers import Budget, Solver
from .base import FixedPointModule

__all__ = ["ImplicitLayer", "fixed_point", "initial_guess", "validate_z_init"]


class ImplicitLayer(FixedPointModule):
    """A layer whose output is the fixed point z* = f(z*, x).

    Examples:
        >>> import torch, implicitlayers as il
        >>> class Cell(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(8, 8)
        ...     def forward(self, z, x):
        ...         return 0.5 * torch.tanh(self.lin(z)) + x
        >>> layer = il.ImplicitLayer(Cell(), tol=1e-6)
        >>> z = layer(torch.randn(5, 8))
        >>> bool(layer.stats.converged.all())
        True
        >>> layer = il.ImplicitLayer(Cell(), solver=il.Broyden(memory=10), backward=il.Phantom(steps=5))

    Args:
        f: Any callable ``f(z, x)`` returning z's structure and shapes; sample b of its output may
            depend only on sample b of z and x. A Module's parameters and buffers get every
            derivative; tensors a plain function captures get their exact first-order gradient.
            z may be a tensor or a tuple/list/dict of tensors (see :meth:`FixedPointModule.fixed_point`).
        solver: The forward solver (object or name).
        budget: The forward :class:`~implicitlayers.Budget`; ``max_iter``/``tol`` are shorthands.
        max_iter: Maximum evaluations of f in the forward solve (replaces ``budget.max_iter``).
        tol: Per-sample residual tolerance (replaces ``budget.tol``); 0 runs exactly ``max_iter``.
        backward: The gradient mode (:class:`~implicitlayers.IFT` by default; see
            :mod:`implicitlayers.implicit.gradients`).
        z_init: Initial guess: ``"zeros"`` (zeros shaped like x), ``"input"`` (x itself) or a callable
            ``x -> z0`` (which may return a tuple/list/dict of tensors).
        **options: The other :class:`FixedPointModule` options: ``eval_budget``,
            ``on_nonconvergence``, ``warm_start``, ``jacobian_penalty``, ``spectral_radius_iters``,
            ``correction_states``.

    Attributes:
        stats: The last forward's :class:`~implicitlayers.SolverResult`, detached.
        backward_stats: The last adjoint solve's :class:`~implicitlayers.SolverResult`, detached.

    Shapes:
        x: ``(B, ...)``; output: the shape of z0 (x's shape for ``"zeros"``/``"input"``).
    """

    def __init__(
        self,
        f: nn.Module | Callable[..., Any],
        *,
        solver: str | Solver = "anderson",
        budget: Budget | None = None,
        max_iter: int | None = None,
        tol: float | None = None,
        backward: str | Gradient = "ift",
        z_init: str | Callable[[Tensor], Any] = "zeros",
        **options: Any,
    ) -> None:
        super().__init__(solver=solver, budget=budget, max_iter=max_iter, tol=tol, backward=backward, **options)
        if not callable(f):
            raise ValueError(f"f must be callable as f(z, x), got {type(f).__name__}")
        self.f = f
        self.z_init = validate_z_init(z_init)

    def forward(self, x: Tensor) -> Tensor:
        z0 = initial_guess(self.z_init, x)
        return self.fixed_point(self.f, z0, x)


def fixed_point(f: Callable[[Any, Tensor], Any], x: Tensor, z0: Any, **layer_options: Any) -> Any:
    """z* = f(z*, x) from the initial guess ``z0``, with gradients attached: no Module needed.

    Examples:
        >>> import torch, implicitlayers as il
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> z = il.fixed_point(lambda z, x: 0.5 * torch.tanh(z) + x, x, torch.zeros(4, 3), tol=1e-8)
        >>> z.sum().backward()
        >>> x.grad.shape
        torch.Size([4, 3])

    Args:
        f: Any callable ``f(z, x)``: a Module (its parameters and buffers get every derivative), or a
            function (tensors it captures get their exact first-order gradient; higher orders, forward
            mode and torch.func then need them passed through x or held by a Module).
        x: The input, shape ``(B, ...)``.
        z0: The initial guess: a tensor ``(B, ...)`` or a tuple/list/dict of them.
        **layer_options: Any :class:`ImplicitLayer` option (``solver``, ``tol``, ``backward``, ...).

    Returns:
        z* in ``z0``'s structure. For solver statistics, build an :class:`ImplicitLayer` and read its
        ``stats``.
    """
    layer = ImplicitLayer(f, z_init=lambda _: z0, **layer_options)
    return layer(x)


def validate_z_init(z_init: str | Callable[[Tensor], Any]) -> str | Callable[[Tensor], Any]:
    """Checks a ``z_init`` argument: ``"zeros"``, ``"input"`` or a callable."""
    if callable(z_init) or z_init in ("zeros", "input"):
        return z_init
    raise ValueError(f"z_init must be 'zeros', 'input' or a callable x -> z0, got {z_init!r}")


def initial_guess(z_init: str | Callable[[Tensor], Any], x: Tensor) -> Any:
    """The solver's starting point for input ``x`` (kept differentiable for unrolled mode)."""
    if z_init == "zeros":
        return torch.zeros_like(x)
    if z_init == "input":
        return x
    z0 = z_init(x)
    if not isinstance(z0, (Tensor, tuple, list, dict)):
        raise ValueError(f"z_init(x) must return a Tensor or a tuple/list/dict of them, got {type(z0).__name__}")
    return z0
