"""Coeff-Tuning's head mixing (003; METHODS.md §3) as layers.

:class:`HeadMix` holds the trainable α [H, H] (zero init) and computes attention with the mixed
heads, ``O_h = Σ_g α'[h, g] P_g V_h`` with ``α' = I + Dropout(α)``, through
:func:`subspace_ops.head_mixing_attention`. At α = 0 the layer is exactly standard attention.

:class:`TimmCoeffAttention` replaces a timm ``Attention`` block (fused qkv). It takes over the
block's own submodules under their own names (``qkv``, ``proj``, ``q_norm``...), so state-dict
keys stay those of timm plus ``head_mix.alpha``, and the rescaled-linear layers of RLRR or SSF can
wrap ``qkv``/``proj`` before or after. For transformers models see
:func:`subspace_ops.adapters.apply_coeff`, which attaches a :class:`HeadMix` to each attention
module and routes the model through the attention-function registry. For diffusers models (the
UNets of Stable Diffusion / SDXL, 003 §5.2) :class:`CoeffAttnProcessor` is an attention processor
holding a :class:`HeadMix` (:mod:`subspace_ops.diffusers` sets it on every ``Attention`` running a
default processor; other supported processors get a routed copy, see
:mod:`subspace_ops.nn.sdpa_head_mixing`).

The paper's dropout on α (p = 0.1 when α is tuned with SSF) is ``HeadMix(dropout=p)``. The
backbone's own attention dropout (timm's ``attn_drop``, BERT's ``attention_probs_dropout_prob``,
BART's ``attention_dropout``) is kept, in training only, and applied where the backbone applies it:
to the map that multiplies V_h, which is now the mixed map M_h (``dropout_p`` of
:func:`~subspace_ops.head_mixing_attention`; the mask is drawn inside the fused kernels).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import reference
from ..ops.head_mixing_attention import head_mixing_attention
from .base import NotMergeableError

__all__ = ["CoeffAttnProcessor", "HeadMix", "TimmCoeffAttention", "repeat_kv_heads"]


def repeat_kv_heads(states: Tensor, heads: int) -> Tensor:
    """[B, H_kv, N, d] → [B, H, N, d] for grouped-query attention (each kv head serves H/H_kv heads), as
    the naive form does before mixing heads."""
    kv_heads = states.shape[1]
    if kv_heads == heads:
        return states
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} key/value heads")
    return states.repeat_interleave(heads // kv_heads, dim=1)


def _dropout_p(attn_drop: nn.Module, training: bool) -> float:
    """The probability of a timm block's ``attn_drop`` (an nn.Dropout, or Identity when it has none)
    while training, as timm passes it to SDPA; 0 in evaluation."""
    return float(attn_drop.p) if training and isinstance(attn_drop, nn.Dropout) else 0.0


class HeadMix(nn.Module):
    """α [H, H], zero init; ``forward(q, k, v, ...)`` = head-mixing attention with α' = I + Dropout(α).

    Not mergeable: it mixes the heads' attention maps, which no change of a weight reproduces, so
    :meth:`merge` (and :func:`~subspace_ops.adapters.merge_all` on a model holding one) raises
    :class:`~subspace_ops.nn.NotMergeableError`."""

    mergeable = False
    merged = False

    def __init__(self, num_heads: int, *, dropout: float = 0.0, backend: Optional[str] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.backend = backend
        self.alpha = nn.Parameter(torch.zeros(num_heads, num_heads, device=device, dtype=dtype or torch.float32))

    def mix(self) -> Tensor:
        """α' = I + Dropout(α) (dropout only in training)."""
        return reference.coeff_mix(self.alpha, self.dropout, self.training)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False, scale: Optional[float] = None, dropout_p: float = 0.0) -> Tensor:
        """``dropout_p``: the backbone's attention dropout, as the caller passes it to SDPA (0 in eval)."""
        return head_mixing_attention(q, k, v, self.mix(), attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                     dropout_p=dropout_p, backend=self.backend)

    def _not_mergeable(self) -> str:
        return "head mixing (coeff) acts on attention maps and has no weight form"

    def merge(self) -> None:
        raise NotMergeableError(f"{type(self).__name__} cannot be merged: {self._not_mergeable()}")

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, dropout={self.dropout}, backend={self.backend or 'auto'}"


class TimmCoeffAttention(nn.Module):
    """A timm ``Attention`` block with Coeff-Tuning's head mixing (see the module docstring)."""

    _SUBMODULES = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop")

    def __init__(self, attention: nn.Module, *, dropout: float = 0.0, backend: Optional[str] = None) -> None:
        super().__init__()
        missing = [name for name in ("qkv", "proj", "num_heads", "head_dim") if not hasattr(attention, name)]
        if missing:
            raise TypeError(f"attention must be a timm Attention block (fused qkv); {type(attention).__name__} "
                            f"lacks {missing}")
        self.num_heads = attention.num_heads
        self.head_dim = attention.head_dim
        self.attn_dim = getattr(attention, "attn_dim", self.num_heads * self.head_dim)
        self.scale = attention.scale
        for name in self._SUBMODULES:
            setattr(self, name, getattr(attention, name, None) or nn.Identity())
        self.gate = getattr(attention, "gate", None)
        weight = attention.qkv.weight
        self.head_mix = HeadMix(self.num_heads, dropout=dropout, backend=backend, device=weight.device)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = self.head_mix(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                          dropout_p=_dropout_p(self.attn_drop, self.training))
        x = x.transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class CoeffAttnProcessor(nn.Module):
    """A diffusers attention processor with Coeff-Tuning's head mixing.

    It computes what diffusers' default processors (``AttnProcessor2_0``, ``AttnProcessor``) compute
    for an ``Attention`` module (optional spatial and group norm, 4-D feature maps as tokens, q from
    ``hidden_states`` and k, v from ``encoder_hidden_states`` in cross attention, the module's
    additive mask, q/k norms, ``to_out``, residual and ``rescale_output_factor``) with the attention
    itself replaced by :func:`~subspace_ops.head_mixing_attention` at the module's ``scale``. As an
    ``nn.Module`` set with ``attn.set_processor``, it becomes the submodule ``processor`` of the
    attention module, so α is a parameter of the model (``...attn1.processor.head_mix.alpha``).
    ``replaced`` keeps the processor it replaced, which :func:`subspace_ops.diffusers.detach_head_mix`
    puts back (it is not a submodule: the defaults hold no tensors).
    """

    def __init__(self, num_heads: int, *, replaced: object, dropout: float = 0.0, backend: Optional[str] = None,
                 device=None) -> None:
        super().__init__()
        self.head_mix = HeadMix(num_heads, dropout=dropout, backend=backend, device=device)
        self.replaced = replaced

    def forward(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None, *args, **kwargs) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        feature_map = hidden_states.dim() == 4
        if feature_map:  # [B, C, H, W] → tokens [B, H·W, C]
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, key_tokens = context.shape[0], context.shape[1]
        if attention_mask is not None:  # diffusers' [B·H, 1 or Nq, Nk] additive mask → [B, H, ., Nk]
            attention_mask = attn.prepare_attention_mask(attention_mask, key_tokens, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = self.head_mix(query, key, value, attn_mask=attention_mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if feature_map:
            out = out.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def extra_repr(self) -> str:
        return f"replaced={type(self.replaced).__name__}"
