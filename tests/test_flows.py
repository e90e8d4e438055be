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


@st.composite
def hard_maps(draw):
    """g(x) = c Q₂ tanh(c Q₁ x + b) with random orthogonal Q₁, Q₂: Lip(g) = c² in 0.9–0.97, dim ~32.

    The regime where the log-determinant series converges slowly. Random MLPs normalised to the same
    bound have ρ(J_g) ≈ 0.15 (the product of the layers' norms is far from the norm of the product);
    here J_g(x) = c² Q₂ diag(tanh') Q₁, so small pre-activations (tanh' ≈ 1) put its eigenvalues near
    the circle of radius c², some near -c² (the hard direction of log det(I + J)) and some near +c²
    (that of log det(I - J)). Returns g (float64, with a certified bound), a small batch x and J_g(x).
    """
    dim, batch = draw(st.integers(24, 40)), draw(st.integers(1, 2))
    bound, spread = draw(st.floats(0.9, 0.97)), draw(st.floats(0.05, 1.0))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    first, second = nn.Linear(dim, dim).double(), nn.Linear(dim, dim, bias=False).double()
    with torch.no_grad():
        for layer in (first, second):
            q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
            layer.weight.copy_(math.sqrt(bound) * q)
        first.bias.copy_(0.1 * spread * torch.randn(dim, generator=generator, dtype=torch.float64))
    g = nn.Sequential(first, nn.Tanh(), second)
    x = spread * torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    jacobians = torch.func.vmap(torch.func.jacrev(lambda xi: g(xi[None])[0]))(x).detach()
    return g, x, jacobians


def truncated_series(jacobians, sign, terms):
    """Σ_{k=1..terms} (-1)^{k+1} tr((sign·J)^k) / k per sample, from the Jacobians themselves."""
    power = torch.eye(jacobians.shape[1], dtype=jacobians.dtype).expand_as(jacobians)
    total = jacobians.new_zeros(jacobians.shape[0])
    for k in range(1, terms + 1):
        power = power @ (sign * jacobians)
        total = total + (-1) ** (k + 1) * power.diagonal(dim1=1, dim2=2).sum(dim=1) / k
    return total


@settings(max_examples=10)
@given(problem=hard_maps(), sign=st.sampled_from([1.0, -1.0]))
def test_exact_estimator_in_the_hard_regime(problem, sign):
    g, x, jacobians = problem
    _, logdet = il.residual_logdet(g, x, sign=sign, estimator="exact")
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    reference = torch.linalg.slogdet(eye + sign * jacobians).logabsdet
    torch.testing.assert_close(logdet.detach(), reference, rtol=1e-10, atol=1e-10)


@settings(max_examples=8)
@given(problem=hard_maps(), sign=st.sampled_from([1.0, -1.0]), seed=st.integers(0, 2**31 - 1))
def test_series_in_the_hard_regime_is_unbiased_for_its_truncation(problem, sign, seed):
    # Each term's Hutchinson estimate is unbiased, so E[series with n terms] is exactly the truncated
    # series T_n, computed here from J: no truncation slack in the statistical test.
    g, x, jacobians = problem
    terms, count = 12, 200
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        estimates = torch.stack(
            [
                il.residual_logdet(g, x, sign=sign, estimator="series", terms=terms, generator=generator)[1]
                for _ in range(count)
            ]
        )
    expected = truncated_series(jacobians, sign, terms)
    standard_error = estimates.std(0) / math.sqrt(count)
    assert bool(((estimates.mean(0) - expected).abs() <= 5 * standard_error + 1e-10).all())
    # The documented truncation bias: |tr(J^k)| <= dim ρ^k <= dim Lip(g)^k, so the terms after the n-th
    # sum to at most dim Σ_{k>n} L^k / k <= dim L^(n+1) / ((n+1)(1 - L)).
    lip = il.lipschitz_bound(g)
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    exact = torch.linalg.slogdet(eye + sign * jacobians).logabsdet
    bias_bound = x.shape[1] * lip ** (terms + 1) / ((terms + 1) * (1 - lip))
    assert bool(((expected - exact).abs() <= bias_bound).all())


