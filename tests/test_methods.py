"""The method registry (subspace_ops.methods), the adapter layers (nn.adapters) and the MPC regularizers.

Every registry name on a tiny timm ViT (and the linear methods on a tiny RoBERTa): parameter counts
against counts computed here from the unadapted model's shapes, the output at attach, merge/unmerge,
save/load of the trainable state, and errors that leave the model unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from subspace_ops import methods, reference
from subspace_ops.adapters import merge_all, unmerge_all
from subspace_ops.nn import SSF, DoRALinear, LowRankLinear, RLRRLinear
from subspace_ops.nn.adapters import NotMergeableError, ParallelAdapterLinear, SequentialAdapter, SpectralLinear

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

ALL = methods.list_methods()
# Not zero-init: RLRR's scales are kaiming-uniform and SSF's γ ~ N(1, 0.02), β ~ N(0, 0.02) (their papers'
# inits), so the output moves at attach; they are checked against the reference formulas instead.
NOT_ZERO_INIT = {"rlrr", "ssf"}
# Zero-init, but the adapted path is a different computation (a kernel, or m/‖W‖ rounding): equal to rounding.
# ssb, ssl, ia3: evaluated without gradients beyond 8 tokens on the cpu backend's own float32 GEMMs, they
# take the modulated kernels (a GEMM of their own where the pretrained layer runs MKL's; choose_path).
# sam-parser, svdiff: their basis path computes U Σ Vᵀ in place of W (SVDLinear.chosen_path).
CLOSE_AT_INIT = {"coeff", "dora", "ssb", "ssl", "ia3", "sam-parser", "svdiff"}
NOT_MERGEABLE = {"pa", "adapter"}
# Linear methods checked on RoBERTa as well (coeff is an attention method, covered in test_coeff_layers).
LINEAR_METHODS = [n for n in ALL if n != "coeff"]


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
VIT_CONFIG = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)


@functools.lru_cache(maxsize=None)
def _vit_base() -> nn.Module:
    torch.manual_seed(1234)
    return timm.models.vision_transformer.VisionTransformer(**VIT_CONFIG).eval()


@functools.lru_cache(maxsize=None)
def _roberta_base() -> nn.Module:
    torch.manual_seed(1234)
    config = transformers.RobertaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
    )
    return transformers.RobertaModel(config).eval()


def tiny_vit() -> nn.Module:
    return copy.deepcopy(_vit_base())


def tiny_roberta() -> nn.Module:
    return copy.deepcopy(_roberta_base())


def vit_input() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def roberta_input() -> torch.Tensor:
    return torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(7))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def cpu_kw(name: str, **kw) -> dict:
    """backend="cpu" for the methods whose config has a backend (ssf, bitfit, adapter have no kernel)."""
    fields = {f.name for f in dataclasses.fields(methods.METHODS[name].config)}
    return {"backend": "cpu", **kw} if "backend" in fields else kw


def perturb(model: nn.Module, scale: float = 0.05) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


def flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def assert_output_at_attach(name: str, y: torch.Tensor, y0: torch.Tensor) -> None:
    """Zero-init methods leave the output bit-identical (or equal to rounding, CLOSE_AT_INIT); the others move it."""
    if name in NOT_ZERO_INIT:
        assert not torch.allclose(y, y0, atol=1e-4)
    elif name in CLOSE_AT_INIT:
        torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(y, y0)


def assert_merge_round_trip(model: nn.Module, x: torch.Tensor) -> int:
    """Merged outputs equal the unmerged ones; after unmerge the frozen weights are bit-identical."""
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        y = run(model, x)
        merged = merge_all(model)
        assert merged == sum(1 for m in model.modules() if getattr(m, "merged", False)) > 0
        torch.testing.assert_close(run(model, x), y, rtol=1e-4, atol=1e-4)
        assert unmerge_all(model) == merged
        assert all(torch.equal(model.get_parameter(n), w) for n, w in frozen.items())
        torch.testing.assert_close(run(model, x), y, rtol=0, atol=0)
    return merged


# ------------------------------------------------------------------------------------------------
# Independent parameter counts, from the unadapted model's module names and shapes
# ------------------------------------------------------------------------------------------------
ROLES = {
    "vit": {
        "all": r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))",
        "kv": r"blocks\.\d+\.attn\.qkv",
        "ffn_out": r"blocks\.\d+\.mlp\.fc2",
        "after": r"blocks\.\d+\.(attn\.proj|mlp\.fc2)",
        "head": r"head",
    },
    "roberta": {
        "all": r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
               r"intermediate\.dense|output\.dense)",
        "kv": r"encoder\.layer\.\d+\.attention\.self\.(key|value)",
        "ffn_out": r"encoder\.layer\.\d+\.output\.dense",
        "after": r"encoder\.layer\.\d+\.(attention\.output|output)\.dense",
        "head": r"(?!)",
    },
}


def linears(model: nn.Module, arch: str, role: str) -> list[tuple[str, nn.Linear]]:
    pattern = re.compile(ROLES[arch][role] + "$")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.match(n)]


def parts(arch: str, name: str, linear: nn.Linear) -> list[torch.Tensor]:
    """A fused timm qkv is three matrices for RLRR, the SVD methods and ssb / ssl / ia3."""
    w = linear.weight.detach()
    return list(w.chunk(3)) if arch == "vit" and name.endswith("qkv") else [w]


def norm_dims(model: nn.Module, arch: str) -> list[int]:
    if arch == "vit":  # patch embedding, norm1/norm2 of each block, final norm (fc_norm is Identity)
        return [model.patch_embed.proj.out_channels] + [m.normalized_shape[0] for n, m in model.named_modules()
                                                          if isinstance(m, nn.LayerNorm)]
    return [m.normalized_shape[0] for m in model.modules() if isinstance(m, nn.LayerNorm)]


def siva_k(w: torch.Tensor, perc: float) -> int:
    """k = the singular values outside the smallest head whose share of Σσ² reaches perc."""
    energy = torch.linalg.svdvals(w.double()) ** 2
    share = torch.cumsum(energy, 0) / energy.sum()
    head = next(i for i in range(len(share)) if share[i] >= perc - 1e-12) + 1
    return len(energy) - head


def expected_adapter_params(name: str, model: nn.Module, arch: str, cfg) -> int:
    shapes = lambda role: [(m.out_features, m.in_features) for _, m in linears(model, arch, role)]  # noqa: E731
    if name in ("lora", "pa", "spectral"):
        return sum(cfg.rank * (n + k) for n, k in shapes("all"))
    if name in ("adalora", "trilora"):
        return sum(cfg.rank * (n + k) + cfg.rank for n, k in shapes("all"))
    if name == "flora":
        return sum(cfg.rank * (n + k) + cfg.rank ** 2 for n, k in shapes("all"))
    if name == "dora":
        return sum(cfg.rank * (n + k) + n for n, k in shapes("all"))
    # ssb / ssl / ia3 scale the key and value matrices: parts 1 and 2 of a fused qkv (q is left alone).
    kv = [tuple(w.shape) for n, lin in linears(model, arch, "kv") for w in parts(arch, n, lin)[-2:]]
    if name == "ssb":
        return sum(n + k for n, k in kv + shapes("ffn_out"))
    if name == "ssl":  # k, v: input side; FFN's second linear: output side
        return sum(k for n, k in kv) + sum(n for n, k in shapes("ffn_out"))
    if name == "ia3":  # k, v: output side; FFN's second linear: input side (the intermediate activation)
        return sum(n for n, k in kv) + sum(k for n, k in shapes("ffn_out"))
    if name == "adapter":
        m = cfg.bottleneck
        return sum(2 * n * m + n + m for n, _ in shapes("after"))
    if name in ("sam-parser", "svdiff"):
        return sum(min(w.shape) for n, lin in linears(model, arch, "all") for w in parts(arch, n, lin))
    if name == "siva":  # query and value (parts 0 and 2 of a fused qkv)
        if arch == "vit":
            mats = [parts(arch, n, lin)[i] for n, lin in linears(model, arch, "kv") for i in (0, 2)]
        else:
            mats = [m.weight.detach() for n, m in model.named_modules() if re.search(r"self\.(query|value)$", n)]
        return sum(siva_k(w, cfg.perc) for w in mats)
    if name == "rlrr":  # s_l [N], s_r [K] per part, shift [N]; SSF γ, β per norm
        linear = sum(2 * lin.out_features + lin.in_features * len(parts(arch, n, lin))
                     for n, lin in linears(model, arch, "all"))
        return linear + sum(2 * d for d in norm_dims(model, arch))
    if name == "ssf":
        return sum(2 * d for d in norm_dims(model, arch))
    if name == "bitfit":
        head = {id(p) for _, m in linears(model, arch, "head") for p in m.parameters()}
        return sum(m.bias.numel() for m in model.modules()
                   if isinstance(getattr(m, "bias", None), nn.Parameter) and id(m.bias) not in head)
    if name == "coeff":
        blocks = [m for m in model.modules() if type(m).__name__ == "Attention"]
        return sum(b.num_heads ** 2 for b in blocks)
    raise AssertionError(name)


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------
def test_registry_lists_every_method_with_its_paper_and_config():
    assert ALL == ["rlrr", "ssf", "ssb", "ssl", "ia3", "siva", "sam-parser", "svdiff", "coeff", "bitfit", "lora",
                   "adalora", "trilora", "flora", "dora", "pa", "adapter", "spectral"]
    for name, info in methods.METHODS.items():
        assert info.name == name and info.config.name == name
        assert info.category in ("reconstruction", "extension", "combination")
        assert info.paper and info.equation and info.config.__doc__
        assert isinstance(methods.get_config(name), info.config)
    assert set(methods.list_methods("extension")) == {"lora", "adalora", "trilora", "flora", "pa", "adapter"}
    assert methods.get_config("SAM_Parser").name == "sam-parser"
    assert not methods.METHODS["pa"].mergeable and methods.METHODS["spectral"].mergeable


def test_config_defaults_follow_the_papers():
    assert methods.get_config("lora").rank == 8 and methods.get_config("lora").alpha == 8.0
    ada = methods.get_config("adalora")
    assert ada.init == "adalora" and ada.mpc == "o" and ada.mpc_weight == 0.1
    assert methods.get_config("trilora").mpc is None
    assert methods.get_config("siva").perc == 0.95
    assert methods.get_config("adapter").bottleneck == 32 and methods.get_config("pa").activation == "relu"
    cfg = methods.get_config("lora", rank=2, targets=["qkv"])
    assert cfg.rank == 2 and cfg.targets == ("qkv",)
    assert methods.get_config("lora").to_dict()["method"] == "lora"


def test_roberta_base_parameter_budgets_match_paper_001():
    """(IA)³, SSL, SSB, BitFit, LoRA r=8 and HAdapter m=32 on RoBERTa-base (meta device, no weights): the
    parameter counts behind 001 Table 2's ‰ column (0.44, 0.22, 0.66, 0.82, 10.62, 9.59)."""
    config = transformers.RobertaConfig()  # roberta-base shapes
    with torch.device("meta"):
        base = transformers.RobertaModel(config, add_pooling_layer=True)
    total = sum(p.numel() for p in base.parameters())
    expected = {"ia3": (55_296, 0.44), "ssl": (27_648, 0.22), "ssb": (82_944, 0.66),
                "lora": (1_327_104, 10.62), "adapter": (1_198_848, 9.59)}
    for name, (count, permille) in expected.items():
        with torch.device("meta"):
            model = transformers.RobertaModel(config, add_pooling_layer=True)
        _, report = methods.apply(model, name)
        assert report.adapter_params == count, name
        assert round(1000 * count / 125e6, 2) == permille  # Table 2's denominator: RoBERTa-base's nominal 125M
        assert report.backbone_params == total
    with torch.device("meta"):
        model = transformers.RobertaModel(config, add_pooling_layer=True)
    _, report = methods.apply(model, "bitfit")
    assert round(1000 * report.adapter_params / 125e6, 2) == 0.82


