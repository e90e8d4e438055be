"""timm's model tests for the models of examples/imixer, as timm users expect them to pass.

These reproduce what ``tests/test_models.py`` of timm 1.0.x checks (``test_model_forward``,
``test_model_backward``, ``test_model_default_cfgs_non_std``, ``test_model_forward_features``,
``test_model_forward_intermediates(_features)``, ``test_model_forward_fx``, ``test_model_backward_fx``,
``test_model_forward_fx_torchscript``, ``test_model_forward_torchscript``), parametrised over every model
the example registers (``timm.list_models(module="imixer")``), and tighten them where timm only checks
shapes: FX and TorchScript outputs and gradients are compared with the eager model's, in float64.

What runs for which model (2 shared CPU cores; the whole file takes well under a minute):

* ``imixer_t2_8``, ``imixer_t4_32``, ``mixer_t2_8``, ``mixer_t4_32``: every test above, at the registered
  input size, as timm runs them.
* ``imixer_{s,b,l}{32,16}_224`` (20M to 233M parameters; building one takes 1 to 300 s on a loaded 2-core
  CPU, mostly the spectral norms' SVDs and the init): timm would run them at 224. Here (a) the full model
  is built on the meta device, which allocates and computes nothing, for the cheap properties: default
  cfg, first conv and classifier names, ``feature_info`` (one entry per block) and ``features_only``;
  (b) a model with the same width, patch size, token mixer and implicit settings but one block and a
  2x2-patch input runs for real: forward, forward_intermediates and the FX forward against eager. The
  full-size run of timm's own test file is recorded in examples/imixer/README.md ("timm compatibility").
* TorchScript: the vanilla ``mixer_t*`` script (also after FX) and match eager; the iMixers are excluded,
  as timm's ``EXCLUDE_JIT_FILTERS`` excludes models, for the reason in
  :data:`examples.imixer.imixer.TORCHSCRIPT_UNSUPPORTED`, and the tests assert the clear error instead.
* The ```python blocks of examples/imixer/README.md are executed from the repository root.
"""

from __future__ import annotations

import copy
import fnmatch
import re
from pathlib import Path

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules

import implicitlayers as il

imixer = pytest.importorskip("examples.imixer.imixer")  # registers the models in timm (module "imixer")
feature_extraction = pytest.importorskip("torchvision.models.feature_extraction")

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS = timm.list_models(module="imixer")
LARGE = [name for name in MODELS if name.endswith("_224")]
SMALL = [name for name in MODELS if name not in LARGE]
SIZES = {"s": (512, 8), "b": (768, 12), "l": (1024, 24)}  # embed_dim, depth of the *_224 models
# As timm's test file: models that TorchScript cannot compile, with the reason in TORCHSCRIPT_UNSUPPORTED.
EXCLUDE_JIT_FILTERS = ["imixer_*"]
# torch.jit.script warns that it is deprecated (torch 2.14); timm still tests it, and so do these tests.
JIT_DEPRECATION = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


def is_scriptable(name: str) -> bool:
    return not any(fnmatch.fnmatch(name, pattern) for pattern in EXCLUDE_JIT_FILTERS)


def input_size(name: str) -> tuple[int, ...]:
    return timm.models.get_pretrained_cfg(name).input_size


def create(name: str, **kwargs) -> torch.nn.Module:
    """A float64 model: comparisons of eager, FX and TorchScript outputs get float64 margins."""
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).double()


def images(name: str, batch_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch_size, *input_size(name), generator=gen, dtype=torch.float64)