@settings(max_examples=15)
@given(
    dim=st.integers(24, 40),
    bound=st.floats(0.9, 0.97),
    sign=st.sampled_from([1.0, -1.0]),
    terms=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_series_and_roulette_are_exact_for_a_diagonal_jacobian(dim, bound, sign, terms, seed):
    # An elementwise g has a diagonal J = diag(d), and vᵀ Dᵏ v = tr(Dᵏ) for every ±1 vector v: the
    # Hutchinson noise vanishes, so the series equals the truncated series T_n exactly (value and
    # gradient), and a roulette draw equals, for its number N of extra terms,
    #     V_N = T_n + Σ_{j<N} 2^(j+1) t_{n+j+1},   t_k = (-1)^(k+1) tr((sign·D)^k) / k,
    # each term weighted by 1/P(reached) with P(N >= j) = 2^-j — in the hard regime |d| <= 0.97, where
    # the roulette's variance is infinite (Σ_j 2^j t_{n+j}² diverges once d² > 1/2) and the mean of a
    # sample is no test at all.
    generator = torch.Generator().manual_seed(seed)
    scale = bound * torch.where(torch.rand(dim, generator=generator) < 0.5, -1.0, 1.0).double()
    shift = torch.randn(dim, generator=generator, dtype=torch.float64)
    x = (-shift + 0.3 * torch.randn(2, dim, generator=generator, dtype=torch.float64)).requires_grad_()
    weights = torch.ones(dim, dtype=torch.float64, requires_grad=True)

    def g(x):
        return weights * scale * torch.tanh(x + shift)

    diagonal = (weights * scale * (1 - torch.tanh(x + shift).square())).detach()
    term = [(-1) ** (k + 1) * (sign * diagonal).pow(k).sum(dim=1) / k for k in range(1, terms + 61)]
    series_value = sum(term[:terms])
    _, logdet = il.residual_logdet(g, x, sign=sign, estimator="series", terms=terms, generator=generator)
    torch.testing.assert_close(logdet.detach(), series_value, rtol=1e-12, atol=1e-12)
    # Its (Neumann) gradient is the gradient of T_n.
    d_x = weights * scale * (1 - torch.tanh(x + shift).square())
    reference = sum((-1) ** (k + 1) * (sign * d_x).pow(k).sum() / k for k in range(1, terms + 1))
    for ours, expected in zip(
        torch.autograd.grad(logdet.sum(), [x, weights]), torch.autograd.grad(reference, [x, weights]), strict=True
    ):
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    candidates = [series_value]
    for j in range(59):  # P(N >= 60) = 2^-60
        candidates.append(candidates[-1] + 2.0 ** (j + 1) * term[terms + j])
    candidates = torch.stack(candidates)  # (N, B)
    counts = torch.zeros(len(candidates))
    with torch.no_grad():
        for _ in range(200):
            value = il.residual_logdet(g, x, sign=sign, estimator="roulette", terms=terms, generator=generator)[1]
            close = ((candidates - value).abs() <= 1e-9 * (1 + candidates.abs())).all(dim=1)
            assert bool(close.any()), value  # a roulette draw is one of the V_N
            counts[int(close.nonzero()[0])] += 1
    # N ~ Geometric(1/2): P(N = 0) = 1/2, P(N = 1) = 1/4 (5 standard errors of a binomial count).
    for n, p in ((0, 0.5), (1, 0.25)):
        assert abs(float(counts[n]) - 200 * p) <= 5 * math.sqrt(200 * p * (1 - p))


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


@pytest.mark.parametrize("estimator", ["series", "roulette"])
def test_roulette_memory_does_not_grow_with_the_terms(estimator):
    # One graph of g serves every term: the saved tensors of the surrogate do not depend on the terms
    # (for the roulette, nor on the random number of extra terms: each call draws its own).
    block, x = residual_block(3, 8, 0.7, seed=2), torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def saved(terms, seed):
        count = []

        def pack(t):
            count.append(t.numel())
            return t

        generator = torch.Generator().manual_seed(seed)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, logdet = block.forward_with_logdet(x, estimator=estimator, terms=terms, generator=generator)
        assert logdet.requires_grad  # the surrogate, with its graph, was built
        return sum(count)

    reference = saved(2, 0)
    assert reference > 0
    assert all(saved(terms, seed) == reference for terms, seed in ((40, 1), (40, 2), (7, 3)))


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
    generator = torch.Generator().manual_seed(3)
    norm = il.ActNorm(3, eps=0.0).double()
    x = 5 + 2 * torch.randn(64, 3, 4, generator=generator, dtype=torch.float64)
    y, logdet = norm.forward_with_logdet(x)
    per_feature = y.transpose(0, 1).reshape(3, -1)
    # Zero mean and unit (1/N) variance per feature, over the batch and the positions, to rounding.
    torch.testing.assert_close(per_feature.mean(dim=1), torch.zeros(3, dtype=torch.float64), atol=1e-13, rtol=0)
    ones = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(per_feature.std(dim=1, correction=0), ones, atol=1e-13, rtol=0)
    torch.testing.assert_close(logdet, jacobian_logdet(norm, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.inverse(y), x, rtol=1e-13, atol=1e-13)
    restored = il.ActNorm(3).double()
    restored.load_state_dict(norm.state_dict())
    torch.testing.assert_close(restored(x), y)  # initialised state travels: no second initialisation
    # The default eps = 1e-6 is added to the standard deviation: the variance is 1 to about 1e-6 / std.
    default = il.ActNorm(3).double()
    spread = default(x).transpose(0, 1).reshape(3, -1).std(dim=1, correction=0)
    torch.testing.assert_close(spread, ones, atol=1e-6, rtol=0)


def test_actnorm_only_centres_a_batch_of_one():
    # One element per feature: no spread to measure (the unbiased std was NaN, and stored forever).
    norm = il.ActNorm(3).double()
    y, logdet = norm.forward_with_logdet(torch.tensor([[1.5, -2.0, 0.25]], dtype=torch.float64))
    assert torch.equal(y, torch.zeros(1, 3, dtype=torch.float64)) and torch.equal(logdet, torch.zeros(1).double())
    assert torch.equal(norm.log_scale.detach(), torch.zeros(3).double()) and bool(norm.initialized)
    torch.testing.assert_close(norm.bias.detach(), torch.tensor([-1.5, 2.0, -0.25], dtype=torch.float64))
    # With positions, a batch of one has several elements per feature: normalised as usual.
    image = il.ActNorm(2, eps=0.0).double()
    generator = torch.Generator().manual_seed(0)
    out = image(torch.randn(1, 2, 8, 8, generator=generator, dtype=torch.float64))
    torch.testing.assert_close(out.std(dim=(0, 2, 3), correction=0), torch.ones(2, dtype=torch.float64))


def test_actnorm_only_centres_a_constant_feature():
    # A constant feature's spread says nothing about its scale, so s = 0 (scale 1): s = -log(eps) used
    # to send an input 0.01 away to ~1e4.
    generator = torch.Generator().manual_seed(0)
    varying = 3 + 2 * torch.randn(50, generator=generator, dtype=torch.float64)
    x = torch.stack([varying, torch.full((50,), 7.0, dtype=torch.float64)], dim=1)
    norm = il.ActNorm(2).double()
    y = norm(x)
    expected = torch.stack([-torch.log(varying.std(correction=0) + 1e-6), torch.tensor(0.0, dtype=torch.float64)])
    torch.testing.assert_close(norm.log_scale.detach(), expected, rtol=1e-14, atol=0)
    assert torch.equal(y[:, 1], torch.zeros(50, dtype=torch.float64))
    nearby = norm(torch.tensor([[3.0, 7.01]], dtype=torch.float64)).detach()
    assert abs(float(nearby[0, 1]) - 0.01) < 1e-12
    # A feature that varies by ~10 units of rounding of 1e4 is rounding, not signal (whatever min_std).
    rounding = il.ActNorm(1, min_std=1e-30).double()
    rounding((1e4 + 1e-11 * varying)[:, None])
    assert torch.equal(rounding.log_scale.detach(), torch.zeros(1, dtype=torch.float64))


def test_actnorm_does_not_normalise_a_spread_below_min_std():
    # Every initial scale is at most 1/min_std: a smaller spread is only centred.
    generator = torch.Generator().manual_seed(0)
    varying = 3 + 2 * torch.randn(50, generator=generator, dtype=torch.float64)
    norm = il.ActNorm(2, min_std=0.1).double()
    norm(torch.stack([varying, 0.02 * varying], dim=1))  # stds ≈ 2 and 0.04
    expected = torch.stack([-torch.log(varying.std(correction=0) + 1e-6), torch.tensor(0.0, dtype=torch.float64)])
    torch.testing.assert_close(norm.log_scale.detach(), expected, rtol=1e-14, atol=0)


def test_actnorm_refuses_to_initialise_from_non_finite_data():
    for bad in (math.nan, math.inf):
        norm = il.ActNorm(2)
        with pytest.raises(ValueError, match="x must be finite"):
            norm(torch.tensor([[bad, 1.0], [2.0, 3.0]]))
        assert not bool(norm.initialized)
        assert torch.equal(norm.log_scale.detach(), torch.zeros(2)) and torch.equal(norm.bias.detach(), torch.zeros(2))
        norm(torch.tensor([[0.0, 1.0], [2.0, 3.0]]))  # the next finite batch initialises it
        torch.testing.assert_close(norm.log_scale.detach(), torch.full((2,), -math.log(1 + 1e-6)))
    with pytest.raises(ValueError, match="min_std"):
        il.ActNorm(2, min_std=0.0)
    with pytest.raises(ValueError, match="eps"):
        il.ActNorm(2, eps=-1.0)


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
    with pytest.raises(ValueError, match="n must be an integer"):
        flow.sample(0)


def _identity_flow(base):
    """A flow whose map is the identity (an uninitialised ActNorm in eval mode): its samples are base draws."""
    return il.ResidualFlow([il.ActNorm(2).double().eval()], base=base)


@pytest.mark.parametrize("kind", ["normal", "multivariate", "independent"])
def test_sample_with_a_distribution_base_honours_the_generator(kind):
    loc = torch.tensor([1.0, -2.0], dtype=torch.float64)
    covariance = torch.tensor([[4.0, 1.8], [1.8, 1.0]], dtype=torch.float64)  # correlated: LLᵀ ≠ LᵀL
    scale = covariance.diagonal().sqrt()
    distributions = torch.distributions
    base = {
        "normal": distributions.Normal(loc, scale),  # batch shape (2,), event shape ()
        "multivariate": distributions.MultivariateNormal(loc, covariance),
        "independent": distributions.Independent(distributions.Normal(loc, scale), 1),
    }[kind]
    flow = _identity_flow(base)
    expected = covariance if kind == "multivariate" else covariance.diagonal().diag()
    first = flow.sample(40000, generator=torch.Generator().manual_seed(7))
    again = flow.sample(40000, generator=torch.Generator().manual_seed(7))
    other = flow.sample(40000, generator=torch.Generator().manual_seed(8))
    assert first.shape == (40000, 2) and first.dtype == torch.float64
    assert torch.equal(first, again) and not torch.equal(first, other)
    # The draws are the base distribution's: mean and covariance within 5 standard errors (Var of an
    # empirical covariance entry: (Σ_ii Σ_jj + Σ_ij²) / n for a Gaussian); 40000 draws resolve a 3% error.
    n = len(first)
    assert bool(((first.mean(0) - loc).abs() <= 5 * (expected.diagonal() / n).sqrt()).all())
    entry_variance = (expected.diagonal()[:, None] * expected.diagonal()[None, :] + expected.square()) / n
    assert bool(((torch.cov(first.T) - expected).abs() <= 5 * entry_variance.sqrt()).all())


def test_sample_refuses_a_generator_it_cannot_honour():
    laplace = torch.distributions.Laplace(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    for base in (laplace, torch.distributions.Independent(laplace, 1)):
        flow = _identity_flow(base)
        with pytest.raises(ValueError, match=r"generator can drive a base distribution of type Normal.*Laplace"):
            flow.sample(3, generator=torch.Generator().manual_seed(0))
        assert flow.sample(3).shape == (3, 2)  # without a generator: the distribution's own sample()
