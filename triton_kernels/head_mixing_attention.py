"""Triton kernels of head-mixing attention (Coeff-Tuning, METHODS.md §3).

q [B, H, Nq, D], k and v [B, H, Nk, D], mix [H, H], an optional additive mask viewed as
[B, H, Nq, Nk], ``is_causal`` (SDPA's top-left triangle: query i sees keys j <= i):

    S_g = scale · Q_g K_gᵀ + mask        P_g = softmax(S_g) = exp(S_g − L_g)
    M_h = Σ_g mix[h, g] P_g              O_h = M_h V_h

A flash-style online softmax cannot be used as is: M_h needs every head's *normalized* P_g, so the
row log-sum-exp L_g must be known before any mixing. Hence two forward kernels:

- ``_lse_kernel``, one program per (batch, head, query block): L over key blocks with an online
  max/sum (FlashAttention's recurrence without the P·V product). A fully masked row gets L = +inf,
  so that exp(S − L) = 0 there and its output and gradients are 0, never NaN (and `lost`, below).
- ``_forward_kernel``, one program per (batch, query block) holding all H heads (padded to HP, the
  next power of two, with masks) in 3-D tiles [HP, BLOCK_M, ·]: over key blocks it recomputes
  P = exp(S − L) with a batched dot, mixes M = mix @ P ([HP, HP] @ [HP, BLOCK_M·BLOCK_N]) and
  accumulates O += M V (batched dot).

Backward, with T_h = dO_h V_hᵀ, E_g = Σ_h mix[h, g] T_h and D_g[i] = Σ_j P_g[i, j] E_g[i, j]:

    dS_g = P_g ⊙ (E_g − D_g)     dQ_g = scale · dS_g K_g      dK_g = scale · dS_gᵀ Q_g
    dV_h = M_hᵀ dO_h             dmix[h, g] = Σ_{b,i,j} P_g[i, j] T_h[i, j]

FlashAttention's D = rowsum(dO ⊙ O) does not hold once heads are mixed, so D takes its own pass:

- ``_backward_dq_kernel``, one program per (batch, query block), all heads: pass 1 over key blocks
  reduces D (written to a [B, H, Nq] scratch) and this block's share of dmix; pass 2 recomputes P,
  T, E and accumulates dQ. Each program writes its dmix partial [H, H] to its own slot of a
  [programs, H, H] buffer that torch sums afterwards: deterministic, no atomics.
- ``_backward_dkv_kernel``, one program per (batch, key block), all heads: over query blocks it
  recomputes P, T, E (in the transposed orientation [HP, BLOCK_N, BLOCK_M], so that no big tile is
  transposed) and accumulates dK and dV. Key-major for dK/dV and query-major for dQ, as in
  FlashAttention-2, so every output row has one owner and nothing needs atomics.

Where all heads of a block do not fit one SM (padded H x D above what ``strategy`` allows, as for
LLaMA-7B's 32 x 128), the wrappers run the chunked strategy of head_mixing_chunked.py instead.

Dropout (``dropout_p`` > 0, the backbone's attention dropout) scales M_h by a keep mask / (1 − p)
before it multiplies V_h. The mask is the counter-based hash of
``reference.attention_dropout_keep`` (``_dropout_scale``), recomputed from the seed wherever M or T
appears: the forward's M, the dQ kernel's T (then E = mixᵀ (mask ⊙ T), and dmix sums mask ⊙ T), the
dK/dV kernel's T and M. Nothing of it is stored.

Row statistics: ``lse`` [2, B, H, Nq] holds L = max + log Σ and what that sum lost to rounding,
lost = (max − L) + log Σ, kept where it exceeds a few ulps (:func:`lost_tolerance`), else 0; every
recomputation is P = exp((S − L) − lost). lost matters where the row max is so large that L == max: a
row whose every key carries a huge finite mask (transformers' ``finfo.min`` padding), where
exp(S − L) alone would give each of its n keys probability 1 instead of 1/n.

Memory: the forward saves only lse (besides the inputs); no [B, H, Nq, Nk] tensor exists
anywhere. The backward adds D [B, H, Nq] and the dmix partials [B · ceil(Nq / BLOCK_M), H, H].
lse, D, dmix and all accumulators are float32 (float64 for float64 inputs, to keep gradcheck's
precision). Every input is addressed through its strides; nothing is copied to make it contiguous.

Tiles: per program the live tiles grow with HP · BLOCK_M · D (Q, dO and the accumulators) and
HP · BLOCK_M · BLOCK_N (P, T, E, dS), so the row tiles are small (16/32) compared with
FlashAttention's: HP · BLOCK_M rows play the role of its BLOCK_M. On CUDA the tiles are autotuned
per (H, D, causal, mask, dtype) among configs pruned by a register estimate; under
``TRITON_INTERPRET=1`` (CPU tensors, tests) one fixed 16 × 16 tile is used, the smallest that
tl.dot accepts, which keeps the interpreter fast.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .. import reference
from . import _common
from ._common import accumulation_types as _acc, interpreting as _interpreting, matmul_precision as _precision
from .head_mixing_chunked import chunked_backward, chunked_forward, lost_tolerance, padded_sizes, strategy

__all__ = ["head_mixing_attention_backward", "head_mixing_attention_forward", "strategy"]


# ----------------------------------------------------------------------------------------------
# Helpers


@triton.jit
def _masked_scores(s, rows, cols, in_bounds, mask_ptrs, scale,
                   IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """scale · s + mask, and −inf where a score does not exist: out of range (padded heads, rows,
    keys) or above the causal diagonal. rows / cols are query / key indices broadcastable to s."""
    s = s * scale
    if HAS_MASK:
        s += tl.load(mask_ptrs, mask=in_bounds, other=0.0).to(s.dtype)
    keep = in_bounds
    if IS_CAUSAL:
        keep = keep & (cols <= rows)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _mix32(x):
    """reference._mix32 on uint32 (multiplications wrap mod 2³², shifts are logical)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _dropout_scale(seed_ptr, b, heads, rows, cols, H, NQ, threshold, dropout_p, ACC: tl.constexpr):
    """1 / (1 − p) where reference.attention_dropout_keep keeps entry (b, head, row, col), else 0;
    heads, rows, cols are index tensors broadcastable to the tile."""
    seed = tl.load(seed_ptr)  # int64 in [0, 2⁶²): truncation gives the low word, the shift the high
    row = ((b * H + heads) * NQ + rows).to(tl.uint32)  # mod 2³², as the reference
    key = _mix32(row ^ seed.to(tl.uint32)) ^ (seed >> 32).to(tl.uint32)
    bits = _mix32(cols.to(tl.uint32) ^ key)
    # 1 − p in float32 (p arrives as a float32 scalar), the division in ACC: exact for p = 2⁻ⁿ multiples.
    keep_scale = tl.full((), 1.0, ACC) / (1.0 - dropout_p)
    return tl.where(bits.to(tl.int64) >= threshold, keep_scale, 0.0)


