"""Dropout for maps solved to a fixed point: one mask per forward."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..implicit import is_transformed

__all__ = ["VariationalDropout"]


class VariationalDropout(nn.Module):
    """Dropout whose mask is fixed for every evaluation of f within one forward of an implicit layer.

    Ordinary dropout would draw a new mask at each of the solver's evaluations, so the map would
    change during the solve and z* would not be a fixed point of anything. Here the mask (shaped like
    the input, so each sample has its own) is drawn at the first call after :meth:`reset_mask`, and
    every implicit layer resets the masks of the dropout modules it contains at the start of each
    forward: no manual reset is needed there, and the backward (which may evaluate f again) sees the
    forward's mask. Identity in eval mode. Elsewhere, call :meth:`reset_mask` to draw a new mask.

    Args:
        p: Probability of zeroing an element, in [0, 1).

    Shapes:
        x: any; output: the same.
    """

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p!r}")
        self.p = p
        self.mask: Tensor | None = None

    def reset_mask(self) -> None:
        """Forgets the mask: the next training-mode call draws a new one."""
        self.mask = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.mask is None:
            if is_transformed(x):
                raise RuntimeError(
                    "VariationalDropout: a mask drawn inside a torch.func transform would differ between the "
                    "solve and the derivatives; call the model in eval mode inside the transform"
                )
            keep = torch.rand(x.shape, dtype=x.dtype, device=x.device) >= self.p
            self.mask = keep.to(x.dtype) / (1.0 - self.p)
        elif self.mask.shape != x.shape:
            raise RuntimeError(
                f"VariationalDropout: its mask has shape {tuple(self.mask.shape)} but the input has shape "
                f"{tuple(x.shape)} within one forward (under torch.func.vmap the batch is folded); use eval "
                "mode inside a transform, or reset_mask() between inputs of different shapes"
            )
        return x * self.mask

    def lipschitz_bound(self) -> float:
        """1 / (1 - p) in training mode (the mask scales kept elements up), 1 in eval mode."""
        return 1.0 / (1.0 - self.p) if self.training else 1.0

    def extra_repr(self) -> str:
        return f"p={self.p}"
