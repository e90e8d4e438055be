"""Log-determinants log|det(I + s·J_g(x))| of invertible residual maps, per sample.

For y = x + g(x) with Lip(g) < 1 (s = +1), and for the implicit z = (1 - g)⁻¹(x), whose Jacobian
is (I - J_g(z))⁻¹ (s = -1), the log-determinant is the power series

    log det(I + s J) = Σ_{k>=1} (-1)^{k+1} s^k tr(J^k) / k,

which converges because every eigenvalue of J is smaller than one in magnitude. Three estimators:

* ``"exact"``: the per-sample Jacobian (one VJP per dimension) and ``slogdet``: for small dimensions
  and for tests; differentiable by autograd.
* ``"series"``: the first ``terms`` terms with Hutchinson traces, tr(J^k) ≈ vᵀ J^k v for random
  ±1 vectors v (i-ResNet, Behrmann et al. 2019). Biased by the truncation, by at most
  Lip(g)^{n+1} / ((n+1)(1 - Lip(g))) per dimension for n terms.
* ``"roulette"``: the Russian-roulette estimator of Residual Flows (Chen et al. 2019): ``terms``
  terms always, then a Geometric(1/2) number more, each weighted by 1/P(term reached): unbiased.
  Its variance is finite only when the terms decay faster than the weights 2^j grow: term k is of
  size about ρ(J)^k, so the second moment Σ_j 2^j ρ^(2(terms+j)) diverges once ρ(J) > 1/√2 ≈ 0.71,
  which Lip(g) = 0.9–0.97 allows (ρ(J) <= Lip(g)). The estimates are then still unbiased but
  heavy-tailed (rare draws far from the mean); more ``terms`` scale the tail down by ρ^(2·terms)
  but do not make it finite.

The series and roulette gradients use the Neumann-series estimator of Residual Flows,
∂ log det(I + sJ) = tr((I + sJ)⁻¹ s ∂J) ≈ wᵀ (s ∂J) v with w = Σ_j (-s)^j Jᵀʲ v weighted like the
value, so one graph of g serves any number of terms: memory does not grow with the terms.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .errors import check_int_at_least

__all__ = ["LOGDET_ESTIMATORS", "residual_logdet"]

LOGDET_ESTIMATORS = ("exact", "series", "roulette")
"""The accepted values of ``estimator=``."""

# Roulette: after the fixed terms, each further term is reached with this probability.
_CONTINUE = 0.5


def residual_logdet(
    g: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    sign: float = 1.0,
    estimator: str = "series",
    terms: int = 8,
    samples: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``(g(x), log|det(I + sign·∂g/∂x)|)`` per sample.

    Args:
        g: Maps ``(B, ...)`` to the same shape; sample b of the output may depend only on sample b.
        x: Where the Jacobian is taken, shape ``(B, ...)``. Gradients flow into x and into whatever g
            uses.
        sign: +1 for I + J (a residual block), -1 for I - J (the implicit inverse's denominator).
        estimator: ``"exact"``, ``"series"`` or ``"roulette"``.
        terms: Series terms (``"series"``), or terms always taken before the roulette (``"roulette"``).
        samples: Hutchinson vectors averaged (``"series"``, ``"roulette"``).
        generator: Random source for the Hutchinson vectors and the roulette.

    Returns:
        ``(g(x), logdet)``: g's output (with its graph) and the log-determinants, shape ``(B,)``.
    """
    if estimator not in LOGDET_ESTIMATORS:
        raise ValueError(f"estimator must be one of {list(LOGDET_ESTIMATORS)}, got {estimator!r}")
    check_int_at_least("terms", terms)
    check_int_at_least("samples", samples)
    if sign not in (1.0, -1.0):
        raise ValueError(f"sign must be 1 or -1, got {sign!r}")
    differentiable = torch.is_grad_enabled()  # the caller's mode: the estimators need grad either way
    with torch.enable_grad():
        point = x if x.requires_grad else x.detach().requires_grad_()
        gx = g(point)
        if estimator == "exact":
            logdet = _exact(gx, point, sign, differentiable)
        else:
            logdet = _stochastic(gx, point, sign, estimator, terms, samples, generator, differentiable)
    if not differentiable:
        return gx.detach(), logdet.detach()
    return gx, logdet


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _exact(gx: Tensor, x: Tensor, sign: float, create_graph: bool) -> Tensor:
    batch, dim = x.shape[0], math.prod(x.shape[1:])
    rows = []
    for i in range(dim):  # row i of every sample's Jacobian at once: the samples are independent
        basis = torch.zeros(batch, dim, dtype=gx.dtype, device=gx.device)
        basis[:, i] = 1
        (row,) = torch.autograd.grad(gx, x, basis.reshape(gx.shape), create_graph=create_graph, retain_graph=True)
        rows.append(_flat(row))
    jacobian = torch.stack(rows, dim=1)  # (B, D, D)
    eye = torch.eye(dim, dtype=jacobian.dtype, device=jacobian.device)
    return torch.linalg.slogdet(eye + sign * jacobian).logabsdet


def _term_weights(estimator: str, terms: int, generator: torch.Generator | None) -> list[float]:
    """1 / P(term k is reached), k = 1..N, for the series (N = terms) or one roulette draw."""
    if estimator == "series":
        return [1.0] * terms
    extra = 0
    while float(torch.rand((), generator=generator)) < _CONTINUE:
        extra += 1
    return [1.0] * terms + [_CONTINUE ** -(k + 1) for k in range(extra)]


def _stochastic(gx, x, sign, estimator, terms, samples, generator, differentiable: bool) -> Tensor:
    batch = x.shape[0]
    values = torch.zeros(batch, dtype=gx.dtype, device=gx.device)
    surrogate = torch.zeros_like(values)
    differentiable = differentiable and gx.requires_grad
    for _ in range(samples):
        weights = _term_weights(estimator, terms, generator)
        # Rademacher vectors: the Hutchinson trace estimator with the least variance (Hutchinson 1989).
        v = torch.randint(0, 2, gx.shape, generator=generator).to(device=gx.device, dtype=gx.dtype) * 2 - 1
        power = v  # vᵀ J^k, as a row vector per sample
        neumann = torch.zeros_like(v)  # Σ_j (-s)^j weight_{j+1} vᵀ J^j: the gradient's left vector
        for k, weight in enumerate(weights, start=1):
            neumann = neumann + ((-sign) ** (k - 1) * weight) * power
            (power,) = torch.autograd.grad(gx, x, power, retain_graph=True)
            values = values + ((-1) ** (k + 1) * sign**k * weight / k) * _flat(power * v).sum(dim=1)
        if differentiable:
            (left,) = torch.autograd.grad(gx, x, neumann.detach(), create_graph=True, retain_graph=True)
            surrogate = surrogate + sign * _flat(left * v).sum(dim=1)
    values, surrogate = values / samples, surrogate / samples
    # The value of the estimator, the Neumann estimate of its gradient.
    return values.detach() + (surrogate - surrogate.detach())
