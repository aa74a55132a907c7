"""subspace_ops.timm.apply on timm VisionTransformers: the registry methods with timm's names and defaults."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import subspace_ops.timm as subspace_timm
from subspace_ops import methods
from subspace_ops.adapters import merge_all, unmerge_all
from subspace_ops.nn import SSF, sdpa_head_mixing
from subspace_ops.nn.sdpa_head_mixing import is_head_mixing
from subspace_ops.peft_model import get_peft_model

from conftest import papers_sdpa, recorded_dropout, train_step_outputs

timm = pytest.importorskip("timm")

X = torch.randn(2, 3, 32, 32)
BLOCK_LINEARS = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
HEAD = 48 * 10 + 10


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10).eval()


def state(model: nn.Module):
    return [(n, type(m)) for n, m in model.named_modules()], {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("method, layers, adapter_params", [
    ("rlrr", BLOCK_LINEARS + ["patch_embed", "blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2",
                              "norm"], None),
    ("coeff", ["blocks.0.attn", "blocks.1.attn"], 2 * 3 * 3),  # α [H, H] per block
    ("siva", ["blocks.0.attn.qkv", "blocks.1.attn.qkv"], None),
    ("lora", BLOCK_LINEARS, 2 * 8 * ((144 + 48) + (48 + 48) + (192 + 48) + (48 + 192))),  # r (N + K) per layer
    ("ssf", ["patch_embed", "blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "norm"],
     6 * 2 * 48),
    ("bitfit", None, None),
])
def test_apply_methods(method, layers, adapter_params):
    model = tiny_vit()
    report = subspace_timm.apply(model, method, **({"backend": "cpu"} if method not in ("ssf", "bitfit") else {}))
    assert report.method == method and report.layers
    if layers is not None:
        assert sorted(report.layers) == sorted(layers)
    if adapter_params is not None:
        assert report.adapter_params == adapter_params
    assert report.other_trainable_params == HEAD  # only the head, trainable=("head",)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert "head" in trainable
    out = model(X)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_siva_tunes_q_and_v_of_the_fused_qkv():
    model = tiny_vit()
    subspace_timm.apply(model, "siva", backend="cpu")
    qkv = model.blocks[0].attn.qkv
    assert list(qkv.parts) == [48, 48, 48] and list(qkv.tuned_parts) == [0, 2]


def test_overrides_and_config_objects():
    model = tiny_vit()
    report = subspace_timm.apply(model, "lora", rank=4, trainable=(), backend="cpu")
    assert report.adapter_params == 2 * 4 * ((144 + 48) + (48 + 48) + (192 + 48) + (48 + 192))
    assert report.other_trainable_params == 0
    model = tiny_vit()
    report = subspace_timm.apply(model, methods.get_config("flora", rank=2, targets=("fc1",), backend="cpu"))
    assert report.layers == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]


@pytest.mark.integration
@pytest.mark.slow
def test_rlrr_and_coeff_vit_compiles_fullgraph_forward_and_backward():
    """The one compile test (slow): RLRR (rescaled q,k,v / proj / fc1 / fc2 + SSF) and Coeff head mixing in
    one ViT; torch.compile(fullgraph=True) gives the eager outputs and gradients. The backward runs
    ``head_mixing_attention_backward`` on q, k, v that are strided views of the fused qkv output, so it checks
    the op's fake kernel returns the strides the real kernel does."""
    model = tiny_vit()
    subspace_timm.apply(model, "rlrr", backend="cpu")
    subspace_timm.apply(model, "coeff", backend="cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    expected = model(X)
    expected.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    # no inductor caches: a cached graph would not see a change to an op's fake (meta) kernel
    import torch._inductor.config as inductor_config

    with inductor_config.patch(force_disable_caches=True):
        out = torch.compile(model, fullgraph=True)(X)
        out.square().mean().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_refuses_other_models_and_bad_configs_without_changing_the_model():
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        subspace_timm.apply(nn.Linear(3, 3), "lora")
    model = tiny_vit()
    before = state(model)
    with pytest.raises(ValueError, match="not a known method"):
        subspace_timm.apply(model, "no-such-method")
    with pytest.raises(ValueError, match="unknown lora config field"):
        subspace_timm.apply(model, "lora", rnak=4)
    with pytest.raises(ValueError, match="match no nn.Linear"):
        subspace_timm.apply(model, "lora", targets=("nothing",))
    assert state(model) == before


@pytest.mark.integration
@pytest.mark.parametrize("method", ["ssf", "rlrr"])
def test_convnext_channels_first_norms_get_ssf_over_channels(method):
    """timm's ConvNeXt ends with a LayerNorm2d on a [B, C, H, W] map: its SSF scales dim 1 (over the
    last dimension it would broadcast γ onto the width: an error, or silently wrong when W = C)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    base = timm.models.convnext.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = base(x)
    # Only the classifier is trained in full: with the default trainable=("head",) the head's final norm
    # is trained in full too, and gets no SSF (a module trained in full gets no adapter)
    model, _ = methods.apply(base, method, trainable=("head.fc",))
    head_ssf = model.head.norm
    assert isinstance(head_ssf, SSF) and head_ssf.channel_dim == 1
    block_ssfs = [m for n, m in model.named_modules() if isinstance(m, SSF) and n.startswith("stages")]
    assert block_ssfs and all(m.channel_dim == -1 for m in block_ssfs)  # ConvNeXt blocks norm channels-last
    if method == "ssf":
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, SSF):
                    m.gamma.fill_(1.0)
                    m.beta.zero_()
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
            for m in model.modules():
                if isinstance(m, SSF):
                    m.gamma.normal_(1.0, 0.3)
                    m.beta.normal_(0.0, 0.3)
    out = model(x)
    out.square().mean().backward()
    assert head_ssf.gamma.grad is not None and head_ssf.gamma.grad.abs().sum() > 0
    with torch.no_grad():
        merge_all(model)
        torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)
        unmerge_all(model)
        assert torch.equal(model(x), out)


@pytest.mark.integration
@pytest.mark.parametrize("first", ["ssf", "rlrr"])
def test_ssf_on_a_model_that_already_has_it_is_refused_without_change(first):
    """SSF shows its inner module's attributes (a patch embedding's ``proj`` among them): applying SSF
    again must see the SSF layers as adapted, not wrap them once more."""
    model = tiny_vit()
    methods.apply(model, first)
    before = state(model)
    with pytest.raises(ValueError, match="match no LayerNorm, RMSNorm or patch embedding"):
        methods.apply(model, "ssf")
    assert state(model) == before


# Small timm families beyond the plain ViT (random init, a few thousand parameters each).
FAMILIES = {
    "beit": ("beit_base_patch16_224", dict(depth=1, embed_dim=32, num_heads=2, img_size=32)),
    "eva02": ("eva02_tiny_patch14_224", dict(depth=1, embed_dim=32, num_heads=2, img_size=28)),
    "swinv2": ("swinv2_tiny_window8_256", dict(depths=(1, 1), num_heads=(1, 2), embed_dim=16, img_size=64,
                                               window_size=4)),
    "swin": ("swin_tiny_patch4_window7_224", dict(depths=(1, 1), num_heads=(1, 2), embed_dim=16, img_size=56)),
}


def family(name: str) -> tuple[nn.Module, torch.Tensor]:
    model_name, kwargs = FAMILIES[name]
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=5, **kwargs).eval()
    size = kwargs["img_size"]
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.integration
@pytest.mark.parametrize("method", ["rlrr", "lora", "ia3"])
@pytest.mark.parametrize("name", ["beit", "eva02", "swinv2"])
def test_qkv_with_separate_biases_runs_the_adapter(name, method):
    """BEiT, EVA and Swin-V2 attention compute F.linear(x, self.qkv.weight, [q_bias; k_bias; v_bias]),
    which would skip an adapter on ``qkv`` (no effect, no gradient). apply() makes them call the
    layer and add the biases after it: the adapter is in the forward, trains, and merges exactly."""
    model, x = family(name)
    blocks = [m for m in model.modules() if getattr(m, "q_bias", None) is not None]
    outputs = []  # every attention block's output (a tiny random Swin-V2's logits barely depend on them)
    for m in blocks:
        m.register_forward_hook(lambda _m, _i, out: outputs.append(out))

    def attention_outputs() -> torch.Tensor:
        outputs.clear()
        logits = model(x)
        return torch.cat([o.flatten() for o in outputs] + [logits.flatten()])

    with torch.no_grad():
        base = attention_outputs()
    methods.apply(model, method)
    assert blocks and all(m.qkv_bias_separate for m in blocks)
    if method != "rlrr":  # zero-init adapters: unchanged at attach (RLRR starts off identity, as in 000)
        torch.testing.assert_close(attention_outputs(), base, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ".qkv." in n:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    out = attention_outputs()
    assert (out - base).abs().max() > 1e-2 * base.abs().max()  # the adapter is in the forward
    out.square().sum().backward()
    for m in blocks:
        assert any(p.grad is not None and p.grad.abs().sum() > 0
                   for n, p in m.qkv.named_parameters() if p.requires_grad), type(m).__name__
    with torch.no_grad():
        # Unmerged evaluation is the reference for the exact round trip: without a gradient a layer
        # may take another path than the training call above (choose_path), rounding differently.
        unmerged = attention_outputs()
        torch.testing.assert_close(unmerged, out, rtol=1e-5, atol=1e-6)
        merge_all(model)
        torch.testing.assert_close(attention_outputs(), out, rtol=1e-5, atol=1e-5)  # RLRR's shift: qkv gets a bias
        unmerge_all(model)
        assert torch.equal(attention_outputs(), unmerged)


def test_a_layer_whose_weight_is_read_directly_is_refused():
    class ReadsWeight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.out = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.out(nn.functional.linear(x, self.lin.weight, self.lin.bias))

    model = ReadsWeight()
    before = state(model)
    with pytest.raises(ValueError, match=r"lin: ReadsWeight.forward reads self.lin.weight directly"):
        methods.apply(model, "lora", targets=("lin", "out"))
    assert state(model) == before
    methods.apply(model, "lora", targets=("out",))  # the layer it calls is fine
    transformers = pytest.importorskip("transformers")  # T5 reads self.wo.weight.dtype only: not refused
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4))
    assert len(methods.apply(t5, "lora", targets=("wo",))[1].layers) == 2


@pytest.mark.integration
@pytest.mark.parametrize("method, targets", [("ssf", None), ("rlrr", None), ("ssf", ("patch_embed",))])
@pytest.mark.parametrize("name", ["swin", "swinv2"])
def test_swin_ssf_after_the_patch_embedding_merges_exactly(name, method, targets):
    """Swin's patch embedding ends in a LayerNorm: SSF after it folds into that norm (folding into the
    projection before the norm changed the merged model's outputs by ~3e-2), and the default targets
    (patch_embed and patch_embed.norm) give one SSF there, not two in a row."""
    model, x = family(name)
    _, report = methods.apply(model, method, **({"targets": targets} if targets else {}))
    ssf_at_embedding = [n for n in report.layers if n.startswith("patch_embed")]
    assert ssf_at_embedding == (["patch_embed"] if targets else ["patch_embed.norm"])
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        out = model(x)
        merge_all(model)
        torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)
        unmerge_all(model)
        assert torch.equal(model(x), out)


# timm attention that computes with SDPA after its own q, k, v and mask: Coeff mixes the heads of that call.
COEFF_SDPA = {
    "swin": FAMILIES["swin"],
    "beit": FAMILIES["beit"],
    "eva02": FAMILIES["eva02"],
    "rope": ("vit_small_patch16_rope_224", dict(depth=1, embed_dim=32, num_heads=2, img_size=32)),
    "relpos": ("vit_relpos_small_patch16_224", dict(depth=1, embed_dim=32, num_heads=2, img_size=32)),
    "pvt_v2": ("pvt_v2_b0", dict(depths=(1, 1, 1, 1))),
    "tiny_vit": ("tiny_vit_5m_224", dict(depths=(1, 1, 1, 1))),
}


def _attention_outputs(model, x, modules):
    outputs = []
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in modules]
    logits = model(x)
    for h in handles:
        h.remove()
    return torch.cat([o.flatten() for o in outputs] + [logits.flatten()])


@pytest.mark.integration
@pytest.mark.parametrize("name", list(COEFF_SDPA))
def test_coeff_mixes_the_heads_of_timm_attention_that_calls_sdpa(name, monkeypatch):
    """Swin (windows, relative bias, shift mask), BEiT (relative bias), EVA and rope ViTs (rotary), ...:
    the copy runs the block's own forward with its SDPA call mixed. Reference: the original block
    with torch's SDPA replaced by the paper's formula."""
    model_name, kwargs = COEFF_SDPA[name]
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=5, **kwargs).eval()
    size = kwargs.get("img_size", 64)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model)
    blocks = [m for m in reference.modules() if hasattr(m, "fused_attn") and hasattr(m, "num_heads")]
    for m in blocks:
        m.fused_attn = True
    with torch.no_grad():
        base = _attention_outputs(reference, x, blocks)
    report = methods.apply(model, "coeff", backend="cpu")[1]
    adapted = [m for m in model.modules() if is_head_mixing(m)]
    assert len(report.layers) == len(adapted) == len(blocks)
    assert report.adapter_params == sum(m.num_heads ** 2 for m in blocks)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.head_mix.alpha" for n, m in model.named_modules() if is_head_mixing(m)} | \
        {n for n, _ in model.named_parameters() if n.startswith("head.")}  # α and the classifier only
    with torch.no_grad():
        torch.testing.assert_close(_attention_outputs(model, x, adapted), base, rtol=1e-5, atol=1e-5)  # α = 0
    g = torch.Generator().manual_seed(2)
    alphas = {h: 0.3 * torch.randn(h, h, generator=g) for h in {m.num_heads for m in blocks}}
    with torch.no_grad():
        for m in adapted:
            m.head_mix.alpha.copy_(alphas[m.num_heads])
    ours = _attention_outputs(model, x, adapted)
    ours.square().sum().backward()
    assert all(m.head_mix.alpha.grad is not None and m.head_mix.alpha.grad.abs().sum() > 0 for m in adapted)
    # a method applied next counts the block's own parameters (BEiT's q/v biases, Swin's bias table) as backbone
    _, bitfit = methods.apply(copy.deepcopy(model), "bitfit")
    assert bitfit.backbone_params == sum(p.numel() for p in reference.parameters())
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", papers_sdpa(alphas))
    with torch.no_grad():
        expected = _attention_outputs(reference, x, blocks)
    assert (expected - base).abs().max() > 1e-3 * base.abs().max()
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.integration
def test_coeff_keeps_the_attention_dropout_of_timm_attention_that_calls_sdpa(monkeypatch):
    """BEiT built with attn_drop_rate passes dropout_p to SDPA in training: the head-mixed call gets it
    (the fused backend drops what the reference drops for the same seed) and 0 in evaluation."""
    model_name, kwargs = FAMILIES["beit"]
    model = timm.create_model(model_name, pretrained=False, num_classes=5, attn_drop_rate=0.25, **kwargs)
    methods.apply(model, "coeff", backend="cpu")
    with torch.no_grad():
        for m in model.modules():
            if is_head_mixing(m):
                m.head_mix.alpha.normal_(0, 0.3)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    calls = recorded_dropout(monkeypatch)
    out = train_step_outputs(model, "cpu", 4, x)
    assert calls == [0.25]
    torch.testing.assert_close(out, train_step_outputs(model, "reference", 4, x), rtol=1e-5, atol=1e-5)
    calls.clear()
    model.eval()(x)
    assert calls == [0.0]


@pytest.mark.integration
def test_coeff_on_swin_compiles_pickles_and_unloads(tmp_path):
    model, x = family("swin")
    original = model.layers[0].blocks[0].attn
    original.fused_attn = False  # as under TIMM_FUSED_ATTN=0: the copy takes the SDPA path anyway
    base = model(x)
    wrapper = get_peft_model(model, ("coeff", {"backend": "cpu"}))
    assert "head_mix" not in original._modules and not original.fused_attn  # the original is untouched
    with torch.no_grad():
        for m in model.modules():
            if is_head_mixing(m):
                m.head_mix.alpha.normal_(0, 0.3)
    out = model(x)
    with wrapper.disable_adapter():
        assert torch.equal(model(x), base)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), out, rtol=1e-5, atol=1e-6)
    name = type(model.layers[0].blocks[0].attn).__name__
    torch.save(model, tmp_path / "model.pt")
    delattr(sdpa_head_mixing, name)  # as in a new process: unpickling makes the class again
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(loaded(x), out) and type(loaded.layers[0].blocks[0].attn).__name__ == name
    assert torch.equal(wrapper.unload()(x), base)
    assert not any(is_head_mixing(m) for m in model.modules())
    loaded.layers[0].blocks[0].attn.fused_attn = False  # the manual path: α would be ignored, so it raises
    with pytest.raises(RuntimeError, match="called F.scaled_dot_product_attention 0 times"):
        loaded(x)


@pytest.mark.integration
def test_coeff_refuses_attention_it_cannot_reproduce():
    """SAM's ViT and NesT merge the heads into another dimension of their SDPA call, Visformer has a
    convolutional qkv that used to be replaced by the plain-ViT layer (and broke in forward): refused,
    the model unchanged."""
    builds = {
        "vision_transformer_sam.Attention": lambda: timm.create_model(
            "samvit_base_patch16", pretrained=False, img_size=64, depth=2, embed_dim=32, num_heads=2,
            global_attn_indexes=(1,), neck_chans=16),
        "visformer.Attention": lambda: timm.create_model(
            "visformer_tiny", pretrained=False, num_classes=5, embed_dim=48, depth=(1, 1, 1), num_heads=2),
        "nest.Attention": lambda: timm.models.nest.Nest(img_size=32, embed_dims=(16, 32, 64), num_heads=(1, 2, 4),
                                                        depths=(1, 1, 1), num_classes=5),
    }
    for kind, build in builds.items():
        model = build()
        before = state(model)
        with pytest.raises(ValueError, match=rf"not timm\.models\.{kind}.*nothing was changed"):
            methods.apply(model, "coeff")
        assert state(model) == before


class _MixedMaps(nn.Module):
    """In place of a block's ``attn_drop`` (applied to the softmax maps P [B, H, N, N] just before
    ``P @ V``): P'_h = Σ_g (I + α)[h, g] P_g, so the block computes 003 eq. 11–12 with its own code."""

    def __init__(self, alpha: torch.Tensor) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return torch.einsum("hg,bgqk->bhqk", torch.eye(self.alpha.shape[0]) + self.alpha, maps)