@triton.jit
def _load_mix(mix_ptr, H, stride_row, stride_col, HP: tl.constexpr, ACC: tl.constexpr):
    """The [HP, HP] tile of mix (zero outside [H, H]); swapped strides give mixᵀ."""
    idx = tl.arange(0, HP)
    ok = (idx[:, None] < H) & (idx[None, :] < H)
    return tl.load(mix_ptr + idx[:, None] * stride_row + idx[None, :] * stride_col, mask=ok, other=0.0).to(ACC)


@triton.jit
def _mix_heads(w, x, HP: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
               MIX_DOT: tl.constexpr, MIX_PRECISION: tl.constexpr):
    """y[h] = Σ_g w[h, g] · x[g] for w [HP, HP] and x [HP, R, C], both in the accumulation dtype."""
    if MIX_DOT:
        # One [HP, HP] @ [HP, R·C] product on the tensor cores.
        y = tl.reshape(tl.dot(w, tl.reshape(x, (HP, R * C)), input_precision=MIX_PRECISION, out_dtype=x.dtype),
                       (HP, R, C))
    else:
        # tl.dot needs a reduction of >= 8 fp32 elements on CUDA: for HP <= 4 heads, an unrolled sum
        # of outer products (HP² · R · C FMAs, few for so few heads). x[g] is taken out of the 3-D
        # tile by a masked reduction over the head axis, as Triton tensors cannot be indexed.
        heads = tl.arange(0, HP)
        y = tl.zeros((HP, R, C), dtype=x.dtype)
        for g in tl.static_range(HP):
            x_g = tl.sum(tl.where(heads[:, None, None] == g, x, 0.0), axis=0)
            w_g = tl.sum(tl.where(heads[None, :] == g, w, 0.0), axis=1)
            y += w_g[:, None, None] * x_g[None, :, :]
    return y


@triton.jit
def _pair_sums(t, p, HP: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
               MIX_DOT: tl.constexpr, MIX_PRECISION: tl.constexpr):
    """z[h, g] = Σ_{r,c} t[h, r, c] · p[g, r, c] for t, p [HP, R, C]: a tile's share of dmix."""
    if MIX_DOT:
        z = tl.dot(tl.reshape(t, (HP, R * C)), tl.trans(tl.reshape(p, (HP, R * C))),
                   input_precision=MIX_PRECISION, out_dtype=t.dtype)
    else:  # as in _mix_heads, for HP <= 4
        heads = tl.arange(0, HP)
        z = tl.zeros((HP, HP), dtype=t.dtype)
        for h in tl.static_range(HP):
            t_h = tl.sum(tl.where(heads[:, None, None] == h, t, 0.0), axis=0)
            z_h = tl.sum(tl.sum(p * t_h[None, :, :], axis=2), axis=1)  # [HP] over g
            z += tl.where(heads[:, None] == h, z_h[None, :], 0.0)
    return z