# ------------------------------------------------------------------------------------------------
# apply on the tiny ViT: counts, output at attach
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_apply_vit_counts_and_output_at_attach(name):
    model, x = tiny_vit(), vit_input()
    with torch.no_grad():
        y0 = model(x)
    expected = expected_adapter_params(name, model, "vit", methods.get_config(name))
    model, report = methods.apply(model, name, **cpu_kw(name))
    assert report.method == name and report.layers and report.details["config"].name == name
    assert report.adapter_params == expected
    assert report.other_trainable_params == 48 * 10 + 10  # the head
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if name == "bitfit":
        assert all(n.endswith("bias") or n.startswith("head.") for n in trainable)
    with torch.no_grad():
        y = model(x)
    assert_output_at_attach(name, y, y0)
    # one training step reaches every trainable parameter and nothing else
    model.train()
    run(model, x).square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


@pytest.mark.parametrize("name", ["ia3", "ssl", "ssb"])
def test_scaled_methods_on_a_fused_qkv_split_or_shared(name):
    """Default: a timm qkv's key and value parts are scaled and its query rows stay the pretrained
    projection; fused_qkv="shared" scales the whole [3d, d] matrix as one layer (PEFT's way)."""
    split, _ = methods.apply(tiny_vit(), name, **cpu_kw(name))
    shared, report = methods.apply(tiny_vit(), name, **cpu_kw(name, fused_qkv="shared"))
    d = 48  # two blocks; qkv [3d, d] as one layer: output scales 3d, input scales d; fc2: 4d -> d
    qkv = {"ia3": 3 * d, "ssl": d, "ssb": 4 * d}[name]
    fc2 = {"ia3": 4 * d, "ssl": d, "ssb": 5 * d}[name]
    assert report.adapter_params == 2 * (qkv + fc2)
    assert shared.blocks[0].attn.qkv.splits == (3 * d,)
    layer = split.blocks[0].attn.qkv
    assert layer.splits == (d, d, d) and layer.scaled_parts == (False, True, True)
    perturb(layer, scale=0.5)
    h = torch.randn(2, 5, d)
    with torch.no_grad():
        q = torch.nn.functional.linear(h, layer.weight[:d], layer.bias[:d])
        out = layer(h)
    # q untouched: W's rows as they are (equal to the rounding of a different GEMM where the call,
    # made without gradients, takes the modulated kernels; see CLOSE_AT_INIT)
    torch.testing.assert_close(out[..., :d], q)
    assert not torch.allclose(out[..., d:], torch.nn.functional.linear(h, layer.weight[d:], layer.bias[d:]))
    with pytest.raises(ValueError, match="fused_qkv must be one of"):
        methods.get_config(name, fused_qkv="maybe")


