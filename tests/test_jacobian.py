"""Jacobian penalty and spectral radius of a fixed-point map, and the layers' training aids."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import implicitlayers as il


@st.composite
def tanh_maps(draw, dtype=torch.float64):
    """f(z) = tanh(z Wᵀ + x) with a non-symmetric W, and its per-sample Jacobians (float64) at a random z."""
    dim, batch = draw(st.integers(2, 6)), draw(st.integers(1, 4))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(dim, dim, generator=generator, dtype=torch.float64) * draw(st.floats(0.2, 1.5))
    x = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    z = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    jacobians = torch.func.vmap(torch.func.jacrev(lambda zi, xi: torch.tanh(zi @ w.T + xi)))(z, x)
    return w.to(dtype), x.to(dtype), z.to(dtype), jacobians


@st.composite
def nonnormal_matrices(draw):
    """Per-sample real matrices A = Q T Qᵀ, shape (B, n, n), float64, built to be hard for power iteration.

    T is block upper triangular: on its diagonal 1×1 blocks (real eigenvalues) and 2×2 blocks
    [[a, b], [-c, a]] with bc > 0 (complex pairs a ± i√(bc), non-normal when b ≠ c); the dominant
    eigenvalue is drawn to be a complex pair, a real eigenvalue, or a near-defective (Jordan-like)
    cluster, and the strict upper triangle holds a coupling of scale up to 20 (strongly non-normal).
    Q is a random orthogonal matrix, so ρ(A) = ρ(T) and ‖A‖ = ‖T‖.
    """
    n, batch = draw(st.integers(2, 10)), draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["complex_pair", "real", "jordan", "gaussian"]))
    coupling = draw(st.sampled_from([0.0, 1.0, 20.0]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def uniform(low=0.0, high=1.0):
        return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))

    matrices = []
    for _ in range(batch):
        if kind == "gaussian":
            matrices.append(torch.randn(n, n, generator=generator, dtype=torch.float64))
            continue
        t = coupling * torch.triu(torch.randn(n, n, generator=generator, dtype=torch.float64), 1)
        radius = uniform(low=0.3, high=2.0)
        i = 0
        if kind == "complex_pair":  # the dominant eigenvalues: a pair of modulus `radius`
            angle, skew = uniform(low=0.2, high=3.0), uniform(low=0.2, high=5.0)
            a, root = radius * math.cos(angle), radius * math.sin(angle)
            t[0:2, 0:2] = torch.tensor([[a, root * skew], [-root / skew, a]], dtype=torch.float64)
            i = 2
        elif kind == "jordan":  # a cluster of nearly equal eigenvalues coupled along the superdiagonal
            size = min(n, 3)
            for k in range(size):
                t[k, k] = radius * (1 + 1e-3 * k)
                if k + 1 < size:
                    t[k, k + 1] = 1.0
            i = size
        while i < n:  # the rest: smaller (possibly equal in modulus) real eigenvalues and pairs
            modulus = radius * uniform()
            if i + 1 < n and uniform() < 0.5:
                angle = uniform(low=0.1, high=3.0)
                a, root = modulus * math.cos(angle), modulus * math.sin(angle)
                t[i : i + 2, i : i + 2] = torch.tensor([[a, root], [-root, a]], dtype=torch.float64)
                i += 2
            else:
                t[i, i] = modulus * (1.0 if uniform() < 0.5 else -1.0)
                i += 1
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
        matrices.append(q @ t @ q.T)
    return torch.stack(matrices)


def linear_map(a):
    """z ↦ z Aᵀ per sample: J_f = A_b for sample b."""
    return lambda z: torch.einsum("bij,bj->bi", a.to(z.dtype), z)


EPS64 = torch.finfo(torch.float64).eps


def radius_bounds(a, eps=EPS64):
    """Where any backward-stable computation of ρ(A) may land, per sample: (low, high).

    A method that is exact for a matrix within about ε‖A‖ of A moves each simple eigenvalue λ_i by at
    most κ_i·δ to first order, with κ_i = ‖x_i‖‖y_i‖/|y_iᴴx_i| its condition number (right and left
    eigenvectors) and δ = 1000 ε ‖A‖_F (a generous multiple of the rounding): the computed radius lies
    in [max_i(|λ_i| - κ_i δ), max_i(|λ_i| + κ_i δ)]. Well-conditioned eigenvalues give an interval of
    about 1e-13 ρ; a (nearly) defective one widens it as rounding itself does.
    """
    values, vectors = torch.linalg.eig(a)
    left = torch.linalg.inv(vectors)  # rows: left eigenvectors, scaled so that y_iᴴ x_i = 1
    kappa = torch.linalg.vector_norm(vectors, dim=1) * torch.linalg.vector_norm(left, dim=2)
    delta = 1000 * eps * torch.linalg.matrix_norm(a)[:, None]
    moduli = values.abs()
    return (moduli - kappa * delta).amax(dim=1), (moduli + kappa * delta).amax(dim=1)


def assert_radius_within(estimate, a, relative=1e-8, eps=EPS64):
    low, high = radius_bounds(a, eps)
    exact = torch.linalg.eigvals(a).abs().amax(dim=1)
    ok = (estimate >= low - relative * exact) & (estimate <= high + relative * exact)
    assert bool(ok.all()), (estimate, exact, low, high)


@given(a=nonnormal_matrices(), extra=st.integers(0, 5))
def test_spectral_radius_is_exact_with_a_full_krylov_space(a, extra):
    n = a.shape[1]
    z = torch.randn(a.shape[:2], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    estimate = il.spectral_radius(linear_map(a), z, iters=n + extra)  # capped at n: exact
    assert estimate.dtype == torch.float64 and estimate.shape == (a.shape[0],)
    assert_radius_within(estimate, a)


@settings(max_examples=15)
@given(problem=tanh_maps(), iters=st.integers(6, 30))
def test_spectral_radius_of_a_tanh_cell_is_exact(problem, iters):
    # The issue's case: the power iteration was off by ±12% here, even after 1000 steps.
    w, x, z, jacobians = problem
    estimate = il.spectral_radius(lambda z: torch.tanh(z @ w.T + x), z, iters=iters)
    assert_radius_within(estimate, jacobians)


@settings(max_examples=10)
@given(problem=tanh_maps(dtype=torch.float32))
def test_spectral_radius_in_float32(problem):
    w, x, z, jacobians = problem
    estimate = il.spectral_radius(lambda z: torch.tanh(z @ w.T + x), z, iters=z.shape[1])
    assert estimate.dtype == torch.float32
    # The VJPs and the basis in float32: a matrix within ~1e-6 of J (in norm), not 1e-15.
    assert_radius_within(estimate.double(), jacobians, relative=1e-5, eps=torch.finfo(torch.float32).eps)


@given(a=nonnormal_matrices(), fraction=st.floats(0.0, 1.0), normal=st.booleans())
def test_spectral_radius_below_full_dimension_stays_in_the_field_of_values(a, fraction, normal):
    # Ritz values lie in the field of values, so the estimate is at most ‖A‖₂; for a normal matrix
    # (here symmetric), in the convex hull of the eigenvalues: at most ρ, and nondecreasing in k
    # (Cauchy interlacing; the Krylov spaces from one start vector are nested).
    n = a.shape[1]
    if normal:
        a = (a + a.transpose(1, 2)) / 2
    z = torch.zeros(a.shape[:2], dtype=torch.float64)
    iters = 2 + round(fraction * max(n - 3, 0))
    estimate = il.spectral_radius(linear_map(a), z, iters=iters)
    norm = torch.linalg.matrix_norm(a, ord=2)
    assert bool((estimate <= norm * (1 + 1e-12)).all())
    if normal:
        exact = torch.linalg.eigvalsh(a).abs().amax(dim=1)
        assert bool((estimate <= exact * (1 + 1e-12)).all())
        more = il.spectral_radius(linear_map(a), z, iters=iters + 1)
        assert bool((more >= estimate * (1 - 1e-12)).all())


def test_spectral_radius_of_the_issue_examples():
    # A non-normal 2×2 map with ρ = 0.5 (the issue: power iteration said 0.27–1.64), and a rotation
    # with a dominant complex pair, which the power iteration cannot converge on at all.
    nonnormal = torch.tensor([[0.5, 10.0], [0.0, -0.5]], dtype=torch.float64)
    angle = 0.3
    rotation = torch.zeros(4, 4, dtype=torch.float64)
    cos, sin = math.cos(angle), math.sin(angle)
    rotation[:2, :2] = 0.9 * torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
    rotation[2, 2], rotation[3, 3], rotation[0, 3] = 0.5, -0.2, 3.0
    for a, expected in ((nonnormal, 0.5), (rotation, 0.9)):
        z = torch.zeros(5, a.shape[0], dtype=torch.float64)
        estimate = il.spectral_radius(lambda z, a=a: z @ a.T, z, iters=a.shape[0])
        torch.testing.assert_close(estimate, torch.full((5,), expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_spectral_radius_is_deterministic_and_leaves_the_global_random_state_alone():
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(3, 40, 40, generator=generator)
    z = torch.randn(3, 40, generator=generator)
    state = torch.get_rng_state()
    first = il.spectral_radius(linear_map(a), z, iters=8)  # k < dim: the start vector matters
    second = il.spectral_radius(linear_map(a), z, iters=8)
    assert torch.equal(first, second) and torch.equal(torch.get_rng_state(), state)
    seeded = [il.spectral_radius(linear_map(a), z, 8, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], first)


def test_spectral_radius_survives_an_early_breakdown():
    # Krylov spaces that become invariant after 0, 1 or 2 steps, next to a generic sample, in one batch:
    # J = 0, rank one (ρ = |bᵀa|, the only nonzero eigenvalue), nilpotent N² = 0, and generic.
    generator = torch.Generator().manual_seed(4)
    n = 8
    u, v = torch.randn(2, n, generator=generator, dtype=torch.float64)
    w = v - (v @ u) / (u @ u) * u  # w ⊥ u: (u wᵀ)² = 0
    generic = torch.randn(n, n, generator=generator, dtype=torch.float64)
    a = torch.stack([torch.zeros(n, n, dtype=torch.float64), torch.outer(u, v), torch.outer(u, w), generic])
    z = torch.randn(4, n, generator=generator, dtype=torch.float64)
    estimate = il.spectral_radius(linear_map(a), z, iters=n)
    assert bool(torch.isfinite(estimate).all())
    assert float(estimate[0]) == 0.0
    torch.testing.assert_close(estimate[1], (u @ v).abs(), rtol=1e-12, atol=0)
    # A defective eigenvalue 0 (Jordan blocks of size 2): rounding moves it by about √(ε)‖N‖.
    assert float(estimate[2]) <= 1e-6 * float(torch.linalg.matrix_norm(a[2], ord=2))
    assert_radius_within(estimate[3:], a[3:])
    # f independent of z (J = 0 without a graph), and f = 0·z (a graph whose VJPs are all zero).
    assert torch.equal(il.spectral_radius(lambda z: torch.ones_like(z), z), torch.zeros(4, dtype=torch.float64))
    assert torch.equal(il.spectral_radius(lambda z: 0 * z, z), torch.zeros(4, dtype=torch.float64))


def test_spectral_radius_reports_a_non_finite_jacobian_as_nan():
    z = torch.ones(3, 4, dtype=torch.float64)
    scale = torch.tensor([[0.5], [math.nan], [0.25]], dtype=torch.float64)
    estimate = il.spectral_radius(lambda z: scale * z, z)
    assert math.isnan(float(estimate[1]))
    torch.testing.assert_close(estimate[[0, 2]], torch.tensor([0.5, 0.25], dtype=torch.float64), rtol=1e-14, atol=0)


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


@given(problem=tanh_maps(), samples=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_jacobian_penalty_is_the_documented_hutchinson_average(problem, samples, seed):
    # The draws are documented (samples × torch.randn(f(z).shape, generator=...)): with them the
    # estimate is exactly mean_s ‖v_sᵀ J‖² / dim, checked against the Jacobians from jacrev.
    w, x, z, jacobians = problem
    estimate = il.jacobian_penalty(
        lambda z: torch.tanh(z @ w.T + x), z, samples, generator=torch.Generator().manual_seed(seed)
    )
    replay = torch.Generator().manual_seed(seed)
    vectors = torch.stack([torch.randn(z.shape, generator=replay, dtype=z.dtype) for _ in range(samples)])
    expected = torch.einsum("sbi,bij->sbj", vectors, jacobians).square().sum(dim=2).mean(dim=0) / z.shape[1]
    torch.testing.assert_close(estimate, expected, rtol=1e-12, atol=1e-15)


def test_jacobian_penalty_gradient_is_the_derivative_of_the_estimate():
    # With a freshly seeded generator per call the estimate is a deterministic function of the
    # parameters: gradcheck compares its autograd gradient with finite differences, in float64.
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    z = torch.randn(3, 4, generator=generator, dtype=torch.float64)

    def penalty(w, x):
        seeded = torch.Generator().manual_seed(1)
        return il.jacobian_penalty(lambda z: torch.tanh(z @ w.T + x), z, samples=3, generator=seeded)

    assert torch.autograd.gradcheck(penalty, (w, x), eps=1e-6, atol=1e-9, rtol=1e-7)


def test_jacobian_penalty_gradient_is_unbiased():
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    z = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    grads = torch.stack(
        [
            torch.autograd.grad(
                il.jacobian_penalty(lambda z: torch.tanh(z @ w.T + x), z, samples=2, generator=generator).sum(), w
            )[0]
            for _ in range(500)
        ]
    )
    exact = torch.func.vmap(torch.func.jacrev(lambda zi, xi: torch.tanh(zi @ w.T + xi)))(z, x).square().sum() / 4
    (reference,) = torch.autograd.grad(exact, w)
    standard_error = grads.std(0) / math.sqrt(len(grads))
    assert bool(((grads.mean(0) - reference).abs() <= 5 * standard_error + 1e-12).all())


def test_bad_arguments_raise():
    f, z = (lambda z: 0.5 * z), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="samples"):
        il.jacobian_penalty(f, z, samples=0)
    with pytest.raises(ValueError, match="iters"):
        il.spectral_radius(f, z, iters=1)
    with pytest.raises(ValueError, match="f must map z to a tensor of z's shape"):
        il.spectral_radius(lambda z: z.sum(dim=1), z)
    for kwargs, message in [
        ({"jacobian_penalty": -1}, "jacobian_penalty"),
        ({"spectral_radius_iters": 1}, "spectral_radius_iters"),
        ({"eval_budget": {"max_iter": 0}}, "eval_budget must be an il.Budget"),
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
    eval_budget = il.Budget(max_iter=3, tol=1e-2)
    layer = il.ImplicitLayer(_Cell(8), solver="picard", tol=1e-10, max_iter=200, eval_budget=eval_budget)
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
    layer = il.ImplicitLayer(_Cell(6), tol=1e-10, max_iter=100, jacobian_penalty=8, spectral_radius_iters=100)
    layer.double()
    x = torch.randn(3, 6, dtype=torch.float64)
    weight = layer.f.mix.parametrizations.weight.original
    losses, exact_losses, grads, exact_grads = [], [], [], []
    for _ in range(60):  # jacobian_loss is a Hutchinson estimate: compare its mean over forwards
        z = layer(x)
        (grad,) = torch.autograd.grad(layer.jacobian_loss, weight)
        losses.append(layer.jacobian_loss.detach())
        grads.append(grad)
        layer.eval()  # the exact value for the weights this forward used (eval: no power-iteration step)
        jacobians = torch.func.vmap(torch.func.jacrev(layer.f))(z.detach(), x)
        exact = jacobians.square().sum(dim=(1, 2)).mean() / 6
        exact_losses.append(exact.detach())
        exact_grads.append(torch.autograd.grad(exact, weight)[0])
        layer.train()
    assert layer.jacobian_loss.dim() == 0
    for ours, reference in ((losses, exact_losses), (grads, exact_grads)):
        error = torch.stack(ours) - torch.stack(reference)
        standard_error = error.std(0) / math.sqrt(len(error))
        assert bool((error.mean(0).abs() <= 5 * standard_error + 1e-12).all())
    # spectral_radius_iters >= dim: the exact spectral radius of J_f(z*), per sample.
    radius = layer.stats.spectral_radius
    torch.testing.assert_close(radius, torch.linalg.eigvals(jacobians).abs().amax(dim=1), rtol=1e-9, atol=0)
    assert bool((radius < 0.9 + 1e-6).all())  # Lip(f in z) <= coeff
    layer.eval()
    layer(x)
    assert layer.jacobian_loss is None  # only in training
    plain = il.ImplicitLayer(_Cell(6))
    plain(x.float())
    assert plain.jacobian_loss is None and plain.stats.spectral_radius is None
