"""Gradient modes: how a fixed point z* = f(z*, x) is differentiated.

The layers return f(z*), the image of the solver's fixed point z*, evaluated once with its graph
(``fz``, with input leaf ``z_leaf``). The functions here attach a gradient to that tensor without
changing its *value*, so a layer's output does not depend on the gradient mode, nor on train versus
eval. ``jfb`` needs nothing attached: the graph of ``fz`` already is its gradient.

| mode | gradient | backward cost |
| --- | --- | --- |
| `ift` | exact: solve u = v + J_fᵀ u, return (∂f/∂θ)ᵀ u, (∂f/∂x)ᵀ u | the graph of f(z*); a VJP per adjoint step |
| `phantom` | k damped steps from z*, differentiated | the graph of f(z*) and k - 1 more |
| `jfb` | one undamped step (phantom, k = 1, λ = 1) | the graph of f(z*), no solve |
| `unrolled` | autograd through the forward Picard iterations | one graph per iteration |
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .solvers import SolverResult, residual, solve

__all__ = ["GRADIENT_MODES", "LastEvaluation", "attach_ift", "attach_phantom", "unrolled_picard"]

GRADIENT_MODES = ("ift", "phantom", "jfb", "unrolled")
"""The accepted values of the layers' ``backward=`` argument."""


def _with_value(value: Tensor, carrier: Tensor) -> Tensor:
    """``value`` in the forward pass, ``carrier``'s gradient in the backward pass.

    ``carrier - carrier.detach()`` is exactly zero, so the sum is bit-identical to ``value``.
    """
    return value.detach() + (carrier - carrier.detach()).to(value.dtype)


def attach_ift(
    fz: Tensor,
    z_leaf: Tensor,
    *,
    solver: str,
    max_iter: int,
    tol: float,
    stop_mode: str = "rel",
    solver_options: dict | None = None,
    on_result: Callable[[SolverResult], None] | None = None,
) -> Tensor:
    """Implicit-function-theorem gradient of a fixed point.

    With z* = f(z*, x; θ) and an incoming gradient v = ∂L/∂z*, the IFT gives
    ∂L/∂θ = (∂f/∂θ)ᵀ u where u solves u = v + J_f(z*)ᵀ u. In the backward pass a tensor hook on ``fz``
    replaces v by u, found by ``solver`` using vector-Jacobian products (:func:`torch.autograd.grad`)
    on the graph of ``fz``, and autograd then carries u into θ and x. Memory does not depend on how
    many iterations the forward solve took. Since f(z*) = z* at the fixed point, the same gradient
    serves the output f(z*).

    Args:
        fz: f(z_leaf), recorded by autograd, shape ``(B, ...)``.
        z_leaf: The fixed point as a leaf that requires grad.
        solver: Solver name for the adjoint fixed point (see :func:`implicitlayers.available_solvers`).
        max_iter: Evaluations (VJPs) allowed in the backward solve.
        tol: Tolerance of the backward solve.
        stop_mode: ``"rel"`` or ``"abs"``.
        solver_options: Extra options for the backward solver.
        on_result: Called with the backward :class:`SolverResult` (for statistics and warnings).

    Returns:
        ``fz``'s value, whose gradient is the IFT gradient.

    Raises:
        ValueError: If ``z_leaf`` does not require grad.
    """
    if not z_leaf.requires_grad:
        raise ValueError("z_leaf must require grad: the adjoint solve takes vector-Jacobian products in z")

    def solve_adjoint(grad: Tensor) -> Tensor:
        def adjoint_map(u: Tensor) -> Tensor:
            (vjp,) = torch.autograd.grad(fz, z_leaf, u.to(fz.dtype), retain_graph=True)
            return vjp.to(u.dtype) + grad.to(u.dtype)

        # As in the forward, return the image v + Jᵀu* of the best iterate: computed anyway, and one
        # step closer to the solution.
        recorded = LastEvaluation(adjoint_map, graph=False, input_grad=False)
        result = solve(
            recorded, grad, solver=solver, max_iter=max_iter, tol=tol, stop_mode=stop_mode, **(solver_options or {})
        )
        if on_result is not None:
            on_result(result)
        return recorded.at(result.z)[1].to(grad.dtype)

    # The hook goes on a view: the adjoint's VJPs start from fz itself and must not trigger it.
    out = fz.view_as(fz)
    out.register_hook(solve_adjoint)
    return out


