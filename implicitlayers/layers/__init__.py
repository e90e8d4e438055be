"""Implicit and invertible layers."""

from .implicit import FixedPointModule, ImplicitLayer, VariationalDropout, fixed_point
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
