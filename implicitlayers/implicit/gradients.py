"""Gradient modes: how a fixed point z* = f(z*, θ) is differentiated, as small immutable objects.

Every mode returns the value f(z*), the image of the solver's best iterate z*, so a layer's output
does not depend on the gradient mode, nor on train versus eval. Only the derivative differs:

* :class:`IFT`: exact, that of the true fixed point z*(θ), in every order and under every
  transform; costs an adjoint solve.
* :class:`Shine`: the IFT with the adjoint read from the forward solver's memory (plus ``refine``
  adjoint steps); first-order reverse mode only; costs one graph of f (plus the steps).
* :class:`JFB`: of one step f(z*) from z* held constant; an approximation, defined in every order
  and transform; one graph of f.
* :class:`Phantom`: of k damped steps from z* held constant; as JFB, with k graphs of f.
* :class:`Unrolled`: of the recorded forward Picard iterations (its value is the last iterate);
  every transform with tol = 0; one graph per step.

A mode defines, in one class, what each kind of differentiation gets: :meth:`Gradient.adjoint` (the
first-order reverse path, through one recorded graph of f), :meth:`Gradient.vjp` (reverse mode with
``create_graph=True`` and under torch.func) and :meth:`Gradient.jvp` (forward mode). A new mode is one
subclass: most define :meth:`Gradient.adjoint` only and are first-order reverse-mode gradients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor
from torch.autograd import forward_ad

from ..errors import check_int_at_least
from ..solvers import Budget, Solver, as_solver
from .binding import bind
from .captures import check_captures, hook_captured
from .derivatives import jvp_inputs, vjp_inputs
from .functions import AdjointSolve, FixedPoint, TangentSolve
from .linear import Adjoint
from .problem import Problem, is_transformed
from .steps import phantom_steps, unrolled_picard

__all__ = ["GRADIENT_MODES", "IFT", "JFB", "Gradient", "Phantom", "Shine", "Unrolled", "as_gradient"]


@dataclass(frozen=True)
class Gradient:
    """How the fixed point is differentiated: subclass it (as a frozen dataclass) for a new mode.

    The default :meth:`fixed_point` solves through the primitive and attaches the mode's derivative:
    a subclass defines :meth:`adjoint`, the u with dL/dθ = (∂f/∂θ)ᵀ u on the first-order path. Such a
    mode is first-order only (``first_order_only``): reverse mode with ``create_graph=True``, forward
    mode and torch.func raise, unless the subclass also defines :meth:`vjp` and :meth:`jvp` (and sets
    ``first_order_only = False``).

    Attributes:
        name: The mode's short name (``backward="ift"``).
        transforms: What the mode gives under transforms, in words (for errors and the docs).
        first_order_only: Raise under torch.func, forward mode and higher orders.
        needs_memory: The forward solver must keep its quasi-Newton memory (SHINE).
        differentiates: False for a solve that returns z* itself with no derivative, for modes that
            differentiate explicit steps from it.
    """

    name: ClassVar[str] = "custom"
    transforms: ClassVar[str] = (
        "first-order reverse-mode gradients only (loss.backward(), torch.autograd.grad without create_graph)"
    )
    first_order_only: ClassVar[bool] = True
    needs_memory: ClassVar[bool] = False
    differentiates: ClassVar[bool] = True

    def fixed_point(self, problem: Problem, z0: Tensor, inputs: Sequence[Tensor]) -> Tensor:
        """f(z*) with this mode's derivative attached (the layer's one call)."""
        if self.first_order_only and (is_transformed(z0, *inputs) or forward_ad._current_level >= 0):
            raise RuntimeError(self._first_order_message())
        check_captures(problem, z0, inputs)
        out = FixedPoint.apply(problem, z0, *inputs)
        record = problem.outbox.record
        if record is not None and record.captures:
            out = self.captured(problem, out, inputs)
        return out

    def adjoint(self, adjoint: Adjoint) -> Tensor:
        """The first-order adjoint u (shape of ``adjoint.rhs``): dL/dθ = (∂f/∂θ)ᵀ u at z*."""
        raise NotImplementedError(f"{type(self).__name__} must define adjoint()")

    def vjp(
        self, problem: Problem, z: Tensor, inputs: Sequence[Tensor], grad: Tensor, needed: Sequence[bool]
    ) -> list[Tensor | None]:
        """Reverse mode for ``create_graph=True`` and torch.func: the gradients of ``inputs``."""
        raise RuntimeError(self._first_order_message())

    def jvp(self, problem: Problem, z: Tensor, inputs: Sequence[Tensor], tangents: Sequence[Tensor | None]) -> Tensor:
        """Forward mode: the tangent of f(z*) along the inputs' ``tangents``."""
        raise RuntimeError(self._first_order_message())

    def captured(self, problem: Problem, out: Tensor, inputs: Sequence[Tensor]) -> Tensor:
        """``out`` with the first-order gradient of tensors f captures (not inputs), through a hook."""
        return hook_captured(problem, problem.outbox.record, out, inputs)

    def linear_settings(self, problem: Problem) -> tuple[Solver, Budget]:
        """The solver and budget of the linear equations of higher derivatives (the IFT's)."""
        raise RuntimeError(self._first_order_message())

    def memory_message(self, solver: Solver) -> str:
        """The error for a forward solver that keeps no memory, where the mode needs it."""
        return (
            f"backward={self!r} reuses the forward solver's quasi-Newton memory; {solver!r} keeps none: "
            "use il.Anderson() or il.Broyden()"
        )

    def _first_order_message(self) -> str:
        return (
            f"backward={self!r} gives {self.transforms}; use backward=il.IFT() for higher orders, forward mode "
            "and torch.func transforms"
        )


