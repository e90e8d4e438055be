"""Fixed-point solvers and their registry.

Every solver is a function ``fn(f, z0, *, max_iter, tol, stop_mode, **options) -> SolverResult``;
:func:`solve` validates the common arguments and dispatches by name. Add your own with
:func:`register_solver`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor

from .anderson import Anderson, anderson
from .base import STATUS_NAMES, STOP_MODES, SolverResult, StepRule, iterate, residual, validate_solve_args
from .broyden import Broyden, broyden
from .picard import Picard, picard

__all__ = [
    "STATUS_NAMES",
    "STOP_MODES",
    "Anderson",
    "Broyden",
    "Picard",
    "SolverFn",
    "SolverResult",
    "StepRule",
    "available_solvers",
    "get_solver",
    "iterate",
    "register_solver",
    "residual",
    "solve",
]

SolverFn = Callable[..., SolverResult]

_REGISTRY: dict[str, SolverFn] = {
    "picard": picard,
    "fixed_point": picard,
    "anderson": anderson,
    "broyden": broyden,
}


def available_solvers() -> list[str]:
    """Names accepted by :func:`solve` and the layers' ``solver=`` argument, sorted."""
    return sorted(_REGISTRY)


def register_solver(name: str, fn: SolverFn, *, overwrite: bool = False) -> None:
    """Makes ``fn`` available under ``name`` to :func:`solve` and every layer.

    Args:
        name: The solver's name.
        fn: ``fn(f, z0, *, max_iter, tol, stop_mode, **options) -> SolverResult``. It must treat dim 0
            of ``z0`` as independent samples and report per-sample ``nstep``/``residual``/``converged``.
        overwrite: Replace an existing solver of the same name instead of raising.

    Raises:
        ValueError: If ``name`` is taken (and ``overwrite`` is false) or ``fn`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"a solver named {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = fn


def get_solver(name: str) -> SolverFn:
    """The solver function registered under ``name``.

    Raises:
        ValueError: If no solver has that name; the message lists the available ones.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; available: {', '.join(available_solvers())}") from None


def solve(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    solver: str = "anderson",
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    **options: Any,
) -> SolverResult:
    """Finds z with z = f(z), independently for every sample of a batch.

    Examples:
        >>> import torch, implicitlayers as il
        >>> x = torch.randn(4, 3)
        >>> res = il.solve(lambda z: 0.5 * torch.tanh(z) + x, torch.zeros_like(x), tol=1e-6)
        >>> bool(res.converged.all())
        True

    Args:
        f: Maps a tensor of shape ``(B, ...)`` to one of the same shape; sample ``b`` of the output may
            depend only on sample ``b`` of the input.
        z0: Initial guess, shape ``(B, ...)``. Iterates are kept in float32 at least (also under
            autocast); ``f`` is called with iterates in ``z0``'s dtype (half for a half module).
        solver: A name from :func:`available_solvers`.
        max_iter: Maximum number of evaluations of ``f`` (>= 1).
        tol: Each sample stops as soon as its residual is at most ``tol`` (>= 0).
        stop_mode: ``"rel"``: ||f(z)-z|| / (||f(z)|| + 1e-12); ``"abs"``: ||f(z)-z||. ``"rel"`` measures
            the step relative to the iterate's size, so for a map with no fixed point whose iterates
            grow without bound at a bounded step (f(z) = z + 1) it eventually falls below ``tol``:
            use ``"abs"`` where the scale of z is known and such maps are possible.
        **options: Solver-specific settings, e.g. ``memory``/``damping`` for ``"anderson"``.

    Returns:
        A :class:`SolverResult` with the best iterate and diagnostics per sample. Failing to converge
        is not an error: check ``converged``, and ``status`` for why a sample stopped (ran out of
        iterations, ``f`` overflowed to inf/NaN, or the residual grew without bound).

    Raises:
        ValueError: For an unknown solver or option, ``max_iter < 1``, ``tol < 0``, an unknown
            ``stop_mode``, a ``z0`` without a batch dimension, or an ``f`` that changes the shape.
    """
    fn = get_solver(solver)
    validate_solve_args(max_iter, tol, stop_mode)
    if not isinstance(z0, Tensor) or z0.dim() < 1:
        raise ValueError("z0 must be a tensor of shape (B, ...) with a batch dimension")
    _check_options(solver, fn, options)
    return fn(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, **options)


def _check_options(name: str, fn: SolverFn, options: dict[str, Any]) -> None:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins or C callables: let the call itself complain
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [p for p, spec in parameters.items() if spec.kind is inspect.Parameter.KEYWORD_ONLY]
    options_accepted = [p for p in accepted if p not in ("max_iter", "tol", "stop_mode")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"solver {name!r} does not accept option(s) {unknown}; accepted: {options_accepted or 'none'}")
