"""Gradient modes against autograd through long unrolled solves and against the closed form."""

from __future__ import annotations

import gc
import math
import statistics
import weakref

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import implicitlayers as il
from tests.strategies import UNIT_ACTIVATIONS, max_iter_for, relative_error, tolerance_for

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "elu": nn.functional.elu}


class Cell(nn.Module):
    """f(z, x) = act(W_sn z + U x + b) with ||W_sn||₂ <= coeff < 1: a contraction in z."""

    def __init__(self, dim: int, activation: str, coeff: float) -> None:
        super().__init__()
        self.recurrent = il.spectral_norm(nn.Linear(dim, dim, bias=False), coeff=coeff)
        self.inject = nn.Linear(dim, dim)
        self.activation = ACTIVATIONS[activation]

    def forward(self, z, x):
        return self.activation(self.recurrent(z) + self.inject(x))


@st.composite
def problems(draw, max_dim=8, max_batch=5):
    dim = draw(st.integers(2, max_dim))
    batch = draw(st.integers(1, max_batch))
    activation = draw(UNIT_ACTIVATIONS)
    coeff = draw(st.floats(0.2, 0.8))
    seed = draw(st.integers(0, 2**31 - 1))
    torch.manual_seed(seed)
    cell = Cell(dim, activation, coeff).double()
    with torch.no_grad():  # spread the weights so the recurrent layer is really normalised at coeff
        cell.recurrent.parametrizations.weight.original.mul_(3.0)
    cell.recurrent.parametrizations.weight[0].refine_(cell.recurrent.parametrizations.weight.original)
    x = torch.randn(batch, dim, dtype=torch.float64)
    cotangent = torch.randn(batch, dim, dtype=torch.float64)
    return cell, x, cotangent


def gradients(cell, x, cotangent, **layer_kwargs):
    """Gradients of <cotangent, z*(x)> w.r.t. x and every parameter of the cell."""
    layer = il.ImplicitLayer(cell, **layer_kwargs).eval()
    x = x.clone().requires_grad_()
    z = layer(x)
    grads = torch.autograd.grad((z * cotangent).sum(), [x, *cell.parameters()])
    return torch.cat([g.flatten() for g in grads]), layer


@given(problem=problems(), solver=st.sampled_from(["picard", "anderson", "broyden"]))
def test_ift_gradients_match_autograd_through_a_long_unrolled_solve(problem, solver):
    cell, x, cotangent = problem
    ift, layer = gradients(cell, x, cotangent, solver=solver, tol=1e-12, max_iter=300, backward="ift")
    unrolled, _ = gradients(cell, x, cotangent, backward="unrolled", tol=0.0, max_iter=300)
    assert relative_error(ift, unrolled) <= 1e-6
    assert layer.backward_stats is not None and bool(layer.backward_stats.converged.all())


@given(problem=problems(max_dim=5, max_batch=3))
def test_ift_input_gradient_matches_the_closed_form(problem):
    cell, x, cotangent = problem
    layer = il.ImplicitLayer(cell, tol=1e-13, max_iter=300).eval()
    x_req = x.clone().requires_grad_()
    (grad_x,) = torch.autograd.grad((layer(x_req) * cotangent).sum(), x_req)
    z_star = layer.stats.z
    dim = x.shape[1]
    for i in range(x.shape[0]):

        def f_single(z, x_i):
            return cell(z[None], x_i[None])[0]

        # z* solves F(z, x) = f(z, x) - z = 0, so dz*/dx = -(∂F/∂z)^{-1} ∂F/∂x = (I - ∂f/∂z)^{-1} ∂f/∂x.
        df_dz, df_dx = torch.func.jacrev(f_single, argnums=(0, 1))(z_star[i], x[i])
        dF_dz = df_dz - torch.eye(dim, dtype=torch.float64)
        dz_dx = -torch.linalg.solve(dF_dz, df_dx)
        expected = cotangent[i] @ dz_dx
        assert relative_error(grad_x[i], expected) <= 1e-8


