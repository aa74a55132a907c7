"""``svd_delta_linear``: y = x (W + U diag(d) Vᵀ)ᵀ + b — SiVA, SAM-PARSER, SVDiff (METHODS.md §2).

Two paths, chosen per call by the cost model of METHODS.md §2 (M tokens, W [N, K], rank k):

- ``"merged"``: form W_eff = W + U diag(d) Vᵀ with the fused SVD-basis scaling kernel (2·N·K·k
  FLOPs), then one GEMM; the backward uses W_eff (kept or formed again, see below) for
  gx = gy W_eff and reduces dd_j = u_jᵀ (gyᵀx) v_j from tiles of G without writing G (the C++
  kernels: from blocks of G, all of G in one block when M ≥ 4·N). Registered as
  ``subspace_ops::svd_delta_linear`` (+ ``_backward``), kernels in ``csrc/svd_delta_linear.cpp``
  and ``triton_kernels/svd_delta_linear.py``.
- ``"unmerged"``: y = x Wᵀ + ((x V) ⊙ d) Uᵀ + b, 2·M·(N+K)·k extra FLOPs, plain PyTorch GEMMs on
  every backend (nothing to fuse: each product is already one GEMM). Best for decode-size M.

``path=None`` takes "merged" when M·(N + K) ≥ N·K (forming W_eff is then no dearer than the
low-rank products), else "unmerged"; :func:`choose_path` is the rule, and layers report it.
Autograd saves x, W, U, V, d; the merged path also keeps W_eff [N, K] for the backward instead of
forming it a second time (:func:`keeps_merged_weight`) when it is at most a quarter of the size of x
[M, K], which autograd saves anyway (4·N ≤ M), or when forming it again would cost a noticeable
share of the step (6·k ≥ M). Forming it costs 2·N·K·k FLOPs, about k / (3·M) of a step: at
M = 4096, K = N = 768, k = 400 on 2 CPU threads, keeping it measured 1.4 ms faster per 48 ms step
(two runs of 60 interleaved steps), for 2.4 MB more held from forward to backward (the bench's peak:
28.5 MB vs 26.3 MB); with SAM-PARSER's full-rank k (every singular value) at M = 788 (2 CPU
threads, AMD EPYC) a step took 5.10 vs 5.75 ms at 384×384 and 21.7 vs 25.1 ms at 1536×384 (11-14%),
as fast as the reference formula, which keeps W' through autograd. Otherwise (few tokens, small k)
it is formed again, so small batches and decoding save no N×K tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._validate import (
    check_like, check_linear, check_size, check_tensor, records_gradient, refuse_double_backward, refuse_functorch,
)
from ..backends import resolve_backend
from ._dispatch import kernel_module
from ._few_rows import cpu_float32_eager, weight_product
from ._sizes import rows_to_shape, size_for_choice

__all__ = ["svd_delta_linear", "choose_path", "keeps_merged_weight", "path_flops"]

PATHS = ("merged", "unmerged")


def choose_path(tokens: int, out_features: int, in_features: int) -> str:
    """METHODS.md §2 cost rule: merge when M·(N + K)·k ≥ N·K·k."""
    return "merged" if tokens * (out_features + in_features) >= out_features * in_features else "unmerged"


def path_flops(path: str, tokens: int, out_features: int, in_features: int, rank: int,
               needs_grad: bool = True) -> int:
    """Multiply-adds of one call on ``path`` ("merged" or "unmerged"), and of its backward when
    ``needs_grad`` (W frozen): what :class:`~subspace_ops.nn.SVDLinear` weighs its basis path against.
    Merged: form W_eff (N·K·k), one GEMM, and in the backward gx, G and dd from G's tiles (N·K·k);
    unmerged: x Wᵀ plus the two low-rank products, each once more backward (gx; dd needs no G)."""
    weight_size = out_features * in_features
    if path == "merged":
        return (3 if needs_grad else 1) * tokens * weight_size + (2 if needs_grad else 1) * weight_size * rank
    return (2 if needs_grad else 1) * tokens * (weight_size + rank * (out_features + in_features))


def keeps_merged_weight(tokens: int, out_features: int, rank: int) -> bool:
    """Whether the merged path keeps W_eff [N, K] for the backward: when it is at most a quarter of
    the size of x [M, K] (4·N ≤ M), which autograd saves in any case, or when forming it again
    (2·N·K·k FLOPs, ~k / (3·M) of the step) would cost 5% of the step or more (6·k ≥ M); see the
    module docstring."""
    return 4 * out_features <= tokens or 6 * rank >= tokens


def _forward_impl(
    x: Tensor, weight: Tensor, u: Tensor, v: Tensor, d: Tensor, bias: Optional[Tensor], backend: str, keep_weight: bool
) -> tuple[Tensor, Tensor]:
    """(y, W_eff if keep_weight else an empty tensor)."""
    kernels = kernel_module(backend, "svd_delta_linear")
    x2d = x.reshape(-1, x.shape[-1])
    if keep_weight:
        w_eff = kernels.svd_basis_weight(weight, u, v, d)
        y = torch.nn.functional.linear(x2d, w_eff, bias)
    else:
        w_eff, y = weight.new_empty(0), kernels.svd_delta_linear_forward(x2d, weight, u, v, d, bias)
    return rows_to_shape(y, x.shape[:-1]), w_eff


_svd_delta_linear_op = torch.library.custom_op("subspace_ops::svd_delta_linear", mutates_args=())(_forward_impl)


@_svd_delta_linear_op.register_fake
def _(x, weight, u, v, d, bias, backend, keep_weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0]), weight.new_empty(weight.shape if keep_weight else (0,))


def _backward_impl(
    grad_y: Tensor, x: Tensor, weight: Tensor, u: Tensor, v: Tensor, d: Tensor, w_eff: Tensor, backend: str,
    need_x: bool, need_d: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (gx, gd); a gradient that was not asked for is an empty tensor. gx = gy W_eff uses the
    forward's W_eff when it kept one (non-empty), else the kernels form it again."""
    grad_y2d = grad_y.reshape(-1, grad_y.shape[-1])
    kept = w_eff.numel() > 0
    gx, gd = kernel_module(backend, "svd_delta_linear").svd_delta_linear_backward(
        grad_y2d, x.reshape(-1, x.shape[-1]), weight, u, v, d, need_x and not kept, need_d
    )
    if need_x and kept:
        gx = grad_y2d @ w_eff
    return (gx.reshape(x.shape) if need_x else x.new_empty(0), gd if need_d else d.new_empty(0))


