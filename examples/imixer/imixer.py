"""iMixer: MLP-Mixer whose token mixer is an invertible, implicit and iterative MLP.

Paper: Ota & Taki, "iMixer: hierarchical Hopfield network implies an invertible, implicit and iterative
MLP-Mixer", arXiv 2304.13061.

The token mixer reads ``fc2 ∘ drop ∘ act ∘ (1 - F)^{-1} ∘ fc1`` along the token axis, where
F = Linear_sn ∘ GELU ∘ Linear_sn ∘ GELU is the residual branch of an invertible ResNet block, so
z = (1 - F)^{-1}(x) solves z = x + F(z). :class:`implicitlayers.ImplicitMLP` holds F and solves that
equation; everything else is timm's MLP-Mixer (this file follows ``timm/models/mlp_mixer.py`` and
reuses its ``MlpMixer`` class, layers and weight init).

Two ways of running the token mixer; both compute the paper's architecture (GELU in F, coeff 0.9),
so every ``imixer_*`` name has the paper's parameter counts and a converted reference checkpoint
loads into it with no flag:

* **Default (solved, exact gradients)**: every token mixer is solved with Anderson acceleration to
  a relative residual of ``tol`` and differentiated with the implicit function theorem: the adjoint
  equation is solved to the same tolerance, so the gradient is that of the true (1 - F)^{-1} up to
  it. The solver, tolerance and adjoint start were chosen by measurement among exact settings, for
  accuracy first and then cost (``benchmarks/imixer_training.py``; the table is on the docs'
  iMixer page).
* **Reference** (``reference_iterations=n``): exactly n Picard steps from z = fc1(x), differentiated
  by autograd through the loop, coeff 0.9 and 8 power iterations — the reference implementation's
  computation, so its checkpoints give its logits (:func:`convert_reference_state_dict`).

Levers beyond the paper are arguments, never the default: ``activation="lipswish"`` certifies F as a
contraction (structural: it adds β parameters), ``backward="shine"``/``"jfb"``/``"phantom"`` trade the
exact gradient for time, ``jacobian_penalty`` regularises.

After a forward pass :meth:`IMixer.solver_stats` reports per-block iterations, residuals and the
fraction of unconverged rows.

timm compatibility: every model here passes timm's model tests (forward, backward, default cfgs,
``features_only=True`` and ``forward_intermediates``, torch.fx forward and backward) except TorchScript
for the iMixers, which raises :data:`TORCHSCRIPT_UNSUPPORTED`; each solve is one torch.fx leaf call,
:func:`solve_token_mixer`. See the README's "timm compatibility" section.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from timm.layers import DropPath, Mlp, register_notrace_function, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._manipulate import named_apply
from timm.models.mlp_mixer import MlpMixer
from timm.models.mlp_mixer import _init_weights as _timm_mixer_init_weights
from torch import Tensor, nn
from torch.nn.utils import parametrize

import implicitlayers as il
from implicitlayers.errors import check_int_at_least
from implicitlayers.implicit import check_compatible
from implicitlayers.layers.invertible import make_activation
from implicitlayers.lipschitz import check_spectral_norm_settings

__all__ = [
    "TORCHSCRIPT_UNSUPPORTED",
    "IMixer",
    "IMixerBlock",
    "IMixerSettings",
    "IMlp",
    "convert_reference_state_dict",
    "solve_token_mixer",
]

LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)

# What the reference code hard-codes: it iterates z_{k+1} = x + F(z_k) a fixed number of times.
REFERENCE_COMPUTATION: dict[str, Any] = {
    "solver": "picard",
    "backward": "unrolled",
    "tol": 0.0,
    "coeff": 0.9,
    "n_power_iterations": 8,
    "z_init": "input",
    "activation": "gelu",
}


def _check_number(name: str, value: Any, accepted: str, ok: Callable[[float], bool]) -> None:
    """Raises ``ValueError`` naming ``name`` unless ``value`` is a finite real number that is ``ok``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or not ok(value):
        raise ValueError(f"{name} must be a finite number {accepted}, got {value!r}")