def create_fx_model(model: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    """timm's ``_create_fx_model`` (tests/test_models.py): the whole model as an FX feature extractor.

    Traced with timm's registered leaf modules and functions (:func:`imixer.solve_token_mixer` among
    them); returns a module whose output dict holds the model's output.
    """
    tracer_kwargs = {
        "leaf_modules": get_notrace_modules(),
        "autowrap_functions": get_notrace_functions(),
        "param_shapes_constant": True,
    }
    train_nodes, eval_nodes = feature_extraction.get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return_nodes = [eval_nodes[-1]]
    train_return_nodes = [train_nodes[-1]]
    if train:
        graph = feature_extraction.NodePathTracer(**tracer_kwargs).trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_node_names = [n.name for n in graph_nodes[0]._input_nodes]
        graph_node_names = [n.name for n in graph_nodes]
        output_node_indices = [-graph_node_names.index(node_name) for node_name in output_node_names]
        train_return_nodes = [train_nodes[ix] for ix in output_node_indices]
    return feature_extraction.create_feature_extractor(
        model,
        train_return_nodes=train_return_nodes,
        eval_return_nodes=eval_return_nodes,
        tracer_kwargs=tracer_kwargs,
    )


def fx_output(fx_model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    (output,) = fx_model(x).values()
    return output


@pytest.fixture
def meta_safe_spectral_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the meta device the normalisation's construction-time SVD and its forward cannot run."""
    monkeypatch.setattr(il.SoftSpectralNorm, "refine_", lambda self, weight: None)
    monkeypatch.setattr(il.SoftSpectralNorm, "forward", lambda self, weight: weight)


def test_every_registered_model_is_covered() -> None:
    expected = {f"imixer_{size}{patch}_224" for size in "sbl" for patch in (32, 16)}
    expected |= {"imixer_t4_32", "imixer_t2_8", "mixer_t4_32", "mixer_t2_8"}
    assert set(MODELS) == expected
    # timm's forward/backward tests run fixed-size models at their default input size.
    for name in SMALL:
        assert max(input_size(name)) <= 32 and timm.models.get_pretrained_cfg(name).fixed_input_size


# ---------------------------------------------------------------------------------------------------
# timm's test_model_forward / test_model_backward / test_model_default_cfgs_non_std


@pytest.mark.parametrize("name", SMALL)
def test_forward(name: str) -> None:
    model = create(name).eval()
    x = images(name, 1)
    outputs = model(x)
    assert outputs.shape == (1, 10)
    assert bool(torch.isfinite(outputs).all())
    model.set_grad_checkpointing()  # recomputes blocks; must not change the output
    torch.testing.assert_close(model(x), outputs)


@pytest.mark.parametrize("name", SMALL)
def test_backward(name: str) -> None:
    model = create(name, num_classes=42).train()
    outputs = model(images(name, 2))
    outputs.mean().backward()
    assert outputs.shape == (2, 42) and bool(torch.isfinite(outputs).all())
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


@pytest.mark.parametrize("name", SMALL)
def test_default_cfgs_non_std(name: str) -> None:
    model = create(name).eval()
    assert model.num_classes == 10 and model.num_features == model.head_hidden_size == model.embed_dim
    x = images(name, 1)
    features = model.forward_features(x)
    tokens = model.stem.num_patches
    assert features.shape == (1, tokens, model.num_features)  # NLC, as timm's Mixer
    pre_logits = model.forward_head(features, pre_logits=True)
    assert pre_logits.shape == (1, model.head_hidden_size)
    model.reset_classifier(0)
    assert model.num_classes == 0
    torch.testing.assert_close(model(x), pre_logits)
    pooled = create(name, num_classes=0).eval()(x)
    assert pooled.shape == (1, model.num_features)
    cfg, state_dict = model.pretrained_cfg, create(name).state_dict()
    assert f"{cfg['classifier']}.weight" in state_dict and f"{cfg['first_conv']}.weight" in state_dict


# ---------------------------------------------------------------------------------------------------
# timm's test_model_forward_features / test_model_forward_intermediates(_features)


def block_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output, (B, N, C), recorded with forward hooks during a plain forward."""
    outputs: list[torch.Tensor] = []
    handles = [block.register_forward_hook(lambda m, i, o: outputs.append(o)) for block in model.blocks]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def to_nchw(tokens: torch.Tensor, name: str, patch: int) -> torch.Tensor:
    height, width = (size // patch for size in input_size(name)[1:])
    return tokens.reshape(tokens.shape[0], height, width, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("out_indices", [None, (0, 2)])
@pytest.mark.parametrize("name", SMALL)
def test_features_only_gives_the_blocks_outputs(name: str, out_indices: tuple[int, ...] | None) -> None:
    kwargs = {} if out_indices is None else {"out_indices": out_indices}
    features = create(name, features_only=True, **kwargs).eval()
    assert type(features).__name__ == "FeatureGetterNet"
    model = create(name).eval()
    depth, dim, patch = len(model.blocks), model.embed_dim, model.stem.patch_size[0]
    expected_indices = list(range(depth - 3, depth)) if out_indices is None else list(out_indices)
    assert features.feature_info.channels() == [dim] * len(expected_indices)
    assert features.feature_info.reduction() == [patch] * len(expected_indices)
    assert len(features.feature_info.channels()) >= (3 if out_indices is None else 2)  # timm asks >= 3
    # The wrapped model is pruned after the last index (no norm, no head): give it the full model's weights.
    missing, _ = features.model.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    x = images(name, 2)
    with torch.no_grad():
        outputs = features(x)
        blocks = block_outputs(model, x)
    assert len(outputs) == len(expected_indices)
    for index, output in zip(expected_indices, outputs, strict=True):
        assert output.shape == (2, dim, input_size(name)[1] // patch, input_size(name)[2] // patch)
        torch.testing.assert_close(output, to_nchw(blocks[index], name, patch))


def test_fx_feature_extractor_gives_the_same_features() -> None:
    """timm's other feature wrapper, ``feature_cls="fx"``, traces the model: its token maps (NLC) agree."""
    getter = create("imixer_t2_8", features_only=True).eval()
    torch.manual_seed(1)  # other weights, then the getter's: the comparison needs the load to work
    graph = timm.create_model("imixer_t2_8", features_only=True, feature_cls="fx").double().eval()
    assert type(graph).__name__ == "FeatureGraphNet"
    graph.graph_module.load_state_dict(getter.model.state_dict())  # strict: the same parameters and buffers
    x = images("imixer_t2_8", 2)
    with torch.no_grad():
        for tokens, nchw in zip(graph(x), getter(x), strict=True):
            torch.testing.assert_close(to_nchw(tokens, "imixer_t2_8", 2), nchw)


@pytest.mark.parametrize("name", SMALL)
def test_forward_intermediates(name: str) -> None:
    model = create(name).eval()
    feature_info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(feature_info.channels()) == len(model.blocks) >= 3
    x = images(name, 1)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
        blocks = block_outputs(model, x)
        torch.testing.assert_close(final, model.forward_features(x))
    patch = model.stem.patch_size[0]
    for channels, reduction, output, block in zip(
        feature_info.channels(), feature_info.reduction(), intermediates, blocks, strict=True
    ):
        assert output.shape == (1, channels, input_size(name)[1] // reduction, input_size(name)[2] // reduction)
        torch.testing.assert_close(output, to_nchw(block, name, patch))
    model.set_grad_checkpointing()
    torch.testing.assert_close(model.forward_intermediates(x, output_fmt="NCHW")[0], final)


# ---------------------------------------------------------------------------------------------------
# timm's test_model_forward_fx / test_model_backward_fx


@pytest.mark.parametrize("name", SMALL)
def test_fx_forward_matches_eager(name: str) -> None:
    model = create(name).eval()
    x = images(name, 2)
    with torch.inference_mode():
        expected = model(x)
        fx_model = create_fx_model(model)
        torch.testing.assert_close(fx_output(fx_model, x), expected)
    if name.startswith("imixer"):
        # Only the solves are leaves: fc1/fc2 of every token mixer are traced, one solve call per block.
        calls = [node.target for node in fx_model.graph.nodes if node.op == "call_function"]
        assert calls.count(imixer.solve_token_mixer) == len(model.blocks)
        modules = {node.target for node in fx_model.graph.nodes if node.op == "call_module"}
        assert {f"blocks.{i}.mlp_tokens.fc1" for i in range(len(model.blocks))} <= modules


@pytest.mark.parametrize("name", SMALL)
def test_fx_backward_matches_eager(name: str) -> None:
    model = create(name, num_classes=42).train()
    # A training forward advances the spectral norms' power iteration (buffers u, v), so the FX model
    # gets its own copy of the same state rather than sharing the eager model's modules.
    fx_model = create_fx_model(copy.deepcopy(model), train=True)
    x = images(name, 2)
    expected, outputs = model(x), fx_output(fx_model, x)
    torch.testing.assert_close(outputs, expected)
    expected.mean().backward()
    outputs.mean().backward()
    eager_grads = {n: p.grad for n, p in model.named_parameters()}
    fx_grads = {n: p.grad for n, p in fx_model.named_parameters()}
    assert fx_grads.keys() == eager_grads.keys()  # every parameter is in the graph module
    for param_name, grad in eager_grads.items():
        assert fx_grads[param_name] is not None, f"no gradient for {param_name}"
        torch.testing.assert_close(fx_grads[param_name], grad, msg=lambda m, n=param_name: f"{n}: {m}")


@pytest.mark.parametrize("reference_iterations", [0, 2])
def test_fx_traces_the_reference_modes(reference_iterations: int) -> None:
    model = create("imixer_t2_8", reference_iterations=reference_iterations).eval()
    x = images("imixer_t2_8", 2)
    with torch.no_grad():
        torch.testing.assert_close(fx_output(create_fx_model(model), x), model(x))
    traced = torch.fx.symbolic_trace(model)  # torch.fx.wrap: a leaf for plain torch.fx as well
    calls = [node.target for node in traced.graph.nodes if node.op == "call_function"]
    assert calls.count(imixer.solve_token_mixer) == (len(model.blocks) if reference_iterations else 0)


def test_fx_graph_keeps_the_solves_out_of_autocast() -> None:
    """Under AMP the traced graph, like the eager model, solves in float32 (bf16 could not reach tol)."""
    torch.manual_seed(0)
    model = timm.create_model("imixer_t2_8").eval()
    fx_model = create_fx_model(copy.deepcopy(model))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    calls: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def recorder(label: str):
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor], output: torch.Tensor) -> None:
            calls[label] = (args[0], output)  # returns None: the output is left as it is

        return hook

    for label, module in (("eager", model), ("fx", fx_model)):  # the graph module holds copies of the layers
        module.get_submodule("blocks.1.mlp_tokens.implicit").register_forward_hook(recorder(label))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, outputs = model(x), fx_output(fx_model, x)
    assert outputs.dtype == expected.dtype == torch.bfloat16  # the rest still runs under autocast
    # The same operations in the same precisions: equal up to bf16 rounding of the head's inputs.
    torch.testing.assert_close(outputs.float(), expected.float(), rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        assert calls.keys() == {"eager", "fx"}
        for label, (inputs, solution) in calls.items():
            # A float32 solve outside autocast gives the same solution; a bf16 F would be off by ~1e-2.
            assert inputs.dtype == solution.dtype == torch.float32, label
            reference = model.get_submodule("blocks.1.mlp_tokens.implicit")(inputs)
            torch.testing.assert_close(solution, reference, rtol=1e-6, atol=1e-6, msg=label)


# ---------------------------------------------------------------------------------------------------
# timm's test_model_forward_torchscript / test_model_forward_fx_torchscript


@JIT_DEPRECATION
@pytest.mark.parametrize("name", SMALL)
def test_torchscript(name: str) -> None:
    with timm.layers.set_scriptable(True):
        model = create(name).eval()
    x = images(name, 1)
    if is_scriptable(name):
        scripted = torch.jit.script(model)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), model(x))
    else:
        with pytest.raises(RuntimeError, match="TorchScript cannot compile the iMixer"):
            torch.jit.script(model)