_svd_delta_linear_backward_op = torch.library.custom_op(
    "subspace_ops::svd_delta_linear_backward", mutates_args=()
)(_backward_impl)


@_svd_delta_linear_backward_op.register_fake
def _(grad_y, x, weight, u, v, d, w_eff, backend, need_x, need_d):
    dense = torch.contiguous_format  # the kernels return contiguous gradients whatever the inputs' layout
    return (torch.empty_like(x, memory_format=dense) if need_x else x.new_empty(0),
            torch.empty_like(d, memory_format=dense) if need_d else d.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, u, v, d, bias, backend, keep_weight = inputs
    ctx.save_for_backward(x, weight, u, v, d, output[1])
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])


def _gradients(ctx, grad_y, backward_kernels):
    refuse_double_backward("svd_delta_linear")
    x, weight, u, v, d, w_eff = ctx.saved_tensors
    need_x, need_weight, need_u, need_v, need_d, need_bias = ctx.needs_input_grad[:6]
    if need_weight or need_u or need_v:
        raise RuntimeError("svd_delta_linear trains d only: weight, u and v must not require grad")
    gx = gd = gb = None
    if need_x or need_d:
        gx, gd = backward_kernels(grad_y, x, weight, u, v, d, w_eff, ctx.backend, need_x, need_d)
    if need_bias:
        gb = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    return gx if need_x else None, None, None, None, gd if need_d else None, gb, None, None


_svd_delta_linear_op.register_autograd(
    lambda ctx, grad_y, grad_w_eff: _gradients(ctx, grad_y, torch.ops.subspace_ops.svd_delta_linear_backward),
    setup_context=_setup_context,
)