def test_not_zero_init_methods_equal_their_reference_formulas():
    """rlrr and ssf move the output at attach: each layer equals its formula, and at the identity values of
    its parameters (s_l = 0, shift = 0; γ = 1, β = 0) the model is the pretrained one again."""
    x = vit_input()
    for name in sorted(NOT_ZERO_INIT):
        model = tiny_vit()
        with torch.no_grad():
            y0 = model(x)
        methods.apply(model, name, **cpu_kw(name))
        for layer in model.modules():
            if isinstance(layer, SSF):
                t = x if layer.fold_into == "proj" else torch.randn(3, 5, layer.dim)  # patch embed / LayerNorm
                torch.testing.assert_close(layer(t), reference.ssf(layer.inner(t), layer.gamma, layer.beta))
                with torch.no_grad():
                    layer.gamma.fill_(1.0)
                    layer.beta.zero_()
            elif isinstance(layer, RLRRLinear):
                t = torch.randn(3, layer.in_features)
                s_l, s_r = layer.scale_matrices(torch.float32)
                w = reference.rescaled_weight(layer.weight, s_l, s_r, residual=True)
                torch.testing.assert_close(layer(t), F.linear(t, w, layer.bias + layer.shift), rtol=1e-5, atol=1e-5)
                with torch.no_grad():
                    layer.s_l.zero_()
        with torch.no_grad():
            torch.testing.assert_close(model(x), y0, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# merge / unmerge and save / load
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_merge_unmerge_exact_or_clear_error(name):
    model, x = tiny_vit(), vit_input()
    methods.apply(model, name, **cpu_kw(name))
    perturb(model)
    if name in NOT_MERGEABLE or name == "coeff":  # head mixing acts on attention maps: no weight form
        assert not methods.METHODS[name].mergeable
        with pytest.raises(NotMergeableError, match="cannot be merged"):
            merge_all(model)
        assert not any(getattr(m, "merged", False) for m in model.modules())
    elif name == "bitfit":  # bitfit trains the weights' own biases: nothing to merge
        assert merge_all(model) == 0
    else:
        assert_merge_round_trip(model, x)


MERGEABLE = [n for n in ALL if n not in NOT_MERGEABLE | {"bitfit", "coeff"}]


@pytest.mark.parametrize("name", MERGEABLE)
def test_unmerge_after_a_dtype_conversion_gives_the_converted_originals(name):
    """merge -> .to(float64) -> unmerge holds exactly what unmerge -> .to(float64) holds: the kept
    originals follow the module's conversion (they are not parameters, so Module._apply alone would not)."""
    model, x = tiny_vit(), vit_input()
    methods.apply(model, name, **cpu_kw(name))
    perturb(model)
    expected = copy.deepcopy(model).double().state_dict()
    merge_all(model)
    model.double()
    unmerge_all(model)
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(state[k].dtype == torch.float64 and torch.equal(state[k], expected[k]) for k in expected)
    torch.testing.assert_close(model(x.double()), copy.deepcopy(model).float()(x).double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["lora", "rlrr", "svdiff"])
def test_unmerge_refuses_weights_replaced_while_merged(name):
    """load_state_dict into a merged model, then unmerge: restoring the originals would discard the loaded
    weights, so unmerge_all refuses before unmerging any layer. Reloading the same merged weights is fine."""
    model = tiny_vit()
    methods.apply(model, name, **cpu_kw(name))
    perturb(model)
    merge_all(model)
    merged_state = {k: v.clone() for k, v in model.state_dict().items()}
    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in merged_state.items()}
    model.load_state_dict(other)
    with pytest.raises(RuntimeError, match=r"nothing was unmerged: .*weight changed after merge\(\)"):
        unmerge_all(model)
    layers = [m for m in model.modules() if getattr(m, "merged", False)]
    assert layers and all(torch.equal(model.state_dict()[k], other[k]) for k in other)
    with pytest.raises(RuntimeError, match="load_state_dict on the merged model"):
        layers[0].unmerge()
    assert all(m.merged for m in layers)
    model.load_state_dict(merged_state)
    assert unmerge_all(model) == len(layers)