@given(problem=problems())
def test_phantom_gradients_approach_the_ift_gradient(problem):
    cell, x, cotangent = problem
    ift, _ = gradients(cell, x, cotangent, tol=1e-12, max_iter=300)
    assume(float(ift.norm()) > 1e-8)  # a relu cell can be dead on every input: no direction to compare
    cosines = []
    for steps in (1, 4, 16, 64):
        phantom, _ = gradients(cell, x, cotangent, tol=1e-12, max_iter=300, backward=il.Phantom(steps=steps))
        cosines.append(float(torch.nn.functional.cosine_similarity(phantom, ift, dim=0)))
    assert cosines[-1] > 0.999
    assert cosines[-1] >= max(cosines) - 1e-9
    assert cosines[-1] >= cosines[0] - 1e-12


def test_jfb_is_phantom_with_one_undamped_step():
    torch.manual_seed(0)
    cell = Cell(6, "tanh", 0.7).double()
    x, cotangent = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    jfb, _ = gradients(cell, x, cotangent, tol=1e-12, backward="jfb")
    phantom, _ = gradients(cell, x, cotangent, tol=1e-12, backward=il.Phantom(steps=1, damping=1.0))
    damped, _ = gradients(cell, x, cotangent, tol=1e-12, backward=il.Phantom(steps=1, damping=0.5))
    torch.testing.assert_close(jfb, phantom)
    assert relative_error(damped, jfb) > 1e-3


def test_output_value_does_not_depend_on_the_gradient_mode():
    torch.manual_seed(1)
    cell = Cell(6, "tanh", 0.7)
    x = torch.randn(4, 6, requires_grad=True)
    outputs = [il.ImplicitLayer(cell, tol=1e-5, backward=mode)(x) for mode in ("ift", "phantom", "jfb", "shine")]
    with torch.no_grad():
        outputs.append(il.ImplicitLayer(cell, tol=1e-5)(x))
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])


def test_unrolled_with_zero_tolerance_runs_exactly_max_iter_steps():
    calls = []

    class Counting(nn.Module):
        def forward(self, z, x):
            calls.append(1)
            return 0.5 * z + x

    x = torch.zeros(2, 3, requires_grad=True)  # z0 = 0 is already the fixed point
    layer = il.ImplicitLayer(Counting(), backward="unrolled", tol=0.0, max_iter=7)
    z = layer(x)
    assert len(calls) == 7 and layer.stats.nstep.tolist() == [7, 7]
    (grad,) = torch.autograd.grad(z.sum(), x)
    expected = sum(0.5**k for k in range(7))  # d z_7 / dx for z_{k+1} = z_k / 2 + x
    torch.testing.assert_close(grad, torch.full_like(grad, expected))


def test_unrolled_matches_a_hand_written_loop_including_the_initial_guess():
    torch.manual_seed(2)
    cell = Cell(5, "tanh", 0.9)
    x = torch.randn(3, 5, requires_grad=True)
    layer = il.ImplicitLayer(cell, backward="unrolled", tol=0.0, max_iter=3, z_init="input")
    (ours,) = torch.autograd.grad(layer(x).pow(2).sum(), x)
    z = x
    for _ in range(3):
        z = cell(z, x)
    (expected,) = torch.autograd.grad(z.pow(2).sum(), x)
    torch.testing.assert_close(ours, expected)


def test_ift_keeps_one_graph_of_f_and_spends_no_extra_evaluation():
    # Every forward evaluation may record a graph, but only the latest stays alive, and the output
    # reuses the solver's final evaluation instead of evaluating f once more.
    outputs = []

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, z, x):
            out = 0.3 * torch.tanh(self.lin(z)) + x
            outputs.append(weakref.ref(out))
            return out

    torch.manual_seed(4)
    layer = il.ImplicitLayer(Recording(), tol=1e-10, max_iter=50).double()
    z = layer(torch.randn(2, 4, dtype=torch.float64, requires_grad=True))
    gc.collect()
    alive = [ref() for ref in outputs if ref() is not None]
    assert len(alive) == 1 and alive[0].grad_fn is not None
    assert len(outputs) == int(layer.stats.nstep.max()) > 5
    z.sum().backward()
    assert len(outputs) == int(layer.stats.nstep.max())  # the adjoint solve uses VJPs, not f