class _EagerSvdDeltaLinear(torch.autograd.Function):
    """Eager-mode path: the registered op's kernels and formulas without the custom-op dispatcher's
    per-call cost; torch.compile traces ``subspace_ops::svd_delta_linear`` itself."""

    @staticmethod
    def forward(ctx, x, weight, u, v, d, bias, backend, keep_weight):
        output = _forward_impl(x, weight, u, v, d, bias, backend, keep_weight)
        _setup_context(ctx, (x, weight, u, v, d, bias, backend, keep_weight), output)
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_w_eff):
        return _gradients(ctx, grad_y, _backward_impl)


def _check_inputs(x, weight, u, v, d, bias) -> None:
    out_features, in_features = check_linear(x, weight)
    check_tensor("u", u, ndims=(2,))
    check_size("u", u, 0, out_features, "out_features = weight.shape[0]")
    check_tensor("v", v, ndims=(2,))
    check_size("v", v, 0, in_features, "in_features = weight.shape[1]")
    check_size("v", v, 1, u.shape[1], "the rank k = u.shape[1]")
    check_tensor("d", d, ndims=(1,))
    check_size("d", d, 0, u.shape[1], "the rank k = u.shape[1]")
    for name, t in (("u", u), ("v", v), ("d", d)):
        check_like(name, t, "x", x)
    if bias is not None:
        check_tensor("bias", bias, ndims=(1,))
        check_size("bias", bias, 0, out_features, "out_features = weight.shape[0]")
        check_like("bias", bias, "x", x)
    for name, t in (("weight", weight), ("u", u), ("v", v)):
        if t.requires_grad:
            raise ValueError(f"{name} must be frozen (requires_grad=False): svd_delta_linear trains d only")


def _unmerged_without_gradient(x: Tensor, weight: Tensor, u: Tensor, v: Tensor, d: Tensor,
                               bias: Optional[Tensor]) -> Tensor:
    """The unmerged path of a cpu-backend float32 call that records no gradient (decoding): its three
    products with W, V and U on the few-rows loops where they have a few rows (ops/_few_rows.py),
    summed into one [M, N] buffer."""
    x2 = x.reshape(-1, x.shape[-1])
    y = weight_product(x2, weight, True, True)
    y.add_(weight_product(weight_product(x2, v, False, True) * d, u, True, True))
    if bias is not None:
        y.add_(bias)
    return rows_to_shape(y, x.shape[:-1])


def svd_delta_linear(
    x: Tensor,
    weight: Tensor,
    u: Tensor,
    v: Tensor,
    d: Tensor,
    bias: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
    path: Optional[str] = None,
) -> Tensor:
    """``y = x (W + U diag(d) Vᵀ)ᵀ + bias`` with frozen W [N, K], U [N, k], V [K, k] and trained d [k].

    ``path``: "merged", "unmerged" or None for :func:`choose_path` (the reference backend, the
    paper's formula, ignores it). ``backend``: as every op (the unmerged path is the same PyTorch
    GEMMs on every backend). Returns ``[..., N]``.
    """
    _check_inputs(x, weight, u, v, d, bias)
    if path is not None and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
    name = resolve_backend(backend, x.device)
    if name == "reference":
        return reference.svd_delta_linear(x, weight, u, v, d, bias)
    tokens = size_for_choice(x.numel() // max(x.shape[-1], 1))
    if (path or choose_path(tokens, *weight.shape)) == "unmerged":
        if cpu_float32_eager(name, x.dtype) and not records_gradient(x, d, bias):
            return _unmerged_without_gradient(x, weight, u, v, d, bias)
        return torch.nn.functional.linear(x, weight, bias) + ((x @ v) * d) @ u.T
    keep_weight = keeps_merged_weight(tokens, weight.shape[0], u.shape[1])
    if torch.compiler.is_compiling():
        return torch.ops.subspace_ops.svd_delta_linear(x, weight, u, v, d, bias, name, keep_weight)[0]
    refuse_functorch("svd_delta_linear")
    return _EagerSvdDeltaLinear.apply(x, weight, u, v, d, bias, name, keep_weight)[0]
