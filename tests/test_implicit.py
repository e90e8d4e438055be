"""The implicit-function primitive under every kind of differentiation, in float64.

References: autograd through a long unrolled Picard loop (whose derivatives converge to the fixed
point's at the contraction rate, here ≤ 0.7^300) and the closed form dz*/dθ = (I - ∂f/∂z)⁻¹ ∂f/∂θ.
"""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import forward_ad

import implicitlayers as il
from tests.strategies import UNIT_ACTIVATIONS, relative_error

TIGHT = il.Budget(tol=1e-13, max_iter=300)
UNROLL = 300
ACT = {"relu": torch.relu, "tanh": torch.tanh, "elu": torch.nn.functional.elu}


def cell(activation: str):
    """f(z, x, W, U) = act(z Wᵀ + x Uᵀ): a contraction in z while ||W||₂ < 1."""
    act = ACT[activation]
    return lambda z, x, w, u: act(z @ w.T + x @ u.T)


@st.composite
def problems(draw, max_dim=5, max_batch=3, smooth=False):
    """(f, x, W, U) in float64 with ||W||₂ = rate in [0.2, 0.7]."""
    dim = draw(st.integers(2, max_dim))
    batch = draw(st.integers(1, max_batch))
    activation = "tanh" if smooth else draw(UNIT_ACTIVATIONS)
    rate = draw(st.floats(0.2, 0.7))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    w = rate * w / torch.linalg.matrix_norm(w, ord=2)
    u = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    x = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    return cell(activation), x, w, u


def solved(f):
    """z*(x, W, U) through the primitive."""

    def z_star(x, w, u):
        z0 = torch.zeros_like(x)
        return il.implicit_fixed_point(f, z0, x, w, u, per_sample=(True, False, False), budget=TIGHT)

    return z_star


def unrolled(f):
    """The same function, as autograd through UNROLL Picard steps."""

    def z_star(x, w, u):
        z = torch.zeros_like(x)
        for _ in range(UNROLL):
            z = f(z, x, w, u)
        return z

    return z_star


def closed_form_jacobian(f, x, w, u):
    """dz*/dx per sample, (B, D, D), from (I - ∂f/∂z)⁻¹ ∂f/∂x at the fixed point."""
    z = unrolled(f)(x, w, u).detach()
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    blocks = []
    for i in range(x.shape[0]):
        dz, dx = torch.func.jacrev(lambda zi, xi: f(zi[None], xi[None], w, u)[0], argnums=(0, 1))(z[i], x[i])
        blocks.append(torch.linalg.solve(eye - dz, dx))
    return torch.stack(blocks)


# ----------------------------------------------------------------------------- reverse mode


@given(problem=problems(smooth=True))
def test_double_backward_of_a_gradient_penalty_matches_unrolled_autograd(problem):
    f, x, w, u = problem

    def penalty_gradients(z_star):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(z_star(xr, wr, u).sin().sum(), xr, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), [xr, wr])

    for ours, reference in zip(penalty_gradients(solved(f)), penalty_gradients(unrolled(f)), strict=True):
        assert relative_error(ours, reference) <= 1e-8


@given(problem=problems(smooth=True, max_dim=4, max_batch=2))
def test_hessian_and_hvp_match_unrolled_autograd(problem):
    f, x, w, u = problem

    def loss(z_star):
        return lambda x: z_star(x, w, u).sin().sum()

    ours, reference = loss(solved(f)), loss(unrolled(f))
    assert relative_error(torch.func.hessian(ours)(x), torch.func.hessian(reference)(x)) <= 1e-8
    v = torch.randn_like(x)
    _, hvp = torch.autograd.functional.hvp(ours, x, v)
    _, hvp_reference = torch.autograd.functional.hvp(reference, x, v)
    assert relative_error(hvp, hvp_reference) <= 1e-8


@given(problem=problems())
def test_jacrev_matches_the_exact_fixed_point_jacobian(problem):
    f, x, w, u = problem
    jacobian = torch.func.jacrev(solved(f))(x, w, u)  # (B, D, B, D)
    batch = x.shape[0]
    blocks = torch.stack([jacobian[i, :, i] for i in range(batch)])
    assert relative_error(blocks, closed_form_jacobian(f, x, w, u)) <= 1e-8
    off_diagonal = jacobian.clone()
    for i in range(batch):
        off_diagonal[i, :, i] = 0
    assert float(off_diagonal.abs().max()) == 0.0  # samples are independent


# ----------------------------------------------------------------------------- forward mode


