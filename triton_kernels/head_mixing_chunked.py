"""Head-mixing attention in query chunks, for head counts the fused Triton kernels cannot hold.

The fused kernels (head_mixing_attention.py) keep every head of a query block on one SM: tiles of
HP · BLOCK_M · D. Compiled for sm_90 (scripts/triton_aot_check.py) they fit the 227 KiB of shared
memory of an H100/H200 up to HP · D = 1024 in bf16/fp16 (ViT-B/L, BERT, RoBERTa: 12 or 16 heads of 64;
8 heads of 128) and 512 in float32, and not beyond (16 heads of 80 or 128, 32 heads of 64 or 128:
LLaMA-7B); with an attention-mask tensor (padding masks: BERT, RoBERTa) only up to a quarter of
that. There the Triton backend runs this strategy instead, chosen by :func:`strategy`, which callers
can ask.

Same math and the same saved state as the fused kernels (only lse [2, B, H, Nq]), with cuBLAS products
on a chunk of query rows at a time: for rows c,

    S_g = scale · Q_g[c] K_gᵀ + mask     P_g = exp(S_g − L_g)     M_h = Σ_g mix[h, g] P_g
    O_h[c] = M_h V_h

and in the backward, recomputing P and M per chunk (T_h = dO_h[c] V_hᵀ, E_g = Σ_h mix[h, g] T_h):

    dV_h += M_hᵀ dO_h[c]     dmix[h, g] += Σ T_h ⊙ P_g     D_g = rowsum(P_g ⊙ E_g)
    dS_g = P_g ⊙ (E_g − D_g)     dQ_g[c] = scale · dS_g K_g     dK_g += scale · dS_gᵀ Q_g[c]

With dropout (p > 0), M and T of a chunk are multiplied by keep / (1 − p), the mask of
``reference.attention_dropout_keep`` for the chunk's rows (one more score-shaped temporary).

Memory: a few score-shaped [B, H, rows, Nk] float32 temporaries of one chunk, whose rows are chosen
so that each holds about as many elements as q (at least 16 rows): O(N) per head like the fused
kernels, with a larger constant. Scores and products are formed in float32 (bf16/fp16 operands,
float32 results on CUDA; float64 throughout for float64).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from .. import reference
from ._common import SM90_SHARED_MEMORY

__all__ = ["FUSED_LIMITS_BY_SHARED_MEMORY", "FUSED_MAX_ROW_BYTES", "FUSED_MAX_ROW_BYTES_MASKED", "chunk_rows",
           "chunked_backward", "chunked_forward", "lost_tolerance", "padded_sizes", "row_stats", "strategy"]

# Largest HP · BLOCK_D · element size (heads and head dim each padded to a power of two) whose fused
# kernels fit an sm_90 SM's shared memory (scripts/triton_aot_check.py): 1024 heads·dims in 16-bit
# dtypes, 512 in float32; twice that asks for about 290-330 KiB of the 227 KiB there is. With a mask
# tensor the dQ kernel stages mask tiles too: 8 heads of 64 in bf16 already ask for 240 KiB, 4 heads
# of 64 (or 8 of 32) for 60-90 KiB.
FUSED_MAX_ROW_BYTES = 2048
FUSED_MAX_ROW_BYTES_MASKED = 512
# The row-byte limits (unmasked, masked) by a GPU's shared memory per block, each checked by
# scripts/triton_aot_check.py: at least 161 KiB (H100/H200, A100: the dQ kernel's smallest config
# asks for 164,864 B at 2048 row bytes) the limits above; at least 99 KiB (sm_86/sm_89: L4, L40S,
# RTX 4090, A10) 512 either way (8 heads of 64 in bf16 already ask for 128 KiB there); less: none.
FUSED_LIMITS_BY_SHARED_MEMORY = ((164864, FUSED_MAX_ROW_BYTES, FUSED_MAX_ROW_BYTES_MASKED), (101376, 512, 512))


def padded_sizes(heads: int, dim: int) -> tuple[int, int]:
    """(HP, BLOCK_D): heads and head dim as the fused kernels' tiles hold them (powers of two, D >= 16)."""
    return triton.next_power_of_2(heads), max(16, triton.next_power_of_2(dim))


