"""The Jacobian J_f(z) of a fixed-point map, per sample: its Frobenius norm and its spectral radius.

Both keep a DEQ healthy. The spectral radius ρ(J_f(z*)) is the local contraction rate, so it sets
how many iterations a solve takes and whether it converges at all. Bai et al. (2021), "Stabilizing
Equilibrium Models by Jacobian Regularization", penalise ‖J_f(z*)‖_F², an upper bound on ρ², during
training so that iteration counts stay flat.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .errors import check_int_at_least

__all__ = ["jacobian_penalty", "spectral_radius"]


def _gaussian_like(t: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(t.shape, generator=generator, dtype=t.dtype, device="cpu").to(t.device)


def jacobian_penalty(
    f: Callable[[Tensor], Tensor], z: Tensor, samples: int = 1, generator: torch.Generator | None = None
) -> Tensor:
    """Per-sample Hutchinson estimate of ‖J_f(z)‖_F² / dim, differentiable.

    With v ~ N(0, I), E‖vᵀ J‖² = tr(J Jᵀ) = ‖J‖_F²; each sample costs one vector-Jacobian product,
    whose graph is kept so that the estimate can be added to a loss (Bai et al., 2021). The VJPs are
    :func:`torch.func.vjp`, so the penalty also works inside torch.func transforms.

    Examples:
        >>> import torch, implicitlayers as il
        >>> w = 0.5 * torch.eye(3)
        >>> penalty = il.jacobian_penalty(lambda z: z @ w.T, torch.randn(4, 3), samples=64)
        >>> penalty.shape  # ≈ 0.25 each: ||0.5 I||_F² / 3
        torch.Size([4])

    Args:
        f: z ↦ f(z), shape ``(B, ...)`` to the same; sample b of the output may depend only on sample b.
        z: Where the Jacobian is taken (a fixed point, typically), shape ``(B, ...)``. It is treated
            as a constant: the penalty is differentiated through f's parameters and inputs.
        samples: Hutchinson vectors averaged (>= 1).
        generator: Random source for the vectors.

    Returns:
        The estimates, shape ``(B,)``.
    """
    check_int_at_least("samples", samples)
    z = z.detach()
    fz, pull = torch.func.vjp(f, z)
    total = fz.new_zeros(z.shape[0])
    for _ in range(samples):
        (vjp,) = pull(_gaussian_like(fz, generator))
        total = total + vjp.reshape(z.shape[0], -1).square().sum(dim=1)
    return total / (samples * math.prod(z.shape[1:]))


@torch.no_grad()
def spectral_radius(
    f: Callable[[Tensor], Tensor], z: Tensor, iters: int = 20, generator: torch.Generator | None = None
) -> Tensor:
    """Per-sample power-iteration estimate of ρ(J_f(z)), the local contraction rate at z.

    Iterates v ← Jᵀv / ‖Jᵀv‖ (Jᵀ has J's eigenvalues) with vector-Jacobian products through one graph
    of f, and returns the geometric mean of the last two growth factors ‖Jᵀv‖, which is exact in the
    limit when the dominant eigenvalue is real (for example when J is similar to a symmetric matrix,
    as for tanh(Wz + x) with symmetric W) and steadies the estimate of a dominant complex pair.
    Not differentiable: a diagnostic.

    Args:
        f: z ↦ f(z), sample-wise as in :func:`jacobian_penalty`.
        z: Where the Jacobian is taken, shape ``(B, ...)``.
        iters: Power-iteration steps (>= 2).
        generator: Random source for the starting vectors.

    Returns:
        The estimates, shape ``(B,)``.
    """
    check_int_at_least("iters", iters, 2)
    with torch.enable_grad():
        z_leaf = z.detach().requires_grad_()
        fz = f(z_leaf)
    if not fz.requires_grad:  # f does not depend on z
        return fz.new_zeros(z.shape[0])
    batch = z.shape[0]
    v = _gaussian_like(fz, generator)
    v = v / v.reshape(batch, -1).norm(dim=1).clamp_min(1e-30).reshape(batch, *([1] * (v.dim() - 1)))
    factors = []
    for _ in range(iters):
        (w,) = torch.autograd.grad(fz, z_leaf, v, retain_graph=True, allow_unused=True)
        w = torch.zeros_like(v) if w is None else w
        norm = w.reshape(batch, -1).norm(dim=1)
        factors.append(norm)
        v = w / norm.clamp_min(1e-30).reshape(batch, *([1] * (w.dim() - 1)))
    return (factors[-1] * factors[-2]).sqrt()
