"""The Jacobian J_f(z) of a fixed-point map, per sample: its Frobenius norm and its spectral radius.

Both keep a DEQ healthy. The spectral radius ρ(J_f(z*)) = max |λ(J_f(z*))| is the asymptotic rate of
plain fixed-point iteration near z*: after m steps its error is at most C_ε (ρ + ε)ᵐ for any ε > 0
(Gelfand's formula), with a constant C_ε that grows with the non-normality of J; the iteration
converges locally when ρ < 1 and generically diverges when ρ > 1. It is not a per-step rate: one
step can expand an error by up to ‖J‖₂ >= ρ when J is not normal. So ρ sets how many iterations
plain iteration needs near z* (accelerated solvers need fewer). Bai et al. (2021), "Stabilizing
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

# The seed of the start vectors of spectral_radius when no generator is given: repeated calls on the
# same input return the same numbers, and the global random state is left alone.
_DEFAULT_SEED = 0
# A Krylov step whose new direction, after orthogonalisation, is at most this many units of rounding
# of the largest ‖Jᵀq‖ seen is a breakdown: the space is invariant up to rounding (J = 0, low rank,
# nilpotent), and dropping that direction perturbs J by no more than rounding already does.
_BREAKDOWN_ULPS = 8


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
        generator: Random source for the vectors: ``samples`` draws, in order, of
            ``torch.randn(f(z).shape, generator=generator, dtype=f(z).dtype)`` (on the CPU), so a
            seeded generator makes the estimate a deterministic function of f and z.

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
    """Per-sample spectral radius ρ(J_f(z)) = max |λ(J_f(z))|, by the Arnoldi method.

    ρ is the asymptotic convergence rate of the fixed-point iteration near z (see the module
    docstring: not a per-step rate when J is not normal). For each sample, k = min(``iters``, dim)
    Arnoldi steps build an orthonormal basis Q of the Krylov space span{v, Jᵀv, ..., (Jᵀ)^(k-1) v}
    (Jᵀ has J's eigenvalues) with vector-Jacobian products through one recorded graph of f, classical
    Gram–Schmidt applied twice; the estimate is the largest magnitude of the eigenvalues (Ritz
    values) of the k × k Hessenberg matrix H = Qᵀ Jᵀ Q, computed in float64. Not differentiable: a
    diagnostic.

    Accuracy:

    * ``iters >= dim``, or a Krylov space that becomes invariant earlier (J = 0, low rank,
      nilpotent, few distinct eigenvalues): H holds every distinct eigenvalue of J (with probability
      one over the random start), so the result is exact up to rounding: the spectral radius of a
      matrix within a small multiple of ε‖J‖ of J, ε the unit roundoff of f's precision. Like
      :func:`torch.linalg.eigvals` it is then as accurate as the eigenvalue problem is well
      conditioned: a defective eigenvalue (a Jordan block of size m, as in a nilpotent J) moves by
      up to about ε^(1/m)‖J‖.
    * ``iters < dim``: the Ritz values lie in the field of values {xᴴJx : ‖x‖ = 1}, so the estimate
      never exceeds the numerical radius, which is at most ‖J‖₂. For a normal J (symmetric, say)
      they lie in the convex hull of the eigenvalues: the estimate is at most ρ and approaches it
      from below as k grows, outermost well-separated eigenvalues first. For a non-normal J it may lie
      above or below ρ and nothing bounds its error a priori; use ``iters >= dim`` when the exact
      value matters.

    Costs k vector-Jacobian products and memory for B·k·dim basis values (in f's precision, at
    least float32).

    Args:
        f: z ↦ f(z), shape ``(B, ...)`` to the same; sample b of the output may depend only on sample b.
        z: Where the Jacobian is taken, shape ``(B, ...)``.
        iters: Krylov dimension k (>= 2); values above the per-sample dimension are capped at it.
        generator: Random source for the start vectors (one ``torch.randn`` draw of shape
            ``(B, dim)`` in float64 on the generator's device). By default a generator seeded with 0,
            so repeated calls give identical numbers and the global random state is untouched.

    Returns:
        The estimates, shape ``(B,)``, in f's dtype; NaN for a sample whose Jacobian products are
        not finite.

    Raises:
        ValueError: If ``iters`` is not an integer >= 2, or f(z) does not have z's shape.
    """
    check_int_at_least("iters", iters, 2)
    if generator is None:
        generator = torch.Generator().manual_seed(_DEFAULT_SEED)
    with torch.enable_grad():
        z_leaf = z.detach().requires_grad_()
        fz = f(z_leaf)
    if not isinstance(fz, Tensor) or fz.shape != z.shape:
        got = tuple(fz.shape) if isinstance(fz, Tensor) else type(fz).__name__
        raise ValueError(f"f must map z to a tensor of z's shape {tuple(z.shape)}, got {got}")
    batch, dim = z.shape[0], math.prod(z.shape[1:])
    if not fz.requires_grad or batch == 0 or dim == 0:  # f does not depend on z: J = 0
        return fz.new_zeros(batch)
    steps = min(iters, dim)
    work = torch.promote_types(fz.dtype, torch.float32)  # orthogonalise in at least float32
    device = fz.device
    start = torch.randn((batch, dim), generator=generator, dtype=torch.float64, device=generator.device)
    q = start.to(device=device, dtype=work)
    q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True)  # a Gaussian vector is not 0 (probability 1)
    basis = torch.zeros(batch, steps, dim, dtype=work, device=device)
    hessenberg = torch.zeros(batch, steps, steps, dtype=torch.float64, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)  # samples whose Krylov space still grows
    largest = torch.zeros(batch, dtype=work, device=device)  # max ‖Jᵀq‖ so far: the breakdown's scale
    threshold = _BREAKDOWN_ULPS * torch.finfo(work).eps
    for j in range(steps):
        basis[:, j] = q
        (w,) = torch.autograd.grad(
            fz, z_leaf, q.reshape(fz.shape).to(fz.dtype), retain_graph=j + 1 < steps, allow_unused=True
        )
        w = torch.zeros_like(q) if w is None else w.reshape(batch, dim).to(work)
        w = torch.where(active[:, None], w, 0.0)  # after a breakdown a sample's columns stay zero
        largest = torch.maximum(largest, torch.linalg.vector_norm(w, dim=1))
        span = basis[:, : j + 1]
        coefficients = torch.zeros(batch, j + 1, dtype=work, device=device)
        for _ in range(2):  # classical Gram–Schmidt twice: orthogonal to working precision
            c = torch.einsum("bkd,bd->bk", span, w)
            w = w - torch.einsum("bkd,bk->bd", span, c)
            coefficients = coefficients + c
        hessenberg[:, : j + 1, j] = coefficients.to(torch.float64)
        if j + 1 == steps:
            break
        norm = torch.linalg.vector_norm(w, dim=1)
        active = active & (norm > threshold * largest)  # NaN compares False: such a sample stops too
        hessenberg[:, j + 1, j] = torch.where(active, norm, 0.0).to(torch.float64)
        q = torch.where(active[:, None], w / norm.clamp_min(torch.finfo(work).tiny)[:, None], 0.0)
        if not bool(active.any()):
            # Every sample's Krylov space is invariant: H, zero beyond it, already holds all the
            # eigenvalues it can find (the zero columns add eigenvalues 0, which cannot be the max).
            break
    # The small eigenproblem on the CPU in float64, whatever f's device and precision.
    hessenberg = hessenberg.cpu()
    finite = torch.isfinite(hessenberg).all(dim=2).all(dim=1)
    eigenvalues = torch.linalg.eigvals(torch.where(finite[:, None, None], hessenberg, 0.0))
    radius = torch.where(finite, eigenvalues.abs().amax(dim=1), math.nan)
    return radius.to(device=z.device, dtype=fz.dtype)
