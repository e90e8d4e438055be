"""A small convolutional DEQ classifier: conv stem, implicit residual cell, pooled linear head.

The equilibrium layer solves z* = f(z*, x) for a convolutional residual cell f in the style of the
multiscale DEQ (Bai et al., 2020), at one resolution:

    f(z, x) = GN(ReLU(z + GN(x + conv₂(drop(ReLU(GN(conv₁ z)))))))

with weight-normalised 3×3 convolutions, GroupNorm (per sample, so each sample's fixed point depends
on that sample only, as the solvers require) and variational dropout (one mask per forward, the same
at every evaluation of f). Two interchangeable equilibrium layers solve it:

- :class:`ImplicitDEQ`: :class:`implicitlayers.ImplicitLayer` (per-sample stopping, IFT backward,
  optional Jacobian penalty);
- :class:`TorchDEQ`: TorchDEQ's ``get_deq`` with the same solver, budgets and IFT backward
  (``torchdeq`` is an optional dependency, imported only when this class is built).

Both report, after each forward, the per-sample solver steps of the last solve and, after each
backward, the adjoint solve's steps, in the same :class:`SolveReport` form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicitlayers as il

SOLVER = il.Anderson(memory=6)
"""The default solver of both layers: Anderson with TorchDEQ's history length (``m=6``)."""
BUDGET = il.Budget(max_iter=30, tol=1e-3)
"""The default forward budget of both layers (relative residual, as TorchDEQ's ``f_stop_mode="rel"``)."""
BACKWARD = il.IFT(max_iter=30, tol=1e-3)
"""The default gradient of both layers: the IFT with its own adjoint budget."""


def torchdeq_arguments(
    solver: il.Solver, budget: il.Budget, eval_budget: il.Budget | None, backward: il.IFT
) -> tuple[dict[str, object], dict[str, object]]:
    """TorchDEQ's ``get_deq`` arguments and ``solver_kwargs`` for the same solver, budgets and IFT.

    Raises:
        ValueError: For a solver or gradient mode TorchDEQ has no twin of.
    """
    names = {il.Anderson: "anderson", il.Broyden: "broyden", il.Picard: "fixed_point_iter"}
    if type(solver) not in names or not isinstance(backward, il.IFT):
        raise ValueError(f"TorchDEQ's get_deq has no twin of solver={solver!r} with backward={backward!r}")
    name = names[type(solver)]
    deq = {
        "f_solver": name,
        "f_max_iter": budget.max_iter,
        "f_tol": budget.tol,
        "f_stop_mode": budget.stop_mode,
        "eval_f_max_iter": (eval_budget or budget).max_iter,
        "b_solver": name,
        "b_max_iter": backward.max_iter or budget.max_iter,
        "b_tol": budget.tol if backward.tol is None else backward.tol,
        "b_stop_mode": budget.stop_mode,
    }
    return deq, ({"m": solver.memory} if name == "anderson" else {})


@dataclass
class SolveReport:
    """Per-sample statistics of one solve, detached.

    Attributes:
        nstep: Evaluations of f (adjoint iterations for a backward solve) per sample, shape ``(B,)``.
        residual: Relative residual of the returned iterate per sample, shape ``(B,)``.
        tol: The tolerance the solve was asked for.
    """

    nstep: Tensor
    residual: Tensor
    tol: float

    @property
    def converged(self) -> Tensor:
        """Whether each sample's residual is at most ``tol`` (the same test for both libraries)."""
        return self.residual <= self.tol


