"""timm models beyond the plain ViT: the layouts and module kinds the default patterns meet there (fused
q, k, v laid out per head, timm's RmsNorm, a fused key/value projection, DeiT's distillation head, a patch
embedding called with keyword arguments)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from subspace_ops import methods
from subspace_ops.adapters import fused_qkv_splits, merge_all
from subspace_ops.nn import SSF, ScaledLinear

from conftest import move_off_init

pytestmark = pytest.mark.integration
timm = pytest.importorskip("timm")


class _PerHeadAttention(nn.Module):
    """TinyViT's layout: the fused projection's output is split into q, k, v within each head."""

    def __init__(self, dim: int = 16, num_heads: int = 2) -> None:
        super().__init__()
        self.num_heads, self.key_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([self.key_dim] * 3, dim=3)
        return (q.softmax(-1) * k + v).flatten(2)


class _BlocksFirstAttention(_PerHeadAttention):
    """timm's ViT layout: [q; k; v] blocks, then heads."""

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).unbind(2)
        return (q.softmax(-1) * k + v).flatten(2)


def test_qkv_laid_out_per_head_is_refused_not_split_into_wrong_thirds():
    """A split into three row blocks would scale (IA)³'s 'keys and values' on rows that are partly
    queries; it is refused, naming the layer and the way out (fused_qkv='shared')."""
    for attention, per_head in ((_PerHeadAttention(), True), (_BlocksFirstAttention(), False)):
        model = nn.Module()
        model.attn = attention
        if per_head:
            with pytest.raises(ValueError, match="attn.qkv: _PerHeadAttention lays its fused q, k, v out per head"):
                fused_qkv_splits(model, "attn.qkv", attention.qkv)
        else:
            assert fused_qkv_splits(model, "attn.qkv", attention.qkv) == (16, 16, 16)
    head_first = _BlocksFirstAttention()
    head_first.head_first = True  # timm's MaxViT/CoAtNet *_rw attention: the same class, laid out per head
    model = nn.Module()
    model.attn = head_first
    with pytest.raises(ValueError, match="per head"):
        fused_qkv_splits(model, "attn.qkv", head_first.qkv)


def test_tiny_vit_qkv_is_refused_for_split_methods_and_adapted_whole_when_shared():
    torch.manual_seed(0)
    model = timm.create_model("tiny_vit_5m_224", pretrained=False, num_classes=4, depths=(1, 1, 1, 1)).eval()
    with pytest.raises(ValueError, match="lays its fused q, k, v out per head"):
        methods.apply(model, "ia3")
    assert not any(isinstance(m, ScaledLinear) for m in model.modules())  # refused before any change
    model, report = methods.apply(model, "ia3", fused_qkv="shared")
    assert all(len(m.splits) == 1 for m in model.modules() if isinstance(m, ScaledLinear))  # one part each
    assert any(n.endswith("attn.qkv") for n in report.layers)


def test_timm_rms_norms_get_ssf_over_their_channels():
    from timm.layers import RmsNorm, RmsNorm2d

    torch.manual_seed(0)
    model = nn.Module()
    model.norm1, model.norm2 = RmsNorm(8), RmsNorm2d(8)
    model.forward = lambda x: model.norm2(model.norm1(x.movedim(1, -1)).movedim(-1, 1))
    x = torch.randn(2, 8, 3, 5)
    model, report = methods.apply(model, "ssf")
    assert report.layers == ["norm1", "norm2"]
    assert (model.norm1.channel_dim, model.norm2.channel_dim) == (-1, 1)
    with torch.no_grad():
        for m in (model.norm1, model.norm2):
            m.gamma.normal_(1.0, 0.3)
            m.beta.normal_(0.0, 0.3)
        norm1, norm2 = model.norm1.inner, model.norm2.inner
        expected = norm2(norm1(x.movedim(1, -1)).movedim(-1, 1) * model.norm1.gamma.view(-1, 1, 1)
                         + model.norm1.beta.view(-1, 1, 1))
        expected = expected * model.norm2.gamma.view(-1, 1, 1) + model.norm2.beta.view(-1, 1, 1)
        torch.testing.assert_close(model(x), expected)