@JIT_DEPRECATION
@pytest.mark.parametrize("name", SMALL)
def test_fx_torchscript(name: str) -> None:
    with timm.layers.set_scriptable(True):
        model = create(name).eval()
    fx_model = create_fx_model(model)
    x = images(name, 1)
    if is_scriptable(name):
        scripted = torch.jit.script(fx_model)
        with torch.inference_mode():
            torch.testing.assert_close(fx_output(scripted, x), model(x))
    else:
        # The graph keeps the ImplicitMLP layers (arguments of the solve calls): they refuse scripting.
        with pytest.raises(RuntimeError, match="ImplicitMLP cannot be compiled with TorchScript"):
            torch.jit.script(fx_model)


@JIT_DEPRECATION
def test_torchscript_exclusion_covers_the_reference_mode() -> None:
    model = timm.create_model("imixer_t2_8", reference_iterations=2).eval()
    with pytest.raises(RuntimeError, match="TorchScript cannot compile the iMixer") as error:
        torch.jit.script(model)
    assert "mixer_t2_8" in str(error.value) and "README" in str(error.value)  # says what to do instead


# ---------------------------------------------------------------------------------------------------
# The *_224 models: cfg and features on the meta device, one real block on a small input.


def large_shape(name: str) -> tuple[int, int, int]:
    """(embed_dim, depth, patch) of imixer_{s,b,l}{32,16}_224."""
    size, patch = re.fullmatch(r"imixer_([sbl])(\d+)_224", name).groups()
    return (*SIZES[size], int(patch))


