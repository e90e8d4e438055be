"""Implicit and invertible layers."""

from .implicit import FixedPointModule, ImplicitLayer
from .invertible import ACTIVATIONS, ImplicitMLP, InvertibleResidual

__all__ = ["ACTIVATIONS", "FixedPointModule", "ImplicitLayer", "ImplicitMLP", "InvertibleResidual"]
