"""examples/imixer/imixer.py: registration, parameter counts, reference parity, solver statistics."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor

import implicitlayers as il

model = pytest.importorskip("examples.imixer.imixer")  # registers imixer_* and mixer_t* in timm

IMIXER_NAMES = [f"imixer_{size}{patch}_224" for size in "sbl" for patch in (32, 16)] + ["imixer_t4_32", "imixer_t2_8"]
MIXER_NAMES = ["mixer_t4_32", "mixer_t2_8"]
TINY = {"embed_dim": 16, "num_blocks": 2}


def test_every_model_is_registered_in_timm() -> None:
    registered = set(timm.list_models("*mixer*"))
    assert set(IMIXER_NAMES + MIXER_NAMES) <= registered
    for name in IMIXER_NAMES + MIXER_NAMES:
        assert timm.models.get_pretrained_cfg(name).architecture == name


@pytest.fixture
def meta_safe_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    # On the meta device nothing is allocated; the normalisation's construction-time SVD and its
    # autocast guard cannot run there (they read values / need a real device type), and counting
    # parameters needs neither.
    monkeypatch.setattr(il.SoftSpectralNorm, "refine_", lambda self, weight: None)
    monkeypatch.setattr(il.SoftSpectralNorm, "forward", lambda self, weight: weight)


def _count(name: str, **kwargs) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name, num_classes=10, **kwargs).parameters())


@pytest.mark.parametrize(
    ("name", "expected"),
    [("imixer_s16_224", 20_123_690), ("imixer_b16_224", 66_210_874), ("imixer_l16_224", 232_384_106)],
)
def test_the_default_has_the_papers_parameter_counts(name: str, expected: int, meta_safe_norm: None) -> None:
    assert _count(name) == expected == _count(name, reference_iterations=2)


@pytest.mark.parametrize("name", IMIXER_NAMES)
def test_every_imixer_name_builds_the_papers_architecture(name: str, meta_safe_norm: None) -> None:
    # The default is the reference's architecture (the same parameters, GELU in F), whatever the
    # name's size; a lever beyond the paper is an argument, here LipSwish's learnable β, two per block.
    with torch.device("meta"):
        net = timm.create_model(name, num_classes=10)
    assert net.settings.activation == "gelu"
    assert all(isinstance(layer.g[0], torch.nn.GELU) for layer in net.implicit_layers())
    assert _count(name) == _count(name, reference_iterations=2)
    assert _count(name, activation="lipswish") == _count(name) + 2 * len(net.blocks)


def test_vanilla_baselines_share_the_imixer_shapes() -> None:
    imixer = timm.create_model("imixer_t2_8")
    mixer = timm.create_model("mixer_t2_8")
    assert type(mixer).__name__ == "MlpMixer"
    # The iMixer adds exactly F's two spectrally normalised layers (T→H→T with biases) per block.
    tokens_dim = imixer.embed_dim // 2
    hidden = 2 * tokens_dim
    extra = len(imixer.blocks) * (2 * tokens_dim * hidden + hidden + tokens_dim)
    assert sum(p.numel() for p in imixer.parameters()) - sum(p.numel() for p in mixer.parameters()) == extra


def test_create_model_accepts_timm_and_implicit_overrides() -> None:
    # Seeded: 12 Picard steps reach tol 1e-5 for most inputs, and whether the global RNG's inputs are
    # among them depended on which tests ran before (an unconverged row warns, and warnings are errors).
    torch.manual_seed(0)
    net = timm.create_model(
        "imixer_t2_8", num_classes=3, img_size=16, in_chans=3, patch_size=4, drop_path_rate=0.1, hidden_ratio=1.0,
        coeff=0.8, n_power_iterations=2, solver="picard", backward="phantom", max_iter=12, tol=1e-5,
        z_init="zeros", phantom_steps=3, **TINY,
    )  # fmt: skip
    layer = net.implicit_layers()[0]
    assert (layer.solver, layer.backward, layer.max_iter, layer.tol) == (il.Picard(), il.Phantom(steps=3), 12, 1e-5)
    assert layer.z_init == "zeros" and layer.hidden_features == layer.features == 8
    assert il.lipschitz_bound(layer.g) == pytest.approx(0.64 * 1.12891**2)  # coeff² · Lip(GELU)²
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    assert len(net.blocks) == 2 and net.stem.num_patches == 16


def test_timm_model_interface() -> None:
    net = timm.create_model("imixer_t2_8", **TINY).eval()
    x = torch.randn(2, 1, 8, 8)
    features = net.forward_features(x)
    assert features.shape == (2, 16, 16)
    assert torch.equal(net.forward_head(features), net(x))
    assert net.forward_head(features, pre_logits=True).shape == (2, 16)
    net.reset_classifier(5)
    assert net.get_classifier().out_features == 5 and net(x).shape == (2, 5)
    assert "blocks" in net.group_matcher()
    net.set_grad_checkpointing(True)
    assert net.grad_checkpointing
    assert net.default_cfg["input_size"] == (1, 8, 8) and net.pretrained_cfg["classifier"] == "head"


def test_init_sets_the_free_weight_and_exact_singular_vectors() -> None:
    net = timm.create_model("imixer_t2_8", **TINY)
    linear = net.blocks[0].mlp_tokens.implicit.g[1]
    weight = linear.parametrizations.weight.original
    bound = math.sqrt(6 / sum(weight.shape))  # xavier-uniform
    assert weight.abs().max() <= bound and weight.std() > bound / 3
    normaliser = linear.parametrizations.weight[0]
    weight = weight.detach()
    assert float(normaliser.sigma(weight)) == pytest.approx(float(torch.linalg.matrix_norm(weight, 2)), rel=1e-4)
    assert linear.bias.abs().max() < 1e-4  # "mlp" biases N(0, 1e-6), as timm's Mixer
    assert torch.count_nonzero(net.head.weight) == 0


def test_default_mode_solves_to_tolerance_and_reports_statistics() -> None:
    torch.manual_seed(0)
    net = timm.create_model("imixer_t2_8", **TINY)
    assert net.solver_stats() == [{}, {}]
    loss = net(torch.randn(4, 1, 8, 8)).logsumexp(dim=1).sum()
    loss.backward()
    stats = net.solver_stats()
    assert len(stats) == 2
    for block in stats:
        assert block["unconverged"] == 0.0 and block["residual_max"] <= 1e-2
        assert 1 <= block["nstep_mean"] <= block["nstep_max"] <= 30
    layer = net.implicit_layers()[0]
    # The paper's map, solved, with the exact (IFT) gradient.
    assert (layer.solver, layer.backward) == (il.Anderson(), il.IFT(start=layer.backward.start))
    assert isinstance(layer.g[0], torch.nn.GELU)
    assert all(bool(layer.backward_stats.converged.all()) for layer in net.implicit_layers())


def test_the_default_gradient_is_the_derivative_of_the_model() -> None:
    # End to end, in float64 with the default solver, gradient mode and adjoint start, solved
    # tightly: the gradient of the loss in every parameter, along a random direction, is the central
    # difference of the loss (the solve defines a smooth function of the weights; its error is the
    # tolerance's, far below the difference quotient's 1e-8).
    torch.manual_seed(0)
    net = timm.create_model("imixer_t2_8", **TINY, tol=1e-12, max_iter=200).double().eval()
    with torch.no_grad():  # timm's init zeroes the head, and with it every gradient but the head's
        net.head.weight.normal_(std=0.5)
    images = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    labels = torch.tensor([1, 4, 7])
    params = dict(net.named_parameters())
    direction = {name: torch.randn_like(p) for name, p in params.items()}

    def loss(shift: float) -> Tensor:
        shifted = {name: p.detach() + shift * direction[name] for name, p in params.items()}
        return F.cross_entropy(torch.func.functional_call(net, shifted, (images,)), labels)

    F.cross_entropy(net(images), labels).backward()
    analytic = sum(float((p.grad * direction[name]).sum()) for name, p in params.items())
    step = 1e-5
    numeric = float((loss(step) - loss(-step)) / (2 * step))
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    assert abs(analytic) > 1e-3  # a meaningful comparison


def test_the_default_solves_the_adjoint_to_the_forward_tolerance() -> None:
    torch.manual_seed(0)
    net = timm.create_model("imixer_t2_8", tol=1e-3, **TINY)
    net(torch.randn(4, 1, 8, 8)).logsumexp(dim=1).sum().backward()
    assert all(block["residual_max"] <= 1e-3 for block in net.solver_stats())
    for layer in net.implicit_layers():
        assert layer.tol == 1e-3 and layer.backward.tol is None  # the adjoint's tolerance is the forward's
        assert layer.backward_stats is not None and bool(layer.backward_stats.converged.all())
        assert float(layer.backward_stats.residual.max()) <= 1e-3


def test_reference_mode_runs_exactly_n_picard_steps() -> None:
    net = timm.create_model("imixer_t2_8", reference_iterations=3, solver="picard", **TINY)  # its own solver: fine
    layer = net.implicit_layers()[0]
    assert (layer.solver, layer.backward, layer.tol, layer.max_iter) == (il.Picard(), il.Unrolled(), 0.0, 3)
    assert layer.g[1].parametrizations.weight[0].n_power_iterations == 8
    net(torch.randn(2, 1, 8, 8))
    assert all(block["nstep_max"] == block["nstep_mean"] == 3 for block in net.solver_stats())


def test_bad_implicit_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="solver"):
        timm.create_model("imixer_t2_8", solver="newton", **TINY)
    with pytest.raises(ValueError, match="reference_iterations"):
        timm.create_model("imixer_t2_8", reference_iterations=-1, **TINY)


# ---------------------------------------------------------------------------------------------------
# Reference parity: a minimal, independent re-statement of the reference implementation's forward pass.


def reference_state_dict(depth: int, dim: int, tokens: int, patch: int, classes: int, seed: int) -> dict:
    """Random weights under the reference implementation's key names (fc_sn*.weight_orig/_u/_v/_sigma)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.3) -> Tensor:
        return torch.randn(*shape, generator=gen) * scale

    tokens_dim, hidden = dim // 2, dim  # mlp_ratio 0.5, hidden_ratio 2
    sd = {"stem.proj.weight": rand(dim, 1, patch, patch), "stem.proj.bias": rand(dim)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd |= {p + "norm1.weight": 1 + rand(dim, scale=0.1), p + "norm1.bias": rand(dim, scale=0.1)}
        sd |= {p + "mlp_tokens.fc1.weight": rand(tokens_dim, tokens), p + "mlp_tokens.fc1.bias": rand(tokens_dim)}
        for name, (out_f, in_f) in {"fc_sn1": (hidden, tokens_dim), "fc_sn2": (tokens_dim, hidden)}.items():
            q = p + f"mlp_tokens.{name}."
            # Stored u, v are not exact singular vectors (as after a few power steps): eval must use them as stored.
            sd |= {q + "weight_orig": rand(out_f, in_f), q + "bias": rand(out_f, scale=0.1)}
            sd |= {q + "weight_u": F.normalize(rand(out_f), dim=0), q + "weight_v": F.normalize(rand(in_f), dim=0)}
            sd[q + "weight_sigma"] = torch.ones(1)
        sd |= {p + "mlp_tokens.fc2.weight": rand(tokens, tokens_dim), p + "mlp_tokens.fc2.bias": rand(tokens)}
        sd |= {p + "norm2.weight": 1 + rand(dim, scale=0.1), p + "norm2.bias": rand(dim, scale=0.1)}
        sd |= {p + "mlp_channels.fc1.weight": rand(4 * dim, dim), p + "mlp_channels.fc1.bias": rand(4 * dim)}
        sd |= {p + "mlp_channels.fc2.weight": rand(dim, 4 * dim), p + "mlp_channels.fc2.bias": rand(dim)}
    sd |= {"norm.weight": 1 + rand(dim, scale=0.1), "norm.bias": rand(dim, scale=0.1)}
    sd |= {"head.weight": rand(classes, dim), "head.bias": rand(classes)}
    return sd


def reference_forward(sd: dict, images: Tensor, depth: int, patch: int, n_iter: int, coeff: float = 0.9) -> Tensor:
    """The reference iMixer in eval mode: W = W_orig / max(1, uᵀW_orig v / coeff); z ← x + F(z), n times."""

    def linear(x: Tensor, prefix: str) -> Tensor:
        return F.linear(x, sd[prefix + "weight"], sd[prefix + "bias"])

    def sn_linear(x: Tensor, prefix: str) -> Tensor:
        w = sd[prefix + "weight_orig"]
        sigma = sd[prefix + "weight_u"] @ w @ sd[prefix + "weight_v"]
        return F.linear(x, w / torch.clamp(sigma / coeff, min=1.0), sd[prefix + "bias"])

    def layer_norm(x: Tensor, prefix: str) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], sd[prefix + "weight"], sd[prefix + "bias"], eps=1e-6)

    x = F.conv2d(images, sd["stem.proj.weight"], sd["stem.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    for i in range(depth):
        p = f"blocks.{i}."
        u = layer_norm(x, p + "norm1.").transpose(1, 2)
        x_in = linear(u, p + "mlp_tokens.fc1.")
        z = x_in
        for _ in range(n_iter):
            z = x_in + sn_linear(F.gelu(sn_linear(F.gelu(z), p + "mlp_tokens.fc_sn1.")), p + "mlp_tokens.fc_sn2.")
        x = x + linear(F.gelu(z), p + "mlp_tokens.fc2.").transpose(1, 2)
        h = linear(F.gelu(linear(layer_norm(x, p + "norm2."), p + "mlp_channels.fc1.")), p + "mlp_channels.fc2.")
        x = x + h
    return linear(layer_norm(x, "norm.").mean(dim=1), "head.")


@pytest.mark.parametrize("n_iter", [0, 1, 2, 4])
def test_reference_checkpoint_converts_and_matches_reference_logits(n_iter: int) -> None:
    depth, dim, patch = 2, 16, 2
    sd = reference_state_dict(depth, dim, tokens=16, patch=patch, classes=10, seed=n_iter)
    net = timm.create_model("imixer_t2_8", embed_dim=dim, num_blocks=depth, reference_iterations=n_iter).eval()
    converted = model.convert_reference_state_dict({"state_dict": {f"module.{k}": v for k, v in sd.items()}})
    assert not any("weight_sigma" in key for key in converted)
    net.load_state_dict(converted, strict=True)
    images = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_forward(sd, images, depth, patch, n_iter)
        logits = net(images)
    assert expected.abs().max() > 0.1  # a meaningful comparison, not two zero heads
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    # The stored vectors were loaded as they were (eval never re-estimates them).
    layer = net.blocks[0].mlp_tokens.implicit.g[1]
    assert torch.equal(layer.parametrizations.weight[0].u, sd["blocks.0.mlp_tokens.fc_sn1.weight_u"])


def test_solved_mode_approaches_the_converged_reference() -> None:
    """The solved model (with the paper's GELU) and many reference iterations compute the same (1 - F)^{-1}."""
    sd = model.convert_reference_state_dict(reference_state_dict(2, 16, 16, 2, 10, seed=7))
    # float64, and a loop long enough to converge: 60 Picard steps leave some rows at residuals up
    # to 1e-2 for some images, so the comparison used to depend on the random images drawn.
    solved = timm.create_model(
        "imixer_t2_8", embed_dim=16, num_blocks=2, tol=1e-10, max_iter=200, activation="gelu"
    ).eval()
    looped = timm.create_model("imixer_t2_8", embed_dim=16, num_blocks=2, reference_iterations=1000).eval()
    solved.load_state_dict(sd)
    looped.load_state_dict(sd)
    solved, looped = solved.double(), looped.double()
    images = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(solved(images), looped(images), atol=1e-8, rtol=1e-8)
    assert max(float(layer.stats.residual.max()) for layer in looped.implicit_layers()) < 1e-12


def test_convert_script_writes_loadable_safetensors(tmp_path, capsys) -> None:
    import safetensors.torch

    convert = pytest.importorskip("examples.imixer.convert")
    sd = reference_state_dict(2, 16, 16, 2, 10, seed=3)
    torch.save({"model": sd}, tmp_path / "reference.pth")
    target = tmp_path / "converted.safetensors"
    args = [str(tmp_path / "reference.pth"), str(target), "--model", "imixer_t2_8", "--reference-iterations", "2"]
    # imixer_t2_8's default shape is not this checkpoint's (embed 16, depth 2): the check must refuse it.
    assert convert.main(args) == 2
    assert "does not fit" in capsys.readouterr().err
    net = timm.create_model("imixer_t2_8", embed_dim=16, num_blocks=2, reference_iterations=2).eval()
    args += ["--model-kwargs", "embed_dim=16", "num_blocks=2"]
    assert convert.main(args) == 0
    assert len(safetensors.torch.load_file(str(target))) == len(net.state_dict())
    net.load_state_dict(safetensors.torch.load_file(str(target)))
    images = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(images), reference_forward(sd, images, 2, 2, 2), atol=1e-5, rtol=1e-5)
    (tmp_path / "bad.pth").write_bytes(b"junk")
    assert convert.main([str(tmp_path / "bad.pth"), str(target)]) == 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_solved_imixer_runs_in_the_models_dtype(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    net = timm.create_model("imixer_t2_8", num_classes=10, tol=1e-2, **TINY).to(dtype).eval()
    images = torch.randn(2, 1, 8, 8, dtype=dtype)  # imixer_t2_8: 8 px grayscale digits
    logits = net(images)
    assert logits.dtype == dtype and bool(torch.isfinite(logits).all())
    stats = net.blocks[0].mlp_tokens.implicit.stats
    assert stats.z.dtype == torch.promote_types(dtype, torch.float32)  # the solver iterates in float32 at least
    if dtype == torch.float64:  # the same network in float32 gives the same logits, to float32 accuracy
        reference = net.float()(images.float())
        torch.testing.assert_close(logits.float(), reference, rtol=1e-3, atol=1e-3)


def test_levers_beyond_the_paper_reach_the_token_mixers_and_leave_the_reference_alone():
    net = timm.create_model("imixer_t2_8", activation="lipswish", backward="shine", shine_refine=2, compact_rows=True)
    for layer in net.implicit_layers():
        assert isinstance(layer.g[0], il.LipSwish) and layer.backward == il.Shine(refine=2)
        assert layer.budget.compact_rows
        assert il.lipschitz_bound(layer.g) == pytest.approx(0.81 * (1.09984 / 1.1) ** 2)  # certified < 1
    assert net.implicit_settings["activation"] == "lipswish"
    net(torch.randn(2, 1, 8, 8)).sum().backward()
    assert all(s["unconverged"] == 0.0 for s in net.solver_stats())
    # The reference computation is the paper's: a lever it fixes, asked for too, is an error (not dropped).
    reference = timm.create_model("imixer_t2_8", reference_iterations=2)
    assert reference.implicit_settings["activation"] == "gelu"
    assert all(isinstance(layer.g[0], torch.nn.GELU) for layer in reference.implicit_layers())
    for option in ({"activation": "lipswish"}, {"solver": "broyden"}, {"tol": 1e-2}, {"max_iter": 30}):
        with pytest.raises(ValueError, match=f"{next(iter(option))}=.* conflict with reference_iterations=2"):
            timm.create_model("imixer_t2_8", reference_iterations=2, **option)
    with pytest.raises(ValueError, match="activation must be one of"):
        timm.create_model("imixer_t2_8", activation="softmax")


def test_a_converted_reference_checkpoint_loads_strictly_into_the_default_model() -> None:
    sd = model.convert_reference_state_dict(reference_state_dict(2, 16, tokens=16, patch=2, classes=10, seed=3))
    net = timm.create_model("imixer_t2_8", embed_dim=16, num_blocks=2)  # no flag: the default
    net.load_state_dict(sd, strict=True)


def test_budgets_penalty_and_synchronisation_reach_the_token_mixers():
    torch.manual_seed(0)
    kwargs = {
        "backward": "ift",
        "backward_solver": "broyden",
        "backward_max_iter": 40,
        "backward_tol": 1e-5,
        "eval_max_iter": 50,
        "eval_tol": 1e-6,
        "jacobian_penalty": 2,
        "sync_every": 3,
    }
    net = timm.create_model("imixer_t2_8", **TINY, **kwargs).double()
    for layer in net.implicit_layers():
        assert layer.backward == il.IFT(solver=il.Broyden(), max_iter=40, tol=1e-5)
        assert (layer.eval_budget.max_iter, layer.eval_budget.tol, layer.jacobian_penalty) == (50, 1e-6, 2)
        assert layer.budget.sync_every == 3 and layer.eval_budget.sync_every == 3
    assert {key: net.implicit_settings[key] for key in kwargs} == kwargs
    images = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    assert net.jacobian_loss() is None  # nothing computed yet
    logits = net(images)
    penalty = net.jacobian_loss()
    assert penalty is not None and penalty.ndim == 0 and float(penalty.detach()) > 0
    (logits.sum() + penalty).backward()
    assert all(bool(layer.backward_stats.converged.all()) for layer in net.implicit_layers())
    net.eval()
    with torch.no_grad():
        chunked = net(images)
    assert net.jacobian_loss() is None  # the penalty is a training term
    assert all(block["residual_max"] <= 1e-6 for block in net.solver_stats())  # the eval budget
    # Synchronising every third evaluation changes no row's solve.
    stepwise = timm.create_model("imixer_t2_8", **TINY, **{**kwargs, "sync_every": 1}).double().eval()
    stepwise.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(stepwise(images), chunked, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torch_compile_breaks_only_at_the_solves_and_compiles_no_more_for_a_deeper_model(mode):
    # Each token mixer's solve is one torch.compiler.disable'd call (solve_token_mixer); what lies between
    # two solves is the same code for every block, so a deeper model reuses its graphs instead of
    # recompiling per block (which, with parametrized weights of a class per module, hit Dynamo's
    # recompile limit of 8 and left the deeper blocks eager).
    counts = []
    for blocks in (2, 10):
        torch.manual_seed(0)
        net = getattr(timm.create_model("imixer_t2_8", num_blocks=blocks), mode)()
        x = torch.randn(4, 1, 8, 8)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(net)(x)
        assert explanation.graph_break_count >= 1
        assert all("solve_token_mixer" in str(r.reason) for r in explanation.break_reasons)
        counts.append(explanation.graph_count)
        torch._dynamo.reset()
        compiled = torch.compile(net, backend="aot_eager")
        out = compiled(x)
        torch.testing.assert_close(out, net(x), rtol=1e-5, atol=1e-6)
        # The backward through the compiled graphs and the eager solves gives the eager gradient.
        (grad,) = torch.autograd.grad(out.square().sum(), net.stem.proj.weight)
        (expected,) = torch.autograd.grad(net(x).square().sum(), net.stem.proj.weight)
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    assert counts[0] == counts[1], counts
