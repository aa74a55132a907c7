"""Triton kernels of lowrank_linear (METHODS.md §4): y = x Wᵀ + s·((x_d Bᵀ) Gᵀ) Aᵀ + b.

x [M, K], x_d = dropout(x) or x, W [N, K], A [N, r], B [r, K], G none / [r] / [r, r], b [N]. With
gy = ∂L/∂y [M, N]:

    h0 = x_d Bᵀ [M, r]                  y  = x Wᵀ + h0 (s·A G)ᵀ + b
    t  = gy A   [M, r]                  gx = gy W + t (s·G B)       (t (s·G B) returned apart with dropout)
    dA = s·(gyᵀ h0) Gᵀ    dB = s·Gᵀ (tᵀ x_d)    dG = s·tᵀ h0 (or its diagonal)    dW = gyᵀ x (W trained)

One kernel, ``_gemm_lowrank_kernel``, computes ``out = P Qᵀ + L Rᵀ (+ bias)`` for P [M, D], Q [C, D],
L [M, R], R [C, R]: it accumulates the big product P Qᵀ over D tile by tile, then, in the epilogue
of the same program, adds L_tile R_tileᵀ (an MMA with reduction depth r) and the bias to the
accumulator before the single store. It is launched twice per training step:

- forward: P = x, Q = W, L = h0, R = s·A G, plus the bias -> y;
- backward: P = gy, Q = Wᵀ (a strided view of W), L = t, R = (s·G B)ᵀ -> gx = gy W + s·t G B.

So the adapter adds no pass over an [M, N] or [M, K] tensor: y and gx are written once, as the
frozen layer's GEMMs write them. The thin [M, r], [N, r], [r, K] products (h0, t, dA, dB, dG) are
left to torch (cuBLAS): each is a single GEMM with r as one dimension; s and G are folded into the
small [N, r] / [r, K] factors, never applied to an [M, r] activation.

Accumulation is fp32 (fp64 for fp64 inputs); fp32 inputs use TF32 only where torch allows it for
matmuls. Every tensor is addressed through its strides. On CUDA the tiles are autotuned per
(M, N, K, R, dtype) on first use; under ``TRITON_INTERPRET=1`` (CPU tensors, tests) one small fixed
16×16×16 tile is used.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import gemm_configs as _gemm_configs, grouped_tile as _grouped_tile, interpreting as _interpreting
from ._common import launches_on_device_of as _launches_on_device_of, matmul_precision as _precision
from ._common import prune_gemm_configs as _prune_gemm_configs, tuning_rows as _tuning_rows

__all__ = ["lowrank_linear_forward", "lowrank_linear_backward", "gemm_lowrank"]


@triton.jit(do_not_specialize=["M_BUCKET"])
def _gemm_lowrank_kernel(
    p_ptr, q_ptr, l_ptr, r_ptr, bias_ptr, out_ptr,
    M, C, D, R,
    stride_pm, stride_pd, stride_qc, stride_qd, stride_lm, stride_lr, stride_rc, stride_rr, stride_bias,
    stride_om, stride_oc, M_BUCKET,
    HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_D: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, GROUP: tl.constexpr,
):
    pid_m, pid_c = _grouped_tile(tl.program_id(0), M, C, BLOCK_M, BLOCK_C, GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m, mask_c = offs_m < M, offs_c < C
    rows_m, rows_c = offs_m.to(tl.int64), offs_c.to(tl.int64)  # M·D, C·D may exceed 2³¹
    p_ptrs = p_ptr + rows_m[:, None] * stride_pm + offs_d[None, :] * stride_pd
    q_ptrs = q_ptr + rows_c[:, None] * stride_qc + offs_d[None, :] * stride_qd
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        if EVEN_D:  # no D-edge predicates in the hot loop when BLOCK_D divides D
            mask_d = tl.full((BLOCK_D,), True, tl.int1)
        else:
            mask_d = offs_d < D - d0
        p = tl.load(p_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        q = tl.load(q_ptrs, mask=mask_c[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(p, tl.trans(q), acc, input_precision=PRECISION, out_dtype=ACC)
        p_ptrs += BLOCK_D * stride_pd
        q_ptrs += BLOCK_D * stride_qd
    if HAS_LOWRANK:
        # Epilogue: the adapter's L_tile R_tileᵀ joins the accumulator before the only store of the tile.
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            mask_r = offs_r < R - r0
            lo = tl.load(l_ptr + rows_m[:, None] * stride_lm + (r0 + offs_r)[None, :] * stride_lr,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            ro = tl.load(r_ptr + rows_c[:, None] * stride_rc + (r0 + offs_r)[None, :] * stride_rr,
                         mask=mask_c[:, None] & mask_r[None, :], other=0.0)
            acc = tl.dot(lo, tl.trans(ro), acc, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c * stride_bias, mask=mask_c, other=0.0).to(ACC)[None, :]
    tl.store(out_ptr + rows_m[:, None] * stride_om + offs_c[None, :] * stride_oc,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configuration

# Interpreter (CPU tests): small tiles keep it fast; tl.dot needs every dimension >= 16.
_INTERPRETER_BLOCKS = dict(BLOCK_M=16, BLOCK_C=16, BLOCK_D=16, GROUP=4)


_gemm_lowrank_tuned = triton.autotune(
    _gemm_configs("BLOCK_M", "BLOCK_C", "BLOCK_D"),
    key=["M_BUCKET", "C", "D", "R", "HAS_LOWRANK", "HAS_BIAS", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs(
        "BLOCK_D", dict(BLOCK_M=64, BLOCK_C=64, BLOCK_D=16), fma_names=("BLOCK_M", "BLOCK_C"))},
)(triton.heuristics({"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0})(_gemm_lowrank_kernel))


def _acc(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _block_r(rank: int) -> int:
    """The epilogue's rank step: a power of two in [16, 64] (tl.dot needs >= 16; larger ranks loop)."""
    return min(64, max(16, triton.next_power_of_2(max(rank, 1))))


