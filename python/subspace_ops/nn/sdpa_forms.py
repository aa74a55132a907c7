"""Attention forwards rewritten around one SDPA call, for modules whose own forward computes the
attention by hand (so :mod:`subspace_ops.nn.sdpa_head_mixing` has no SDPA call to route).

Each form computes what the module's forward computes, with the softmax(scores + mask) · V step
expressed as ``F.scaled_dot_product_attention`` on the module's own q, k, v, additive mask and
scale; at α = 0 the head-mixing copy therefore reproduces the module (tested against the stock
module in tests/test_timm_apply.py). Keyed by ``(module, qualname)`` of the class.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SDPA_FORMS"]


def swin_v2_window_attention(self: nn.Module, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """timm's SwinTransformerV2 ``WindowAttention.forward``: cosine attention, ``q̂·k̂ᵀ`` times a per-head
    logit scale (clamped at 100), plus ``16·sigmoid`` of the continuous relative-position bias, plus
    the shifted-window mask. As SDPA: q̂ multiplied by its head's logit scale, scale 1, and the bias
    and mask summed into one additive [windows·B, H, N, N] mask (as timm's Swin-V1 builds its own)."""
    windows_batch, tokens, channels = x.shape
    if self.q_bias is None:
        qkv = self.qkv(x)
    else:
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            qkv = self.qkv(x) + qkv_bias
        else:
            qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
    q, k, v = qkv.reshape(windows_batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()  # [H, 1, 1]
    q, k = F.normalize(q, dim=-1) * logit_scale, F.normalize(k, dim=-1)

    bias_table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
    bias = bias_table[self.relative_position_index.view(-1)].view(tokens, tokens, -1).permute(2, 0, 1)
    attn_mask = 16 * torch.sigmoid(bias).unsqueeze(0)  # [1, H, N, N]
    if mask is not None:  # [windows, N, N], the same for every image of the batch
        windows = mask.shape[0]
        attn_mask = (attn_mask.unsqueeze(0) + mask.view(1, windows, 1, tokens, tokens)).expand(
            windows_batch // windows, -1, -1, -1, -1).reshape(windows_batch, self.num_heads, tokens, tokens)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype), scale=1.0)
    x = x.transpose(1, 2).reshape(windows_batch, tokens, channels)
    return self.proj_drop(self.proj(x))


SDPA_FORMS: dict[tuple[str, str], Callable[..., Tensor]] = {
    ("timm.models.swin_transformer_v2", "WindowAttention"): swin_v2_window_attention,
}