class ResidualCell(nn.Module):
    """f(z, x): the MDEQ residual block at one resolution, with a counter of its evaluations.

    Args:
        channels: Channels of z and of the injected x.
        groups: GroupNorm groups (must divide ``channels``).
        dropout: Variational-dropout probability applied to the hidden activation.

    Shapes:
        z, x: ``(B, channels, H, W)``; output: the same.
    """

    def __init__(self, channels: int, groups: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        # Weight normalisation (as in the DEQ papers) is stateless: the map cannot change during a
        # solve under either library, unlike a power-iterated spectral norm in training mode.
        self.conv1 = il.weight_norm(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        self.norm1 = nn.GroupNorm(groups, channels)
        self.drop = il.VariationalDropout(dropout)
        self.conv2 = il.weight_norm(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        self.norm2 = nn.GroupNorm(groups, channels)
        self.norm3 = nn.GroupNorm(groups, channels)
        self.evaluations = 0  # every call, forward solve, adjoint set-up and penalties alike

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        self.evaluations += 1
        hidden = self.drop(F.relu(self.norm1(self.conv1(z))))
        return self.norm3(F.relu(z + self.norm2(x + self.conv2(hidden))))


class ImplicitDEQ(nn.Module):
    """z* = f(z*, x) by :class:`implicitlayers.ImplicitLayer`, started from zeros.

    Args:
        cell: The map f(z, x).
        jacobian_penalty: Hutchinson vectors of the Jacobian penalty per training forward (0: none);
            the penalty is then ``jacobian_loss``, for the caller to add to its loss.
        **settings: The layer's ``solver``, ``budget``, ``eval_budget`` and ``backward`` (see
            :func:`build_classifier`).
    """

    def __init__(self, cell: ResidualCell, jacobian_penalty: int = 0, **settings: Any) -> None:
        super().__init__()
        # The training loop records convergence per sample itself (SolveReport.converged).
        self.layer = il.ImplicitLayer(cell, **settings, jacobian_penalty=jacobian_penalty, on_nonconvergence="ignore")

    @property
    def cell(self) -> ResidualCell:
        """The map f."""
        return self.layer.f

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)

    @property
    def jacobian_loss(self) -> Tensor | None:
        """The last training forward's penalty (with ``jacobian_penalty`` > 0), else None."""
        return self.layer.jacobian_loss

    def forward_report(self) -> SolveReport:
        """The last forward solve."""
        return self._report(self.layer.stats, "forward")

    def backward_report(self) -> SolveReport | None:
        """The last IFT adjoint solve (None before the first backward)."""
        return None if self.layer.backward_stats is None else self._report(self.layer.backward_stats, "backward")

    @staticmethod
    def _report(stats: il.SolverResult | None, direction: str) -> SolveReport:
        if stats is None:
            raise RuntimeError(f"no {direction} solve yet")
        return SolveReport(stats.nstep.clone(), stats.residual.clone(), stats.budget.tol)


class TorchDEQ(nn.Module):
    """The same equilibrium layer built with TorchDEQ's ``get_deq`` (IFT backward, same budgets).

    ``deq(func, z_init)`` returns ``(z_out, info)``: ``z_out[-1]`` is the fixed point with its
    gradient attached, ``info["nstep"]`` the step of each sample's best iterate (TorchDEQ stops the
    batch when its largest residual is below ``f_tol``). The variational-dropout masks are drawn
    anew at each forward here, as :class:`~implicitlayers.ImplicitLayer` does by itself.

    Args:
        cell: The map f(z, x).
        **settings: The same ``solver``, ``budget``, ``eval_budget`` and ``backward`` as :class:`ImplicitDEQ`'s,
            translated by :func:`torchdeq_arguments`.

    Raises:
        ImportError: If ``torchdeq`` is not installed.
        ValueError: For a solver or gradient mode TorchDEQ has no twin of.
    """

    jacobian_loss = None  # no penalty in this comparison

    def __init__(self, cell: ResidualCell, **settings: Any) -> None:
        super().__init__()
        deq_arguments, self.solver_kwargs = torchdeq_arguments(**settings)
        from torchdeq import get_deq  # optional dependency: only this class needs it

        self.tols = {"forward": deq_arguments["f_tol"], "backward": deq_arguments["b_tol"]}
        self.cell = cell
        self.deq = get_deq(core="sliced", ift=True, **deq_arguments)
        self._reports: dict[str, SolveReport | None] = {"forward": None, "backward": None}

    def forward(self, x: Tensor) -> Tensor:
        for module in self.cell.modules():
            if isinstance(module, il.VariationalDropout):
                module.reset_mask()
        z_out, info = self.deq(
            lambda z: self.cell(z, x),
            torch.zeros_like(x),
            solver_kwargs=self.solver_kwargs,
            backward_writer=lambda adjoint: self._record("backward", adjoint),
        )
        self._record("forward", info)
        return z_out[-1]

    def _record(self, direction: str, info: dict[str, Tensor]) -> None:
        nstep, residual = (info[key].detach().reshape(-1).clone() for key in ("nstep", "rel_lowest"))
        self._reports[direction] = SolveReport(nstep, residual, self.tols[direction])

    def forward_report(self) -> SolveReport:
        """The last forward solve."""
        if self._reports["forward"] is None:
            raise RuntimeError("no forward solve yet")
        return self._reports["forward"]

    def backward_report(self) -> SolveReport | None:
        """The last IFT adjoint solve (None before the first backward)."""
        return self._reports["backward"]


class DEQClassifier(nn.Module):
    """Conv stem → equilibrium layer → ReLU, 2×2 average pooling and a linear head.

    Args:
        equilibrium: An :class:`ImplicitDEQ` or a :class:`TorchDEQ` around the cell.
        channels: Channels of the stem's output (the cell's width).
        groups: GroupNorm groups of the stem.
        classes: Output classes.

    Shapes:
        images: ``(B, 1, H, W)``; output: logits ``(B, classes)``.
    """

    def __init__(self, equilibrium: ImplicitDEQ | TorchDEQ, channels: int, groups: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.GroupNorm(groups, channels))
        self.equilibrium = equilibrium
        # 2×2 pooling keeps where in the digit a feature is, which a global average would discard.
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * channels, classes))

    @property
    def cell(self) -> ResidualCell:
        """The map f of the equilibrium layer."""
        return self.equilibrium.cell

    def injection(self, images: Tensor) -> Tensor:
        """x = stem(images), the input injected into every evaluation of f."""
        return self.stem(images)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.equilibrium(self.injection(images)))


