"""Triton kernels of svd_delta_linear's merged path (METHODS.md §2): W_eff = W + U diag(d) Vᵀ.

- ``_svd_basis_weight_kernel`` (the "SVD-basis scaling" kernel) reads W, U, V, d and writes
  W_eff = W + (U ⊙ d) Vᵀ tile by tile: one scale-and-add GEMM of 2·N·K·k FLOPs, optionally cast.
  The main products y = x W_effᵀ and gx = gy W_eff then run on cuBLAS (torch.matmul).
- ``_grad_d_kernel`` reads gy, x, U, V; for one [BLOCK_N, BLOCK_K] tile and one chunk of M rows it
  reduces G = gyᵀ x in registers, then in the epilogue adds Σ_n U[n, j] (G_tile V_tile)[n, j] for
  every j into a per-(chunk, tile) partial sum of dd (summed afterwards by torch: deterministic).
  G is never written. The M chunks keep every SM busy when N·K has few tiles (768×768: 36 tiles of
  128×128 for 132 SMs); the epilogue is linear in G, so the chunks' partials simply add up.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import interpreting as _interpreting, launches_on_device_of as _launches_on_device_of
from ._common import m_chunk_for as _m_chunk_for, matmul_precision as _precision, shared_memory as _shared_memory

__all__ = ["svd_basis_weight", "svd_delta_linear_forward", "svd_delta_linear_backward"]


@triton.jit
def _svd_basis_weight_kernel(
    w_ptr, u_ptr, v_ptr, d_ptr, out_ptr,
    N, K, RANK,
    stride_wn, stride_wk, stride_un, stride_uj, stride_vk, stride_vj, stride_d,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n, mask_k = offs_n < N, offs_k < K
    rows_n = offs_n.to(tl.int64)  # N·K may exceed 2³¹
    acc_dtype = tl.float64 if w_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.load(w_ptr + rows_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                  mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(acc_dtype)
    for j0 in range(0, RANK, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < RANK
        u = tl.load(u_ptr + rows_n[:, None] * stride_un + offs_j[None, :] * stride_uj,
                    mask=mask_n[:, None] & mask_j[None, :], other=0.0)
        v = tl.load(v_ptr + offs_k[:, None] * stride_vk + offs_j[None, :] * stride_vj,
                    mask=mask_k[:, None] & mask_j[None, :], other=0.0)
        d = tl.load(d_ptr + offs_j * stride_d, mask=mask_j, other=0.0)  # d may be a strided view
        scaled_u = (u.to(acc_dtype) * d.to(acc_dtype)[None, :]).to(u.dtype)
        acc = tl.dot(scaled_u, tl.trans(v), acc, input_precision=PRECISION, out_dtype=acc_dtype)
    tl.store(out_ptr + rows_n[:, None] * K + offs_k[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_n[:, None] & mask_k[None, :])


@triton.jit
def _grad_d_kernel(
    gy_ptr, x_ptr, u_ptr, v_ptr, partial_ptr,
    M, N, K, RANK, M_CHUNK,
    stride_gym, stride_gyn, stride_xm, stride_xk, stride_un, stride_uj, stride_vk, stride_vj,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
):
    pid_n, pid_k, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n, mask_k = offs_n < N, offs_k < K
    m_end = tl.minimum(M, (chunk + 1) * M_CHUNK)
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    g = tl.zeros((BLOCK_N, BLOCK_K), dtype=acc_dtype)  # this tile of G = gyᵀ x, in registers
    for m0 in range(chunk * M_CHUNK, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        rows_m = offs_m.to(tl.int64)  # M·N, M·K may exceed 2³¹
        gy = tl.load(gy_ptr + rows_m[:, None] * stride_gym + offs_n[None, :] * stride_gyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        x = tl.load(x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        g = tl.dot(tl.trans(gy), x, g, input_precision=PRECISION, out_dtype=acc_dtype)
    slot = (chunk * tl.num_programs(0) + pid_n) * tl.num_programs(1) + pid_k
    g_in = g.to(x_ptr.dtype.element_ty)  # the epilogue GEMM runs on tensor cores in the input dtype
    for j0 in range(0, RANK, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < RANK
        v = tl.load(v_ptr + offs_k[:, None] * stride_vk + offs_j[None, :] * stride_vj,
                    mask=mask_k[:, None] & mask_j[None, :], other=0.0)
        u = tl.load(u_ptr + offs_n[:, None] * stride_un + offs_j[None, :] * stride_uj,
                    mask=mask_n[:, None] & mask_j[None, :], other=0.0)
        gv = tl.dot(g_in, v, input_precision=PRECISION, out_dtype=acc_dtype)  # (G_tile V_tile) [BN, BJ]
        tl.store(partial_ptr + slot * RANK + offs_j, tl.sum(gv * u.to(acc_dtype), axis=0), mask=mask_j)


# Tile sizes: small fixed ones in the CPU interpreter (tl.dot needs >= 16), GPU ones otherwise, and
# smaller GPU ones for float32 without TF32, where tl.dot runs on the FMA units with its operands in
# registers (the tensor-core tiles spill there; see _common.FMA_TILES), and for float64, whose
# 128×128 dd tiles would ask for 384 KiB of shared memory (an H100 has 227).
_INTERPRETER_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_J=16)
_WEIGHT_BLOCKS = dict(BLOCK_N=64, BLOCK_K=64, BLOCK_J=32)
_WEIGHT_BLOCKS_SMALL = dict(BLOCK_N=64, BLOCK_K=64, BLOCK_J=16)
# 8 warps: with 4, the 128×128 fp32 tile of G spills (ptxas, sm_90: bf16 with odd K, and TF32).
_GRAD_D_BLOCKS = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, BLOCK_J=32, num_warps=8)
_GRAD_D_BLOCKS_SMALL = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, BLOCK_J=16)
_M_CHUNK_ALIGN = 128  # M chunks of the dd kernel: a multiple of every GPU BLOCK_M


# Shared memory the dd kernel's TF32 tiles (_GRAD_D_BLOCKS with half the M step) ask for (ptxas, sm_89);
# GPUs with less (sm_86/sm_89: 99 KiB) take the small tiles, which ask for at most 64 KiB.
_GRAD_D_TF32_SHARED = 131072


def _blocks(t: torch.Tensor, gpu_blocks: dict, small_blocks: dict) -> dict:
    if _interpreting(t):
        return {name: _INTERPRETER_BLOCKS[name] for name in gpu_blocks if name.startswith("BLOCK")}
    if t.dtype == torch.float64 or (t.dtype == torch.float32 and _precision(t) == "ieee"):
        return small_blocks
    if t.dtype == torch.float32 and "BLOCK_M" in gpu_blocks:
        # TF32: half the M step keeps a pipeline stage as many bytes as with 16-bit inputs (the dd
        # kernel's 3 stages would otherwise ask for 192 KiB, more than an A100's 163).
        if _shared_memory(t) < _GRAD_D_TF32_SHARED:
            return small_blocks
        return {**gpu_blocks, "BLOCK_M": gpu_blocks["BLOCK_M"] // 2}
    return gpu_blocks


@_launches_on_device_of
def svd_basis_weight(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """W_eff = W + U diag(d) Vᵀ in W's dtype, never forming U diag(d) Vᵀ on its own."""
    N, K = weight.shape
    rank = u.shape[1]
    out = torch.empty(N, K, dtype=weight.dtype, device=weight.device)
    meta = _blocks(weight, _WEIGHT_BLOCKS, _WEIGHT_BLOCKS_SMALL)
    grid = (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"]))
    _svd_basis_weight_kernel[grid](
        weight, u, v, d, out, N, K, rank,
        weight.stride(0), weight.stride(1), u.stride(0), u.stride(1), v.stride(0), v.stride(1), d.stride(0),
        PRECISION=_precision(weight), **meta,
    )
    return out


@_launches_on_device_of
def svd_delta_linear_forward(x2d, weight, u, v, d, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.linear(x2d, svd_basis_weight(weight, u, v, d), bias)


@_launches_on_device_of
def svd_delta_linear_backward(grad_y, x2d, weight, u, v, d, need_x: bool, need_d: bool):
    """(gx or None, gd or None); gx forms W_eff again (the op asks for it only when the forward did
    not keep its W_eff: ops/svd_delta_linear.py)."""
    gx = gd = None
    if need_x:
        gx = grad_y @ svd_basis_weight(weight, u, v, d)
    if need_d:
        M, K = x2d.shape
        N, rank = u.shape
        b = _blocks(x2d, _GRAD_D_BLOCKS, _GRAD_D_BLOCKS_SMALL)
        tiles = (triton.cdiv(N, b["BLOCK_N"]), triton.cdiv(K, b["BLOCK_K"]))
        # M = 0: one chunk, whose epilogue writes zeros.
        rows = max(_m_chunk_for(x2d, M, tiles[0] * tiles[1], _M_CHUNK_ALIGN, b["BLOCK_M"]), 1)
        grid = (*tiles, triton.cdiv(max(M, 1), rows))
        acc_dtype = torch.float64 if x2d.dtype == torch.float64 else torch.float32
        partial = torch.empty(grid[0] * grid[1] * grid[2], rank, dtype=acc_dtype, device=x2d.device)
        _grad_d_kernel[grid](
            grad_y, x2d, u, v, partial, M, N, K, rank, rows,
            grad_y.stride(0), grad_y.stride(1), x2d.stride(0), x2d.stride(1),
            u.stride(0), u.stride(1), v.stride(0), v.stride(1),
            PRECISION=_precision(x2d), **b,
        )
        gd = partial.sum(0).to(d.dtype)
    return gx, gd
