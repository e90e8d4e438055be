"""TorchDEQ's fixed-point solvers behind implicitlayers' solver interface.

:class:`TorchDEQAnderson`, :class:`TorchDEQBroyden` and :class:`TorchDEQFixedPointIter` are
:class:`~implicitlayers.Solver` objects whose fields are TorchDEQ's option names; after :func:`register`,
their names ``"torchdeq.anderson"``, ``"torchdeq.broyden"`` and ``"torchdeq.fixed_point_iter"`` work
wherever a solver name does: :func:`implicitlayers.solve`, the layers' ``solver=``, and
``il.IFT(solver=...)`` for the adjoint.

Examples:
    >>> import torch, implicitlayers as il
    >>> from implicitlayers.contrib import torchdeq as il_torchdeq
    >>> names = il_torchdeq.register()
    >>> x = torch.randn(4, 3, dtype=torch.float64)
    >>> res = il.solve(lambda z: 0.5 * torch.tanh(z) + x, torch.zeros_like(x), solver="torchdeq.broyden", tol=1e-8)
    >>> bool(res.converged.all())
    True
    >>> res = il.solve(lambda z: 0.5 * torch.tanh(z) + x, torch.zeros_like(x), solver=il_torchdeq.TorchDEQAnderson(m=4))

The adapter returns a :class:`~implicitlayers.SolverResult` with the core solvers' meaning, but the
solvers underneath are TorchDEQ's (0.1.x), which differ from the built-in ones:

- **Batch-wide stopping.** TorchDEQ stops when the *largest* residual over the batch is below ``tol``;
  every sample keeps iterating until then (samples do not freeze individually), so a sample's iterate
  can depend on how long the rest of its batch takes. The built-in solvers stop each sample on its own.
- **Residual recomputed here.** TorchDEQ measures residuals with its own ``eps`` (``1e-9``) and, for
  ``anderson`` and ``fixed_point_iter``, at the iterate *before* the one it returns (it returns the
  image F(x) of its best iterate x). The adapter therefore evaluates ``f`` once more at the returned
  ``z`` and reports ``residual = il.residual(z, f(z), stop_mode)`` (``||f(z)-z|| / (||f(z)|| + 1e-12)``
  for ``"rel"``) and ``converged = residual <= tol``. Every solve costs one evaluation of ``f`` beyond
  TorchDEQ's own. TorchDEQ's stopping test uses its residual, so, rarely, a solve TorchDEQ considers
  finished can miss ``tol`` by our measure (or the reverse).
- **nstep** is TorchDEQ's per-sample step of the best iterate (``info["nstep"]``), converted to the
  number of evaluations of ``f`` spent up to that iterate (Broyden's initial evaluation included), at
  least 1. It does not include the adapter's extra evaluation, nor evaluations spent after a sample's
  best iterate while the rest of the batch was still iterating.
- **trace** holds, per TorchDEQ iteration actually run, the largest residual over the batch as TorchDEQ
  measured it (its ``stop_mode`` trace, without its placeholder first entry and its end padding).
  TorchDEQ's ``anderson`` runs two evaluations before it tracks anything, so its trace has
  ``evaluations - 2`` entries, and with ``max_iter <= 2`` it returns ``z0`` itself.
- **max_iter** bounds the evaluations of ``f`` made by TorchDEQ, as for the built-in solvers: Broyden
  receives ``max_iter - 1`` iterations (it evaluates ``f(z0)`` first); ``anderson`` always makes at
  least two evaluations.
- **Options.** Anderson's ``lam`` is an absolute Tikhonov term (the built-in ``regularization`` is
  relative to the Gram matrix): once residuals are small the default ``1e-4`` dominates the mixing
  system and the method degrades towards averaging, so at tight tolerances it can need more
  evaluations than plain iteration (on z = tanh(W z) + x with ||W||_2 = 0.9 at tol 1e-8: 59 with
  ``lam=1e-4``, 26 with ``lam=1e-12``, against 21 for the built-in ``"picard"``). Broyden's line
  search (``ls``) and ``return_final`` are not exposed: the first makes evaluations per iteration
  variable (nstep and trace could not be attributed), the second returns the last rather than the best
  iterate, contradicting :class:`~implicitlayers.SolverResult`.
- **Robustness.** Non-finite values are not isolated per sample as in the built-in driver; a sample
  whose returned iterate gives a non-finite residual is reported with ``residual = inf`` and
  ``converged = False``.

Solves run under :func:`torch.no_grad`, in ``z0``'s dtype promoted to at least float32, with the
solver's own arithmetic outside autocast (``f`` itself still runs in the caller's autocast state).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..solvers import Budget, Solver, SolverResult, register_solver, residual
from ..solvers.base import _REGISTRY
from ..solvers.driver import working_dtype

__all__ = ["SOLVER_NAMES", "TorchDEQAnderson", "TorchDEQBroyden", "TorchDEQFixedPointIter", "register"]

_INSTALL_HINT = (
    "the torchdeq solvers need the optional dependency torchdeq: pip install torchdeq "
    "(or pip install 'implicitlayers[bench]')"
)

# TorchDEQ name -> (evaluations of f made before its first tracked iteration, offset from its
# per-sample ``nstep`` to the number of evaluations spent up to that iterate).
_LAYOUT = {
    "anderson": (2, 0),
    "broyden": (1, 1),
    "fixed_point_iter": (0, 0),
}


def _torchdeq_solver(name: str) -> Callable[..., Any]:
    try:
        from torchdeq.solver import get_solver as torchdeq_get_solver
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return torchdeq_get_solver(name)


class _TorchDEQSolver(Solver):
    """A TorchDEQ solver behind the :class:`~implicitlayers.Solver` interface (see the module docstring)."""

    torchdeq_name: ClassVar[str]

    def solve(
        self, f: Callable[[Tensor], Tensor], z0: Tensor, budget: Budget | None = None, *, keep_memory: bool = False
    ) -> SolverResult:
        """Solves z = f(z) with TorchDEQ (no quasi-Newton memory is exposed: ``keep_memory`` keeps nothing).

        Raises:
            ImportError: If torchdeq is not installed.
            ValueError: For ``Budget(sync_every > 1)`` or ``compact_rows``, which TorchDEQ's loop cannot honour.
        """
        budget = budget or Budget()
        if budget.sync_every != 1 or budget.compact_rows:
            raise ValueError(
                f"{type(self).__name__} runs TorchDEQ's own loop: use Budget(sync_every=1, compact_rows=False)"
            )
        solver = _torchdeq_solver(self.torchdeq_name)
        with torch.no_grad():
            return _run(self.torchdeq_name, solver, f, z0, budget, self.options())

    def options(self) -> dict[str, Any]:
        """The keyword arguments passed to TorchDEQ's solver."""
        raise NotImplementedError