@given(problem=problems())
def test_jvp_solves_the_tangent_equation(problem):
    f, x, w, u = problem
    v = torch.randn_like(x)
    expected = torch.einsum("bij,bj->bi", closed_form_jacobian(f, x, w, u), v)  # (I - J)⁻¹ J_x v
    _, tangent = torch.func.jvp(lambda x: solved(f)(x, w, u), (x,), (v,))
    assert relative_error(tangent, expected) <= 1e-8
    with forward_ad.dual_level():
        dual = solved(f)(forward_ad.make_dual(x, v), w, u)
        assert relative_error(forward_ad.unpack_dual(dual).tangent, expected) <= 1e-8
    # Tangents in a weight, against unrolled forward mode.
    dw = torch.randn_like(w)
    _, ours = torch.func.jvp(lambda w: solved(f)(x, w, u), (w,), (dw,))
    _, reference = torch.func.jvp(lambda w: unrolled(f)(x, w, u), (w,), (dw,))
    assert relative_error(ours, reference) <= 1e-8


@given(problem=problems(smooth=True, max_dim=4, max_batch=2))
def test_jacfwd_and_jacrev_agree(problem):
    f, x, w, u = problem
    assert relative_error(torch.func.jacfwd(solved(f))(x, w, u), torch.func.jacrev(solved(f))(x, w, u)) <= 1e-9


# ----------------------------------------------------------------------------- vmap


@given(problem=problems(max_batch=4))
def test_vmap_equals_the_batched_call(problem):
    f, x, w, u = problem
    batched = solved(f)(x, w, u)
    # Mapped over x (folded into the batch) ...
    mapped = torch.func.vmap(solved(f), in_dims=(0, None, None))(x[:, None], w, u)
    assert relative_error(mapped[:, 0], batched) <= 1e-12
    # ... and over a shared weight (one solve per index).
    weights = torch.stack([w, 0.5 * w])
    per_weight = torch.func.vmap(solved(f), in_dims=(None, 0, None))(x, weights, u)
    assert relative_error(per_weight[1], solved(f)(x, 0.5 * w, u)) <= 1e-12


@given(problem=problems(max_batch=4))
def test_per_sample_gradients_by_vmap_of_grad(problem):
    f, x, w, u = problem

    def loss(w, xi):
        return solved(f)(xi[None], w, u).square().sum()

    ours = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(w, x)
    loop = []
    for xi in x:
        wr = w.clone().requires_grad_()
        loop.append(torch.autograd.grad(loss(wr, xi), wr)[0])
    loop = torch.stack(loop)
    looped_reference = []
    for xi in x:
        wr = w.clone().requires_grad_()
        (g,) = torch.autograd.grad(unrolled(f)(xi[None], wr, u).square().sum(), wr)
        looped_reference.append(g)
    assert relative_error(ours, loop) <= 1e-10
    assert relative_error(ours, torch.stack(looped_reference)) <= 1e-8


def test_batched_gradients_of_autograd_grad():
    f, x, w, u = _fixed_problem()
    xr = x.clone().requires_grad_()
    out = solved(f)(xr, w, u)
    basis = torch.eye(out.numel(), dtype=out.dtype).reshape(-1, *out.shape)
    (jacobian,) = torch.autograd.grad(out, xr, basis, is_grads_batched=True)
    expected = torch.func.jacrev(unrolled(f))(x, w, u).reshape(-1, *x.shape)
    assert relative_error(jacobian, expected) <= 1e-8


def _fixed_problem():
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    w = 0.6 * w / torch.linalg.matrix_norm(w, ord=2)
    u = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    x = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    return cell("tanh"), x, w, u


# ----------------------------------------------------------------------------- gradcheck, closures


def test_gradcheck_and_gradgradcheck_with_default_settings():
    f, x, w, u = _fixed_problem()
    inputs = (x.clone().requires_grad_(), w.clone().requires_grad_(), u.clone().requires_grad_())
    assert torch.autograd.gradcheck(solved(f), inputs)
    assert torch.autograd.gradgradcheck(solved(f), inputs)


@given(problem=problems())
def test_captured_tensors_get_their_gradient(problem):
    f, x, w, u = problem
    captured = torch.randn(x.shape[1], dtype=torch.float64, requires_grad=True)

    def closure(z, x):  # w and u need no gradient here; `captured` does and is not an input
        return f(z, x, w, u) + 0.1 * torch.tanh(captured)

    out = il.implicit_fixed_point(closure, torch.zeros_like(x), x, per_sample=(True,), budget=TIGHT)
    (ours,) = torch.autograd.grad(out.sin().sum(), captured)
    z = torch.zeros_like(x)
    for _ in range(UNROLL):
        z = closure(z, x)
    (reference,) = torch.autograd.grad(z.sin().sum(), captured)
    assert relative_error(ours, reference) <= 1e-8