def _linear_budget(problem: Problem, max_iter: int | None, tol: float | None) -> Budget:
    """The forward budget with an adjoint's own ``max_iter``/``tol`` where given (read at use: never stale)."""
    changes: dict[str, Any] = {"compact_rows": False}
    if max_iter is not None:
        changes["max_iter"] = max_iter
    if tol is not None:
        changes["tol"] = tol
    return problem.budget.replace(**changes)


def _check_budget_fields(max_iter: int | None, tol: float | None) -> None:
    if max_iter is not None:
        check_int_at_least("max_iter", max_iter)
    if tol is not None:
        Budget(tol=tol)  # validates


def _solver_or_none(owner: Gradient, solver: str | Solver | None) -> None:
    if solver is not None:
        object.__setattr__(owner, "solver", as_solver(solver))


@dataclass(frozen=True)
class IFT(Gradient):
    """The exact gradient of the fixed point, by the implicit function theorem.

    Reverse mode solves the adjoint equation u = g + J_zᵀ u, forward mode the tangent equation
    t = J_z t + J_θ θ̇; higher orders differentiate those solves the same way, so the derivatives
    are exact (to the linear solves' tolerance) under every order and transform: ``create_graph``,
    ``torch.autograd.forward_ad``, ``vmap``, ``grad``, ``jacrev``, ``jacfwd``, ``hessian``.

    Attributes:
        solver: Solver of the linear equations (default: the forward solver).
        max_iter: Their evaluation budget (default: the forward budget's).
        tol: Their tolerance (default: the forward budget's).
        start: Where the first-order adjoint solve starts: ``"rhs"`` (u = g, the usual cold start)
            or ``"estimate"``, the forward solver's estimate of the adjoint read from its
            quasi-Newton memory (SHINE's u; the solver must keep memory, as Anderson and Broyden
            do). Either way the solve runs to ``tol``, so the gradient is the IFT's; a warm start
            only needs fewer iterations where the estimate is good. Higher orders start cold.
    """

    name: ClassVar[str] = "ift"
    transforms: ClassVar[str] = "exact derivatives in every order and under every transform"
    first_order_only: ClassVar[bool] = False

    solver: Solver | str | None = None
    max_iter: int | None = None
    tol: float | None = None
    start: str = "rhs"

    def __post_init__(self) -> None:
        _solver_or_none(self, self.solver)
        _check_budget_fields(self.max_iter, self.tol)
        if self.start not in ("rhs", "estimate"):
            raise ValueError(f"start must be 'rhs' or 'estimate', got {self.start!r}")

    @property
    def needs_memory(self) -> bool:  # type: ignore[override]
        """Whether the forward solver must keep its memory: for ``start="estimate"``."""
        return self.start == "estimate"

    def linear_settings(self, problem: Problem) -> tuple[Solver, Budget]:
        return (self.solver or problem.solver), _linear_budget(problem, self.max_iter, self.tol)

    def adjoint(self, adjoint: Adjoint) -> Tensor:
        start = adjoint.estimate() if self.start == "estimate" and adjoint.depends_on_z else None
        return adjoint.solve(*self.linear_settings(adjoint.problem), start=start)

    def vjp(self, problem, z, inputs, grad, needed):
        u = AdjointSolve.apply(problem, z, grad, *inputs)
        return vjp_inputs(problem.f, z, inputs, u, needed)

    def jvp(self, problem, z, inputs, tangents):
        b = jvp_inputs(problem.f, z, inputs, tangents)
        return TangentSolve.apply(problem, z, b, *inputs)


