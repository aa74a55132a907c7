"""``lowrank_linear``: y = x Wᵀ + s·((dropout(x) Bᵀ) Gᵀ) Aᵀ + b: LoRA, AdaLoRA/TriLoRA, FLoRA (METHODS.md §4).

``W [N, K]`` (frozen unless it requires grad), ``A [N, r]``, ``B [r, K]`` and ``G`` absent (LoRA,
G = I), a vector ``[r]`` (AdaLoRA/TriLoRA, G = diag(g)) or a free ``[r, r]`` matrix (FLoRA), so
ΔW = s·A G B. ΔW is never formed: the adapter path is two thin products through an ``[M, r]``
activation, fused into the frozen layer's GEMM:

- backend "cpu" (``csrc/lowrank_linear.cpp``): ``y = addmm(b, x, Wᵀ)`` then, in place,
  ``y += s·h0 (A G)ᵀ`` with ``h0 = x_d Bᵀ [M, r]`` (the GEMM's alpha carries s); the backward writes
  ``gx = gy W`` and adds ``s·t (G B)`` into it (``t = gy A [M, r]``). No [M, N] tensor besides y, no
  [N, K] tensor unless dW is asked for; s and G only ever scale the small [N, r] / [r, K] factors.
- backend "triton" (``triton_kernels/lowrank_linear.py``): one GEMM kernel whose epilogue adds
  ``h0 (s·A G)ᵀ`` and the bias to each output tile before it is stored; the same kernel computes
  ``gx = gy W + t (s·G B)``. The thin products h0, t and the small gradients use torch.

Dropout (LoRA's ``lora_dropout``, applied to the adapter's input only): the mask is drawn in Python
with ``torch.nn.functional.dropout`` — the same call, on the same RNG stream, as
:func:`subspace_ops.reference.lowrank_linear` — and the dropped input ``x_d`` is passed to the op
next to ``x``. The registered op is therefore deterministic (opcheck-able, and torch.compile traces
the dropout as an ordinary aten op), and the gradient of ``x_d`` flows back to ``x`` through torch's
dropout backward (the mask times 1/(1-p)). Without dropout (p = 0 or not training) ``x_d`` is
``None``: both paths read x, and gx = gy W + s·t G B comes out of one buffer.

The registered op ``subspace_ops::lowrank_linear`` returns ``(y, h0)``: ``h0 = x_d Bᵀ [..., r]`` is
saved for the backward (it is needed for dA and dG; saving costs M·r elements, recomputing it would
read x again) and marked non-differentiable; :func:`lowrank_linear` returns y only.
Autograd saves x (and x_d), W, A, G, B, h0: what PEFT's LoRA saves, and no [N, K] tensor.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from .._validate import (
    check_like, check_linear, check_size, check_tensor, records_gradient, refuse_double_backward, refuse_functorch,
)
from ..backends import resolve_backend
from ._dispatch import kernel_module
from ._sizes import rows_to_shape

__all__ = ["lowrank_linear"]


def _forward_impl(
    x: Tensor,
    x_dropped: Optional[Tensor],
    weight: Tensor,
    a: Tensor,
    g: Optional[Tensor],
    b: Tensor,
    bias: Optional[Tensor],
    scaling: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    kernels = kernel_module(backend, "lowrank_linear")
    k = x.shape[-1]
    y, h0 = kernels.lowrank_linear_forward(
        x.reshape(-1, k), None if x_dropped is None else x_dropped.reshape(-1, k), weight, a, g, b, bias, scaling
    )
    lead = x.shape[:-1]
    return rows_to_shape(y, lead), rows_to_shape(h0, lead)


_lowrank_linear_op = torch.library.custom_op("subspace_ops::lowrank_linear", mutates_args=())(_forward_impl)


@_lowrank_linear_op.register_fake
def _(x, x_dropped, weight, a, g, b, bias, scaling, backend):
    lead = x.shape[:-1]
    return x.new_empty(*lead, weight.shape[0]), x.new_empty(*lead, a.shape[1])


def _backward_kernels(
    grad_y: Tensor,
    x: Tensor,
    x_dropped: Optional[Tensor],
    weight: Tensor,
    a: Tensor,
    g: Optional[Tensor],
    b: Tensor,
    h0: Tensor,
    scaling: float,
    backend: str,
    need_x: bool,
    need_x_dropped: bool,
    need_weight: bool,
    need_a: bool,
    need_b: bool,
    need_g: bool,
) -> tuple:
    """(gx, gx_dropped, gw, ga, gb, gg), None where not asked for (the eager path's backward).

    Without x_dropped, gx includes the adapter's part; with it, gx is gy W and gx_dropped the adapter's part.
    """
    k = x.shape[-1]
    need_x_dropped = need_x_dropped and x_dropped is not None
    need_g = need_g and g is not None
    gx, gxd, gw, ga, gb, gg = kernel_module(backend, "lowrank_linear").lowrank_linear_backward(
        grad_y.reshape(-1, grad_y.shape[-1]),
        x.reshape(-1, k),
        None if x_dropped is None else x_dropped.reshape(-1, k),
        weight,
        a,
        g,
        b,
        h0.reshape(-1, h0.shape[-1]),
        scaling,
        need_x,
        need_x_dropped,
        need_weight,
        need_a,
        need_b,
        need_g,
    )
    return (
        gx.reshape(x.shape) if need_x else None,
        gxd.reshape(x.shape) if need_x_dropped else None,
        gw if need_weight else None,
        ga if need_a else None,
        gb if need_b else None,
        gg if need_g else None,
    )


def _backward_impl(
    grad_y: Tensor,
    x: Tensor,
    x_dropped: Optional[Tensor],
    weight: Tensor,
    a: Tensor,
    g: Optional[Tensor],
    b: Tensor,
    h0: Tensor,
    scaling: float,
    backend: str,
    need_x: bool,
    need_x_dropped: bool,
    need_weight: bool,
    need_a: bool,
    need_b: bool,
    need_g: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The registered backward: as :func:`_backward_kernels`, an empty tensor for each gradient not asked for."""
    grads = _backward_kernels(grad_y, x, x_dropped, weight, a, g, b, h0, scaling, backend, need_x, need_x_dropped,
                              need_weight, need_a, need_b, need_g)
    return tuple(x.new_empty(0) if t is None else t for t in grads)


_lowrank_linear_backward_op = torch.library.custom_op(
    "subspace_ops::lowrank_linear_backward", mutates_args=()
)(_backward_impl)


@_lowrank_linear_backward_op.register_fake
def _(grad_y, x, x_dropped, weight, a, g, b, h0, scaling, backend, need_x, need_x_dropped, need_weight, need_a,
      need_b, need_g):
    dense = torch.contiguous_format  # the kernels return contiguous gradients whatever the inputs' layout
    return (
        torch.empty_like(x, memory_format=dense) if need_x else x.new_empty(0),
        torch.empty_like(x, memory_format=dense) if need_x_dropped and x_dropped is not None else x.new_empty(0),
        torch.empty_like(weight, memory_format=dense) if need_weight else x.new_empty(0),
        torch.empty_like(a, memory_format=dense) if need_a else x.new_empty(0),
        torch.empty_like(b, memory_format=dense) if need_b else x.new_empty(0),
        torch.empty_like(g, memory_format=dense) if need_g and g is not None else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, x_dropped, weight, a, g, b, bias, scaling, backend = inputs
    h0 = output[1]
    ctx.save_for_backward(x, x_dropped, weight, a, g, b, h0)
    ctx.scaling = scaling
    ctx.backend = backend


def _setup_context_registered(ctx, inputs, output):
    _setup_context(ctx, inputs, output)
    ctx.mark_non_differentiable(output[1])  # h0 is a saved activation, not a result


def _gradients(ctx, grad_y, backward_kernels):
    refuse_double_backward("lowrank_linear")
    x, x_dropped, weight, a, g, b, h0 = ctx.saved_tensors
    need_x, need_x_dropped, need_weight, need_a, need_g, need_b, need_bias = ctx.needs_input_grad[:7]
    gx = gxd = gw = ga = gb = gg = gbias = None
    if need_x or need_x_dropped or need_weight or need_a or need_b or need_g:
        gx, gxd, gw, ga, gb, gg = backward_kernels(
            grad_y, x, x_dropped, weight, a, g, b, h0, ctx.scaling, ctx.backend,
            need_x, need_x_dropped, need_weight, need_a, need_b, need_g,
        )
    if need_bias:
        gbias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    return (
        gx if need_x else None,
        gxd if need_x_dropped else None,
        gw if need_weight else None,
        ga if need_a else None,
        gg if need_g else None,
        gb if need_b else None,
        gbias,
        None,
        None,
    )


_lowrank_linear_op.register_autograd(
    lambda ctx, grad_y, grad_h0: _gradients(ctx, grad_y, torch.ops.subspace_ops.lowrank_linear_backward),
    setup_context=_setup_context_registered,
)


class _EagerLowRankLinear(torch.autograd.Function):
    """The eager-mode path: the same kernels and gradient formulas as the registered op, minus the
    custom-op dispatcher's per-call cost. Returns y only (h0 stays inside the saved context). Under
    torch.compile the registered op is used, so graphs see ``subspace_ops::lowrank_linear``."""

    @staticmethod
    def forward(ctx, x, x_dropped, weight, a, g, b, bias, scaling, backend):
        y, h0 = _forward_impl(x, x_dropped, weight, a, g, b, bias, scaling, backend)
        _setup_context(ctx, (x, x_dropped, weight, a, g, b, bias, scaling, backend), (y, h0))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _gradients(ctx, grad_y, _backward_kernels)


def _check_inputs(x, weight, a, g, b, bias) -> None:
    out_features, in_features = check_linear(x, weight)
    check_tensor("a", a, ndims=(2,))
    check_size("a", a, 0, out_features, "out_features = weight.shape[0]")
    rank = a.shape[1]
    if rank < 1:
        raise ValueError(f"a must have rank r >= 1 columns, got shape {tuple(a.shape)}")
    check_tensor("b", b, ndims=(2,))
    check_size("b", b, 0, rank, "the rank r = a.shape[1]")
    check_size("b", b, 1, in_features, "in_features = weight.shape[1]")
    if g is not None:
        check_tensor("g", g, ndims=(1, 2))
        for dim in range(g.dim()):
            check_size("g", g, dim, rank, "the rank r = a.shape[1]")
    if bias is not None:
        check_tensor("bias", bias, ndims=(1,))
        check_size("bias", bias, 0, out_features, "out_features = weight.shape[0]")
    for name, t in (("a", a), ("g", g), ("b", b), ("bias", bias)):
        if t is not None:
            check_like(name, t, "x", x)


def _check_options(scaling, dropout_p, training) -> None:
    for name, value in (("scaling", scaling), ("dropout_p", dropout_p)):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    # Not math.isfinite: under torch.compile(dynamic=True) scaling may be a SymFloat, which it cannot take
    # (a graph break; an error with fullgraph=True). NaN fails both comparisons.
    if not -math.inf < scaling < math.inf:
        raise ValueError(f"scaling must be finite, got {scaling}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")


def lowrank_linear(
    x: Tensor,
    weight: Tensor,
    a: Tensor,
    g: Optional[Tensor],
    b: Tensor,
    bias: Optional[Tensor] = None,
    *,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: Optional[str] = None,
) -> Tensor:
    """``y = x Wᵀ + scaling · ((dropout(x) Bᵀ) Gᵀ) Aᵀ + bias``, never forming A G B.

    Args:
        x: ``[..., K]`` input.
        weight: ``[N, K]``, frozen for LoRA & co.; dW is computed only if it requires grad.
        a: ``[N, r]`` up-projection (PEFT's ``lora_B.weight``).
        g: None (LoRA, G = I), ``[r]`` (AdaLoRA/TriLoRA, G = diag(g)) or ``[r, r]`` (FLoRA).
        b: ``[r, K]`` down-projection (PEFT's ``lora_A.weight``).
        bias: ``[N]`` or None.
        scaling: s, e.g. ``lora_alpha / r`` (a Python number).
        dropout_p: dropout on the adapter's input only (LoRA's ``lora_dropout``); the main path
            always sees x. Applied when ``training`` is True, as ``F.dropout`` does.
        training: whether dropout is active (default True, as for ``F.dropout``; layers pass
            ``self.training``).
        backend: "reference", "cpu", "triton" or None (best available; see :mod:`subspace_ops.backends`).

    All tensors must share x's dtype and device. Returns ``[..., N]``.
    """
    _check_inputs(x, weight, a, g, b, bias)
    _check_options(scaling, dropout_p, training)
    name = resolve_backend(backend, x.device)
    if name == "reference":
        return reference.lowrank_linear(x, weight, a, g, b, bias, scaling=scaling, dropout_p=dropout_p,
                                        training=training)
    # The mask is drawn here, by the same call the reference makes, so the op itself is deterministic.
    x_dropped = F.dropout(x, dropout_p, True) if training and dropout_p > 0 else None
    args = (x, x_dropped, weight, a, g, b, bias, float(scaling), name)
    if torch.compiler.is_compiling():
        return torch.ops.subspace_ops.lowrank_linear(*args)[0]
    refuse_functorch("lowrank_linear")
    if not records_gradient(x, weight, a, g, b, bias):  # evaluation, decoding: no autograd node to build
        return _forward_impl(*args)[0]
    return _EagerLowRankLinear.apply(*args)
