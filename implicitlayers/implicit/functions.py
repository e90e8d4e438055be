"""The three ``torch.autograd.Function`` s of the primitive: the forward solve, the adjoint solve, the tangent solve.

Each one's derivatives are written with the others' (the adjoint solve's VJP is a tangent solve and
vice versa), with every explicit derivative of f taken by :mod:`torch.func` on the pure function
``f(z, *inputs)``. How the fixed point itself is differentiated is the gradient mode's business:
:class:`FixedPoint` asks ``problem.gradient`` for the first-order adjoint, the general VJP and the JVP.

On the plain first-order path (``loss.backward()``, no transforms) the forward solve records the
graph of its last evaluation of f and the backward reuses it, so the common case costs what a
hand-written IFT hook costs: no extra evaluation of f.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .binding import bind
from .captures import checked
from .derivatives import jacobian_product, second_order_jvp, second_order_vjp, transposed_jacobian_product
from .linear import Adjoint, adjoint_solution, tangent_solution
from .problem import ForwardRecord, Problem, is_transformed
from .vmap import unbatch_legacy, vmap_rule

__all__ = ["AdjointSolve", "FixedPoint", "TangentSolve"]


class FixedPoint(torch.autograd.Function):
    """``(z0, *inputs) ↦ f(z*)`` where z* = f(z*, *inputs); derivatives from ``problem.gradient``.

    A gradient mode that differentiates nothing (``differentiates = False``) gets z* itself, for
    modes that differentiate explicit steps from it.
    """

    @staticmethod
    def per_sample(problem: Problem) -> tuple[bool, ...]:
        return (True, *problem.per_sample)

    @staticmethod
    def forward(problem: Problem, z0: Tensor, *inputs: Tensor) -> Tensor:
        leaves = _forward_inputs(problem, inputs)
        return bind(problem.f, leaves, lambda f: _forward_solve(problem, f, z0, leaves))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        problem, _, *tensors = inputs
        ctx.problem = problem
        ctx.record = problem.outbox.record
        ctx.graph, problem.outbox.graph = problem.outbox.graph, None
        ctx.save_for_backward(output, *tensors)
        ctx.save_for_forward(output, *tensors)

    @staticmethod
    @unbatch_legacy
    def backward(ctx, grad: Tensor):
        problem: Problem = ctx.problem
        needed = ctx.needs_input_grad[2:]
        if not problem.gradient.differentiates:
            return (None, None, *[None] * len(needed))
        z, *inputs = ctx.saved_tensors
        if not torch.is_grad_enabled() and not is_transformed(grad):
            # First order, plain autograd: through the forward's recorded graph (which serves one
            # backward), or a graph recorded the same way, so that repeated backwards agree bitwise.
            graph, ctx.graph = ctx.graph, None
            graph = graph or _record_graph(problem, ctx.record.z_best, inputs)
            return (None, None, *_backward_through_graph(problem, ctx.record, graph, grad, needed))
        return (None, None, *problem.gradient.vjp(problem, z, inputs, grad, needed))

    @staticmethod
    def jvp(ctx, _problem, z0_tangent, *input_tangents):
        problem: Problem = ctx.problem
        z, *inputs = ctx.saved_tensors
        if not problem.gradient.differentiates:
            return torch.zeros_like(z)  # z here is the iterate, the output
        return problem.gradient.jvp(problem, z, inputs, input_tangents)

    @staticmethod
    def vmap(info, in_dims, problem, *args):
        return vmap_rule(FixedPoint, info, in_dims, problem, *args)


class _LinearSolve(torch.autograd.Function):
    """``(z, rhs, *inputs) ↦ x`` with x = rhs + M x: M = J_zᵀ (adjoint) or J_z (tangent), A = I - J_z.

    The two are each other's derivative. For the adjoint u = A⁻ᵀ g and a cotangent w, with t = A⁻¹ w:
    ḡ = t and (z̄, θ̄) = ∂/∂(z, θ) ⟨u, J_z t⟩. For the tangent t = A⁻¹ b, with s = A⁻ᵀ w: b̄ = s and
    (z̄, θ̄) = ∂/∂(z, θ) ⟨s, J_z t⟩. Forward mode differentiates the equation itself: ẋ solves the
    same system with right-hand side ṙhs + (∂(M x)/∂(z, θ)) · (ż, θ̇). The equations are solved
    with the gradient mode's ``linear_settings`` (the IFT's solver and budget).
    """

    transposed: bool  # adjoint (J_zᵀ) or tangent (J_z)

    @staticmethod
    def per_sample(problem: Problem) -> tuple[bool, ...]:
        return (True, True, *problem.per_sample)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.problem, z, _, *tensors = inputs
        ctx.save_for_backward(z, output, *tensors)
        ctx.save_for_forward(z, output, *tensors)


def _linear_backward(ctx, w: Tensor, transposed: bool) -> tuple:
    problem: Problem = ctx.problem
    z, x, *inputs = ctx.saved_tensors
    y = (TangentSolve if transposed else AdjointSolve).apply(problem, z, w, *inputs)
    adjoint_side, tangent_side = (x, y) if transposed else (y, x)
    needed = (ctx.needs_input_grad[1], *ctx.needs_input_grad[3:])
    grad_z, grads = second_order_vjp(problem.f, adjoint_side, tangent_side, z, inputs, needed)
    return (None, grad_z, y, *grads)


def _linear_jvp(ctx, function: type[_LinearSolve], z_tangent, rhs_tangent, input_tangents) -> Tensor:
    problem: Problem = ctx.problem
    z, x, *inputs = ctx.saved_tensors
    product = (transposed_jacobian_product if function.transposed else jacobian_product)(problem.f, x)
    moved = second_order_jvp(product, z, inputs, z_tangent, input_tangents)
    rhs = moved if rhs_tangent is None else moved + rhs_tangent
    return function.apply(problem, z, rhs, *inputs)


class AdjointSolve(_LinearSolve):
    """``(z, g, *inputs) ↦ u`` with u = g + J_z(z, inputs)ᵀ u."""

    transposed = True

    @staticmethod
    def forward(problem: Problem, z: Tensor, g: Tensor, *inputs: Tensor) -> Tensor:
        return adjoint_solution(problem, z, g, inputs)

    @staticmethod
    @unbatch_legacy
    def backward(ctx, w: Tensor):
        return _linear_backward(ctx, w, transposed=True)

    @staticmethod
    def jvp(ctx, _problem, z_tangent, g_tangent, *input_tangents):
        return _linear_jvp(ctx, AdjointSolve, z_tangent, g_tangent, input_tangents)

    @staticmethod
    def vmap(info, in_dims, problem, *args):
        return vmap_rule(AdjointSolve, info, in_dims, problem, *args)


class TangentSolve(_LinearSolve):
    """``(z, b, *inputs) ↦ t`` with t = b + J_z(z, inputs) t."""

    transposed = False

    @staticmethod
    def forward(problem: Problem, z: Tensor, b: Tensor, *inputs: Tensor) -> Tensor:
        return tangent_solution(problem, z, b, inputs)

    @staticmethod
    @unbatch_legacy
    def backward(ctx, w: Tensor):
        return _linear_backward(ctx, w, transposed=False)

    @staticmethod
    def jvp(ctx, _problem, z_tangent, b_tangent, *input_tangents):
        return _linear_jvp(ctx, TangentSolve, z_tangent, b_tangent, input_tangents)

    @staticmethod
    def vmap(info, in_dims, problem, *args):
        return vmap_rule(TangentSolve, info, in_dims, problem, *args)


# ---------------------------------------------------------------------------------------------
# The forward solve and the first-order backward through its recorded graph.
# ---------------------------------------------------------------------------------------------


def _forward_inputs(problem: Problem, inputs: Sequence[Tensor]) -> list[Tensor]:
    """The inputs f sees during the solve: leaves of a private graph when one is recorded."""
    if not problem.record_graph:
        return list(inputs)
    return [i.detach().requires_grad_(i.requires_grad) for i in inputs]


def _forward_solve(problem: Problem, f: Callable[..., Tensor], z0: Tensor, leaves: list[Tensor]) -> Tensor:
    probe = None
    if problem.detect_captures:
        detached = [i.detach() for i in leaves]
        probe = lambda z: problem.f(z, *detached)  # noqa: E731
    rows = None
    if problem.budget.compact_rows:

        def rows(z_rows: Tensor, index: Tensor) -> Tensor:
            chosen = [
                t.index_select(0, index) if each else t for t, each in zip(leaves, problem.per_sample, strict=True)
            ]
            return f(z_rows, *chosen)

    recorded = _LastEvaluation(f, graph=problem.record_graph, probe=probe, rows=rows)
    gradient = problem.gradient
    result = problem.solver.solve(recorded, z0.detach(), problem.budget, keep_memory=gradient.needs_memory)
    z_leaf, fz = recorded.at(result.z.to(z0.dtype))
    if gradient.needs_memory and result.adjoint_estimate is None:
        raise ValueError(gradient.memory_message(problem.solver))
    problem.outbox.record = ForwardRecord(z_leaf.detach(), recorded.captures, result.adjoint_estimate)
    if problem.record_graph and fz.requires_grad:
        problem.outbox.graph = (z_leaf, leaves, fz)
    if problem.on_forward is not None:
        problem.on_forward(result.detach())
    # A solve without derivative returns the iterate itself: the caller differentiates steps from it.
    return z_leaf.detach() if not gradient.differentiates else fz.detach()


def _record_graph(problem: Problem, z: Tensor, inputs: Sequence[Tensor]):
    """``(z_leaf, leaves, f(z_leaf, *leaves))`` with grad, on detached copies of ``z`` and ``inputs``."""
    leaves = [i.detach().requires_grad_(i.requires_grad) for i in inputs]

    def body(f: Callable[[Tensor], Tensor]):
        with torch.enable_grad():
            z_leaf = z.detach().requires_grad_()
            return z_leaf, leaves, f(z_leaf)

    return bind(problem.f, leaves, body)


def _backward_through_graph(
    problem: Problem, record: ForwardRecord, graph, grad: Tensor, needed: Sequence[bool]
) -> list[Tensor | None]:
    """First-order backward through the forward's recorded graph: the mode's adjoint, then one VJP."""
    z_leaf, leaves, fz = graph
    u = problem.gradient.adjoint(Adjoint(problem, record, z_leaf, fz, grad))
    wanted = [i for i, (leaf, need) in enumerate(zip(leaves, needed, strict=True)) if need and leaf.requires_grad]
    grads: list[Tensor | None] = [None] * len(needed)
    if wanted and fz.requires_grad:
        found = torch.autograd.grad(fz, [leaves[i] for i in wanted], u.to(fz.dtype), allow_unused=True)
        for i, g in zip(wanted, found, strict=True):
            grads[i] = g
    return grads


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
            return checked(self._f_rows(z_rows.detach(), index))

    def untracked(self, z: Tensor) -> Tensor:
        """f without a graph and without being kept: the evaluations between synchronisations.

        The driver calls it in chunks it may compile (Budget.compile_backend); the output's graph comes
        from an evaluation at a synchronisation, or one more at the returned iterate.
        """
        self.z = self.fz = None
        with torch.no_grad():
            return self.f(z.detach())

    def __call__(self, z: Tensor) -> Tensor:
        if self.probe is not None:
            probe, self.probe = self.probe, None
            with torch.enable_grad():
                fz = checked(probe(z.detach()))
            self.captures = fz.requires_grad
            return fz.detach()  # not kept as the latest evaluation: it has no graph of the inputs
        return self._evaluate(z)[1]

    def at(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(z_leaf, f(z_leaf))`` at ``z``: the latest evaluation if it was at exactly ``z``."""
        latest = self.z
        known = latest is not None and self.fz is not None and latest.device.type != "meta"
        if known and latest.shape == z.shape and torch.equal(latest.detach(), z):
            return latest, self.fz
        return self._evaluate(z)

    def _evaluate(self, z: Tensor) -> tuple[Tensor, Tensor]:
        self.z = self.fz = None  # release the previous graph before building the next
        with torch.set_grad_enabled(self.graph):
            z = z.detach().requires_grad_(self.graph)
            fz = checked(self.f(z))
        self.z, self.fz = z, fz
        return z, fz
