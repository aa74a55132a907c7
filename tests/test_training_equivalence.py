"""Training equivalence (issue #8): 50 AdamW steps of a tiny ViT on a synthetic task give the same
loss curve on the fused backend as on the reference (the papers' formulas), and the loss goes down."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from subspace_ops import adapters
from subspace_ops.nn import DoRALinear, LowRankLinear, ScaledLinear

timm = pytest.importorskip("timm")

STEPS = 50


def _replace(model: nn.Module, targets, make: Callable[[nn.Linear], nn.Module]) -> None:
    report, backbone = adapters._start_report(model, "test")
    for name, linear in adapters.find_modules(model, targets, nn.Linear):
        adapters.replace_module(model, name, make(linear))
    adapters._finish_report(model, report, backbone, ("head",))


def _randomize_lora(model: nn.Module) -> None:
    """LoRA's A starts at zero; give it values so the run exercises every gradient from step 1."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (LowRankLinear, DoRALinear)):
                m.lora_a.copy_(0.02 * torch.randn(m.lora_a.shape, generator=g))


METHODS: dict[str, Callable[[nn.Module, str], None]] = {
    "rlrr": lambda m, b: adapters.apply_rlrr(m, backend=b),
    "coeff": lambda m, b: adapters.apply_coeff(m, backend=b),
    "siva": lambda m, b: adapters.apply_svd(m, "siva", perc=0.9, backend=b),
    "svdiff": lambda m, b: adapters.apply_svd(m, "svdiff", backend=b),
    "ssb": lambda m, b: _replace(m, ("qkv", "proj", "fc1", "fc2"), lambda lin: ScaledLinear.ssb(lin, backend=b)),
    "flora": lambda m, b: (_replace(m, ("qkv", "proj"), lambda lin: LowRankLinear(lin, 4, g="full", backend=b)),
                           _randomize_lora(m)),
    "dora": lambda m, b: (_replace(m, ("qkv",), lambda lin: DoRALinear(lin, 4, backend=b)), _randomize_lora(m)),
}


def _loss_curve(method: str, backend: str) -> list[float]:
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    METHODS[method](model, backend)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (16,), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(STEPS):
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.integration
@pytest.mark.parametrize("method", sorted(METHODS))
def test_fused_training_matches_reference(method):
    fused = _loss_curve(method, "cpu")
    ref = _loss_curve(method, "reference")
    # fp32 kernels and reference round differently; over 50 Adam steps the curves may drift by a
    # few 1e-4 relative (measured <= 1.3e-5 here, RLRR). A wrong gradient shows up as 1e-2 and more.
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(ref), rtol=2e-3, atol=1e-4)
    assert fused[-1] < 0.8 * fused[0], f"{method}: loss {fused[0]:.3f} -> {fused[-1]:.3f} did not go down"