@dataclass(frozen=True)
class Shine(Gradient):
    """SHINE (Ramzi et al., 2022): the IFT's adjoint read from the forward solver's quasi-Newton memory.

    u ≈ (I - J_z)⁻ᵀ g comes from Broyden's or Anderson's final estimate of the inverse Jacobian
    (``SolverResult.adjoint_estimate``): exact on the directions the solver explored, and as cheap as
    JFB's. ``refine`` > 0 continues with at most that many iterations of the adjoint equation from
    the estimate (stopping early at ``tol``), moving towards the exact gradient.

    Attributes:
        refine: Refinement iterations (>= 0; 0: the estimate alone).
        solver: Solver of the refinement (default: the forward solver).
        tol: Tolerance at which the refinement stops early (default: the forward budget's).
    """

    name: ClassVar[str] = "shine"
    needs_memory: ClassVar[bool] = True

    refine: int = 0
    solver: Solver | str | None = None
    tol: float | None = None

    def __post_init__(self) -> None:
        check_int_at_least("refine", self.refine, 0)
        _solver_or_none(self, self.solver)
        _check_budget_fields(None, self.tol)

    def adjoint(self, adjoint: Adjoint) -> Tensor:
        if not adjoint.depends_on_z:
            return adjoint.rhs.clone()
        start = adjoint.estimate()
        if self.refine == 0:
            return start
        budget = _linear_budget(adjoint.problem, self.refine, self.tol)
        # A chosen number of steps, not a solve to a tolerance: not judged by it.
        return adjoint.solve(self.solver or adjoint.problem.solver, budget, start=start, judged=False)


@dataclass(frozen=True)
class JFB(Gradient):
    """Jacobian-free backpropagation (Fung et al., 2022): the derivative of f(z*, θ) with z* held constant.

    The first term of the IFT's Neumann series, in every order and transform (forward mode gives
    (∂f/∂θ) · θ̇). On the plain first-order path the forward's last evaluation of f serves the backward.
    """

    name: ClassVar[str] = "jfb"
    transforms: ClassVar[str] = "its own (approximate) derivative in every order and under every transform"
    first_order_only: ClassVar[bool] = False

    def adjoint(self, adjoint: Adjoint) -> Tensor:
        return adjoint.rhs.clone()

    def vjp(self, problem, z, inputs, grad, needed):
        return vjp_inputs(problem.f, z.detach(), inputs, grad, needed)

    def jvp(self, problem, z, inputs, tangents):
        return jvp_inputs(problem.f, z.detach(), inputs, tangents)

    def captured(self, problem: Problem, out: Tensor, inputs: Sequence[Tensor]) -> Tensor:
        # Captured tensors need f's own graph: differentiate one evaluation of f at z*.
        return bind(problem.f, inputs, lambda bound: bound(problem.outbox.record.z_best))


