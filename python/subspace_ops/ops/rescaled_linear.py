"""``rescaled_linear``: y = x (W ⊙ (c + S_l S_rᵀ))ᵀ + b — RLRR, SSB, SSL, (IA)³ (METHODS.md §1).

This file is the op's public function, its ``torch.library`` registration (``subspace_ops::``
namespace, fake kernels for ``torch.compile``) and its autograd formula, shared by the registered
op (used under ``torch.compile``) and an ``autograd.Function`` over the same kernels (the triton
backend's eager path, where the custom-op dispatcher's per-call cost is measurable on small layers;
the cpu backend's eager path is the same node in C++, ``csrc/rescaled_linear_autograd.cpp``). The
math lives in the kernels: ``csrc/rescaled_linear.cpp`` (backend "cpu") and ``triton_kernels/rescaled_linear.py``
(backend "triton"); ``subspace_ops.reference.rescaled_linear`` is the ground truth.

Autograd saves x, W, S_l, S_r (what full fine-tuning of a linear layer saves, plus two vectors):
no N×K tensor is saved, and the kernels never write W' or G = gyᵀx.

Three paths (``path=``; :func:`choose_path` picks one when None, and the layers report the rule):

- ``"modulated"``: the fused kernels above, for any c and rank r. A training step costs the three
  GEMMs of full fine-tuning (the scale gradients need G) plus passes over W. On the ``cpu`` backend,
  float32 with up to 512 tokens on an AVX-512 or AVX2 + FMA CPU runs GEMMs of its own
  (``csrc/rescaled_linear_gemm_kernels.inc``) that form W' while packing it and reduce G while it is in
  registers, so those passes vanish; otherwise (float64, 16-bit, more tokens, other CPUs) ATen's GEMMs
  over blocks of W'. ``subspace_ops.backend_report()`` says which this CPU runs.
- ``"separable"`` (the default without the residual, at rank 1, in float32/float64: SSB, SSL, (IA)³
  in full precision; see :func:`choose_path` for 16-bit dtypes): W' = diag(s_l) W diag(s_r),
  so y = ((x ⊙ s_r) Wᵀ) ⊙ s_l + b: one plain GEMM on the frozen W between two feature scalings, on
  every backend (nothing to fuse; the GEMM is torch's). The backward is one more GEMM,
  u = (gy ⊙ s_l) W, with gx = u ⊙ s_r, ds_r = Σ_m x ⊙ u and ds_l = Σ_m gy ⊙ z, z = (x ⊙ s_r) Wᵀ:
  two GEMMs per step instead of three, and no G. Autograd saves z [.., N] when s_l is trained (as
  PEFT's (IA)³ saves its base layer's output) instead of nothing N-sized. A call that needs no
  gradient (evaluation) writes y over z, and on the ``cpu`` backend's own float32 GEMMs (below) takes
  the modulated path beyond 8 tokens: forming W' while packing it costs less than the two scalings.
- ``"stacked"`` (the default of the ``cpu`` backend for a few tokens, M·(c + r) ≤ 16 in float32
  where the own GEMMs run (≤ 8 in a call without gradients), ≤ 48 otherwise, in float32/float64:
  decoding, tiny batches):
  W' = c·W + Σ_j diag(s_l[:, j]) W diag(s_r[:, j]), so the c + r input blocks
  [c·x; x ⊙ s_r[:, 1]; …] go through one GEMM with the frozen W, whose output blocks are scaled by
  s_l and summed; the backward is one more GEMM of the stacked [c·gy; gy ⊙ s_l[:, 1]; …] with W.
  With so few rows a GEMM costs about one read of W however many rows it has, and this reads W
  twice per step where the modulated kernels read it three times (and, on ATen GEMMs, write W'
  twice). Measured fwd+bwd on 2 CPU threads at K = N = 768 (``subspace-ops bench rescaled-linear
  --shape M,768,768`` has both rows): against the ATen-based modulated kernels, RLRR rank 1
  1.35-1.45× faster at M = 1-4, 1.1× at M = 16, even at M = 32, slower beyond; rank 3 (timm's
  fused qkv) 1.3-1.45× faster at M = 1-4, even at M = 12. Against the own float32 GEMMs (AVX-512),
  rank 1: 1.1-1.25× faster at M = 1-4, 1.2-1.4× slower at M = 8-24; since those run under a C++
  autograd node (2026-12-01) the two paths take the same time at M = 1-4 (0.95-1.05×, two runs),
  so the bound of 8 rows is kept for its smaller reads of W. With the AVX2 build of those GEMMs
  (AMD EPYC Zen 3, 2026-12-03) the two also tie at M = 1 and 4 (1.39 vs 1.38 ms, 1.39 vs 1.29 ms
  fwd+bwd), so the same bound holds there. Since the stacked products with W run on the few-rows
  loops in float32 (``ops/_few_rows.py``: W read once; before, MKL's GEMM took 2-4× a GEMV with 2-8
  rows on that CPU), stacked vs modulated per step on the AVX2 VM (2 threads, 2026-12-03, µs,
  fwd+bwd / without gradients): K = N = 768 rank 1 at 2 stacked rows 471 vs 605 / 133 vs 184, 8 rows
  551 vs 651 / 201 vs 187, 16 rows 712 vs 761 / 281 vs 222, 24 rows 967 vs 828; rank 3 at 16 rows
  817 vs 857 / 317 vs 228; K = N = 4096 rank 1 at 2 rows 4.6 vs 45.9 ms / 1.4 vs 6.0 ms (the
  modulated step reduces the scale gradients over all N·K elements of G, ~45 ms there at any M ≤
  16), 16 rows 13.6 vs 49.6 / 5.4 vs 7.2. Hence 16 stacked rows with a gradient and 8 without.
  On a GPU the Triton kernels already read W once, so the rule keeps them there. Autograd saves the
  stacked GEMM output [(c + r)·M, N] when s_l is trained.

The paths agree up to rounding on finite inputs. With an infinite input they may differ in kind:
the separable and stacked paths sum the blocks' products, so an infinite x can give inf − inf = NaN
where the modulated kernels (and the reference, which forms W') give ±inf; PEFT's unmerged LoRA
does the same. Either way the output is non-finite, which AMP's GradScaler treats alike.
The reference backend has no paths (it forms W') and ignores ``path``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._validate import (
    check_like, check_linear, check_size, check_tensor, records_gradient, refuse_double_backward, refuse_functorch,
)
from ..backends import resolve_backend_for
from ._dispatch import kernel_module
from ._few_rows import cpu_float32_eager, weight_product
from ._sizes import rows_to_shape, size_for_choice

__all__ = ["rescaled_linear", "choose_path", "cpu_stacked_max_tokens"]

PATHS = ("modulated", "separable", "stacked")

# The stacked path is the cpu backend's default while M·(c + r) ≤ this many stacked rows (see the
# module docstring for the measurements behind it): against the modulated kernels on ATen GEMMs
# (float64, or CPUs without AVX2), and against the own float32 GEMMs (AVX-512 or AVX2), which pack W'
# as they go, in a training call and in one without gradients.
CPU_STACKED_MAX_ROWS = 48
CPU_STACKED_MAX_ROWS_OWN_GEMMS = 16
CPU_STACKED_MAX_ROWS_OWN_GEMMS_FORWARD_ONLY = 8
# SSB/SSL/(IA)³ calls without gradients stay separable up to this many tokens on the cpu backend's own
# float32 GEMMs (its product runs on the few-rows loops there), and take the modulated kernels beyond.
CPU_SEPARABLE_FORWARD_ONLY_MAX_TOKENS = 16


@functools.lru_cache(maxsize=None)
def _cpu_own_gemm_rows() -> int:
    """The extension's answer, asked once: choose_path runs on every call."""
    from ..backends import BackendUnavailableError, cpu_extension

    try:
        return cpu_extension().rescaled_linear_gemm_rows()
    except BackendUnavailableError:
        return 0


