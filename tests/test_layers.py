"""Layers: inverse accuracy, shapes, initial guesses, convergence policies, spectral norm in the loop."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import implicitlayers as il
from tests.strategies import SOLVERS

ALL_ACTIVATIONS = st.sampled_from(["gelu", "relu", "elu", "tanh", "silu"])


def quiet(factory, *args, **kwargs):
    """Builds a layer whose Lipschitz warning is expected and irrelevant to the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", il.LipschitzWarning)
        return factory(*args, **kwargs)


def relative_error(a, b):
    return float(((a - b).norm() / b.norm()).detach())


@given(
    features=st.integers(2, 24),
    hidden=st.integers(2, 48),
    batch=st.integers(1, 33),
    activation=ALL_ACTIVATIONS,
    pre_activation=st.booleans(),
    coeff=st.floats(0.3, 0.85),
    solver=SOLVERS,
    seed=st.integers(0, 2**31 - 1),
)
def test_implicit_mlp_inverse_recovers_the_input(
    features, hidden, batch, activation, pre_activation, coeff, solver, seed
):
    torch.manual_seed(seed)
    layer = il.ImplicitMLP(
        features,
        hidden,
        activation=activation,
        pre_activation=pre_activation,
        coeff=coeff,
        solver=solver,
        tol=1e-10,
        max_iter=200,  # picard needs ~log(1e-10)/log(rate) steps: about 150 at rate 0.85
    ).double()
    x = 3 * torch.randn(batch, features, dtype=torch.float64)
    z = layer(x)
    assert bool(layer.stats.converged.all())
    assert relative_error(layer.inverse(z), x) <= 1e-8
    # z really solves z = x + g(z), row by row.
    assert relative_error(z, x + layer.g(z)) <= 1e-9


@given(
    dim=st.integers(2, 16),
    batch=st.integers(1, 33),
    activation=ALL_ACTIVATIONS,
    coeff=st.floats(0.3, 0.85),
    solver=SOLVERS,
    seed=st.integers(0, 2**31 - 1),
)
def test_invertible_residual_inverse_recovers_the_input(dim, batch, activation, coeff, solver, seed):
    torch.manual_seed(seed)
    act = il.layers.invertible.make_activation(activation)
    g = nn.Sequential(
        il.spectral_norm(nn.Linear(dim, 2 * dim), coeff), act, il.spectral_norm(nn.Linear(2 * dim, dim), coeff)
    )
    block = il.InvertibleResidual(g, solver=solver, tol=1e-10, max_iter=200).double()
    x = torch.randn(batch, dim, dtype=torch.float64)
    assert relative_error(block.inverse(block(x)), x) <= 1e-8
    assert bool(block.stats.converged.all())


def test_invertible_residual_inverse_is_differentiable():
    torch.manual_seed(0)
    g = nn.Sequential(il.spectral_norm(nn.Linear(5, 5), 0.6), nn.Tanh())
    block = il.InvertibleResidual(g, tol=1e-12, max_iter=100).double().eval()
    y = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(block.inverse(y).sum(), y)
    # d x / d y = (I + J_g(x))^{-1}; check against the explicit Jacobian of the forward map.
    x = block.inverse(y).detach()
    for i in range(3):
        jac = torch.func.jacrev(lambda v: block(v[None])[0])(x[i])
        expected = torch.linalg.solve(jac.T, torch.ones(5, dtype=torch.float64))
        torch.testing.assert_close(grad[i], expected)


