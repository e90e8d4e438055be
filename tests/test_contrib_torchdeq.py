"""The optional TorchDEQ adapter: registration, convergence, reported residuals, layer gradients."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("torchdeq")

import implicitlayers as il
from implicitlayers.contrib import torchdeq as il_torchdeq

NAMES = ["torchdeq.anderson", "torchdeq.broyden", "torchdeq.fixed_point_iter"]


@pytest.fixture(scope="module", autouse=True)
def registered():
    return il_torchdeq.register()


def contractive_problem(batch: int = 6, dim: int = 10, seed: int = 0):
    """f(z) = tanh(z Wᵀ) + x with ||W||_2 = 0.5, float64."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    weight = 0.5 * weight / torch.linalg.matrix_norm(weight, ord=2)
    x = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    return (lambda z: torch.tanh(z @ weight.T) + x), x


def test_register_returns_the_names_and_is_idempotent():
    assert il_torchdeq.register() == NAMES
    assert il_torchdeq.register() == NAMES
    for name in NAMES:
        assert name in il.available_solvers()
        assert type(il.get_solver(name)) is il_torchdeq.SOLVER_NAMES[name]
    assert il.get_solver("torchdeq.anderson", m=3) == il_torchdeq.TorchDEQAnderson(m=3)
    assert not il_torchdeq.TorchDEQBroyden.keeps_memory  # its memory is not exposed: no SHINE


def test_register_refuses_to_replace_a_different_solver_unless_asked():
    il.register_solver("torchdeq.broyden", il.Broyden, overwrite=True)
    try:
        with pytest.raises(ValueError, match="already registered"):
            il_torchdeq.register()
        il_torchdeq.register(overwrite=True)
        assert type(il.get_solver("torchdeq.broyden")) is il_torchdeq.TorchDEQBroyden
    finally:
        il_torchdeq.register(overwrite=True)


def test_register_without_torchdeq_names_the_install_command(monkeypatch):
    for module in [m for m in sys.modules if m == "torchdeq" or m.startswith("torchdeq.")]:
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match="pip install torchdeq"):
        il_torchdeq.register()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_each_solver_reaches_tol_and_reports_our_residual(name, stop_mode):
    f, x = contractive_problem()
    tol = 1e-9
    result = il.solve(f, torch.zeros_like(x), solver=name, tol=tol, stop_mode=stop_mode, max_iter=200)
    assert bool(result.converged.all())
    assert torch.all(result.residual <= tol)
    recomputed = il.residual(result.z, f(result.z), stop_mode)
    torch.testing.assert_close(result.residual, recomputed.float(), rtol=1e-4, atol=0.0)
    # The residual is honest: the true fixed point is that close (error <= residual-ish / (1 - Lip)).
    reference = il.solve(f, torch.zeros_like(x), solver="picard", tol=1e-14, max_iter=500).z
    error = torch.linalg.vector_norm(result.z - reference, dim=1)
    scale = torch.linalg.vector_norm(reference, dim=1) if stop_mode == "rel" else torch.ones(len(x), dtype=x.dtype)
    assert torch.all(error <= 2.5 * tol * scale + 1e-13)
    assert result.z.shape == x.shape and result.z.dtype == torch.float64
    assert result.nstep.dtype == torch.long and result.nstep.shape == (len(x),)
    assert torch.all(result.nstep >= 2) and torch.all(result.nstep <= 200)
    assert result.trace.dim() == 1 and 1 <= len(result.trace) <= int(result.nstep.max())
    assert result.converged.dtype == torch.bool


def test_results_keep_z0_shape_and_options_reach_torchdeq():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 5, generator=generator, dtype=torch.float64)
    f = lambda z: 0.5 * torch.sin(z) + x  # noqa: E731
    result = il.solve(f, torch.zeros_like(x), solver="torchdeq.anderson", tol=1e-10, max_iter=100, m=3, lam=1e-12)
    assert result.z.shape == x.shape and bool(result.converged.all())
    # An undamped Anderson on this map needs far fewer steps than tau=0.1 damping allows.
    damped = il.solve(f, torch.zeros_like(x), solver="torchdeq.fixed_point_iter", tol=1e-10, max_iter=40, tau=0.1)
    plain = il.solve(f, torch.zeros_like(x), solver="torchdeq.fixed_point_iter", tol=1e-10, max_iter=40)
    assert bool(plain.converged.all()) and not bool(damped.converged.any())
    with pytest.raises(ValueError, match="does not accept"):
        il.solve(f, torch.zeros_like(x), solver="torchdeq.anderson", memory=3)
    with pytest.raises(ValueError, match="LBFGS_thres"):
        il.solve(f, torch.zeros_like(x), solver="torchdeq.broyden", LBFGS_thres=0)
    # An object works wherever a name does, and a loop mechanic TorchDEQ's loop cannot honour is refused.
    objects = il.solve(f, torch.zeros_like(x), solver=il_torchdeq.TorchDEQAnderson(m=3, lam=1e-12), tol=1e-10)
    torch.testing.assert_close(objects.z, result.z)
    with pytest.raises(ValueError, match="sync_every=1"):
        il.solve(f, torch.zeros_like(x), solver="torchdeq.anderson", sync_every=4)


def test_unconverged_solve_is_reported_as_such():
    f, x = contractive_problem(seed=2)
    result = il.solve(f, torch.zeros_like(x), solver="torchdeq.fixed_point_iter", tol=1e-12, max_iter=3)
    assert not bool(result.converged.any())
    assert torch.all(result.residual > 1e-12)
    torch.testing.assert_close(result.residual, il.residual(result.z, f(result.z)).float(), rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("name", NAMES)
def test_a_non_finite_sample_is_reported_unconverged_and_an_empty_batch_is_fine(name):
    f, x = contractive_problem(batch=3)

    def poisoned(z):
        out = f(z)
        out[1] = float("nan")
        return out

    result = il.solve(poisoned, torch.zeros_like(x), solver=name, tol=1e-6, max_iter=60)
    assert result.converged.tolist() == [True, False, True]
    assert result.residual[1] == float("inf") and torch.all(result.residual[[0, 2]] <= 1e-6)
    empty = il.solve(lambda z: 0.5 * z, x[:0], solver=name)
    assert empty.z.shape == (0, x.shape[1]) and empty.nstep.shape == (0,) and empty.converged.shape == (0,)


class Cell(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim, dtype=torch.float64)
        with torch.no_grad():
            self.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z)) + x


def test_implicit_layer_with_torchdeq_broyden_matches_builtin_ift_gradients():
    torch.manual_seed(0)
    cell = Cell(8)
    x = torch.randn(5, 8, dtype=torch.float64)
    grads = {}
    for solver in ["torchdeq.broyden", "anderson"]:
        layer = il.ImplicitLayer(cell, solver=solver, tol=1e-11, max_iter=100)
        xr = x.clone().requires_grad_()
        z = layer(xr)
        assert bool(layer.stats.converged.all())
        (z.sin().sum()).backward()
        assert layer.backward_stats is not None and bool(layer.backward_stats.converged.all())
        grads[solver] = (z.detach(), xr.grad, *(p.grad.clone() for p in cell.parameters()))
        cell.zero_grad()
    for ours, theirs in zip(grads["torchdeq.broyden"], grads["anderson"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-9)
