"""The implicit-function primitive: z* = f(z*, θ) as one autograd citizen.

:func:`implicit_fixed_point` solves z = f(z, *inputs) and returns f(z*) whose derivatives in every
input are those of the true fixed point z*(inputs), under every way PyTorch differentiates:

* reverse mode, first order: u = v + J_zᵀ u, then ∂L/∂θ = (∂f/∂θ)ᵀ u (the adjoint solve);
* reverse mode, any order (``create_graph=True``, double backward, ``torch.autograd.functional.hvp``):
  the adjoint solution u is itself a fixed point, obtained through the same kind of primitive, so its
  derivatives again come from the implicit function theorem;
* forward mode (``torch.autograd.forward_ad``, ``torch.func.jvp``/``jacfwd``): t = J_z t + J_θ θ̇,
  the tangent solve;
* ``torch.func.vmap``: samples are already independent, so the mapped dimension is folded into the
  batch dimension and solved in one batched call.

Three :class:`torch.autograd.Function` s carry this — the forward solve, the adjoint solve and the
tangent solve — and each one's derivatives are written in terms of the others (the adjoint solve's
VJP is a tangent solve and vice versa), with every explicit derivative of f taken by
:mod:`torch.func` on the pure function ``f(z, *inputs)``. JAX's ``custom_root`` is the model: one
residual function, explicit parameters, a forward solver and a linear solver for the derivatives.

On the plain first-order path (``loss.backward()``, no transforms) the forward solve records the
graph of its last evaluation of f and the backward reuses it, so the common case costs what a
hand-written IFT hook costs: no extra evaluation of f.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import check_int_at_least
from .solvers import SolverResult, get_solver, solve, validate_solve_args

__all__ = [
    "ModuleFunction",
    "SolveConfig",
    "implicit_fixed_point",
    "is_transformed",
    "jacobian_free_fixed_point",
    "shine_fixed_point",
    "stop_gradient_fixed_point",
]

PureFunction = Callable[..., Tensor]


@dataclass(frozen=True)
class SolveConfig:
    """How one fixed-point equation is solved: solver name, budget, tolerance, options.

    Attributes:
        solver: A name from :func:`implicitlayers.available_solvers`.
        max_iter: Maximum evaluations (>= 1).
        tol: Per-sample tolerance (>= 0).
        stop_mode: ``"rel"`` or ``"abs"``.
        options: Solver-specific options.
        compact_rows: In a forward solve, evaluate f only on the samples still iterating once at
            most half of them are (the built-in solvers; see :func:`implicitlayers.solvers.iterate`).
            Only for an f that treats samples independently and keeps no per-sample state between
            calls (not :class:`~implicitlayers.VariationalDropout`, whose mask has the full batch's
            shape). Linear (adjoint and tangent) solves always evaluate every sample.
    """

    solver: str = "anderson"
    max_iter: int = 30
    tol: float = 1e-4
    stop_mode: str = "rel"
    options: dict[str, Any] = field(default_factory=dict)
    compact_rows: bool = False

    def __post_init__(self) -> None:
        get_solver(self.solver)
        validate_solve_args(self.max_iter, self.tol, self.stop_mode)
        if not isinstance(self.compact_rows, bool):
            raise ValueError(f"compact_rows must be True or False, got {self.compact_rows!r}")

    def run(self, f: Callable[[Tensor], Tensor], z0: Tensor) -> SolverResult:
        return solve(
            f, z0, solver=self.solver, max_iter=self.max_iter, tol=self.tol, stop_mode=self.stop_mode, **self.options
        )


def is_transformed(*tensors: Any) -> bool:
    """Whether any tensor is being transformed by :mod:`torch.func` (vmap, grad, jvp, ...)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(isinstance(t, Tensor) and wrapped(t) for t in tensors)


