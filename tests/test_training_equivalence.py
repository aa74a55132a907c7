"""Training equivalence (issue #8): 50 AdamW steps of a tiny ViT on a synthetic task give the same
loss curve on the fused backend as on the reference (the papers' formulas), and the loss goes down."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from subspace_ops import adapters, methods
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
            for name, p in m.named_parameters(recurse=False):
                if name in ("lora_a", "up", "spectral_a") and not p.any():  # a zero-init factor
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))


# Hand-built variants next to the registry: a randomized-A DoRA and FLoRA, SSB on every linear.
CUSTOM: dict[str, Callable[[nn.Module, str], None]] = {
    "ssb-all-linears": lambda m, b: _replace(m, ("qkv", "proj", "fc1", "fc2"),
                                             lambda lin: ScaledLinear.ssb(lin, backend=b)),
    "flora-random-a": lambda m, b: (_replace(m, ("qkv", "proj"), lambda lin: LowRankLinear(lin, 4, g="full", backend=b)),
                                    _randomize_lora(m)),
    "dora-random-a": lambda m, b: (_replace(m, ("qkv",), lambda lin: DoRALinear(lin, 4, backend=b)),
                                   _randomize_lora(m)),
}
# Registry methods without a backend option (ssf, bitfit, the Houlsby adapter) run plain PyTorch
# layers: their fused and reference runs are the same code, so they are not listed.
REGISTRY = [name for name in methods.list_methods() if "backend" in methods.get_config(name).__dataclass_fields__]


def _adapt(method: str, model: nn.Module, backend: str) -> None:
    if method in CUSTOM:
        CUSTOM[method](model, backend)
    else:
        overrides = dict(perc=0.9) if method == "siva" else {}
        methods.apply(model, method, backend=backend, **overrides)
        if method in ("lora", "adalora", "trilora", "flora", "pa", "spectral"):
            _randomize_lora(model)


def _loss_curve(method: str, backend: str) -> list[float]:
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    _adapt(method, model, backend)
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
@pytest.mark.parametrize("method", REGISTRY + sorted(CUSTOM))
def test_fused_training_matches_reference(method):
    fused = _loss_curve(method, "cpu")
    ref = _loss_curve(method, "reference")
    # fp32 kernels and reference round differently; over 50 Adam steps the curves may drift by a
    # few 1e-4 relative (measured <= 1.3e-5 here, RLRR). A wrong gradient shows up as 1e-2 and more.
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(ref), rtol=2e-3, atol=1e-4)
    assert fused[-1] < 0.8 * fused[0], f"{method}: loss {fused[0]:.3f} -> {fused[-1]:.3f} did not go down"