@pytest.mark.parametrize("name", LARGE)
def test_large_default_cfg_and_features_on_meta(name: str, meta_safe_spectral_norm: None) -> None:
    dim, depth, patch = large_shape(name)
    with torch.device("meta"):
        model = timm.create_model(name)
        features = timm.create_model(name, features_only=True)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["fixed_input_size"] and cfg["num_classes"] == 1000
    state_dict = model.state_dict()
    assert f"{cfg['classifier']}.weight" in state_dict and f"{cfg['first_conv']}.weight" in state_dict
    assert model.num_features == model.head_hidden_size == dim and model.head.out_features == 1000
    assert len(model.blocks) == depth and model.stem.num_patches == (224 // patch) ** 2
    assert model.feature_info == [{"module": f"blocks.{i}", "num_chs": dim, "reduction": patch} for i in range(depth)]
    assert features.feature_info.channels() == [dim] * 3 and features.feature_info.reduction() == [patch] * 3
    assert features.out_indices == [depth - 3, depth - 2, depth - 1]


@pytest.mark.parametrize("name", LARGE)
def test_large_block_runs_on_a_small_input(name: str) -> None:
    dim, _, patch = large_shape(name)
    # The model's width, patch, token mixer and implicit settings, with one block and 2x2 patches.
    model = create(name, num_blocks=1, img_size=2 * patch).eval()
    assert model.blocks[0].mlp_tokens.implicit.features == dim // 2
    x = torch.randn(1, 3, 2 * patch, 2 * patch, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
        final, (intermediate,) = model.forward_intermediates(x)
        fx_logits = fx_output(create_fx_model(model), x)
    assert logits.shape == (1, 1000) and bool(torch.isfinite(logits).all())
    assert intermediate.shape == (1, dim, 2, 2)
    torch.testing.assert_close(model.forward_head(final), logits)
    torch.testing.assert_close(fx_logits, logits)
    assert all(stats["unconverged"] == 0.0 for stats in model.solver_stats())


# ---------------------------------------------------------------------------------------------------
# The README's code


def test_readme_python_snippets_run(monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (REPO_ROOT / "examples" / "imixer" / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert snippets, "examples/imixer/README.md has no ```python block"
    monkeypatch.chdir(REPO_ROOT)  # the snippets say: run from the repository root
    for index, code in enumerate(snippets):
        torch.manual_seed(0)
        exec(compile(code, f"examples/imixer/README.md (python block {index + 1})", "exec"), {})


def test_scripting_message_names_a_real_alternative() -> None:
    # The error sends users to the vanilla baselines: they exist and are the only models that script.
    assert "mixer_t4_32" in imixer.TORCHSCRIPT_UNSUPPORTED and "mixer_t2_8" in imixer.TORCHSCRIPT_UNSUPPORTED
    assert sorted(name for name in MODELS if is_scriptable(name)) == ["mixer_t2_8", "mixer_t4_32"]