@dataclass(frozen=True)
class IMixerSettings:
    """The token mixers' implicit settings: one flat, validated, JSON-serialisable record.

    ``create_model`` accepts every field as a keyword, ``train.py`` derives its flags from them, and
    checkpoints store them (:meth:`to_dict`). :meth:`layer_options` turns them into the library's
    objects (:class:`~implicitlayers.Solver`, :class:`~implicitlayers.Budget`,
    :class:`~implicitlayers.Gradient`). The structural fields (:attr:`STRUCTURAL`) change the function
    the network computes; the others only how it is solved.

    Attributes:
        hidden_ratio: H / T, the width of F's hidden layer relative to T.
        coeff: Spectral-norm bound of F's linear layers.
        n_power_iterations: Power-iteration steps per training forward.
        activation: F's activation (``"gelu"``, the paper's; ``"lipswish"`` certifies a contraction).
        reference_iterations: n for the reference computation (exactly n Picard steps, differentiated
            through; 0 skips the implicit layer, giving the vanilla token MLP); None solves to ``tol``.
        solver: Forward solver name.
        max_iter: Iteration cap of each solve.
        tol: Relative residual tolerance of each solve.
        z_init: ``"input"`` (start from fc1(x), as the reference) or ``"zeros"``.
        backward: Gradient mode name (``"ift"``, ``"shine"``, ``"jfb"``, ``"phantom"``, ``"unrolled"``).
        phantom_steps: Steps of ``backward="phantom"``.
        shine_refine: Refinement steps of ``backward="shine"``.
        compact_rows: Evaluate F only on the rows still iterating once at most half are.
        backward_solver: Solver of the adjoint equation (None: ``solver``).
        backward_max_iter: Iteration cap of the adjoint solve (None: ``max_iter``).
        backward_tol: Tolerance of the adjoint solve (None: ``tol``).
        backward_start: Where the IFT's adjoint solve starts: ``"rhs"`` (the incoming gradient) or
            ``"estimate"`` (the forward solver's estimate of the adjoint; still solved to tolerance).
        eval_max_iter: Iteration cap in eval mode (None: ``max_iter``).
        eval_tol: Tolerance in eval mode (None: ``tol``).
        jacobian_penalty: Hutchinson samples of ‖J_F(z*)‖²_F / T per training forward (0: none).
        sync_every: Solver evaluations per host synchronisation.
    """

    hidden_ratio: float = 2.0
    coeff: float = 0.9
    n_power_iterations: int = 1
    activation: str = "gelu"
    reference_iterations: int | None = None
    solver: str = "anderson"
    max_iter: int = 30
    tol: float = 1e-2
    z_init: str = "input"
    backward: str = "ift"
    phantom_steps: int = 1
    shine_refine: int = 0
    compact_rows: bool = False
    backward_solver: str | None = None
    backward_max_iter: int | None = None
    backward_tol: float | None = None
    backward_start: str = "rhs"
    eval_max_iter: int | None = None
    eval_tol: float | None = None
    jacobian_penalty: int = 0
    sync_every: int = 1

    STRUCTURAL: ClassVar[tuple[str, ...]] = ("reference_iterations", "hidden_ratio", "coeff", "activation")

    def __post_init__(self) -> None:
        """Validates every field, used or not by the chosen gradient mode, naming it."""
        n = self.reference_iterations
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"reference_iterations must be an integer >= 0, got {n!r}")
        _check_number("hidden_ratio", self.hidden_ratio, "> 0", lambda v: v > 0)
        # (1 - F)^{-1} needs F near a contraction: each of its linear layers' norms is bounded below 1.
        _check_number("coeff", self.coeff, "> 0 and < 1", lambda v: 0 < v < 1)
        check_spectral_norm_settings(self.coeff, self.n_power_iterations)
        make_activation(self.activation)
        check_int_at_least("jacobian_penalty", self.jacobian_penalty, 0)
        # The fields of every gradient mode are checked, not only the chosen one's.
        il.IFT(self.backward_solver, self.backward_max_iter, self.backward_tol, self.backward_start)
        il.Shine(self.shine_refine, self.backward_solver, self.backward_tol)
        il.Phantom(steps=self.phantom_steps)
        options = self.layer_options()  # builds, hence validates, the solver, budgets and gradient mode
        check_compatible(il.as_solver(options["solver"]), options["backward"])

    @classmethod
    def build(cls, reference_iterations: int | None = None, **overrides: Any) -> IMixerSettings:
        """The defaults, then ``overrides`` (``None`` keeps a default), then the reference computation.

        Args:
            reference_iterations: If given, the reference implementation's fixed iteration count n; it
                sets solver, backward, tol, coeff, n_power_iterations, z_init and activation to the reference
                loop's (:data:`REFERENCE_COMPUTATION`) and max_iter to n; another value for any of them is an
                error.
            **overrides: Any field; ``None`` values keep the default.

        Raises:
            ValueError: For an unknown field, an invalid value, or an option that ``reference_iterations``
                fixes given another value, naming it.
        """
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(f"unknown implicit option(s) {unknown}; known: {sorted(known)}")
        values = {key: value for key, value in overrides.items() if value is not None}
        if reference_iterations is not None:
            if isinstance(reference_iterations, bool) or not isinstance(reference_iterations, int):
                raise ValueError(f"reference_iterations must be an integer >= 0, got {reference_iterations!r}")
            fixed = {**REFERENCE_COMPUTATION, "max_iter": max(reference_iterations, 1)}
            # An option the reference loop fixes, asked for with another value, would be silently dropped.
            conflicts = [f"{key}={values[key]!r}" for key in fixed if key in values and values[key] != fixed[key]]
            if conflicts:
                raise ValueError(
                    f"{', '.join(conflicts)} conflict with reference_iterations={reference_iterations}, whose "
                    f"loop fixes {', '.join(f'{k}={v!r}' for k, v in fixed.items())}; drop one or the other"
                )
            values.update(fixed)
        return cls(**values, reference_iterations=reference_iterations)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> IMixerSettings:
        """Settings recorded by :meth:`to_dict` (or by an earlier version, whose keys are the same)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in known})

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-serialisable."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> IMixerSettings:
        """A copy with ``changes``, validated."""
        return dataclasses.replace(self, **changes)

    def gradient(self) -> il.Gradient:
        """The gradient mode as the library's object."""
        if self.backward == "ift":
            return il.IFT(self.backward_solver, self.backward_max_iter, self.backward_tol, self.backward_start)
        if self.backward == "shine":
            return il.Shine(self.shine_refine, self.backward_solver, self.backward_tol)
        if self.backward == "phantom":
            return il.Phantom(steps=self.phantom_steps)
        return il.as_gradient(self.backward)

    def layer_options(self) -> dict[str, Any]:
        """The :class:`~implicitlayers.ImplicitMLP` keyword arguments these settings mean."""
        budget = il.Budget(self.max_iter, self.tol, sync_every=self.sync_every, compact_rows=self.compact_rows)
        eval_budget = None
        if self.eval_max_iter is not None or self.eval_tol is not None:
            eval_budget = budget.replace(
                max_iter=self.max_iter if self.eval_max_iter is None else self.eval_max_iter,
                tol=self.tol if self.eval_tol is None else self.eval_tol,
            )
        return {
            "coeff": self.coeff,
            "n_power_iterations": self.n_power_iterations,
            "activation": self.activation,
            "solver": self.solver,
            "budget": budget,
            "eval_budget": eval_budget,
            "backward": self.gradient(),
            "z_init": self.z_init,
            "jacobian_penalty": self.jacobian_penalty,
        }