def test_backward_non_convergence_follows_the_policy():
    torch.manual_seed(3)
    cell = Cell(6, "tanh", 0.8).double()  # float64: the forward must surely reach 1e-6
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    layer = il.ImplicitLayer(cell, tol=1e-6, max_iter=100, backward=il.IFT(max_iter=2), on_nonconvergence="raise")
    z = layer(x)
    with pytest.raises(il.ConvergenceError, match="backward solve did not converge"):
        z.sum().backward()


@pytest.mark.parametrize("backward", ["ift", "phantom", "jfb"])
def test_output_is_the_image_of_the_solvers_iterate(backward):
    # The layer returns f(z*): one Picard step beyond the iterate whose residual the solver measured,
    # so for a contraction its residual is no larger.
    torch.manual_seed(2)
    cell = Cell(6, "tanh", 0.7)
    x = torch.randn(5, 6, requires_grad=True)
    layer = il.ImplicitLayer(cell, tol=1e-3, backward=backward).eval()  # eval: no power-iteration step between calls
    out = layer(x)
    with torch.no_grad():
        image = cell(layer.stats.z, x)
        out_residual = il.residual(out, cell(out, x))
    assert torch.equal(out.detach(), image)
    assert bool((out_residual <= layer.stats.residual + 1e-7).all())


# --------------------------------------------------------------------------- under every transform


def _layer(cell, mode):
    options = {"tol": 0.0, "max_iter": 300} if mode == "unrolled" else {"tol": 1e-12, "max_iter": 300}
    backward = il.Phantom(steps=6, damping=0.8) if mode == "phantom" else mode
    return il.ImplicitLayer(cell, backward=backward, **options).eval()


def _call(layer):
    """x ↦ layer(x) with the parameters passed explicitly, as torch.func users write it."""
    params = {name: p.detach() for name, p in layer.named_parameters()}
    return lambda x, p=params: torch.func.functional_call(layer, p, (x,))