def test_implicit_mlp_accepts_any_leading_shape_and_rows_are_independent():
    torch.manual_seed(1)
    layer = quiet(il.ImplicitMLP, 8, 16, tol=1e-6).double()  # float64: 1e-6 is near float32 rounding
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    z = layer(x)
    assert z.shape == x.shape
    torch.testing.assert_close(layer(x[1, 2]), z[1, 2])
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 8\)"):
        layer(torch.randn(3, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 8\), got \(\)"):
        layer(torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(layer.inverse(z), x, rtol=0, atol=1e-4)  # inverse takes the same shapes
    for bad in (torch.randn(3, 7, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"z must have shape \(\.\.\., 8\)"):
            layer.inverse(bad)


def test_default_implicit_mlp_converges_and_trains():
    torch.manual_seed(2)
    layer = quiet(il.ImplicitMLP, 16, 32)
    head = nn.Linear(16, 1)
    optimizer = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=1e-2)
    x, target = torch.randn(64, 16), torch.randn(64, 1)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(head(layer(x)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    assert bool(layer.stats.converged.all()) and bool(layer.backward_stats.converged.all())


def test_power_iteration_advances_once_per_training_forward_not_per_solver_step():
    torch.manual_seed(3)
    layer = quiet(il.ImplicitMLP, 6, 12, tol=1e-8, n_power_iterations=2).double()  # 1e-8: float64 only
    norm = layer.g[1].parametrizations.weight[0]
    weight = layer.g[1].parametrizations.weight.original.detach()
    u, v = norm.u.clone(), norm.v.clone()
    layer.train()
    layer(torch.randn(4, 6, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert int(layer.stats.nstep.max()) > 3
    for _ in range(2):
        v = nn.functional.normalize(weight.t() @ u, dim=0)
        u = nn.functional.normalize(weight @ v, dim=0)
    torch.testing.assert_close(norm.u, u)
    torch.testing.assert_close(norm.v, v)
    assert layer.g[1].parametrizations.weight.original.grad is not None

    before = norm.u.clone()
    layer.eval()
    first = layer(torch.ones(2, 6, dtype=torch.float64))
    assert torch.equal(norm.u, before) and torch.equal(layer(torch.ones(2, 6, dtype=torch.float64)), first)


def test_state_dict_round_trips():
    # float64: a float32 solve to 1e-8 sits at the edge of float32 rounding, which differs between CPUs.
    torch.manual_seed(4)
    source = quiet(il.ImplicitMLP, 6, 12, tol=1e-8).double()
    source.train()
    source(torch.randn(3, 6, dtype=torch.float64))  # advance u, v so they differ from a fresh layer's
    target = quiet(il.ImplicitMLP, 6, 12, tol=1e-8).double()
    target.load_state_dict(source.state_dict())
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(target.eval()(x), source.eval()(x))
    keys = set(source.state_dict())
    assert {"g.1.parametrizations.weight.original", "g.1.parametrizations.weight.0.u", "g.3.bias"} <= keys


@pytest.mark.parametrize("z_init", ["zeros", "input", lambda x: 0.5 * x])
def test_initial_guesses_reach_the_same_fixed_point(z_init):
    torch.manual_seed(5)
    layer = quiet(il.ImplicitMLP, 6, 12, tol=1e-10, z_init=z_init).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    reference = quiet(il.ImplicitMLP, 6, 12, tol=1e-10).double()
    reference.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-8, atol=1e-8)


def test_the_input_is_a_better_start_than_zeros():
    torch.manual_seed(6)
    layers = {init: quiet(il.ImplicitMLP, 8, 16, tol=1e-6, z_init=init).double() for init in ("zeros", "input")}
    layers["input"].load_state_dict(layers["zeros"].state_dict())
    x = 5 * torch.randn(16, 8, dtype=torch.float64)
    steps = {init: int(layer(x) is not None and layer.stats.nstep.sum()) for init, layer in layers.items()}
    assert steps["input"] < steps["zeros"]


class _Expanding(nn.Module):
    def forward(self, z, x):
        return 1.5 * z + x


def test_non_convergence_warns_with_fraction_and_residual_and_is_rate_limited():
    layer = il.ImplicitLayer(_Expanding(), solver="picard", max_iter=5, tol=1e-6)
    x = torch.ones(4, 3)
    with pytest.warns(
        il.ConvergenceWarning, match=r"100\.0% of samples \(4 ran out of max_iter; max residual .* > tol 1e-06"
    ):
        layer(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(9):  # occurrences 2..10: only the 10th warns
            layer(x)
    assert [str(w.message).count("occurrence 10") for w in caught] == [1]


def test_non_convergence_can_raise_or_be_ignored():
    x = torch.ones(4, 3)
    with pytest.raises(il.ConvergenceError, match="did not converge"):
        il.ImplicitLayer(_Expanding(), solver="picard", max_iter=5, on_nonconvergence="raise")(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = il.ImplicitLayer(_Expanding(), solver="picard", max_iter=5, on_nonconvergence="ignore")(x)
    assert bool(torch.isfinite(z).all())


def test_stats_are_detached_solver_results():
    layer = quiet(il.ImplicitMLP, 4, 8, tol=1e-6).double()
    layer(torch.randn(3, 4, dtype=torch.float64, requires_grad=True))
    assert isinstance(layer.stats, il.SolverResult)
    assert not layer.stats.z.requires_grad
    assert set(layer.stats.summary()) == {
        "nstep_mean",
        "nstep_max",
        "residual_max",
        "unconverged",
        "non_finite",
        "diverged",
    }


def test_lipschitz_warnings_follow_the_certified_bound():
    with pytest.warns(il.LipschitzWarning, match=r"bounded only by 1\.032"):
        il.ImplicitMLP(8, 16)  # the reference iMixer setting: GELU before both layers, coeff 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        il.ImplicitMLP(8, 16, activation="relu")
        il.ImplicitMLP(8, 16, coeff=0.85)
        il.InvertibleResidual(nn.Sequential(il.spectral_norm(nn.Linear(4, 4), 0.9), nn.Tanh()))
    with pytest.warns(il.LipschitzWarning, match="cannot be bounded"):
        il.InvertibleResidual(nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=-1)))


def test_bf16_autocast_forward_and_backward():
    torch.manual_seed(7)
    layer = quiet(il.ImplicitMLP, 8, 16, tol=1e-2)
    x = torch.randn(4, 8, requires_grad=True)
    cotangent = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(x)
    assert z.dtype == torch.float32
    (z * cotangent).sum().backward()
    # Under autocast f runs in bf16 (about 3 significant digits) while the solver iterates in float32:
    # the value and the gradient are the float32 ones to bf16's precision, not just finite.
    layer.eval()  # the same weights for the float32 reference (no power-iteration step)
    reference_x = x.detach().clone().requires_grad_()
    reference = layer(reference_x)
    (reference * cotangent).sum().backward()
    assert relative_error(z.detach(), reference.detach()) <= 3e-2
    assert relative_error(x.grad, reference_x.grad) <= 5e-2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"backward": "adjoint"},
            r"backward must be an il.Gradient or one of \['ift', 'shine', 'jfb', 'phantom', 'unrolled'\]",
        ),
        ({"activation": "swish"}, "activation must be one of"),
        ({"solver": "newton"}, "unknown solver 'newton'; available"),
        ({"max_iter": 0}, "max_iter"),
        ({"tol": -1e-3}, "tol"),
        ({"z_init": "ones"}, "z_init must be"),
        ({"on_nonconvergence": "panic"}, "on_nonconvergence must be one of"),
        ({"budget": {"max_iter": 3}}, "budget must be an il.Budget"),
        ({"eval_budget": 3}, "eval_budget must be an il.Budget or None"),
    ],
)
def test_bad_layer_arguments_raise_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quiet(il.ImplicitMLP, 4, 8, **kwargs)


@pytest.mark.parametrize(
    ("name", "bad", "good", "message"),
    [
        ("on_nonconvergence", "rasie", "raise", r"on_nonconvergence must be one of \['warn', 'raise', 'ignore'\]"),
        ("warm_start", "yes", True, "warm_start must be True or False"),
        ("jacobian_penalty", -1, 2, "jacobian_penalty must be an integer >= 0"),
        ("spectral_radius_iters", 1, 3, "spectral_radius_iters must be 0 or an integer >= 2"),
        ("correction_states_count", 1.5, 2, "correction_states_count must be an integer >= 0"),
    ],
)
def test_a_setting_assigned_after_construction_is_checked_as_at_it(name, bad, good, message):
    layer = quiet(il.ImplicitMLP, 4, 8)
    before = getattr(layer, name)
    with pytest.raises(ValueError, match=message):
        setattr(layer, name, bad)
    assert getattr(layer, name) == before  # a refused value leaves the setting as it was
    setattr(layer, name, good)
    assert getattr(layer, name) == good
    with pytest.raises(ValueError, match=name if name != "correction_states_count" else "correction_states"):
        quiet(il.ImplicitMLP, 4, 8, **{name.removesuffix("_count"): bad})


def test_a_setting_assigned_after_construction_takes_effect():
    torch.manual_seed(0)
    layer = quiet(il.ImplicitMLP, 4, 8, max_iter=1)  # one evaluation cannot reach tol 1e-4
    layer.on_nonconvergence = "raise"
    with pytest.raises(il.ConvergenceError):
        layer(torch.randn(3, 4))
    layer.on_nonconvergence, layer.spectral_radius_iters = "ignore", 3
    layer(torch.randn(3, 4))
    assert layer.stats.spectral_radius.shape == (3,)


def test_implicit_layer_requires_a_callable():
    with pytest.raises(ValueError, match="f must be callable"):
        il.ImplicitLayer("tanh")


def test_any_callable_is_a_map_and_its_captured_weights_get_gradients():
    torch.manual_seed(9)
    w = (0.5 * torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]).requires_grad_()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    layer = il.ImplicitLayer(lambda z, x: torch.tanh(z @ w.T) + x, tol=1e-12, max_iter=200)
    grads = torch.autograd.grad(layer(x).sin().sum(), [x, w])
    z = torch.zeros_like(x)
    for _ in range(300):
        z = torch.tanh(z @ w.T) + x
    expected = torch.autograd.grad(z.sin().sum(), [x, w])
    for ours, reference in zip(grads, expected, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-11)


