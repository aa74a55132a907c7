"""RLRRLinear / ScaledLinear / SSF layers and apply_rlrr on a timm ViT."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from subspace_ops.adapters import apply_rlrr, merge_all, unmerge_all
from subspace_ops.nn import SSF, NotMergeableError, RLRRLinear, ScaledLinear

from conftest import backend_device, require_backend

KV_PARTS = {"splits": (4, 4, 4), "scaled_parts": (False, True, True)}
LAYERS = {
    "rlrr": lambda lin, b: RLRRLinear(lin, backend=b),
    "rlrr-qkv": lambda lin, b: RLRRLinear(lin, splits=(4, 4, 4), backend=b),
    "ssb": lambda lin, b: ScaledLinear.ssb(lin, backend=b),
    "ssl-right": lambda lin, b: ScaledLinear.ssl(lin, side="right", backend=b),
    "ia3": lambda lin, b: ScaledLinear.ia3(lin, backend=b),
    # A fused [q; k; v] with its key and value parts scaled (the registry's ia3 / ssl / ssb on a qkv).
    "ia3-qkv": lambda lin, b: ScaledLinear(lin, right=False, method="ia3", backend=b, **KV_PARTS),
    "ssl-qkv": lambda lin, b: ScaledLinear(lin, left=False, method="ssl", backend=b, **KV_PARTS),
    "ssb-qkv": lambda lin, b: ScaledLinear(lin, method="ssb", backend=b, **KV_PARTS),
}


def _perturb(layer: nn.Module) -> None:
    """Move trainable parameters away from their init so merge has something to fold."""
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_merge_unmerge_round_trip(backend, kind):
    device = backend_device(backend)
    base = nn.Linear(10, 12).to(device)
    original_weight, original_bias = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LAYERS[kind](base, backend)
    _perturb(layer)
    x = torch.randn(3, 5, 10, device=device)
    y = layer(x)
    layer.merge()
    assert layer.merged and "merged" in repr(layer)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert torch.equal(layer.weight, original_weight) and torch.equal(layer.bias, original_bias)
    torch.testing.assert_close(layer(x), y)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_trains_only_its_own_parameters(kind):
    layer = LAYERS[kind](nn.Linear(10, 12), None)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    layer(torch.randn(4, 10)).square().sum().backward()
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable and all(layer.get_parameter(n).grad is not None for n in trainable)
    assert layer.weight.grad is None
    assert f"method={kind.split('-')[0]}" in repr(layer) and "backend=" in repr(layer)


def test_scaled_layers_start_as_identity():
    base = nn.Linear(10, 12)
    x = torch.randn(4, 10)
    for make in (ScaledLinear.ssb, ScaledLinear.ssl, ScaledLinear.ia3):
        torch.testing.assert_close(make(copy.deepcopy(base))(x), base(x))


def test_rlrr_and_ssf_start_from_their_official_inits():
    """RLRR's scales: kaiming_uniform_(a=√5) of a [1, length] tensor, U(±1/√length) (official code);
    shift 0. SSF (Lian et al.'s code): γ ~ N(1, 0.02²), β ~ N(0, 0.02²). Wide layers, so that the
    sample's range and spread pin the distribution."""
    torch.manual_seed(0)
    layer = RLRRLinear(nn.Linear(3000, 2000))
    for scale, length in ((layer.s_l, 2000), (layer.s_r[0], 3000)):
        bound = length ** -0.5
        assert scale.abs().max() <= bound and scale.abs().max() > 0.99 * bound
        assert abs(scale.std().item() - bound / 3**0.5) < 0.05 * bound
    assert not layer.shift.any()
    ssf = SSF(nn.LayerNorm(4000), 4000)
    assert abs(ssf.gamma.mean().item() - 1) < 2e-3 and abs(ssf.gamma.std().item() - 0.02) < 2e-3
    assert abs(ssf.beta.mean().item()) < 2e-3 and abs(ssf.beta.std().item() - 0.02) < 2e-3


def test_fused_qkv_split_equals_three_separate_layers():
    """RLRRLinear(splits=(d,d,d)) on a fused qkv == separate RLRR q, k, v layers (paper's form)."""
    d = 6
    fused = nn.Linear(d, 3 * d, dtype=torch.float64)
    layer = RLRRLinear(fused, splits=(d, d, d), backend="reference")
    _perturb(layer)
    x = torch.randn(5, d, dtype=torch.float64)
    parts = []
    for j in range(3):
        rows = slice(j * d, (j + 1) * d)
        w, b = fused.weight[rows], fused.bias[rows]
        w_ft = w + layer.s_l[rows, None] * w * layer.s_r[j][None, :]
        parts.append(x @ w_ft.T + b + layer.shift[rows])
    torch.testing.assert_close(layer(x), torch.cat(parts, dim=-1))
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == 3 * (d + d + d)


@pytest.mark.parametrize("by_part", [True, False], ids=["by-part", "one-op"])
@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
@pytest.mark.parametrize("left, right", [(True, False), (False, True), (True, True)], ids=["ia3", "ssl", "ssb"])
def test_scaled_fused_qkv_scales_k_and_v_like_separate_layers(monkeypatch, left, right, backend_name, by_part):
    """ScaledLinear(splits=(d, d, d), scaled_parts=(False, True, True)) == a plain q projection next to
    s_l ⊙ W ⊙ s_rᵀ k and v layers, forward and gradients, in float64 on both of its forms: one op
    per part (float32/float64's default where an input scale is trained) and one rank-3 op (16-bit)."""
    require_backend(backend_name)
    monkeypatch.setattr(ScaledLinear, "_by_part", lambda self, dtype: by_part and self.s_r is not None)
    d = 6
    fused = nn.Linear(d, 3 * d, dtype=torch.float64)
    layer = ScaledLinear(fused, left=left, right=right, backend=backend_name, splits=(d, d, d),
                         scaled_parts=(False, True, True))
    _perturb(layer)
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == 2 * d * (left + right)
    x = torch.randn(2, 5, d, dtype=torch.float64, requires_grad=True)
    s_l = layer.s_l.detach().clone().requires_grad_(True) if left else None
    s_r = layer.s_r.detach().clone().requires_grad_(True) if right else None
    w, b = fused.weight.detach(), fused.bias.detach()
    expected = [x @ w[:d].T + b[:d]]  # q: the pretrained rows, untouched
    for j in (1, 2):
        rows = slice(j * d, (j + 1) * d)
        w_j = w[rows]
        if left:
            w_j = s_l[(j - 1) * d : j * d, None] * w_j
        if right:
            w_j = w_j * s_r[j - 1][None, :]
        expected.append(x @ w_j.T + b[rows])
    expected = torch.cat(expected, dim=-1)
    y = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    grad_y = torch.randn_like(y)
    trained = [t for t in (s_l, s_r) if t is not None]
    want = torch.autograd.grad(expected, [x, *trained], grad_y)
    got = torch.autograd.grad(y, [x, *[p for p in (layer.s_l, layer.s_r) if p is not None]], grad_y)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert "scaled_parts=(False, True, True)" in repr(layer)


def test_scaled_fused_qkv_bad_parts_name_the_argument():
    base = nn.Linear(4, 12)
    with pytest.raises(ValueError, match="scaled_parts must have one flag per split"):
        ScaledLinear(base, splits=(4, 4, 4), scaled_parts=(True, False))
    with pytest.raises(ValueError, match="scaled_parts .* at least one True"):
        ScaledLinear(base, splits=(4, 4, 4), scaled_parts=(False, False, False))
    with pytest.raises(ValueError, match="splits must be positive and sum to out_features=12"):
        ScaledLinear(base, splits=(4, 4))


def test_ssf_layernorm_and_linear_merge():
    for inner in (nn.LayerNorm(8), nn.Linear(5, 8)):
        ssf = SSF(inner, 8)
        x = torch.randn(3, 8 if isinstance(inner, nn.LayerNorm) else 5)
        y = ssf(x)
        torch.testing.assert_close(y, inner(x) * ssf.gamma + ssf.beta)
        w0, b0 = inner.weight.detach().clone(), inner.bias.detach().clone()
        ssf.merge()
        torch.testing.assert_close(ssf(x), y, rtol=1e-5, atol=1e-6)
        ssf.unmerge()
        assert torch.equal(inner.weight, w0) and torch.equal(inner.bias, b0)
    for no_bias in (nn.LayerNorm(8, elementwise_affine=False), nn.LayerNorm(8, bias=False), nn.RMSNorm(8)):
        ssf = SSF(no_bias, 8)
        assert not ssf.mergeable
        with pytest.raises(NotMergeableError, match="can only merge into a module with a weight and a bias"):
            ssf.merge()
        assert not ssf.merged


class LibraryRMSNorm(nn.Module):
    """A model library's own RMSNorm (as transformers' LlamaRMSNorm): recognized by its name."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class RMSBlock(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.input_layernorm = LibraryRMSNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.norm = nn.RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.q_proj(self.input_layernorm(x)))


@pytest.mark.parametrize("inner, dim, message", [
    (nn.LayerNorm(8), 16, "dim must be LayerNorm's output width 8, got 16"),
    (nn.Linear(4, 8), 4, "dim must be Linear's output width 8, got 4"),
    (nn.Conv2d(3, 8, 2), 3, "dim must be Conv2d's output width 8, got 3"),
    (nn.LayerNorm(8), 0, "dim must be a positive int"),
    (nn.LayerNorm(8), -1, "dim must be a positive int"),
    (nn.LayerNorm(8), 8.0, "dim must be a positive int"),
])
def test_ssf_checks_dim(inner, dim, message):
    with pytest.raises(ValueError, match=message):
        SSF(inner, dim)


def test_ssf_after_rms_norms_trains_and_refuses_merge_all():
    """RMSNorms (torch's and a library's own) get SSF; merge_all then refuses before merging anything,
    since β has no bias to go into, and leaves every weight as it was."""
    torch.manual_seed(0)
    model = RMSBlock()
    report = apply_rlrr(model, targets=("q_proj",), ssf_targets=("input_layernorm", "norm"), backend="reference")
    assert isinstance(model.input_layernorm, SSF) and isinstance(model.norm, SSF)
    assert report.adapter_params == 2 * (8 + 8) + (8 + 8 + 8)  # two SSFs (γ, β) + RLRR's s_l, s_r, shift
    x = torch.randn(3, 8)
    ssf = model.input_layernorm
    torch.testing.assert_close(ssf(x), ssf.inner(x) * ssf.gamma + ssf.beta)
    model(x).square().sum().backward()
    assert ssf.gamma.grad is not None and model.norm.beta.grad is not None
    before = {n: t.clone() for n, t in model.state_dict().items()}
    reason = r"nothing was merged.*LibraryRMSNorm has weight \(8,\) and bias None"
    with pytest.raises(NotMergeableError, match=reason):
        merge_all(model)
    assert not any(getattr(m, "merged", False) for m in model.modules())
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_ssf_targets_matching_no_norm_name_the_way_out():
    with pytest.raises(ValueError, match="match no LayerNorm, RMSNorm or patch embedding in RMSBlock.*ssf=False"):
        apply_rlrr(RMSBlock(), targets=("q_proj",), ssf_targets=("q_proj",))


class PatchEmbed(nn.Module):
    """A patch embedding with a bias-free projection (timm's with ``bias=False``, as its CLIP-style ViTs)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, kernel_size=4, stride=4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class OwnForwardConv(nn.Conv2d):
    """A Conv2d subclass with its own forward, which need not add a bias it was built without."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.weight, None, self.stride)


@pytest.mark.parametrize("inner", ["conv", "linear"])
def test_ssf_merges_into_a_bias_free_layer_by_giving_it_beta_and_unmerges_to_none(inner):
    """SSF after a bias-free Conv2d patch projection or Linear: merge folds γ into the weight and gives the
    layer β as a new (frozen) bias; unmerge restores the exact weight, bias None and the state_dict keys."""
    torch.manual_seed(0)
    module, x = (PatchEmbed(), torch.randn(2, 3, 8, 8)) if inner == "conv" else \
        (nn.Linear(5, 8, bias=False), torch.randn(3, 5))
    ssf = SSF(module, 8, fold_into="proj" if inner == "conv" else "")
    target = ssf.inner.get_submodule(ssf.fold_into)
    before = {k: t.clone() for k, t in ssf.state_dict().items()}
    with torch.no_grad():
        y = ssf(x)
        torch.testing.assert_close(y, module(x) * ssf.gamma + ssf.beta)
    assert ssf.mergeable
    merge_all(ssf)
    assert isinstance(target.bias, nn.Parameter) and not target.bias.requires_grad
    assert torch.equal(target.bias, ssf.beta.detach()) and target.bias.data_ptr() != ssf.beta.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(ssf(x), y, rtol=1e-5, atol=1e-6)
    unmerge_all(ssf)
    assert target.bias is None and "bias" in target._parameters
    after = ssf.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(ssf(x), y)


def test_ssf_refuses_a_bias_free_layer_with_its_own_forward_before_changing_it():
    conv = OwnForwardConv(3, 8, kernel_size=4, stride=4, bias=False)
    ssf = SSF(conv, 8)
    weight = conv.weight.detach().clone()
    assert not ssf.mergeable
    with pytest.raises(NotMergeableError, match=r"or a bias-free nn\.Linear / nn\.Conv2d.*OwnForwardConv has"):
        merge_all(ssf)
    assert not ssf.merged and conv.bias is None and torch.equal(conv.weight, weight)


def test_ssb_merge_is_exact_diag_product():
    base = nn.Linear(4, 3, dtype=torch.float64)
    layer = ScaledLinear.ssb(base)
    _perturb(layer)
    expected = torch.diag(layer.s_l) @ base.weight @ torch.diag(layer.s_r)
    merged_weight, _ = layer.merged_weight_and_bias()
    torch.testing.assert_close(merged_weight, expected)


timm = pytest.importorskip("timm")


def tiny_vit(**kw) -> nn.Module:
    cfg = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    cfg.update(kw)
    return timm.models.vision_transformer.VisionTransformer(**cfg)


def rlrr_param_count(dim: int, depth: int, mlp_ratio: int = 4) -> int:
    """RLRR on q, k, v, proj, fc1, fc2 (+ shifts) and SSF after norm1, norm2, patch embed, final norm."""
    hidden = mlp_ratio * dim
    per_linear = lambda n, k: n + k + n  # noqa: E731  s_l, s_r, shift
    block = 3 * per_linear(dim, dim) + per_linear(dim, dim) + per_linear(hidden, dim) + per_linear(dim, hidden)
    ssf = 2 * 2 * dim
    return depth * (block + ssf) + 2 * dim + 2 * dim


@pytest.mark.integration
def test_apply_rlrr_vit_b16_parameter_count():
    """ViT-B/16 built on the meta device (no weights): 288 768 RLRR parameters + the head.

    The paper reports 0.33 M on VTAB-1k, which includes the task heads (their size varies with the
    number of classes: 768·C + C): 288 768 + 0.04 M for a ~50-class head."""
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    report = apply_rlrr(model)
    assert report.adapter_params == rlrr_param_count(768, 12) == 288_768
    assert report.other_trainable_params == 768 * 100 + 100  # the head
    assert len(report.layers) == 12 * (4 + 2) + 2
    assert "288,768" in str(report)


@pytest.mark.integration
def test_apply_rlrr_tiny_vit_trains_merges_and_compiles(fused_backend):
    device = backend_device(fused_backend)
    model = tiny_vit().to(device).eval()
    x = torch.randn(2, 3, 32, 32, device=device)
    report = apply_rlrr(model, backend=fused_backend)
    assert report.adapter_params == rlrr_param_count(48, 2)
    assert isinstance(model.blocks[0].attn.qkv, RLRRLinear) and model.blocks[0].attn.qkv.splits == (48, 48, 48)
    assert isinstance(model.blocks[0].norm1, SSF) and isinstance(model.patch_embed, SSF)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    y = model(x)
    y.square().sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(model.get_parameter(n).grad is not None for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert merge_all(model) == len(report.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-4)
    assert unmerge_all(model) == len(report.layers)
    assert all(torch.equal(model.get_parameter(n), w) for n, w in frozen.items())

    if fused_backend == "cpu":  # the interpreter is too slow to trace a whole ViT under inductor
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), y.detach(), rtol=1e-4, atol=1e-4)


def test_apply_rlrr_errors():
    with pytest.raises(ValueError, match="match no nn.Linear"):
        apply_rlrr(nn.Sequential(nn.Conv2d(1, 1, 1)))
    with pytest.raises(ValueError, match="ssf_targets"):
        apply_rlrr(nn.Sequential(nn.Linear(2, 2)), targets=("0",))
    with pytest.raises(ValueError, match="fused_qkv"):
        apply_rlrr(nn.Sequential(nn.Linear(2, 2)), fused_qkv="maybe")
    with pytest.raises(ValueError, match="splits must"):
        RLRRLinear(nn.Linear(2, 6), splits=(2, 2))
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        RLRRLinear(nn.Conv2d(1, 1, 1))


@pytest.mark.integration
def test_apply_rlrr_to_a_transformers_roberta():
    transformers = pytest.importorskip("transformers")
    config = transformers.RobertaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40,
    )
    model = transformers.RobertaModel(config).eval()
    ids = torch.randint(0, 50, (2, 9))
    report = apply_rlrr(model, targets=("query", "key", "value", "dense"), ssf_targets=("LayerNorm",), trainable=())
    # per layer: q, k, v, attention.output.dense, intermediate.dense, output.dense; plus the pooler.
    assert sum(isinstance(m, RLRRLinear) for m in model.modules()) == 2 * 6 + 1
    assert sum(isinstance(m, SSF) for m in model.modules()) == 2 * 2 + 1  # + the embeddings' LayerNorm
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = model(ids).last_hidden_state
    out.square().sum().backward()
    assert model.encoder.layer[0].attention.self.query.s_l.grad is not None
    merge_all(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, out, rtol=1e-4, atol=1e-4)


def test_ssf_over_the_channels_of_a_channels_first_map():
    """SSF(channel_dim=1) after a norm of [B, C, H, W] maps scales and shifts the channels, merges into
    the norm's affine parameters and unmerges exactly; other channel dims are refused."""
    torch.manual_seed(0)

    class ChannelsFirstNorm(nn.LayerNorm):  # as timm's LayerNorm2d: normalize C of [B, C, H, W]
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    norm = ChannelsFirstNorm(6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
        norm.bias.normal_(0.0, 0.1)
    ssf = SSF(norm, 6, channel_dim=1)
    x = torch.randn(2, 6, 3, 5)  # W != C: a last-dimension SSF could not even broadcast
    expected = norm(x) * ssf.gamma[:, None, None] + ssf.beta[:, None, None]
    torch.testing.assert_close(ssf(x), expected)
    assert "channels first" in repr(ssf)
    ssf.merge()
    torch.testing.assert_close(ssf(x), expected, rtol=1e-5, atol=1e-6)
    ssf.unmerge()
    assert torch.equal(ssf(x), expected)
    with pytest.raises(ValueError, match="channel_dim must be -1"):
        SSF(norm, 6, channel_dim=2)


@pytest.mark.integration
@pytest.mark.parametrize("method", ["ssf", "rlrr"])
def test_clip_style_vit_bias_free_patch_embedding_merges_and_unmerges_exactly(method):
    """timm's CLIP-style ViTs (``pre_norm=True``) build the patch embedding without a bias; ssf and rlrr put
    SSF after it by default. merge_all merges it (β becomes the projection's bias) with the rest, and
    unmerge_all gives back the exact state_dict, the projection bias-free again."""
    from subspace_ops import timm as subspace_timm

    torch.manual_seed(0)
    model = tiny_vit(pre_norm=True).eval()
    assert model.patch_embed.proj.bias is None
    subspace_timm.apply(model, method, **({"backend": "cpu"} if method == "rlrr" else {}))
    assert isinstance(model.patch_embed, SSF)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    before = {k: t.clone() for k, t in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    merge_all(model)
    assert isinstance(model.patch_embed.inner.proj.bias, nn.Parameter)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)
    unmerge_all(model)
    assert model.patch_embed.inner.proj.bias is None
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
