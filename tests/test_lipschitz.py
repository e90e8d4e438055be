"""Spectral normalisation and Lipschitz bounds."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import implicitlayers as il

ACTIVATION_MODULES = st.sampled_from([nn.GELU, nn.ReLU, nn.ELU, nn.Tanh, nn.SiLU, nn.Identity])


def spectral(weight: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(weight.detach().double(), ord=2))


@given(
    out_features=st.integers(1, 64),
    in_features=st.integers(1, 64),
    scale=st.floats(0.1, 10.0),
    coeff=st.floats(0.1, 1.5),
    train=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_normalised_weight_norm_is_at_most_coeff_from_the_first_forward(
    out_features, in_features, scale, coeff, train, seed
):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        layer.weight.mul_(scale)
    raw = spectral(layer.weight)
    il.spectral_norm(layer, coeff=coeff)
    layer.train(train)
    normalised = spectral(layer.weight)
    assert normalised <= coeff * (1 + 1e-5)
    if raw <= coeff:  # soft normalisation leaves small weights alone
        torch.testing.assert_close(layer.weight, layer.parametrizations.weight.original)
    else:
        assert normalised == pytest.approx(coeff, rel=1e-4)


def test_power_iteration_runs_in_training_mode_only():
    torch.manual_seed(0)
    layer = il.spectral_norm(nn.Linear(20, 30), n_power_iterations=3)
    norm = layer.parametrizations.weight[0]
    with torch.no_grad():
        layer.parametrizations.weight.original.add_(0.3 * torch.randn(30, 20))
    u_before = norm.u.clone()
    layer.eval()
    eval_weight = layer.weight
    assert torch.equal(norm.u, u_before) and torch.equal(layer.weight, eval_weight)
    layer.train()
    layer.weight  # noqa: B018  (computing the weight is what advances the power iteration)
    assert not torch.equal(norm.u, u_before)


def test_sigma_is_differentiable_in_the_weight():
    torch.manual_seed(1)
    layer = il.spectral_norm(nn.Linear(6, 5), coeff=0.5).eval()
    original = layer.parametrizations.weight.original
    norm = layer.parametrizations.weight[0]
    (ours,) = torch.autograd.grad(layer.weight.pow(2).sum(), original)
    w = original.detach().clone().requires_grad_()
    sigma = norm.u @ w @ norm.v
    (expected,) = torch.autograd.grad((w / torch.clamp(sigma / 0.5, min=1.0)).pow(2).sum(), w)
    torch.testing.assert_close(ours, expected)


def test_assigning_a_weight_refines_the_estimate():
    layer = il.spectral_norm(nn.Linear(40, 40), coeff=0.9)
    new_weight = 5 * torch.randn(40, 40)
    layer.weight = new_weight
    torch.testing.assert_close(layer.parametrizations.weight.original, new_weight)
    assert spectral(layer.weight) == pytest.approx(0.9, rel=1e-5)


def test_state_dict_round_trips_and_names_its_buffers():
    torch.manual_seed(2)
    source = il.spectral_norm(nn.Linear(8, 8), n_power_iterations=2)
    source(torch.randn(2, 8))
    target = il.spectral_norm(nn.Linear(8, 8))
    state = source.state_dict()
    assert set(state) == {
        "bias",
        "parametrizations.weight.original",
        "parametrizations.weight.0.u",
        "parametrizations.weight.0.v",
    }
    target.load_state_dict(state)
    x = torch.randn(3, 8)
    torch.testing.assert_close(target.eval()(x), source.eval()(x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"coeff": 0.0}, "coeff must be > 0"), ({"n_power_iterations": 0}, "n_power_iterations must be an integer")],
)
def test_bad_spectral_norm_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        il.spectral_norm(nn.Linear(3, 3), **kwargs)
    with pytest.raises(ValueError, match="needs input_shape"):
        il.spectral_norm(nn.Conv1d(2, 2, 3))
    with pytest.raises(ValueError, match="input_shape must be"):
        il.spectral_norm(nn.Conv2d(2, 2, 3), input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="2-D weight"):
        il.spectral_norm(nn.Bilinear(2, 2, 2))


def test_bounds_of_known_modules():
    sn = il.spectral_norm(nn.Linear(4, 4), coeff=0.9)
    reference_g = nn.Sequential(nn.GELU(), sn, nn.GELU(), il.spectral_norm(nn.Linear(4, 4), coeff=0.9))
    assert il.lipschitz_bound(reference_g) == pytest.approx(0.81 * 1.1289**2, rel=1e-4)
    assert il.lipschitz_bound(reference_g) >= 0.81 * 1.128904145**2
    plain = nn.Linear(5, 3)
    assert il.lipschitz_bound(plain) == pytest.approx(spectral(plain.weight), rel=1e-5)
    assert il.lipschitz_bound(nn.ELU(alpha=2.0)) == 2.0
    assert il.lipschitz_bound(nn.Dropout(0.5).train()) == 2.0 and il.lipschitz_bound(nn.Dropout(0.5).eval()) == 1.0
    assert math.isinf(il.lipschitz_bound(nn.Softmax(dim=-1)))
    assert math.isinf(il.lipschitz_bound(nn.Sequential(sn, nn.LayerNorm(4))))

    class Custom(nn.Module):
        def lipschitz_bound(self):
            return 0.25

    assert il.lipschitz_bound(nn.Sequential(Custom(), nn.Tanh())) == 0.25


def test_activation_constants_bound_the_true_derivatives():
    x = torch.linspace(-8, 8, 200001, dtype=torch.float64, requires_grad=True)
    elus = [nn.ELU(alpha=alpha) for alpha in (-2.0, -0.5, 0.5, 1.0, 3.0)]  # α < 0 has slope |α| near 0
    leaky = [nn.LeakyReLU(slope) for slope in (-3.0, 0.1, 2.0)]
    for module in (nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Tanh(), nn.Sigmoid(), *elus, *leaky):
        (slope,) = torch.autograd.grad(module(x).sum(), x)
        true = float(slope.abs().max())
        assert true <= il.lipschitz_bound(module) <= true + 1e-4


@given(
    widths=st.lists(st.integers(1, 24), min_size=2, max_size=4),
    activations=st.lists(ACTIVATION_MODULES, min_size=3, max_size=3),
    coeffs=st.lists(st.floats(0.2, 1.2), min_size=3, max_size=3),
    normalise=st.lists(st.booleans(), min_size=3, max_size=3),
    train=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_bound_is_never_below_the_empirical_lipschitz_ratio(widths, activations, coeffs, normalise, train, seed):
    torch.manual_seed(seed)
    layers = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        linear = nn.Linear(fan_in, fan_out).double()
        with torch.no_grad():
            linear.weight.mul_(3.0)
        layers += [il.spectral_norm(linear, coeff=coeffs[i]) if normalise[i] else linear, activations[i]()]
    g = nn.Sequential(*layers).train(train)
    bound = il.lipschitz_bound(g)
    with torch.no_grad():
        a = torch.randn(256, widths[0], dtype=torch.float64)
        b = a + 10 ** torch.empty(256, 1, dtype=torch.float64).uniform_(-4, 0) * torch.randn_like(a)
        ratios = (g(a) - g(b)).norm(dim=1) / (a - b).norm(dim=1)
    assert float(ratios.max()) <= bound * (1 + 1e-6)


def local_norms(g, x):
    """‖J_g(x)‖₂ at each row of x, from jacrev in float64: the exact local Lipschitz constant there."""
    return torch.linalg.matrix_norm(torch.func.vmap(torch.func.jacrev(g))(x), ord=2)


def build_mlp(widths, activations, coeffs, normalise, seed):
    torch.manual_seed(seed)
    layers = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        linear = nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            linear.weight.mul_(3.0)
        layers += [il.spectral_norm(linear, coeff=coeffs[i]) if normalise[i] else linear, activations[i]()]
    return nn.Sequential(*layers).double().eval()  # eval: the normalised weights stay put


def steepest_local_norm(g, in_features, seed, points=64, starts=4, steps=40):
    """The largest ‖J_g(x)‖₂ found at random points and by gradient ascent on it from the best of them."""
    generator = torch.Generator().manual_seed(seed)
    # Points at scales 0.01 to 3: near the origin too, where smooth activations have their steepest slopes.
    scales = torch.logspace(-2, 0.5, points, dtype=torch.float64)[:, None]
    x = scales * torch.randn(points, in_features, generator=generator, dtype=torch.float64)
    norms = local_norms(g, x).detach()
    found = float(norms.max())
    start = x[norms.topk(min(starts, points)).indices].clone().requires_grad_()
    optimizer = torch.optim.Adam([start], lr=0.1)
    decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.01 ** (1 / steps))  # to 1e-3: settles
    for _ in range(steps):
        values = local_norms(g, start)
        found = max(found, float(values.detach().max()))
        optimizer.zero_grad()
        (-values.sum()).backward()
        optimizer.step()
        decay.step()
    return found


@settings(max_examples=15)
@given(
    widths=st.lists(st.integers(1, 12), min_size=2, max_size=4),
    activations=st.lists(ACTIVATION_MODULES, min_size=3, max_size=3),
    coeffs=st.lists(st.floats(0.2, 1.2), min_size=3, max_size=3),
    normalise=st.lists(st.booleans(), min_size=3, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_bound_is_at_least_the_exact_local_norm_found_by_ascent(widths, activations, coeffs, normalise, seed):
    # Lip(g) = sup_x ‖J_g(x)‖₂ (g is Lipschitz and differentiable almost everywhere): the certified bound
    # must hold at every x, so it is checked against the exact Jacobian norm at random points and
    # wherever gradient ascent on that norm leads, with a float64-rounding slack only.
    g = build_mlp(widths, activations, coeffs, normalise, seed)
    found = steepest_local_norm(g, widths[0], seed)
    assert found <= il.lipschitz_bound(g, current=True) * (1 + 1e-9)
    # The default bound counts a normalised layer's coeff: its weight was normalised with σ̂ from an
    # SVD in float32, so the layer's norm may exceed coeff by float32 rounding (~1e-7), no more.
    assert found <= il.lipschitz_bound(g) * (1 + 1e-6)


@pytest.mark.parametrize("normalised", [False, True])
def test_bound_of_a_linear_map_is_its_exact_norm_and_is_attained(normalised):
    # Where the bound is tight it must equal the exact norm: a linear layer, and the same layer
    # followed by tanh, whose Jacobian diag(tanh'(Wx + b)) W has norm ‖W‖₂ where Wx + b = 0.
    torch.manual_seed(5)
    linear = nn.Linear(7, 5)
    with torch.no_grad():
        linear.weight.mul_(3.0)
    if normalised:
        il.spectral_norm(linear, coeff=0.8)
    linear.double().eval()
    weight = linear.weight.detach()
    exact = float(torch.linalg.matrix_norm(weight, ord=2))
    assert il.lipschitz_bound(linear, current=True) == pytest.approx(exact, rel=1e-12)
    g = nn.Sequential(linear, nn.Tanh())
    root = torch.linalg.lstsq(weight, -linear.bias.detach()[:, None]).solution.T  # W x + b = 0
    attained = float(local_norms(g, root)[0].detach())
    assert attained == pytest.approx(exact, rel=1e-12)
    assert attained <= il.lipschitz_bound(g, current=True) * (1 + 1e-12)
    assert il.lipschitz_bound(g, current=True) == pytest.approx(exact, rel=1e-12)
    # The ascent the property test relies on comes within 2% of it from random points.
    assert steepest_local_norm(g, 7, seed=0) >= exact * 0.98


def test_construction_runs_one_svd_and_works_on_the_meta_device(monkeypatch):
    calls = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *args, **kwargs: calls.append(1) or svd(*args, **kwargs))
    layer = il.spectral_norm(nn.Linear(10, 12))
    assert len(calls) == 1  # registering calls right_inverse with the weight just refined: no second SVD
    layer.weight = torch.randn(12, 10)
    assert len(calls) == 2
    with torch.device("meta"):
        mlp = il.ImplicitMLP(16, 32, activation="relu")
    assert mlp.g[1].weight.shape == (32, 16) and mlp.g[1].weight.device.type == "meta"


def test_a_training_mode_forward_under_a_weight_transform_says_what_to_do():
    layer = il.spectral_norm(nn.Linear(3, 3), 0.9)
    params = {name: p.detach() for name, p in layer.named_parameters()}

    def loss(p):
        return torch.func.functional_call(layer, p, (torch.ones(2, 3),)).sum()

    with pytest.raises(RuntimeError, match=r"call model.eval\(\) before the transform"):
        torch.func.grad(loss)(params)
    layer.eval()  # no power iteration: the transform runs
    assert torch.func.grad(loss)(params)["parametrizations.weight.original"].shape == (3, 3)


def operator_norm(conv: nn.Module, input_shape) -> float:
    """The exact operator norm of a convolution at an input shape: the largest singular value of its matrix."""
    x = torch.zeros(1, *input_shape, dtype=torch.float64)
    matrix = torch.autograd.functional.jacobian(lambda v: conv.double()(v), x).reshape(-1, x.numel())
    return float(torch.linalg.matrix_norm(matrix, ord=2))


@given(
    dims=st.sampled_from([1, 2]),
    channels=st.integers(1, 4),
    out_channels=st.integers(1, 4),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    size=st.integers(3, 6),
    coeff=st.floats(0.3, 1.2),
    seed=st.integers(0, 2**31 - 1),
)
def test_convolutions_are_normalised_as_operators(
    dims, channels, out_channels, kernel, stride, padding, size, coeff, seed
):
    torch.manual_seed(seed)
    conv_type = nn.Conv1d if dims == 1 else nn.Conv2d
    conv = conv_type(channels, out_channels, kernel, stride=stride, padding=padding)
    with torch.no_grad():
        conv.weight.mul_(5.0)  # a norm above coeff, so the normalisation binds
    input_shape = (channels, *([size] * dims))
    raw = operator_norm(conv, input_shape)
    assert il.lipschitz_bound(conv) >= raw * (1 - 1e-6)  # the shape-free bound holds at any size
    il.spectral_norm(conv, coeff=coeff, input_shape=input_shape).double().eval()
    assert il.lipschitz_bound(conv) == coeff
    assert operator_norm(conv, input_shape) <= max(coeff, 0.0) * (1 + 1e-3) + 1e-9
    if raw > coeff * 1.01:  # a binding normalisation lands on coeff, not below it
        assert operator_norm(conv, input_shape) >= coeff * (1 - 1e-2)


def test_weight_norm_is_pytorchs_parametrisation_and_trains_in_a_layer():
    torch.manual_seed(12)
    linear = il.weight_norm(nn.Linear(4, 4))
    assert hasattr(linear.parametrizations.weight, "original0")
    with torch.no_grad():
        linear.parametrizations.weight.original0.fill_(0.5)  # ||W|| small: a contraction

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = linear

        def forward(self, z, x):
            return torch.tanh(0.5 * self.linear(z)) + x

    layer = il.ImplicitLayer(Cell(), tol=1e-6)
    layer(torch.randn(3, 4)).sum().backward()
    assert linear.parametrizations.weight.original0.grad is not None


def test_current_bound_measures_the_normalised_weights_and_shows_a_lagging_estimate():
    torch.manual_seed(0)
    linear = il.spectral_norm(nn.Linear(12, 12), coeff=0.9)
    # At construction the estimate is exact (one SVD): the target and the measurement agree.
    assert il.lipschitz_bound(linear, current=True) == pytest.approx(0.9, rel=1e-5)
    with torch.no_grad():  # a large step: the power-iteration vectors now belong to another matrix
        linear.parametrizations.weight.original.add_(torch.randn(12, 12))
    linear.eval()
    exact = float(torch.linalg.matrix_norm(linear.weight.detach().double(), ord=2))
    assert il.lipschitz_bound(linear, current=True) == pytest.approx(exact, rel=1e-5)
    assert il.lipschitz_bound(linear) == 0.9 < exact  # the target, not what the layer computes now
    linear.train()
    before = linear.parametrizations.weight[0].u.clone()
    il.lipschitz_bound(linear, current=True)
    assert torch.equal(linear.parametrizations.weight[0].u, before)  # measuring advances nothing
    assert linear.training and linear.parametrizations.weight[0].training
    g = nn.Sequential(linear, nn.Tanh(), linear)
    assert il.lipschitz_bound(g, current=True) == pytest.approx(exact**2, rel=1e-5)


def test_current_bound_of_a_normalised_convolution_is_its_operator_norm():
    torch.manual_seed(1)
    conv = il.spectral_norm(nn.Conv2d(2, 3, 3, padding=1), coeff=0.7, input_shape=(2, 6, 6)).double()
    conv.eval()
    weight = conv.weight.detach()
    operator = torch.func.jacrev(lambda x: nn.functional.conv2d(x, weight, padding=1))(
        torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    ).reshape(3 * 36, 2 * 36)
    true = float(torch.linalg.matrix_norm(operator, ord=2))
    assert il.lipschitz_bound(conv, current=True) == pytest.approx(true, rel=1e-4)