def test_repr_names_a_backend_the_layers_device_cannot_run():
    """A layer built with backend="cpu" (or "triton") before it is moved to its device prints, not raises."""
    layer = LowRankLinear(nn.Linear(8, 8, device="meta"), 2, backend="cpu")
    assert "backend=cpu (unavailable: backend 'cpu' is unavailable for meta tensors" in repr(layer)


def test_layers_pickled_merged_by_earlier_releases_still_unmerge():
    """Before the merge record, a merged layer kept its originals in ``_originals``."""
    layer = LowRankLinear(nn.Linear(6, 5), 2)
    perturb(layer)
    original = layer.weight.detach().clone()
    layer.merge()
    state = dict(layer.__dict__)
    state["_originals"] = tuple(state.pop("_merge_record")[0])
    old = LowRankLinear.__new__(LowRankLinear)
    old.__setstate__(state)
    assert old.merged
    old.unmerge()
    assert torch.equal(old.weight, original) and not old.merged


@pytest.mark.parametrize("kw", [{"mpc": "n"}, {"mpc": "n", "activation": "gelu"}])
def test_lora_mpc_n_is_pa_and_not_mergeable(kw):
    model = tiny_vit()
    _, report = methods.apply(model, "lora", **cpu_kw("lora", **kw))
    layers = [m for m in model.modules() if isinstance(m, ParallelAdapterLinear)]
    assert len(layers) == len(report.layers) == 8
    assert report.adapter_params == expected_adapter_params("pa", tiny_vit(), "vit", methods.get_config("pa"))
    with pytest.raises(NotMergeableError, match="activation="):
        merge_all(model)