# A property of the machine: Dynamo runs it eagerly and keeps the answer as a constant.
@torch.compiler.assume_constant_result
def _cpu_float32_gemms_are_own() -> bool:
    return _cpu_own_gemm_rows() > 0


def cpu_stacked_max_tokens(residual: bool, rank: int, dtype: torch.dtype = torch.float32,
                           needs_grad: bool = True) -> int:
    """The most tokens M for which the cpu backend stacks by default: M·(c + r) ≤ the stacked-row
    bound for ``dtype`` on this CPU (for float32 where the own GEMMs run CPU_STACKED_MAX_ROWS_OWN_GEMMS,
    or CPU_STACKED_MAX_ROWS_OWN_GEMMS_FORWARD_ONLY for a call without gradients; else CPU_STACKED_MAX_ROWS)."""
    if dtype == torch.float32 and _cpu_float32_gemms_are_own():
        rows = CPU_STACKED_MAX_ROWS_OWN_GEMMS if needs_grad else CPU_STACKED_MAX_ROWS_OWN_GEMMS_FORWARD_ONLY
    else:
        rows = CPU_STACKED_MAX_ROWS
    return rows // (rank + int(residual))


def _forward_only_modulates(dtype: torch.dtype, tokens: Optional[int], backend: Optional[str]) -> bool:
    """Whether a separable (SSB/SSL/(IA)³) call that needs no gradient runs faster modulated: on the
    cpu backend's own float32 GEMMs beyond CPU_SEPARABLE_FORWARD_ONLY_MAX_TOKENS, where packing W'
    costs less than the separable path's scalings of x and z. Measured without gradients (2 threads,
    AVX2, 2026-12-03; ``subspace-ops bench scaled-linear --mode inference``, K = N = 768): separable vs
    modulated 0.715 vs 0.620 ms at M = 64, 1.94 vs 1.55 at 197, 27.9 vs 27.0 at 4096; with the
    separable product on the few-rows loops (``ops/_few_rows.py``), µs at K = N = 768 / 4096:
    188 vs 245 / 3072 vs 6627 at M = 8, 207 vs 249 / 5463 vs 7876 at 16, 337 vs 297 / 10668 vs 9267
    at 24. With a gradient the separable path's two GEMMs beat three. float64 (ATen GEMMs over blocks
    of W') measured the other way at M = 48-197 (2.87 vs 3.04 ms at 197), and on a GPU it is
    unmeasured, so both keep the separable path."""
    return (backend == "cpu" and dtype == torch.float32 and tokens is not None and _cpu_float32_gemms_are_own()
            and tokens > CPU_SEPARABLE_FORWARD_ONLY_MAX_TOKENS)