def build_classifier(
    backend: str,
    channels: int,
    *,
    solver: il.Solver = SOLVER,
    budget: il.Budget = BUDGET,
    eval_budget: il.Budget | None = None,
    backward: il.IFT = BACKWARD,
    groups: int = 4,
    dropout: float = 0.1,
    jacobian_penalty: int = 0,
) -> DEQClassifier:
    """The classifier with its equilibrium layer from ``backend``.

    Args:
        backend: ``"implicitlayers"`` or ``"torchdeq"``.
        channels: Width of the stem and the cell.
        solver, budget, eval_budget, backward: The equilibrium layer's solver, budgets and gradient.
        groups: GroupNorm groups (must divide ``channels``).
        dropout: Variational-dropout probability in the cell.
        jacobian_penalty: Hutchinson vectors of the Jacobian penalty (``"implicitlayers"`` only).

    Returns:
        The classifier, in training mode, float32.

    Raises:
        ValueError: For an unknown backend, or a penalty asked of TorchDEQ.
        ImportError: For ``"torchdeq"`` without torchdeq installed.
    """
    cell = ResidualCell(channels, groups, dropout)
    settings = {"solver": solver, "budget": budget, "eval_budget": eval_budget, "backward": backward}
    if backend == "implicitlayers":
        equilibrium: ImplicitDEQ | TorchDEQ = ImplicitDEQ(cell, **settings, jacobian_penalty=jacobian_penalty)
    elif backend == "torchdeq":
        if jacobian_penalty:
            raise ValueError("the TorchDEQ comparison runs without the Jacobian penalty")
        equilibrium = TorchDEQ(cell, **settings)
    else:
        raise ValueError(f"backend must be 'implicitlayers' or 'torchdeq', got {backend!r}")
    return DEQClassifier(equilibrium, channels, groups)
