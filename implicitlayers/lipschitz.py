"""Lipschitz control: soft spectral normalisation and certified Lipschitz bounds.

An invertible residual block x + g(x) has a unique inverse, and z = x + g(z) a unique solution that
plain iteration finds, when Lip(g) < 1. :func:`spectral_norm` keeps each linear layer's spectral
norm at most ``coeff``; :func:`lipschitz_bound` multiplies the per-layer constants into a bound on g.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .errors import check_int_at_least

__all__ = [
    "ACTIVATION_LIPSCHITZ",
    "ConvSpectralNorm",
    "LipSwish",
    "SoftSpectralNorm",
    "lipschitz_bound",
    "spectral_norm",
    "weight_norm",
]

# Lipschitz constants max |σ'(x)|, rounded up in the 5th decimal so they stay upper bounds.
# GELU: Φ(x) + xφ(x) peaks at x = √2 (1.1289041...; the tanh approximation peaks at 1.1289931...);
# SiLU: s(x)(1 + x(1 - s(x))) peaks at x ≈ 2.3994 (1.0998393...).
ACTIVATION_LIPSCHITZ: dict[type[nn.Module], float] = {
    nn.ReLU: 1.0,
    nn.Tanh: 1.0,
    nn.Identity: 1.0,
    nn.GELU: 1.12891,
    nn.SiLU: 1.09984,
    nn.Sigmoid: 0.25,
    nn.Softplus: 1.0,
}
_GELU_TANH_LIPSCHITZ = 1.12900
# max over u of |d/du [u σ(u)]| = SiLU's constant; LipSwish divides by 1.1 > it.
_SWISH_LIPSCHITZ = 1.09984


class LipSwish(nn.Module):
    """LipSwish (Chen et al., 2019, Residual Flows): x·σ(βx) / 1.1 with a learnable β, Lipschitz ≤ 1.

    d/dx [x σ(βx)] = s(u) + u s(u)(1 - s(u)) at u = βx, the derivative of SiLU at u, whose magnitude
    is at most 1.0998 for every β; dividing by 1.1 keeps the activation 1-Lipschitz however β trains,
    while it stays smooth (invertible residual flows need a smooth g for their log-determinants).

    Args:
        beta: Initial β.

    Shapes:
        x: any; output: the same.
    """

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(float(beta)))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.beta.to(x.dtype) * x) / 1.1

    def lipschitz_bound(self) -> float:
        """The certified constant 1.09984 / 1.1 < 1, for every β."""
        return _SWISH_LIPSCHITZ / 1.1


class SoftSpectralNorm(nn.Module):
    """Parametrisation W ↦ W / max(1, σ̂ / coeff) with σ̂ = uᵀWv estimated by power iteration.

    ``u`` and ``v`` are persistent buffers (so they travel with the state dict). In training mode each
    call advances them by ``n_power_iterations`` steps under ``no_grad``; in eval mode they are reused,
    so evaluation is deterministic. σ̂ stays differentiable in W (u and v are constants), as in
    Miyato et al. and invertible ResNets. Weights whose norm is already below ``coeff`` pass unchanged.
    """

    def __init__(self, weight: Tensor, coeff: float = 0.9, n_power_iterations: int = 1) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"spectral_norm expects a 2-D weight (out, in), got shape {tuple(weight.shape)}")
        check_spectral_norm_settings(coeff, n_power_iterations)
        self.coeff = float(coeff)
        self.n_power_iterations = n_power_iterations
        out_features, in_features = weight.shape
        generator = torch.Generator(device="cpu").manual_seed(0)
        u = torch.randn(out_features, generator=generator, dtype=torch.float32).to(weight)
        v = torch.randn(in_features, generator=generator, dtype=torch.float32).to(weight)
        self.register_buffer("u", F.normalize(u, dim=0))
        self.register_buffer("v", F.normalize(v, dim=0))
        self.refine_(weight)

    @torch.no_grad()
    def refine_(self, weight: Tensor) -> None:
        """Sets u, v to the exact leading singular vectors of ``weight`` (one SVD).

        Power iteration from random vectors needs hundreds of steps on square-ish random matrices
        (their top singular values are close), so σ̂ would start several percent low and the
        normalised layer's norm would exceed ``coeff``. ``torch.nn.utils.spectral_norm`` refines
        with 15 power steps for the same reason; an SVD at construction is exact and cheap.
        """
        weight = weight.detach()
        if weight.device.type == "meta" or self._is_singular_pair(weight):
            # Nothing to compute on the meta device; and registering the parametrisation calls
            # right_inverse with the very weight just refined at construction: skip the second SVD.
            return
        left, _, right_t = torch.linalg.svd(weight.float(), full_matrices=False)
        # Keep the sign of the previous vectors so that a re-refinement changes nothing when exact.
        sign = 1.0 if float(torch.dot(left[:, 0], self.u.float())) >= 0 else -1.0
        self.u.copy_(sign * left[:, 0])
        self.v.copy_(sign * right_t[0])

    def _is_singular_pair(self, weight: Tensor) -> bool:
        """Whether (u, v) already are the leading singular pair of ``weight`` (to float32 accuracy)."""
        w, u, v = weight.float(), self.u.float(), self.v.float()
        sigma = torch.dot(u, w @ v)
        if not bool(sigma > 0):
            return False
        tolerance = 1e-5 * float(sigma)
        # Both residuals vanish only for a singular pair; a pair computed for another weight is not one.
        left_residual = float(torch.linalg.vector_norm(w @ v - sigma * u))
        right_residual = float(torch.linalg.vector_norm(w.t() @ u - sigma * v))
        return left_residual <= tolerance and right_residual <= tolerance

    def _operator(self, weight: Tensor, v: Tensor) -> Tensor:
        """The linear map whose norm is normalised, applied to ``v``: here W v."""
        return torch.mv(weight, v)

    def _adjoint(self, weight: Tensor, u: Tensor) -> Tensor:
        """Its adjoint applied to ``u``: here Wᵀ u."""
        return torch.mv(weight.t(), u)

    @torch.no_grad()
    def _power_iterate(self, weight: Tensor, iterations: int) -> None:
        if weight.device.type == "meta":
            return
        u, v = self._power_steps(weight, iterations)
        self.u.copy_(u)
        self.v.copy_(v)

    @torch.no_grad()
    def _power_steps(self, weight: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
        """``(u, v)`` after ``iterations`` power-iteration steps on ``weight``'s operator from the
        stored vectors, which are left unchanged."""
        u, v = self.u, self.v
        for _ in range(iterations):
            v = _unit(self._adjoint(weight, u))
            u = _unit(self._operator(weight, v))
        return u, v

    def sigma(self, weight: Tensor) -> Tensor:
        """The current estimate σ̂ = ⟨u, W v⟩ of the operator norm (differentiable in ``weight``)."""
        return (self.u * self._operator(weight, self.v)).sum()

    def forward(self, weight: Tensor) -> Tensor:
        # Power iteration and σ̂ in the weight's own precision, never autocast to bf16.
        with _without_autocast(weight.device.type):
            if self.training:
                if torch._C._functorch.is_functorch_wrapped_tensor(weight) or _inside_differentiating_transform():
                    raise RuntimeError(
                        "spectral_norm: a training-mode forward advances the power iteration by writing its u/v "
                        "buffers, which torch.func's grad, vjp, jacrev, jvp and jacfwd (and any transform of the "
                        "weights) forbid; call model.eval() before the transform (the map is then the one the last "
                        "training forward used), and advance the power iteration outside it (a training-mode "
                        "forward under torch.no_grad)"
                    )
                self._power_iterate(weight.detach(), self.n_power_iterations)
            factor = torch.clamp(self.sigma(weight) / self.coeff, min=1.0)
            return weight / factor

    def right_inverse(self, weight: Tensor) -> Tensor:
        # Assigning module.weight = W stores W itself as the free parameter; re-estimate u, v for it
        # so that re-initialising a normalised layer keeps σ̂ accurate.
        self.refine_(weight)
        return weight


class ConvSpectralNorm(SoftSpectralNorm):
    """:class:`SoftSpectralNorm` for a convolution: σ̂ is the norm of the convolution *operator*.

    A convolution is a linear map from ``(C_in, *input_shape)`` to ``(C_out, *output_shape)``; its
    operator norm, not the norm of the reshaped kernel, is the Lipschitz constant. The power
    iteration runs on that operator (the convolution and its adjoint, at the given input shape, with
    the module's stride, padding, dilation and groups), so the normalised convolution's operator norm
    is at most ``coeff`` at that input size. ``u`` and ``v`` are an output and an input feature map.
    """

    def __init__(
        self, weight: Tensor, conv: nn.Module, input_shape: tuple[int, ...], coeff: float, n_power_iterations: int
    ) -> None:
        nn.Module.__init__(self)
        check_spectral_norm_settings(coeff, n_power_iterations)
        if getattr(conv, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"spectral_norm supports zero padding only, got padding_mode={conv.padding_mode!r}")
        dims = weight.dim() - 2
        if len(input_shape) != dims + 1 or input_shape[0] != conv.in_channels or min(input_shape) < 1:
            raise ValueError(
                f"input_shape must be (C_in, *spatial) with C_in = {conv.in_channels} and {dims} spatial size(s), "
                f"got {tuple(input_shape)}"
            )
        self.coeff = float(coeff)
        self.n_power_iterations = n_power_iterations
        self.input_shape = tuple(input_shape)
        self.conv_options = {
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "groups": conv.groups,
        }
        self._conv = F.conv1d if dims == 1 else F.conv2d
        generator = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(1, *self.input_shape, generator=generator, dtype=torch.float32).to(weight)
        with torch.no_grad():
            u = self._operator(weight.detach(), v)
        self.register_buffer("v", _unit(v))
        self.register_buffer("u", _unit(u))
        self.refine_(weight)

    def _operator(self, weight: Tensor, v: Tensor) -> Tensor:
        return self._conv(v, weight, **self.conv_options)

    def _adjoint(self, weight: Tensor, u: Tensor) -> Tensor:
        _, pull = torch.func.vjp(lambda v: self._operator(weight, v), self.v)
        return pull(u)[0]

    @torch.no_grad()
    def refine_(self, weight: Tensor) -> None:
        """Converges u, v for ``weight`` (200 power-iteration steps: no SVD of an operator)."""
        if weight.device.type != "meta":
            self._power_iterate(weight.detach(), 200)


def check_spectral_norm_settings(coeff: float, n_power_iterations: int) -> None:
    """Raises ``ValueError`` naming ``coeff`` or ``n_power_iterations`` when out of range."""
    if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not coeff > 0:
        raise ValueError(f"coeff must be > 0, got {coeff!r}")
    check_int_at_least("n_power_iterations", n_power_iterations)


def _unit(t: Tensor) -> Tensor:
    """``t`` scaled to unit 2-norm (over all its elements)."""
    return t / torch.linalg.vector_norm(t).clamp_min(1e-12)


def _inside_differentiating_transform() -> bool:
    """Whether a torch.func grad/vjp/jvp level is active: in-place writes to buffers are refused there."""
    if torch._C._functorch.maybe_current_level() is None:
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() in (TransformType.Grad, TransformType.Jvp) for i in retrieve_all_functorch_interpreters())


def _without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    if device_type == "meta":  # autocast knows no meta device; shapes are all that is computed there
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def spectral_norm(
    module: nn.Module,
    coeff: float = 0.9,
    n_power_iterations: int = 1,
    name: str = "weight",
    input_shape: tuple[int, ...] | None = None,
) -> nn.Module:
    """Constrains ``module.<name>`` to spectral norm at most ``coeff`` (soft normalisation).

    Uses :mod:`torch.nn.utils.parametrize`: the free parameter lives at
    ``module.parametrizations.<name>.original`` and the power-iteration vectors at
    ``module.parametrizations.<name>.0.u`` / ``.v``; state dicts round-trip.

    Args:
        module: A module with a 2-D weight, typically :class:`torch.nn.Linear`, or a
            :class:`torch.nn.Conv1d` / :class:`torch.nn.Conv2d` (then ``input_shape`` is required).
        coeff: Upper bound on the normalised weight's spectral norm (> 0): for a convolution, on the
            operator norm of the convolution at ``input_shape``.
        n_power_iterations: Power-iteration steps per training-mode forward (>= 1).
        name: The parameter to normalise.
        input_shape: For a convolution, the input's ``(C_in, L)`` or ``(C_in, H, W)``
            (:class:`ConvSpectralNorm`).

    Returns:
        The same module, parametrised in place.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"module {type(module).__name__} has no tensor attribute {name!r} to normalise")
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if input_shape is None:
            raise ValueError(
                f"spectral_norm of a {type(module).__name__} needs input_shape=(C_in, *spatial): the operator "
                "norm of a convolution depends on the size of its input"
            )
        parametrization: SoftSpectralNorm = ConvSpectralNorm(weight, module, input_shape, coeff, n_power_iterations)
    else:
        parametrization = SoftSpectralNorm(weight, coeff, n_power_iterations)
    parametrize.register_parametrization(module, name, parametrization)
    return module