def choose_path(residual: bool, rank: int, dtype: torch.dtype = torch.float32, tokens: Optional[int] = None,
                backend: Optional[str] = None, needs_grad: bool = True) -> str:
    """The path ``rescaled_linear`` takes when ``path=None``.

    "separable" where W' = diag(s_l) W diag(s_r) (no residual, rank 1) in float32/float64, except a
    call that needs no gradient (``needs_grad=False``: evaluation, ``torch.no_grad``) on the ``cpu``
    backend in float32 where the own GEMMs run, with more than CPU_SEPARABLE_FORWARD_ONLY_MAX_TOKENS
    tokens: that one is "modulated", whose GEMM forms W' while packing it
    where the separable path scales x and z in two more passes over activations and allocates z
    beside y; else "stacked" on the ``cpu`` backend when ``tokens`` (M) · (c + r) ≤ the bound of
    :func:`cpu_stacked_max_tokens` in
    float32/float64; else "modulated". In 16-bit dtypes the separable and stacked paths would round
    their GEMM outputs to 16 bits before the s_l scale, where the modulated kernels round W' (formed
    in fp32) once, as a merged layer does; so there the default stays with the kernels (``path=``
    still forces either)."""
    full_precision = dtype in (torch.float32, torch.float64)
    if not residual and rank == 1 and full_precision:
        if not needs_grad and _forward_only_modulates(dtype, tokens, backend):
            return "modulated"
        return "separable"
    stacks = backend == "cpu" and full_precision and tokens is not None
    if stacks and tokens <= cpu_stacked_max_tokens(residual, rank, dtype, needs_grad):
        return "stacked"
    return "modulated"


