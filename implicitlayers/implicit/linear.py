"""The linear equations of the derivatives: the adjoint u = g + J_zᵀ u and the tangent t = b + J_z t.

They are solved as fixed points by the same solvers as the forward equation, on plain tensors inside
the autograd Functions, with products of J_z taken through one recorded graph of f.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..solvers import Budget, Solver, Status
from .binding import bind
from .problem import ForwardRecord, Problem

__all__ = ["Adjoint", "adjoint_solution", "solve_linear", "tangent_solution"]


def solve_linear(
    problem: Problem,
    apply: Callable[[Tensor], Tensor],
    rhs: Tensor,
    solver: Solver,
    budget: Budget,
    start: Tensor | None = None,
    judged: bool = True,
) -> Tensor:
    """Solves x = rhs + M x from ``start`` (default ``rhs``); returns the image rhs + M x* of the best iterate.

    Args:
        problem: The call, whose ``on_backward`` hears of the solve.
        apply: x ↦ M x.
        rhs: The right-hand side.
        solver, budget: How the equation is solved.
        start: The initial guess.
        judged: Whether the solve is judged by ``budget``'s tolerance, or runs a chosen number of
            steps (SHINE's refinement): then running out of them is what was asked, and a sample that
            did is reported as :attr:`~implicitlayers.Status.budget`, not as a failure.
    """
    latest: dict[str, Tensor] = {}

    def linear_map(x: Tensor) -> Tensor:
        image = apply(x.to(rhs.dtype)).to(x.dtype) + rhs.to(x.dtype)
        latest["x"], latest["image"] = x, image
        return image

    # The rows of a linear solve are never compacted (its map is not f), and it is never compiled:
    # its products go through torch.autograd.grad on a recorded graph, which dynamo cannot trace.
    budget = budget.replace(compact_rows=False, compile_backend=None)
    result = solver.solve(linear_map, rhs if start is None else start.to(rhs.dtype), budget)
    if not judged:
        result.status = torch.where(result.status == Status.max_iter, int(Status.budget), result.status)
    if problem.on_backward is not None:
        problem.on_backward(result.detach())
    # As in the forward, the image of the best iterate is one step closer to the solution.
    same = latest["x"].device.type != "meta" and torch.equal(latest["x"], result.z)
    image = latest["image"] if same else linear_map(result.z)
    return image.to(rhs.dtype)


class Adjoint:
    """The first-order adjoint equation u = g + J_zᵀ u at the forward's solution z*.

    What a gradient mode's :meth:`~implicitlayers.Gradient.adjoint` receives: the incoming gradient
    g, products with J_zᵀ through one recorded graph of f (each a VJP), the forward solver's memory
    where it was kept, and a solver for the equation.

    Attributes:
        problem: The call of the primitive.
        record: What the forward solve learnt (``z_best``, ``estimate``).
        rhs: g, the gradient of the loss with respect to the layer's output f(z*).
    """

    def __init__(self, problem: Problem, record: ForwardRecord, z_leaf: Tensor, fz: Tensor, rhs: Tensor) -> None:
        self.problem = problem
        self.record = record
        self.rhs = rhs
        self._z_leaf = z_leaf
        self._fz = fz

    @property
    def depends_on_z(self) -> bool:
        """Whether f depends on z at all (if not, J_z = 0 and u = g)."""
        return self._fz.requires_grad

    def transposed_product(self, u: Tensor) -> Tensor:
        """J_z(z*)ᵀ u, one VJP through the recorded graph of f."""
        if not self.depends_on_z:
            return torch.zeros_like(u)
        (vjp,) = torch.autograd.grad(self._fz, self._z_leaf, u.to(self._fz.dtype), retain_graph=True, allow_unused=True)
        return torch.zeros_like(u) if vjp is None else vjp.to(u.dtype)

    def estimate(self) -> Tensor:
        """The forward solver's estimate of u, read from its memory (SHINE).

        Raises:
            RuntimeError: If the forward kept no memory (the gradient mode did not ask for it).
        """
        if self.record.estimate is None:
            raise RuntimeError("the forward solve kept no memory: the gradient mode must set needs_memory = True")
        return self.record.estimate(self.rhs)

    def solve(self, solver: Solver, budget: Budget, start: Tensor | None = None, judged: bool = True) -> Tensor:
        """u with u = g + J_zᵀ u, iterated by ``solver`` within ``budget`` from ``start`` (default g)."""
        if not self.depends_on_z:  # J = 0 (a copy: a Function may not return its input)
            return self.rhs.clone()
        return solve_linear(self.problem, self.transposed_product, self.rhs, solver, budget, start, judged)


def adjoint_solution(problem: Problem, z: Tensor, g: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    """u = g + J_z(z)ᵀ u with the IFT's linear solver, through one recorded graph of f."""
    solver, budget = problem.gradient.linear_settings(problem)

    def body(f: Callable[[Tensor], Tensor]) -> Tensor:
        with torch.enable_grad():
            z_leaf = z.detach().requires_grad_()
            fz = f(z_leaf)
        record = ForwardRecord(z.detach(), False, None)
        return Adjoint(problem, record, z_leaf, fz, g).solve(solver, budget)

    return bind(problem.f, [i.detach() for i in inputs], body)


def tangent_solution(problem: Problem, z: Tensor, b: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    """t = b + J_z(z) t. J t is the VJP of w ↦ J_zᵀ w, whose graph is recorded once for all steps."""
    solver, budget = problem.gradient.linear_settings(problem)

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

        return solve_linear(problem, product, b, solver, budget)

    return bind(problem.f, [i.detach() for i in inputs], body)