@dataclass(frozen=True)
class _NoDerivative(Gradient):
    """The solve alone: returns z* itself, with no derivative in anything (for explicit-step modes)."""

    name: ClassVar[str] = "none"
    first_order_only: ClassVar[bool] = False
    differentiates: ClassVar[bool] = False

    def fixed_point(self, problem: Problem, z0: Tensor, inputs: Sequence[Tensor]) -> Tensor:
        return FixedPoint.apply(problem, z0, *inputs)


@dataclass(frozen=True)
class Phantom(Gradient):
    """Phantom gradient (Geng et al., 2021): the derivative of k damped steps from z* held constant.

    z_0 = z* (no derivative), z_{i+1} = (1 - λ) z_i + λ f(z_i); the value stays f(z*). As ``steps``
    grows (and λ suits the map) the derivative approaches the IFT's; ``Phantom(1, 1.0)`` is :class:`JFB`.
    Every order and transform differentiates the steps as written.

    Attributes:
        steps: Damped steps differentiated (>= 1).
        damping: λ in (0, 1].
    """

    name: ClassVar[str] = "phantom"
    transforms: ClassVar[str] = "its own (approximate) derivative in every order and under every transform"
    first_order_only: ClassVar[bool] = False

    steps: int = 1
    damping: float = 1.0

    def __post_init__(self) -> None:
        check_int_at_least("steps", self.steps)
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not 0 < self.damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {self.damping!r}")

    def fixed_point(self, problem: Problem, z0: Tensor, inputs: Sequence[Tensor]) -> Tensor:
        if self.steps == 1 and self.damping == 1.0:  # JFB: the forward's last evaluation serves
            return JFB().fixed_point(_with_gradient(problem, JFB()), z0, inputs)
        z_star = FixedPoint.apply(_with_gradient(problem, _NoDerivative()), z0, *inputs)
        return bind(problem.f, inputs, lambda f: phantom_steps(f, z_star, steps=self.steps, damping=self.damping))


@dataclass(frozen=True)
class Unrolled(Gradient):
    """Autograd through the forward iterations themselves: Picard steps z ← f(z), recorded.

    The value is the last iterate (not the image of a solver's best one) and the forward solver is
    not used. With ``tol = 0`` exactly ``max_iter`` steps run, with no data-dependent control flow,
    so every transform applies; with ``tol > 0`` each sample stops on its own, which ``vmap`` refuses.
    Memory grows with the steps.
    """

    name: ClassVar[str] = "unrolled"
    transforms: ClassVar[str] = "autograd through the steps: every order and transform (vmap needs tol = 0)"
    first_order_only: ClassVar[bool] = False

    def fixed_point(self, problem: Problem, z0: Tensor, inputs: Sequence[Tensor]) -> Tensor:
        z, result = bind(problem.f, inputs, lambda f: unrolled_picard(f, z0, problem.budget))
        if result is not None and problem.on_forward is not None:
            problem.on_forward(result)
        return z


def _with_gradient(problem: Problem, gradient: Gradient) -> Problem:
    """``problem`` differentiated by ``gradient`` instead (a solve without derivative records nothing)."""
    differentiates = gradient.differentiates
    return dataclasses.replace(
        problem,
        gradient=gradient,
        record_graph=problem.record_graph and differentiates,
        detect_captures=problem.detect_captures and differentiates,
    )


GRADIENT_MODES: dict[str, type[Gradient]] = {mode.name: mode for mode in (IFT, Shine, JFB, Phantom, Unrolled)}
"""The gradient modes by name: ``backward="ift"`` is shorthand for ``backward=il.IFT()``."""


def as_gradient(backward: str | Gradient) -> Gradient:
    """``backward`` itself if it is a :class:`Gradient`, else the default object of that name.

    Raises:
        ValueError: For an unknown name or another type.
    """
    if isinstance(backward, Gradient):
        return backward
    if isinstance(backward, str) and backward in GRADIENT_MODES:
        return GRADIENT_MODES[backward]()
    raise ValueError(f"backward must be an il.Gradient or one of {list(GRADIENT_MODES)}, got {backward!r}")
