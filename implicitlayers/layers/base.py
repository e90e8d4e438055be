"""FixedPointModule: what every fixed-point layer shares — its solver, budgets, gradient mode and training aids."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import ConvergenceError, ConvergenceWarning, RateLimitedWarner, check_int_at_least
from ..implicit import Gradient, ModuleFunction, as_gradient, check_compatible, implicit_fixed_point, is_transformed
from ..jacobian import jacobian_penalty, spectral_radius
from ..solvers import Budget, Solver, SolverResult, as_solver
from .dropout import VariationalDropout

__all__ = ["NONCONVERGENCE_POLICIES", "FixedPointModule"]

NONCONVERGENCE_POLICIES = ("warn", "raise", "ignore")
_REASON_WORDS = {"max_iter": "ran out of max_iter", "non_finite": "produced inf/NaN", "diverged": "diverged"}

# Keywords of the earlier flat interface, and their spelling now.
RENAMED_OPTIONS = {
    "solver_options": "solver=il.Anderson(memory=...) (the solver object's own fields)",
    "stop_mode": "budget=il.Budget(stop_mode=...)",
    "compact_rows": "budget=il.Budget(compact_rows=True)",
    "sync_every": "budget=il.Budget(sync_every=...)",
    "eval_max_iter": "eval_budget=il.Budget(max_iter=..., tol=...)",
    "eval_tol": "eval_budget=il.Budget(max_iter=..., tol=...)",
    "backward_solver": "backward=il.IFT(solver=...)",
    "backward_max_iter": "backward=il.IFT(max_iter=...)",
    "backward_tol": "backward=il.IFT(tol=...)",
    "phantom_steps": "backward=il.Phantom(steps=...)",
    "phantom_damping": "backward=il.Phantom(damping=...)",
    "shine_refine": "backward=il.Shine(refine=...)",
}


class _Setting:
    """A layer setting checked on every assignment, after construction as at it: a typo such as
    ``layer.on_nonconvergence = "rasie"`` raises instead of leaving the layer warning."""

    def __init__(self, check: Callable[[str, Any], None]) -> None:
        self.check = check

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, f"_{name}"

    def __get__(self, layer: Any, owner: type | None = None) -> Any:
        return self if layer is None else getattr(layer, self.slot)

    def __set__(self, layer: Any, value: Any) -> None:
        self.check(self.name, value)
        setattr(layer, self.slot, value)


def _check_policy(name: str, value: Any) -> None:
    if value not in NONCONVERGENCE_POLICIES:
        raise ValueError(f"{name} must be one of {list(NONCONVERGENCE_POLICIES)}, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _check_krylov_steps(name: str, value: Any) -> None:
    # 0 computes nothing; an estimate needs at least two steps.
    if isinstance(value, bool) or not isinstance(value, int) or value == 1 or value < 0:
        raise ValueError(f"{name} must be 0 or an integer >= 2, got {value!r}")


def reject_unknown(owner: str, options: dict[str, Any]) -> None:
    """Raises ``TypeError`` for keywords a layer does not take, naming the new spelling of renamed ones."""
    for name in options:
        if name in RENAMED_OPTIONS:
            raise TypeError(f"{owner}() no longer takes {name}=; use {RENAMED_OPTIONS[name]}")
        raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}")


class FixedPointModule(nn.Module):
    """Base class of the layers: solves a fixed point and attaches the chosen gradient.

    Subclasses build a closure z ↦ f(z, x) and an initial guess and call :meth:`fixed_point`.

    Args:
        solver: The forward solver: an :class:`~implicitlayers.Solver` (``il.Anderson(memory=8)``) or
            a name (:func:`implicitlayers.available_solvers`), shorthand for its default object.
        budget: The forward solve's :class:`~implicitlayers.Budget` (default ``Budget()``: 30
            evaluations, relative tolerance 1e-4).
        max_iter: Shorthand: replaces ``budget.max_iter``.
        tol: Shorthand: replaces ``budget.tol``; 0 runs exactly ``max_iter`` evaluations.
        eval_budget: The budget in eval mode (default: ``budget``): inference may afford more
            iterations, or fewer, than training.
        backward: The gradient mode: a :class:`~implicitlayers.Gradient` (``il.IFT(tol=1e-6)``,
            ``il.Phantom(steps=5)``, ...) or a name of :data:`~implicitlayers.GRADIENT_MODES`.
        on_nonconvergence: ``"warn"`` (rate-limited :class:`~implicitlayers.ConvergenceWarning`),
            ``"raise"`` (:class:`~implicitlayers.ConvergenceError`) or ``"ignore"``.
        warm_start: Start each solve from the previous forward's output when it has the same shape,
            for inputs that the caller knows are related (consecutive frames, refinement steps);
            :meth:`reset_warm_start` forgets it. Off by default: unrelated batches gain nothing.
        jacobian_penalty: Hutchinson samples of ‖J_f(z*)‖_F² / dim (Bai et al., 2021) computed in each
            training forward and left in ``jacobian_loss`` (a differentiable scalar, the batch mean) for
            the caller to add to the loss; 0 (default) computes nothing.
        spectral_radius_iters: Krylov steps of the estimate of ρ(J_f(z*)) per forward, recorded in
            ``stats.spectral_radius`` (shape ``(B,)``); 0 (default) computes nothing.
        correction_states: k > 0 keeps, in each training forward, k iterates of the solve evenly
            spaced along its trajectory, as f(z_i) with a one-step (phantom-style) gradient, in
            ``correction_states`` (oldest first): the states of the fixed-point correction loss of
            Bai et al. (2022), "Deep Equilibrium Optical Flow Estimation".

    Attributes:
        stats: The last forward's :class:`~implicitlayers.SolverResult`, detached.
        backward_stats: The last adjoint solve's :class:`~implicitlayers.SolverResult`, detached.
        jacobian_loss: The last training forward's Jacobian penalty (with ``jacobian_penalty`` > 0).
        correction_states: The last training forward's correction states (with ``correction_states`` > 0).

    Raises:
        ValueError: For an out-of-range or inconsistent setting (e.g. SHINE with a solver without memory).
        TypeError: For a keyword of the earlier flat interface; the message names the new spelling.
    """

    # Assignable after construction, each checked as the constructor checks it.
    on_nonconvergence = _Setting(_check_policy)
    warm_start = _Setting(_check_bool)
    jacobian_penalty = _Setting(functools.partial(check_int_at_least, minimum=0))
    spectral_radius_iters = _Setting(_check_krylov_steps)
    correction_states_count = _Setting(functools.partial(check_int_at_least, minimum=0))

    def __init__(
        self,
        *,
        solver: str | Solver = "anderson",
        budget: Budget | None = None,
        max_iter: int | None = None,
        tol: float | None = None,
        eval_budget: Budget | None = None,
        backward: str | Gradient = "ift",
        on_nonconvergence: str = "warn",
        warm_start: bool = False,
        jacobian_penalty: int = 0,
        spectral_radius_iters: int = 0,
        correction_states: int = 0,
        **removed: Any,
    ) -> None:
        super().__init__()
        reject_unknown(type(self).__name__, removed)
        self._solver = as_solver(solver)
        self._backward = as_gradient(backward)
        check_compatible(self._solver, self._backward)
        self.budget = _with_shorthands(Budget() if budget is None else budget, max_iter, tol)
        self.eval_budget = eval_budget
        self.on_nonconvergence = on_nonconvergence
        self.warm_start = warm_start
        self.jacobian_penalty = jacobian_penalty
        self.spectral_radius_iters = spectral_radius_iters
        check_int_at_least("correction_states", correction_states, 0)  # named as the keyword is
        self.correction_states_count = correction_states
        self.correction_states: list[Any] | None = None
        self.stats: SolverResult | None = None
        self.backward_stats: SolverResult | None = None
        self.jacobian_loss: Tensor | None = None
        self._previous: Tensor | None = None  # the last output, for warm starts
        self._warn = RateLimitedWarner()

    # -- settings: each assignment is validated, and nothing is derived from another at construction --
    @property
    def solver(self) -> Solver:
        """The forward solver (assign an :class:`~implicitlayers.Solver` or a name)."""
        return self._solver

    @solver.setter
    def solver(self, solver: str | Solver) -> None:
        chosen = as_solver(solver)
        check_compatible(chosen, self._backward)
        self._solver = chosen

    @property
    def backward(self) -> Gradient:
        """The gradient mode (assign a :class:`~implicitlayers.Gradient` or a name)."""
        return self._backward

    @backward.setter
    def backward(self, backward: str | Gradient) -> None:
        gradient = as_gradient(backward)
        check_compatible(self._solver, gradient)
        self._backward = gradient

    @property
    def budget(self) -> Budget:
        """The forward solve's :class:`~implicitlayers.Budget` in training mode (and in eval mode by default)."""
        return self._budget

    @budget.setter
    def budget(self, budget: Budget) -> None:
        if not isinstance(budget, Budget):
            raise ValueError(f"budget must be an il.Budget, got {type(budget).__name__}")
        self._budget = budget

    @property
    def eval_budget(self) -> Budget | None:
        """The budget in eval mode; None uses :attr:`budget` (read at each forward, never a stale copy)."""
        return self._eval_budget

    @eval_budget.setter
    def eval_budget(self, budget: Budget | None) -> None:
        if budget is not None and not isinstance(budget, Budget):
            raise ValueError(f"eval_budget must be an il.Budget or None, got {type(budget).__name__}")
        self._eval_budget = budget

    @property
    def max_iter(self) -> int:
        """Shorthand for ``budget.max_iter``; assigning it replaces the budget, validated."""
        return self._budget.max_iter

    @max_iter.setter
    def max_iter(self, value: int) -> None:
        self.budget = self._budget.replace(max_iter=value)

    @property
    def tol(self) -> float:
        """Shorthand for ``budget.tol``; assigning it replaces the budget, validated."""
        return self._budget.tol

    @tol.setter
    def tol(self, value: float) -> None:
        self.budget = self._budget.replace(tol=value)

    def active_budget(self) -> Budget:
        """The budget the next forward solves with: :attr:`eval_budget` in eval mode where set."""
        if self.training or self._eval_budget is None:
            return self._budget
        return self._eval_budget

    # -- the forward --
    # torch.compile runs the solve eagerly, as one graph break: its solver loop reads flags back to
    # the host and its autograd.Function has a forward-mode rule, neither of which dynamo traces;
    # the model around it compiles into whole graphs (49 breaks in a 4-block iMixer without this,
    # 4 with it). A compile backend in the Budget compiles the solve's own chunks.
    @torch.compiler.disable
    def fixed_point(self, f: Callable[[Any, Tensor], Any], z0: Any, x: Tensor) -> Any:
        """Solves z = f(z, x) from ``z0`` and returns f(z*) with this layer's gradient attached.

        The output is the image f(z*) of the solver's best iterate z* (``stats.z``), as in TorchDEQ:
        one Picard step closer to the fixed point (||f(f(z*)) - f(z*)|| <= Lip(f) ||f(z*) - z*||).

        ``f`` may use this module's submodules freely: their parameters and buffers are passed to the
        implicit-function primitive as explicit inputs (parametrised weights, such as spectral norm,
        computed once per call, so the map is fixed during the solve and the power iteration advances
        once per training forward). Hence the derivatives are exact under every transform, and
        independent modules can run in independent threads.

        Args:
            f: ``(z, x) ↦ f(z, x)``; sample b of its output may depend only on sample b of z and x.
            z0: Initial guess, shape ``(B, ...)``, or a tuple/list/dict of such tensors of different
                shapes (a multi-resolution state): each sample's pieces are solved as one vector, and
                f receives and returns the same structure. With :class:`~implicitlayers.Unrolled`
                gradients flow through z0.
            x: The input, shape ``(B, ...)`` (dim 0 indexes the same samples as z's).

        Returns:
            f(z*), in ``z0``'s structure, shapes and dtypes, differentiable according to ``backward``.
        """
        budget = self.active_budget()
        self._reset_dropout_masks(budget)
        if not isinstance(z0, Tensor):
            return self._fixed_point_of_structure(f, z0, x)
        recording = self.correction_states_count > 0 and self.training and torch.is_grad_enabled()
        recorder = _IterateRecorder(f, recording and not is_transformed(x))
        function = ModuleFunction(self, recorder)
        tensors = function.tensors()
        z0 = self._start(z0)
        z = implicit_fixed_point(
            function,
            z0,
            x,
            *tensors,
            per_sample=(True,) + (False,) * len(tensors),
            solver=self._solver,
            # Recorded iterates must be whole batches: no compaction while recording them.
            budget=budget.replace(compact_rows=False) if recording else budget,
            backward=self._backward,
            on_forward=self._record_forward,
            on_backward=self._record_backward,
        ).to(z0.dtype)
        self._training_aids(function, x, tensors, z, recorder.stop(), z0.dtype)
        return z

    def _fixed_point_of_structure(self, f: Callable[[Any, Tensor], Any], z0: Any, x: Tensor) -> Any:
        packing = _Packing(z0)
        out = self.fixed_point(lambda z, x: packing.pack(f(packing.unpack(z), x)), packing.pack(z0), x)
        if self.correction_states is not None:
            self.correction_states = [packing.unpack(state) for state in self.correction_states]
        return packing.unpack(out)

    def _reset_dropout_masks(self, budget: Budget) -> None:
        for module in self.modules():
            if isinstance(module, VariationalDropout):
                if budget.compact_rows and self.training and module.p > 0:
                    raise ValueError(
                        "compact_rows=True evaluates f on subsets of the samples, but VariationalDropout keeps "
                        "one mask for the whole batch: use compact_rows=False with variational dropout"
                    )
                module.reset_mask()  # one new mask for every evaluation of f in this forward

    def _start(self, z0: Tensor) -> Tensor:
        """The warm start (the previous output) where asked for and shaped like ``z0``; else ``z0``."""
        previous = self._previous
        if not self.warm_start or previous is None or is_transformed(z0):
            return z0
        if previous.shape != z0.shape or previous.dtype != z0.dtype or previous.device != z0.device:
            return z0
        return previous

    # -- training aids, after the solve --
    def _training_aids(self, function, x, tensors, z: Tensor, iterates: list[Tensor] | None, dtype) -> None:
        """Warm-start memory, the Jacobian penalty, the spectral radius and the correction states."""
        plain = not is_transformed(z)
        self._previous = z.detach() if self.warm_start and plain else None
        if self.jacobian_penalty and self.training and torch.is_grad_enabled():
            penalty = function.bind(
                (x, *tensors), lambda bound: jacobian_penalty(bound, z.detach(), samples=self.jacobian_penalty)
            )
            self.jacobian_loss = penalty.mean()
        else:
            self.jacobian_loss = None
        if self.spectral_radius_iters and plain and self.stats is not None:
            detached = [t.detach() for t in tensors]
            radius = function.bind(
                (x.detach(), *detached),
                lambda bound: spectral_radius(bound, z.detach(), iters=self.spectral_radius_iters),
            )
            self.stats.spectral_radius = radius
        self.correction_states = self._correction_states(function, x, tensors, iterates, dtype)

    def _correction_states(self, function, x, tensors, iterates: list[Tensor] | None, dtype) -> list[Tensor] | None:
        """f(z_i) for k iterates evenly spaced along the solve, each differentiated as one step from z_i."""
        if not iterates:
            return None
        count = min(self.correction_states_count, len(iterates))
        chosen = [iterates[round(i * (len(iterates) - 1) / max(count - 1, 1))] for i in range(count)]
        states = function.bind((x, *tensors), lambda bound: [bound(z.to(dtype)) for z in chosen])
        return [state.to(dtype) for state in states]

    def reset_warm_start(self) -> None:
        """Forgets the previous fixed point: the next forward starts from ``z_init`` again."""
        self._previous = None

    # -- statistics and the non-convergence policy --
    def _record_forward(self, result: SolverResult) -> None:
        self.stats = result.detach()
        self._report(result, "forward")

    def _record_backward(self, result: SolverResult) -> None:
        self.backward_stats = result.detach()
        self._report(result, "backward")

    def _report(self, result: SolverResult, direction: str) -> None:
        if result.converged.device.type == "meta":  # a shapes-only solve: there is no outcome to report
            return
        if self.on_nonconvergence == "ignore" or bool(result.succeeded.all()):
            return
        unconverged = float((~result.succeeded).float().mean())
        reasons = ", ".join(
            f"{count} {_REASON_WORDS[name]}" for name, count in result.reasons().items() if name in _REASON_WORDS
        )
        message = (
            f"{type(self).__name__} {direction} solve did not converge for {unconverged:.1%} of samples "
            f"({reasons}; max residual {float(result.residual.max()):.3g}{_budget_words(result.budget)}); "
            "raise max_iter, try solver='broyden' or 'anderson', or lower the Lipschitz constant of f"
        )
        if self.on_nonconvergence == "raise":
            raise ConvergenceError(message)
        self._warn(message, ConvergenceWarning, stacklevel=4)

    def extra_repr(self) -> str:
        return f"solver={self._solver!r}, budget={self._budget!r}, backward={self._backward!r}"