class _Coupled(nn.Module):
    """A two-resolution state: a (B, 3) vector and a (B, 2, 2) map, each driving the other."""

    def __init__(self):
        super().__init__()
        self.a = il.spectral_norm(nn.Linear(3, 3), 0.4)
        self.b = il.spectral_norm(nn.Linear(4, 4), 0.4)
        self.ab = il.spectral_norm(nn.Linear(4, 3), 0.4)
        self.ba = il.spectral_norm(nn.Linear(3, 4), 0.4)

    def forward(self, z, x):
        coarse, fine = z["coarse"], z["fine"].flatten(1)
        new_coarse = torch.tanh(self.a(coarse) + self.ab(fine) + x[:, :3])
        new_fine = torch.tanh(self.b(fine) + self.ba(coarse) + x[:, 3:])
        return {"coarse": new_coarse, "fine": new_fine.reshape(-1, 2, 2)}


def test_structured_states_are_solved_as_one_vector_per_sample():
    torch.manual_seed(10)
    cell = _Coupled().double().eval()

    def z_init(x):
        return {"coarse": x.new_zeros(len(x), 3), "fine": x.new_zeros(len(x), 2, 2)}

    layer = il.ImplicitLayer(cell, z_init=z_init, tol=1e-12, max_iter=200)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    z = layer(x)
    assert set(z) == {"coarse", "fine"} and z["fine"].shape == (5, 2, 2)
    image = cell(z, x)
    torch.testing.assert_close(image["fine"], z["fine"], rtol=1e-10, atol=1e-10)
    (ours,) = torch.autograd.grad(z["coarse"].sum() + z["fine"].square().sum(), x)
    loop = z_init(x)
    for _ in range(300):
        loop = cell(loop, x)
    (reference,) = torch.autograd.grad(loop["coarse"].sum() + loop["fine"].square().sum(), x)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-11)
    # The same through the functional entry point, and a wrong structure from f is named.
    functional = il.fixed_point(cell, x, z_init(x), tol=1e-12, max_iter=200)
    torch.testing.assert_close(functional["coarse"], z["coarse"])
    with pytest.raises(ValueError, match="f must return z's structure"):
        il.fixed_point(lambda z, x: z["coarse"], x, z_init(x))
    with pytest.raises(ValueError, match="same batch size"):
        il.fixed_point(cell, x, {"coarse": x.new_zeros(5, 3), "fine": x.new_zeros(4, 2, 2)})