def test_pa_identity_activation_is_lora_and_mergeable():
    base, x = tiny_vit(), vit_input()
    lora, pa = copy.deepcopy(base), copy.deepcopy(base)
    methods.apply(lora, "lora", rank=4, backend="cpu")
    methods.apply(pa, "pa", rank=4, activation="identity", backend="cpu")
    for m in pa.modules():
        if isinstance(m, ParallelAdapterLinear):
            perturb(m)
    with torch.no_grad():
        for m_lora, m_pa in zip(lora.modules(), pa.modules()):
            if isinstance(m_pa, ParallelAdapterLinear):
                m_lora.lora_a.copy_(m_pa.up)
                m_lora.lora_b.copy_(m_pa.down)
        y = pa(x)
        torch.testing.assert_close(lora(x), y, rtol=1e-5, atol=1e-5)
    assert merge_all(pa) == 8
    with torch.no_grad():
        torch.testing.assert_close(pa(x), y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_save_load_trainable_state_only(name):
    x = vit_input()
    trained = tiny_vit()
    methods.apply(trained, name, **cpu_kw(name))
    perturb(trained)
    state = {n: p.detach().clone() for n, p in trained.named_parameters() if p.requires_grad}
    fresh = tiny_vit()
    torch.manual_seed(99)  # different random adapter init: everything must come from the state
    methods.apply(fresh, name, **cpu_kw(name))
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) == {n for n in fresh.state_dict() if n not in state}
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# RoBERTa
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LINEAR_METHODS)
def test_apply_roberta(name):
    model, ids = tiny_roberta(), roberta_input()
    with torch.no_grad():
        y0 = run(model, ids)
    low_rank = name in ("lora", "adalora", "trilora", "flora", "dora", "pa", "spectral")
    cfg = methods.get_config(name, **cpu_kw(name, **({"rank": 4} if low_rank else {})))
    expected = expected_adapter_params(name, model, "roberta", cfg)
    model, report = methods.apply(model, cfg)
    assert report.adapter_params == expected
    assert report.other_trainable_params == 0
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if name != "bitfit":  # bitfit trains every bias, the pooler's too
        assert not any(n.startswith("pooler.") for n in report.layers)
    with torch.no_grad():
        y = run(model, ids)
    assert_output_at_attach(name, y, y0)
    if name in NOT_MERGEABLE or name == "bitfit":
        return
    perturb(model)
    assert_merge_round_trip(model, ids)


