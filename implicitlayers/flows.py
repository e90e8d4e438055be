"""Invertible residual flows: density estimation and sampling with invertible residual blocks.

A :class:`ResidualFlow` maps data x to a base variable z = F(x) through blocks that are each
invertible with a tractable log-determinant — :class:`~implicitlayers.InvertibleResidual`
(x + g(x), Behrmann et al. 2019; Chen et al. 2019), :class:`~implicitlayers.ImplicitMLP`
((1 - g)⁻¹, the iMixer token mixer) and :class:`ActNorm` — so that

    log p(x) = log p_base(F(x)) + Σ_blocks log|det ∂block|,

and samples are base draws pushed back through every block's ``inverse``: for residual blocks a
per-sample fixed-point solve, whose convergence each block reports in its ``stats``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from .logdet import LOGDET_ESTIMATORS
from .solvers import SolverResult

__all__ = ["ActNorm", "ResidualFlow"]

# log_prob is exact by default up to this many dimensions per sample.
EXACT_MAX_DIM = 16


class ActNorm(nn.Module):
    """Per-feature affine map y = (x + b) · exp(s) with data-dependent initialisation (Glow).

    The first forward in training mode sets b and s so that that batch leaves with zero mean and unit
    variance per feature; ``initialized`` (a buffer) records it, so a loaded state dict is not
    re-initialised.

    Args:
        num_features: Size of the feature dimension (dim 1).
        eps: Added to the standard deviation at initialisation.

    Shapes:
        x: ``(B, C, ...)``; output: the same; log-determinant: ``(B,)``.
    """

    def __init__(self, num_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.eps = eps
        self.register_buffer("initialized", torch.tensor(False))

    def _view(self, t: Tensor, x: Tensor) -> Tensor:
        return t.reshape(1, -1, *([1] * (x.dim() - 2))).to(x.dtype)

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        per_feature = x.transpose(0, 1).reshape(x.shape[1], -1)
        self.bias.copy_(-per_feature.mean(dim=1))
        self.log_scale.copy_(-torch.log(per_feature.std(dim=1) + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_logdet(x)[0]

    def forward_with_logdet(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, log|det ∂y/∂x|)``; the log-determinant is Σ s times the positions per feature."""
        if x.dim() < 2 or x.shape[1] != self.bias.shape[0]:
            raise ValueError(f"x must have shape (B, {self.bias.shape[0]}, ...), got {tuple(x.shape)}")
        if self.training and not bool(self.initialized):
            self._initialize(x)
        y = (x + self._view(self.bias, x)) * torch.exp(self._view(self.log_scale, x))
        positions = math.prod(x.shape[2:])
        logdet = (self.log_scale.sum() * positions).to(x.dtype).expand(x.shape[0])
        return y, logdet

    def inverse(self, y: Tensor) -> Tensor:
        """x = y · exp(-s) - b."""
        return y * torch.exp(-self._view(self.log_scale, y)) - self._view(self.bias, y)