# ----------------------------------------------------------------------------------------------
# Kernels. Programs are numbered along one grid axis, block index fastest, so that concurrent
# programs share a batch (and head) and re-read its K/V (or Q/dO) tiles from L2.


@triton.jit
def _lse_kernel(
    q_ptr, k_ptr, mask_ptr, lse_ptr,
    H, NQ, NK, D, scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_lp, stride_lb, stride_lh, stride_lm,
    BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LOST_TOLERANCE: tl.constexpr,
):
    # Program: one head h of batch b, query rows [pid_m·BLOCK_M, +BLOCK_M); 2-D tiles.
    num_m = tl.cdiv(NQ, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    bh = (pid // num_m).to(tl.int64)  # B·H·N·D may exceed 2³¹
    b, h = bh // H, bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols0 = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok, dim_ok = rows < NQ, dims < D
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    m_base = mask_ptr + b * stride_mb + h * stride_mh + rows[:, None] * stride_mm
    row_max = tl.full((BLOCK_M,), float("-inf"), ACC)
    row_sum = tl.zeros((BLOCK_M,), ACC)
    end = tl.minimum(NK, (pid_m + 1) * BLOCK_M) if IS_CAUSAL else NK  # skip blocks above the diagonal
    for n0 in range(0, end, BLOCK_N):
        cols = n0 + cols0
        col_ok = cols < NK
        k = tl.load(k_base + cols[:, None] * stride_kn + dims[None, :] * stride_kd,
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
        s = _masked_scores(s, rows[:, None], cols[None, :], row_ok[:, None] & col_ok[None, :],
                           m_base + cols[None, :] * stride_mn, scale, IS_CAUSAL, HAS_MASK)
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        # While a row has seen only −inf, subtract 0 instead: exp(−inf − (−inf)) would be NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
        row_max = new_max
    # A fully masked row (sum 0) gets +inf; log(1) keeps the discarded branch free of log(0).
    log_sum = tl.log(tl.where(row_sum > 0, row_sum, 1.0))
    lse = tl.where(row_sum > 0, row_max + log_sum, float("inf"))
    # What max + log Σ lost to rounding (all of log Σ when the max is a mask of finfo.min).
    lost = tl.where(row_sum > 0, (row_max - lse) + log_sum, 0.0)
    lost = tl.where(tl.abs(lost) > LOST_TOLERANCE, lost, 0.0)
    offsets = b * stride_lb + h * stride_lh + rows * stride_lm
    tl.store(lse_ptr + offsets, lse, mask=row_ok)
    tl.store(lse_ptr + stride_lp + offsets, lost, mask=row_ok)


@triton.jit
def _load_row_stats(lse_ptr, offsets, ok, stride_lp):
    """(L, lost) at ``offsets`` of lse[0] and lse[1]; L = +inf and lost = 0 where not ``ok`` (padded
    heads and rows: their P is exactly 0 and they add nothing)."""
    return (tl.load(lse_ptr + offsets, mask=ok, other=float("inf")),
            tl.load(lse_ptr + stride_lp + offsets, mask=ok, other=0.0))


@triton.jit
def _block_probs(q, lse, lost, k_base, v_base, m_base, cols, r3, head_ok, row_ok, dim_ok, NK, stride_kn, stride_vn,
                 stride_mn, scale, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
                 PRECISION: tl.constexpr):
    """K, V and P = exp((S − L) − lost) of a query block (q [HP, M, D], row log-sum-exp lse [HP, M] and
    what its rounding lost, lost [HP, M]) for the keys `cols`; score tiles are [HP, M, N]. The forward
    and both passes of the dQ kernel use it."""
    c_kv, c_s = cols[None, :, None], cols[None, None, :]  # key index in [HP, N, D] / [HP, M, N] tiles
    kv_ok = head_ok & (c_kv < NK) & dim_ok
    k = tl.load(k_base + c_kv * stride_kn, mask=kv_ok, other=0.0)
    v = tl.load(v_base + c_kv * stride_vn, mask=kv_ok, other=0.0)
    s = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision=PRECISION, out_dtype=ACC)
    s = _masked_scores(s, r3, c_s, head_ok & row_ok & (c_s < NK), m_base + c_s * stride_mn,
                       scale, IS_CAUSAL, HAS_MASK)
    return k, v, tl.exp((s - lse[:, :, None]) - lost[:, :, None])


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, mix_ptr, mask_ptr, lse_ptr, out_ptr, seed_ptr,
    H, NQ, NK, D, scale, threshold, dropout_p,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mixh, stride_mixg,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_lp, stride_lb, stride_lh, stride_lm,
    stride_ob, stride_oh, stride_om, stride_od,
    HP: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    MIX_DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, MIX_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program: all heads of batch b, query rows [pid_m·BLOCK_M, +BLOCK_M); tiles [HP, rows, ·].
    num_m = tl.cdiv(NQ, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    b = (pid // num_m).to(tl.int64)
    heads = tl.arange(0, HP)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols0 = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    h3, r3, d3 = heads.to(tl.int64)[:, None, None], rows[None, :, None], dims[None, None, :]
    head_ok, row_ok, dim_ok = h3 < H, r3 < NQ, d3 < D
    q_ok = head_ok & row_ok & dim_ok
    q = tl.load(q_ptr + b * stride_qb + h3 * stride_qh + r3 * stride_qm + d3 * stride_qd, mask=q_ok, other=0.0)
    # Padded heads and rows read L = +inf, so their P is exactly 0 and they add nothing to the mix.
    lse, lost = _load_row_stats(lse_ptr, b * stride_lb + heads[:, None] * stride_lh + rows[None, :] * stride_lm,
                                (heads[:, None] < H) & (rows[None, :] < NQ), stride_lp)
    w = _load_mix(mix_ptr, H, stride_mixh, stride_mixg, HP, ACC)  # w[h, g] = mix[h, g]
    k_base = k_ptr + b * stride_kb + h3 * stride_kh + d3 * stride_kd
    v_base = v_ptr + b * stride_vb + h3 * stride_vh + d3 * stride_vd
    m_base = mask_ptr + b * stride_mb + h3 * stride_mh + r3 * stride_mm
    acc = tl.zeros((HP, BLOCK_M, BLOCK_D), ACC)
    end = tl.minimum(NK, (pid_m + 1) * BLOCK_M) if IS_CAUSAL else NK
    for n0 in range(0, end, BLOCK_N):
        k, v, p = _block_probs(q, lse, lost, k_base, v_base, m_base, n0 + cols0, r3, head_ok, row_ok, dim_ok, NK,
                               stride_kn, stride_vn, stride_mn, scale, IS_CAUSAL, HAS_MASK, ACC, PRECISION)
        mixed = _mix_heads(w, p, HP, BLOCK_M, BLOCK_N, MIX_DOT, MIX_PRECISION)
        if DROPOUT:
            mixed *= _dropout_scale(seed_ptr, b, h3, r3, (n0 + cols0)[None, None, :], H, NQ, threshold, dropout_p,
                                    ACC)
        acc = tl.dot(mixed.to(v.dtype), v, acc, input_precision=PRECISION, out_dtype=ACC)
    tl.store(out_ptr + b * stride_ob + h3 * stride_oh + r3 * stride_om + d3 * stride_od,
             acc.to(out_ptr.dtype.element_ty), mask=q_ok)


@triton.jit
def _dq_block_products(q, do, wt, lse, lost, k_base, v_base, m_base, cols, h3, r3, head_ok, row_ok, dim_ok,
                       NK, stride_kn, stride_vn, stride_mn, scale, seed_ptr, b, H, NQ, threshold, dropout_p,
                       IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, HP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MIX_DOT: tl.constexpr, ACC: tl.constexpr,
                       PRECISION: tl.constexpr, MIX_PRECISION: tl.constexpr):
    """The dQ kernel's products for one key block (both of its passes recompute them): K,
    P = exp((S − L) − lost), T = dO Vᵀ (times the dropout mask / (1 − p)) and E_g = Σ_h mix[h, g] T_h."""
    k, v, p = _block_probs(q, lse, lost, k_base, v_base, m_base, cols, r3, head_ok, row_ok, dim_ok, NK, stride_kn,
                           stride_vn, stride_mn, scale, IS_CAUSAL, HAS_MASK, ACC, PRECISION)
    t = tl.dot(do, tl.permute(v, (0, 2, 1)), input_precision=PRECISION, out_dtype=ACC)
    if DROPOUT:
        t *= _dropout_scale(seed_ptr, b, h3, r3, cols[None, None, :], H, NQ, threshold, dropout_p, ACC)
    e = _mix_heads(wt, t, HP, BLOCK_M, BLOCK_N, MIX_DOT, MIX_PRECISION)
    return k, p, t, e


@triton.jit
def _backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, mix_ptr, mask_ptr, lse_ptr, delta_ptr, dq_ptr, dmix_part_ptr, seed_ptr,
    H, NQ, NK, D, scale, threshold, dropout_p,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mixh, stride_mixg,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_lp, stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    HP: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    MIX_DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, MIX_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program: all heads of batch b, query rows [pid_m·BLOCK_M, +BLOCK_M). Writes D for these rows
    # (read by _backward_dkv_kernel), dQ, and its dmix partial into slot pid.
    num_m = tl.cdiv(NQ, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    b = (pid // num_m).to(tl.int64)
    heads = tl.arange(0, HP)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols0 = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    h3, r3, d3 = heads.to(tl.int64)[:, None, None], rows[None, :, None], dims[None, None, :]
    head_ok, row_ok, dim_ok = h3 < H, r3 < NQ, d3 < D
    q_ok = head_ok & row_ok & dim_ok
    q = tl.load(q_ptr + b * stride_qb + h3 * stride_qh + r3 * stride_qm + d3 * stride_qd, mask=q_ok, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h3 * stride_doh + r3 * stride_dom + d3 * stride_dod,
                 mask=q_ok, other=0.0).to(q.dtype)
    hm_ok = (heads[:, None] < H) & (rows[None, :] < NQ)
    lse, lost = _load_row_stats(lse_ptr, b * stride_lb + heads[:, None] * stride_lh + rows[None, :] * stride_lm,
                                hm_ok, stride_lp)
    wt = _load_mix(mix_ptr, H, stride_mixg, stride_mixh, HP, ACC)  # wt[g, h] = mix[h, g]: E = wt @ T
    k_base = k_ptr + b * stride_kb + h3 * stride_kh + d3 * stride_kd
    v_base = v_ptr + b * stride_vb + h3 * stride_vh + d3 * stride_vd
    m_base = mask_ptr + b * stride_mb + h3 * stride_mh + r3 * stride_mm
    end = tl.minimum(NK, (pid_m + 1) * BLOCK_M) if IS_CAUSAL else NK

    # Pass 1: D_g = rowsum(P_g ⊙ E_g) and dmix[h, g] += Σ T_h ⊙ P_g over this block's rows.
    delta = tl.zeros((HP, BLOCK_M), ACC)
    dmix = tl.zeros((HP, HP), ACC)
    for n0 in range(0, end, BLOCK_N):
        k, p, t, e = _dq_block_products(q, do, wt, lse, lost, k_base, v_base, m_base, n0 + cols0, h3, r3, head_ok,
                                        row_ok, dim_ok, NK, stride_kn, stride_vn, stride_mn, scale, seed_ptr, b, H, NQ,
                                        threshold, dropout_p, IS_CAUSAL, HAS_MASK, DROPOUT, HP,
                                        BLOCK_M, BLOCK_N, MIX_DOT, ACC, PRECISION, MIX_PRECISION)
        delta += tl.sum(p * e, axis=2)
        dmix += _pair_sums(t, p, HP, BLOCK_M, BLOCK_N, MIX_DOT, MIX_PRECISION)
    tl.store(delta_ptr + (b * H + heads[:, None]) * NQ + rows[None, :], delta, mask=hm_ok)
    # Slot pid of the [programs, H, H] partials: every slot is written exactly once.
    tl.store(dmix_part_ptr + (pid.to(tl.int64) * H + heads[:, None]) * H + heads[None, :], dmix,
             mask=(heads[:, None] < H) & (heads[None, :] < H))

    # Pass 2: dQ_g = scale · (P_g ⊙ (E_g − D_g)) K_g, with P, T, E recomputed.
    dq = tl.zeros((HP, BLOCK_M, BLOCK_D), ACC)
    for n0 in range(0, end, BLOCK_N):
        k, p, t, e = _dq_block_products(q, do, wt, lse, lost, k_base, v_base, m_base, n0 + cols0, h3, r3, head_ok,
                                        row_ok, dim_ok, NK, stride_kn, stride_vn, stride_mn, scale, seed_ptr, b, H, NQ,
                                        threshold, dropout_p, IS_CAUSAL, HAS_MASK, DROPOUT, HP,
                                        BLOCK_M, BLOCK_N, MIX_DOT, ACC, PRECISION, MIX_PRECISION)
        ds = p * (e - delta[:, :, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION, out_dtype=ACC)
    tl.store(dq_ptr + b * stride_dqb + h3 * stride_dqh + r3 * stride_dqm + d3 * stride_dqd,
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_ok)


@triton.jit
def _backward_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, mix_ptr, mask_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, seed_ptr,
    H, NQ, NK, D, scale, threshold, dropout_p,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mixh, stride_mixg,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_lp, stride_lb, stride_lh, stride_lm,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    HP: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    MIX_DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, MIX_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program: all heads of batch b, keys [pid_n·BLOCK_N, +BLOCK_N). Score-shaped tiles are kept
    # transposed, [HP, keys, queries], so dK += dSᵀ Q and dV += Mᵀ dO need no tile transposes.
    num_n = tl.cdiv(NK, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % num_n
    b = (pid // num_n).to(tl.int64)
    heads = tl.arange(0, HP)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows0 = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    h3, c3, d3 = heads.to(tl.int64)[:, None, None], cols[None, :, None], dims[None, None, :]
    head_ok, col_ok, dim_ok = h3 < H, c3 < NK, d3 < D
    kv_ok = head_ok & col_ok & dim_ok
    k = tl.load(k_ptr + b * stride_kb + h3 * stride_kh + c3 * stride_kn + d3 * stride_kd, mask=kv_ok, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + h3 * stride_vh + c3 * stride_vn + d3 * stride_vd, mask=kv_ok, other=0.0)
    w = _load_mix(mix_ptr, H, stride_mixh, stride_mixg, HP, ACC)  # w[h, g] = mix[h, g]
    wt = _load_mix(mix_ptr, H, stride_mixg, stride_mixh, HP, ACC)  # wt[g, h] = mix[h, g]
    q_base = q_ptr + b * stride_qb + h3 * stride_qh + d3 * stride_qd
    do_base = do_ptr + b * stride_dob + h3 * stride_doh + d3 * stride_dod
    m_base = mask_ptr + b * stride_mb + h3 * stride_mh + c3 * stride_mn
    dk = tl.zeros((HP, BLOCK_N, BLOCK_D), ACC)
    dv = tl.zeros((HP, BLOCK_N, BLOCK_D), ACC)
    # Causal: only queries i >= the block's first key see it; start at that query block.
    start = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M if IS_CAUSAL else 0
    for m0 in range(start, NQ, BLOCK_M):
        rows = m0 + rows0
        r_q, r_s = rows[None, :, None], rows[None, None, :]  # query index in [HP, M, D] / [HP, N, M] tiles
        q_ok = head_ok & (r_q < NQ) & dim_ok
        q = tl.load(q_base + r_q * stride_qm, mask=q_ok, other=0.0)
        do = tl.load(do_base + r_q * stride_dom, mask=q_ok, other=0.0).to(q.dtype)
        hm_ok = (heads[:, None] < H) & (rows[None, :] < NQ)
        lse, lost = _load_row_stats(lse_ptr, b * stride_lb + heads[:, None] * stride_lh + rows[None, :] * stride_lm,
                                    hm_ok, stride_lp)
        delta = tl.load(delta_ptr + (b * H + heads[:, None]) * NQ + rows[None, :], mask=hm_ok, other=0.0)
        s = tl.dot(k, tl.permute(q, (0, 2, 1)), input_precision=PRECISION, out_dtype=ACC)  # Sᵀ
        s = _masked_scores(s, r_s, c3, head_ok & col_ok & (r_s < NQ), m_base + r_s * stride_mm,
                           scale, IS_CAUSAL, HAS_MASK)
        p = tl.exp((s - lse[:, None, :]) - lost[:, None, :])  # Pᵀ
        t = tl.dot(v, tl.permute(do, (0, 2, 1)), input_precision=PRECISION, out_dtype=ACC)  # Tᵀ
        if DROPOUT:
            kept = _dropout_scale(seed_ptr, b, h3, r_s, c3, H, NQ, threshold, dropout_p, ACC)  # [HP, N, M]
            t *= kept
        e = _mix_heads(wt, t, HP, BLOCK_N, BLOCK_M, MIX_DOT, MIX_PRECISION)  # Eᵀ
        ds = p * (e - delta[:, None, :])  # dSᵀ
        mixed = _mix_heads(w, p, HP, BLOCK_N, BLOCK_M, MIX_DOT, MIX_PRECISION)  # Mᵀ
        if DROPOUT:
            mixed *= kept
        dv = tl.dot(mixed.to(do.dtype), do, dv, input_precision=PRECISION, out_dtype=ACC)
        dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=PRECISION, out_dtype=ACC)
    tl.store(dk_ptr + b * stride_dkb + h3 * stride_dkh + c3 * stride_dkn + d3 * stride_dkd,
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_ok)
    tl.store(dv_ptr + b * stride_dvb + h3 * stride_dvh + c3 * stride_dvn + d3 * stride_dvd,
             dv.to(dv_ptr.dtype.element_ty), mask=kv_ok)


# ----------------------------------------------------------------------------------------------
# Launch configuration

# Interpreter (CPU tests): tl.dot needs every dimension >= 16 there; small tiles keep it fast.
_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}

# CUDA. The tiles below have not been tuned on hardware yet: they are a starting set sized so that
# HP · BLOCK_M · BLOCK_D accumulators have a chance to stay in registers, and the prune below drops
# the ones that obviously cannot. Autotuning is keyed on (H, D, causal, mask, dtype), not on the
# sequence lengths, so that varying lengths do not re-tune.
_KEY = ["H", "D", "IS_CAUSAL", "HAS_MASK", "DROPOUT"]
_LSE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 4)]
]
_HEADS_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(16, 16, 4, 2), (16, 16, 8, 2), (16, 32, 4, 2), (16, 32, 8, 2), (32, 16, 8, 2),
                         (32, 32, 8, 2), (16, 64, 8, 2), (32, 64, 8, 2)]
]
# The dQ kernel's BLOCK_M fixes the number of dmix partial slots, so it is chosen (by _dq_block_m),
# not tuned; only BLOCK_N, warps and stages are.
_DQ_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn, w, s in [(16, 4, 2), (16, 8, 2), (32, 4, 2), (32, 8, 2), (64, 8, 2)]
]
_REGS_PER_THREAD = 160  # fp32 values a thread may hold before spilling becomes likely (of 255)


def _live_values(hp: int, block_m: int, block_n: int, block_d: int) -> int:
    """Rough count of fp32 values one program holds: three [HP, M, D] tiles (Q, dO or O, an
    accumulator), four [HP, M, N] (P, T, E, dS) and two [HP, N, D] (K, V)."""
    return hp * (3 * block_m * block_d + 4 * block_m * block_n + 2 * block_n * block_d)


def _prune_by_registers(configs, named_args, **kwargs):
    """Keep the configs whose live tiles fit in the registers of their warps; if none does (large
    H · D), the ones with the smallest tiles, which spill least."""
    hp, block_d = kwargs["HP"], kwargs["BLOCK_D"]
    fixed_m = kwargs.get("BLOCK_M")

    def values(cfg):
        return _live_values(hp, fixed_m or cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], block_d)

    fitting = [c for c in configs if values(c) <= _REGS_PER_THREAD * 32 * c.num_warps]
    if fitting:
        return fitting
    smallest = min(values(c) for c in configs)
    return [c for c in configs if values(c) == smallest]


