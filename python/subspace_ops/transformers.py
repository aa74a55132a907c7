"""Hugging Face transformers integration: Coeff-Tuning head mixing through the attention registry.

transformers (≥ 4.48; tested with 5.x) looks up every attention module's kernel by name in
``AttentionInterface``. :func:`register` adds ``"subspace_coeff"`` there (and SDPA's mask format
under the same name in ``AttentionMaskInterface``); :func:`attach_head_mix` gives each attention
module a :class:`~subspace_ops.nn.HeadMix` and switches the model to that implementation. This
covers BERT/RoBERTa-style encoders (padding masks), LLaMA-style decoders (causal, grouped-query
attention: k and v heads are repeated to the query heads, as the naive form does), cross
attention, and vision encoders (ViT, DeiT, DINOv2, CLIP and SigLIP towers). A module without a head
mix (e.g. one left out by the caller) runs torch SDPA through transformers' own ``sdpa`` function,
so the model stays usable.

The model's weights are untouched; :func:`detach_head_mix` removes the head mixes and restores the
previous attention implementation.

The registry is process state, not part of the model: a model pickled whole (``torch.save(model)``)
names ``"subspace_coeff"`` in its config but carries no registration. The head mixes attached here are
:class:`TransformersHeadMix`, which registers on unpickling, so ``torch.load(path, weights_only=False)``
in a fresh process gives a model that runs without importing anything first.
"""

from __future__ import annotations

import inspect
from typing import Optional

from torch import Tensor, nn

from .nn.attention import HeadMix, repeat_kv_heads

__all__ = ["ATTN_IMPLEMENTATION", "TransformersHeadMix", "attach_head_mix", "attention_modules",
           "coeff_attention_forward", "check_attachable", "detach_head_mix", "register"]

ATTN_IMPLEMENTATION = "subspace_coeff"


def coeff_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """The ``AttentionInterface`` function: [B, H, N, d] inputs → ([B, Nq, H, d], None)."""
    head_mix: Optional[HeadMix] = getattr(module, "head_mix", None)
    if head_mix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    for name in ("softcap", "s_aux", "sinks"):  # logit soft-capping, attention sinks: not in the op
        if kwargs.get(name) is not None:
            raise ValueError(f"head-mixing attention does not support {name} (its model's attention is not "
                             "softmax(scale·QKᵀ + mask)·V); use Coeff-Tuning on another model")
    heads = query.shape[1]
    key, value = repeat_kv_heads(key, heads), repeat_kv_heads(value, heads)
    is_causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    # As transformers' SDPA path: the causal flag only when no explicit mask carries the pattern
    # and there is more than one query (a single decode query sees every cached key).
    is_causal = bool(is_causal and attention_mask is None and query.shape[2] > 1)
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[2]]
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:  # T5's relative bias, ALiBi: one additive mask, as transformers' SDPA path
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias[..., : key.shape[2]], attention_mask, is_causal,
                                                   query, key)
        is_causal = False
    # transformers passes the module's attention dropout in training and 0.0 in evaluation.
    out = head_mix(query, key, value, attn_mask=attention_mask, is_causal=is_causal, scale=scaling,
                   dropout_p=float(dropout))
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"subspace_coeff"`` in transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, coeff_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


class TransformersHeadMix(HeadMix):
    """The :class:`~subspace_ops.nn.HeadMix` of a transformers attention module (same parameters and
    state-dict keys). The model finds the function that calls it by the name ``"subspace_coeff"`` in
    transformers' registries, which live in the process; unpickling one (``torch.load`` of a whole
    model, ``copy.deepcopy``) registers that name, so a pickled model runs in a fresh process. The
    hook sits here rather than on HeadMix, which timm and diffusers models also hold: only
    transformers models need the registry, and this module already depends on transformers."""

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        register()


def _calls_attention_interface(module: nn.Module) -> bool:
    """Whether the module's forward looks its kernel up in transformers' ``ALL_ATTENTION_FUNCTIONS``
    (the global name appears in its code), as every attention class of transformers 5 does."""
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of a transformers model that call the attention interface (self and cross):
    LLaMA/BERT/GPT-2-style layers, and vision encoders (ViT, DINOv2, CLIP, SigLIP), which have no
    ``layer_idx``."""
    return [
        (name, m) for name, m in model.named_modules()
        if hasattr(m, "config") and (
            _calls_attention_interface(m)
            or (all(hasattr(m, a) for a in ("scaling", "is_causal")) and hasattr(m, "layer_idx")))
    ]


def _num_heads(name: str, module: nn.Module) -> int:
    """Query heads of one attention module (its own attribute first: some models vary them by layer)."""
    for owner, attr in ((module, "num_attention_heads"), (module, "num_heads"), (module.config, "num_attention_heads")):
        heads = getattr(owner, attr, None)
        if isinstance(heads, int) and heads > 0:
            return heads
    raise ValueError(f"{name}: cannot tell its number of attention heads (no num_attention_heads / num_heads)")


def check_attachable(model: nn.Module, modules: Optional[list[tuple[str, nn.Module]]] = None
                     ) -> list[tuple[str, nn.Module]]:
    """The attention modules :func:`attach_head_mix` would adapt; raises if any cannot be."""
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if getattr(model, "_supports_sdpa", True) is False:  # e.g. GPT-OSS: attention sinks
        raise ValueError(f"{type(model).__name__} does not run on transformers' SDPA attention (its _supports_sdpa "
                         "is False); head mixing extends what SDPA computes, so it cannot stand in for that "
                         "model's attention")
    modules = attention_modules(model) if modules is None else modules
    if not modules:
        raise ValueError(f"no attention modules found in {type(model).__name__}")
    for name, module in modules:
        _num_heads(name, module)
        if getattr(module, "head_mix", None) is not None:
            raise ValueError(f"{name} already has a head mix")
    return modules


def attach_head_mix(
    model: nn.Module, *, dropout: float = 0.0, backend: Optional[str] = None,
    modules: Optional[list[tuple[str, nn.Module]]] = None,
) -> list[str]:
    """Give every attention module of ``model`` (or the given ``modules``) a zero-init
    :class:`TransformersHeadMix` and switch the model to ``"subspace_coeff"``. Returns the module
    names. Checks everything before changing anything."""
    modules = check_attachable(model, modules)
    register()
    previous = model.config._attn_implementation
    for name, module in modules:
        heads = _num_heads(name, module)
        device = next(module.parameters()).device
        module.head_mix = TransformersHeadMix(heads, dropout=dropout, backend=backend, device=device)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model._subspace_previous_attn = previous
    return [name for name, _ in modules]


def detach_head_mix(model: nn.Module) -> int:
    """Remove every HeadMix and restore the attention implementation used before. Returns how many."""
    count = 0
    for _, module in model.named_modules():
        if isinstance(getattr(module, "head_mix", None), HeadMix):
            del module.head_mix
            count += 1
    previous = getattr(model, "_subspace_previous_attn", None)
    if previous is not None:
        model.set_attn_implementation(previous)
        del model._subspace_previous_attn
    return count

