"""diffusers integration: Coeff-Tuning head mixing as an attention processor.

Coeff-Tuning's concept customization (003 §5.2) tunes α in every attention layer of the SDXL UNet
(together with LoRA or DoRA on the projections). diffusers' ``Attention`` modules (the UNets of
Stable Diffusion 1.x/2.x and SDXL, ``Transformer2DModel``, the VAE's mid-block attention) delegate
the attention computation to a swappable processor; :func:`attach_head_mix` sets a
:class:`~subspace_ops.nn.CoeffAttnProcessor` on each, which computes what diffusers' default
processor computes with the head-mixing op in place of SDPA (at α = 0 the output is unchanged).

Only modules running a default processor (``AttnProcessor2_0`` or ``AttnProcessor``) are adapted;
any other processor (fused q/k/v after ``fuse_qkv_projections()``, IP-Adapter, added-KV, a custom
one) is refused with its name, before anything changes, because its computation would be lost.
The model's weights are untouched; :func:`detach_head_mix` puts the replaced processors back.
LoRA on the projections composes with it: ``methods.apply(unet, "lora", targets=("to_q", "to_k",
"to_v", "to_out.0"))`` or PEFT's ``unet.add_adapter(LoraConfig(...))``, before or after.
"""

from __future__ import annotations

import sys
from typing import Optional

from torch import nn

from .nn.attention import CoeffAttnProcessor

__all__ = ["attach_head_mix", "attention_modules", "check_attachable", "detach_head_mix", "has_attention",
           "processors", "set_processors"]

_DEFAULT_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")


def _attention_class() -> Optional[type]:
    """diffusers' ``Attention`` class when diffusers is imported (a model of it exists only then)."""
    if "diffusers" not in sys.modules:
        return None
    from diffusers.models.attention_processor import Attention

    return Attention


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every diffusers ``Attention`` in ``model`` (whatever its processor)."""
    attention = _attention_class()
    if attention is None:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, attention)]


def has_attention(model: nn.Module) -> bool:
    """Whether ``model`` contains diffusers ``Attention`` modules."""
    return bool(attention_modules(model))


def check_attachable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules :func:`attach_head_mix` would adapt; raises if any cannot be."""
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"no diffusers Attention modules found in {type(model).__name__}")
    for name, module in modules:
        processor = module.processor
        if isinstance(processor, CoeffAttnProcessor):
            raise ValueError(f"{name} already has a head mix")
        if type(processor).__name__ not in _DEFAULT_PROCESSORS:
            hint = (" (call unfuse_qkv_projections() first)" if "Fused" in type(processor).__name__ else "")
            raise ValueError(f"{name}: runs {type(processor).__name__}, not one of diffusers' default processors "
                             f"{_DEFAULT_PROCESSORS}; head mixing would drop what it computes{hint}")
        if module.heads < 1 or module.to_q.out_features % module.heads:
            raise ValueError(f"{name}: {module.to_q.out_features} query features do not split into "
                             f"{module.heads} heads")
    return modules


def attach_head_mix(model: nn.Module, *, dropout: float = 0.0, backend: Optional[str] = None,
                    modules: Optional[list[tuple[str, nn.Module]]] = None) -> list[str]:
    """Set a zero-init :class:`CoeffAttnProcessor` on every attention module of ``model`` (or the
    given ``modules``, as returned by :func:`check_attachable`). Returns the module names. Checks
    everything before changing anything."""
    modules = check_attachable(model) if modules is None else modules
    for name, module in modules:
        processor = CoeffAttnProcessor(module.heads, replaced=module.processor, dropout=dropout, backend=backend,
                                       device=module.to_q.weight.device)
        processor.train(module.training)
        module.set_processor(processor)
    return [name for name, _ in modules]


def detach_head_mix(model: nn.Module) -> int:
    """Put back the processor each :class:`CoeffAttnProcessor` replaced. Returns how many."""
    count = 0
    for _, module in attention_modules(model):
        if isinstance(module.processor, CoeffAttnProcessor):
            module.set_processor(module.processor.replaced)
            count += 1
    return count


def processors(model: nn.Module) -> dict[str, object]:
    """Every attention module's current processor, by module name (to restore with :func:`set_processors`)."""
    return {name: m.processor for name, m in attention_modules(model)}


def set_processors(model: nn.Module, by_name: dict[str, object]) -> None:
    """Set the processors :func:`processors` returned (modules not named keep theirs)."""
    for name, module in attention_modules(model):
        if name in by_name and module.processor is not by_name[name]:
            module.set_processor(by_name[name])
