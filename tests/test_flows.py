"""Invertible residual flows: log-determinant estimators, LipSwish, ActNorm, ResidualFlow (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import implicitlayers as il
from tests.strategies import relative_error


def residual_block(dim: int, hidden: int, coeff: float, seed: int, activation: str = "lipswish"):
    torch.manual_seed(seed)
    act = il.layers.invertible.make_activation(activation)
    g = nn.Sequential(
        il.spectral_norm(nn.Linear(dim, hidden), coeff), act, il.spectral_norm(nn.Linear(hidden, dim), coeff)
    )
    with torch.no_grad():  # spread the weights so the normalisation is active at coeff
        for layer in (g[0], g[2]):
            layer.parametrizations.weight.original.mul_(3.0)
            layer.parametrizations.weight[0].refine_(layer.parametrizations.weight.original)
    return il.InvertibleResidual(g, tol=1e-12, max_iter=300).double().eval()


def jacobian_logdet(fn, x):
    """log|det ∂fn/∂x| per sample from torch.func.jacrev and slogdet: the reference."""
    jac = torch.func.vmap(torch.func.jacrev(lambda xi: fn(xi[None])[0]))(x)
    return torch.linalg.slogdet(jac.reshape(x.shape[0], x[0].numel(), -1)).logabsdet


@st.composite
def blocks(draw):
    dim = draw(st.integers(2, 5))
    return (
        residual_block(dim, draw(st.integers(2, 12)), draw(st.floats(0.3, 0.8)), draw(st.integers(0, 2**31 - 1))),
        torch.randn(draw(st.integers(1, 4)), dim, dtype=torch.float64),
        draw(st.integers(0, 2**31 - 1)),
    )


def draws(block, x, estimator, count, seed, **options):
    generator = torch.Generator().manual_seed(seed)
    return torch.stack(
        [block.forward_with_logdet(x, estimator=estimator, generator=generator, **options)[1] for _ in range(count)]
    )


@given(problem=blocks())
def test_exact_estimator_is_the_jacobian_log_determinant(problem):
    block, x, _ = problem
    y, logdet = block.forward_with_logdet(x, estimator="exact")
    torch.testing.assert_close(y, block(x))
    torch.testing.assert_close(logdet, jacobian_logdet(block, x), rtol=1e-10, atol=1e-12)


@settings(max_examples=10)
@given(problem=blocks())
def test_series_and_roulette_agree_with_exact_within_their_standard_error(problem):
    block, x, seed = problem
    exact = block.forward_with_logdet(x, estimator="exact")[1].detach()
    lip = il.lipschitz_bound(block.g)
    dim, terms = x.shape[1], 20
    truncation = dim * lip ** (terms + 1) / ((terms + 1) * (1 - lip))  # the series' bias bound
    for estimator, options, bias in (
        ("series", {"terms": terms}, truncation),
        ("roulette", {"terms": 2}, 0.0),  # unbiased
    ):
        with torch.no_grad():
            estimates = draws(block, x, estimator, 400, seed, **options)
        error = (estimates.mean(0) - exact).abs()
        standard_error = estimates.std(0) / math.sqrt(len(estimates))
        assert bool((error <= 5 * standard_error + bias + 1e-12).all()), (estimator, error, standard_error)


def test_gradients_of_the_estimators_match_autograd_through_exact():
    block, x = residual_block(3, 8, 0.7, seed=1), torch.randn(2, 3, dtype=torch.float64)
    params = [p for name, p in block.g.named_parameters() if name != "2.bias"]  # the last bias moves no J
    xr = x.clone().requires_grad_()
    reference = torch.autograd.grad(jacobian_logdet(block, xr).sum(), [xr, *params])
    exact = torch.autograd.grad(block.forward_with_logdet(xr, estimator="exact")[1].sum(), [xr, *params])
    for ours, expected in zip(exact, reference, strict=True):
        assert relative_error(ours, expected) <= 1e-9
    generator = torch.Generator().manual_seed(0)
    for estimator, options in (("series", {"terms": 20}), ("roulette", {"terms": 2})):
        grads = [
            torch.autograd.grad(
                block.forward_with_logdet(xr, estimator=estimator, generator=generator, **options)[1].sum(),
                [xr, *params],
            )
            for _ in range(600)
        ]
        for i, expected in enumerate(reference):
            stacked = torch.stack([g[i] for g in grads])
            error = (stacked.mean(0) - expected).abs()
            standard_error = stacked.std(0) / math.sqrt(len(grads))
            assert bool((error <= 5 * standard_error + 1e-6).all()), (estimator, i)


def test_roulette_memory_does_not_grow_with_the_terms():
    # One graph of g serves every term: the saved tensors of the surrogate do not depend on the terms.
    block, x = residual_block(3, 8, 0.7, seed=2), torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def saved(terms):
        count = []

        def pack(t):
            count.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block.forward_with_logdet(x, estimator="series", terms=terms)
        return sum(count)

    assert saved(40) == saved(2)


@given(problem=blocks())
def test_implicit_mlp_logdet_is_minus_that_of_its_inverse(problem):
    _, x, seed = problem
    torch.manual_seed(seed)
    layer = il.ImplicitMLP(x.shape[1], 8, activation="lipswish", coeff=0.8, tol=1e-12, max_iter=300).double().eval()
    z, logdet = layer.forward_with_logdet(x, estimator="exact")
    assert logdet.shape == (x.shape[0],)
    torch.testing.assert_close(logdet, jacobian_logdet(layer, x), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(layer.inverse(z), x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("beta", [-3.0, -0.5, 0.0, 0.7, 1.0, 4.0])
def test_lipswish_is_one_lipschitz_for_every_beta(beta):
    act = il.LipSwish(beta).double()
    x = torch.linspace(-30, 30, 400001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(act(x).sum(), x)
    assert float(slope.abs().max()) <= il.lipschitz_bound(act) < 1.0
    assert il.lipschitz_bound(act) >= 1.09984 / 1.1 - 1e-12
    assert il.lipschitz_bound(nn.Sequential(il.spectral_norm(nn.Linear(3, 3), 0.9), act)) < 0.9


def test_actnorm_initialises_from_data_and_inverts():
    torch.manual_seed(3)
    norm = il.ActNorm(3).double()
    x = 5 + 2 * torch.randn(64, 3, 4, dtype=torch.float64)
    y, logdet = norm.forward_with_logdet(x)
    per_feature = y.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_feature.mean(dim=1), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(per_feature.std(dim=1), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(logdet, jacobian_logdet(norm, x))
    torch.testing.assert_close(norm.inverse(y), x)
    restored = il.ActNorm(3).double()
    restored.load_state_dict(norm.state_dict())
    torch.testing.assert_close(restored(x), y)  # initialised state travels: no second initialisation


def _two_blobs(n, generator):
    centres = torch.tensor([[-1.5, 0.0], [1.5, 0.5]], dtype=torch.float64)
    labels = torch.randint(0, 2, (n,), generator=generator)
    return centres[labels] + 0.4 * torch.randn(n, 2, generator=generator, dtype=torch.float64)


def small_flow(seed):
    torch.manual_seed(seed)
    blocks = [il.ActNorm(2)]
    for _ in range(3):
        g = nn.Sequential(
            il.spectral_norm(nn.Linear(2, 32), 0.9), il.LipSwish(), il.spectral_norm(nn.Linear(32, 2), 0.9)
        )
        blocks.append(il.InvertibleResidual(g, tol=1e-10, max_iter=200))
    return il.ResidualFlow(blocks, base=2).double()


def test_a_trained_flow_is_a_density_and_samples_converge():
    generator = torch.Generator().manual_seed(0)
    flow = small_flow(0)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    data, losses = _two_blobs(512, generator), []
    for _ in range(120):
        loss = -flow.log_prob(data).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.3
    flow.eval()
    # ∫ p = 1 on a grid wide enough to hold the mass.
    side = torch.linspace(-8, 8, 201, dtype=torch.float64)
    grid = torch.cartesian_prod(side, side)
    with torch.no_grad():
        density = torch.cat([flow.log_prob(chunk).exp() for chunk in grid.split(4096)])
    mass = float(density.sum()) * float(side[1] - side[0]) ** 2
    assert abs(mass - 1) < 1e-2
    # Sampling inverts every block by a solve that reports convergence.
    samples = flow.sample(256, generator=generator)
    assert samples.shape == (256, 2) and bool(torch.isfinite(samples).all())
    assert len(flow.sample_stats) == 3 and all(bool(stats.converged.all()) for stats in flow.sample_stats)
    torch.testing.assert_close(flow.inverse(flow(samples)), samples, rtol=1e-8, atol=1e-8)
    # Exact by default in two dimensions; the stochastic estimators are selectable.
    x = _two_blobs(8, generator)
    with torch.no_grad():
        exact = flow.log_prob(x)
        torch.testing.assert_close(exact, flow.log_prob(x, estimator="exact"))
        series = torch.stack(
            [flow.log_prob(x, estimator="series", terms=30, samples=1, generator=generator) for _ in range(300)]
        )
    standard_error = series.std(0) / math.sqrt(len(series))
    assert bool(((series.mean(0) - exact).abs() <= 5 * standard_error + 1e-3).all())  # 1e-3: truncation


def test_flow_arguments_are_checked():
    with pytest.raises(ValueError, match="forward_with_logdet"):
        il.ResidualFlow([nn.Linear(2, 2)], base=2)
    with pytest.raises(ValueError, match="event shape"):
        il.ResidualFlow([il.ActNorm(2)], base=0)
    flow = small_flow(1)
    with pytest.raises(ValueError, match="estimator must be one of"):
        flow.log_prob(torch.zeros(2, 2, dtype=torch.float64), estimator="hutchinson")
    with pytest.raises(ValueError, match="terms"):
        il.residual_logdet(lambda x: 0.5 * x, torch.zeros(2, 2), terms=0)
    with pytest.raises(ValueError, match="x must have shape"):
        il.ActNorm(3)(torch.zeros(2, 2))
    base = torch.distributions.MultivariateNormal(
        torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    )
    custom = il.ResidualFlow(list(small_flow(2).blocks), base=base)
    assert custom.sample(4).shape == (4, 2)
