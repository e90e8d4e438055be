"""Reference fixed-point problems shared by the tests, the benchmarks, the demo and the docs' figures."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TanhProblem", "symmetric_tanh_problem"]


@dataclass
class TanhProblem:
    """The map f(z) = tanh(z Wᵀ + d), one drive d per sample.

    Attributes:
        weight: W, shape ``(D, D)``.
        drive: d, shape ``(B, D)``; also a convenient ``z0`` template (``torch.zeros_like(drive)``).
    """

    weight: Tensor
    drive: Tensor

    def __call__(self, z: Tensor) -> Tensor:
        return torch.tanh(z @ self.weight.T + self.drive)

    def contraction_rate(self, z: Tensor) -> Tensor:
        """Spectral radius of the Jacobian diag(sech²(W z + d)) W at each sample's ``z``, shape ``(B,)``.

        Exact for symmetric W, where the Jacobian is similar to the symmetric S^{1/2} W S^{1/2}.
        """
        root = (1 - torch.tanh(z @ self.weight.T + self.drive) ** 2).sqrt()
        symmetric = root[:, :, None] * self.weight[None] * root[:, None, :]
        return torch.linalg.eigvalsh(symmetric).abs().amax(dim=1)


def symmetric_tanh_problem(
    dim: int,
    batch: int,
    *,
    seed: int = 0,
    norm: float = 0.99,
    dominant_sign: float | None = -1.0,
    drive_scale: float = 0.1,
    dtype: torch.dtype = torch.float64,
) -> TanhProblem:
    """A slow fixed-point problem: tanh(W z + U x) with W symmetric, ||W||₂ = ``norm``, small drive.

    Near z = 0 the Jacobian is W, so plain iteration contracts at rate ≈ ``norm``: the case where
    acceleration pays (a Gaussian W is not slow: its spectral radius is about half its norm). With the
    dominant eigenvalue made negative (the default) the drive is damped along it and the fixed point
    stays in tanh's near-linear range, so the local rate stays near ``norm``; with a positive one the
    drive is amplified ~1/(1 - norm) times, tanh saturates and the rate drops (to ≈ 0.85–0.9 for
    0.99). ``dominant_sign=None`` keeps the sign as drawn.

    Args:
        dim: D, the size of each sample.
        batch: B, the number of samples (independent drives).
        seed: Seed of the generator that draws W, U and x.
        norm: ||W||₂.
        dominant_sign: Sign given to W's largest-magnitude eigenvalue (-1, +1, or None for as drawn).
        drive_scale: Each drive has norm ``drive_scale·√D``.
        dtype: dtype of W and the drives.

    Returns:
        The :class:`TanhProblem`.
    """
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    weight = (a + a.T) / 2
    eigenvalues = torch.linalg.eigvalsh(weight)
    dominant = eigenvalues[-1] if eigenvalues[-1] > -eigenvalues[0] else eigenvalues[0]
    target = norm if dominant_sign is None else math.copysign(norm, dominant_sign) * math.copysign(1.0, dominant)
    weight = target * weight / dominant.abs()
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)
    x = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    drive = x @ mixing.T
    drive = drive_scale * math.sqrt(dim) * drive / torch.linalg.vector_norm(drive, dim=1, keepdim=True)
    return TanhProblem(weight.to(dtype), drive.to(dtype))
