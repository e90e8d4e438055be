"""Differentiating explicit steps of f instead of the fixed point: phantom steps and the unrolled loop."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..solvers import Budget, SolverResult, Status
from ..solvers.norms import measure, residual
from .problem import is_transformed

__all__ = ["phantom_steps", "unrolled_picard"]


def _with_value(value: Tensor, carrier: Tensor) -> Tensor:
    """``value`` in the forward pass, ``carrier``'s derivative in every differentiation.

    ``carrier - carrier.detach()`` is exactly zero, so the sum is bit-identical to ``value``.
    """
    return value.detach() + (carrier - carrier.detach()).to(value.dtype)


def phantom_steps(f: Callable[[Tensor], Tensor], z_star: Tensor, *, steps: int = 1, damping: float = 1.0) -> Tensor:
    """Phantom gradient (Geng et al., 2021): the value f(z*), the derivative of k damped steps from z*.

    z_0 = z* (no derivative), z_{k+1} = (1 - λ) z_k + λ f(z_k). As ``steps`` grows (and λ suits the
    map) the derivative approaches the IFT's; ``steps=1, damping=1`` is Jacobian-free backpropagation
    (Fung et al., 2022), whose output simply is f(z*).

    Args:
        f: z ↦ f(z, x), recording autograd.
        z_star: The solver's iterate, carrying no derivative.
        steps: Damped steps differentiated (>= 1).
        damping: λ in (0, 1].

    Returns:
        A tensor equal to f(z*) carrying the phantom derivative.
    """
    image = f(z_star)
    if steps == 1 and damping == 1.0:
        return image
    z = z_star + damping * (image.to(z_star.dtype) - z_star)
    for _ in range(steps - 1):
        z = z + damping * (f(z).to(z.dtype) - z)
    return _with_value(image, z)


def _safe_measure(z: Tensor, fz: Tensor, stop_mode: str) -> tuple[Tensor, Tensor]:
    """``(residual, finite)`` per sample, free of overflow and underflow (see :func:`residual`)."""
    finite = torch.isfinite(fz.reshape(fz.shape[0], -1)).all(dim=1)
    res = residual(z, torch.where(finite.view(-1, *([1] * (z.dim() - 1))), fz, z), stop_mode)
    return res.to(torch.promote_types(z.dtype, torch.float32)), finite


def unrolled_picard(f: Callable[[Tensor], Tensor], z0: Tensor, budget: Budget) -> tuple[Tensor, SolverResult | None]:
    """Picard iteration recorded by autograd: z_{k+1} = f(z_k), at most ``budget.max_iter`` steps.

    With ``tol=0`` exactly ``max_iter`` steps run (the truncated iteration of the reference iMixer):
    no data-dependent control flow, so every ``torch.func`` transform applies. Otherwise a sample
    stops after the step from an iterate whose residual is at most ``tol``. Memory grows linearly
    with the steps taken. A sample whose step turns non-finite keeps its last finite iterate.

    Returns:
        ``(z, result)``: z carries the unrolled derivative; in ``result``, ``nstep`` counts the steps
        and ``residual`` is that of the last iterate fed to f (so it describes z_{n-1}, one step
        behind z). ``result`` is None under a torch.func transform, whose tensors cannot be kept.

    Raises:
        RuntimeError: For ``tol > 0`` under ``torch.func.vmap``, which cannot stop samples one by one.
    """
    max_iter, tol, stop_mode = budget.max_iter, budget.tol, budget.stop_mode
    transformed = is_transformed(z0)
    if transformed and tol > 0 and torch._C._functorch.is_batchedtensor(z0):
        raise RuntimeError(
            "backward=il.Unrolled() with tol > 0 stops each sample when it converges, which torch.func.vmap "
            "cannot trace; use tol=0 (exactly max_iter steps) or backward=il.IFT()"
        )
    batch = z0.shape[0]
    device = z0.device
    active = torch.ones(batch, dtype=torch.bool, device=device)
    nstep = torch.zeros(batch, dtype=torch.long, device=device)
    nonfinite = torch.zeros(batch, dtype=torch.bool, device=device)
    last_residual = torch.full((batch,), math.inf, dtype=torch.promote_types(z0.dtype, torch.float32), device=device)
    trace = []
    z = z0
    for _ in range(max_iter):
        fz = f(z)
        if fz.shape != z.shape:
            raise ValueError(f"f(z0) has shape {tuple(fz.shape)} but z0 has shape {tuple(z.shape)}")
        with torch.no_grad():
            # As in the solvers' driver: a non-finite f(z), or a norm that overflowed, is not usable
            # (an overflowed ||f(z)|| would make the relative residual read 0, "converged").
            # With tol > 0 the residual stops samples: measure it overflow- and underflow-safe. With
            # tol = 0 it is a diagnostic only, measured in one plain pass.
            res, finite = measure(z, fz, stop_mode) if tol == 0 else _safe_measure(z, fz, stop_mode)
            step = active & finite
            nonfinite = nonfinite | (active & ~finite)
            nstep = nstep + active.long()  # out of place: under vmap, active may be batched
            last_residual = torch.where(step, res, last_residual)
            trace.append(last_residual.max() if batch else res.new_zeros(()))
        z = torch.where(step.view(-1, *([1] * (z.dim() - 1))), fz.to(z.dtype), z)
        # tol = 0 means "exactly max_iter steps", even where an iterate is already a fixed point.
        active = step & (res > tol) if tol > 0 else step
        if z.device.type == "meta":  # shapes only: one step has the shapes of them all
            break
        if tol > 0 and not bool(active.any()):
            break
    if transformed or is_transformed(z):
        return z, None
    converged = last_residual <= tol
    status = torch.where(converged, int(Status.converged), int(Status.budget if tol == 0 else Status.max_iter))
    status = torch.where(nonfinite, int(Status.non_finite), status)
    result = SolverResult(
        z=z.detach(), nstep=nstep, residual=last_residual, converged=converged, trace=torch.stack(trace), status=status
    )
    result.budget = budget
    return z, result