@dataclass(frozen=True)
class TorchDEQAnderson(_TorchDEQSolver):
    """TorchDEQ's Anderson acceleration.

    Attributes:
        m: Number of past iterates mixed (>= 2).
        lam: Absolute Tikhonov regularisation of the mixing system (>= 0).
        tau: Damping in (0, 1]; 1 mixes the images f(z_i) only.
    """

    torchdeq_name: ClassVar[str] = "anderson"

    m: int = 6
    lam: float = 1e-4
    tau: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 2:
            raise ValueError(f"m must be an integer >= 2, got {self.m!r}")
        if not self.lam >= 0:
            raise ValueError(f"lam must be >= 0, got {self.lam!r}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau!r}")

    def options(self) -> dict[str, Any]:
        return {"m": self.m, "lam": self.lam, "tau": self.tau}


@dataclass(frozen=True)
class TorchDEQBroyden(_TorchDEQSolver):
    """TorchDEQ's Broyden method (without its line search, whose evaluations could not be attributed).

    Attributes:
        LBFGS_thres: Rank-one updates kept (>= 1); ``None`` keeps all of them.
    """

    torchdeq_name: ClassVar[str] = "broyden"

    LBFGS_thres: int | None = None

    def __post_init__(self) -> None:
        value = self.LBFGS_thres
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"LBFGS_thres must be None or an integer >= 1, got {value!r}")

    def options(self) -> dict[str, Any]:
        return {"LBFGS_thres": self.LBFGS_thres, "ls": False}


@dataclass(frozen=True)
class TorchDEQFixedPointIter(_TorchDEQSolver):
    """TorchDEQ's (damped) fixed-point iteration.

    Attributes:
        tau: Damping in (0, 1]: z <- tau f(z) + (1 - tau) z.
    """

    torchdeq_name: ClassVar[str] = "fixed_point_iter"

    tau: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau!r}")

    def options(self) -> dict[str, Any]:
        return {"tau": self.tau}