@pytest.mark.parametrize(("dtype", "accuracy"), [(torch.float16, 1e-2), (torch.bfloat16, 5e-2), (torch.float64, 1e-9)])
def test_layers_run_and_return_in_the_modules_dtype(dtype, accuracy):
    # The solver iterates in float32 at least and calls f in the module's dtype.
    torch.manual_seed(8)
    tol = 1e-10 if dtype == torch.float64 else 1e-2
    layer = il.ImplicitMLP(8, 16, activation="tanh", coeff=0.8, tol=tol, max_iter=100).to(dtype)
    x = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    z = layer(x)
    assert z.dtype == dtype and layer.stats.z.dtype == torch.promote_types(dtype, torch.float32)
    assert bool(layer.stats.converged.all())
    z.float().square().sum().backward()
    assert x.grad.dtype == dtype and bool(torch.isfinite(x.grad).all())
    assert relative_error(layer.inverse(z).double(), x.double()) <= accuracy
    g = nn.Sequential(il.spectral_norm(nn.Linear(8, 8), 0.7), nn.Tanh())
    block = il.InvertibleResidual(g, tol=tol, max_iter=100).to(dtype)
    assert block.inverse(block(x)).dtype == dtype


class _DroppedCell(nn.Module):
    def __init__(self, dim: int, p: float):
        super().__init__()
        self.mix = il.spectral_norm(nn.Linear(dim, dim), 0.6)
        self.drop = il.VariationalDropout(p)

    def forward(self, z, x):
        return torch.tanh(self.drop(self.mix(z))) + x