def _separable_forward(x: Tensor, weight: Tensor, s_l: Optional[Tensor], s_r: Optional[Tensor],
                       bias: Optional[Tensor], keep_z: bool, few_rows: bool) -> tuple[Tensor, Optional[Tensor]]:
    """(y, z) with y = z ⊙ s_l + b, z = (x ⊙ s_r) Wᵀ (as [M, N]) for rank-1 scales (None = ones). z is
    returned only when ``keep_z`` and s_l is given (s_l's gradient needs it); otherwise y is written
    over z, so the call allocates one M×N tensor, as a plain linear layer does."""
    x2 = x.reshape(-1, x.shape[-1])
    s_l1 = None if s_l is None else s_l.reshape(-1)
    z = weight_product(x2, weight, True, few_rows, None if s_r is None else s_r.reshape(-1))
    if s_l1 is None:
        return (z if bias is None else z.add_(bias)), None
    if keep_z:
        return (z * s_l1 if bias is None else torch.addcmul(bias, z, s_l1)), z
    return (z.mul_(s_l1) if bias is None else torch.addcmul(bias, z, s_l1, out=z)), None


class _Separable(torch.autograd.Function):
    """y = ((x ⊙ s_r) Wᵀ) ⊙ s_l + b for rank-1 scales (None = ones), in as few passes over
    activations as torch ops allow: a scale that feeds a GEMM rides on whichever operand is smaller
    (:func:`~subspace_ops.ops._few_rows.weight_product`), and z = (x ⊙ s_r) Wᵀ is kept only when s_l
    is trained (its gradient is Σ_m gy ⊙ z). With a few tokens on the cpu backend in float32 the
    products with W run on the few-rows loops (``few_rows``). A call that needs no gradient skips this
    node: :func:`_separable_forward`."""

    @staticmethod
    def forward(ctx, x, weight, s_l, s_r, bias, few_rows):
        need_x, need_weight, need_s_l, need_s_r, _, _ = ctx.needs_input_grad
        y, z = _separable_forward(x, weight, s_l, s_r, bias, keep_z=need_s_l, few_rows=few_rows)
        ctx.save_for_backward(x.reshape(-1, x.shape[-1]) if (need_s_r or need_weight) else None, weight,
                              None if s_l is None else s_l.reshape(-1), None if s_r is None else s_r.reshape(-1), z)
        ctx.shapes = (x.shape, None if s_l is None else s_l.shape, None if s_r is None else s_r.shape)
        ctx.few_rows = few_rows
        return rows_to_shape(y, x.shape[:-1])

    @staticmethod
    def backward(ctx, grad_y):
        refuse_double_backward("rescaled_linear (separable path)")
        x2, weight, s_l1, s_r1, z = ctx.saved_tensors
        x_shape, s_l_shape, s_r_shape = ctx.shapes
        need_x, need_weight, need_s_l, need_s_r, need_bias, _ = ctx.needs_input_grad
        gy = grad_y.reshape(-1, grad_y.shape[-1])
        gx = gw = gs_l = gs_r = gb = None
        if need_s_l:
            gs_l = torch.linalg.vecdot(gy, z, dim=0).reshape(s_l_shape)  # Σ_m gy ⊙ z
        if need_bias:
            gb = gy.sum(0)
        if need_x or need_s_r:
            u = weight_product(gy, weight, False, ctx.few_rows, s_l1)  # (gy ⊙ s_l) W
            if need_s_r:
                gs_r = torch.linalg.vecdot(u, x2, dim=0).reshape(s_r_shape)  # Σ_m u ⊙ x
            if need_x:
                gx = (u if s_r1 is None else u.mul_(s_r1)).reshape(x_shape)
        if need_weight:
            gy_l = gy if s_l1 is None else gy * s_l1
            gw = gy_l.T @ (x2 if s_r1 is None else x2 * s_r1)
        return gx, gw, gs_l, gs_r, gb, None


def _scale_columns(scale: Optional[Tensor], length: int) -> Optional[Tensor]:
    """A scale as [L, r] columns (a view); None stays None (ones, not trained)."""
    return None if scale is None else scale.reshape(length, -1)


def _stack_blocks(rows: Tensor, scale: Optional[Tensor], rank: int, residual: bool) -> Tensor:
    """[c·rows; rows ⊙ scale[:, 0]; …; rows ⊙ scale[:, r-1]]: ((c + r)·M, L) for rows [M, L], scale
    [L, r] (None: ones)."""
    blocks = [rows] if residual else []
    blocks += [rows] * rank if scale is None else [rows * scale[:, j] for j in range(rank)]
    return torch.cat(blocks) if len(blocks) > 1 else blocks[0]


