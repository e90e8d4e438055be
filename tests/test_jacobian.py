"""Jacobian penalty and spectral radius of a fixed-point map, and the layers' training aids."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import implicitlayers as il
from tests.strategies import relative_error


@st.composite
def tanh_maps(draw, symmetric=False):
    """f(z) = tanh(z Wᵀ + x), float64, with its per-sample Jacobians at a random z."""
    dim, batch = draw(st.integers(2, 6)), draw(st.integers(1, 4))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(dim, dim, generator=generator, dtype=torch.float64) * draw(st.floats(0.2, 1.5))
    if symmetric:
        w = (w + w.T) / 2
    x = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    z = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    jacobians = torch.func.vmap(torch.func.jacrev(lambda zi, xi: torch.tanh(zi @ w.T + xi)))(z, x)
    return w, x, z, jacobians


@settings(max_examples=15)
@given(problem=tanh_maps(), seed=st.integers(0, 2**31 - 1))
def test_jacobian_penalty_estimates_the_frobenius_norm(problem, seed):
    w, x, z, jacobians = problem
    exact = jacobians.square().sum(dim=(1, 2)) / z.shape[1]
    generator = torch.Generator().manual_seed(seed)
    draws = torch.stack(
        [il.jacobian_penalty(lambda z: torch.tanh(z @ w.T + x), z, generator=generator) for _ in range(400)]
    )
    standard_error = draws.std(0) / math.sqrt(len(draws))
    assert bool(((draws.mean(0) - exact).abs() <= 5 * standard_error + 1e-12).all())


def test_jacobian_penalty_is_differentiable_in_the_parameters():
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    x, z = torch.randn(3, 4, generator=generator, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    penalty = il.jacobian_penalty(lambda z: torch.tanh(z @ w.T + x), z, samples=4000, generator=generator)
    (ours,) = torch.autograd.grad(penalty.sum(), w)
    exact = torch.func.vmap(torch.func.jacrev(lambda zi, xi: torch.tanh(zi @ w.T + xi)))(z, x).square().sum() / 4
    (reference,) = torch.autograd.grad(exact, w)
    assert relative_error(ours, reference) < 0.1  # 4000 samples: a few percent of noise


@given(problem=tanh_maps(symmetric=True))
def test_spectral_radius_matches_the_eigenvalues(problem):
    # tanh(Wz + x) with symmetric W has J = diag(s) W, similar to a symmetric matrix: real eigenvalues.
    w, x, z, jacobians = problem
    magnitudes = torch.linalg.eigvals(jacobians).abs().sort(dim=1, descending=True).values
    exact, second = magnitudes[:, 0], magnitudes[:, 1]
    # Power iteration converges at the rate |λ₂/λ₁|: ask for a gap (0.97^500 ≈ 2e-7).
    assume(bool((second <= 0.97 * exact).all()))
    generator = torch.Generator().manual_seed(0)
    estimate = il.spectral_radius(lambda z: torch.tanh(z @ w.T + x), z, iters=500, generator=generator)
    assert bool(((estimate - exact).abs() <= 1e-5 * exact + 1e-12).all())


def test_bad_arguments_raise():
    f, z = (lambda z: 0.5 * z), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="samples"):
        il.jacobian_penalty(f, z, samples=0)
    with pytest.raises(ValueError, match="iters"):
        il.spectral_radius(f, z, iters=1)
    for kwargs, message in [
        ({"jacobian_penalty": -1}, "jacobian_penalty"),
        ({"spectral_radius_iters": 1}, "spectral_radius_iters"),
        ({"eval_max_iter": 0}, "max_iter"),
        ({"eval_tol": -1.0}, "tol"),
        ({"warm_start": "yes"}, "warm_start"),
    ]:
        with pytest.raises(ValueError, match=message):
            il.ImplicitLayer(_Cell(3), **kwargs)


class _Cell(nn.Module):
    def __init__(self, dim: int, coeff: float = 0.9) -> None:
        super().__init__()
        self.mix = il.spectral_norm(nn.Linear(dim, dim, bias=False), coeff)
        self.inject = nn.Linear(dim, dim)

    def forward(self, z, x):
        return torch.tanh(self.mix(z) + self.inject(x))


def test_layers_solve_with_their_eval_budget_in_eval_mode():
    torch.manual_seed(0)
    layer = il.ImplicitLayer(_Cell(8), solver="picard", tol=1e-10, max_iter=200, eval_max_iter=3, eval_tol=1e-2)
    layer.double()
    x = torch.randn(5, 8, dtype=torch.float64)
    layer(x)
    assert int(layer.stats.nstep.max()) > 3 and bool(layer.stats.converged.all())
    layer.eval()
    layer.on_nonconvergence = "ignore"
    layer(x)
    assert int(layer.stats.nstep.max()) <= 3
    assert bool((layer.stats.converged == (layer.stats.residual <= 1e-2)).all())


def test_warm_start_reuses_the_previous_fixed_point():
    torch.manual_seed(1)
    layer = il.ImplicitLayer(_Cell(16, 0.95), tol=1e-8, max_iter=200, warm_start=True).double().eval()
    x = torch.randn(4, 16, dtype=torch.float64)
    layer(x)
    cold_steps = int(layer.stats.nstep.sum())
    layer(x + 1e-6 * torch.randn_like(x))  # a closely related input: the next frame
    assert int(layer.stats.nstep.sum()) < cold_steps / 2
    layer.reset_warm_start()
    layer(x)
    assert int(layer.stats.nstep.sum()) == cold_steps  # forgotten: a cold start again
    layer(torch.randn(2, 16, dtype=torch.float64))  # another shape: falls back to z_init
    assert bool(layer.stats.converged.all())


def test_jacobian_loss_and_spectral_radius_are_recorded_on_demand():
    torch.manual_seed(2)
    layer = il.ImplicitLayer(_Cell(6), tol=1e-10, max_iter=100, jacobian_penalty=2, spectral_radius_iters=100)
    layer.double()
    x = torch.randn(3, 6, dtype=torch.float64)
    out = layer(x)
    assert layer.jacobian_loss is not None and layer.jacobian_loss.dim() == 0
    (out.sum() + layer.jacobian_loss).backward()
    assert layer.f.mix.parametrizations.weight.original.grad is not None
    radius = layer.stats.spectral_radius
    assert radius.shape == (3,) and bool((radius < 0.9 + 1e-6).all())  # Lip(f in z) <= coeff
    layer.eval()
    layer(x)
    assert layer.jacobian_loss is None  # only in training
    plain = il.ImplicitLayer(_Cell(6))
    plain(x.float())
    assert plain.jacobian_loss is None and plain.stats.spectral_radius is None
