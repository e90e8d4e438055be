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
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from .errors import check_int_at_least
from .logdet import LOGDET_ESTIMATORS
from .solvers import SolverResult

__all__ = ["ActNorm", "ResidualFlow"]

# log_prob is exact by default up to this many dimensions per sample.
EXACT_MAX_DIM = 16


class ActNorm(nn.Module):
    """Per-feature affine map y = (x + b) · exp(s) with data-dependent initialisation (Glow).

    The first forward in training mode sets b and s from that batch: b = -mean and s = -log(std + eps)
    per feature (over the batch and any positions), with the biased standard deviation (Glow's
    choice, defined for every batch size), so the batch leaves with zero mean and unit variance
    (1/N normalisation). ``initialized`` (a buffer) records it, so a loaded state dict is not
    re-initialised.

    A feature whose spread in that batch carries no information about its scale is only centred
    (s = 0): its standard deviation is at most ``min_std`` (a single element per feature, a constant
    feature, or one that varies by less than ``min_std``), or at most 64 units of rounding of its mean
    magnitude (a spread that is rounding, not signal). 1/std would be unbounded there — a constant
    first batch used to set s = -log(eps), sending an input 0.01 away to ~1e4 — whereas this way every
    initial scale exp(s) is at most max(1, 1/``min_std``). The scale then trains like any parameter. A
    non-finite value in the initialising batch raises ``ValueError`` and leaves the module
    uninitialised; an empty batch initialises nothing.

    Args:
        num_features: Size of the feature dimension (dim 1).
        eps: Added to the standard deviation at initialisation (>= 0).
        min_std: Standard deviations at or below this are not normalised at initialisation (> 0).

    Shapes:
        x: ``(B, C, ...)``; output: the same; log-determinant: ``(B,)``.
    """

    def __init__(self, num_features: int, eps: float = 1e-6, min_std: float = 1e-3) -> None:
        super().__init__()
        if not eps >= 0 or not math.isfinite(eps):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        if not min_std > 0 or not math.isfinite(min_std):
            raise ValueError(f"min_std must be a finite number > 0, got {min_std!r}")
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.eps = eps
        self.min_std = min_std
        self.register_buffer("initialized", torch.tensor(False))

    def _view(self, t: Tensor, x: Tensor) -> Tensor:
        return t.reshape(1, -1, *([1] * (x.dim() - 2))).to(x.dtype)

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        per_feature = x.detach().transpose(0, 1).reshape(x.shape[1], -1)
        if per_feature.shape[1] == 0:
            return  # nothing to learn from: the next non-empty batch initialises
        if not bool(torch.isfinite(per_feature).all()):
            raise ValueError(
                "x must be finite in the batch that initialises ActNorm (its first training-mode forward): "
                "a NaN or inf would be stored in bias and log_scale"
            )
        # float64 statistics (on the CPU where a device has no float64): the initialised batch is
        # centred and scaled to the parameters' precision.
        values = (per_feature.cpu() if per_feature.device.type == "mps" else per_feature).double()
        mean = values.mean(dim=1)
        std = (values - mean[:, None]).square().mean(dim=1).sqrt()  # biased: defined for one element
        precision = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        rounding = 64 * torch.finfo(precision).eps * mean.abs()
        degenerate = (std <= self.min_std) | (std <= rounding)
        log_scale = torch.where(degenerate, 0.0, -torch.log(std + self.eps))
        self.bias.copy_(-mean)
        self.log_scale.copy_(log_scale)
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
        """``n`` samples of the model: base draws pushed through :meth:`inverse`.

        Args:
            n: Number of samples (>= 1).
            generator: Random source of the base draws, so that a seeded generator reproduces the
                samples. With a :class:`torch.distributions.Distribution` base (whose ``sample``
                takes no generator) it is honoured for :class:`~torch.distributions.Normal`,
                :class:`~torch.distributions.MultivariateNormal` and
                :class:`~torch.distributions.Independent` of those, drawn by reparametrisation from
                ``torch.randn(generator=generator)``; other distributions raise ``ValueError`` when a
                generator is given. Without one, the base's own ``sample`` (global random state).

        Returns:
            The samples, shape ``(n, *event_shape)``.

        Raises:
            ValueError: If ``n`` is not a positive integer, or ``generator`` is given with a base
                distribution it cannot drive.
        """
        check_int_at_least("n", n)
        if self.base is not None:
            z = self.base.sample((n,)) if generator is None else _draw(self.base, (n,), generator)
        else:
            parameter = next(self.parameters(), None)
            dtype = parameter.dtype if parameter is not None else torch.get_default_dtype()
            z = torch.randn(n, *self.event_shape, generator=generator, dtype=dtype)
            if parameter is not None:
                z = z.to(parameter.device)
        return self.inverse(z)


# Distributions whose draws _draw can take from a generator, by exact type: a subclass may sample otherwise.
_GENERATOR_DISTRIBUTIONS = (Normal, MultivariateNormal, Independent)


def _standard_normal(shape: torch.Size, like: Tensor, generator: torch.Generator) -> Tensor:
    """N(0, I) of ``shape`` from ``generator`` (on its device), in ``like``'s dtype and on its device."""
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=generator.device).to(like.device)


def _draw(base: Distribution, sample_shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """``base.sample(sample_shape)``, drawn from ``generator`` by reparametrisation."""
    if type(base) not in _GENERATOR_DISTRIBUTIONS:
        accepted = ", ".join(kind.__name__ for kind in _GENERATOR_DISTRIBUTIONS)
        raise ValueError(
            f"generator can drive a base distribution of type {accepted} (Independent of those) only, got "
            f"{type(base).__name__}: its sample() takes no generator; pass generator=None to draw from the "
            "global random state"
        )
    if isinstance(base, Independent):  # reinterprets batch dimensions as event dimensions: same draws
        return _draw(base.base_dist, sample_shape, generator)
    shape = torch.Size(sample_shape) + base.batch_shape + base.event_shape
    if isinstance(base, Normal):
        return base.loc + base.scale * _standard_normal(shape, base.loc, generator)
    noise = _standard_normal(shape, base.loc, generator)  # MultivariateNormal: loc + L ε, Σ = L Lᵀ
    return base.loc + (base.scale_tril @ noise.unsqueeze(-1)).squeeze(-1)