@_launches_on_device_of
def gemm_lowrank(p: torch.Tensor, q: torch.Tensor, low: Optional[torch.Tensor], right: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``p qᵀ + low rightᵀ + bias`` [M, C] for p [M, D], q [C, D], low [M, R], right [C, R] (any strides;
    low/right/bias may be None), in one kernel: the low-rank term and bias in the GEMM's epilogue."""
    M, D = p.shape
    C = q.shape[0]
    out = torch.empty(M, C, dtype=p.dtype, device=p.device)
    if M == 0 or C == 0:
        return out
    has_lowrank = low is not None and low.shape[1] > 0
    R = low.shape[1] if has_lowrank else 0
    dummy = out
    lo, ro = (low, right) if has_lowrank else (dummy, dummy)
    args = (
        p, q, lo, ro, bias if bias is not None else dummy, out,
        M, C, D, R,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), lo.stride(0), lo.stride(1), ro.stride(0), ro.stride(1),
        bias.stride(0) if bias is not None else 0, out.stride(0), out.stride(1),
    )
    # Tuned per power of two of M and per float32 precision, as rescaled_linear's GEMMs (see _KEY there).
    meta = dict(M_BUCKET=_tuning_rows(M), HAS_LOWRANK=has_lowrank, HAS_BIAS=bias is not None, ACC=_acc(p),
                PRECISION=_precision(p), BLOCK_R=_block_r(R))
    if _interpreting(p):
        blocks = _INTERPRETER_BLOCKS
        grid = (triton.cdiv(M, blocks["BLOCK_M"]) * triton.cdiv(C, blocks["BLOCK_C"]),)
        _gemm_lowrank_kernel[grid](*args, **meta, **blocks, EVEN_D=D % blocks["BLOCK_D"] == 0)
    else:
        grid = lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(C, cfg["BLOCK_C"]),)  # noqa: E731
        _gemm_lowrank_tuned[grid](*args, **meta)
    return out


# ----------------------------------------------------------------------------------------------
# The op's kernels (same contract as csrc/lowrank_linear.h)


def _up_projection(a: torch.Tensor, g: Optional[torch.Tensor]) -> torch.Tensor:
    """A G [N, r]."""
    if g is None:
        return a
    return a * g if g.dim() == 1 else a @ g


def _down_projection(b: torch.Tensor, g: Optional[torch.Tensor]) -> torch.Tensor:
    """G B [r, K]."""
    if g is None:
        return b
    return b * g[:, None] if g.dim() == 1 else g @ b


@_launches_on_device_of
def lowrank_linear_forward(
    x2d: torch.Tensor,
    x_dropped2d: Optional[torch.Tensor],
    weight: torch.Tensor,
    a: torch.Tensor,
    g: Optional[torch.Tensor],
    b: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
):
    """(y [M, N], h0 [M, r]) with y = x Wᵀ + h0 (s·A G)ᵀ + bias and h0 = x_d Bᵀ."""
    xd = x2d if x_dropped2d is None else x_dropped2d
    h0 = xd @ b.T
    y = gemm_lowrank(x2d, weight, h0, _up_projection(a, g) * scaling, bias)
    return y, h0


@_launches_on_device_of
def lowrank_linear_backward(
    grad_y: torch.Tensor,
    x2d: torch.Tensor,
    x_dropped2d: Optional[torch.Tensor],
    weight: torch.Tensor,
    a: torch.Tensor,
    g: Optional[torch.Tensor],
    b: torch.Tensor,
    h0: torch.Tensor,
    scaling: float,
    need_x: bool,
    need_x_dropped: bool,
    need_weight: bool,
    need_a: bool,
    need_b: bool,
    need_g: bool,
):
    """(gx, gx_dropped, gw, ga, gb, gg), each None unless requested; see csrc/lowrank_linear.h.

    As there, s and G are applied to the [N, r], [r, K], [r, r] factors, not to [M, r] activations.
    """
    dropped = x_dropped2d is not None
    xd = x_dropped2d if dropped else x2d
    need_x_dropped = need_x_dropped and dropped
    need_g = need_g and g is not None
    adapter_x = need_x_dropped or (need_x and not dropped)
    gx = gxd = gw = ga = gb = gg = t = None
    if adapter_x or need_b or need_g:
        t = grad_y @ a  # [M, r]
    if need_x:
        # gx = gy W + t (s·G B): Q = Wᵀ and R = (s·G B)ᵀ as strided views, the adapter term in the epilogue.
        down = None if dropped else (_down_projection(b, g) * scaling).T
        gx = gemm_lowrank(grad_y, weight.T, None if dropped else t, down, None)
    if need_x_dropped:
        gxd = t @ (_down_projection(b, g) * scaling)
    if need_weight:
        gw = grad_y.T @ x2d
    if need_a:
        p = grad_y.T @ h0
        ga = p * scaling if g is None else (p * (g * scaling) if g.dim() == 1 else p @ (g.T * scaling))
    if need_b:
        q = t.T @ xd
        gb = q * scaling if g is None else (q * (g * scaling)[:, None] if g.dim() == 1 else (g.T * scaling) @ q)
    if need_g:
        full = (t.T @ h0) * scaling
        gg = full.diagonal().clone() if g.dim() == 1 else full
    return gx, gxd, gw, ga, gb, gg