def attach_phantom(
    f: Callable[[Tensor], Tensor], z_leaf: Tensor, fz: Tensor, *, steps: int = 1, damping: float = 1.0
) -> Tensor:
    """Phantom gradient (Geng et al., 2021): differentiate ``steps`` damped iterations from z*.

    z_0 = z* (detached), z_{k+1} = (1 - λ) z_k + λ f(z_k, x); the gradient is that of z_steps, whose
    first step reuses ``fz`` = f(z*). As ``steps`` grows (and λ suits the map) it approaches the IFT
    gradient; ``steps=1, damping=1`` is Jacobian-free backpropagation (Fung et al., 2022).

    Args:
        f: z ↦ f(z, x), recording autograd.
        z_leaf: z*, detached.
        fz: f(z_leaf), recorded by autograd.
        steps: Damped steps differentiated (>= 1).
        damping: λ in (0, 1].

    Returns:
        A tensor equal to ``fz`` carrying the phantom gradient.
    """
    z = z_leaf.detach()
    z = z + damping * (fz - z)
    for _ in range(steps - 1):
        z = z + damping * (f(z) - z)
    return _with_value(fz, z)


def unrolled_picard(
    f: Callable[[Tensor], Tensor], z0: Tensor, *, max_iter: int, tol: float, stop_mode: str = "rel"
) -> tuple[Tensor, SolverResult]:
    """Picard iteration recorded by autograd: z_{k+1} = f(z_k), at most ``max_iter`` steps.

    With ``tol=0`` exactly ``max_iter`` steps run (the truncated iteration of the reference iMixer);
    otherwise a sample stops after the step from an iterate whose residual is at most ``tol``. Memory
    grows linearly with the steps taken. A sample whose step turns non-finite keeps its last finite
    iterate.

    Returns:
        ``(z, result)``: z carries the unrolled gradient; in ``result``, ``nstep`` counts the steps and
        ``residual`` is that of the last iterate fed to f (so it describes z_{n-1}, one step behind z).
    """
    batch = z0.shape[0]
    device = z0.device
    active = torch.ones(batch, dtype=torch.bool, device=device)
    nstep = torch.zeros(batch, dtype=torch.long, device=device)
    last_residual = torch.full((batch,), math.inf, device=device)
    trace = []
    z = z0
    for _ in range(max_iter):
        fz = f(z)
        if fz.shape != z.shape:
            raise ValueError(f"f(z0) has shape {tuple(fz.shape)} but z0 has shape {tuple(z.shape)}")
        with torch.no_grad():
            res = residual(z, fz, stop_mode).float()
            # As in the solvers' driver: a non-finite f(z) or z makes the residual inf or NaN.
            finite = res < math.inf
            step = active & finite
            nstep += active.long()
            last_residual = torch.where(step, res, last_residual)
            trace.append(last_residual.max() if batch else res.new_zeros(()))
        z = torch.where(step.view(-1, *([1] * (z.dim() - 1))), fz.to(z.dtype), z)
        # tol = 0 means "exactly max_iter steps", even where an iterate is already a fixed point.
        active = step & (res > tol) if tol > 0 else step
        if not bool(active.any()):
            break
    result = SolverResult(
        z=z.detach(),
        nstep=nstep,
        residual=last_residual,
        converged=last_residual <= tol,
        trace=torch.stack(trace),
    )
    return z, result


class LastEvaluation:
    """``f`` that remembers its latest input and output, with the output's graph when asked.

    Solvers evaluate f at the iterate they return (to measure its residual), so the layer can reuse
    that evaluation, graph included, instead of evaluating f once more for the output and gradient.

    Args:
        f: z ↦ f(z, x).
        graph: Record autograd in every evaluation (only the latest graph is kept alive).
        input_grad: Make each input a leaf that requires grad (the IFT adjoint needs VJPs in z).
    """

    def __init__(self, f: Callable[[Tensor], Tensor], *, graph: bool, input_grad: bool) -> None:
        self.f = f
        self.graph = graph
        self.input_grad = input_grad
        self.z: Tensor | None = None
        self.fz: Tensor | None = None

    def __call__(self, z: Tensor) -> Tensor:
        return self._evaluate(z)[1]

    def at(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(z_leaf, f(z_leaf))`` at ``z``: the latest evaluation if it was at exactly ``z``, else a new one."""
        if self.z is not None and self.fz is not None and self.z.shape == z.shape and torch.equal(self.z.detach(), z):
            return self.z, self.fz
        return self._evaluate(z)

    def _evaluate(self, z: Tensor) -> tuple[Tensor, Tensor]:
        self.z = self.fz = None  # release the previous graph before building the next
        with torch.set_grad_enabled(self.graph):
            z = z.detach().requires_grad_(self.input_grad)
            fz = self.f(z)
        self.z, self.fz = z, fz
        return z, fz