class ModuleFunction:
    """A module's computation as a pure function of explicit tensors, for the primitive.

    ``fn(z, x)`` may use ``module`` freely; the tensors ``module`` holds become explicit inputs, so
    autograd, :mod:`torch.func` transforms and other threads see no hidden state. Parametrised
    tensors (spectral norm) are computed once, by :meth:`tensors`, and passed in computed form: the
    map is fixed during a solve and the power iteration advances once per call of :meth:`tensors`.

    Args:
        module: The module whose parameters and buffers ``fn`` reads.
        fn: ``fn(z, x) -> f(z, x)``.
    """

    def __init__(self, module: nn.Module, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.module = module
        self.fn = fn
        self.names: list[str] = []

    def tensors(self) -> list[Tensor]:
        """The module's effective tensors (computed parametrisations, parameters, buffers); sets ``names``."""
        named: dict[str, Tensor] = {}
        for prefix, sub in self.module.named_modules():
            for name in getattr(sub, "parametrizations", {}):
                named[f"{prefix}.{name}" if prefix else name] = getattr(sub, name)
        for name, tensor in [*self.module.named_parameters(), *self.module.named_buffers()]:
            # A parametrisation's own tensors (original, power-iteration vectors) are consumed above.
            if "parametrizations." not in f".{name}":
                named[name] = tensor
        self.names = list(named)
        return list(named.values())

    def __call__(self, z: Tensor, x: Tensor, *tensors: Tensor) -> Tensor:
        return self.bind((x, *tensors), lambda f: f(z))

    def bind(self, inputs: Sequence[Tensor], body: Callable[[Callable[..., Tensor]], Any]) -> Any:
        """Runs ``body(z ↦ f(z, *inputs))`` with the module's tensors swapped once for ``inputs[1:]``.

        The bound function also takes replacement inputs, ``f(z, x_rows, *tensors)``, for evaluating
        a subset of the samples; the module's tensors stay those swapped in.
        """
        x, *tensors = inputs
        named = dict(zip(self.names, tensors, strict=True))
        parametrized = [name for name in named if _parametrization_of(self.module, name) is not None]
        plain = {f"module.{name}": tensor for name, tensor in named.items() if name not in parametrized}
        runner = _Runner(self.module, lambda: body(lambda z, *replaced: self.fn(z, replaced[0] if replaced else x)))
        with _computed_parametrizations(self.module, {name: named[name] for name in parametrized}):
            return torch.func.functional_call(runner, plain, (), strict=False)


class _Runner(nn.Module):
    """Holds ``module`` as a child so that functional_call swaps its tensors while ``body`` runs."""

    def __init__(self, module: nn.Module, body: Callable[[], Any]) -> None:
        super().__init__()
        self.module = module
        self.body = body

    def forward(self) -> Any:
        return self.body()


def _parametrization_of(module: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    """``(submodule, attribute)`` if ``name`` is a parametrised tensor of ``module``."""
    prefix, _, attribute = name.rpartition(".")
    sub = module.get_submodule(prefix) if prefix else module
    if attribute in getattr(sub, "parametrizations", {}):
        return sub, attribute
    return None


class _Computed(nn.Module):
    """Stands in for a ParametrizationList: returns the already computed tensor."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self) -> Tensor:
        return self.value


@contextlib.contextmanager
def _computed_parametrizations(module: nn.Module, computed: dict[str, Tensor]):
    """Makes each parametrised attribute in ``computed`` return the given tensor while inside.

    ``functional_call`` would assign such an attribute through the parametrisation's
    ``right_inverse``, which rewrites the free parameter; swapping the parametrisation list for a
    constant touches nothing global and only this module (so independent modules may run in
    independent threads).
    """
    swapped = []
    try:
        for name, value in computed.items():
            sub, attribute = _parametrization_of(module, name)
            swapped.append((sub, attribute, sub.parametrizations[attribute]))
            sub.parametrizations[attribute] = _Computed(value)
        yield
    finally:
        for sub, attribute, original in reversed(swapped):
            sub.parametrizations[attribute] = original


def _bind(f: PureFunction, inputs: Sequence[Tensor], body: Callable[[Callable[..., Tensor]], Any]) -> Any:
    """``body(bound)`` with ``bound(z) = f(z, *inputs)`` (and ``bound(z, *other_inputs)`` for a subset)."""
    if isinstance(f, ModuleFunction):
        return f.bind(inputs, body)
    return body(lambda z, *replaced: f(z, *(replaced or inputs)))


class _Problem:
    """Everything the three Functions share for one call: f, what is per-sample, the two solve configs.

    Non-tensor state travels as the first argument of ``apply``; the fields under "set by the
    forward" carry results out of ``forward`` (which has no ``ctx``).
    """

    def __init__(
        self,
        f: PureFunction,
        per_sample: tuple[bool, ...],
        forward: SolveConfig,
        adjoint: SolveConfig,
        derivative: str,
        on_forward: Callable[[SolverResult], None] | None,
        on_backward: Callable[[SolverResult], None] | None,
        record_graph: bool,
        detect_captures: bool,
    ) -> None:
        self.f = f
        self.per_sample = per_sample
        self.forward = forward
        self.adjoint = adjoint
        # "ift", "shine" (first order, adjoint from the solver's memory), "jfb" (z* held constant) or
        # "none" (returns the iterate)
        self.derivative = derivative
        self.on_forward = on_forward
        self.on_backward = on_backward
        self.record_graph = record_graph
        self.detect_captures = detect_captures
        # Set by the forward:
        self.graph: tuple[Tensor, list[Tensor | None], Tensor] | None = None
        self.captures = False
        self.z_best: Tensor | None = None
        self.estimate: Callable[[Tensor], Tensor] | None = None  # SHINE: g ↦ ≈ (I - J)⁻ᵀ g
        self.shine_refine = 0


# ---------------------------------------------------------------------------------------------
# Explicit derivatives of f, by torch.func (differentiable, and valid inside every transform).
# ---------------------------------------------------------------------------------------------


def _select(f: PureFunction, z: Tensor, inputs: Sequence[Tensor], positions: list[int]) -> Callable[..., Tensor]:
    """``(*chosen) ↦ f(z, *inputs with inputs[positions] = chosen)``."""

    def partial(*chosen: Tensor) -> Tensor:
        full = list(inputs)
        for position, value in zip(positions, chosen, strict=True):
            full[position] = value
        return f(z, *full)

    return partial


def _vjp_inputs(f: PureFunction, z: Tensor, inputs: Sequence[Tensor], cotangent: Tensor, needed: Sequence[bool]):
    """(∂f/∂inputs)ᵀ cotangent at (z, inputs), ``None`` where not ``needed``."""
    positions = [i for i, need in enumerate(needed) if need]
    grads: list[Tensor | None] = [None] * len(inputs)
    if positions:
        _, pull = torch.func.vjp(_select(f, z, inputs, positions), *[inputs[i] for i in positions])
        for position, grad in zip(positions, pull(cotangent.to(z.dtype)), strict=True):
            grads[position] = grad
    return grads


def _jvp_inputs(f: PureFunction, z: Tensor, inputs: Sequence[Tensor], tangents: Sequence[Tensor | None]) -> Tensor:
    """(∂f/∂inputs) · tangents at (z, inputs); inputs without a tangent are held fixed."""
    positions = [i for i, t in enumerate(tangents) if t is not None]
    if not positions:
        return torch.zeros_like(z)
    primals = tuple(inputs[i] for i in positions)
    return _jvp(_select(f, z, inputs, positions), primals, [tangents[i] for i in positions])


def _jvp(fn: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor]) -> Tensor:
    """The directional derivative of ``fn`` at ``primals`` along ``tangents``, by two VJPs.

    J t is the VJP, with cotangent t, of the linear map w ↦ Jᵀ w. Reverse mode only: forward-mode
    AD is switched off inside autograd.Function methods and cannot be nested in
    ``torch.autograd.forward_ad``, while this composes with every transform.
    """
    out, pull = torch.func.vjp(fn, *primals)
    _, pull_linear = torch.func.vjp(pull, torch.zeros_like(out))
    (product,) = pull_linear(tuple(t.to(p.dtype) for p, t in zip(primals, tangents, strict=True)))
    return product


def _transposed_jacobian_product(f: PureFunction, a: Tensor) -> Callable[..., Tensor]:
    """``(z, *inputs) ↦ J_z(z, inputs)ᵀ a``, as a function to differentiate in (z, inputs)."""

    def product(z: Tensor, *inputs: Tensor) -> Tensor:
        _, pull = torch.func.vjp(lambda y: f(y, *inputs), z)
        return pull(a.to(z.dtype))[0]

    return product


def _jacobian_product(f: PureFunction, t: Tensor) -> Callable[..., Tensor]:
    """``(z, *inputs) ↦ J_z(z, inputs) t``."""

    def product(z: Tensor, *inputs: Tensor) -> Tensor:
        return _jvp(lambda y: f(y, *inputs), (z,), (t.to(z.dtype),))

    return product


def _second_order_vjp(f: PureFunction, a: Tensor, b: Tensor, z: Tensor, inputs: Sequence[Tensor], needed):
    """∂/∂(z, inputs) ⟨a, J_z(z, inputs) b⟩ = the VJP of (z, inputs) ↦ J_zᵀ a with cotangent b.

    The piece of every second derivative of a fixed point that involves how J_z moves. Returns
    ``(grad_z, grads_inputs)``, ``None`` where not ``needed`` (``needed[0]`` is z's flag).
    """
    positions = [i for i, need in enumerate(needed[1:]) if need]
    product = _transposed_jacobian_product(f, a)
    _, pull = torch.func.vjp(
        lambda y, *chosen: _select(product, y, inputs, positions)(*chosen), z, *[inputs[i] for i in positions]
    )
    grad_z, *chosen_grads = pull(b.to(z.dtype))
    grads: list[Tensor | None] = [None] * len(inputs)
    for position, grad in zip(positions, chosen_grads, strict=True):
        grads[position] = grad
    return (grad_z if needed[0] else None), grads


def _second_order_jvp(product: Callable[..., Tensor], z: Tensor, inputs, z_tangent, input_tangents) -> Tensor:
    """Directional derivative of ``product(z, *inputs)`` along (z_tangent, input_tangents)."""
    positions = [i for i, t in enumerate(input_tangents) if t is not None]
    if z_tangent is None and not positions:
        return torch.zeros_like(z)
    z_tangent = torch.zeros_like(z) if z_tangent is None else z_tangent

    def moving(y: Tensor, *chosen: Tensor) -> Tensor:
        return _select(product, y, inputs, positions)(*chosen)

    primals = (z, *[inputs[i] for i in positions])
    tangents = (z_tangent, *[input_tangents[i] for i in positions])
    return _jvp(moving, primals, tangents)


# ---------------------------------------------------------------------------------------------
# The linear solves, run inside forward() on plain tensors.
# ---------------------------------------------------------------------------------------------


def _solve_linear(
    problem: _Problem, apply: Callable[[Tensor], Tensor], rhs: Tensor, start: Tensor | None = None
) -> Tensor:
    """Solves u = rhs + M u with the adjoint config, from ``start`` (default ``rhs``); returns the image
    rhs + M u* of the best iterate."""
    latest: dict[str, Tensor] = {}

    def linear_map(u: Tensor) -> Tensor:
        image = apply(u.to(rhs.dtype)).to(u.dtype) + rhs.to(u.dtype)
        latest["u"], latest["image"] = u, image
        return image

    result = problem.adjoint.run(linear_map, rhs if start is None else start.to(rhs.dtype))
    if problem.on_backward is not None:
        problem.on_backward(result.detach())
    # As in the forward, the image of the best iterate is one step closer to the solution.
    image = latest["image"] if _same_point(latest["u"], result.z) else linear_map(result.z)
    return image.to(rhs.dtype)


def _adjoint_solution(problem: _Problem, z: Tensor, g: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    """u = g + J_z(z)ᵀ u, with VJPs through one recorded graph of f."""

    def body(f: Callable[[Tensor], Tensor]) -> Tensor:
        with torch.enable_grad():
            z_leaf = z.detach().requires_grad_()
            fz = f(z_leaf)
        return _adjoint_from_graph(problem, z_leaf, fz, g)

    return _bind(problem.f, [i.detach() for i in inputs], body)


def _adjoint_from_graph(problem: _Problem, z_leaf: Tensor, fz: Tensor, g: Tensor) -> Tensor:
    if not fz.requires_grad:  # f does not depend on z: J = 0 (a copy: a Function may not return its input)
        return g.clone()
    start = None
    if problem.derivative == "shine":
        start = problem.estimate(g)
        if problem.shine_refine == 0:  # no refinement: the estimate is the adjoint
            return start

    def transposed(u: Tensor) -> Tensor:
        (vjp,) = torch.autograd.grad(fz, z_leaf, u.to(fz.dtype), retain_graph=True, allow_unused=True)
        return torch.zeros_like(u) if vjp is None else vjp

    return _solve_linear(problem, transposed, g, start)


def _tangent_solution(problem: _Problem, z: Tensor, b: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    """t = b + J_z(z) t. J t is the VJP of w ↦ J_zᵀ w, whose graph is recorded once for all steps."""

    def body(f: Callable[[Tensor], Tensor]) -> Tensor:
        with torch.enable_grad():
            z_leaf = z.detach().requires_grad_()
            fz = f(z_leaf)
            if not fz.requires_grad:  # f does not depend on z: J = 0
                return b.clone()
            w = torch.zeros_like(fz, requires_grad=True)
            (transposed,) = torch.autograd.grad(fz, z_leaf, w, create_graph=True, allow_unused=True)
        if transposed is None or not transposed.requires_grad:  # J is constant zero
            return b.clone()

        def product(t: Tensor) -> Tensor:
            (jt,) = torch.autograd.grad(transposed, w, t.to(transposed.dtype), retain_graph=True, allow_unused=True)
            return torch.zeros_like(t) if jt is None else jt

        return _solve_linear(problem, product, b)

    return _bind(problem.f, [i.detach() for i in inputs], body)


# ---------------------------------------------------------------------------------------------
# vmap: fold the mapped dimension into the batch (samples are independent), else loop.
# ---------------------------------------------------------------------------------------------


def _vmap_rule(function: type[torch.autograd.Function], info, in_dims, problem: _Problem, *args: Tensor):
    per_sample = function.per_sample(problem)
    dims = in_dims[1:]
    size = info.batch_size
    if all(d is None or sample for d, sample in zip(dims, per_sample, strict=True)):
        batch = _rows(args[0], dims[0])  # args[0] is z (or z0): always per-sample
        folded = [_fold(a, d, size) if sample else a for a, d, sample in zip(args, dims, per_sample, strict=True)]
        out = function.apply(problem, *folded)
        return out.reshape(size, batch, *out.shape[1:]), 0
    # An input shared by all samples (a weight) differs along the mapped dimension: one solve each.
    outputs = [
        function.apply(problem, *[a if d is None else a.select(d, index) for a, d in zip(args, dims, strict=True)])
        for index in range(size)
    ]
    return torch.stack(outputs), 0


def _rows(a: Tensor, dim: int | None) -> int:
    """Samples in ``a`` (dim 0 of the unmapped tensor)."""
    return a.shape[0] if dim is None else a.movedim(dim, 0).shape[1]


def _fold(a: Tensor, dim: int | None, size: int) -> Tensor:
    """(V, B, ...) → (V·B, ...), with the mapped dim moved first (or created by repetition)."""
    a = a.expand(size, *a.shape) if dim is None else a.movedim(dim, 0)
    return a.reshape(size * a.shape[1], *a.shape[2:])


_is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda tensor: False)


def _unbatch_legacy(backward: Callable[..., tuple]) -> Callable[..., tuple]:
    """Lets ``backward`` run under ``torch.autograd.grad(..., is_grads_batched=True)``.

    That option batches the incoming gradients with PyTorch's legacy vmap, which knows nothing of
    autograd.Function vmap rules (and the solver loop cannot be traced by it). The gradients are
    unwrapped to plain (V, ...) tensors, the backward runs under :func:`torch.func.vmap` (which uses
    the rules above), and the results are wrapped back.
    """

    @functools.wraps(backward)
    def wrapper(ctx, *grads: Tensor) -> tuple:
        legacy = [isinstance(g, Tensor) and _is_legacy_batched(g) for g in grads]
        if not any(legacy):
            return backward(ctx, *grads)
        level = torch._C._vmapmode_increment_nesting() - 1  # the level of the vmap we are inside
        torch._C._vmapmode_decrement_nesting()
        size = torch._remove_batch_dim(grads[legacy.index(True)], level, 1, 0).shape[0]
        physical = [
            torch._remove_batch_dim(g, level, size, 0) if is_ else g for g, is_ in zip(grads, legacy, strict=True)
        ]
        positions: list[int] = []

        def tensors_only(*gs: Tensor) -> tuple[Tensor, ...]:
            outputs = backward(ctx, *gs)
            positions[:] = [i for i, out in enumerate(outputs) if isinstance(out, Tensor)]
            return tuple(outputs[i] for i in positions)

        batched = torch.func.vmap(tensors_only, in_dims=tuple(0 if is_ else None for is_ in legacy))(*physical)
        outputs: list[Tensor | None] = [None] * (len(ctx.needs_input_grad))
        for position, out in zip(positions, batched, strict=True):
            outputs[position] = torch._add_batch_dim(out, 0, level)
        return tuple(outputs)

    return wrapper


# ---------------------------------------------------------------------------------------------
# The three Functions.
# ---------------------------------------------------------------------------------------------


class _FixedPoint(torch.autograd.Function):
    """``(z0, *inputs) ↦ f(z*)`` where z* = f(z*, *inputs); derivatives by the IFT."""

    @staticmethod
    def per_sample(problem: _Problem) -> tuple[bool, ...]:
        return (True, *problem.per_sample)

    @staticmethod
    def forward(problem: _Problem, z0: Tensor, *inputs: Tensor) -> Tensor:
        leaves = _forward_inputs(problem, inputs)
        return _bind(problem.f, leaves, lambda f: _forward_solve(problem, f, z0, inputs, leaves))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        problem, _, *tensors = inputs
        ctx.problem = problem
        ctx.graph, problem.graph = problem.graph, None
        ctx.z_best = problem.z_best
        ctx.save_for_backward(output, *tensors)
        ctx.save_for_forward(output, *tensors)

    @staticmethod
    @_unbatch_legacy
    def backward(ctx, grad: Tensor):
        problem: _Problem = ctx.problem
        needed = ctx.needs_input_grad[2:]
        if problem.derivative == "none":
            return (None, None, *[None] * len(needed))
        z, *inputs = ctx.saved_tensors
        if problem.derivative == "shine" and (torch.is_grad_enabled() or is_transformed(grad)):
            raise RuntimeError(_SHINE_FIRST_ORDER_MESSAGE)
        if not torch.is_grad_enabled() and not is_transformed(grad):
            # First order, plain autograd: through the forward's recorded graph (which serves one
            # backward), or a graph recorded the same way, so that repeated backwards agree bitwise.
            graph, ctx.graph = ctx.graph, None
            graph = graph or _record_graph(problem, ctx.z_best, inputs)
            return (None, None, *_backward_through_graph(problem, graph, grad, needed))
        if problem.derivative == "jfb":  # the derivative of f(z*, inputs) with z* a constant
            return (None, None, *_vjp_inputs(problem.f, z.detach(), inputs, grad, needed))
        u = _AdjointSolve.apply(problem, z, grad, *inputs)
        return (None, None, *_vjp_inputs(problem.f, z, inputs, u, needed))

    @staticmethod
    def jvp(ctx, _problem, z0_tangent, *input_tangents):
        problem: _Problem = ctx.problem
        z, *inputs = ctx.saved_tensors
        if problem.derivative == "none":
            return torch.zeros_like(z)  # z here is the iterate, the output
        if problem.derivative == "shine":
            raise RuntimeError(_SHINE_FIRST_ORDER_MESSAGE)
        if problem.derivative == "jfb":
            return _jvp_inputs(problem.f, z.detach(), inputs, input_tangents)
        b = _jvp_inputs(problem.f, z, inputs, input_tangents)
        return _TangentSolve.apply(problem, z, b, *inputs)

    @staticmethod
    def vmap(info, in_dims, problem, *args):
        return _vmap_rule(_FixedPoint, info, in_dims, problem, *args)


class _LinearSolve(torch.autograd.Function):
    """``(z, rhs, *inputs) ↦ x`` with x = rhs + M x: M = J_zᵀ (adjoint) or J_z (tangent), A = I - J_z.

    The two are each other's derivative. For the adjoint u = A⁻ᵀ g and a cotangent w, with t = A⁻¹ w:
    ḡ = t and (z̄, θ̄) = ∂/∂(z, θ) ⟨u, J_z t⟩. For the tangent t = A⁻¹ b, with s = A⁻ᵀ w: b̄ = s and
    (z̄, θ̄) = ∂/∂(z, θ) ⟨s, J_z t⟩. Forward mode differentiates the equation itself: ẋ solves the
    same system with right-hand side ṙhs + (∂(M x)/∂(z, θ)) · (ż, θ̇).
    """

    transposed: bool  # adjoint (J_zᵀ) or tangent (J_z)

    @staticmethod
    def per_sample(problem: _Problem) -> tuple[bool, ...]:
        return (True, True, *problem.per_sample)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.problem, z, _, *tensors = inputs
        ctx.save_for_backward(z, output, *tensors)
        ctx.save_for_forward(z, output, *tensors)


def _linear_backward(ctx, w: Tensor, transposed: bool) -> tuple:
    problem: _Problem = ctx.problem
    z, x, *inputs = ctx.saved_tensors
    y = (_TangentSolve if transposed else _AdjointSolve).apply(problem, z, w, *inputs)
    adjoint_side, tangent_side = (x, y) if transposed else (y, x)
    needed = (ctx.needs_input_grad[1], *ctx.needs_input_grad[3:])
    grad_z, grads = _second_order_vjp(problem.f, adjoint_side, tangent_side, z, inputs, needed)
    return (None, grad_z, y, *grads)


def _linear_jvp(ctx, function: type[_LinearSolve], z_tangent, rhs_tangent, input_tangents) -> Tensor:
    problem: _Problem = ctx.problem
    z, x, *inputs = ctx.saved_tensors
    product = (_transposed_jacobian_product if function.transposed else _jacobian_product)(problem.f, x)
    moved = _second_order_jvp(product, z, inputs, z_tangent, input_tangents)
    rhs = moved if rhs_tangent is None else moved + rhs_tangent
    return function.apply(problem, z, rhs, *inputs)


class _AdjointSolve(_LinearSolve):
    """``(z, g, *inputs) ↦ u`` with u = g + J_z(z, inputs)ᵀ u."""

    transposed = True

    @staticmethod
    def forward(problem: _Problem, z: Tensor, g: Tensor, *inputs: Tensor) -> Tensor:
        return _adjoint_solution(problem, z, g, inputs)

    @staticmethod
    @_unbatch_legacy
    def backward(ctx, w: Tensor):
        return _linear_backward(ctx, w, transposed=True)

    @staticmethod
    def jvp(ctx, _problem, z_tangent, g_tangent, *input_tangents):
        return _linear_jvp(ctx, _AdjointSolve, z_tangent, g_tangent, input_tangents)

    @staticmethod
    def vmap(info, in_dims, problem, *args):
        return _vmap_rule(_AdjointSolve, info, in_dims, problem, *args)


class _TangentSolve(_LinearSolve):
    """``(z, b, *inputs) ↦ t`` with t = b + J_z(z, inputs) t."""

    transposed = False

    @staticmethod
    def forward(problem: _Problem, z: Tensor, b: Tensor, *inputs: Tensor) -> Tensor:
        return _tangent_solution(problem, z, b, inputs)

    @staticmethod
    @_unbatch_legacy
    def backward(ctx, w: Tensor):
        return _linear_backward(ctx, w, transposed=False)

    @staticmethod
    def jvp(ctx, _problem, z_tangent, b_tangent, *input_tangents):
        return _linear_jvp(ctx, _TangentSolve, z_tangent, b_tangent, input_tangents)

    @staticmethod
    def vmap(info, in_dims, problem, *args):
        return _vmap_rule(_TangentSolve, info, in_dims, problem, *args)


# ---------------------------------------------------------------------------------------------
# The forward solve.
# ---------------------------------------------------------------------------------------------


def _forward_inputs(problem: _Problem, inputs: Sequence[Tensor]) -> list[Tensor]:
    """The inputs f sees during the solve: leaves of a private graph when one is recorded."""
    if not problem.record_graph:
        return list(inputs)
    return [i.detach().requires_grad_(i.requires_grad) for i in inputs]


def _forward_solve(
    problem: _Problem, f: Callable[[Tensor], Tensor], z0: Tensor, inputs: Sequence[Tensor], leaves: list[Tensor]
) -> Tensor:
    probe = None
    if problem.detect_captures:
        detached = [i.detach() for i in inputs]
        probe = lambda z: problem.f(z, *detached)  # noqa: E731
    rows = None
    if problem.forward.compact_rows:

        def rows(z_rows: Tensor, index: Tensor) -> Tensor:
            chosen = [
                t.index_select(0, index) if each else t for t, each in zip(leaves, problem.per_sample, strict=True)
            ]
            return f(z_rows, *chosen)

    recorded = _LastEvaluation(f, graph=problem.record_graph, probe=probe, rows=rows)
    result = problem.forward.run(recorded, z0.detach())
    z_leaf, fz = recorded.at(result.z.to(z0.dtype))
    problem.captures = recorded.captures
    if problem.record_graph and fz.requires_grad:
        problem.graph = (z_leaf, leaves, fz)
    problem.z_best = z_leaf.detach()
    if problem.derivative == "shine":
        if result.adjoint_estimate is None:
            raise ValueError(shine_needs_memory(problem.forward.solver))
        problem.estimate = result.adjoint_estimate
    if problem.on_forward is not None:
        problem.on_forward(result.detach())
    # A stop-gradient solve returns the iterate itself: the caller differentiates steps from it.
    return problem.z_best if problem.derivative == "none" else fz.detach()


class _LastEvaluation:
    """f that keeps its latest input and output (with the output's graph when ``graph``).

    The solver evaluates f at the iterate it returns, so that evaluation serves as the output and, on
    the first-order path, as the graph of the backward. A ``probe`` (f on detached inputs) replaces
    the first evaluation, with grad enabled, to learn whether f captures tensors that require grad.
    """

    def __init__(
        self,
        f: Callable[[Tensor], Tensor],
        *,
        graph: bool,
        probe: Callable[[Tensor], Tensor] | None,
        rows: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        self.f = f
        self.graph = graph
        self.probe = probe
        self.captures = False
        self.z: Tensor | None = None
        self.fz: Tensor | None = None
        if rows is not None:
            self._f_rows = rows
            self.rows = self._rows  # the solver driver evaluates only active samples through it

    def _rows(self, z_rows: Tensor, index: Tensor) -> Tensor:
        """f on some samples, without a graph: the output's graph comes from one full evaluation."""
        self.z = self.fz = None
        with torch.no_grad():
            return _checked(self._f_rows(z_rows.detach(), index))

    def __call__(self, z: Tensor) -> Tensor:
        if self.probe is not None:
            probe, self.probe = self.probe, None
            with torch.enable_grad():
                fz = _checked(probe(z.detach()))
            self.captures = fz.requires_grad
            return fz.detach()  # not kept as the latest evaluation: it has no graph of the inputs
        return self._evaluate(z)[1]

    def at(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(z_leaf, f(z_leaf))`` at ``z``: the latest evaluation if it was at exactly ``z``."""
        if self.z is not None and self.fz is not None and _same_point(self.z.detach(), z):
            return self.z, self.fz
        return self._evaluate(z)

    def _evaluate(self, z: Tensor) -> tuple[Tensor, Tensor]:
        self.z = self.fz = None  # release the previous graph before building the next
        with torch.set_grad_enabled(self.graph):
            z = z.detach().requires_grad_(self.graph)
            fz = _checked(self.f(z))
        self.z, self.fz = z, fz
        return z, fz


def _same_point(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same values (never on the meta device, which holds none)."""
    return a.device.type != "meta" and a.shape == b.shape and torch.equal(a, b)


def _checked(fz: Tensor) -> Tensor:
    if is_transformed(fz):
        raise RuntimeError(_TRANSFORM_CAPTURE_MESSAGE)
    return fz


_TRANSFORM_CAPTURE_MESSAGE = (
    "f captures a tensor that a torch.func transform (or forward-mode AD) is differentiating or batching; "
    "pass every tensor f uses as an explicit input (a layer passes its module's parameters and buffers, and x, "
    "for you: store other tensors as parameters or buffers, or feed them through x)"
)


def _record_graph(problem: _Problem, z: Tensor, inputs: Sequence[Tensor]):
    """``(z_leaf, leaves, f(z_leaf, *leaves))`` with grad, on detached copies of ``z`` and ``inputs``."""
    leaves = [i.detach().requires_grad_(i.requires_grad) for i in inputs]

    def body(f: Callable[[Tensor], Tensor]):
        with torch.enable_grad():
            z_leaf = z.detach().requires_grad_()
            return z_leaf, leaves, f(z_leaf)

    return _bind(problem.f, leaves, body)


def _backward_through_graph(problem: _Problem, graph, grad: Tensor, needed: Sequence[bool]) -> list[Tensor | None]:
    """First-order IFT through the forward's recorded graph: adjoint solve, then one VJP."""
    z_leaf, leaves, fz = graph
    u = grad if problem.derivative == "jfb" else _adjoint_from_graph(problem, z_leaf, fz, grad)
    wanted = [i for i, (leaf, need) in enumerate(zip(leaves, needed, strict=True)) if need and leaf.requires_grad]
    grads: list[Tensor | None] = [None] * len(needed)
    if wanted and fz.requires_grad:
        found = torch.autograd.grad(fz, [leaves[i] for i in wanted], u.to(fz.dtype), allow_unused=True)
        for i, g in zip(wanted, found, strict=True):
            grads[i] = g
    return grads


# ---------------------------------------------------------------------------------------------
# The public entry point.
# ---------------------------------------------------------------------------------------------


def implicit_fixed_point(
    f: PureFunction,
    z0: Tensor,
    *inputs: Tensor,
    per_sample: Sequence[bool] | None = None,
    forward: SolveConfig | None = None,
    adjoint: SolveConfig | None = None,
    on_forward: Callable[[SolverResult], None] | None = None,
    on_backward: Callable[[SolverResult], None] | None = None,
) -> Tensor:
    """Solves z = f(z, *inputs) and returns f(z*), differentiable in ``inputs`` by the IFT.

    The derivatives are those of the exact fixed point z*(inputs) under reverse mode of any order,
    forward mode and :mod:`torch.func` (``grad``, ``vjp``, ``jvp``, ``jacrev``, ``jacfwd``,
    ``hessian``, ``vmap``); the linear equations they need are solved with ``adjoint``.

    Examples:
        >>> import torch, implicitlayers as il
        >>> f = lambda z, x, w: torch.tanh(w * z) + x
        >>> x, w = torch.randn(3, 4, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
        >>> tight = il.SolveConfig(tol=1e-12, max_iter=100)
        >>> def z_star(w):
        ...     return il.implicit_fixed_point(f, torch.zeros_like(x), x, w, per_sample=(True, False),
        ...                                    forward=tight, adjoint=tight)
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
        forward: How the forward equation is solved.
        adjoint: How the adjoint (reverse) and tangent (forward-mode) linear equations are solved.
            Defaults to ``forward``.
        on_forward: Called with the forward solve's detached :class:`SolverResult`.
        on_backward: Called with every adjoint or tangent solve's detached :class:`SolverResult`.

    Returns:
        f(z*), shape and dtype of f's output.

    Raises:
        RuntimeError: If f reads a tensor that a torch.func transform is tracking without receiving
            it as an input.
    """
    problem = _make_problem(f, z0, inputs, per_sample, forward, adjoint, "ift", on_forward, on_backward)
    _check_captures(problem, z0, inputs)
    out = _FixedPoint.apply(problem, z0, *inputs)
    if problem.captures:
        out = _captured_ift(problem, out, inputs)
    return out


def shine_fixed_point(
    f: PureFunction,
    z0: Tensor,
    *inputs: Tensor,
    per_sample: Sequence[bool] | None = None,
    forward: SolveConfig | None = None,
    refine: int = 0,
    adjoint: SolveConfig | None = None,
    on_forward: Callable[[SolverResult], None] | None = None,
    on_backward: Callable[[SolverResult], None] | None = None,
) -> Tensor:
    """f(z*) for z = f(z, *inputs), with SHINE gradients (Ramzi et al., 2022): first order only.

    The adjoint u = (I - J_z)⁻ᵀ v of the IFT is not solved for but read from the forward solver's
    quasi-Newton memory (``forward.solver`` must be ``"broyden"`` or ``"anderson"``; see
    ``SolverResult.adjoint_estimate``), then optionally refined by at most ``refine`` iterations of
    the adjoint equation u = v + J_zᵀ u started there. The gradient is (∂f/∂inputs)ᵀ u: approximate, exact on the
    directions the solver explored, and as cheap as JFB's without refinement.

    It is a first-order reverse-mode gradient (``loss.backward()``, ``torch.autograd.grad``):
    ``create_graph=True``, forward mode and :mod:`torch.func` raise ``RuntimeError``.

    Args:
        f: ``f(z, *inputs) -> Tensor`` shaped like ``z``, as in :func:`implicit_fixed_point`.
        z0: Initial guess, shape ``(B, ...)``.
        *inputs: The tensors f depends on.
        per_sample: As in :func:`implicit_fixed_point`.
        forward: How the forward equation is solved; its solver must keep a quasi-Newton memory.
        refine: Iterations of the adjoint solve that refines the estimate (>= 0; 0: none). The
            refinement stops early where ``adjoint.tol`` is met.
        adjoint: Solver, tolerance and options of the refinement (its ``max_iter`` is ``refine``);
            defaults to ``forward``.
        on_forward: Called with the forward solve's detached :class:`SolverResult`.
        on_backward: Called with each refinement's detached :class:`SolverResult`.

    Returns:
        f(z*), shape and dtype of f's output.

    Raises:
        ValueError: If the forward solver keeps no quasi-Newton memory.
        RuntimeError: Under a torch.func transform or forward-mode AD, and in a backward with
            ``create_graph=True``.
    """
    from torch.autograd import forward_ad

    if is_transformed(z0, *inputs) or forward_ad._current_level >= 0:
        raise RuntimeError(_SHINE_FIRST_ORDER_MESSAGE)
    check_int_at_least("refine", refine, 0)
    forward = forward or SolveConfig()
    adjoint = dataclasses.replace(adjoint or forward, max_iter=max(refine, 1))
    problem = _make_problem(f, z0, inputs, per_sample, forward, adjoint, "shine", on_forward, on_backward)
    problem.shine_refine = refine
    out = _FixedPoint.apply(problem, z0, *inputs)
    if problem.captures:
        out = _captured_ift(problem, out, inputs)
    return out


SHINE_SOLVERS = ("anderson", "broyden")
"""Built-in solvers whose memory gives ``backward="shine"`` its adjoint estimate."""


def shine_needs_memory(solver: str) -> str:
    """The error message for SHINE with a solver that keeps no quasi-Newton memory."""
    return (
        f"backward='shine' reuses the forward solver's quasi-Newton memory; solver {solver!r} keeps none: "
        f"use one of {list(SHINE_SOLVERS)}"
    )


_SHINE_FIRST_ORDER_MESSAGE = (
    "backward='shine' gives first-order reverse-mode gradients only (loss.backward(), torch.autograd.grad "
    "without create_graph); use backward='ift' for higher orders, forward mode and torch.func transforms"
)


def jacobian_free_fixed_point(
    f: PureFunction,
    z0: Tensor,
    *inputs: Tensor,
    per_sample: Sequence[bool] | None = None,
    forward: SolveConfig | None = None,
    on_forward: Callable[[SolverResult], None] | None = None,
) -> Tensor:
    """f(z*) for z = f(z, *inputs), differentiated as f(z*, inputs) with z* held constant (JFB).

    Jacobian-free backpropagation (Fung et al., 2022): the first term of the IFT's Neumann series,
    in every order and transform (forward mode gives (∂f/∂inputs) · tangents). On the plain
    first-order path the forward's last evaluation of f serves the backward, as for the IFT.
    """
    problem = _make_problem(f, z0, inputs, per_sample, forward, None, "jfb", on_forward, None)
    _check_captures(problem, z0, inputs)
    out = _FixedPoint.apply(problem, z0, *inputs)
    if problem.captures:  # captured tensors need f's own graph: differentiate one evaluation of f
        out = _bind(f, inputs, lambda bound: bound(problem.z_best))
    return out


def stop_gradient_fixed_point(
    f: PureFunction,
    z0: Tensor,
    *inputs: Tensor,
    per_sample: Sequence[bool] | None = None,
    forward: SolveConfig | None = None,
    on_forward: Callable[[SolverResult], None] | None = None,
) -> Tensor:
    """The solver's best iterate z* for z = f(z, *inputs), with no derivative in anything.

    For gradients that differentiate explicit steps from z* (phantom, Jacobian-free): under
    ``vmap`` the solve is folded into the batch like :func:`implicit_fixed_point`'s.
    """
    problem = _make_problem(f, z0, inputs, per_sample, forward, None, "none", on_forward, None)
    return _FixedPoint.apply(problem, z0, *inputs)


def _make_problem(f, z0, inputs, per_sample, forward, adjoint, derivative, on_forward, on_backward) -> _Problem:
    forward = forward or SolveConfig()
    per_sample = tuple(per_sample) if per_sample is not None else (False,) * len(inputs)
    if len(per_sample) != len(inputs):
        raise ValueError(f"per_sample must have one flag per input ({len(inputs)}), got {len(per_sample)}")
    grad_mode = torch.is_grad_enabled()
    transformed = is_transformed(z0, *inputs)
    return _Problem(
        f,
        per_sample,
        forward,
        adjoint or forward,
        derivative,
        on_forward,
        on_backward,
        record_graph=derivative != "none" and grad_mode and not transformed and any(i.requires_grad for i in inputs),
        detect_captures=derivative != "none" and grad_mode and not transformed,
    )


def _check_captures(problem: _Problem, z0: Tensor, inputs: Sequence[Tensor]) -> None:
    """Under a torch.func transform or forward-mode AD, raises if f reads a tracked tensor it is not given.

    The solve runs inside an autograd.Function, where such a tensor acts as a constant: its
    derivative would be dropped without a word. One evaluation of f on detached inputs tells. (On the
    plain reverse-mode path the forward's first evaluation tells instead, and the IFT serves it.)
    """
    from torch.autograd import forward_ad

    functorch = torch._C._functorch.maybe_current_level() is not None
    if not functorch and forward_ad._current_level < 0:
        return
    z, detached = z0.detach(), [i.detach() for i in inputs]
    probe = _bind(problem.f, detached, lambda bound: bound(z))
    if functorch and _depends_on_captures(probe, [z, *detached]):
        raise RuntimeError(_TRANSFORM_CAPTURE_MESSAGE)
    if forward_ad.unpack_dual(probe).tangent is not None:
        raise RuntimeError(_CAPTURE_MESSAGE.format(what="forward-mode derivatives"))


def _depends_on_captures(probe: Tensor, detached: Sequence[Tensor]) -> bool:
    """Whether ``probe``, f evaluated on ``detached`` inputs, carries anything a transform tracks.

    Detaching an input detaches it at every level of the transform stack, so every derivative the
    probe carries, at any level, comes from a tensor f captured: a ``requires_grad`` at some
    ``grad``/``vjp`` level or below all transforms (a plain autograd leaf read under ``vmap``, which a
    BatchedTensor's own ``requires_grad`` does not show), or a tangent at a ``jvp`` level. So is a
    batch dimension at a ``vmap`` level where no input has one (a captured mapped tensor).
    """
    from torch.autograd import forward_ad

    functorch = torch._C._functorch
    batched_levels = set()
    for tensor in detached:
        while functorch.is_functorch_wrapped_tensor(tensor):
            if functorch.is_batchedtensor(tensor):
                batched_levels.add(functorch.maybe_get_level(tensor))
            tensor = functorch.get_unwrapped(tensor)
    tensor = probe
    while True:
        if tensor.requires_grad or forward_ad.unpack_dual(tensor).tangent is not None:
            return True
        if not functorch.is_functorch_wrapped_tensor(tensor):
            return False
        if functorch.is_batchedtensor(tensor) and functorch.maybe_get_level(tensor) not in batched_levels:
            return True
        tensor = functorch.get_unwrapped(tensor)


def _captured_ift(problem: _Problem, out: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    """First-order IFT for an f that captures tensors requiring grad (they are not inputs).

    The captured tensors are reachable only through a recorded graph of f, so a hook on that graph
    replaces the incoming gradient v by the adjoint solution u, as a hand-written IFT does. That is
    exact to first order; higher orders and forward mode raise, since the hook cannot provide them.
    """
    from torch.autograd import forward_ad

    z_leaf = problem.z_best.detach().requires_grad_()
    with torch.enable_grad():
        carrier = _bind(problem.f, inputs, lambda f: f(z_leaf))
    if forward_ad.unpack_dual(carrier).tangent is not None:
        raise RuntimeError(_CAPTURE_MESSAGE.format(what="forward-mode derivatives"))

    def solve_adjoint(grad: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError(_CAPTURE_MESSAGE.format(what="higher-order derivatives (create_graph=True)"))
        return _adjoint_from_graph(problem, z_leaf, carrier, grad)

    hooked = carrier.view_as(carrier)  # on a view: the adjoint's VJPs start at carrier and skip the hook
    hooked.register_hook(solve_adjoint)
    return out.detach() + (hooked - hooked.detach())


_CAPTURE_MESSAGE = (
    "f reads tensors that require grad without receiving them as inputs (a closure); their exact "
    "first-order gradient is supported, {what} are not. Register them as parameters or buffers of the "
    "module, or pass them as inputs to implicit_fixed_point"
)
