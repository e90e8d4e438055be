"""Hypothesis strategies shared by the test modules: random contractive problems and layers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor

DTYPES = st.sampled_from([torch.float32, torch.float64])
# Activations with Lipschitz constant 1 keep a map with ||W|| < 1 a certified contraction.
UNIT_ACTIVATIONS = st.sampled_from(["relu", "tanh", "elu"])
SOLVERS = st.sampled_from(["picard", "anderson", "broyden"])


def tolerance_for(dtype: torch.dtype) -> float:
    """A tolerance every solver can reach in this precision."""
    return 1e-10 if dtype == torch.float64 else 1e-5


def max_iter_for(rate: float, tol: float) -> int:
    """Evaluations plain iteration needs at contraction ``rate`` to reach ``tol`` from O(1), with margin.

    Near rate 1 that is many (0.98 at 1e-10: ~1,700): the hard regime of every claim is reached by
    giving the solvers the budget the theory says they need, not by leaving the regime out.
    """
    return int(1.5 * math.log(tol) / math.log(rate)) + 50


@dataclass
class ContractiveMap:
    """f(z) = act(z Wᵀ + x Uᵀ + b) with ||W||₂ = rate < 1, so f is a contraction with that rate."""

    weight: Tensor
    drive: Tensor
    activation: str
    rate: float

    def __call__(self, z: Tensor) -> Tensor:
        pre = z @ self.weight.T + self.drive
        return {"relu": torch.relu, "tanh": torch.tanh, "elu": torch.nn.functional.elu}[self.activation](pre)


@st.composite
def contractive_maps(draw, max_dim: int = 24, max_batch: int = 33, rate=(0.2, 0.98)):
    """Draws a random contractive map with a random batch of drives, float32 or float64.

    W is Gaussian scaled to ||W||₂ = rate: non-symmetric and non-normal, and up to rate 0.98, where
    plain iteration and the adjoint solves are slow.
    """
    dim = draw(st.integers(2, max_dim))
    batch = draw(st.integers(1, max_batch))
    dtype = draw(DTYPES)
    activation = draw(UNIT_ACTIVATIONS)
    contraction = draw(st.floats(*rate))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    weight = contraction * weight / torch.linalg.matrix_norm(weight, ord=2)
    drive = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    return ContractiveMap(weight.to(dtype), drive.to(dtype), activation, contraction)


@st.composite
def seeds(draw):
    return draw(st.integers(0, 2**31 - 1))


def relative_error(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| (b = 0 compares absolutely)."""
    return float(((a - b).norm() / b.norm().clamp_min(1e-300)).detach())