_lse_tuned = triton.autotune(_LSE_CONFIGS, key=_KEY)(_lse_kernel)
_forward_tuned = triton.autotune(
    _HEADS_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_by_registers})(_forward_kernel)
_backward_dq_tuned = triton.autotune(
    _DQ_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_by_registers})(_backward_dq_kernel)
_backward_dkv_tuned = triton.autotune(
    _HEADS_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_by_registers})(_backward_dkv_kernel)


def _dq_block_m(hp: int, block_d: int) -> int:
    """BLOCK_M of the dQ kernel on CUDA: 16 once HP · D reaches 1024 (ViT-B: 16 · 64), else 32."""
    return 16 if hp * block_d >= 1024 else 32


def _mix_precision(t: torch.Tensor) -> str:
    """Of the head-mixing products, whose operands are float32 probabilities. For 16-bit inputs TF32
    suffices: the mixed map is rounded to the 16-bit dtype before it multiplies V anyway."""
    if t.dtype in (torch.float16, torch.bfloat16) and _common.targets_gpu(t):
        return "tf32"
    return _precision(t)


def _strides4(t: torch.Tensor | None) -> tuple:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _common_meta(q: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, dropout_p: float) -> dict:
    hp, block_d = padded_sizes(q.shape[1], q.shape[3])
    return {
        "HP": hp,
        "BLOCK_D": block_d,
        "IS_CAUSAL": bool(is_causal),
        "HAS_MASK": mask is not None,
        "DROPOUT": dropout_p > 0.0,
        # A tl.dot over the head axis needs >= 8 fp32 elements of reduction on CUDA.
        "MIX_DOT": hp >= 8,
        "ACC": _acc(q)[0],
        "PRECISION": _precision(q),
        "MIX_PRECISION": _mix_precision(q),
    }