def _row_blocks(stacked: Tensor, count: int) -> tuple[Tensor, ...]:
    """The ``count`` M-row blocks of stacked (count·M, L), as views. Not ``chunk``: it sizes its pieces
    as ceil(count·M / count), which with a symbolic M (torch.export) is a guard that pins M to the
    example's value; this view's -1 is an exact division, true at every M, and as fast in eager."""
    return stacked.view(count, -1, stacked.shape[-1]).unbind()


def _combine_blocks(stacked: Tensor, scale: Optional[Tensor], rank: int, residual: bool) -> Tensor:
    """c·B_0 + Σ_j B_{c+j} ⊙ scale[:, j] for the M-row blocks B of stacked ((c + r)·M, L)."""
    blocks = _row_blocks(stacked, rank + int(residual))
    scaled = blocks[int(residual):]
    if scale is None:
        out = scaled[0] + blocks[0] if residual else scaled[0].clone()
    else:
        out = torch.addcmul(blocks[0], scaled[0], scale[:, 0]) if residual else scaled[0] * scale[:, 0]
    for j in range(1, rank):  # r is small (1 for most layers, 3 for a fused qkv)
        out = out.add_(scaled[j]) if scale is None else out.addcmul_(scaled[j], scale[:, j])
    return out


def _column_dots(stacked: Tensor, rows: Tensor, rank: int, residual: bool) -> Tensor:
    """[L, r]: column j = Σ_m B_{c+j} ⊙ rows over the M-row blocks B of stacked ((c + r)·M, L)."""
    scaled = _row_blocks(stacked, rank + int(residual))[int(residual):]
    return torch.stack([torch.linalg.vecdot(block, rows, dim=0) for block in scaled], dim=1)


def _stacked_forward(x2: Tensor, weight: Tensor, s_l_cols: Optional[Tensor], s_r_cols: Optional[Tensor],
                     bias: Optional[Tensor], residual: bool, rank: int, few_rows: bool) -> tuple[Tensor, Tensor]:
    """(y, z) for rows x2 [M, K] and [L, r] scale columns (None = ones): z = [c·x2; x2 ⊙ s_r[:, j]…] Wᵀ,
    one GEMM of the stacked blocks ([(c + r)·M, N]; s_l's gradient needs it), and y its blocks combined
    with s_l, plus the bias."""
    z = weight_product(_stack_blocks(x2, s_r_cols, rank, residual), weight, True, few_rows)
    y = _combine_blocks(z, s_l_cols, rank, residual)
    return (y if bias is None else y.add_(bias)), z


class _Stacked(torch.autograd.Function):
    """y = c·x Wᵀ + Σ_j ((x ⊙ s_r[:, j]) Wᵀ) ⊙ s_l[:, j] + b as one GEMM of the stacked input blocks
    with W (see the module docstring); the backward is one GEMM of the stacked gradient blocks with W
    (and, only if W is trained, one for dW = Σ_blocks gy_blockᵀ x_block). Few ops on purpose: at the
    sizes this path is for, each torch call's own cost is a visible part of the step. A call that
    needs no gradient skips this node: :func:`_stacked_forward`."""

    @staticmethod
    def forward(ctx, x, weight, s_l, s_r, bias, residual, rank, few_rows):
        out_features, in_features = weight.shape
        x2 = x.reshape(-1, in_features)
        s_l_cols, s_r_cols = _scale_columns(s_l, out_features), _scale_columns(s_r, in_features)
        y, z = _stacked_forward(x2, weight, s_l_cols, s_r_cols, bias, residual, rank, few_rows)
        need_x, need_weight, need_s_l, need_s_r, _, _, _, _ = ctx.needs_input_grad
        ctx.save_for_backward(x2 if (need_s_r or need_weight) else None, weight, s_l_cols, s_r_cols,
                              z if need_s_l else None)
        ctx.meta = (residual, rank, few_rows, x.shape, None if s_l is None else s_l.shape,
                    None if s_r is None else s_r.shape)
        return rows_to_shape(y, x.shape[:-1])

    @staticmethod
    def backward(ctx, grad_y):
        refuse_double_backward("rescaled_linear (stacked path)")
        x2, weight, s_l_cols, s_r_cols, z = ctx.saved_tensors
        residual, rank, few_rows, x_shape, s_l_shape, s_r_shape = ctx.meta
        need_x, need_weight, need_s_l, need_s_r, need_bias, _, _, _ = ctx.needs_input_grad
        gy = grad_y.reshape(-1, grad_y.shape[-1])
        gx = gw = gs_l = gs_r = gb = None
        if need_s_l:
            gs_l = _column_dots(z, gy, rank, residual).reshape(s_l_shape)  # Σ_m gy ⊙ (x ⊙ s_r[:, j]) Wᵀ
        if need_bias:
            gb = gy.sum(0)
        if need_x or need_s_r or need_weight:
            stacked_gy = _stack_blocks(gy, s_l_cols, rank, residual)
            if need_x or need_s_r:
                u = weight_product(stacked_gy, weight, False, few_rows)  # [(c + r)·M, K]
                if need_s_r:
                    gs_r = _column_dots(u, x2, rank, residual).reshape(s_r_shape)  # Σ_m x ⊙ (gy ⊙ s_l[:, j]) W
                if need_x:
                    gx = _combine_blocks(u, s_r_cols, rank, residual).reshape(x_shape)
            if need_weight:
                gw = stacked_gy.T @ _stack_blocks(x2, s_r_cols, rank, residual)
        return gx, gw, gs_l, gs_r, gb, None, None, None