# ------------------------------------------------------------------------------------------------
# The new layers against the reference transcriptions
# ------------------------------------------------------------------------------------------------
@pytest.fixture(params=["reference", "cpu"])
def op_backend(request) -> str:
    return request.param


@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
def test_parallel_adapter_layer_equals_reference(op_backend, activation):
    base = nn.Linear(20, 18, dtype=torch.float64)
    x = torch.randn(2, 5, 20, dtype=torch.float64, requires_grad=True)
    layer = ParallelAdapterLinear(base, 4, activation=activation, alpha=8, backend=op_backend)
    assert layer.scaling == 2.0 and not layer.weight.requires_grad
    assert torch.equal(layer(x), base(x))  # up = 0
    perturb(layer, 0.3)
    h = {"relu": torch.relu, "gelu": F.gelu, "identity": lambda t: t}[activation]
    expected = base(x) + reference.parallel_adapter(x, layer.down, layer.up, h, 2.0)
    y = layer(x)
    torch.testing.assert_close(y, expected)
    grads = torch.autograd.grad(y.square().sum(), (x, layer.up, layer.down))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, layer.up, layer.down))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)
    assert layer.low_rank_factors() == (layer.up, layer.down)
    assert f"activation={activation}" in repr(layer)


def test_parallel_adapter_dropout_only_in_training():
    layer = ParallelAdapterLinear(nn.Linear(16, 8), 4, dropout=0.5)
    perturb(layer, 0.3)
    x = torch.randn(64, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


def test_sequential_adapter_equals_reference():
    inner = nn.Linear(12, 10, dtype=torch.float64)
    layer = SequentialAdapter(inner, 3)
    x = torch.randn(4, 6, 12, dtype=torch.float64)
    assert torch.equal(layer(x), inner(x))  # W_up = 0, b_up = 0
    assert layer.dim == 10 and sum(p.numel() for n, p in layer.named_parameters() if not n.startswith("module.")) \
        == 2 * 10 * 3 + 10 + 3
    perturb(layer, 0.3)
    h = inner(x)
    expected = reference.sequential_adapter(h, layer.down_weight, layer.up_weight, F.gelu, layer.down_bias,
                                            layer.up_bias)
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(NotMergeableError):
        layer.merge()
    with pytest.raises(ValueError, match="dim is required"):
        SequentialAdapter(nn.ReLU(), 4)
    with pytest.raises(ValueError, match="activation"):
        SequentialAdapter(inner, 4, activation="swish2")


def _full_svd_with_layer_basis(layer: SpectralLinear):
    """The full thin SVD of W (float64) whose top r vectors are the layer's (sign-fixed) ones."""
    u, s, vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    r = layer.rank
    return torch.cat([layer.u_r.double(), u[:, r:]], 1), s, torch.cat([layer.v_r.double(), vh[r:].T], 1)


def test_spectral_layer_equals_reference(op_backend):
    base = nn.Linear(20, 14, dtype=torch.float64)
    x = torch.randn(3, 5, 20, dtype=torch.float64)
    layer = SpectralLinear(base, 3, backend=op_backend)
    assert torch.equal(layer(x), base(x))  # A = B = 0: exactly the wrapped layer
    u, s, v = _full_svd_with_layer_basis(layer)
    torch.testing.assert_close(u * s @ v.T, base.weight.detach())  # the stored basis is W's
    perturb(layer, 0.3)
    w_ref = reference.spectral_adapter_weight(u, s, v, layer.spectral_a, layer.spectral_b)
    expected = F.linear(x, w_ref, base.bias)
    y = layer(x)
    torch.testing.assert_close(y, expected)
    params = (layer.spectral_a, layer.spectral_b)
    grads = torch.autograd.grad(y.square().sum(), params)
    for g, e in zip(grads, torch.autograd.grad(expected.square().sum(), params)):
        torch.testing.assert_close(g, e)
    w0 = layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer.weight.detach(), w_ref.detach())
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


def test_spectral_layer_sign_convention_and_errors():
    base = nn.Linear(16, 12)
    layer = SpectralLinear(base, 4)
    pivot = layer.u_r.abs().argmax(0)
    assert (layer.u_r.gather(0, pivot[None]) > 0).all()
    flipped = copy.deepcopy(base)
    with torch.no_grad():
        flipped.weight.neg_().neg_()  # same weights, new storage
    again = SpectralLinear(flipped, 4)
    assert torch.equal(again.u_r, layer.u_r) and torch.equal(again.v_r, layer.v_r)
    with pytest.raises(ValueError, match="rank must be <="):
        SpectralLinear(nn.Linear(16, 12), 13)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        SpectralLinear(nn.Linear(16, 12), 0)


