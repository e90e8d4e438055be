"""implicitlayers: implicit and invertible layers for PyTorch.

Fixed-point solvers (:func:`solve`), gradient modes (IFT, phantom, JFB, unrolled), Lipschitz control
(:func:`spectral_norm`, :func:`lipschitz_bound`) and the layers built from them
(:class:`ImplicitLayer`, :class:`InvertibleResidual`, :class:`ImplicitMLP`).
"""

from .backward import GRADIENT_MODES
from .errors import ConvergenceError, ConvergenceWarning, LipschitzWarning
from .layers import FixedPointModule, ImplicitLayer, ImplicitMLP, InvertibleResidual
from .lipschitz import SoftSpectralNorm, lipschitz_bound, spectral_norm
from .solvers import SolverResult, available_solvers, get_solver, register_solver, residual, solve

__version__ = "0.1.0"

__all__ = [
    "GRADIENT_MODES",
    "ConvergenceError",
    "ConvergenceWarning",
    "FixedPointModule",
    "ImplicitLayer",
    "ImplicitMLP",
    "InvertibleResidual",
    "LipschitzWarning",
    "SoftSpectralNorm",
    "SolverResult",
    "available_solvers",
    "get_solver",
    "lipschitz_bound",
    "register_solver",
    "residual",
    "solve",
    "spectral_norm",
]
