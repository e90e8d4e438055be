"""Implicit and invertible layers."""

from .base import FixedPointModule
from .dropout import VariationalDropout
from .implicit import ImplicitLayer, fixed_point
from .invertible import ACTIVATIONS, ImplicitMLP, InvertibleResidual

__all__ = [
    "ACTIVATIONS",
    "FixedPointModule",
    "ImplicitLayer",
    "ImplicitMLP",
    "InvertibleResidual",
    "VariationalDropout",
    "fixed_point",
]