# ------------------------------------------------------------------------------------------------
# MPC
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lora", "adalora", "flora", "dora", "pa"])
@pytest.mark.parametrize("kind", ["o", "d"])
def test_mpc_loss_equals_reference_and_is_differentiable(name, kind):
    model = tiny_vit()
    methods.apply(model, name, rank=4, backend="cpu")
    perturb(model, 0.2)
    layers = [m for m in model.modules() if isinstance(m, (LowRankLinear, DoRALinear, ParallelAdapterLinear))]
    assert len(layers) == 8
    fn = {"o": reference.mpc_orthogonal, "d": reference.mpc_diagonal}[kind]
    expected = 0.3 * sum(fn(*m.low_rank_factors()) for m in layers)
    loss = methods.mpc_loss(model, kind, weight=0.3)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    for m in layers:
        a, b = m.low_rank_factors()
        assert a.grad is not None and b.grad is not None and a.grad.abs().sum() > 0


def test_mpc_config_is_reported_and_errors():
    _, report = methods.apply(tiny_vit(), "trilora", mpc="d", mpc_weight=0.5, backend="cpu")
    assert report.details["mpc"] == {"kind": "d", "weight": 0.5}
    _, report = methods.apply(tiny_vit(), "adalora", backend="cpu")
    assert report.details["mpc"] == {"kind": "o", "weight": 0.1}
    with pytest.raises(ValueError, match="no low-rank layers"):
        methods.mpc_loss(tiny_vit())
    with pytest.raises(ValueError, match="kind must be"):
        methods.mpc_loss(tiny_vit(), kind="n")
    with pytest.raises(ValueError, match="mpc must be one of"):
        methods.get_config("flora", mpc="n")  # MPC_n is LoRA's (use pa for the others)


# ------------------------------------------------------------------------------------------------
# Errors leave the model unchanged
# ------------------------------------------------------------------------------------------------
BAD_CALLS = [
    (("loraa",), {}, "name 'loraa' is not a known method"),
    (("lora",), {"rnak": 4}, r"unknown lora config field\(s\) \['rnak'\]"),
    (("lora",), {"rank": 0}, "rank must be a positive int"),
    (("lora",), {"targets": ("nothing_here",)}, r"targets .* match no nn.Linear \(or .*\) in VisionTransformer$"),
    (("lora",), {"targets": ("norm1",)}, r"match no nn.Linear \(or .*\) in VisionTransformer; they match 2 LayerNorm$"),
    (("rlrr",), {"targets": ("norm1",)}, r"match no nn.Linear \(or .*\) in VisionTransformer; they match 2 LayerNorm$"),
    (("ia3",), {"ff_targets": ("nope",)}, "ff_targets .* match no nn.Linear"),
    (("ssb",), {"ff_targets": ("qkv",)}, "match both targets and ff_targets"),
    (("ssf",), {"targets": ("qkv",)}, "targets .* match no LayerNorm"),
    (("bitfit",), {"targets": ("pos_drop",)}, "match no module with a bias"),
    (("adapter",), {"targets": ("nope",)}, "match no module with out_features"),
    (("siva",), {"perc": 1.5}, r"perc must be in"),
    (("pa",), {"activation": "softmax"}, "activation must be one of"),
    (("dora",), {"backend": "cuda"}, "backend must be one of"),
    (("rlrr",), {"fused_qkv": "maybe"}, "fused_qkv must be one of"),
    (("spectral",), {"rank": 100}, "rank must be <="),  # fails while building layers: rolled back
    # A typo in trainable would freeze the head without a word; the defaults' other families' heads are exempt.
    (("lora",), {"trainable": ("head", "hed")}, r"trainable pattern\(s\) \['hed'\] match no module of"),
    (("rlrr",), {"exclude": ("blocks.7",)}, r"exclude pattern\(s\) \['blocks.7'\] match no module"),
    (("coeff",), {"trainable": ("classifer",)}, r"trainable pattern\(s\) \['classifer'\]"),
]


@pytest.mark.parametrize("args, kw, match", BAD_CALLS, ids=[f"{a[0]}-{sorted(k)}" for a, k, _ in BAD_CALLS])
def test_errors_name_the_argument_and_leave_the_model_unchanged(args, kw, match):
    model = tiny_vit()
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_flags = flags(model)
    before_types = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=match):
        methods.apply(model, *args, **kw)
    after = model.state_dict()
    assert after.keys() == before_state.keys() and all(torch.equal(after[k], v) for k, v in before_state.items())
    assert flags(model) == before_flags
    assert [(n, type(m)) for n, m in model.named_modules()] == before_types