TORCHSCRIPT_UNSUPPORTED = (
    "TorchScript cannot compile the iMixer: its token mixers solve z = x + F(z) with a Python solver loop "
    "and a torch.autograd.Function, over spectrally normalised weights (torch.nn.utils.parametrize), none of "
    "which TorchScript supports, in either the solved or the reference mode. Run the model eagerly, or "
    "trace it with torch.fx, where each solve is one leaf call "
    "(timm.models.create_feature_extractor, features_only=True); the vanilla mixer_t4_32 / mixer_t2_8 "
    "baselines do script. See examples/imixer/README.md, 'timm compatibility'."
)


@register_notrace_function
@torch.compiler.disable  # one graph break per solve; the parametrized modules are not traced block by block
def solve_token_mixer(implicit: il.ImplicitMLP, x: Tensor, own_precision: bool = True) -> Tensor:
    """Runs a token mixer's implicit layer on ``x``: one leaf call for torch.fx.

    The solve (a data-dependent solver loop inside a ``torch.autograd.Function``) cannot be traced
    symbolically, so this function is registered with timm's ``register_notrace_function`` and
    ``torch.fx.wrap``: timm's and torchvision's feature extractors, and ``torch.fx.symbolic_trace``,
    record it as one ``call_function`` node (with the layer as a ``get_attr`` argument) and trace the
    rest of the iMixer. The autocast switch lives here, not in :meth:`IMlp.forward`, for the same
    reason: in a traced graph it must run at call time, with the real input's device.

    Args:
        implicit: The token mixer's :class:`implicitlayers.ImplicitMLP`.
        x: Its input, ``(B, C, T)``.
        own_precision: Solve with autocast off, in the dtype of the layer's weights (solved mode).
            A bf16 evaluation of F is only good to ~4e-3 relative, about a tolerance's size, so
            under AMP a solve to a tolerance would never converge: it runs in float32 under AMP
            (float64 or bf16 for such a model). ``False`` (the reference loop) keeps the caller's
            autocast state and dtype, as the reference implementation ran it.

    Returns:
        z = (1 - F)^{-1}(x), shaped like x (in the layer's dtype when ``own_precision``).
    """
    if not own_precision:
        return implicit(x)
    with torch.autocast(x.device.type, enabled=False):
        return implicit(x.to(next(implicit.parameters()).dtype))


