"""The :class:`Solver` base class and the registry of solvers by name.

A solver is a small immutable object holding its method's own parameters (Anderson's memory,
Picard's damping); how long it runs and when it stops is the separate :class:`~implicitlayers.Budget`.
A built-in solver says how it proposes the next iterate (``step``, the
:class:`~implicitlayers.solvers.driver.StepRule` protocol) and inherits :meth:`Solver.solve`, which
runs the shared driver; a foreign implementation (the TorchDEQ adapter) overrides :meth:`Solver.solve`
instead. Names are shorthand for default objects, so configuration files and command lines can say
``"anderson"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .budget import Budget
from .driver import iterate
from .result import SolverResult

__all__ = ["Solver", "as_solver", "available_solvers", "get_solver", "register_solver"]


@dataclass(frozen=True)
class Solver:
    """A fixed-point method: validated, immutable settings and how it proposes the next iterate.

    Subclass it as a frozen dataclass whose fields are the method's parameters, validated in
    ``__post_init__``, and define ``step(state, z, fz, active) -> (next_z, state)``: the driver
    (:func:`~implicitlayers.solvers.iterate`) does the rest and gives every per-sample guarantee.
    Make it available by name with :func:`register_solver`.

    Attributes:
        keeps_memory: Whether the solver keeps quasi-Newton memory from which it can estimate the
            adjoint (``SolverResult.adjoint_estimate``), so that ``backward=il.Shine()`` can use it.
    """

    keeps_memory: ClassVar[bool] = False

    def solve(
        self, f: Callable[[Tensor], Tensor], z0: Tensor, budget: Budget | None = None, *, keep_memory: bool = False
    ) -> SolverResult:
        """Finds z with z = f(z), independently for every sample of a batch.

        Args:
            f: Maps ``(B, ...)`` to the same shape; sample b of the output depends only on sample b.
            z0: Initial guess, shape ``(B, ...)``.
            budget: Evaluations, tolerance and loop mechanics (default :class:`Budget()`).
            keep_memory: Keep the final memory as ``adjoint_estimate`` (solvers that have one).

        Returns:
            The per-sample :class:`SolverResult`.
        """
        return iterate(f, z0, self, budget or Budget(), keep_memory=keep_memory)

    def step(self, state: Any, z: Tensor, fz: Tensor, active: Tensor) -> tuple[Tensor, Any]:
        """The next iterate of every sample, and the new state (see the StepRule protocol)."""
        raise NotImplementedError(f"{type(self).__name__} must define step() or override solve()")


SolverFactory = Callable[..., Solver]

_REGISTRY: dict[str, SolverFactory] = {}


def available_solvers() -> list[str]:
    """Names accepted by :func:`solve` and the layers' ``solver=`` argument, sorted."""
    return sorted(_REGISTRY)


def register_solver(name: str, factory: SolverFactory, *, overwrite: bool = False) -> None:
    """Makes ``factory`` (usually a :class:`Solver` subclass) available under ``name``.

    Args:
        name: The solver's name.
        factory: Called with a solver's options as keywords (none for the default object); must
            return a :class:`Solver`.
        overwrite: Replace an existing solver of the same name instead of raising.

    Raises:
        ValueError: If ``name`` is taken (and ``overwrite`` is false) or ``factory`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise ValueError(f"factory must be a Solver subclass or another callable, got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"a solver named {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def get_solver(name: str, **options: Any) -> Solver:
    """The solver registered under ``name``, built with ``options`` (its fields, e.g. ``memory=8``).

    Raises:
        ValueError: If no solver has that name (the message lists them) or an option is unknown.
    """
    try:
        factory = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; available: {', '.join(available_solvers())}") from None
    if dataclasses.is_dataclass(factory):
        accepted = [field.name for field in dataclasses.fields(factory) if field.init]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"solver {name!r} does not accept option(s) {unknown}; accepted: {accepted or 'none'}")
    solver = factory(**options)
    if not isinstance(solver, Solver):
        raise ValueError(f"the solver registered as {name!r} built a {type(solver).__name__}, not an il.Solver")
    return solver


def as_solver(solver: str | Solver, **options: Any) -> Solver:
    """``solver`` itself if it is a :class:`Solver`, else the registered one of that name with ``options``.

    Raises:
        ValueError: For an unknown name or option, options given with an object, or another type.
    """
    if isinstance(solver, Solver):
        if options:
            raise ValueError(f"options {sorted(options)} apply to a solver name; set them on the object instead")
        return solver
    if isinstance(solver, str):
        return get_solver(solver, **options)
    raise ValueError(f"solver must be an il.Solver or one of {available_solvers()}, got {type(solver).__name__}")