@pytest.mark.parametrize("mode", ["ift", "phantom", "jfb", "unrolled"])
def test_every_transform_gives_the_modes_own_derivative(mode):
    # Each mode's derivative is defined by plain autograd; every transform must reproduce it.
    torch.manual_seed(5)
    cell = Cell(4, "tanh", 0.6).double()
    layer = _layer(cell, mode)
    x = torch.randn(3, 4, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    out = layer(xr)
    plain = torch.stack([torch.autograd.grad(out.flatten()[i], xr, retain_graph=True)[0] for i in range(out.numel())])
    plain = plain.reshape(*out.shape, *x.shape)
    f = _call(layer)
    assert relative_error(torch.func.jacrev(f)(x), plain) <= 1e-9
    assert relative_error(torch.func.jacfwd(f)(x), plain) <= 1e-9
    v = torch.randn_like(x)
    assert relative_error(torch.func.jvp(f, (x,), (v,))[1], torch.einsum("bixj,xj->bi", plain, v)) <= 1e-9
    with torch.autograd.forward_ad.dual_level():
        dual = layer(torch.autograd.forward_ad.make_dual(x, v))
        tangent = torch.autograd.forward_ad.unpack_dual(dual).tangent
    assert relative_error(tangent, torch.einsum("bixj,xj->bi", plain, v)) <= 1e-9
    mapped = torch.func.vmap(f)(x[:, None])[:, 0]
    assert relative_error(mapped, out.detach()) <= 1e-12
    basis = torch.eye(out.numel(), dtype=out.dtype).reshape(-1, *out.shape)
    (batched,) = torch.autograd.grad(layer(xr), xr, basis, is_grads_batched=True)
    assert relative_error(batched.reshape(plain.shape), plain) <= 1e-9
    # Second order: double backward and torch.func.hessian agree.
    (grad_x,) = torch.autograd.grad(layer(xr).sin().sum(), xr, create_graph=True)
    rows = [torch.autograd.grad(grad_x.flatten()[i], xr, retain_graph=True)[0] for i in range(grad_x.numel())]
    hessian = torch.func.hessian(lambda x: f(x).sin().sum())(x)
    assert relative_error(torch.stack(rows).reshape(hessian.shape), hessian) <= 1e-8
    if mode in ("ift", "unrolled"):  # the exact derivative: both agree with the closed form
        z = layer.stats.z if mode == "ift" else out.detach()
        df_dz, df_dx = torch.func.jacrev(lambda zi, xi: cell(zi[None], xi[None])[0], argnums=(0, 1))(z[0], x[0])
        expected = torch.linalg.solve(torch.eye(4, dtype=torch.float64) - df_dz, df_dx)
        assert relative_error(plain[0, :, 0], expected) <= 1e-8


@pytest.mark.parametrize("mode", ["ift", "phantom", "jfb", "unrolled"])
def test_per_sample_parameter_gradients_by_vmap(mode):
    torch.manual_seed(6)
    cell = Cell(4, "tanh", 0.6).double()
    layer = _layer(cell, mode)
    x = torch.randn(3, 4, dtype=torch.float64)
    params = {name: p.detach() for name, p in layer.named_parameters()}

    def loss(p, xi):
        return torch.func.functional_call(layer, p, (xi[None],)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(3):
        layer.zero_grad()
        layer(x[i : i + 1]).square().sum().backward()
        for name, p in layer.named_parameters():
            assert relative_error(per_sample[name][i], p.grad) <= 1e-9


@given(problem=problems(max_dim=4, max_batch=3))
def test_gradient_penalty_through_a_layer_matches_the_unrolled_loop(problem):
    cell, x, cotangent = problem

    def penalty(mode):
        layer = _layer(cell, mode)
        xr = x.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad((layer(xr) * cotangent).sum(), xr, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), [xr, *cell.parameters()])

    ours = torch.cat([g.flatten() for g in penalty("ift")])
    reference = torch.cat([g.flatten() for g in penalty("unrolled")])
    # atol: where a relu cell is dead, the loop leaves terms of 0.8^300 that the IFT rightly calls 0.
    torch.testing.assert_close(ours, reference, rtol=1e-7, atol=1e-10)


def test_gradcheck_and_gradgradcheck_of_a_layer_with_default_settings():
    torch.manual_seed(7)
    layer = _layer(Cell(3, "tanh", 0.5).double(), "ift")
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    assert torch.autograd.gradgradcheck(layer, (x,))


def test_a_tensor_captured_by_the_cell_gets_its_gradient():
    # A conditioning vector from a hypernetwork: neither x nor the cell's parameters need grad.
    torch.manual_seed(8)
    cell = Cell(4, "tanh", 0.6).double().requires_grad_(False)
    hyper = nn.Linear(2, 4).double()
    h = torch.randn(1, 2, dtype=torch.float64)

    class Conditioned(nn.Module):
        def forward(self, z, x):
            return cell(z, x) + 0.3 * torch.tanh(self.condition)

    conditioned = Conditioned()
    x = torch.randn(3, 4, dtype=torch.float64)
    grads = {}
    for mode in ("ift", "unrolled"):
        conditioned.condition = hyper(h)
        out = _layer(conditioned, mode)(x)
        grads[mode] = torch.autograd.grad(out.sin().sum(), list(hyper.parameters()))
    for ours, reference in zip(grads["ift"], grads["unrolled"], strict=True):
        assert relative_error(ours, reference) <= 1e-8


def test_unrolled_with_a_tolerance_under_vmap_raises():
    layer = il.ImplicitLayer(Cell(3, "tanh", 0.5), backward="unrolled", tol=1e-4)
    with pytest.raises(RuntimeError, match="tol=0"):
        torch.func.vmap(_call(layer))(torch.randn(2, 1, 3))


def test_a_diverging_layer_raises_when_asked():
    class Doubling(nn.Module):
        def forward(self, z, x):
            return 2 * z + x

    layer = il.ImplicitLayer(Doubling(), solver="picard", max_iter=200, on_nonconvergence="raise")
    with pytest.raises(il.ConvergenceError, match="diverged"):
        layer(torch.ones(2, 3))


@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_unrolled_measures_residuals_free_of_overflow(stop_mode):
    # ||f(z)||² overflows in float32 at 1e19: a plain relative residual once read 0 ("converged").
    # Measured with care it is exact: 2e13/(2·1e19 + ...) relative, 2e13 absolute.
    class Shift(nn.Module):
        def forward(self, z, x):
            return z + 1e13

    layer = il.ImplicitLayer(
        Shift(), backward="unrolled", budget=il.Budget(tol=1e-12, max_iter=3, stop_mode=stop_mode), z_init="input",
        on_nonconvergence="ignore",
    )  # fmt: skip
    z0 = torch.full((2, 4), 1e19)
    layer(z0)
    last_input = z0 + 2e13  # the residual describes the iterate fed to f last, z_2
    expected = il.residual(last_input, last_input + 1e13, stop_mode)
    assert not bool(layer.stats.converged.any()) and layer.stats.status.tolist() == [1, 1]
    torch.testing.assert_close(layer.stats.residual.double(), expected, rtol=1e-5, atol=0)


def test_unrolled_stops_no_sample_on_an_underflowed_residual():
    # At 1e-30 the squares of float32 entries underflow: a plain norm reads 0 ("converged" at z0).
    layer = il.ImplicitLayer(
        lambda z, x: 0.5 * z + x, backward="unrolled", budget=il.Budget(tol=1e-36, stop_mode="abs", max_iter=200)
    )
    x = torch.full((2, 3), 1e-30)
    z = layer(x)
    torch.testing.assert_close(z / 1e-30, torch.full_like(z, 2.0), rtol=1e-5, atol=0)
    assert bool(layer.stats.converged.all()) and int(layer.stats.nstep.min()) > 10


# ------------------------------------------------------------------------------------------ SHINE
@given(problem=problems(), solver=st.sampled_from(["anderson", "broyden"]))
def test_shine_gradients_approach_the_ift_gradient_as_the_refinement_grows(problem, solver):
    cell, x, cotangent = problem
    options = {"solver": solver, "tol": 1e-12, "max_iter": 300}
    ift, _ = gradients(cell, x, cotangent, **options, backward=il.IFT(tol=1e-12))
    assume(float(ift.norm()) > 1e-8)  # a dead relu cell has no direction to compare
    errors = []
    for refine in (0, 3, 200):
        shine, _ = gradients(cell, x, cotangent, **options, backward=il.Shine(refine=refine, tol=1e-12))
        errors.append(relative_error(shine, ift))
    assert errors[-1] <= 1e-8  # refined to the adjoint's tolerance: the IFT gradient
    assert errors[1] <= max(errors[0], 1e-9)  # refinement starts from the estimate and improves it


def test_the_shine_estimate_is_closer_to_the_ift_gradient_than_jfb_in_the_median():
    # The estimate is exact on the directions the solver explored (exactly so on linear maps: see
    # test_solvers); on a nonlinear map the secants sample the Jacobian along the trajectory, so
    # one problem can come out worse than JFB's u = v (seen: 0.234 against 0.232), but over many
    # problems it is far closer.
    ratios = {"anderson": [], "broyden": []}
    for seed in range(24):
        torch.manual_seed(seed)
        dim = 2 + seed % 6
        cell = Cell(dim, ("tanh", "elu")[seed % 2], 0.5 + 0.02 * seed).double()
        x, cotangent = torch.randn(3, dim, dtype=torch.float64), torch.randn(3, dim, dtype=torch.float64)
        for solver in ratios:
            options = {"solver": solver, "tol": 1e-10, "max_iter": 300}
            ift, _ = gradients(cell, x, cotangent, **options, backward=il.IFT(tol=1e-12))
            shine, _ = gradients(cell, x, cotangent, **options, backward="shine")
            jfb, _ = gradients(cell, x, cotangent, **options, backward="jfb")
            ratios[solver].append(relative_error(shine, ift) / relative_error(jfb, ift))
    for solver, values in ratios.items():
        assert statistics.median(values) < 0.6, solver  # measured: 0.46 (Anderson), 0.41 (Broyden)


def test_shine_reports_its_refinement_and_does_not_evaluate_more_than_asked():
    torch.manual_seed(2)
    cell = Cell(6, "tanh", 0.7).double()
    x, cotangent = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    _, layer = gradients(cell, x, cotangent, tol=1e-10, backward=il.Shine(refine=3, tol=1e-14))
    assert layer.backward_stats.nstep.tolist() == [3, 3, 3, 3]
    # Running the 3 steps it was asked for is no failure: no warning, status budget.
    assert set(layer.backward_stats.status.tolist()) <= {int(il.Status.converged), int(il.Status.budget)}
    _, layer = gradients(cell, x, cotangent, tol=1e-10, backward="shine")
    assert layer.backward_stats is None  # no refinement, no adjoint solve


def test_shine_is_first_order_only_and_says_so():
    torch.manual_seed(3)
    cell = Cell(4, "tanh", 0.6).double()
    layer = il.ImplicitLayer(cell, tol=1e-10, backward="shine").eval()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="first-order reverse-mode"):
        torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order reverse-mode"):
        torch.func.grad(lambda x: layer(x).sum())(x.detach())
    with pytest.raises(RuntimeError, match="first-order reverse-mode"):
        torch.func.vmap(layer)(x.detach()[:, None])
    with torch.autograd.forward_ad.dual_level(), pytest.raises(RuntimeError, match="first-order reverse-mode"):
        layer(torch.autograd.forward_ad.make_dual(x.detach(), torch.ones_like(x)))


