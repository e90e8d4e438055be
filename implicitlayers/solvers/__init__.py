"""Fixed-point solvers: :class:`Solver` objects, their :class:`Budget`, the driver and the registry.

``il.Picard()``, ``il.Anderson(memory=8)`` and ``il.Broyden()`` are immutable objects holding their
method's parameters; :class:`Budget` says how long a solve runs and when a sample stops; a name
(``"anderson"``) is shorthand for the default object. :func:`solve` is the one-call entry point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from .anderson import Anderson
from .base import Solver, as_solver, available_solvers, get_solver, register_solver
from .broyden import Broyden
from .budget import STOP_MODES, Budget
from .driver import DIVERGENCE_FACTOR, StepRule, iterate
from .norms import residual
from .picard import Picard
from .result import STATUS_NAMES, SolverResult, Status

__all__ = [
    "DIVERGENCE_FACTOR",
    "STATUS_NAMES",
    "STOP_MODES",
    "Anderson",
    "Broyden",
    "Budget",
    "Picard",
    "Solver",
    "SolverResult",
    "Status",
    "StepRule",
    "as_solver",
    "available_solvers",
    "get_solver",
    "iterate",
    "register_solver",
    "residual",
    "solve",
]

register_solver("picard", Picard)
register_solver("fixed_point", Picard)
register_solver("anderson", Anderson)
register_solver("broyden", Broyden)


def solve(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    solver: str | Solver = "anderson",
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    sync_every: int = 1,
    keep_memory: bool = False,
    **options: Any,
) -> SolverResult:
    """Finds z with z = f(z), independently for every sample of a batch.

    Examples:
        >>> import torch, implicitlayers as il
        >>> x = torch.randn(4, 3)
        >>> res = il.solve(lambda z: 0.5 * torch.tanh(z) + x, torch.zeros_like(x), tol=1e-6)
        >>> bool(res.converged.all())
        True
        >>> res = il.solve(lambda z: 0.5 * torch.tanh(z) + x, torch.zeros_like(x), solver=il.Anderson(memory=3))

    Args:
        f: Maps a tensor of shape ``(B, ...)`` to one of the same shape; sample ``b`` of the output may
            depend only on sample ``b`` of the input.
        z0: Initial guess, shape ``(B, ...)``. Iterates are kept in float32 at least (also under
            autocast); ``f`` is called with iterates in ``z0``'s dtype (half for a half module).
        solver: A :class:`Solver`, or a name from :func:`available_solvers`.
        max_iter: Maximum evaluations of ``f`` (>= 1); with ``tol``, ``stop_mode`` and ``sync_every``,
            the solve's :class:`Budget`.
        tol: Each sample stops as soon as its residual is at most ``tol`` (>= 0).
        stop_mode: ``"rel"`` or ``"abs"`` residual (see :class:`Budget`).
        sync_every: Evaluations per host synchronisation (see :class:`Budget`).
        keep_memory: Keep a quasi-Newton solver's final memory as ``adjoint_estimate``.
        **options: With a solver name, the solver's own settings (``memory=8`` for ``"anderson"``).

    Returns:
        A :class:`SolverResult` with the best iterate and diagnostics per sample. Failing to converge
        is not an error: check ``converged``, and ``status`` for why a sample stopped.

    Raises:
        ValueError: For an unknown solver or option, an out-of-range budget, a ``z0`` without a batch
            dimension, or an ``f`` that changes the shape.
    """
    chosen = as_solver(solver, **options)
    budget = Budget(max_iter=max_iter, tol=tol, stop_mode=stop_mode, sync_every=sync_every)
    if not isinstance(z0, Tensor) or z0.dim() < 1:
        raise ValueError("z0 must be a tensor of shape (B, ...) with a batch dimension")
    return chosen.solve(f, z0, budget, keep_memory=keep_memory)
