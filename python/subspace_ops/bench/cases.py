"""Benchmark cases: each turns a shape into the variants compared side by side.

``rescaled-linear`` (RLRR, METHODS.md §1): our fused op; the papers' naive formula (materialize
``W ⊙ (1 + s_l s_rᵀ)``, then ``F.linear``); ``torch.compile`` of that formula; a frozen
``F.linear`` (the forward baseline); a full-fine-tuning linear (the fwd+bwd baseline); and PEFT
LoRA r=8 on the same layer when peft is installed. In every variant x requires grad, as for a
layer in the middle of a network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .harness import Variant

__all__ = ["CASES", "Case", "parse_shape"]

# name -> list of (M, K, N). "vit-b": ViT-B/16 at batch 64 (64·197 tokens), 768 -> 768.
SHAPE_PRESETS: dict[str, list[tuple[int, int, int]]] = {
    "vit-b": [(12608, 768, 768)],
    "vit-b-cpu": [(4096, 768, 768), (197, 768, 768)],  # the CPU targets' shapes
    "llama-7b": [(8192, 4096, 4096)],
}
DEFAULT_PRESET = {"cuda": ["vit-b", "llama-7b"], "cpu": ["vit-b-cpu"]}
DEFAULT_DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}


def parse_shape(text: str) -> list[tuple[int, int, int]]:
    """A preset name or ``M,K,N``."""
    if text in SHAPE_PRESETS:
        return SHAPE_PRESETS[text]
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"a shape is one of {sorted(SHAPE_PRESETS)} or M,K,N with positive integers, got {text!r}")
    m, k, n = (int(p) for p in parts)
    return [(m, k, n)]


@dataclass
class Case:
    name: str
    description: str
    variants: Callable[[tuple[int, int, int], torch.dtype, torch.device, Optional[str]], list[Variant]]
    baselines: dict[str, str]


def _peft_lora_variant(x, weight, bias, grad_output, rank: int) -> Variant:
    name = f"peft LoRA r={rank}"
    try:
        import peft
    except ImportError:
        return Variant(name, skip="skipped: peft not installed")
    layer = torch.nn.Sequential()
    layer.add_module("proj", torch.nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype))
    with torch.no_grad():
        layer.proj.weight.copy_(weight)
        layer.proj.bias.copy_(bias)
    model = peft.get_peft_model(layer, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"]))
    model.to(device=weight.device, dtype=weight.dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Variant(name, lambda: model(x), [x, *trainable], grad_output, backend="peft")


def rescaled_linear_variants(
    shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, backend: Optional[str]
) -> list[Variant]:
    import subspace_ops

    m, k, n = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    make = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)  # noqa: E731
    x = make(m, k).requires_grad_(True)
    weight = make(n, k, scale=k**-0.5)
    bias = make(n)
    s_l = make(n, scale=n**-0.5).requires_grad_(True)
    s_r = make(k, scale=k**-0.5).requires_grad_(True)
    shift = torch.zeros(n, device=device, dtype=dtype, requires_grad=True)
    grad_output = make(m, n)
    chosen = subspace_ops.resolve_backend(backend, device)

    def ours() -> torch.Tensor:
        return subspace_ops.rescaled_linear(x, weight, s_l, s_r, bias + shift, residual=True, backend=chosen)

    def naive() -> torch.Tensor:  # the seeds' formula: W' materialized, then a plain linear
        return F.linear(x, weight * (1 + s_l[:, None] * s_r[None, :]), bias + shift)

    variants = [
        Variant("subspace_ops", ours, [x, s_l, s_r, shift], grad_output, backend=chosen),
        Variant("naive", naive, [x, s_l, s_r, shift], grad_output, backend="torch"),
    ]
    try:
        compiled = torch.compile(naive)
        variants.append(Variant("naive+compile", compiled, [x, s_l, s_r, shift], grad_output, backend="inductor"))
    except Exception as exc:  # reported in the table, never silently dropped
        variants.append(Variant("naive+compile", skip=f"skipped: torch.compile unavailable ({exc})"))
    variants.append(Variant("frozen F.linear", lambda: F.linear(x, weight, bias), [x], grad_output, backend="torch"))
    full_weight = weight.clone().requires_grad_(True)
    full_bias = bias.clone().requires_grad_(True)
    variants.append(
        Variant("full FT", lambda: F.linear(x, full_weight, full_bias), [x, full_weight, full_bias], grad_output,
                backend="torch")
    )
    variants.append(_peft_lora_variant(x, weight, bias, grad_output, rank=8))
    return variants


CASES: dict[str, Case] = {
    "rescaled-linear": Case(
        "rescaled-linear",
        "RLRR y = x (W ⊙ (1 + s_l s_rᵀ))ᵀ + b + shift (METHODS.md §1)",
        rescaled_linear_variants,
        baselines={"forward": "frozen F.linear", "fwd+bwd": "full FT"},
    ),
}