class ResidualFlow(nn.Module):
    """A normalising flow of invertible blocks: ``log_prob``, ``sample`` and ``inverse``.

    Examples:
        >>> import torch, implicitlayers as il
        >>> from torch import nn
        >>> def block():
        ...     g = nn.Sequential(il.spectral_norm(nn.Linear(2, 16), 0.9), il.LipSwish(),
        ...                       il.spectral_norm(nn.Linear(16, 2), 0.9))
        ...     return il.InvertibleResidual(g, tol=1e-8)
        >>> flow = il.ResidualFlow([il.ActNorm(2), block(), block()], base=2)
        >>> flow.log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
        >>> flow.sample(3).shape
        torch.Size([3, 2])

    Args:
        blocks: Modules mapping data towards the base, each with ``forward_with_logdet(x, ...)``
            returning ``(y, logdet)`` and ``inverse(y)``.
        base: The base distribution: a :class:`torch.distributions.Distribution` whose ``log_prob``
            returns one value per sample, or an event shape (int or tuple) for a standard normal.

    Attributes:
        sample_stats: After :meth:`inverse` or :meth:`sample`, the :class:`SolverResult` of every
            block whose inverse is a solve (in the order they ran).
    """

    def __init__(self, blocks: Sequence[nn.Module], base: Distribution | int | Sequence[int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        for block in self.blocks:
            if not callable(getattr(block, "forward_with_logdet", None)) or not callable(
                getattr(block, "inverse", None)
            ):
                raise ValueError(
                    f"every block needs forward_with_logdet(x) and inverse(y); {type(block).__name__} lacks them"
                )
        if isinstance(base, Distribution):
            self.base: Distribution | None = base
            self.event_shape = tuple(base.event_shape)
        else:
            shape = (base,) if isinstance(base, int) else tuple(base)
            if not shape or any(not isinstance(n, int) or n < 1 for n in shape):
                raise ValueError(f"base must be a Distribution or an event shape of positive ints, got {base!r}")
            self.base, self.event_shape = None, shape
        self.sample_stats: list[SolverResult] = []

    def forward(self, x: Tensor) -> Tensor:
        """z = F(x): data to base, shape of x."""
        for block in self.blocks:
            x = block(x)
        return x

    def forward_with_logdet(
        self,
        x: Tensor,
        estimator: str | None = None,
        terms: int = 8,
        samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(F(x), log|det ∂F/∂x|)``, the log-determinant of shape ``(B,)``.

        Args:
            x: Data, shape ``(B, *event_shape)``.
            estimator: Residual blocks' estimator (``"exact"``, ``"series"``, ``"roulette"``); default
                ``"exact"`` up to 16 dimensions per sample, else ``"roulette"`` (unbiased).
            terms: Series terms, or the terms taken before the roulette.
            samples: Hutchinson vectors.
            generator: Random source for the stochastic estimators.
        """
        if estimator is None:
            estimator = "exact" if math.prod(x.shape[1:]) <= EXACT_MAX_DIM else "roulette"
        if estimator not in LOGDET_ESTIMATORS:
            raise ValueError(f"estimator must be one of {list(LOGDET_ESTIMATORS)}, got {estimator!r}")
        options = {"estimator": estimator, "terms": terms, "samples": samples, "generator": generator}
        total = x.new_zeros(x.shape[0])
        for block in self.blocks:
            accepted = inspect.signature(block.forward_with_logdet).parameters
            x, logdet = block.forward_with_logdet(x, **{k: v for k, v in options.items() if k in accepted})
            total = total + logdet
        return x, total

    def base_log_prob(self, z: Tensor) -> Tensor:
        """log p_base(z), shape ``(B,)``."""
        if self.base is not None:
            return self.base.log_prob(z)
        flat = z.reshape(z.shape[0], -1)
        return -0.5 * (flat.square().sum(dim=1) + flat.shape[1] * math.log(2 * math.pi))

    def log_prob(self, x: Tensor, estimator: str | None = None, **options: Any) -> Tensor:
        """log p(x) = log p_base(F(x)) + log|det ∂F/∂x|, shape ``(B,)``.

        Args:
            x: Data, shape ``(B, *event_shape)``.
            estimator: As in :meth:`forward_with_logdet` (exact by default up to 16 dimensions).
            **options: ``terms``, ``samples``, ``generator``.
        """
        z, logdet = self.forward_with_logdet(x, estimator, **options)
        return self.base_log_prob(z) + logdet

    def inverse(self, z: Tensor) -> Tensor:
        """x = F⁻¹(z), block inverses in reverse order; solves report into ``sample_stats``."""
        self.sample_stats = []
        for block in reversed(self.blocks):
            before = getattr(block, "stats", None)
            z = block.inverse(z)
            stats = getattr(block, "stats", None)
            if isinstance(stats, SolverResult) and stats is not before:  # this inverse was a solve
                self.sample_stats.append(stats)
        return z

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples of the model: base draws pushed through :meth:`inverse`."""
        if self.base is not None:
            z = self.base.sample((n,))
        else:
            parameter = next(self.parameters(), None)
            dtype = parameter.dtype if parameter is not None else torch.get_default_dtype()
            z = torch.randn(n, *self.event_shape, generator=generator, dtype=dtype)
            if parameter is not None:
                z = z.to(parameter.device)
        return self.inverse(z)