def test_variational_dropout_keeps_one_mask_per_forward():
    torch.manual_seed(11)
    layer = il.ImplicitLayer(_DroppedCell(6, 0.5), tol=1e-12, max_iter=200).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    z = layer(x)
    mask = layer.f.drop.mask
    assert mask is not None and set(mask.unique().tolist()) <= {0.0, 2.0}
    # The solve converged, so the map was one map: z = f(z, x) with this forward's mask.
    assert bool(layer.stats.converged.all())
    torch.testing.assert_close(z, layer.f(z, x), rtol=1e-10, atol=1e-10)
    # The IFT gradient is that of the fixed point of that map (autograd through a long loop, same mask).
    (ours,) = torch.autograd.grad(z.sum(), x)
    loop = torch.zeros_like(x)
    for _ in range(300):
        loop = layer.f(loop, x)
    (reference,) = torch.autograd.grad(loop.sum(), x)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-11)
    layer(x)  # the next forward draws a new mask, without a manual reset
    assert not torch.equal(layer.f.drop.mask, mask)
    layer.eval()
    torch.testing.assert_close(layer.f.drop(x), x)  # identity in eval mode
    assert il.lipschitz_bound(layer.f.drop.train()) == 2.0
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        il.VariationalDropout(1.0)


def test_correction_states_follow_the_solve_with_one_step_gradients():
    torch.manual_seed(13)
    cell = _DroppedCell(6, 0.0)
    layer = il.ImplicitLayer(cell, solver="picard", tol=1e-10, max_iter=100, correction_states=3).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    z = layer(x)
    states = layer.correction_states
    assert len(states) == 3 and all(state.shape == z.shape and state.grad_fn is not None for state in states)
    distances = [float((state - z).norm()) for state in states]
    assert distances[0] > distances[1] > distances[2] and distances[2] < 1e-8  # along the trajectory
    # Each state is f(z_i) differentiated with z_i held constant: its x-gradient is one step's, ∂f/∂x = I.
    (grad,) = torch.autograd.grad(states[0].sum(), x)
    torch.testing.assert_close(grad, torch.ones_like(x))
    layer.eval()
    layer(x)
    assert layer.correction_states is None  # training only
    with pytest.raises(ValueError, match="correction_states"):
        il.ImplicitLayer(cell, correction_states=-1)