def strategy(heads: int, dim: int, dtype: torch.dtype, has_mask: bool = False,
             shared_memory: int = SM90_SHARED_MEMORY) -> str:
    """"fused" (the all-heads Triton kernels) or "chunked" (this module) for H heads of size dim,
    with or without an attention-mask tensor (is_causal alone needs none), on a GPU whose blocks may
    use ``shared_memory`` bytes (``_common.shared_memory(q)``; default: an H100's)."""
    padded_heads, padded_dim = padded_sizes(heads, dim)
    row_bytes = padded_heads * padded_dim * dtype.itemsize
    limit = next((masked if has_mask else unmasked for least, unmasked, masked in FUSED_LIMITS_BY_SHARED_MEMORY
                  if shared_memory >= least), 0)
    return "fused" if row_bytes <= limit else "chunked"


def chunk_rows(q: torch.Tensor, n_k: int) -> int:
    """Query rows per chunk: a [B, H, rows, Nk] tensor about as large as q, at least 16 rows."""
    n_q, dim = q.shape[2:]
    return max(1, min(n_q, max(16, (n_q * dim) // max(n_k, 1))))


def _scores(q_rows: torch.Tensor, k: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """q_rows @ kᵀ in acc (float32 results from 16-bit operands on CUDA, without upcasting them)."""
    if q_rows.is_cuda and q_rows.dtype in (torch.float16, torch.bfloat16):
        b, h = q_rows.shape[:2]
        out = torch.bmm(q_rows.flatten(0, 1), k.flatten(0, 1).transpose(1, 2), out_dtype=acc)
        return out.view(b, h, *out.shape[1:])
    return q_rows.to(acc) @ k.to(acc).transpose(-1, -2)


def lost_tolerance(acc: torch.dtype) -> float:
    """Below this, what max + log Σ lost to rounding (lost) is stored as 0: a few ulps, as the rounding of
    any row's L (so that the C++ kernels correct only rows where it matters)."""
    return 16 * torch.finfo(acc).eps


def row_stats(s: torch.Tensor) -> torch.Tensor:
    """[2, ...] (L, lost) of scores s [..., Nk] (see head_mixing_attention.py's docstring): L = +inf and
    lost = 0 on rows with no finite score."""
    row_max = s.amax(dim=-1) if s.shape[-1] else s.new_full(s.shape[:-1], float("-inf"))
    seen = row_max > float("-inf")
    shift = torch.where(seen, row_max, torch.zeros_like(row_max))
    log_sum = torch.log(torch.exp(s - shift[..., None]).sum(-1).clamp_min(torch.finfo(s.dtype).tiny))
    lse = torch.where(seen, shift + log_sum, torch.full_like(shift, float("inf")))
    lost = torch.where(seen, (shift - lse) + log_sum, torch.zeros_like(shift))
    return torch.stack([lse, torch.where(lost.abs() > lost_tolerance(s.dtype), lost, torch.zeros_like(lost))])


def _probabilities(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor], lse_rows: Optional[torch.Tensor],
                   r0: int, r1: int, is_causal: bool, scale: float, acc: torch.dtype):
    """(P, lse [2, B, H, rows]) for query rows [r0, r1): P = exp((S − L) − lost), L = +inf on rows that see
    no key."""
    s = _scores(q[:, :, r0:r1], k, acc) * scale
    if mask is not None:
        s = s + mask[:, :, r0:r1].to(acc)
    if is_causal:
        rows = torch.arange(r0, r1, device=q.device)[:, None]
        cols = torch.arange(k.shape[2], device=q.device)[None, :]
        s = s.masked_fill(cols > rows, float("-inf"))
    if lse_rows is None:
        lse_rows = row_stats(s)
    return torch.exp((s - lse_rows[0][..., None]) - lse_rows[1][..., None]), lse_rows


def _mix_heads(mix: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """M_h = Σ_g mix[h, g] P_g for p [B, H, rows, Nk]."""
    return torch.einsum("hg,bgik->bhik", mix, p)


def _seed_value(dropout_p: float, seed: Optional[torch.Tensor]) -> int:
    return int(seed.item()) if dropout_p > 0.0 else 0  # one host read per call, not per chunk


def _dropout_scale(dropout_p: float, seed: int, q: torch.Tensor, n_k: int, r0: int, r1: int,
                   acc: torch.dtype) -> Optional[torch.Tensor]:
    """keep / (1 − p) for query rows [r0, r1) (reference.attention_dropout_keep's mask), or None."""
    if dropout_p <= 0.0:
        return None
    batch, heads, n_q, _ = q.shape
    keep = reference.attention_dropout_keep(seed, dropout_p, batch, heads, n_q, n_k, rows=(r0, r1), device=q.device)
    return keep.to(acc) / (1.0 - dropout_p)


def chunked_forward(q, k, v, mix, mask, is_causal: bool, scale: float, dropout_p: float = 0.0, seed=None):
    """(out [B, H, Nq, D] in q's dtype, lse [2, B, H, Nq]) as head_mixing_attention_forward."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, n_q, dim = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(2, batch, heads, n_q, dtype=acc, device=q.device)
    mix_acc, v_acc = mix.to(acc), v.to(acc)
    seed = _seed_value(dropout_p, seed)
    step = chunk_rows(q, k.shape[2])
    for r0 in range(0, n_q, step):
        r1 = min(n_q, r0 + step)
        p, lse[..., r0:r1] = _probabilities(q, k, mask, None, r0, r1, is_causal, scale, acc)
        mixed = _mix_heads(mix_acc, p)
        drop = _dropout_scale(dropout_p, seed, q, k.shape[2], r0, r1, acc)
        if drop is not None:
            mixed = mixed * drop
        out[:, :, r0:r1] = (mixed @ v_acc).to(q.dtype)
    return out, lse


def chunked_backward(grad_out, q, k, v, mix, mask, lse, is_causal: bool, scale: float, dropout_p: float = 0.0,
                     seed=None):
    """(dq, dk, dv, dmix) as head_mixing_attention_backward."""
    acc = lse.dtype
    n_q = q.shape[2]
    mix_acc, k_acc, v_acc = mix.to(acc), k.to(acc), v.to(acc)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    dmix = torch.zeros(mix.shape, dtype=acc, device=mix.device)
    seed = _seed_value(dropout_p, seed)
    step = chunk_rows(q, k.shape[2])
    for r0 in range(0, n_q, step):
        r1 = min(n_q, r0 + step)
        p, _ = _probabilities(q, k, mask, lse[..., r0:r1], r0, r1, is_causal, scale, acc)
        do = grad_out[:, :, r0:r1].to(acc)
        mixed = _mix_heads(mix_acc, p)
        t = do @ v_acc.transpose(-1, -2)  # T_h = dO_h V_hᵀ
        drop = _dropout_scale(dropout_p, seed, q, k.shape[2], r0, r1, acc)
        if drop is not None:  # the mask on M (forward) and on T = ∂out/∂M
            mixed, t = mixed * drop, t * drop
        dv += mixed.transpose(-1, -2) @ do  # Mᵀ dO
        dmix += torch.einsum("bhik,bgik->hg", t, p)
        e = torch.einsum("hg,bhik->bgik", mix_acc, t)  # E_g = Σ_h mix[h, g] T_h
        ds = p * (e - (p * e).sum(-1, keepdim=True))
        dq[:, :, r0:r1] = (scale * (ds @ k_acc)).to(q.dtype)
        dk += scale * (ds.transpose(-1, -2) @ q[:, :, r0:r1].to(acc))
    return dq, dk.to(k.dtype), dv.to(v.dtype), dmix
