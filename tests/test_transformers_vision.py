"""transformers' vision towers (ViT, DeiT, DINOv2, CLIP and SigLIP vision models, built from configs):
the registry's methods apply with their default patterns (RLRR and SSF find these models' norm and
patch-embedding names; Coeff-Tuning finds attention modules that have no ``layer_idx``), train, and
merge back exactly where the method merges."""

from __future__ import annotations

import pytest
import torch

import subspace_ops.transformers
from subspace_ops import apply_coeff, methods
from subspace_ops.adapters import merge_all, unmerge_all
from subspace_ops.nn import HeadMix, SSF

from conftest import move_off_init

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")


def _set_backend(model, backend):
    for m in model.modules():
        if isinstance(m, HeadMix):
            m.backend = backend


def _vision_config(**options) -> dict:
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                patch_size=8, **options)


VISION_MODELS = {  # transformers vision towers: attention modules without layer_idx
    "vit": lambda: transformers.ViTModel(transformers.ViTConfig(**_vision_config())),
    "deit": lambda: transformers.DeiTModel(transformers.DeiTConfig(**_vision_config())),
    "dinov2": lambda: transformers.Dinov2Model(transformers.Dinov2Config(**_vision_config())),
    "clip-vision": lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**_vision_config())),
    "siglip-vision": lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**_vision_config())),
}


@pytest.mark.parametrize("name", list(VISION_MODELS))
def test_head_mixing(name):
    torch.manual_seed(0)
    model = VISION_MODELS[name]().eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    run = lambda: model(pixel_values=pixels).last_hidden_state  # noqa: E731
    with torch.no_grad():
        before = run()
    report = apply_coeff(model, backend="cpu")
    assert report.adapter_params == 2 * 4 * 4 and model.config._attn_implementation == "subspace_coeff"
    with torch.no_grad():
        torch.testing.assert_close(run(), before, rtol=1e-5, atol=1e-5)
        for m in model.modules():
            if isinstance(m, HeadMix):
                m.alpha.normal_(0, 0.3)
        _set_backend(model, "reference")
        expected = run()
        _set_backend(model, "cpu")
    fused = run()
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(fused, before, atol=1e-3)
    fused.square().mean().backward()
    assert all(m.alpha.grad.abs().sum() > 0 for m in model.modules() if isinstance(m, HeadMix))
    assert subspace_ops.transformers.detach_head_mix(model) == 2
    with torch.no_grad():
        torch.testing.assert_close(run(), before)



@pytest.mark.parametrize("method", ["rlrr", "ssf", "lora", "siva", "ia3"])
@pytest.mark.parametrize("name", list(VISION_MODELS))
def test_registry_methods_train_and_merge(name, method):
    torch.manual_seed(0)
    model = move_off_init(methods.apply(VISION_MODELS[name]().eval(), method)[0])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def run() -> torch.Tensor:  # every output: SigLIP's pooling head (trained by default) feeds only the pooler
        out = model(pixel_values=pixels)
        return torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])

    if method in ("rlrr", "ssf"):
        # 2 blocks x 2 norms + the final norm + the patch embedding (ViT, DeiT, DINOv2) or CLIP's pre-norm
        # (CLIP's and SigLIP's patch embeddings are bare Conv2d, [B, C, H, W] out). SigLIP's pooling head is
        # trained in full (``head``, a default trainable pattern), so its norm and MLP get no adapter.
        assert sum(isinstance(m, SSF) for m in model.modules()) == (5 if name == "siglip-vision" else 6)
    for head in [m for n, m in model.named_modules() if n.rpartition(".")[2] == "head"]:  # SigLIP's
        assert not any(type(m).__module__.startswith("subspace_ops") for m in head.modules())
        assert all(p.requires_grad for p in head.parameters())
    out = run()
    out.square().mean().backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(model.get_parameter(n).grad is not None for n in trained), trained
    with torch.no_grad():
        # Unmerged evaluation is the reference for the exact round trip: without a gradient a layer
        # may take another path than the training call above (choose_path), rounding differently.
        unmerged = run()
        torch.testing.assert_close(unmerged, out, rtol=1e-5, atol=1e-6)
        merge_all(model)
        torch.testing.assert_close(run(), out, rtol=1e-4, atol=1e-5)
        unmerge_all(model)
        assert torch.equal(run(), unmerged)