def test_config_object_overrides_and_bad_arguments():
    cfg = methods.get_config("lora", rank=2)
    model, report = methods.apply(tiny_vit(), cfg, backend="cpu", targets=("qkv",))
    assert report.layers == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"] and cfg.targets != ("qkv",)
    with pytest.raises(ValueError, match=r"unknown lora config field"):
        methods.apply(tiny_vit(), cfg, bottleneck=3)
    with pytest.raises(ValueError, match="config_or_name must be"):
        methods.apply(tiny_vit(), 3)
    with pytest.raises(ValueError, match="category must be one of"):
        methods.list_methods("magic")


def test_methods_combine():
    """coeff after ssf (003's setting): both sets of parameters train, the backbone stays frozen."""
    model = tiny_vit()
    _, first = methods.apply(model, "ssf")
    _, second = methods.apply(model, "coeff", dropout=0.1, backend="cpu")
    assert second.adapter_params == 18
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        first.adapter_params + second.adapter_params + 490


@pytest.mark.parametrize("second", ["lora", "rlrr", "siva", "ia3", "dora", "coeff"])
def test_bitfit_biases_stay_trained_by_a_later_method(second, tmp_path):
    """bitfit then another method: the biases BitFit unfroze stay trainable, get the reference's
    gradients through the layer that now wraps them, and are saved in the adapter file."""
    from subspace_ops import checkpoint

    def adapted(backend):
        model = tiny_vit()
        methods.apply(model, "bitfit")
        methods.apply(model, second, **({"backend": backend} if backend else {}))
        return model

    model, x = adapted("cpu"), vit_input()
    biases = [n for n, _ in tiny_vit().named_parameters() if n.endswith("bias") and not n.startswith("head")]
    assert biases and all(model.get_parameter(n).requires_grad for n in biases)
    perturb(model)
    twin = adapted("reference")
    twin.load_state_dict(model.state_dict())
    model(x).square().sum().backward()
    twin(x).square().sum().backward()
    for n in biases:
        grad = model.get_parameter(n).grad
        assert grad is not None and grad.abs().sum() > 0, n
        torch.testing.assert_close(grad, twin.get_parameter(n).grad, rtol=1e-4, atol=1e-5)
    checkpoint.save_adapter(model, tmp_path / "a.safetensors", method=f"bitfit+{second}")
    fresh = adapted("cpu")
    checkpoint.load_adapter(fresh, tmp_path / "a.safetensors")
    for n in biases:
        assert torch.equal(fresh.get_parameter(n), model.get_parameter(n)), n


@pytest.mark.parametrize("name", ALL)
def test_adapted_on_the_meta_device_then_loaded(name):
    """Big-model init: build and adapt on the meta device, then to_empty + load_state_dict (or
    load_state_dict(assign=True)) gives the model adapted with real weights: all the layers' state is in
    their state_dict. SiVA's perc rule needs the weights' singular values, so it refuses meta weights."""
    kw = {"rank": 2} if name == "siva" else {}
    real, x = tiny_vit(), vit_input()
    methods.apply(real, name, **kw)
    perturb(real)
    with torch.device("meta"):
        model = timm.models.vision_transformer.VisionTransformer(**VIT_CONFIG).eval()
    methods.apply(model, name, **kw)
    for assign in (False, True):
        loaded = copy.deepcopy(model)
        if not assign:
            loaded.to_empty(device="cpu")
        loaded.load_state_dict(real.state_dict(), strict=True, assign=assign)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), real(x), rtol=0, atol=0)
    if name == "siva":
        with torch.device("meta"):
            meta = timm.models.vision_transformer.VisionTransformer(**VIT_CONFIG)
        with pytest.raises(ValueError, match="meta device"):
            methods.apply(meta, "siva")


def test_merge_all_refuses_before_merging_anything():
    """A model mixing mergeable (LoRA) and non-mergeable (PA with ReLU) layers is left untouched."""
    from subspace_ops import adapters
    from subspace_ops.nn import NotMergeableError

    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=10)
    methods.apply(model, "lora", targets=("qkv",))
    methods.apply(model, "pa", targets=("fc1",))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(NotMergeableError, match="nothing was merged"):
        adapters.merge_all(model)
    assert not any(getattr(m, "merged", False) for m in model.modules())
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_new_layers_follow_the_models_eval_mode():
    """A model in eval mode stays deterministic after apply: new layers' dropout is off."""
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=10).eval()
    methods.apply(model, "lora", dropout=0.5, backend="cpu")
    assert not any(m.training for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