def test_captured_tensors_raise_for_what_a_hook_cannot_give():
    f, x, w, u = _fixed_problem()
    captured = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def closure(z, x):
        return f(z, x, w, u) + captured

    out = il.implicit_fixed_point(closure, torch.zeros_like(x), x, per_sample=(True,), budget=TIGHT)
    with pytest.raises(RuntimeError, match="higher-order derivatives"):
        torch.autograd.grad(out.sum(), captured, create_graph=True)
    with forward_ad.dual_level(), pytest.raises(RuntimeError, match="forward-mode derivatives"):
        dual = forward_ad.make_dual(captured.detach(), torch.ones(4, dtype=torch.float64))
        il.implicit_fixed_point(lambda z, x: f(z, x, w, u) + dual, torch.zeros_like(x), x, budget=TIGHT)

    def transformed(c):
        return il.implicit_fixed_point(lambda z, x: f(z, x, w, u) + c, torch.zeros_like(x), x, budget=TIGHT).sum()

    with pytest.raises(RuntimeError, match="pass every tensor f uses as an explicit input"):
        torch.func.grad(transformed)(captured.detach())


class _AttributeCell(torch.nn.Module):
    """A cell holding a tensor as a plain attribute: neither a parameter nor a buffer, so captured."""

    def __init__(self, w: torch.Tensor, u: torch.Tensor, captured: torch.Tensor) -> None:
        super().__init__()
        self.w, self.u, self.captured = w, u, captured

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return cell("tanh")(z, x, self.w, self.u) + 0.1 * torch.tanh(self.captured * z)


def _capture_scenarios():
    """(name, run) pairs: each run evaluates a layer whose f captures a tensor some level tracks."""
    f, x, w, u = _fixed_problem()
    leaf = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def layer(captured, backward="ift"):
        closure = lambda z, x: f(z, x, w, u) + 0.1 * torch.tanh(captured * z)  # noqa: E731
        return il.ImplicitLayer(closure, tol=1e-12, max_iter=200, backward=backward)

    def first_row(module):
        return lambda xi: module(xi[None])[0]

    module_layer = il.ImplicitLayer(_AttributeCell(w, u, leaf), tol=1e-12, max_iter=200)
    return [
        ("vmap, captured autograd leaf", lambda: torch.func.vmap(first_row(layer(leaf)))(x)),
        ("vmap, jfb, captured autograd leaf", lambda: torch.func.vmap(first_row(layer(leaf, "jfb")))(x)),
        ("vmap, module attribute", lambda: torch.func.vmap(first_row(module_layer))(x)),
        ("vmap over the captured tensor", lambda: torch.func.vmap(lambda c: layer(c)(x))(torch.randn(2, 4).double())),
        ("grad of the captured tensor", lambda: torch.func.grad(lambda c: layer(c)(x).sum())(leaf.detach())),
        ("jacrev in x, captured autograd leaf", lambda: torch.func.jacrev(layer(leaf))(x)),
        (
            "jvp of the captured tensor",
            lambda: torch.func.jvp(lambda c: layer(c)(x), (leaf.detach(),), (leaf.detach(),)),
        ),
        (
            "vmap of grad of the captured tensor",
            lambda: torch.func.vmap(torch.func.grad(lambda c: layer(c)(x).sum()))(torch.randn(2, 4).double()),
        ),
        (
            "grad of vmap, captured",
            lambda: torch.func.grad(lambda c: torch.func.vmap(first_row(layer(c)))(x).sum())(leaf.detach()),
        ),
    ]


@pytest.mark.parametrize("name", [name for name, _ in _capture_scenarios()])
def test_a_captured_tensor_a_transform_tracks_raises_instead_of_losing_its_derivative(name):
    # Under a transform the solve runs inside an autograd.Function, where a captured tensor is a
    # constant: its derivative would be dropped without a word (BatchedTensors even report
    # requires_grad=False for a leaf that requires it). Every such case must raise.
    run = dict(_capture_scenarios())[name]
    with pytest.raises(RuntimeError, match="pass every tensor f uses as an explicit input"):
        run()