def test_ssf_passes_keyword_arguments_to_the_module_it_wraps():
    """Hiera calls ``patch_embed(x, mask=...)``."""
    class PatchEmbed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Conv2d(3, 8, 4, 4)

        def forward(self, x, mask=None):
            y = self.proj(x).flatten(2).transpose(1, 2)
            return y if mask is None else y * mask

    model = nn.Module()
    model.patch_embed = PatchEmbed()
    model, _ = methods.apply(model, "ssf", targets=("patch_embed",))
    layer = model.patch_embed
    x, mask = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 0.0, 1.0, 1.0]).view(1, 4, 1)
    expected = layer.inner.proj(x).flatten(2).transpose(1, 2) * mask * layer.gamma + layer.beta
    torch.testing.assert_close(layer(x, mask=mask), expected)


def test_hiera_trains_with_ssf():
    torch.manual_seed(0)
    model = timm.create_model("hiera_tiny_224", pretrained=False, num_classes=4, img_size=64, embed_dim=16,
                              num_heads=1, stages=(1, 1, 1, 1))
    model, report = methods.apply(model, "ssf")
    assert isinstance(model.patch_embed, SSF) and "patch_embed" in report.layers
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    assert model.patch_embed.gamma.grad is not None


def test_distilled_deit_trains_both_heads():
    """DeiT's prediction averages ``head`` and ``head_dist``: both are new and trained in full."""
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=4, img_size=32,
                              depth=1, embed_dim=32, num_heads=2)
    model, report = methods.apply(model, "lora")
    assert all(p.requires_grad for p in model.head_dist.parameters())
    assert report.other_trainable_params == 2 * (32 * 4 + 4)


@pytest.mark.parametrize("method", ["ia3", "lora"])
def test_fused_kv_projection_is_adapted(method):
    """PVT-v2's spatial-reduction attention projects q alone and [k; v] together (``kv``)."""
    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=4, depths=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    model, report = methods.apply(model, method)
    kv = [n for n in report.layers if n.endswith("attn.kv")]
    assert len(kv) == 4  # one per stage
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    move_off_init(model)
    out = model(x)
    with torch.no_grad():
        merge_all(model)
        torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


def test_relative_position_mlps_are_excluded_by_default_and_exclude_is_a_config_field():
    """relpos ViTs map 2-D offsets to biases with an MLP named fc1/fc2 (2 inputs): not a block projection,
    and below the Spectral Adapter's rank, which refused the whole model before."""
    torch.manual_seed(0)
    make = lambda: timm.create_model("vit_relpos_small_patch16_224", pretrained=False, num_classes=4,  # noqa: E731
                                     img_size=32, depth=2, embed_dim=32, num_heads=2)
    model, report = methods.apply(make(), "spectral")
    assert report.layers and not any("rel_pos" in n for n in report.layers)
    model, report = methods.apply(make(), "lora", exclude=("blocks.0",))
    assert report.layers and all(n.startswith("blocks.1.") for n in report.layers)
    with pytest.raises(ValueError, match="exclude must contain non-empty strings"):
        methods.get_config("lora", exclude=("",))


def test_swiglu_mlp_input_projections_are_targets():
    """EVA-02's SwiGLU MLP: fc1_g (gate) and fc1_x in place of fc1."""
    model = timm.create_model("eva02_base_patch14_224.mim_in22k", pretrained=False, num_classes=4, img_size=28,
                              depth=1, embed_dim=32, num_heads=2)
    model, report = methods.apply(model, "lora")
    assert {n.rpartition(".")[2] for n in report.layers} == {"q_proj", "k_proj", "v_proj", "proj", "fc1_g", "fc1_x",
                                                            "fc2"}


def test_coeff_names_the_unsupported_timm_attention_it_meets():
    """ConViT's GPSA (``qk``, ``v``) and the parallel-block ViT's fused ``in_proj`` are attention Coeff
    cannot mix: the refusal names the class (it used to say the model had no attention at all)."""
    for name, kwargs, kind in (("convit_tiny", dict(local_up_to_layer=2, embed_dim=48), "convit.GPSA"),
                               ("vit_base_patch16_xp_224", dict(embed_dim=64), "vision_transformer.ParallelScalingBlock")):
        model = timm.create_model(name, pretrained=False, num_classes=4, img_size=32, depth=2, num_heads=4, **kwargs)
        with pytest.raises(ValueError, match=f"not timm.models.{kind}"):
            methods.apply(model, "coeff")
