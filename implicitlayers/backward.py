"""Gradient modes: how a fixed point z* = f(z*, x) is differentiated.

Every function here takes ``f``, a closure z ↦ f(z, x) that records autograd, and returns a tensor
whose *value* is the solver's z* but whose gradient follows the chosen mode. Keeping the value fixed
means a layer's output does not depend on the gradient mode, nor on train versus eval.

| mode | gradient | backward cost |
| --- | --- | --- |
| `ift` | exact: solve u = v + J_fᵀ u, return (∂f/∂θ)ᵀ u, (∂f/∂x)ᵀ u | one graph of f; a VJP per adjoint step |
| `phantom` | k damped steps from z*, differentiated | k graphs of f |
| `jfb` | one undamped step (phantom, k = 1, λ = 1) | one graph of f, no solve |
| `unrolled` | autograd through the forward Picard iterations | one graph per iteration |
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .solvers import SolverResult, residual, solve

__all__ = ["GRADIENT_MODES", "attach_ift", "attach_phantom", "unrolled_picard"]

GRADIENT_MODES = ("ift", "phantom", "jfb", "unrolled")
"""The accepted values of the layers' ``backward=`` argument."""


def _with_value(value: Tensor, carrier: Tensor) -> Tensor:
    """``value`` in the forward pass, ``carrier``'s gradient in the backward pass.

    ``carrier - carrier.detach()`` is exactly zero, so the sum is bit-identical to ``value``.
    """
    return value.detach() + (carrier - carrier.detach()).to(value.dtype)


def attach_ift(
    f: Callable[[Tensor], Tensor],
    z_star: Tensor,
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
    ∂L/∂θ = (∂f/∂θ)ᵀ u where u solves u = v + J_f(z*)ᵀ u. One graph of f at z* is recorded; in the
    backward pass a tensor hook replaces v by u, found by ``solver`` using vector-Jacobian products
    (:func:`torch.autograd.grad`) on that graph, and autograd then carries u into θ and x. Memory does
    not depend on how many iterations the forward solve took.

    Args:
        f: z ↦ f(z, x), recording autograd.
        z_star: The fixed point, shape ``(B, ...)``.
        solver: Solver name for the adjoint fixed point (see :func:`implicitlayers.available_solvers`).
        max_iter: Evaluations (VJPs) allowed in the backward solve.
        tol: Tolerance of the backward solve.
        stop_mode: ``"rel"`` or ``"abs"``.
        solver_options: Extra options for the backward solver.
        on_result: Called with the backward :class:`SolverResult` (for statistics and warnings).

    Returns:
        A tensor equal to ``z_star`` whose gradient is the IFT gradient.
    """
    z_leaf = z_star.detach().requires_grad_()
    fz = f(z_leaf)
    # The VJPs of the adjoint solve run backward through fz itself, which fires this same hook; those
    # inner calls must pass through untouched (one graph serves both, saving an evaluation of f).
    solving = False

    def solve_adjoint(grad: Tensor) -> Tensor:
        nonlocal solving
        if solving:
            return grad

        def adjoint_map(u: Tensor) -> Tensor:
            (vjp,) = torch.autograd.grad(fz, z_leaf, u.to(fz.dtype), retain_graph=True)
            return vjp.to(u.dtype) + grad.to(u.dtype)

        solving = True
        try:
            result = solve(
                adjoint_map,
                grad,
                solver=solver,
                max_iter=max_iter,
                tol=tol,
                stop_mode=stop_mode,
                **(solver_options or {}),
            )
        finally:
            solving = False
        if on_result is not None:
            on_result(result)
        return result.z.to(grad.dtype)

    fz.register_hook(solve_adjoint)
    return _with_value(z_star, fz)


def attach_phantom(f: Callable[[Tensor], Tensor], z_star: Tensor, *, steps: int = 1, damping: float = 1.0) -> Tensor:
    """Phantom gradient (Geng et al., 2021): differentiate ``steps`` damped iterations from z*.

    z_0 = z* (detached), z_{k+1} = (1 - λ) z_k + λ f(z_k, x); the gradient is that of z_steps. As
    ``steps`` grows (and λ suits the map) it approaches the IFT gradient; ``steps=1, damping=1`` is
    Jacobian-free backpropagation (Fung et al., 2022).

    Returns:
        A tensor equal to ``z_star`` carrying the phantom gradient.
    """
    z = z_star.detach()
    for _ in range(steps):
        z = z + damping * (f(z) - z)
    return _with_value(z_star, z)


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
            finite = torch.isfinite(fz).flatten(1).all(dim=1) & torch.isfinite(res)
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