def weight_norm(module: nn.Module, name: str = "weight", dim: int = 0) -> nn.Module:
    """Weight normalisation w = g · v / ||v|| (Salimans & Kingma 2016), as TorchDEQ's ``apply_norm`` offers.

    PyTorch's own parametrisation (:func:`torch.nn.utils.parametrizations.weight_norm`); like the
    spectral norm, layers compute it once per forward and pass it to every evaluation of f.

    Returns:
        The same module, parametrised in place.
    """
    return torch.nn.utils.parametrizations.weight_norm(module, name=name, dim=dim)


def soft_spectral_norm_of(module: nn.Module, name: str = "weight") -> SoftSpectralNorm | None:
    """The :class:`SoftSpectralNorm` parametrising ``module.<name>``, if any."""
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, SoftSpectralNorm):
            return p
    return None


@torch.no_grad()
def _current_weight(module: nn.Module, name: str = "weight") -> Tensor:
    """``module.<name>`` as its parametrisations compute it now, without advancing a power iteration."""
    chain = module.parametrizations[name]
    modes = [p.training for p in chain]
    try:
        for p in chain:
            p.training = False  # eval mode: spectral norm reuses u, v instead of updating them
        return getattr(module, name).detach()
    finally:
        for p, mode in zip(chain, modes, strict=True):
            p.training = mode