def test_shine_needs_a_quasi_newton_solver_and_a_valid_refinement():
    cell = Cell(4, "tanh", 0.6)
    with pytest.raises(ValueError, match=r"Picard\(damping=1.0\) keeps none"):
        il.ImplicitLayer(cell, solver="picard", backward="shine")
    with pytest.raises(ValueError, match="refine must be an integer >= 0"):
        il.Shine(refine=-1)
    with pytest.raises(ValueError, match="refine must be an integer >= 0"):
        il.Shine(refine=1.5)
    layer = il.ImplicitLayer(cell, backward="shine")
    with pytest.raises(ValueError, match="keeps none"):  # a later assignment is checked too
        layer.solver = il.Picard()
    assert layer.solver == il.Anderson()


def test_the_primitive_with_shine_and_a_solver_that_keeps_no_memory_raises():
    f = lambda z, x: 0.5 * torch.tanh(z) + x  # noqa: E731
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="keeps none"):
        il.implicit_fixed_point(f, torch.zeros(2, 3), x, solver="picard", backward=il.Shine())


@given(problem=problems(), solver=st.sampled_from(["anderson", "broyden"]))
def test_a_warm_started_adjoint_gives_the_ift_gradient(problem, solver):
    # IFT(start="estimate") starts the adjoint solve from the forward solver's estimate (SHINE's u)
    # and still solves to tol: the gradient is the IFT's, wherever it starts. (Whether it saves
    # iterations depends on the estimate: benchmarks/imixer_backward.py measures it on the iMixer.)
    cell, x, cotangent = problem
    options = {"solver": solver, "tol": 1e-12, "max_iter": 300}
    cold, cold_layer = gradients(cell, x, cotangent, **options, backward=il.IFT(tol=1e-11))
    warm, warm_layer = gradients(cell, x, cotangent, **options, backward=il.IFT(tol=1e-11, start="estimate"))
    assume(float(cold.norm()) > 1e-8)
    assert relative_error(warm, cold) <= 1e-8
    assert bool(warm_layer.backward_stats.converged.all()) and bool(cold_layer.backward_stats.converged.all())


