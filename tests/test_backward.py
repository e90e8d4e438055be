"""Gradient modes against autograd through long unrolled solves and against the closed form."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import implicitlayers as il
from tests.strategies import UNIT_ACTIVATIONS

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


def relative_error(a, b):
    return float(((a - b).norm() / b.norm().clamp_min(1e-300)).detach())


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
        phantom, _ = gradients(cell, x, cotangent, tol=1e-12, max_iter=300, backward="phantom", phantom_steps=steps)
        cosines.append(float(torch.nn.functional.cosine_similarity(phantom, ift, dim=0)))
    assert cosines[-1] > 0.999
    assert cosines[-1] >= max(cosines) - 1e-9
    assert cosines[-1] >= cosines[0] - 1e-12


def test_jfb_is_phantom_with_one_undamped_step():
    torch.manual_seed(0)
    cell = Cell(6, "tanh", 0.7).double()
    x, cotangent = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    jfb, _ = gradients(cell, x, cotangent, tol=1e-12, backward="jfb")
    phantom, _ = gradients(cell, x, cotangent, tol=1e-12, backward="phantom", phantom_steps=1, phantom_damping=1.0)
    damped, _ = gradients(cell, x, cotangent, tol=1e-12, backward="phantom", phantom_steps=1, phantom_damping=0.5)
    torch.testing.assert_close(jfb, phantom)
    assert relative_error(damped, jfb) > 1e-3


def test_output_value_does_not_depend_on_the_gradient_mode():
    torch.manual_seed(1)
    cell = Cell(6, "tanh", 0.7)
    x = torch.randn(4, 6, requires_grad=True)
    outputs = [il.ImplicitLayer(cell, tol=1e-5, backward=mode)(x) for mode in ("ift", "phantom", "jfb")]
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
    cell = Cell(6, "tanh", 0.8)
    x = torch.randn(4, 6, requires_grad=True)
    layer = il.ImplicitLayer(cell, tol=1e-6, max_iter=100, backward_max_iter=2, on_nonconvergence="raise")
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
