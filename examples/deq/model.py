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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicitlayers as il

__all__ = [
    "DEQClassifier",
    "ImplicitDEQ",
    "ResidualCell",
    "SolveReport",
    "SolverSettings",
    "TorchDEQ",
    "build_classifier",
]


@dataclass(frozen=True)
class SolverSettings:
    """The solver budget shared by both equilibrium layers (TorchDEQ's names in brackets).

    Attributes:
        solver: Forward and adjoint solver, ``"anderson"`` or ``"broyden"`` [``f_solver``, ``b_solver``].
        max_iter: Evaluations of f per training forward [``f_max_iter``].
        tol: Relative residual at which a solve stops [``f_tol``; ``f_stop_mode="rel"``].
        eval_max_iter: Evaluations of f per evaluation-mode forward [``eval_f_max_iter``].
        backward_max_iter: Iterations of the IFT adjoint solve [``b_max_iter``].
        backward_tol: Relative residual at which the adjoint solve stops [``b_tol``].
        memory: Anderson's history length (TorchDEQ's default, 6) [``m``].
    """

    solver: str = "anderson"
    max_iter: int = 30
    tol: float = 1e-3
    eval_max_iter: int = 30
    backward_max_iter: int = 30
    backward_tol: float = 1e-3
    memory: int = 6


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
        settings: Solver and budgets.
        jacobian_penalty: Hutchinson vectors of the Jacobian penalty per training forward (0: none);
            the penalty is then ``jacobian_loss``, for the caller to add to its loss.
    """

    def __init__(self, cell: ResidualCell, settings: SolverSettings, jacobian_penalty: int = 0) -> None:
        super().__init__()
        self.settings = settings
        self.layer = il.ImplicitLayer(
            cell,
            solver=settings.solver,
            max_iter=settings.max_iter,
            tol=settings.tol,
            eval_max_iter=settings.eval_max_iter,
            backward_max_iter=settings.backward_max_iter,
            backward_tol=settings.backward_tol,
            solver_options={"memory": settings.memory} if settings.solver == "anderson" else None,
            jacobian_penalty=jacobian_penalty,
            # The training loop records convergence per sample itself (SolveReport.converged).
            on_nonconvergence="ignore",
        )

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
        stats = self.layer.stats
        if stats is None:
            raise RuntimeError("no forward yet")
        return SolveReport(stats.nstep.clone(), stats.residual.clone(), self.settings.tol)

    def backward_report(self) -> SolveReport | None:
        """The last IFT adjoint solve (None before the first backward)."""
        stats = self.layer.backward_stats
        if stats is None:
            return None
        return SolveReport(stats.nstep.clone(), stats.residual.clone(), self.settings.backward_tol)


class TorchDEQ(nn.Module):
    """The same equilibrium layer built with TorchDEQ's ``get_deq`` (IFT backward, same budgets).

    ``deq(func, z_init)`` returns ``(z_out, info)``: ``z_out[-1]`` is the fixed point with its
    gradient attached, ``info["nstep"]`` the step of each sample's best iterate (TorchDEQ stops the
    batch when its largest residual is below ``f_tol``). The variational-dropout masks are drawn
    anew at each forward here, as :class:`~implicitlayers.ImplicitLayer` does by itself.

    Args:
        cell: The map f(z, x).
        settings: Solver and budgets.

    Raises:
        ImportError: If ``torchdeq`` is not installed.
    """

    def __init__(self, cell: ResidualCell, settings: SolverSettings) -> None:
        super().__init__()
        from torchdeq import get_deq  # optional dependency: only this class needs it

        self.settings = settings
        self.cell_module = cell
        self.deq = get_deq(
            core="sliced",
            ift=True,
            f_solver=settings.solver,
            f_max_iter=settings.max_iter,
            f_tol=settings.tol,
            f_stop_mode="rel",
            eval_f_max_iter=settings.eval_max_iter,
            b_solver=settings.solver,
            b_max_iter=settings.backward_max_iter,
            b_tol=settings.backward_tol,
            b_stop_mode="rel",
        )
        self._forward_info: dict[str, Tensor] | None = None
        self._backward_info: dict[str, Tensor] | None = None

    @property
    def cell(self) -> ResidualCell:
        """The map f."""
        return self.cell_module

    @property
    def jacobian_loss(self) -> Tensor | None:
        """No penalty in this comparison."""
        return None

    def forward(self, x: Tensor) -> Tensor:
        for module in self.cell_module.modules():
            if isinstance(module, il.VariationalDropout):
                module.reset_mask()
        options = {"m": self.settings.memory} if self.settings.solver == "anderson" else {}
        z_out, info = self.deq(
            lambda z: self.cell_module(z, x),
            torch.zeros_like(x),
            solver_kwargs=options,
            backward_writer=self._record_backward,
        )
        self._forward_info = {key: value.detach() for key, value in info.items()}
        return z_out[-1]

    def _record_backward(self, info: dict[str, Tensor]) -> None:
        self._backward_info = {key: value.detach() for key, value in info.items()}

    @staticmethod
    def _report(info: dict[str, Tensor], tol: float) -> SolveReport:
        return SolveReport(info["nstep"].reshape(-1).clone(), info["rel_lowest"].reshape(-1).clone(), tol)

    def forward_report(self) -> SolveReport:
        """The last forward solve."""
        if self._forward_info is None:
            raise RuntimeError("no forward yet")
        return self._report(self._forward_info, self.settings.tol)

    def backward_report(self) -> SolveReport | None:
        """The last IFT adjoint solve (None before the first backward)."""
        if self._backward_info is None:
            return None
        return self._report(self._backward_info, self.settings.backward_tol)


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
    settings: SolverSettings,
    *,
    groups: int = 4,
    dropout: float = 0.1,
    jacobian_penalty: int = 0,
) -> DEQClassifier:
    """The classifier with its equilibrium layer from ``backend``.

    Args:
        backend: ``"implicitlayers"`` or ``"torchdeq"``.
        channels: Width of the stem and the cell.
        settings: Solver and budgets.
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
    if backend == "implicitlayers":
        equilibrium: ImplicitDEQ | TorchDEQ = ImplicitDEQ(cell, settings, jacobian_penalty)
    elif backend == "torchdeq":
        if jacobian_penalty:
            raise ValueError("the TorchDEQ comparison runs without the Jacobian penalty")
        equilibrium = TorchDEQ(cell, settings)
    else:
        raise ValueError(f"backend must be 'implicitlayers' or 'torchdeq', got {backend!r}")
    return DEQClassifier(equilibrium, channels, groups)