def test_compact_rows_gives_the_same_values_and_gradients_for_fewer_evaluations():
    torch.manual_seed(0)

    class CountingCell(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = il.spectral_norm(nn.Linear(6, 6), coeff=0.9)
            self.rows_seen = 0

        def forward(self, z, x):
            self.rows_seen += len(z)
            return torch.tanh(self.mix(z) + x)

    cell = CountingCell().double().eval()
    # Large inputs saturate tanh (a fast contraction), small ones do not: a few slow samples.
    scale = torch.full((32, 1), 20.0, dtype=torch.float64)
    scale[:4] = 1e-2
    x = torch.randn(32, 6, dtype=torch.float64) * scale
    results = {}
    for compact in (False, True):
        cell.rows_seen = 0
        layer = il.ImplicitLayer(cell, budget=il.Budget(tol=1e-11, max_iter=300, compact_rows=compact))
        xr = x.clone().requires_grad_()
        out = layer(xr)
        grads = torch.autograd.grad(out.square().sum(), [xr, *cell.parameters()])
        results[compact] = (out.detach(), grads, cell.rows_seen, layer.stats.nstep)
    (out_a, grads_a, seen_a, nstep_a), (out_b, grads_b, seen_b, nstep_b) = results[False], results[True]
    assert torch.equal(nstep_a, nstep_b)  # each sample iterates as if alone
    torch.testing.assert_close(out_b, out_a, rtol=1e-9, atol=1e-12)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)
    assert int(nstep_b.max()) > 2 * int(nstep_b.min())  # a spread the compaction can use
    assert seen_b < seen_a