def _forward_impl(
    x: Tensor, weight: Tensor, s_l: Tensor, s_r: Tensor, bias: Optional[Tensor], residual: bool, backend: str
) -> Tensor:
    kernels = kernel_module(backend, "rescaled_linear")
    y = kernels.rescaled_linear_forward(x.reshape(-1, x.shape[-1]), weight, s_l, s_r, bias, residual)
    return rows_to_shape(y, x.shape[:-1])


_rescaled_linear_op = torch.library.custom_op("subspace_ops::rescaled_linear", mutates_args=())(_forward_impl)


@_rescaled_linear_op.register_fake
def _(x, weight, s_l, s_r, bias, residual, backend):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _backward_impl(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    s_l: Tensor,
    s_r: Tensor,
    residual: bool,
    backend: str,
    need_x: bool,
    need_weight: bool,
    need_scales: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (gx, gw, gs_l, gs_r); a gradient that was not asked for is an empty tensor."""
    gx, gw, gs_l, gs_r = kernel_module(backend, "rescaled_linear").rescaled_linear_backward(
        grad_y.reshape(-1, grad_y.shape[-1]),
        x.reshape(-1, x.shape[-1]),
        weight,
        s_l,
        s_r,
        residual,
        need_x,
        need_weight,
        need_scales,
    )
    return (
        gx.reshape(x.shape) if need_x else x.new_empty(0),
        # contiguous as the fake kernel says (the cpu kernels return a transposed weight's gradient transposed)
        gw.contiguous() if need_weight else x.new_empty(0),
        gs_l if need_scales else x.new_empty(0),
        gs_r if need_scales else x.new_empty(0),
    )


_rescaled_linear_backward_op = torch.library.custom_op(
    "subspace_ops::rescaled_linear_backward", mutates_args=()
)(_backward_impl)


@_rescaled_linear_backward_op.register_fake
def _(grad_y, x, weight, s_l, s_r, residual, backend, need_x, need_weight, need_scales):
    dense = torch.contiguous_format  # the kernels return contiguous gradients whatever the inputs' layout
    return (
        torch.empty_like(x, memory_format=dense) if need_x else x.new_empty(0),
        torch.empty_like(weight, memory_format=dense) if need_weight else x.new_empty(0),
        torch.empty_like(s_l, memory_format=dense) if need_scales else x.new_empty(0),
        torch.empty_like(s_r, memory_format=dense) if need_scales else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, s_l, s_r, bias, residual, backend = inputs
    ctx.save_for_backward(x, weight, s_l, s_r)
    ctx.residual = residual
    ctx.backend = backend


def _gradients(ctx, grad_y, backward_kernels):
    refuse_double_backward("rescaled_linear")
    x, weight, s_l, s_r = ctx.saved_tensors
    need_x, need_weight, need_s_l, need_s_r, need_bias = ctx.needs_input_grad[:5]
    need_scales = need_s_l or need_s_r
    gx = gw = gs_l = gs_r = gb = None
    if need_x or need_weight or need_scales:
        gx, gw, gs_l, gs_r = backward_kernels(
            grad_y, x, weight, s_l, s_r, ctx.residual, ctx.backend, need_x, need_weight, need_scales
        )
    if need_bias:
        gb = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    return (
        gx if need_x else None,
        gw if need_weight else None,
        gs_l if need_s_l else None,
        gs_r if need_s_r else None,
        gb,
        None,
        None,
    )


_rescaled_linear_op.register_autograd(
    lambda ctx, grad_y: _gradients(ctx, grad_y, torch.ops.subspace_ops.rescaled_linear_backward),
    setup_context=_setup_context,
)


class _EagerRescaledLinear(torch.autograd.Function):
    """The triton backend's eager path: the same kernels and gradient formulas as the registered op,
    minus the custom-op dispatcher's per-call cost. Under torch.compile the registered op is used, so
    graphs see ``subspace_ops::rescaled_linear``.

    The cpu backend's eager path is this node written in C++ (``csrc/rescaled_linear_autograd.cpp``,
    ``_C.rescaled_linear_autograd``): on a CPU the small tensor ops and the Python around the kernels
    run right after a GEMM has evicted their working set from the caches, where each costs 10-20 µs;
    at M=197, K=N=768 this Python node and its scale reshapes added 0.2-0.25 ms to a ~3 ms step."""

    @staticmethod
    def forward(ctx, x, weight, s_l, s_r, bias, residual, backend):
        _setup_context(ctx, (x, weight, s_l, s_r, bias, residual, backend), None)
        return _forward_impl(x, weight, s_l, s_r, bias, residual, backend)

    @staticmethod
    def backward(ctx, grad_y):
        return _gradients(ctx, grad_y, _backward_impl)


def _check_inputs(x, weight, s_l, s_r, bias) -> None:
    out_features, in_features = check_linear(x, weight)
    ranks = {}
    for name, scale, length, what in (
        ("s_l", s_l, out_features, "out_features = weight.shape[0]"),
        ("s_r", s_r, in_features, "in_features = weight.shape[1]"),
    ):
        if scale is None:
            continue
        check_tensor(name, scale, ndims=(1, 2))
        check_size(name, scale, 0, length, what)
        check_like(name, scale, "x", x)
        if scale.dim() == 2 and scale.shape[1] < 1:
            raise ValueError(f"{name} must have rank >= 1 columns, got shape {tuple(scale.shape)}")
        ranks[name] = scale.shape[1] if scale.dim() == 2 else 1
    if len(set(ranks.values())) > 1:
        raise ValueError(f"s_l and s_r must have the same rank r (a vector is r = 1), got s_l {tuple(s_l.shape)} "
                         f"and s_r {tuple(s_r.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndims=(1,))
        check_size("bias", bias, 0, out_features, "out_features = weight.shape[0]")
        check_like("bias", bias, "x", x)


def _route(x: Tensor, s_l: Optional[Tensor], s_r: Optional[Tensor], residual: bool, backend: Optional[str],
           path: Optional[str], needs_grad: bool) -> tuple[str, Optional[str], int]:
    """(backend, path, rank r) of a call: the path is None for the reference backend.

    Cheap on purpose: on a CPU each Python call here runs right after the previous layer's GEMM has
    evicted the interpreter's working set, where it costs 5-20 µs (measured at M = 197, K = N = 768:
    the argument checks ~20 µs, backend resolution ~20 µs, this choice ~8 µs)."""
    rank = _rank(s_l, s_r)
    if path is not None:
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
        if path == "separable" and (residual or rank != 1):
            raise ValueError(f"path='separable' needs residual=False and rank-1 scales, got residual={residual}, "
                             f"rank {rank}")
    name = resolve_backend_for(backend, "cpu" if x.is_cpu else x.device.type)
    if name == "reference":
        return name, None, rank
    tokens = size_for_choice(x.numel() // max(x.shape[-1], 1))
    return name, path or choose_path(residual, rank, x.dtype, tokens, name, needs_grad), rank


def _rank(s_l: Optional[Tensor], s_r: Optional[Tensor]) -> int:
    """r of [L, r] scales; 1 for vectors and None."""
    if s_l is not None and s_l.dim() == 2:
        return s_l.shape[1]
    if s_r is not None and s_r.dim() == 2:
        return s_r.shape[1]
    return 1


def _scale_matrix(scale: Optional[Tensor], length: int, rank: int, like: Tensor) -> Tensor:
    """The kernels take [L, r] scales; an absent (untrained) scale is a column of ones."""
    if scale is None:
        return torch.ones(length, rank, dtype=like.dtype, device=like.device)
    return (scale.unsqueeze(-1) if scale.dim() == 1 else scale).contiguous()


def rescaled_linear(
    x: Tensor,
    weight: Tensor,
    s_l: Optional[Tensor] = None,
    s_r: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    residual: bool = True,
    backend: Optional[str] = None,
    path: Optional[str] = None,
) -> Tensor:
    """``y = x (W ⊙ (c + s_l s_rᵀ))ᵀ + bias`` with ``c = 1 if residual else 0``, never forming W ⊙ (…).

    Args:
        x: ``[..., K]`` input.
        weight: ``[N, K]`` (frozen for RLRR/SSB/SSL/(IA)³; a gradient is computed only if it
            requires grad).
        s_l: ``[N]`` or ``[N, r]`` output-side scale, or None for ones (not trained).
        s_r: ``[K]`` or ``[K, r]`` input-side scale, or None for ones (not trained).
        bias: ``[N]`` or None.
        residual: RLRR's ``W + s_l ⊙ W ⊙ s_r`` (True) or the plain ``s_l ⊙ W ⊙ s_r`` of SSB/SSL/(IA)³.
        backend: "reference", "cpu", "triton" or None (best available; see :mod:`subspace_ops.backends`).
        path: "modulated", "separable" (only without the residual and at rank 1), "stacked" or None
            for :func:`choose_path`; see the module docstring. The reference backend ignores it.

    All tensors must share x's dtype and device. Returns ``[..., N]``.
    """
    compiling = torch.compiler.is_compiling()
    needs_grad = records_gradient(x, weight, s_l, s_r, bias)  # before the argument checks: tolerant
    if compiling:
        _check_inputs(x, weight, s_l, s_r, bias)
        name, chosen, rank = _route(x, s_l, s_r, residual, backend, path, needs_grad)
    else:
        try:
            name, chosen, rank = _route(x, s_l, s_r, residual, backend, path, needs_grad)
            if name != "reference":
                refuse_functorch("rescaled_linear")
            if name == "cpu" and chosen == "modulated":
                # The C++ node checks every argument itself (its kernels index memory by them), so
                # the Python checks run only once it has raised, to name the wrong argument: run
                # before every call they cost ~20 µs at M = 197 (see _route).
                return kernel_module(name, "rescaled_linear").rescaled_linear_autograd(
                    x, weight, s_l, s_r, bias, residual)
        except Exception:
            try:
                _check_inputs(x, weight, s_l, s_r, bias)
            except (TypeError, ValueError) as bad_input:
                raise bad_input from None  # the argument-naming error, not the kernel's
            raise
        _check_inputs(x, weight, s_l, s_r, bias)  # the other paths' torch ops would broadcast bad shapes
    if name == "reference":
        return reference.rescaled_linear(x, weight, s_l, s_r, bias, residual=residual)
    few_rows = cpu_float32_eager(name, x.dtype)
    if chosen == "separable":
        if not needs_grad:
            y = _separable_forward(x, weight, s_l, s_r, bias, keep_z=False, few_rows=few_rows)[0]
            return rows_to_shape(y, x.shape[:-1])
        return _Separable.apply(x, weight, s_l, s_r, bias, few_rows)
    if chosen == "stacked":
        if not needs_grad:
            out_features, in_features = weight.shape
            y = _stacked_forward(x.reshape(-1, in_features), weight, _scale_columns(s_l, out_features),
                                 _scale_columns(s_r, in_features), bias, residual, rank, few_rows)[0]
            return rows_to_shape(y, x.shape[:-1])
        return _Stacked.apply(x, weight, s_l, s_r, bias, residual, rank, few_rows)
    out_features, in_features = weight.shape
    args = (x, weight, _scale_matrix(s_l, out_features, rank, x), _scale_matrix(s_r, in_features, rank, x), bias,
            residual, name)
    if compiling:
        return torch.ops.subspace_ops.rescaled_linear(*args)
    return _EagerRescaledLinear.apply(*args)