def _budget_words(budget: Budget | None) -> str:
    return "" if budget is None else f" > tol {budget.tol:g}, max_iter {budget.max_iter}"


def _with_shorthands(budget: Budget, max_iter: int | None, tol: float | None) -> Budget:
    if not isinstance(budget, Budget):
        raise ValueError(f"budget must be an il.Budget, got {type(budget).__name__}")
    changes = {name: value for name, value in (("max_iter", max_iter), ("tol", tol)) if value is not None}
    return budget.replace(**changes) if changes else budget


class _IterateRecorder:
    """f(z, x) that keeps the z of every evaluation while recording (the solver's trajectory)."""

    def __init__(self, f: Callable[[Any, Tensor], Any], record: bool) -> None:
        self.f = f
        self.iterates: list[Tensor] | None = [] if record else None

    def __call__(self, z: Tensor, x: Tensor) -> Any:
        if self.iterates is not None:
            self.iterates.append(z.detach())
        return self.f(z, x)

    def stop(self) -> list[Tensor] | None:
        iterates, self.iterates = self.iterates, None
        return iterates


class _Packing:
    """Packs a structure (tuple, list, dict) of ``(B, ...)`` tensors into one ``(B, D)`` tensor and back."""

    def __init__(self, example: Any) -> None:
        leaves, self.spec = tree_flatten(example)
        if not leaves or not all(isinstance(leaf, Tensor) and leaf.dim() >= 1 for leaf in leaves):
            raise ValueError("z0 must be a tensor or a tuple/list/dict of tensors of shape (B, ...)")
        self.batch = leaves[0].shape[0]
        if any(leaf.shape[0] != self.batch for leaf in leaves):
            raise ValueError(f"every piece of z0 needs the same batch size; got {[tuple(t.shape) for t in leaves]}")
        self.shapes = [leaf.shape[1:] for leaf in leaves]
        self.dtypes = [leaf.dtype for leaf in leaves]
        self.dtype = functools.reduce(torch.promote_types, self.dtypes)

    def pack(self, tree: Any) -> Tensor:
        leaves, spec = tree_flatten(tree)
        if spec != self.spec or [leaf.shape[1:] for leaf in leaves] != self.shapes:
            raise ValueError(f"f must return z's structure {self.spec} with the same shapes, got {spec}")
        return torch.cat([leaf.reshape(leaf.shape[0], -1).to(self.dtype) for leaf in leaves], dim=1)

    def unpack(self, flat: Tensor) -> Any:
        pieces, start = [], 0
        for shape, dtype in zip(self.shapes, self.dtypes, strict=True):
            size = math.prod(shape)
            pieces.append(flat[:, start : start + size].reshape(flat.shape[0], *shape).to(dtype))
            start += size
        return tree_unflatten(pieces, self.spec)