def test_compact_rows_refuses_variational_dropout_and_bad_values():
    class Cell(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = il.spectral_norm(nn.Linear(4, 4), coeff=0.5)
            self.drop = il.VariationalDropout(0.2)

        def forward(self, z, x):
            return torch.tanh(self.drop(self.mix(z)) + x)

    layer = il.ImplicitLayer(Cell(), budget=il.Budget(compact_rows=True))
    with pytest.raises(ValueError, match=r"compact_rows=True .* VariationalDropout"):
        layer(torch.randn(3, 4))
    layer.eval()
    assert layer(torch.randn(3, 4)).shape == (3, 4)  # dropout is the identity in eval mode
    with pytest.raises(ValueError, match="compact_rows must be True or False"):
        il.Budget(compact_rows=1)
    with pytest.raises(ValueError, match="compact_rows=True needs sync_every=1"):
        il.Budget(compact_rows=True, sync_every=4)


# ------------------------------------------------------------------ transforms, devices, round trips
def test_jacrev_of_a_fresh_layer_in_training_mode_says_to_use_eval_mode():
    # A new layer is in training mode, whose forward writes the power iteration's buffers: torch.func
    # refuses that in-place write with an opaque message about captured tensors. Ours says what to do.
    layer = quiet(il.ImplicitMLP, 4, 8, tol=1e-10, max_iter=100)
    x = torch.randn(2, 4)
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        with pytest.raises(RuntimeError, match=r"call model\.eval\(\) before the transform"):
            transform(layer)(x)
    layer.eval()
    layer.double()
    x = x.double()
    jacobian = torch.func.jacrev(layer)(x)  # (2, 4, 2, 4): rows are independent
    z = layer(x).detach()
    for i in range(2):
        dg = torch.func.jacrev(layer.g)(z[i])
        exact = torch.linalg.inv(torch.eye(4, dtype=torch.float64) - dg)  # dz/dx = (I - J_g)⁻¹
        torch.testing.assert_close(jacobian[i, :, i], exact, rtol=1e-7, atol=1e-9)
        assert float(jacobian[i, :, 1 - i].detach().abs().max()) == 0.0


@pytest.mark.parametrize("backward", ["ift", "jfb", "phantom", "shine", "unrolled"])
def test_layers_run_on_the_meta_device_with_real_shapes(backward):
    # Shape inference (models built on "meta", FLOP counters) runs through a solve: shapes and dtypes
    # are real, and nothing that needs a value is computed.
    with torch.device("meta"):
        mlp = quiet(il.ImplicitMLP, 6, 12, backward=il.Phantom(steps=2) if backward == "phantom" else backward)
        block = quiet(il.InvertibleResidual, il.spectral_norm(nn.Linear(6, 6)), backward=backward, solver="anderson")
        x = torch.randn(3, 5, 6, requires_grad=True)
    for mode in ("train", "eval"):
        for layer in (mlp, block):
            getattr(layer, mode)()
        z = mlp(x)
        y = block.inverse(z.reshape(15, 6))
        assert z.shape == (3, 5, 6) and z.device.type == "meta" and y.shape == (15, 6)
        y.sum().backward()
        assert x.grad.shape == x.shape and x.grad.device.type == "meta"
        assert mlp.stats.nstep.shape == (15,) and mlp.stats.nstep.device.type == "meta"


@pytest.mark.parametrize("layer_kind", ["mlp", "residual"])
def test_inverse_of_forward_is_exact_in_training_mode_too(layer_kind):
    # Only a training-mode forward advances the power iteration; the inverse inverts the map that
    # forward used (one more power step in between once left an error of ~1e-4).
    torch.manual_seed(0)
    if layer_kind == "mlp":
        layer = il.ImplicitMLP(6, 12, activation="tanh", tol=1e-12, max_iter=200).double()
    else:
        g = nn.Sequential(il.spectral_norm(nn.Linear(6, 12), 0.7), nn.Tanh(), il.spectral_norm(nn.Linear(12, 6), 0.7))
        layer = il.InvertibleResidual(g, tol=1e-12, max_iter=200).double()
    layer.train()
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        for parameter in layer.parameters():  # an optimizer step: the power iteration lags behind it
            parameter.add_(0.3 * torch.randn_like(parameter))
        torch.testing.assert_close(layer.inverse(layer(x)), x, rtol=0, atol=1e-9)


# ------------------------------------------------------------------ settings as objects
def test_every_earlier_flat_keyword_names_its_new_spelling():
    spellings = {
        "solver_options": "il.Anderson(memory=...)",
        "stop_mode": "il.Budget(stop_mode=...)",
        "compact_rows": "il.Budget(compact_rows=True)",
        "sync_every": "il.Budget(sync_every=...)",
        "eval_max_iter": "eval_budget=il.Budget",
        "eval_tol": "eval_budget=il.Budget",
        "backward_solver": "il.IFT(solver=...)",
        "backward_max_iter": "il.IFT(max_iter=...)",
        "backward_tol": "il.IFT(tol=...)",
        "phantom_steps": "il.Phantom(steps=...)",
        "phantom_damping": "il.Phantom(damping=...)",
        "shine_refine": "il.Shine(refine=...)",
    }
    for name, spelling in spellings.items():
        for build in (
            lambda **kw: il.ImplicitLayer(_Contraction(), **kw),
            lambda **kw: quiet(il.ImplicitMLP, 4, 8, **kw),
        ):
            with pytest.raises(TypeError, match=rf"no longer takes {name}=; use .*{re.escape(spelling)}"):
                build(**{name: 1})
    with pytest.raises(TypeError, match="unexpected keyword argument 'tolerance'"):
        il.ImplicitLayer(_Contraction(), tolerance=1e-3)


class _Contraction(nn.Module):
    def forward(self, z, x):
        return 0.5 * torch.tanh(z) + x


def test_budgets_and_modes_follow_later_changes_and_nothing_is_stale():
    # The eval budget and the adjoint's budget default to the forward budget, read at each forward:
    # changing tol after construction moves all three, validated.
    layer = il.ImplicitLayer(_Contraction(), tol=1e-3, max_iter=50).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    layer.tol = 1e-12
    assert layer.budget == il.Budget(max_iter=50, tol=1e-12)
    layer(x).sum().backward()
    assert float(layer.stats.residual.max()) <= 1e-12 and float(layer.backward_stats.residual.max()) <= 1e-12
    layer.eval()
    layer(x)
    assert layer.stats.budget.tol == 1e-12  # eval mode follows too, with no eval_budget set
    layer.eval_budget = il.Budget(max_iter=2, tol=0.0)  # a fixed budget: nothing to warn of
    layer(x)
    assert (
        layer.stats.budget.max_iter == 2
        and set(layer.stats.status.tolist()) == {int(il.Status.budget)}
        and int(layer.stats.nstep.max()) <= 2
    )
    with pytest.raises(ValueError, match="tol must be a finite number"):
        layer.tol = -1.0
    with pytest.raises(ValueError, match="max_iter must be an integer"):
        layer.max_iter = 0
    assert layer.budget == il.Budget(max_iter=50, tol=1e-12)  # a refused change leaves it as it was
    layer.backward = il.Phantom(steps=3)
    assert layer.backward == il.Phantom(steps=3)
    layer.solver = "broyden"
    assert layer.solver == il.Broyden()


def test_settings_are_small_immutable_validated_objects():
    import dataclasses

    for obj, field in ((il.Anderson(), "memory"), (il.Budget(), "tol"), (il.IFT(), "tol"), (il.Phantom(), "steps")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field, 3)
    assert il.IFT(solver="broyden").solver == il.Broyden()  # a name is shorthand for the default object
    assert il.as_gradient("phantom") == il.Phantom() and il.as_solver("anderson") == il.Anderson()
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        il.Phantom(steps=0)
    with pytest.raises(ValueError, match="damping must be in"):
        il.Phantom(damping=0.0)
    with pytest.raises(ValueError, match="unknown solver"):
        il.IFT(solver="newton")
    with pytest.raises(ValueError, match="memory must be an integer >= 1"):
        il.Anderson(memory=0)
    with pytest.raises(ValueError, match="method must be one of"):
        il.Broyden(method="third")
    with pytest.raises(ValueError, match=r"options .* apply to a solver name"):
        il.as_solver(il.Anderson(), memory=3)
    assert il.Budget().replace(tol=1e-6) == il.Budget(tol=1e-6)
    with pytest.raises(ValueError, match="Budget has no field"):
        il.Budget().replace(tolerance=1e-6)


def test_a_layer_with_compiled_chunks_gives_the_eager_values_and_gradients():
    torch.manual_seed(0)
    budget = il.Budget(max_iter=100, tol=1e-10, sync_every=3)
    eager = quiet(il.ImplicitMLP, 8, 16, activation="gelu", solver="anderson", budget=budget).double()
    compiled = quiet(il.ImplicitMLP, 8, 16, activation="gelu", solver="anderson", budget=budget)
    compiled.budget = budget.replace(compile_backend="aot_eager")
    compiled = compiled.double()
    compiled.load_state_dict(eager.state_dict())
    for layer in (eager, compiled):
        layer.eval()
    x = torch.randn(32, 8, dtype=torch.float64)
    outputs = []
    for layer in (eager, compiled):
        xr = x.clone().requires_grad_()
        out = layer(xr)
        (grad,) = torch.autograd.grad(out.sin().sum(), xr)
        outputs.append((out.detach(), grad, layer.stats.nstep))
    (out_e, grad_e, nstep_e), (out_c, grad_c, nstep_c) = outputs
    assert torch.equal(nstep_c, nstep_e) and int(nstep_e.max()) > 4
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-9, atol=1e-12)


def test_torch_compile_sees_each_solve_as_one_graph_break():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), quiet(il.ImplicitMLP, 8, 16, tol=1e-6), nn.Linear(8, 8), nn.Tanh())
    model.eval()
    x = torch.randn(16, 8)
    explanation = torch._dynamo.explain(model)(x)
    # Two graphs, one on each side of the solve, which runs eagerly (torch.compiler.disable).
    assert explanation.graph_count == 2, [str(r.reason)[:120] for r in explanation.break_reasons]
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)