# register_notrace_function covers timm's tracers (and torchvision's when given timm's lists, as timm's
# tests do); torch.fx.wrap makes the function a leaf for every torch.fx tracer, plain symbolic_trace too.
torch.fx.wrap("solve_token_mixer")


class IMlp(nn.Module):
    """The iMixer token mixer: fc1 → (1 - F)^{-1} → act → drop → fc2 → drop.

    Args:
        in_features: Tokens N (the mixer acts along the token axis).
        hidden_features: T, the width of the implicit layer.
        act_layer: Activation after the implicit layer (GELU in the paper).
        drop: Dropout after the activation and after fc2.
        settings: The implicit settings (:class:`IMixerSettings`; default: its defaults).

    Shapes:
        x: ``(B, C, N)``; output: the same.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        settings: IMixerSettings | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        settings = settings or IMixerSettings()
        self.reference_iterations = settings.reference_iterations
        self.fc1 = nn.Linear(in_features, hidden_features, **dd)
        # coeff 0.9 with GELU is the paper's choice and is not a certified contraction (bound ≈ 1.03);
        # ImplicitMLP warns about that once per layer. The solver statistics (solver_stats) are the
        # honest measure of convergence here, so the per-layer construction warning is silenced.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", il.LipschitzWarning)
            self.implicit = il.ImplicitMLP(
                hidden_features,
                int(hidden_features * settings.hidden_ratio),
                pre_activation=True,
                **settings.layer_options(),
            ).to(**dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        if self.reference_iterations is None or self.reference_iterations > 0:
            # Solved mode runs in the layer's own precision; the reference loop runs in whatever
            # precision the reference ran it (autocast's, under AMP).
            x = solve_token_mixer(self.implicit, x, own_precision=self.reference_iterations is None)
        x = self.drop1(self.act(x))
        return self.drop2(self.fc2(x))


class IMixerBlock(nn.Module):
    """Residual block: x + DropPath(IMlp(LN(x)ᵀ)ᵀ), then x + DropPath(Mlp(LN(x))).

    The signature matches timm's ``MixerBlock`` so :class:`timm.models.mlp_mixer.MlpMixer` builds it;
    ``settings`` carries the token mixers' implicit settings (:class:`IMixerSettings`).

    Shapes:
        x: ``(B, N, C)``; output: the same.
    """

    def __init__(
        self,
        dim: int,
        seq_len: int,
        mlp_ratio: float | tuple[float, float] = (0.5, 4.0),
        mlp_layer: type[nn.Module] = Mlp,
        norm_layer: type[nn.Module] = LAYER_NORM,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        drop_path: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        settings: IMixerSettings | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        tokens_dim, channels_dim = (int(ratio * dim) for ratio in to_2tuple(mlp_ratio))
        self.norm1 = norm_layer(dim, **dd)
        self.mlp_tokens = IMlp(seq_len, tokens_dim, act_layer=act_layer, drop=drop, settings=settings, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp_channels = mlp_layer(dim, channels_dim, act_layer=act_layer, drop=drop, **dd)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


class IMixer(MlpMixer):
    """The iMixer classifier: timm's MLP-Mixer with :class:`IMixerBlock` blocks.

    Accepts every :class:`timm.models.mlp_mixer.MlpMixer` argument (num_classes, img_size, in_chans,
    patch_size, num_blocks, embed_dim, mlp_ratio, drop_rate, proj_drop_rate, drop_path_rate, ...) and
    inherits its timm interface (forward_features, forward_head, reset_classifier, get_classifier,
    group_matcher, set_grad_checkpointing, forward_intermediates).

    Args:
        reference_iterations: Run the reference computation with this many iterations (see the module
            docstring); None solves to ``tol``.
        **kwargs: Any field of :class:`IMixerSettings` (``solver``, ``tol``, ``backward``, ...; None
            keeps its default), and the :class:`MlpMixer` arguments.

    Attributes:
        settings: The :class:`IMixerSettings` the token mixers were built with.

    Shapes:
        x: ``(B, in_chans, img_size, img_size)``; output: ``(B, num_classes)``.
    """

    def __init__(self, *, reference_iterations: int | None = None, **kwargs: Any) -> None:
        fields = {f.name for f in dataclasses.fields(IMixerSettings)}
        overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in fields}
        self.settings = IMixerSettings.build(reference_iterations, **overrides)
        super().__init__(block_layer=partial(IMixerBlock, settings=self.settings), **kwargs)

    @property
    def implicit_settings(self) -> dict[str, Any]:
        """The settings as a plain dict (:meth:`IMixerSettings.to_dict`), as checkpoints store them."""
        return self.settings.to_dict()

    def __prepare_scriptable__(self) -> IMixer:
        """Refuses ``torch.jit.script`` with the reason and the alternatives (see :data:`TORCHSCRIPT_UNSUPPORTED`).

        ``torch.jit.script`` calls this hook before compiling anything, so the user sees this message
        instead of a TorchScript frontend error from deep inside the solver.

        Raises:
            RuntimeError: Always.
        """
        raise RuntimeError(f"{type(self).__name__}: {TORCHSCRIPT_UNSUPPORTED}")

    @torch.jit.ignore
    def init_weights(self, nlhb: bool = False) -> None:
        """timm's Mixer init (xavier-uniform, "mlp" biases N(0, 1e-6), zero head), spectral-norm aware.

        Args:
            nlhb: Negative-log head bias, as in timm.
        """
        head_bias = -math.log(self.num_classes) if nlhb else 0.0
        named_apply(partial(_init_weights, head_bias=head_bias), module=self)

    def implicit_layers(self) -> list[il.ImplicitMLP]:
        """The token mixers' implicit layers, one per block."""
        return [block.mlp_tokens.implicit for block in self.blocks]

    def jacobian_loss(self) -> Tensor | None:
        """The last training forward's Jacobian penalty, summed over blocks (``jacobian_penalty`` > 0).

        Each block's term is its token mixer's ‖J_F(z*)‖²_F / T, a Hutchinson estimate averaged over
        the rows (Bai et al., 2021); add ``weight * model.jacobian_loss()`` to the training loss to
        keep the maps contractive. ``None`` when nothing was computed (penalty off, eval mode, or no
        grad).
        """
        losses = [layer.jacobian_loss for layer in self.implicit_layers() if layer.jacobian_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def solver_stats(self) -> list[dict[str, float]]:
        """Per-block statistics of the last forward's solves (empty dicts before the first forward).

        Returns:
            One dict per block: ``nstep_mean``, ``nstep_max``, ``residual_max``, ``unconverged``
            (fraction of rows that missed ``tol``; always 0 in reference mode, which has no tolerance).
        """
        return [layer.stats.summary() if layer.stats is not None else {} for layer in self.implicit_layers()]


def _init_weights(module: nn.Module, name: str, head_bias: float = 0.0) -> None:
    """timm's Mixer init, applied to the free weight of spectrally normalised linear layers.

    ``nn.init.xavier_uniform_(module.weight)`` on a parametrised layer would overwrite a temporary
    (the normalised weight) and leave the parameter untouched; assigning ``module.weight`` instead
    stores the new weight as the parameter and re-estimates the power-iteration vectors for it.
    """
    if isinstance(module, nn.Linear) and parametrize.is_parametrized(module, "weight"):
        with torch.no_grad():
            weight = torch.empty_like(module.parametrizations.weight.original)
            nn.init.xavier_uniform_(weight)
            module.weight = weight
            if module.bias is not None:
                nn.init.normal_(module.bias, std=1e-6)
        return
    if name.endswith(("parametrizations.weight.0", "parametrizations")):
        return
    _timm_mixer_init_weights(module, name, head_bias=head_bias)


def convert_reference_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Maps a checkpoint of the reference iMixer implementation to :class:`IMixer` keys.

    ``mlp_tokens.fc_sn1`` / ``fc_sn2`` become ``mlp_tokens.implicit.g.1`` / ``g.3`` (F's two
    spectrally normalised layers): ``weight_orig`` → ``parametrizations.weight.original``,
    ``weight_u`` (left singular vector, out dim) → ``parametrizations.weight.0.u``, ``weight_v``
    (right, in dim) → ``...0.v``; ``weight_sigma`` only logs σ̂ and is dropped. A checkpoint wrapped
    as ``{"model": ...}`` or ``{"state_dict": ...}`` and DataParallel ``module.`` prefixes are accepted.

    Args:
        state_dict: The reference state dict.

    Returns:
        A new state dict for :class:`IMixer` (load with ``strict=True``).
    """
    for wrapper in ("model", "state_dict"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    renames = {".fc_sn1.": ".implicit.g.1.", ".fc_sn2.": ".implicit.g.3."}
    suffixes = {
        "weight_orig": "parametrizations.weight.original",
        "weight_u": "parametrizations.weight.0.u",
        "weight_v": "parametrizations.weight.0.v",
    }
    converted = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.endswith(".weight_sigma"):
            continue
        for old, new in renames.items():
            if old in key:
                key = key.replace(old, new)
                stem, _, leaf = key.rpartition(".")
                key = f"{stem}.{suffixes.get(leaf, leaf)}"
        converted[key] = value
    return converted


def _create(cls: type[MlpMixer], variant: str, pretrained: bool, **kwargs: Any) -> MlpMixer:
    """``variant`` built with the shape its name gives (:data:`_SHAPES`; ``kwargs`` override it).

    ``features_only=True`` gets timm's Mixer feature config: a ``FeatureGetterNet`` over
    :meth:`MlpMixer.forward_intermediates` (``feature_info``: ``blocks.i``), by default the last three blocks, as
    timm's ``mlp_mixer._create_mixer``. timm's default, a ``FeatureListNet`` over the top-level modules at
    out_indices 0 to 4, fails for a Mixer: its blocks are not top-level modules, and a depth-4 model has no index 4.
    """
    kwargs = {**_SHAPES[variant.split("_", 1)[1]], **kwargs}
    feature_cfg = {"out_indices": kwargs.pop("out_indices", 3), "feature_cls": "getter"}
    return build_model_with_cfg(cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "stem.proj",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2304.13061",
        **kwargs,
    }


_CIFAR_CFG = {"num_classes": 10, "input_size": (3, 32, 32), "crop_pct": 1.0}
_DIGITS_CFG = {"num_classes": 10, "input_size": (1, 8, 8), "crop_pct": 1.0, "mean": (0.5,), "std": (0.5,)}

default_cfgs = generate_default_cfgs(
    {
        "imixer_s32_224.untrained": _cfg(),
        "imixer_s16_224.untrained": _cfg(),
        "imixer_b32_224.untrained": _cfg(),
        "imixer_b16_224.untrained": _cfg(),
        "imixer_l32_224.untrained": _cfg(),
        "imixer_l16_224.untrained": _cfg(),
        "imixer_t4_32.untrained": _cfg(**_CIFAR_CFG),
        "imixer_t2_8.untrained": _cfg(**_DIGITS_CFG),
        "mixer_t4_32.untrained": _cfg(**_CIFAR_CFG),
        "mixer_t2_8.untrained": _cfg(**_DIGITS_CFG),
    }
)

# The shapes, by the name after "imixer_" or "mixer_": S, B and L as timm's Mixers; T, small shapes for small
# images and CPUs, which the iMixer and the vanilla baseline share.
_SHAPES: dict[str, dict[str, Any]] = {
    "s32_224": {"patch_size": 32, "num_blocks": 8, "embed_dim": 512},
    "s16_224": {"patch_size": 16, "num_blocks": 8, "embed_dim": 512},
    "b32_224": {"patch_size": 32, "num_blocks": 12, "embed_dim": 768},
    "b16_224": {"patch_size": 16, "num_blocks": 12, "embed_dim": 768},
    "l32_224": {"patch_size": 32, "num_blocks": 24, "embed_dim": 1024},
    "l16_224": {"patch_size": 16, "num_blocks": 24, "embed_dim": 1024},
    "t4_32": {"img_size": 32, "patch_size": 4, "num_blocks": 6, "embed_dim": 128, "num_classes": 10},
    "t2_8": {"img_size": 8, "in_chans": 1, "patch_size": 2, "num_blocks": 4, "embed_dim": 32, "num_classes": 10},
}


@register_model
def imixer_s32_224(pretrained: bool = False, **kwargs: Any) -> IMixer:
    """iMixer-S/32 224x224 (dim 512, depth 8)."""
    return _create(IMixer, "imixer_s32_224", pretrained, **kwargs)


@register_model
def imixer_s16_224(pretrained: bool = False, **kwargs: Any) -> IMixer:
    """iMixer-S/16 224x224 (dim 512, depth 8)."""
    return _create(IMixer, "imixer_s16_224", pretrained, **kwargs)


@register_model
def imixer_b32_224(pretrained: bool = False, **kwargs: Any) -> IMixer:
    """iMixer-B/32 224x224 (dim 768, depth 12)."""
    return _create(IMixer, "imixer_b32_224", pretrained, **kwargs)


@register_model
def imixer_b16_224(pretrained: bool = False, **kwargs: Any) -> IMixer:
    """iMixer-B/16 224x224 (dim 768, depth 12)."""
    return _create(IMixer, "imixer_b16_224", pretrained, **kwargs)


@register_model
def imixer_l32_224(pretrained: bool = False, **kwargs: Any) -> IMixer:
    """iMixer-L/32 224x224 (dim 1024, depth 24)."""
    return _create(IMixer, "imixer_l32_224", pretrained, **kwargs)


@register_model
def imixer_l16_224(pretrained: bool = False, **kwargs: Any) -> IMixer:
    """iMixer-L/16 224x224 (dim 1024, depth 24)."""
    return _create(IMixer, "imixer_l16_224", pretrained, **kwargs)


@register_model
def imixer_t4_32(pretrained: bool = False, **kwargs: Any) -> IMixer:
    """iMixer-T/4 for 32x32 images such as CIFAR (dim 128, depth 6, 64 tokens)."""
    return _create(IMixer, "imixer_t4_32", pretrained, **kwargs)


@register_model
def imixer_t2_8(pretrained: bool = False, **kwargs: Any) -> IMixer:
    """iMixer-T/2 for 8x8 grayscale images such as sklearn digits (dim 32, depth 4, 16 tokens)."""
    return _create(IMixer, "imixer_t2_8", pretrained, **kwargs)


@register_model
def mixer_t4_32(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    """Vanilla MLP-Mixer of imixer_t4_32's shape (the baseline)."""
    return _create(MlpMixer, "mixer_t4_32", pretrained, **kwargs)


@register_model
def mixer_t2_8(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    """Vanilla MLP-Mixer of imixer_t2_8's shape (the baseline)."""
    return _create(MlpMixer, "mixer_t2_8", pretrained, **kwargs)