@torch.no_grad()
def _matrix_norm(matrix: Tensor) -> float:
    """‖matrix‖₂ by an SVD in float64 (on the CPU for a device without float64).

    A certified bound must not fall below the norm: an SVD in float32 misses it by up to ~3e-7
    relative, below it about half the time; float64 brings that to rounding of float64.
    """
    matrix = matrix.detach()
    if matrix.device.type == "mps":  # no float64 there
        matrix = matrix.cpu()
    return float(torch.linalg.matrix_norm(matrix.double(), ord=2))


@torch.no_grad()
def _operator_norm_estimate(normalisation: SoftSpectralNorm, weight: Tensor, iterations: int) -> float:
    """Power iteration on ``normalisation``'s operator for ``weight``, from its u, v (left unchanged)."""
    u, v = normalisation._power_steps(weight, iterations)
    return float((u * normalisation._operator(weight, v)).sum())


def lipschitz_bound(module: nn.Module | Callable, *, current: bool = False) -> float:
    """An upper bound on the Lipschitz constant (in the 2-norm) of ``module``.

    By default the bound is the normalisation's target, valid for every weight it allows: a spectrally
    normalised layer counts ``coeff``. That is exact only where the power-iteration estimate σ̂ equals
    the weight's norm σ; while weights move fast (early training) σ̂ lags behind σ and a normalised
    layer's norm can exceed ``coeff`` by several percent. ``current=True`` measures the map as an
    eval-mode forward computes it now instead: a normalised linear layer counts the exact norm of its
    current normalised weight (one SVD), a normalised convolution 100 power-iteration steps on its
    current operator (an estimate from below).

    Any other linear layer counts its current spectral norm, a convolution √(kernel size) times its
    kernel's matrix norm, activations their exact constants (:data:`ACTIVATION_LIPSCHITZ`), dropout
    1/(1-p) in training mode; a :class:`torch.nn.Sequential` multiplies its children's bounds. A
    module may also define its own ``lipschitz_bound()`` method. Anything else gives ``inf``.

    Args:
        module: The map to bound, e.g. ``ImplicitMLP.g``.
        current: Measure the current normalised weights instead of counting ``coeff``.

    Returns:
        The bound as a float (``math.inf`` when no bound is known).
    """
    own = getattr(module, "lipschitz_bound", None)
    if callable(own) and isinstance(module, nn.Module):
        return float(own())
    if isinstance(module, nn.Sequential):
        return math.prod(lipschitz_bound(child, current=current) for child in module)
    if isinstance(module, nn.Linear):
        normalised = soft_spectral_norm_of(module)
        if normalised is not None and current:
            return _matrix_norm(_current_weight(module))
        if normalised is not None:
            return normalised.coeff
        return _matrix_norm(module.weight)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        normalised = soft_spectral_norm_of(module)
        if normalised is not None and current:
            return _operator_norm_estimate(normalised, _current_weight(module), iterations=100)
        if normalised is not None:
            return normalised.coeff
        # Without an input size: each input element feeds at most prod(kernel) outputs, so the
        # operator norm is at most sqrt(prod(kernel)) times that of the kernel as a matrix.
        matrix = module.weight.reshape(module.weight.shape[0], -1)
        return math.sqrt(math.prod(module.kernel_size)) * _matrix_norm(matrix)
    if isinstance(module, nn.ELU):  # slope 1 above 0, α·eˣ below: |α| at most, whatever α's sign
        return max(1.0, abs(float(module.alpha)))
    if isinstance(module, nn.GELU) and module.approximate == "tanh":
        return _GELU_TANH_LIPSCHITZ
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(float(module.negative_slope)))
    if isinstance(module, nn.Dropout):
        return 1.0 / (1.0 - module.p) if module.training and module.p < 1 else 1.0
    for kind, constant in ACTIVATION_LIPSCHITZ.items():
        if type(module) is kind:
            return constant
    return math.inf
