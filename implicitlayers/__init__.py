"""implicitlayers: implicit and invertible layers for PyTorch.

Solvers as small immutable objects (:class:`Picard`, :class:`Anderson`, :class:`Broyden`) with a
:class:`Budget`; gradient modes as objects (:class:`IFT`, :class:`Shine`, :class:`JFB`,
:class:`Phantom`, :class:`Unrolled`); one implicit-function primitive
(:func:`implicit_fixed_point`, exact derivatives under every transform with :class:`IFT`); Lipschitz
control (:func:`spectral_norm`, :func:`lipschitz_bound`); and the layers built on them
(:class:`ImplicitLayer`, :class:`InvertibleResidual`, :class:`ImplicitMLP`).
"""

from .errors import ConvergenceError, ConvergenceWarning, LipschitzWarning
from .flows import ActNorm, ResidualFlow
from .implicit import (
    GRADIENT_MODES,
    IFT,
    JFB,
    Adjoint,
    Gradient,
    ModuleFunction,
    Phantom,
    Shine,
    Unrolled,
    as_gradient,
    implicit_fixed_point,
)
from .jacobian import jacobian_penalty, spectral_radius
from .layers import FixedPointModule, ImplicitLayer, ImplicitMLP, InvertibleResidual, VariationalDropout, fixed_point
from .lipschitz import LipSwish, SoftSpectralNorm, lipschitz_bound, spectral_norm, weight_norm
from .logdet import LOGDET_ESTIMATORS, residual_logdet
from .solvers import (
    STATUS_NAMES,
    Anderson,
    Broyden,
    Budget,
    Picard,
    Solver,
    SolverResult,
    Status,
    as_solver,
    available_solvers,
    get_solver,
    register_solver,
    residual,
    solve,
)

__version__ = "0.2.0"

__all__ = [
    "GRADIENT_MODES",
    "IFT",
    "JFB",
    "LOGDET_ESTIMATORS",
    "STATUS_NAMES",
    "ActNorm",
    "Adjoint",
    "Anderson",
    "Broyden",
    "Budget",
    "ConvergenceError",
    "ConvergenceWarning",
    "FixedPointModule",
    "Gradient",
    "ImplicitLayer",
    "ImplicitMLP",
    "InvertibleResidual",
    "LipSwish",
    "LipschitzWarning",
    "ModuleFunction",
    "Phantom",
    "Picard",
    "ResidualFlow",
    "Shine",
    "SoftSpectralNorm",
    "Solver",
    "SolverResult",
    "Status",
    "Unrolled",
    "VariationalDropout",
    "as_gradient",
    "as_solver",
    "available_solvers",
    "fixed_point",
    "get_solver",
    "implicit_fixed_point",
    "jacobian_penalty",
    "lipschitz_bound",
    "register_solver",
    "residual",
    "residual_logdet",
    "solve",
    "spectral_norm",
    "spectral_radius",
    "weight_norm",
]
