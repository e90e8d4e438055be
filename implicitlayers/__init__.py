"""implicitlayers: implicit and invertible layers for PyTorch.

Fixed-point solvers (:func:`solve`), gradient modes (IFT, phantom, JFB, unrolled, SHINE), Lipschitz control
(:func:`spectral_norm`, :func:`lipschitz_bound`), the implicit-function primitive
(:func:`implicit_fixed_point`, exact derivatives under every transform) and the layers built on it
(:class:`ImplicitLayer`, :class:`InvertibleResidual`, :class:`ImplicitMLP`).
"""

from .backward import GRADIENT_MODES
from .errors import ConvergenceError, ConvergenceWarning, LipschitzWarning
from .flows import ActNorm, ResidualFlow
from .implicit_function import ModuleFunction, SolveConfig, implicit_fixed_point, shine_fixed_point
from .jacobian import jacobian_penalty, spectral_radius
from .layers import FixedPointModule, ImplicitLayer, ImplicitMLP, InvertibleResidual, VariationalDropout, fixed_point
from .lipschitz import LipSwish, SoftSpectralNorm, lipschitz_bound, spectral_norm, weight_norm
from .logdet import LOGDET_ESTIMATORS, residual_logdet
from .solvers import STATUS_NAMES, SolverResult, available_solvers, get_solver, register_solver, residual, solve

__version__ = "0.1.0"

__all__ = [
    "GRADIENT_MODES",
    "LOGDET_ESTIMATORS",
    "STATUS_NAMES",
    "ActNorm",
    "ConvergenceError",
    "ConvergenceWarning",
    "FixedPointModule",
    "ImplicitLayer",
    "ImplicitMLP",
    "InvertibleResidual",
    "LipSwish",
    "LipschitzWarning",
    "ModuleFunction",
    "ResidualFlow",
    "SoftSpectralNorm",
    "SolveConfig",
    "SolverResult",
    "VariationalDropout",
    "available_solvers",
    "fixed_point",
    "get_solver",
    "implicit_fixed_point",
    "jacobian_penalty",
    "lipschitz_bound",
    "register_solver",
    "residual",
    "residual_logdet",
    "shine_fixed_point",
    "solve",
    "spectral_norm",
    "spectral_radius",
    "weight_norm",
]
