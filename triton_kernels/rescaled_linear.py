"""Triton kernels of rescaled_linear (METHODS.md §1): y = x W'ᵀ + b with W' = W ⊙ (c + S_l S_rᵀ).

x [M, K], W [N, K], S_l [N, R], S_r [K, R], b [N], c = 1 (residual, RLRR) or 0 (SSB/SSL/(IA)³).
With gy = ∂L/∂y [M, N] and G = gyᵀ x [N, K] (what full fine-tuning writes as dW):

    gx      = gy W'
    ds_l    = (G ⊙ W) S_r          ds_l[n, j] = Σ_k G[n, k] W[n, k] S_r[k, j]
    ds_r    = (G ⊙ W)ᵀ S_l         ds_r[k, j] = Σ_n G[n, k] W[n, k] S_l[n, j]
    dW      = G ⊙ (c + S_l S_rᵀ)   (only when W is trained; the bias gradient is the caller's)

Three kernels; none writes W', G or any other N×K temporary (dW is an output, not a temporary):

- ``_forward_kernel`` reads x, W, S_l, S_r, b; writes y. Each W tile is multiplied in registers (fp32)
  by its tile of c + S_l S_rᵀ, cast back to the input dtype and fed to the MMA; b in the epilogue.
- ``_grad_x_kernel`` reads gy, W, S_l, S_r; writes gx = gy W' with the same on-the-fly modulation.
- ``_grad_scales_kernel`` reads gy, x, W, S_l, S_r; per [BLOCK_N, BLOCK_K] tile and chunk of M rows
  it reduces G in registers, then in the epilogue forms T = G ⊙ W and writes the tile's partial sums
  of T S_r and Tᵀ S_l into small buffers [slots, N, R] / [slots, K, R] (fp32; fp64 for fp64 inputs)
  that torch sums over slots (deterministic, no atomics); if asked, it writes dW = G ⊙ (c + S_l S_rᵀ).

Accumulation is fp32 (fp64 for fp64 inputs); fp32 inputs use TF32 only where torch allows it for
matmuls. Every tensor is addressed through its strides. On CUDA the tiles are autotuned per
(M, N, K, R, dtype) on first use; under ``TRITON_INTERPRET=1`` (CPU tensors, tests) one small fixed
tile is used.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import accumulation_types as _acc, gemm_configs as _gemm_configs, grouped_tile as _grouped_tile
from ._common import interpreting as _interpreting, matmul_precision as _precision
from ._common import launches_on_device_of as _launches_on_device_of, m_chunk_for as _m_chunk_for
from ._common import prune_gemm_configs as _prune_gemm_configs, tuning_rows as _tuning_rows

__all__ = ["rescaled_linear_forward", "rescaled_linear_backward"]


@triton.jit
def _modulate(w, sl_ptrs, sr_ptrs, mask_n, mask_k, stride_slr, stride_srr, c,
              R: tl.constexpr, ACC: tl.constexpr):
    """w ⊙ (c + S_l S_rᵀ) for a [BLOCK_N, BLOCK_K] tile w, in dtype ACC. sl_ptrs / sr_ptrs point at
    column 0 of the tile's rows of S_l / S_r; R is small, so the rank loop is unrolled."""
    mod = tl.zeros(w.shape, dtype=ACC) + c
    for j in tl.static_range(R):
        a = tl.load(sl_ptrs + j * stride_slr, mask=mask_n, other=0.0).to(ACC)
        b = tl.load(sr_ptrs + j * stride_srr, mask=mask_k, other=0.0).to(ACC)
        mod += a[:, None] * b[None, :]
    return w.to(ACC) * mod


