"""subspace_ops.timm.apply on timm VisionTransformers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import subspace_ops.timm as subspace_timm

timm = pytest.importorskip("timm")


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10).eval()


@pytest.mark.integration
@pytest.mark.parametrize("method, adapter_params", [
    ("coeff", 2 * 3 * 3),  # α [H, H] per block
    ("lora", None),
    ("rlrr", None),
    ("siva", None),
    ("ssf", None),
    ("bitfit", None),
])
def test_apply_methods(method, adapter_params):
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    report = subspace_timm.apply(model, method, **({} if method in ("ssf", "bitfit") else {"backend": "cpu"}))
    assert report.method == method and report.layers
    if adapter_params is not None:
        assert report.adapter_params == adapter_params
    assert report.other_trainable_params >= 48 * 10 + 10  # the head stays trainable
    out = model(x)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.integration
def test_adapted_vit_compiles():
    model = tiny_vit()
    subspace_timm.apply(model, "lora", backend="cpu")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-4)


def test_refuses_other_models_and_unknown_methods():
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        subspace_timm.apply(nn.Linear(3, 3), "lora")
    model = tiny_vit()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError):
        subspace_timm.apply(model, "no-such-method")
    assert before == {n: p.requires_grad for n, p in model.named_parameters()}