SOLVER_NAMES: dict[str, type[Solver]] = {
    "torchdeq.anderson": TorchDEQAnderson,
    "torchdeq.broyden": TorchDEQBroyden,
    "torchdeq.fixed_point_iter": TorchDEQFixedPointIter,
}
"""The names :func:`register` adds to the solver registry, and the adapter behind each."""


def register(*, overwrite: bool = False) -> list[str]:
    """Registers TorchDEQ's solvers with :func:`implicitlayers.register_solver`.

    Calling it again is harmless: names already bound to these adapters are left alone.

    Args:
        overwrite: Replace a *different* solver already registered under one of the names
            (otherwise that raises ``ValueError``).

    Returns:
        The registered names: ``["torchdeq.anderson", "torchdeq.broyden", "torchdeq.fixed_point_iter"]``.

    Raises:
        ImportError: If torchdeq is not installed (``pip install torchdeq`` or the ``bench`` extra).
        ValueError: If a name is taken by another solver and ``overwrite`` is false.
    """
    for name in _LAYOUT:
        _torchdeq_solver(name)  # fail now, with the install hint, rather than at the first solve
    for name, adapter in SOLVER_NAMES.items():
        if _REGISTRY.get(name) is not adapter:
            register_solver(name, adapter, overwrite=overwrite)
    return list(SOLVER_NAMES)


def _run(
    name: str,
    solver: Callable[..., Any],
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    budget: Budget,
    options: dict[str, Any],
) -> SolverResult:
    max_iter, tol, stop_mode = budget.max_iter, budget.tol, budget.stop_mode
    shape, device = z0.shape, z0.device
    dtype = working_dtype(z0.dtype)
    batch = shape[0]
    z_flat = z0.detach().reshape(batch, math.prod(shape[1:])).to(dtype)
    if batch == 0:
        empty = torch.zeros(0, device=device)
        return SolverResult(z_flat.reshape(shape), empty.long(), empty, empty.bool(), empty)

    autocast = _autocast_state(device.type)
    evaluations = 0

    def flat_f(z: Tensor) -> Tensor:
        nonlocal evaluations
        evaluations += 1
        with _reenter_autocast(device.type, autocast):
            fz = f(z.reshape(shape))
        if not isinstance(fz, Tensor):
            raise TypeError(f"f must return a Tensor, got {type(fz).__name__}")
        if fz.shape != shape:
            raise ValueError(
                f"f(z0) has shape {tuple(fz.shape)} but z0 has shape {tuple(shape)}; "
                "f must map a tensor to a tensor of the same shape"
            )
        return fz.detach().reshape(batch, z_flat.shape[1]).to(dtype)

    iterations = max_iter - 1 if name == "broyden" else max_iter
    with torch.autocast(device.type, enabled=False):
        z, _, info = solver(flat_f, z_flat, max_iter=iterations, tol=tol, stop_mode=stop_mode, **options)
        z = z.reshape(z_flat.shape).to(dtype)
        tracked = max(evaluations - _LAYOUT[name][0], 0)
        trace = info[f"{stop_mode}_trace"][:, 1 : 1 + tracked].max(dim=0).values.float()
        step = info["nstep"].reshape(batch).round().long() + _LAYOUT[name][1]
        fz = flat_f(z)
        res = residual(z, fz, stop_mode).float()
    res = torch.where(torch.isfinite(res) & torch.isfinite(fz).all(dim=1), res, torch.full_like(res, math.inf))
    return SolverResult(
        z=z.reshape(shape), nstep=step.clamp_min(1), residual=res, converged=res <= tol, trace=trace, budget=budget
    )


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    """Whether autocast is on for ``device_type`` and its dtype (``(False, None)`` where unknown)."""
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (AttributeError, TypeError, RuntimeError):  # torch < 2.4 or a device type without autocast
        return False, None


def _reenter_autocast(device_type: str, state: tuple[bool, torch.dtype | None]) -> Any:
    """A context restoring the caller's autocast state around ``f`` inside the autocast-free solver."""
    enabled, dtype = state
    if not enabled:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype, enabled=True)