@triton.jit(do_not_specialize=["M_BUCKET"])
def _forward_kernel(
    x_ptr, w_ptr, sl_ptr, sr_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_sln, stride_slr, stride_srk, stride_srr, stride_b, stride_ym, stride_yn,
    c, M_BUCKET,
    R: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    # One modulated W tile serves BLOCK_M rows of x: a large BLOCK_M amortizes the elementwise work
    # (which Triton does not overlap with the MMA inside one program) against the MMA.
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    rows_m, rows_n = offs_m.to(tl.int64), offs_n.to(tl.int64)  # M·K, N·K may exceed 2³¹
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    sl_ptrs = sl_ptr + offs_n * stride_sln
    sr_ptrs = sr_ptr + offs_k * stride_srk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:  # no K-edge predicates in the hot loop when BLOCK_K divides K
            mask_k = tl.full((BLOCK_K,), True, tl.int1)
        else:
            mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        # Rounded once, from fp32, to the MMA's input dtype; W' never exists in memory.
        w_mod = _modulate(w, sl_ptrs, sr_ptrs, mask_n, mask_k, stride_slr, stride_srr, c, R, ACC).to(w.dtype)
        acc = tl.dot(x, tl.trans(w_mod), acc, input_precision=PRECISION, out_dtype=ACC)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        sr_ptrs += BLOCK_K * stride_srk
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(ACC)[None, :]
    tl.store(y_ptr + rows_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M_BUCKET"])
def _grad_x_kernel(
    gy_ptr, w_ptr, sl_ptr, sr_ptr, gx_ptr,
    M, N, K,
    stride_gym, stride_gyn, stride_wn, stride_wk,
    stride_sln, stride_slr, stride_srk, stride_srr, stride_gxm, stride_gxk,
    c, M_BUCKET,
    R: tl.constexpr, EVEN_N: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    # Output tile [BLOCK_M, BLOCK_K] of gx; the reduction runs over N in steps of BLOCK_N.
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m, mask_k = offs_m < M, offs_k < K
    rows_m, cols_k = offs_m.to(tl.int64), offs_k.to(tl.int64)  # M·N, M·K, N·K may exceed 2³¹
    gy_ptrs = gy_ptr + rows_m[:, None] * stride_gym + offs_n[None, :] * stride_gyn
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + cols_k[None, :] * stride_wk
    sl_ptrs = sl_ptr + offs_n * stride_sln
    sr_ptrs = sr_ptr + offs_k * stride_srk
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        if EVEN_N:
            mask_n = tl.full((BLOCK_N,), True, tl.int1)
        else:
            mask_n = offs_n < N - n0
        gy = tl.load(gy_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        w_mod = _modulate(w, sl_ptrs, sr_ptrs, mask_n, mask_k, stride_slr, stride_srr, c, R, ACC).to(w.dtype)
        acc = tl.dot(gy, w_mod, acc, input_precision=PRECISION, out_dtype=ACC)
        gy_ptrs += BLOCK_N * stride_gyn
        w_ptrs += BLOCK_N * stride_wn
        sl_ptrs += BLOCK_N * stride_sln
    tl.store(gx_ptr + rows_m[:, None] * stride_gxm + cols_k[None, :] * stride_gxk,
             acc.to(gx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit(do_not_specialize=["M_BUCKET"])
def _grad_scales_kernel(
    gy_ptr, x_ptr, w_ptr, sl_ptr, sr_ptr, part_l_ptr, part_r_ptr, gw_ptr,
    M, N, K, M_CHUNK,
    stride_gym, stride_gyn, stride_xm, stride_xk, stride_wn, stride_wk,
    stride_sln, stride_slr, stride_srk, stride_srr, stride_gwn, stride_gwk,
    c, M_BUCKET,
    R: tl.constexpr, NEED_SCALES: tl.constexpr, NEED_WEIGHT: tl.constexpr, EVEN_M: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    # Axis 0: the (N, K) tile; axis 1: which chunk of M_CHUNK rows (a multiple of BLOCK_M) of M this
    # program reduces. Splitting M keeps the GPU busy when N·K has few tiles (768×768: 36 tiles); the
    # epilogue is linear in G, so per-chunk partials simply add up. dW is not, so it takes one chunk.
    pid_n, pid_k = _grouped_tile(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP)
    chunk = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n, mask_k = offs_n < N, offs_k < K
    m_start = chunk * M_CHUNK
    m_end = tl.minimum(M, m_start + M_CHUNK)
    rows_m = (m_start + offs_m).to(tl.int64)  # M·N, M·K, N·K may exceed 2³¹
    rows_n = offs_n.to(tl.int64)
    gy_ptrs = gy_ptr + rows_m[:, None] * stride_gym + offs_n[None, :] * stride_gyn
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    g = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)  # this tile of G = gyᵀ x; lives only in registers
    for m0 in range(m_start, m_end, BLOCK_M):
        if EVEN_M:
            mask_m = tl.full((BLOCK_M,), True, tl.int1)
        else:
            mask_m = offs_m < m_end - m0
        gy = tl.load(gy_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        g = tl.dot(tl.trans(gy), x, g, input_precision=PRECISION, out_dtype=ACC)
        gy_ptrs += BLOCK_M * stride_gym
        x_ptrs += BLOCK_M * stride_xm
    sl_ptrs = sl_ptr + offs_n * stride_sln
    sr_ptrs = sr_ptr + offs_k * stride_srk
    if NEED_WEIGHT:
        gw = _modulate(g, sl_ptrs, sr_ptrs, mask_n, mask_k, stride_slr, stride_srr, c, R, ACC)
        tl.store(gw_ptr + rows_n[:, None] * stride_gwn + offs_k[None, :] * stride_gwk,
                 gw.to(gw_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])
    if NEED_SCALES:
        w = tl.load(w_ptr + rows_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        t = g * w.to(ACC)
        # Slot (chunk, column tile) of the ds_l partials, slot (chunk, row tile) of the ds_r ones,
        # both laid out [slot, row, R]: every row in [0, N) / [0, K) of a slot is written exactly
        # once, so the buffers need no zeroing and torch's sum over slots gives [N, R] / [K, R].
        part_l_ptrs = part_l_ptr + ((chunk * tl.cdiv(K, BLOCK_K) + pid_k) * N + offs_n) * R
        part_r_ptrs = part_r_ptr + ((chunk * tl.cdiv(N, BLOCK_N) + pid_n) * K + offs_k) * R
        for j in tl.static_range(R):
            a = tl.load(sl_ptrs + j * stride_slr, mask=mask_n, other=0.0).to(ACC)
            b = tl.load(sr_ptrs + j * stride_srr, mask=mask_k, other=0.0).to(ACC)
            tl.store(part_l_ptrs + j, tl.sum(t * b[None, :], axis=1), mask=mask_n)
            tl.store(part_r_ptrs + j, tl.sum(t * a[:, None], axis=0), mask=mask_k)


# ----------------------------------------------------------------------------------------------
# Launch configuration

# Interpreter (CPU tests): small tiles keep it fast; tl.dot needs every dimension >= 16.
_INTERPRETER_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP=4)


# The scales kernel's [BLOCK_N, BLOCK_K] tile fixes the partial buffers' shapes, so it is chosen by
# dtype, not tuned; only the M step, warps and stages are (4 warps spill with a 128×128 fp32 G tile).
# M chunks are multiples of _M_CHUNK_ALIGN, hence of every BLOCK_M.
_SCALES_TILE = dict(BLOCK_N=128, BLOCK_K=128, GROUP=8)
_SCALES_TILE_FP64 = dict(BLOCK_N=64, BLOCK_K=64, GROUP=8)
_M_CHUNK_ALIGN = 128
_SCALES_CONFIGS = [
    triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s) for bm, w, s in [(64, 8, 3), (64, 8, 4), (32, 8, 4)]
]

# The autotuner adds the tensors' dtypes. M_BUCKET (tuning_rows(M)) instead of M: a new token count
# within the same power of two reuses the tiles tuned for it; M itself is a plain argument. PRECISION:
# TF32 and IEEE float32 are pruned to different tiles (_common.prune_gemm_configs).
_KEY = ["M_BUCKET", "N", "K", "R", "PRECISION"]
_forward_tuned = triton.autotune(
    _gemm_configs("BLOCK_M", "BLOCK_N", "BLOCK_K"), key=_KEY,
    prune_configs_by={"early_config_prune": _prune_gemm_configs(
        "BLOCK_K", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16), fma_names=("BLOCK_M", "BLOCK_N"))},
)(triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_forward_kernel))
_grad_x_tuned = triton.autotune(
    _gemm_configs("BLOCK_M", "BLOCK_K", "BLOCK_N"), key=_KEY,
    prune_configs_by={"early_config_prune": _prune_gemm_configs(
        "BLOCK_N", dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=16), fma_names=("BLOCK_M", "BLOCK_K"))},
)(triton.heuristics({"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0})(_grad_x_kernel))
_grad_scales_tuned = triton.autotune(
    _SCALES_CONFIGS, key=_KEY + ["NEED_WEIGHT", "NEED_SCALES"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs("BLOCK_M", dict(BLOCK_M=16))},
)(triton.heuristics({"EVEN_M": lambda a: a["M"] % a["BLOCK_M"] == 0})(_grad_scales_kernel))


def _scale_strides(s_l: torch.Tensor, s_r: torch.Tensor) -> tuple:
    return s_l.stride(0), s_l.stride(1), s_r.stride(0), s_r.stride(1)


def _rank(weight: torch.Tensor, s_l: torch.Tensor, s_r: torch.Tensor) -> int:
    """R of s_l [N, R] and s_r [K, R]: the kernels index both by it, so other shapes would read past them."""
    if s_l.dim() != 2 or s_r.dim() != 2 or s_l.shape[0] != weight.shape[0] or s_r.shape[0] != weight.shape[1] \
            or s_l.shape[1] != s_r.shape[1]:
        raise ValueError(f"s_l and s_r must be [N, R] and [K, R] for weight [N, K] = {list(weight.shape)}, got "
                         f"{list(s_l.shape)} and {list(s_r.shape)}")
    return s_l.shape[1]


# ----------------------------------------------------------------------------------------------
# Launch wrappers


@_launches_on_device_of
def rescaled_linear_forward(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    s_l: torch.Tensor,
    s_r: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: bool,
) -> torch.Tensor:
    """y [M, N] = x2d (W ⊙ (c + s_l s_rᵀ))ᵀ + bias, for x2d [M, K], weight [N, K], s_l [N, R], s_r [K, R]."""
    M, K = x2d.shape
    N, R = weight.shape[0], _rank(weight, s_l, s_r)
    y = torch.empty(M, N, dtype=x2d.dtype, device=x2d.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.copy_(bias.expand(M, N) if bias is not None else torch.zeros_like(y))
    args = (
        x2d, weight, s_l, s_r, bias if bias is not None else y, y,
        M, N, K,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), *_scale_strides(s_l, s_r),
        bias.stride(0) if bias is not None else 0, y.stride(0), y.stride(1),
        1.0 if residual else 0.0,
    )
    meta = dict(M_BUCKET=_tuning_rows(M), R=R, HAS_BIAS=bias is not None, ACC=_acc(x2d)[0],
                PRECISION=_precision(x2d))
    if _interpreting(x2d):
        b = _INTERPRETER_BLOCKS
        grid = (triton.cdiv(M, b["BLOCK_M"]) * triton.cdiv(N, b["BLOCK_N"]),)
        _forward_kernel[grid](*args, **meta, **b, EVEN_K=K % b["BLOCK_K"] == 0)
    else:
        _forward_tuned[lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)](*args, **meta)
    return y


@_launches_on_device_of
def rescaled_linear_backward(
    grad_y: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    s_l: torch.Tensor,
    s_r: torch.Tensor,
    residual: bool,
    need_x: bool,
    need_weight: bool,
    need_scales: bool,
):
    """(gx [M, K], gw [N, K], gs_l [N, R], gs_r [K, R]), each None unless requested (need_scales
    gives both scale gradients). The bias gradient is left to the caller."""
    M, K = x2d.shape
    N, R = weight.shape[0], _rank(weight, s_l, s_r)
    c = 1.0 if residual else 0.0
    acc_tl, acc_torch = _acc(x2d)
    precision = _precision(x2d)
    interpreting = _interpreting(x2d)
    gx = gw = gs_l = gs_r = None

    if need_x:
        gx = torch.empty(M, K, dtype=x2d.dtype, device=x2d.device)
        if N == 0:
            gx.zero_()
        elif M > 0 and K > 0:
            args = (
                grad_y, weight, s_l, s_r, gx,
                M, N, K,
                grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1),
                *_scale_strides(s_l, s_r), gx.stride(0), gx.stride(1),
                c,
            )
            meta = dict(M_BUCKET=_tuning_rows(M), R=R, ACC=acc_tl, PRECISION=precision)
            if interpreting:
                b = _INTERPRETER_BLOCKS
                grid = (triton.cdiv(M, b["BLOCK_M"]) * triton.cdiv(K, b["BLOCK_K"]),)
                _grad_x_kernel[grid](*args, **meta, **b, EVEN_N=N % b["BLOCK_N"] == 0)
            else:
                grid = lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)
                _grad_x_tuned[grid](*args, **meta)

    if not (need_weight or need_scales):
        return gx, gw, gs_l, gs_r
    if need_weight:
        gw = torch.empty(N, K, dtype=weight.dtype, device=weight.device)
    if min(M, N, K) == 0:
        if gw is not None:
            gw.zero_()
        if need_scales:
            gs_l, gs_r = torch.zeros_like(s_l), torch.zeros_like(s_r)
        return gx, gw, gs_l, gs_r

    if interpreting:
        tile = _INTERPRETER_BLOCKS
    else:
        tile = _SCALES_TILE_FP64 if x2d.dtype == torch.float64 else _SCALES_TILE
    tiles_n, tiles_k = triton.cdiv(N, tile["BLOCK_N"]), triton.cdiv(K, tile["BLOCK_K"])
    if need_weight:
        m_chunk = M  # dW needs the whole of G in one program
    else:
        m_chunk = _m_chunk_for(x2d, M, tiles_n * tiles_k, _M_CHUNK_ALIGN, _INTERPRETER_BLOCKS["BLOCK_M"])
    chunks = triton.cdiv(M, m_chunk)
    if need_scales:
        part_l = torch.empty(chunks * tiles_k, N, R, dtype=acc_torch, device=x2d.device)
        part_r = torch.empty(chunks * tiles_n, K, R, dtype=acc_torch, device=x2d.device)
    else:
        part_l = part_r = x2d  # never touched
    gw_arg = gw if gw is not None else x2d
    args = (
        grad_y, x2d, weight, s_l, s_r, part_l, part_r, gw_arg,
        M, N, K, m_chunk,
        grad_y.stride(0), grad_y.stride(1), x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
        *_scale_strides(s_l, s_r), gw_arg.stride(0), gw_arg.stride(1),
        c,
    )
    meta = dict(M_BUCKET=_tuning_rows(M), R=R, NEED_SCALES=need_scales, NEED_WEIGHT=need_weight, ACC=acc_tl,
                PRECISION=precision)
    grid = (tiles_n * tiles_k, chunks)
    if interpreting:
        # m_chunk is a multiple of BLOCK_M, so chunks stay unmasked exactly when M is.
        _grad_scales_kernel[grid](*args, **meta, **tile, EVEN_M=M % tile["BLOCK_M"] == 0)
    else:
        _grad_scales_tuned[grid](*args, **meta, **tile)
    if need_scales:
        gs_l = part_l.sum(0).to(s_l.dtype)
        gs_r = part_r.sum(0).to(s_r.dtype)
    return gx, gw, gs_l, gs_r