@pytest.mark.integration
def test_coeff_on_swin_v2_cosine_attention_equals_its_own_code_with_mixed_maps(tmp_path):
    """Swin-V2 computes cosine attention by hand (no SDPA call); its copy runs the SDPA form of that
    forward. Reference: timm's own block with its probability maps mixed by I + α before P @ V,
    in shifted (masked) and unshifted windows."""
    model_name, kwargs = FAMILIES["swinv2"]
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=5, **(kwargs | dict(
        depths=(2, 2), num_heads=(2, 4)))).eval()  # the second block of a stage shifts its windows (a mask)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model)
    blocks = [m for m in reference.modules() if type(m).__name__ == "WindowAttention"]
    with torch.no_grad():
        base = _attention_outputs(reference, x, blocks)
    report = methods.apply(model, "coeff", backend="cpu")[1]
    adapted = [m for m in model.modules() if is_head_mixing(m)]
    assert len(report.layers) == len(adapted) == len(blocks) == 4 and report.adapter_params == 2 * (4 + 16)
    with torch.no_grad():
        torch.testing.assert_close(_attention_outputs(model, x, adapted), base, rtol=1e-5, atol=1e-5)  # α = 0
        for m in model.modules():
            if hasattr(m, "logit_scale"):  # far from the clamp; different per head
                m.logit_scale.copy_(torch.log(torch.linspace(3.0, 30.0, m.logit_scale.numel()).view_as(m.logit_scale)))
        for m in reference.modules():
            if hasattr(m, "logit_scale"):
                m.logit_scale.copy_(torch.log(torch.linspace(3.0, 30.0, m.logit_scale.numel()).view_as(m.logit_scale)))
    g = torch.Generator().manual_seed(2)
    for ours_block, block in zip(adapted, blocks):
        with torch.no_grad():
            ours_block.head_mix.alpha.copy_(0.3 * torch.randn(block.num_heads, block.num_heads, generator=g))
        block.attn_drop = _MixedMaps(ours_block.head_mix.alpha.detach().clone())
    ours = _attention_outputs(model, x, adapted)
    ours.square().sum().backward()
    assert all(m.head_mix.alpha.grad.abs().sum() > 0 for m in adapted)
    with torch.no_grad():
        expected = _attention_outputs(reference, x, blocks)
    assert sum(getattr(m, "attn_mask", None) is not None for m in model.modules()) == 2  # shifted windows
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-4, atol=1e-5)
    restored = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(_attention_outputs(restored, x, [m for m in restored.modules() if is_head_mixing(m)]),
                               ours.detach(), rtol=0, atol=0)


