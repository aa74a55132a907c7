"""Triton kernels of rescaled_linear (METHODS.md §1): y = x W'ᵀ + b with W' = W ⊙ (c + S_l S_rᵀ).

Three kernels, none of which writes an N×K temporary:

- ``_forward_kernel``  reads x, W, S_l, S_r, b; writes y. Each W tile is multiplied in registers
  by its modulation tile (c + S_l S_rᵀ) before the MMA.
- ``_grad_x_kernel``   reads gy, W, S_l, S_r; writes gx = gy W' with the same on-the-fly modulation.
- ``_grad_scales_kernel`` reads gy, x, W, S_l, S_r; for one [BLOCK_N, BLOCK_K] tile it reduces
  G = gyᵀx over M in registers, then in the epilogue forms T = G ⊙ W and writes per-tile partial
  sums of ds_l = T S_r and ds_r = Tᵀ S_l (summed afterwards by torch: deterministic, no atomics),
  and, only if W is trained, the dW tile G ⊙ (c + S_l S_rᵀ). G itself is never stored.

Accumulation is fp32 (fp64 for fp64 inputs); the modulated W tile is cast back to the input dtype
so fp16/bf16 run on tensor cores. fp32 inputs use TF32 only if torch allows it for matmuls.
Under ``TRITON_INTERPRET=1`` (CPU tensors, tests) one small fixed tile size is used.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["rescaled_linear_forward", "rescaled_linear_backward"]


@triton.jit
def _modulation(s_l_ptr, s_r_ptr, offs_n, offs_k, mask_n, mask_k, c, R: tl.constexpr, ACC: tl.constexpr):
    """The tile c + Σ_j S_l[n, j] S_r[k, j] (in dtype ACC) for rows offs_n and columns offs_k."""
    a = tl.load(s_l_ptr + offs_n * R, mask=mask_n, other=0.0).to(ACC)
    b = tl.load(s_r_ptr + offs_k * R, mask=mask_k, other=0.0).to(ACC)
    mod = a[:, None] * b[None, :] + c
    for j in tl.static_range(1, R):
        a = tl.load(s_l_ptr + offs_n * R + j, mask=mask_n, other=0.0).to(ACC)
        b = tl.load(s_r_ptr + offs_k * R + j, mask=mask_k, other=0.0).to(ACC)
        mod += a[:, None] * b[None, :]
    return mod


@triton.jit
def _modulated_w_tile(w_ptr, s_l_ptr, s_r_ptr, offs_n, offs_k, mask_n, mask_k, stride_wn, stride_wk, c,
                      R: tl.constexpr, ACC: tl.constexpr):
    """The W' tile W[n, k] · (c + Σ_j S_l[n, j] S_r[k, j]), in W's dtype, ready for the MMA."""
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                mask=mask_n[:, None] & mask_k[None, :], other=0.0)
    return (w.to(ACC) * _modulation(s_l_ptr, s_r_ptr, offs_n, offs_k, mask_n, mask_k, c, R, ACC)).to(w.dtype)


@triton.jit
def _grouped_tile(pid, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP: tl.constexpr):
    """Program id -> (row tile, column tile), GROUP row tiles at a time so W tiles stay in L2."""
    tiles_r = tl.cdiv(rows, BLOCK_ROWS)
    tiles_c = tl.cdiv(cols, BLOCK_COLS)
    per_group = GROUP * tiles_c
    first_r = (pid // per_group) * GROUP
    group_size = tl.minimum(tiles_r - first_r, GROUP)
    return first_r + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, s_l_ptr, s_r_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    c,
    R: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_mod = _modulated_w_tile(w_ptr, s_l_ptr, s_r_ptr, offs_n, offs_k, mask_n, mask_k, stride_wn, stride_wk, c,
                                  R, acc_dtype)
        acc = tl.dot(x, tl.trans(w_mod), acc, input_precision=PRECISION, out_dtype=acc_dtype)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(acc_dtype)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _grad_x_kernel(
    gy_ptr, w_ptr, s_l_ptr, s_r_ptr, gx_ptr,
    M, N, K,
    stride_gym, stride_gyn, stride_wn, stride_wk, stride_gxm, stride_gxk,
    c,
    R: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m, mask_k = offs_m < M, offs_k < K
    acc_dtype = tl.float64 if gy_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=acc_dtype)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        gy = tl.load(gy_ptr + offs_m[:, None] * stride_gym + offs_n[None, :] * stride_gyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w_mod = _modulated_w_tile(w_ptr, s_l_ptr, s_r_ptr, offs_n, offs_k, mask_n, mask_k, stride_wn, stride_wk, c,
                                  R, acc_dtype)
        acc = tl.dot(gy, w_mod, acc, input_precision=PRECISION, out_dtype=acc_dtype)
    tl.store(gx_ptr + offs_m[:, None] * stride_gxm + offs_k[None, :] * stride_gxk,
             acc.to(gx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _grad_scales_kernel(
    gy_ptr, x_ptr, w_ptr, s_l_ptr, s_r_ptr, partial_l_ptr, partial_r_ptr, gw_ptr,
    M, N, K,
    stride_gym, stride_gyn, stride_xm, stride_xk, stride_wn, stride_wk,
    c,
    R: tl.constexpr, NEED_SCALES: tl.constexpr, NEED_WEIGHT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    pid_n, pid_k = _grouped_tile(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n, mask_k = offs_n < N, offs_k < K
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    g = tl.zeros((BLOCK_N, BLOCK_K), dtype=acc_dtype)  # this tile of G = gyᵀ x, kept in registers
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        gy = tl.load(gy_ptr + offs_m[:, None] * stride_gym + offs_n[None, :] * stride_gyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        g = tl.dot(tl.trans(gy), x, g, input_precision=PRECISION, out_dtype=acc_dtype)
    if NEED_WEIGHT:
        mod = _modulation(s_l_ptr, s_r_ptr, offs_n, offs_k, mask_n, mask_k, c, R, acc_dtype)
        tl.store(gw_ptr + offs_n[:, None] * K + offs_k[None, :],
                 (g * mod).to(gw_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])
    if NEED_SCALES:
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        t = g * w.to(acc_dtype)
        for j in tl.static_range(R):
            a = tl.load(s_l_ptr + offs_n * R + j, mask=mask_n, other=0.0).to(acc_dtype)
            b = tl.load(s_r_ptr + offs_k * R + j, mask=mask_k, other=0.0).to(acc_dtype)
            # partial_l[pid_k, n, j] = Σ_k∈tile T[n, k] S_r[k, j];  partial_r[pid_n, k, j] likewise.
            tl.store(partial_l_ptr + (pid_k * N + offs_n) * R + j, tl.sum(t * b[None, :], axis=1), mask=mask_n)
            tl.store(partial_r_ptr + (pid_n * K + offs_k) * R + j, tl.sum(t * a[:, None], axis=0), mask=mask_k)


def _interpreting(t: torch.Tensor) -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" or t.device.type == "cpu"


# Small tiles for the CPU interpreter (tests); tl.dot needs every dimension >= 16.
_INTERPRETER_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP=4)
# GPU tiles (Hopper/Ampere class). The scales kernel's tile shape fixes the partial-buffer sizes,
# so only its warps/stages are tuned.
_GEMM_CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=8), num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4), (64, 64, 64, 4, 3),
    ]
]
_SCALES_BLOCKS = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP=8)
_SCALES_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w, s in [(8, 3), (4, 3), (8, 4)]]

_forward_tuned = triton.autotune(_GEMM_CONFIGS, key=["M", "N", "K", "R"])(_forward_kernel)
_grad_x_tuned = triton.autotune(_GEMM_CONFIGS, key=["M", "N", "K", "R"])(_grad_x_kernel)
_grad_scales_tuned = triton.autotune(_SCALES_CONFIGS, key=["M", "N", "K", "R"], reset_to_zero=None)(
    _grad_scales_kernel
)


def _precision(t: torch.Tensor) -> str:
    if t.dtype == torch.float32 and t.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _launch(tuned, plain, grid_dims, *args, **meta):
    """Run the autotuned kernel on a GPU, or the plain one with small fixed tiles in the interpreter."""
    if _interpreting(args[0]):
        blocks = _INTERPRETER_BLOCKS
        plain[(grid_dims(blocks),)](*args, **meta, **blocks)
    else:
        tuned[lambda cfg: (grid_dims(cfg),)](*args, **meta)


def rescaled_linear_forward(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    s_l: torch.Tensor,
    s_r: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: bool,
) -> torch.Tensor:
    """y [M, N] = x2d (W ⊙ (c + s_l s_rᵀ))ᵀ + bias; s_l [N, R], s_r [K, R]."""
    M, K = x2d.shape
    N, R = weight.shape[0], s_l.shape[1]
    s_l, s_r = s_l.contiguous(), s_r.contiguous()
    y = torch.empty(M, N, dtype=x2d.dtype, device=x2d.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.copy_(bias.expand(M, N) if bias is not None else torch.zeros_like(y))
    _launch(
        _forward_tuned, _forward_kernel,
        lambda b: triton.cdiv(M, b["BLOCK_M"]) * triton.cdiv(N, b["BLOCK_N"]),
        x2d, weight, s_l, s_r, bias if bias is not None else y, y,
        M, N, K,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        1.0 if residual else 0.0,
        R=R, HAS_BIAS=bias is not None, PRECISION=_precision(x2d),
    )
    return y


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
    """(gx, gw, gs_l, gs_r), each None unless requested; need_scales computes both scale grads."""
    M, K = x2d.shape
    N, R = weight.shape[0], s_l.shape[1]
    s_l, s_r = s_l.contiguous(), s_r.contiguous()
    c = 1.0 if residual else 0.0
    precision = _precision(x2d)
    gx = gw = gs_l = gs_r = None
    if need_x:
        gx = torch.empty(M, K, dtype=x2d.dtype, device=x2d.device)
        if min(M, N, K) == 0:
            gx.zero_()
        else:
            _launch(
                _grad_x_tuned, _grad_x_kernel,
                lambda b: triton.cdiv(M, b["BLOCK_M"]) * triton.cdiv(K, b["BLOCK_K"]),
                grad_y, weight, s_l, s_r, gx,
                M, N, K,
                grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1), gx.stride(0), gx.stride(1),
                c, R=R, PRECISION=precision,
            )
    if need_weight or need_scales:
        blocks = _INTERPRETER_BLOCKS if _interpreting(x2d) else _SCALES_BLOCKS
        tiles_n, tiles_k = triton.cdiv(N, blocks["BLOCK_N"]), triton.cdiv(K, blocks["BLOCK_K"])
        acc_dtype = torch.float64 if x2d.dtype == torch.float64 else torch.float32
        partial_l = torch.empty(tiles_k, N, R, dtype=acc_dtype, device=x2d.device)
        partial_r = torch.empty(tiles_n, K, R, dtype=acc_dtype, device=x2d.device)
        if need_weight:
            gw = torch.empty(N, K, dtype=weight.dtype, device=weight.device)
        args = (
            grad_y, x2d, weight, s_l, s_r, partial_l, partial_r, gw if gw is not None else partial_l,
            M, N, K,
            grad_y.stride(0), grad_y.stride(1), x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
            c,
        )
        meta = dict(R=R, NEED_SCALES=need_scales, NEED_WEIGHT=need_weight, PRECISION=precision)
        grid = (tiles_n * tiles_k,)
        if _interpreting(x2d):
            _grad_scales_kernel[grid](*args, **meta, **blocks)
        else:
            _grad_scales_tuned[grid](*args, **meta, **blocks)
        if need_scales:
            gs_l = partial_l.sum(0).to(s_l.dtype)
            gs_r = partial_r.sum(0).to(s_r.dtype)
    return gx, gw, gs_l, gs_r
