"""Implicit and invertible layers."""

from .implicit import FixedPointModule, ImplicitLayer, fixed_point
from .invertible import ACTIVATIONS, ImplicitMLP, InvertibleResidual

__all__ = ["ACTIVATIONS", "FixedPointModule", "ImplicitLayer", "ImplicitMLP", "InvertibleResidual", "fixed_point"]
