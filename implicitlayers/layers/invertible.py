"""Invertible residual blocks x ↦ x + g(x) and the implicit MLP z = (id - g)^{-1}(x)."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LipschitzWarning, check_int_at_least
from ..implicit import Gradient
from ..lipschitz import LipSwish, SoftSpectralNorm, lipschitz_bound, spectral_norm
from ..logdet import residual_logdet
from ..solvers import Budget, Solver
from .base import FixedPointModule
from .implicit import initial_guess, validate_z_init

__all__ = ["ACTIVATIONS", "ImplicitMLP", "InvertibleResidual", "make_activation"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "lipswish": LipSwish,
}


def make_activation(name: str) -> nn.Module:
    """An activation module by name (one of :data:`ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def warn_if_not_contractive(g: nn.Module, owner: str) -> float:
    """Warns (:class:`LipschitzWarning`) when ``lipschitz_bound(g) >= 1``; returns the bound."""
    bound = lipschitz_bound(g)
    if bound >= 1:
        detail = "cannot be bounded" if math.isinf(bound) else f"is bounded only by {bound:.4f} >= 1"
        warnings.warn(
            f"{owner}: the Lipschitz constant of g {detail}, so z = x + g(z) is not certified to have a "
            "unique solution and solvers may fail to converge; lower coeff or use an activation with "
            "constant at most 1 (relu, tanh, elu, lipswish) for a certified contraction",
            LipschitzWarning,
            stacklevel=3,
        )
    return bound


@contextlib.contextmanager
def _frozen_normalisation(module: nn.Module) -> Iterator[None]:
    """Spectral norms in eval mode while inside: the weights the last forward used, unchanged."""
    norms = [m for m in module.modules() if isinstance(m, SoftSpectralNorm) and m.training]
    for norm in norms:
        norm.training = False
    try:
        yield
    finally:
        for norm in norms:
            norm.training = True


class InvertibleResidual(FixedPointModule):
    """The invertible residual block y = x + g(x) (Behrmann et al., 2019), with a solved inverse.

    ``inverse(y)`` finds x with x + g(x) = y, i.e. the fixed point of x ↦ y - g(x), which is unique
    and found by any solver when Lip(g) < 1; gradients follow ``backward`` (IFT by default).

    Args:
        g: The residual branch, mapping ``(B, ...)`` to the same shape; for a guaranteed inverse make it
            a contraction, e.g. with :func:`implicitlayers.spectral_norm` (a warning is emitted when
            :func:`implicitlayers.lipschitz_bound` cannot certify that).
        solver: Solver of the inverse (object or name; Broyden by default).
        budget: The inverse solve's :class:`~implicitlayers.Budget`; ``max_iter``/``tol`` are shorthands.
        max_iter: Maximum evaluations of g in the inverse's solve.
        tol: Residual tolerance of the inverse.
        backward: Gradient mode of the inverse (any :class:`~implicitlayers.Gradient` or its name).
        **options: Any other :class:`~implicitlayers.FixedPointModule` option (``eval_budget``,
            ``on_nonconvergence``, ...).
    """

    def __init__(
        self,
        g: nn.Module,
        *,
        solver: str | Solver = "broyden",
        budget: Budget | None = None,
        max_iter: int | None = None,
        tol: float | None = None,
        backward: str | Gradient = "ift",
        **options: Any,
    ) -> None:
        super().__init__(solver=solver, budget=budget, max_iter=max_iter, tol=tol, backward=backward, **options)
        if not isinstance(g, nn.Module):
            raise ValueError(f"g must be an nn.Module, got {type(g).__name__}")
        self.g = g
        warn_if_not_contractive(g, type(self).__name__)

    def forward(self, x: Tensor) -> Tensor:
        """y = x + g(x), shape of x."""
        return x + self.g(x)

    def inverse(self, y: Tensor) -> Tensor:
        """x with x + g(x) = y, found from the initial guess x = y; shape of y.

        It inverts the map the last forward used: only a training-mode :meth:`forward` advances the
        power iteration of spectrally normalised weights, so ``inverse(forward(x))`` recovers x to
        the solve's tolerance in training mode too.
        """
        with _frozen_normalisation(self):
            return self.fixed_point(lambda x, y: y - self.g(x), y, y)

    def forward_with_logdet(
        self,
        x: Tensor,
        estimator: str = "series",
        terms: int = 8,
        samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(y, log|det ∂y/∂x|)`` for y = x + g(x): log det(I + J_g(x)) per sample.

        Args:
            x: Input, shape ``(B, ...)``.
            estimator: ``"exact"`` (Jacobian and ``slogdet``), ``"series"`` (``terms`` terms of
                Σ (-1)^{k+1} tr(J^k)/k with Hutchinson traces) or ``"roulette"`` (unbiased Russian
                roulette with the Neumann gradient of Residual Flows); see
                :func:`implicitlayers.logdet.residual_logdet`.
            terms: Series terms, or terms always taken before the roulette.
            samples: Hutchinson vectors averaged.
            generator: Random source for the stochastic estimators.

        Returns:
            ``(y, logdet)``: y shaped like x, logdet of shape ``(B,)``.
        """
        gx, logdet = residual_logdet(
            self.g, x, sign=1.0, estimator=estimator, terms=terms, samples=samples, generator=generator
        )
        return x + gx, logdet


class ImplicitMLP(FixedPointModule):
    """z = (id - g)^{-1}(x): the solution of z = x + g(z) for a spectrally normalised two-layer MLP g.

    g = Linear_sn(hidden → features) ∘ act ∘ Linear_sn(features → hidden) ∘ (act if ``pre_activation``).
    This is the inverse of an invertible residual block and the core of the iMixer token mixer, where
    the reference implementation uses GELU with ``pre_activation=True`` and ``coeff=0.9``. Its
    certified bound is 0.81·1.1289² ≈ 1.03, so construction warns; it converges in practice, and a
    coeff below ≈ 0.885 (or relu/tanh/elu) makes it a certified contraction.

    The inverse of the layer, x = z - g(z), is explicit (:meth:`inverse`). Every row of the flattened
    input (all leading dims) is an independent problem, so each converges on its own.

    Examples:
        >>> import torch, implicitlayers as il
        >>> layer = il.ImplicitMLP(16, 32, activation="relu", tol=1e-6)
        >>> x = torch.randn(4, 16)
        >>> bool(torch.allclose(layer.inverse(layer(x)), x, atol=1e-5))
        True

    Args:
        features: Size of the last input dim.
        hidden_features: Width of g's hidden layer (defaults to ``features``).
        activation: ``"gelu"``, ``"relu"``, ``"elu"``, ``"tanh"``, ``"silu"`` or ``"lipswish"``
            (:class:`~implicitlayers.LipSwish`: smooth and 1-Lipschitz).
        pre_activation: Apply the activation before the first linear layer as well.
        bias: Give both linear layers a bias.
        coeff: Spectral-norm bound of each linear layer.
        n_power_iterations: Power-iteration steps per training forward.
        solver: Forward solver (object or name). Broyden by default: a root finder, it does not rely
            on g being a contraction, which the default GELU/coeff 0.9 setting does not certify.
        budget: The solve's :class:`~implicitlayers.Budget`; ``max_iter``/``tol`` are shorthands.
        max_iter: Maximum evaluations of g per solve.
        tol: Per-row residual tolerance; 0 runs exactly ``max_iter`` iterations.
        backward: Gradient mode, as in :class:`ImplicitLayer`.
        z_init: Initial guess; ``"input"`` (the default) starts from x, exact when g = 0.
        on_nonconvergence: ``"warn"``, ``"raise"`` or ``"ignore"``, as in :class:`ImplicitLayer`.
        **options: Any other :class:`~implicitlayers.FixedPointModule` option.

    Shapes:
        x: ``(..., features)``; output: the same.
    """

    def __init__(
        self,
        features: int,
        hidden_features: int | None = None,
        *,
        activation: str = "gelu",
        pre_activation: bool = True,
        bias: bool = True,
        coeff: float = 0.9,
        n_power_iterations: int = 1,
        solver: str | Solver = "broyden",
        budget: Budget | None = None,
        max_iter: int | None = None,
        tol: float | None = None,
        backward: str | Gradient = "ift",
        z_init: str | Callable[[Tensor], Tensor] = "input",
        on_nonconvergence: str = "warn",
        **options: Any,
    ) -> None:
        super().__init__(
            solver=solver,
            budget=budget,
            max_iter=max_iter,
            tol=tol,
            backward=backward,
            on_nonconvergence=on_nonconvergence,
            **options,
        )
        hidden_features = features if hidden_features is None else hidden_features
        check_int_at_least("features", features)
        check_int_at_least("hidden_features", hidden_features)
        layers = [make_activation(activation)] if pre_activation else []
        layers += [
            spectral_norm(nn.Linear(features, hidden_features, bias=bias), coeff, n_power_iterations),
            make_activation(activation),
            spectral_norm(nn.Linear(hidden_features, features, bias=bias), coeff, n_power_iterations),
        ]
        self.features = features
        self.hidden_features = hidden_features
        self.g = nn.Sequential(*layers)
        self.z_init = validate_z_init(z_init)
        warn_if_not_contractive(self.g, type(self).__name__)

    def forward(self, x: Tensor) -> Tensor:
        """Solves z = x + g(z) row by row; shape ``(..., features)``."""
        self._check_features(x, "x")
        rows = x.reshape(-1, self.features)
        z0 = initial_guess(self.z_init, rows)
        z = self.fixed_point(lambda z, rows: rows + self.g(z), z0, rows)
        return z.reshape(x.shape)

    def inverse(self, z: Tensor) -> Tensor:
        """x = z - g(z), explicit and exact; shape ``(..., features)``.

        It inverts the map the last forward used: only a training-mode :meth:`forward` advances the
        power iteration of the spectrally normalised weights, so ``inverse(forward(x))`` recovers x
        to the solve's tolerance in training mode too.
        """
        self._check_features(z, "z")
        with _frozen_normalisation(self):
            return z - self.g(z)

    def _check_features(self, tensor: Tensor, name: str) -> None:
        if tensor.dim() == 0 or tensor.shape[-1] != self.features:
            raise ValueError(f"{name} must have shape (..., {self.features}), got {tuple(tensor.shape)}")

    def __prepare_scriptable__(self) -> ImplicitMLP:
        """Refuses ``torch.jit.script`` with the reason, before TorchScript compiles anything.

        ``torch.jit.script`` calls this hook on every submodule first, so scripting a model that
        contains this layer (also a torch.fx graph in which it is a leaf) stops here with a clear
        message instead of a TorchScript frontend error from inside the solve.

        Raises:
            RuntimeError: Always.
        """
        raise RuntimeError(
            "ImplicitMLP cannot be compiled with TorchScript: its solve is a Python solver loop inside a "
            "torch.autograd.Function, over weights parametrised with torch.nn.utils.parametrize; run the model "
            "in Python instead: eagerly, or as a torch.fx graph in which the layer's call is a leaf"
        )

    def forward_with_logdet(
        self,
        x: Tensor,
        estimator: str = "series",
        terms: int = 8,
        samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(z, log|det ∂z/∂x|)`` for z = (1 - g)⁻¹(x): -log det(I - J_g(z)) per row.

        The volume change of the implicit layer (iMixer's token mixer), from the Jacobian of g at the
        solution; its gradient flows through z by the IFT. Estimators as in
        :meth:`InvertibleResidual.forward_with_logdet`.

        Returns:
            ``(z, logdet)``: z shaped like x, logdet of shape ``x.shape[:-1]``.
        """
        z = self(x)
        with _frozen_normalisation(self):  # the g of the solve: no second power-iteration step
            _, logdet = residual_logdet(
                self.g,
                z.reshape(-1, self.features),
                sign=-1.0,
                estimator=estimator,
                terms=terms,
                samples=samples,
                generator=generator,
            )
        return z, -logdet.reshape(x.shape[:-1])

    def extra_repr(self) -> str:
        return f"features={self.features}, hidden_features={self.hidden_features}, " + super().extra_repr()