def test_a_warm_started_adjoint_keeps_every_order_and_needs_memory():
    torch.manual_seed(4)
    cell = Cell(4, "tanh", 0.6).double()
    layer = il.ImplicitLayer(cell, tol=1e-12, max_iter=200, backward=il.IFT(start="estimate")).eval()
    reference = il.ImplicitLayer(cell, tol=1e-12, max_iter=200).eval()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    (warm,) = torch.autograd.grad(layer(x).sin().sum(), x, create_graph=True)
    (cold,) = torch.autograd.grad(reference(x).sin().sum(), x, create_graph=True)
    torch.testing.assert_close(warm, cold, rtol=1e-8, atol=1e-10)
    hessian_warm = torch.autograd.grad(warm.sum(), x)[0]
    hessian_cold = torch.autograd.grad(cold.sum(), x)[0]
    torch.testing.assert_close(hessian_warm, hessian_cold, rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="keeps none"):
        il.ImplicitLayer(cell, solver="picard", backward=il.IFT(start="estimate"))
    with pytest.raises(ValueError, match="start must be 'rhs' or 'estimate'"):
        il.IFT(start="shine")


class _TanhCell(nn.Module):
    """f(z, x) = tanh(z Wᵀ + x Uᵀ) with a fixed non-normal W of norm ``rate``."""

    def __init__(self, weight: torch.Tensor, inject: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.inject = nn.Parameter(inject)

    def forward(self, z, x):
        return torch.tanh(z @ self.weight.T + x @ self.inject.T)


@given(
    dim=st.integers(4, 32),
    batch=st.integers(1, 4),
    rate=st.floats(0.8, 0.98),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    solver=st.sampled_from(["anderson", "broyden"]),
)
def test_ift_gradients_in_float32_and_near_rate_one_match_the_closed_form(dim, batch, rate, seed, dtype, solver):
    # The hard regime of the IFT: a slow adjoint solve (rate up to 0.98), float32 next to float64,
    # against dz*/dx = (I - J)⁻¹ ∂f/∂x in float64. The forward and adjoint residuals are each within
    # tol, which the conditioning 1 / (1 - rate) can amplify; float32 adds its rounding, amplified alike.
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    weight = rate * weight / torch.linalg.matrix_norm(weight, ord=2)
    inject = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)
    x = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    cotangent = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    tol = tolerance_for(dtype)
    cell = _TanhCell(weight.clone(), inject.clone()).to(dtype)
    layer = il.ImplicitLayer(cell, solver=solver, tol=tol, max_iter=max_iter_for(rate, tol))
    xr = x.to(dtype).requires_grad_()
    (grad,) = torch.autograd.grad((layer(xr) * cotangent.to(dtype)).sum(), xr)
    assert bool(layer.stats.converged.all()) and bool(layer.backward_stats.converged.all())
    exact_cell = _TanhCell(weight, inject)
    z = il.solve(lambda z: exact_cell(z, x), torch.zeros_like(x), tol=1e-14, max_iter=max_iter_for(rate, 1e-14)).z
    eye = torch.eye(dim, dtype=torch.float64)
    reference = []
    for i in range(batch):
        jz, jx = torch.func.jacrev(lambda zi, xi: exact_cell(zi[None], xi[None])[0], argnums=(0, 1))(z[i], x[i])
        reference.append(torch.linalg.solve(eye - jz, jx).T @ cotangent[i])  # (dz*/dx)ᵀ v; f(z*) = z*
    reference = torch.stack(reference)
    bound = 20 * (tol + torch.finfo(dtype).eps) / (1 - rate)
    assert relative_error(grad.double(), reference) <= bound