def _map_pooled_vit() -> nn.Module:
    """A ViT pooling with timm's AttentionPoolLatent (``global_pool="map"``, as SigLIP): ``attn_pool``, outside
    the task ``head``; its one latent query attends to the 16 patch tokens (Nq = 1 != Nk)."""
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=5, global_pool="map",
        class_token=False).eval()


@pytest.mark.integration
def test_coeff_mixes_the_heads_of_the_attention_pool():
    """Coeff-Tuning mixes the heads of timm's latent-query attention pooling too (by default it is neither
    trained, being outside ``head``, nor adapted otherwise): the output is unchanged at α = 0, α gets
    gradients, and with α set the model equals the original with SDPA replaced by the paper's formula.
    A pool that is itself trained in full (``trainable``) gets no α."""
    model = _map_pooled_vit()
    reference = copy.deepcopy(model)
    for m in reference.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = reference(x)
    report = subspace_timm.apply(model, "coeff", backend="cpu", dropout=0.1)
    assert sorted(report.layers) == ["attn_pool", "blocks.0.attn"] and is_head_mixing(model.attn_pool)
    assert report.adapter_params == 2 * 3 * 3 and report.other_trainable_params == 48 * 5 + 5
    assert (model.attn_pool.head_mix.dropout, model.attn_pool.head_mix.backend) == (0.1, "cpu")
    assert not model.attn_pool.head_mix.training  # the model's eval mode
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "blocks.0.attn.head_mix.alpha", "attn_pool.head_mix.alpha", "head.weight", "head.bias"}
    with torch.no_grad():
        torch.testing.assert_close(model(x), base, rtol=1e-5, atol=1e-6)  # α = 0
    alpha = 0.3 * torch.randn(3, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "head_mix"):
                m.head_mix.alpha.copy_(alpha)
    ours = model(x)
    ours.square().sum().backward()
    assert model.attn_pool.head_mix.alpha.grad.abs().sum() > 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", papers_sdpa(alpha))
        with torch.no_grad():
            expected = reference(x)
    with torch.no_grad():
        only_blocks = copy.deepcopy(model)
        only_blocks.attn_pool.head_mix.alpha.zero_()
        assert (only_blocks(x) - ours).abs().max() > 1e-3 * ours.abs().max()  # the pool's α matters
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-4, atol=1e-5)

    trained = _map_pooled_vit()
    report = subspace_timm.apply(trained, "coeff", trainable=("head", "attn_pool"))
    assert report.layers == ["blocks.0.attn"] and not is_head_mixing(trained.attn_pool)
    assert all(p.requires_grad for p in trained.attn_pool.parameters())
    # the registry and the PEFT-style wrapper take the same path (apply_coeff), not only timm.apply
    _, report = methods.apply(_map_pooled_vit(), "coeff")
    assert sorted(report.layers) == ["attn_pool", "blocks.0.attn"]
    wrapped = get_peft_model(_map_pooled_vit(), ("coeff", {"exclude": ("attn_pool",)}))
    assert not is_head_mixing(wrapped.base_model.attn_pool)