def _dropout_args(dropout_p: float, seed: torch.Tensor | None, unused: torch.Tensor) -> tuple:
    """(seed pointer, threshold, p) kernel arguments; ``unused`` stands in for the seed without dropout."""
    if dropout_p <= 0.0:
        return unused, 0, 0.0
    if seed is None or seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError("dropout_p > 0 needs seed, a one-element int64 tensor")
    return seed, reference.dropout_threshold(dropout_p), float(dropout_p)


def _check_mask(mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> None:
    if mask is None:
        return
    expected = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if tuple(mask.shape) != expected or not mask.is_floating_point():
        raise ValueError(f"mask must be an additive float tensor viewed as [B, H, Nq, Nk] = {list(expected)}, "
                         f"got {mask.dtype} {list(mask.shape)}")


# ----------------------------------------------------------------------------------------------
# Launch wrappers


def _runs_chunked(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether a call on q [B, H, N, d] takes the chunked strategy: on a GPU whose shared memory cannot
    hold all heads of a query block (:func:`strategy`); the interpreter runs the fused kernels on any shape."""
    if _interpreting(q):
        return False
    return strategy(q.shape[1], q.shape[3], q.dtype, mask is not None, _common.shared_memory(q)) == "chunked"


@_common.launches_on_device_of
def head_mixing_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mix: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, Nq, D] in q's dtype, lse [2, B, H, Nq]) for q [B, H, Nq, D], k, v [B, H, Nk, D],
    mix [H, H] and an additive mask viewed as [B, H, Nq, Nk] (or None). lse (L and lost, see the module
    docstring) is float32 (float64 for float64 inputs), L = +inf on fully masked rows; it is all the
    backward needs besides the inputs (and ``seed``, the one-element int64 tensor the dropout mask is
    drawn from when dropout_p > 0)."""
    _check_mask(mask, q, k)
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    acc_torch = _acc(q)[1]
    out = torch.empty(batch, heads, n_q, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(2, batch, heads, n_q, dtype=acc_torch, device=q.device)  # (L, what L lost), see above
    if lse.numel() == 0:
        return out, lse
    if n_k == 0:  # every row fully masked: L = +inf, nothing lost
        lse[0].fill_(float("inf"))
        lse[1].zero_()
        return out.zero_(), lse
    # Too many heads x dims for one SM's shared memory: the chunked strategy (head_mixing_chunked.py).
    if _runs_chunked(q, mask):
        return chunked_forward(q, k, v, mix, mask, is_causal, scale, dropout_p, seed)
    meta = _common_meta(q, mask, is_causal, dropout_p)
    mask_arg = mask if mask is not None else lse  # never read when HAS_MASK is False
    seed_arg, threshold, dropout_p = _dropout_args(dropout_p, seed, lse)
    sizes = (heads, n_q, n_k, dim, float(scale))

    lse_meta = {key: meta[key] for key in ("BLOCK_D", "IS_CAUSAL", "HAS_MASK", "ACC", "PRECISION")}
    lse_meta["LOST_TOLERANCE"] = lost_tolerance(acc_torch)
    lse_args = (q, k, mask_arg, lse, *sizes, *q.stride(), *k.stride(), *_strides4(mask), *lse.stride())
    fwd_args = (
        q, k, v, mix, mask_arg, lse, out, seed_arg, *sizes, threshold, dropout_p,
        *q.stride(), *k.stride(), *v.stride(), *mix.stride(), *_strides4(mask), *lse.stride(), *out.stride(),
    )
    if _interpreting(q):
        b = _INTERPRETER_BLOCKS
        _lse_kernel[(batch * heads * triton.cdiv(n_q, b["BLOCK_M"]),)](*lse_args, **lse_meta, **b)
        _forward_kernel[(batch * triton.cdiv(n_q, b["BLOCK_M"]),)](*fwd_args, **meta, **b)
    else:
        _lse_tuned[lambda c: (batch * heads * triton.cdiv(n_q, c["BLOCK_M"]),)](*lse_args, **lse_meta)
        _forward_tuned[lambda c: (batch * triton.cdiv(n_q, c["BLOCK_M"]),)](*fwd_args, **meta)
    return out, lse


@_common.launches_on_device_of
def head_mixing_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mix: torch.Tensor,
    mask: torch.Tensor | None,
    lse: torch.Tensor,
    is_causal: bool,
    scale: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv in the dtypes of q, k, v, dmix [H, H] in lse's dtype: float32, float64 for
    float64 inputs), from the lse of :func:`head_mixing_attention_forward`."""
    _check_mask(mask, q, k)
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    acc_torch = _acc(q)[1]
    dq = torch.empty(batch, heads, n_q, dim, dtype=q.dtype, device=q.device)
    dk = torch.empty(batch, heads, n_k, dim, dtype=k.dtype, device=k.device)
    dv = torch.empty(batch, heads, n_k, dim, dtype=v.dtype, device=v.device)
    if batch * heads * n_q * n_k == 0:  # no score exists: every gradient is 0
        return dq.zero_(), dk.zero_(), dv.zero_(), torch.zeros(heads, heads, dtype=acc_torch, device=q.device)
    interpreting = _interpreting(q)
    if _runs_chunked(q, mask):
        return chunked_backward(grad_out, q, k, v, mix, mask, lse, is_causal, scale, dropout_p, seed)
    meta = _common_meta(q, mask, is_causal, dropout_p)
    mask_arg = mask if mask is not None else lse  # never read when HAS_MASK is False
    seed_arg, threshold, dropout_p = _dropout_args(dropout_p, seed, lse)
    block_m_dq = _INTERPRETER_BLOCKS["BLOCK_M"] if interpreting else _dq_block_m(meta["HP"], meta["BLOCK_D"])
    programs_dq = batch * triton.cdiv(n_q, block_m_dq)
    delta = torch.empty(batch, heads, n_q, dtype=acc_torch, device=q.device)  # D; contiguous, see kernels
    dmix_part = torch.empty(programs_dq, heads, heads, dtype=acc_torch, device=q.device)

    inputs = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *mix.stride(), *_strides4(mask),
              *lse.stride())
    sizes = (heads, n_q, n_k, dim, float(scale), threshold, dropout_p)
    dq_args = (q, k, v, grad_out, mix, mask_arg, lse, delta, dq, dmix_part, seed_arg, *sizes, *inputs, *dq.stride())
    dkv_args = (q, k, v, grad_out, mix, mask_arg, lse, delta, dk, dv, seed_arg, *sizes, *inputs, *dk.stride(),
                *dv.stride())
    # The dK/dV kernel reads D, so the dQ kernel (which writes it) runs first.
    if interpreting:
        b = _INTERPRETER_BLOCKS
        _backward_dq_kernel[(programs_dq,)](*dq_args, **meta, **b)
        _backward_dkv_kernel[(batch * triton.cdiv(n_k, b["BLOCK_N"]),)](*dkv_args, **meta, **b)
    else:
        _backward_dq_tuned[(programs_dq,)](*dq_args, **meta, BLOCK_M=block_m_dq)
        _backward_dkv_tuned[lambda c: (batch * triton.cdiv(n_k, c["BLOCK_N"]),)](*dkv_args, **meta)
    return dq, dk, dv, dmix_part.sum(0)