def test_captured_constants_are_fine_under_every_transform():
    # The probe must not raise for captures that no level tracks: vmap's answer is the loop's, and
    # jacrev's is the closed form.
    _, x, w, u = _fixed_problem()
    constant = torch.randn(4, dtype=torch.float64)
    module = il.ImplicitLayer(_AttributeCell(w, u, constant), tol=1e-12, max_iter=200)
    batched = torch.func.vmap(lambda xi: module(xi[None])[0])(x)
    looped = torch.stack([module(x[i : i + 1])[0] for i in range(x.shape[0])])
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-12)
    jacobian = torch.func.jacrev(lambda xi: module(xi[None])[0])(x[0])
    z = module(x[:1]).detach()
    dz, dx = torch.func.jacrev(lambda zi, xi: module.f(zi[None], xi[None])[0], argnums=(0, 1))(z[0], x[0])
    torch.testing.assert_close(
        jacobian, torch.linalg.solve(torch.eye(4, dtype=torch.float64) - dz, dx), rtol=1e-8, atol=1e-10
    )


def test_a_map_independent_of_z_or_linear_in_it_differentiates():
    # Once "does not require grad" from a VJP of a constant.
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = il.implicit_fixed_point(lambda z, x: 2 * x, torch.zeros_like(x), x, per_sample=(True,), budget=TIGHT)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    torch.testing.assert_close(grad, torch.full_like(x, 2.0))
    out = il.implicit_fixed_point(lambda z, x: 0.5 * z + x, torch.zeros_like(x), x, per_sample=(True,), budget=TIGHT)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    torch.testing.assert_close(grad, torch.full_like(x, 2.0))  # (1 - 0.5)⁻¹


# ----------------------------------------------------------------------------- gradient modes


def test_jacobian_free_derivatives_hold_the_fixed_point_constant_in_every_mode():
    f, x, w, u = _fixed_problem()
    z = unrolled(f)(x, w, u).detach()

    def jfb(x):
        return il.implicit_fixed_point(
            f, torch.zeros_like(x), x, w, u, per_sample=(True, False, False), budget=TIGHT, backward=il.JFB()
        )

    def one_step(x):
        return f(z, x, w, u)

    v = torch.randn_like(x)
    assert relative_error(torch.func.jvp(jfb, (x,), (v,))[1], torch.func.jvp(one_step, (x,), (v,))[1]) <= 1e-10
    assert relative_error(torch.func.jacrev(jfb)(x), torch.func.jacrev(one_step)(x)) <= 1e-10
    hessian = torch.func.hessian(lambda x: jfb(x).sin().sum())(x)
    assert relative_error(hessian, torch.func.hessian(lambda x: one_step(x).sin().sum())(x)) <= 1e-10


def test_solve_statistics_are_reported_for_every_solve():
    f, x, w, u = _fixed_problem()
    forward, backward = [], []
    xr = x.clone().requires_grad_()
    out = il.implicit_fixed_point(
        f, torch.zeros_like(x), xr, w, u, budget=TIGHT, on_forward=forward.append, on_backward=backward.append
    )
    out.sum().backward()
    assert len(forward) == 1 and len(backward) == 1
    assert bool(forward[0].converged.all()) and bool(backward[0].converged.all())


# ----------------------------------------------------------------------------- threads


def test_independent_layers_train_in_independent_threads():
    errors = []

    def train(seed):
        try:
            torch.manual_seed(seed)
            layer = il.ImplicitMLP(8, 16, activation="tanh", coeff=0.8, tol=1e-4)
            optimizer = torch.optim.SGD(layer.parameters(), lr=1e-2)
            x = torch.randn(16, 8)
            for _ in range(25):
                loss = layer(x).square().mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        except Exception as error:  # reported below, from the main thread
            errors.append(error)

    threads = [threading.Thread(target=train, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


@settings(max_examples=5)
@given(problem=problems())
def test_arguments_are_checked(problem):
    f, x, w, u = problem
    with pytest.raises(ValueError, match="per_sample must have one flag per input"):
        il.implicit_fixed_point(f, torch.zeros_like(x), x, w, u, per_sample=(True,))
    with pytest.raises(ValueError, match="unknown solver"):
        il.implicit_fixed_point(f, torch.zeros_like(x), x, w, u, solver="newton")
    with pytest.raises(ValueError, match="tol"):
        il.Budget(tol=-1.0)
    with pytest.raises(ValueError, match=r"backward must be an il\.Gradient or one of"):
        il.implicit_fixed_point(f, torch.zeros_like(x), x, w, u, backward="exact")
    # The earlier keywords name their new spelling.
    with pytest.raises(TypeError, match=r"no longer takes forward=; use solver=\.\.\. and budget="):
        il.implicit_fixed_point(f, torch.zeros_like(x), x, w, u, forward=None)
    with pytest.raises(TypeError, match=r"no longer takes adjoint=; use backward=il.IFT"):
        il.implicit_fixed_point(f, torch.zeros_like(x), x, w, u, adjoint=None)
