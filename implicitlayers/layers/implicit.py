"""ImplicitLayer and the machinery every fixed-point layer shares."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..backward import GRADIENT_MODES, phantom_steps, unrolled_picard
from ..errors import ConvergenceError, ConvergenceWarning, RateLimitedWarner, check_int_at_least
from ..implicit_function import (
    ModuleFunction,
    SolveConfig,
    implicit_fixed_point,
    is_transformed,
    jacobian_free_fixed_point,
    shine_fixed_point,
    shine_needs_memory,
    stop_gradient_fixed_point,
)
from ..jacobian import jacobian_penalty, spectral_radius
from ..solvers import SolverResult, get_solver, validate_solve_args

__all__ = ["NONCONVERGENCE_POLICIES", "FixedPointModule", "ImplicitLayer", "VariationalDropout", "fixed_point"]

NONCONVERGENCE_POLICIES = ("warn", "raise", "ignore")
_REASON_WORDS = {"max_iter": "ran out of max_iter", "non_finite": "produced inf/NaN", "diverged": "diverged"}


class VariationalDropout(nn.Module):
    """Dropout whose mask is fixed for every evaluation of f within one forward of an implicit layer.

    Ordinary dropout would draw a new mask at each of the solver's evaluations, so the map would
    change during the solve and z* would not be a fixed point of anything. Here the mask (shaped like
    the input, so each sample has its own) is drawn at the first call after :meth:`reset_mask`, and
    every implicit layer resets the masks of the dropout modules it contains at the start of each
    forward: no manual reset is needed there, and the backward (which may evaluate f again) sees the
    forward's mask. Identity in eval mode. Elsewhere, call :meth:`reset_mask` to draw a new mask.

    Args:
        p: Probability of zeroing an element, in [0, 1).

    Shapes:
        x: any; output: the same.
    """

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p!r}")
        self.p = p
        self.mask: Tensor | None = None

    def reset_mask(self) -> None:
        """Forgets the mask: the next training-mode call draws a new one."""
        self.mask = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.mask is None:
            if is_transformed(x):
                raise RuntimeError(
                    "VariationalDropout: a mask drawn inside a torch.func transform would differ between the "
                    "solve and the derivatives; call the model in eval mode inside the transform"
                )
            keep = torch.rand(x.shape, dtype=x.dtype, device=x.device) >= self.p
            self.mask = keep.to(x.dtype) / (1.0 - self.p)
        elif self.mask.shape != x.shape:
            raise RuntimeError(
                f"VariationalDropout: its mask has shape {tuple(self.mask.shape)} but the input has shape "
                f"{tuple(x.shape)} within one forward (under torch.func.vmap the batch is folded); use eval "
                "mode inside a transform, or reset_mask() between inputs of different shapes"
            )
        return x * self.mask

    def lipschitz_bound(self) -> float:
        """1 / (1 - p) in training mode (the mask scales kept elements up), 1 in eval mode."""
        return 1.0 / (1.0 - self.p) if self.training else 1.0

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FixedPointModule(nn.Module):
    """Base class of the layers: solves a fixed point and attaches the chosen gradient.

    Subclasses build a closure z ↦ f(z, x) and an initial guess and call :meth:`fixed_point`. The
    arguments are those of :class:`ImplicitLayer`, plus these training aids:

    Args:
        compact_rows: Evaluate f, in the forward solve, only on the samples still iterating once at
            most half of them are, so that samples that converged early cost nothing. For an f that
            treats samples independently and keeps no per-batch state (not with
            :class:`VariationalDropout`, which raises). Off by default.
        shine_refine: With ``backward="shine"``, adjoint iterations (``backward_solver``, stopping at
            ``backward_tol``) that refine the estimate read from the forward solver's memory; 0
            (default) uses the estimate alone, at the cost of a JFB backward.
        eval_max_iter: Forward budget in eval mode (default ``max_iter``): inference may afford more
            iterations, or fewer, than training.
        eval_tol: Forward tolerance in eval mode (default ``tol``).
        warm_start: Start each solve from the previous forward's output when it has the same shape,
            for inputs that the caller knows are related (consecutive frames, refinement steps);
            :meth:`reset_warm_start` forgets it. Off by default: unrelated batches gain nothing.
        jacobian_penalty: Hutchinson samples of ‖J_f(z*)‖_F² / dim (Bai et al., 2021) computed in each
            training forward and left in ``jacobian_loss`` (a differentiable scalar, the batch mean) for
            the caller to add to the loss; 0 (default) computes nothing.
        spectral_radius_iters: Power-iteration steps of ρ(J_f(z*)) per forward, recorded in
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
    """

    def __init__(
        self,
        *,
        solver: str = "anderson",
        max_iter: int = 30,
        tol: float = 1e-4,
        stop_mode: str = "rel",
        backward: str = "ift",
        backward_solver: str | None = None,
        backward_max_iter: int | None = None,
        backward_tol: float | None = None,
        phantom_steps: int = 1,
        phantom_damping: float = 1.0,
        shine_refine: int = 0,
        compact_rows: bool = False,
        on_nonconvergence: str = "warn",
        solver_options: dict[str, Any] | None = None,
        eval_max_iter: int | None = None,
        eval_tol: float | None = None,
        warm_start: bool = False,
        jacobian_penalty: int = 0,
        spectral_radius_iters: int = 0,
        correction_states: int = 0,
    ) -> None:
        super().__init__()
        get_solver(solver)
        validate_solve_args(max_iter, tol, stop_mode)
        if backward not in GRADIENT_MODES:
            raise ValueError(f"backward must be one of {list(GRADIENT_MODES)}, got {backward!r}")
        if backward_solver is not None:
            get_solver(backward_solver)
        validate_solve_args(
            max_iter if backward_max_iter is None else backward_max_iter,
            tol if backward_tol is None else backward_tol,
            stop_mode,
        )
        validate_solve_args(
            max_iter if eval_max_iter is None else eval_max_iter, tol if eval_tol is None else eval_tol, stop_mode
        )
        if not isinstance(warm_start, bool):
            raise ValueError(f"warm_start must be True or False, got {warm_start!r}")
        if not isinstance(compact_rows, bool):
            raise ValueError(f"compact_rows must be True or False, got {compact_rows!r}")
        check_int_at_least("jacobian_penalty", jacobian_penalty, 0)
        check_int_at_least("correction_states", correction_states, 0)
        if spectral_radius_iters != 0:
            check_int_at_least("spectral_radius_iters", spectral_radius_iters, 2)
        check_int_at_least("phantom_steps", phantom_steps)
        check_int_at_least("shine_refine", shine_refine, 0)
        # Picard (under either name) keeps no memory; registered third-party solvers are checked at
        # the first forward, when their result tells.
        if backward == "shine" and get_solver(solver) is get_solver("picard"):
            raise ValueError(shine_needs_memory(solver))
        if not 0.0 < phantom_damping <= 1.0:
            raise ValueError(f"phantom_damping must be in (0, 1], got {phantom_damping!r}")
        if on_nonconvergence not in NONCONVERGENCE_POLICIES:
            raise ValueError(
                f"on_nonconvergence must be one of {list(NONCONVERGENCE_POLICIES)}, got {on_nonconvergence!r}"
            )
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.stop_mode = stop_mode
        self.backward = backward
        self.backward_solver = backward_solver or solver
        self.backward_max_iter = backward_max_iter or max_iter
        self.backward_tol = tol if backward_tol is None else backward_tol
        self.phantom_steps = phantom_steps
        self.phantom_damping = phantom_damping
        self.shine_refine = shine_refine
        self.compact_rows = compact_rows
        self.on_nonconvergence = on_nonconvergence
        self.solver_options = dict(solver_options or {})
        self.eval_max_iter = max_iter if eval_max_iter is None else eval_max_iter
        self.eval_tol = tol if eval_tol is None else eval_tol
        self.warm_start = warm_start
        self.jacobian_penalty = jacobian_penalty
        self.spectral_radius_iters = spectral_radius_iters
        self.correction_states_count = correction_states
        self.correction_states: list[Any] | None = None
        self.stats: SolverResult | None = None
        self.backward_stats: SolverResult | None = None
        self.jacobian_loss: Tensor | None = None
        self._previous: Tensor | None = None  # the last output, for warm starts
        self._warn = RateLimitedWarner()

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
                f receives and returns the same structure. In ``"unrolled"`` mode gradients flow
                through z0.
            x: The input, shape ``(B, ...)`` (dim 0 indexes the same samples as z's).

        Returns:
            f(z*), in ``z0``'s structure, shapes and dtypes, differentiable according to ``backward``.
        """
        for module in self.modules():
            if isinstance(module, VariationalDropout):
                if self.compact_rows and self.training and module.p > 0:
                    raise ValueError(
                        "compact_rows=True evaluates f on subsets of the samples, but VariationalDropout keeps "
                        "one mask for the whole batch: use compact_rows=False with variational dropout"
                    )
                module.reset_mask()  # one new mask for every evaluation of f in this forward
        if not isinstance(z0, Tensor):
            packing = _Packing(z0)
            out = self.fixed_point(lambda z, x: packing.pack(f(packing.unpack(z), x)), packing.pack(z0), x)
            if self.correction_states is not None:
                self.correction_states = [packing.unpack(state) for state in self.correction_states]
            return packing.unpack(out)
        record = self.correction_states_count > 0 and self.training and torch.is_grad_enabled()
        recorder = _IterateRecorder(f, record and not is_transformed(x))
        function = ModuleFunction(self, recorder)
        tensors = function.tensors()
        z0 = self._start(z0)
        # Recorded iterates must be whole batches: no compaction while recording them.
        forward = dataclasses.replace(self._forward_config(), compact_rows=self.compact_rows and not record)
        options = {"per_sample": (True,) + (False,) * len(tensors), "forward": forward}
        if self.backward == "unrolled":
            z, result = function.bind((x, *tensors), lambda bound: self._unrolled(bound, z0))
            if result is not None:
                self._record_forward(result)
        elif self.backward == "ift":
            z = implicit_fixed_point(
                function,
                z0,
                x,
                *tensors,
                **options,
                adjoint=self._adjoint_config(),
                on_forward=self._record_forward,
                on_backward=self._record_backward,
            )
        elif self.backward == "shine":
            z = shine_fixed_point(
                function,
                z0,
                x,
                *tensors,
                **options,
                refine=self.shine_refine,
                adjoint=self._adjoint_config(),
                on_forward=self._record_forward,
                on_backward=self._record_refinement,
            )
        elif self.backward == "jfb" or (self.phantom_steps == 1 and self.phantom_damping == 1.0):
            z = jacobian_free_fixed_point(function, z0, x, *tensors, **options, on_forward=self._record_forward)
        else:
            z_star = stop_gradient_fixed_point(function, z0, x, *tensors, **options, on_forward=self._record_forward)
            steps, damping = self.phantom_steps, self.phantom_damping
            z = function.bind((x, *tensors), lambda bound: phantom_steps(bound, z_star, steps=steps, damping=damping))
        iterates = recorder.stop()
        z = z.to(z0.dtype)
        self._diagnose(function, x, tensors, z)
        self.correction_states = self._correction_states(function, x, tensors, iterates, z0.dtype)
        return z

    def _correction_states(self, function, x, tensors, iterates: list[Tensor] | None, dtype) -> list[Tensor] | None:
        """f(z_i) for k iterates evenly spaced along the solve, each differentiated as one step from z_i."""
        if not iterates:
            return None
        count = min(self.correction_states_count, len(iterates))
        chosen = [iterates[round(i * (len(iterates) - 1) / max(count - 1, 1))] for i in range(count)]
        states = function.bind((x, *tensors), lambda bound: [bound(z.to(dtype)) for z in chosen])
        return [state.to(dtype) for state in states]

    def _start(self, z0: Tensor) -> Tensor:
        """The warm start (the previous output) where asked for and shaped like ``z0``; else ``z0``."""
        previous = self._previous
        if not self.warm_start or previous is None or is_transformed(z0):
            return z0
        if previous.shape != z0.shape or previous.dtype != z0.dtype or previous.device != z0.device:
            return z0
        return previous

    def _diagnose(self, function: ModuleFunction, x: Tensor, tensors: list[Tensor], z: Tensor) -> None:
        """Warm-start memory, the Jacobian penalty and the spectral radius at the new fixed point."""
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

    def reset_warm_start(self) -> None:
        """Forgets the previous fixed point: the next forward starts from ``z_init`` again."""
        self._previous = None

    def _unrolled(self, f: Callable[[Tensor], Tensor], z0: Tensor) -> tuple[Tensor, SolverResult | None]:
        config = self._forward_config()
        return unrolled_picard(f, z0, max_iter=config.max_iter, tol=config.tol, stop_mode=self.stop_mode)

    def _budget(self, direction: str = "forward") -> tuple[int, float]:
        """``(max_iter, tol)`` of a solve: training or eval forward budget, or the adjoint's."""
        if direction != "forward":
            return self.backward_max_iter, self.backward_tol
        return (self.max_iter, self.tol) if self.training else (self.eval_max_iter, self.eval_tol)

    def _forward_config(self) -> SolveConfig:
        """Training mode solves with ``max_iter``/``tol``; eval mode with ``eval_max_iter``/``eval_tol``."""
        return SolveConfig(self.solver, *self._budget(), self.stop_mode, self.solver_options)

    def _adjoint_config(self) -> SolveConfig:
        options = self.solver_options if self.backward_solver == self.solver else {}
        return SolveConfig(self.backward_solver, self.backward_max_iter, self.backward_tol, self.stop_mode, options)

    def _record_forward(self, result: SolverResult) -> None:
        self.stats = result.detach()
        self._report(result, "forward")

    def _record_backward(self, result: SolverResult) -> None:
        self.backward_stats = result.detach()
        self._report(result, "backward")

    def _record_refinement(self, result: SolverResult) -> None:
        # SHINE's refinement is a chosen number of steps, not a solve to tolerance: nothing to warn of.
        self.backward_stats = result.detach()

    def _report(self, result: SolverResult, direction: str) -> None:
        # tol = 0 asks for a fixed number of iterations: there is no tolerance to miss.
        max_iter, tol = self._budget(direction)
        if result.converged.device.type == "meta":  # a shapes-only solve: there is no outcome to report
            return
        if self.on_nonconvergence == "ignore" or tol == 0 or bool(result.converged.all()):
            return
        unconverged = float((~result.converged).float().mean())
        reasons = ", ".join(
            f"{count} {_REASON_WORDS[name]}" for name, count in result.reasons().items() if name != "converged"
        )
        message = (
            f"{type(self).__name__} {direction} solve did not converge for {unconverged:.1%} of samples "
            f"({reasons}; max residual {float(result.residual.max()):.3g} > tol {tol:g}, "
            f"max_iter {max_iter}); "
            "raise max_iter, try solver='broyden' or 'anderson', or lower the Lipschitz constant of f"
        )
        if self.on_nonconvergence == "raise":
            raise ConvergenceError(message)
        self._warn(message, ConvergenceWarning, stacklevel=4)

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, max_iter={self.max_iter}, tol={self.tol:g}, backward={self.backward!r}"


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

    Args:
        f: Any callable ``f(z, x)`` returning z's structure and shapes; sample b of its output may
            depend only on sample b of z and x. A Module's parameters and buffers get every
            derivative; tensors a plain function captures get their exact first-order gradient.
            z may be a tensor or a tuple/list/dict of tensors (see :meth:`FixedPointModule.fixed_point`).
        solver: Forward solver name (:func:`implicitlayers.available_solvers`). Ignored by
            ``backward="unrolled"``, which always iterates Picard steps.
        max_iter: Maximum evaluations of f in the forward solve.
        tol: Per-sample residual tolerance; 0 runs exactly ``max_iter`` iterations.
        backward: ``"ift"``, ``"phantom"``, ``"jfb"``, ``"unrolled"`` or ``"shine"`` (see
            :mod:`implicitlayers.backward`).
        backward_solver: Solver of the IFT adjoint equation; defaults to ``solver``.
        backward_max_iter: Iterations of the adjoint solve; defaults to ``max_iter``.
        backward_tol: Tolerance of the adjoint solve; defaults to ``tol``.
        phantom_steps: Damped steps differentiated by ``backward="phantom"``.
        phantom_damping: λ of those steps, in (0, 1].
        z_init: Initial guess: ``"zeros"`` (zeros shaped like x), ``"input"`` (x itself) or a callable
            ``x -> z0`` (which may return a tuple/list/dict of tensors).
        on_nonconvergence: ``"warn"`` (rate-limited :class:`ConvergenceWarning`), ``"raise"``
            (:class:`ConvergenceError`) or ``"ignore"``.
        stop_mode: ``"rel"`` or ``"abs"`` residual.
        solver_options: Extra solver settings, e.g. ``{"memory": 8}``.
        **options: The training aids of :class:`FixedPointModule`: ``eval_max_iter``, ``eval_tol``,
            ``warm_start``, ``jacobian_penalty``, ``spectral_radius_iters``, ``correction_states``,
            ``shine_refine``.

    Attributes:
        stats: The last forward's :class:`SolverResult`, detached.
        backward_stats: The last IFT backward solve's :class:`SolverResult`, detached.

    Shapes:
        x: ``(B, ...)``; output: the shape of z0 (x's shape for ``"zeros"``/``"input"``).
    """

    def __init__(
        self,
        f: nn.Module,
        *,
        solver: str = "anderson",
        max_iter: int = 30,
        tol: float = 1e-4,
        backward: str = "ift",
        backward_solver: str | None = None,
        backward_max_iter: int | None = None,
        backward_tol: float | None = None,
        phantom_steps: int = 1,
        phantom_damping: float = 1.0,
        z_init: str | Callable[[Tensor], Tensor] = "zeros",
        on_nonconvergence: str = "warn",
        stop_mode: str = "rel",
        solver_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            solver=solver,
            max_iter=max_iter,
            tol=tol,
            stop_mode=stop_mode,
            backward=backward,
            backward_solver=backward_solver,
            backward_max_iter=backward_max_iter,
            backward_tol=backward_tol,
            phantom_steps=phantom_steps,
            phantom_damping=phantom_damping,
            on_nonconvergence=on_nonconvergence,
            solver_options=solver_options,
            **options,
        )
        if not callable(f):
            raise ValueError(f"f must be callable as f(z, x), got {type(f).__name__}")
        self.f = f
        self.z_init = validate_z_init(z_init)

    def forward(self, x: Tensor) -> Tensor:
        z0 = initial_guess(self.z_init, x)
        return self.fixed_point(self.f, z0, x)


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


def validate_z_init(z_init: str | Callable[[Tensor], Tensor]) -> str | Callable[[Tensor], Tensor]:
    """Checks a ``z_init`` argument: ``"zeros"``, ``"input"`` or a callable."""
    if callable(z_init) or z_init in ("zeros", "input"):
        return z_init
    raise ValueError(f"z_init must be 'zeros', 'input' or a callable x -> z0, got {z_init!r}")


def initial_guess(z_init: str | Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """The solver's starting point for input ``x`` (kept differentiable for unrolled mode)."""
    if z_init == "zeros":
        return torch.zeros_like(x)
    if z_init == "input":
        return x
    z0 = z_init(x)
    if not isinstance(z0, (Tensor, tuple, list, dict)):
        raise ValueError(f"z_init(x) must return a Tensor or a tuple/list/dict of them, got {type(z0).__name__}")
    return z0
