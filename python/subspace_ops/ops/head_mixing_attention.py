"""``head_mixing_attention``: Coeff-Tuning's attention with mixed heads (METHODS.md §3).

    O_h = Σ_g mix[h, g] · softmax(scale · Q_g K_gᵀ + mask) · V_h

in SDPA's layout (q [B, H, Nq, d], k and v [B, H, Nk, d]); the layer passes ``mix = I + Dropout(α)``.
The fused backends never hold a [B, H, Nq, Nk] tensor: the forward saves q, k, v, mix, the mask
view and the per-row statistics ``lse`` [2, B, H, Nq] (float32, or float64 for float64 inputs): the
log-sum-exp L and what its rounding lost, so that P = exp((S − L) − lost) stays exact where the row
max is so large that max + log Σ == max (a row whose every key carries transformers' ``finfo.min``
padding mask); i.e. O(N) memory per head, as SDPA. Registered as ``subspace_ops::head_mixing_attention``
(+ ``_backward``); kernels in ``csrc/head_mixing_attention.cpp`` and
``triton_kernels/head_mixing_attention.py``.

Masks follow SDPA: a boolean ``attn_mask`` keeps the True entries, a floating one is added to the
scores; either broadcasts to [B, H, Nq, Nk]. ``is_causal`` is SDPA's top-left aligned triangle (query
i sees keys j ≤ i, also when Nq ≠ Nk) and, unlike SDPA, may be combined with ``attn_mask``. A query
row that sees no key gets probabilities 0: its output and gradients are 0, not NaN. The mask is
converted once to an additive tensor of its own (unbroadcast) shape and passed as an expanded view,
so a key-padding mask [B, 1, 1, Nk] costs B·Nk elements, not B·H·Nq·Nk. Masks are not trained.

``dropout_p`` is the backbone's attention-probability dropout (BERT's and BART's 0.1), applied where
the backbone applies it: to the map that multiplies V_h, here the mixed map M_h, whose entries are
zeroed with probability p and the rest scaled by 1 / (1 − p). (Coeff-Tuning's own regularizer, the
dropout on α, is the layer's; it reaches this op inside ``mix``.) The mask is not stored: every
backend regenerates it from a 64-bit seed with the counter-based hash of
:func:`subspace_ops.reference.attention_dropout_keep`, so forward and backward agree and every
backend (and the reference) draws the same mask for the same seed. The seed is drawn from torch's
generator of q's device at each call, so ``torch.manual_seed`` makes a run repeatable.

Under ``torch.autocast`` the op behaves as SDPA (on autocast's lower-precision list): q, k, v and a
floating ``attn_mask`` are cast to the autocast dtype at the Python entry (float64 stays, as autocast
leaves it), so q and k in float32 from a rotary embedding and v in bfloat16 are accepted. ``mix``
keeps its own dtype: the fused kernels take it in the accumulation dtype anyway, and rounding
``I + α`` to bfloat16 would erase diagonal updates below 2⁻⁸; its gradient comes back in its dtype
(float32 for the layers' α). The cast is done here before dispatch rather than by
``torch.library.register_autocast`` on the registered op: the eager path calls the kernels without
going through that op, and a registered autocast rule would cast every floating input, ``mix`` and
the float32 additive mask included. The kernels run with autocast off, so that torch ops inside them
(the chunked Triton strategy's matmuls) keep their dtypes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._validate import check_like, check_tensor, refuse_double_backward, refuse_functorch
from ..backends import resolve_backend
from ._dispatch import kernel_module

__all__ = ["head_mixing_attention", "additive_mask"]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _autocast_enabled(device_type: str) -> bool:
    # torch.is_autocast_enabled raises for device types autocast does not know (meta tensors).
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _autocast_off(device_type: str):
    """Autocast disabled for ``device_type`` while the kernels run: their inputs are already in the
    dtypes they need, and torch ops inside them must not be recast (the backward also runs under
    autocast when ``loss.backward()`` is called inside the autocast region, as on CPU it may be)."""
    if _autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _forward_impl(
    q: Tensor, k: Tensor, v: Tensor, mix: Tensor, mask: Optional[Tensor], is_causal: bool, scale: float,
    dropout_p: float, seed: Optional[Tensor], backend: str,
) -> tuple[Tensor, Tensor]:
    kernels = kernel_module(backend, "head_mixing_attention")
    with _autocast_off(q.device.type):
        return kernels.head_mixing_attention_forward(q, k, v, mix, mask, is_causal, scale, dropout_p, seed)


_forward_op = torch.library.custom_op("subspace_ops::head_mixing_attention", mutates_args=())(_forward_impl)


@_forward_op.register_fake
def _(q, k, v, mix, mask, is_causal, scale, dropout_p, seed, backend):
    lse = q.new_empty((2, *q.shape[:-1]), dtype=_accumulation_dtype(q.dtype))  # (L, lost) per row
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


def _backward_impl(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mix: Tensor, mask: Optional[Tensor], lse: Tensor,
    is_causal: bool, scale: float, dropout_p: float, seed: Optional[Tensor], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    kernels = kernel_module(backend, "head_mixing_attention")
    with _autocast_off(q.device.type):
        return kernels.head_mixing_attention_backward(grad_out.contiguous(), q, k, v, mix, mask, lse, is_causal,
                                                      scale, dropout_p, seed)


_backward_op = torch.library.custom_op("subspace_ops::head_mixing_attention_backward", mutates_args=())(
    _backward_impl
)


@_backward_op.register_fake
def _(grad_out, q, k, v, mix, mask, lse, is_causal, scale, dropout_p, seed, backend):
    # The kernels return contiguous gradients whatever the layout of q, k, v (timm's are slices of qkv).
    dense = torch.contiguous_format
    return (torch.empty_like(q, memory_format=dense), torch.empty_like(k, memory_format=dense),
            torch.empty_like(v, memory_format=dense), mix.new_empty(mix.shape, dtype=lse.dtype))


def _setup_context(ctx, inputs, output):
    q, k, v, mix, mask, is_causal, scale, dropout_p, seed, backend = inputs
    _, lse = output
    ctx.save_for_backward(q, k, v, mix, mask, lse, seed)
    ctx.is_causal, ctx.scale, ctx.dropout_p, ctx.backend = is_causal, scale, dropout_p, backend
    ctx.mix_dtype = mix.dtype


def _gradients(ctx, grad_out, grad_lse, backward_kernels):
    refuse_double_backward("head_mixing_attention")
    q, k, v, mix, mask, lse, seed = ctx.saved_tensors
    dq, dk, dv, dmix = backward_kernels(grad_out, q, k, v, mix, mask, lse, ctx.is_causal, ctx.scale, ctx.dropout_p,
                                        seed, ctx.backend)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            dmix.to(ctx.mix_dtype) if need[3] else None, None, None, None, None, None, None)


_forward_op.register_autograd(
    lambda ctx, grad_out, grad_lse: _gradients(ctx, grad_out, grad_lse, torch.ops.subspace_ops.head_mixing_attention_backward),
    setup_context=_setup_context,
)


class _EagerHeadMixingAttention(torch.autograd.Function):
    """Eager-mode path over the same kernels (torch.compile traces the registered op)."""

    @staticmethod
    def forward(ctx, q, k, v, mix, mask, is_causal, scale, dropout_p, seed, backend):
        args = (q, k, v, mix, mask, is_causal, scale, dropout_p, seed, backend)
        out, lse = _forward_impl(*args)
        _setup_context(ctx, args, (out, lse))
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return _gradients(ctx, grad_out, grad_lse, _backward_impl)


def additive_mask(attn_mask: Tensor, dtype: torch.dtype, shape: torch.Size) -> Tensor:
    """SDPA-style ``attn_mask`` as an additive ``dtype`` tensor viewed (expanded) as ``shape``.

    Boolean: True keeps, False → −inf. Floating: cast. The conversion happens at the mask's own
    shape; the expansion to [B, H, Nq, Nk] is a view with zero strides.
    """
    if attn_mask.dtype == torch.bool:
        additive = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device)
        additive.masked_fill_(~attn_mask, float("-inf"))
    else:
        additive = attn_mask.to(dtype)
    while additive.dim() < len(shape):
        additive = additive.unsqueeze(0)
    return additive.expand(shape)


def _autocast_inputs(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """q, k, v and a floating ``attn_mask`` as SDPA receives them under autocast for q's device: the
    floating ones other than float64 cast to the autocast dtype (autocast's rule for its lower-precision
    ops); unchanged outside autocast. Non-tensors pass through for :func:`_check_inputs` to name."""
    if not isinstance(q, Tensor) or not _autocast_enabled(q.device.type):
        return q, k, v, attn_mask
    dtype = torch.get_autocast_dtype(q.device.type)

    def cast(t):
        eligible = isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible and t.device.type == q.device.type else t

    return cast(q), cast(k), cast(v), cast(attn_mask)


def _check_dropout(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, mix: Tensor, attn_mask: Optional[Tensor]) -> None:
    check_tensor("q", q, ndims=(4,))
    check_tensor("k", k, ndims=(4,))
    check_tensor("v", v, ndims=(4,))
    check_like("k", k, "q", q)
    check_like("v", v, "q", q)
    batch, heads, _, dim = q.shape
    if dim == 0:
        raise ValueError(f"q must have a head size d >= 1 (q.shape[3]), got shape {tuple(q.shape)}")
    if k.shape[0] != batch or k.shape[1] != heads or k.shape[3] != dim:
        raise ValueError(f"k must be [B, H, Nk, d] = [{batch}, {heads}, Nk, {dim}] like q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    check_tensor("mix", mix, ndims=(2,))
    if tuple(mix.shape) != (heads, heads):
        raise ValueError(f"mix must be [H, H] = [{heads}, {heads}] (H = q.shape[1]), got {tuple(mix.shape)}")
    if mix.device != q.device:
        raise ValueError(f"mix must be on q's device {q.device}, got {mix.device}")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be boolean (True = attend) or floating (added), got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask must be on q's device {q.device}, got {attn_mask.device}")
        if attn_mask.requires_grad:
            raise ValueError("attn_mask must not require grad: masks are not trained")
        full = (batch, heads, q.shape[2], k.shape[2])
        try:
            if attn_mask.dim() > 4 or torch.broadcast_shapes(attn_mask.shape, full) != full:
                raise RuntimeError
        except RuntimeError:
            raise ValueError(f"attn_mask must broadcast to [B, H, Nq, Nk] = {list(full)}, "
                             f"got {tuple(attn_mask.shape)}") from None


def head_mixing_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mix: Tensor,
    *,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    backend: Optional[str] = None,
) -> Tensor:
    """``O_h = Σ_g mix[h, g] · softmax(scale · Q_g K_gᵀ + mask)_g · V_h`` → [B, H, Nq, d].

    q [B, H, Nq, d], k and v [B, H, Nk, d] (one dtype: float32, float16, bfloat16 or float64),
    mix [H, H] (any floating dtype; its gradient comes back in that dtype). ``scale`` defaults to
    1/√d. ``dropout_p`` in [0, 1): dropout on the mixed maps (as SDPA's on its probabilities; pass 0
    in evaluation). See the module docstring for masks, dropout and autocast. ``backend``: reference /
    cpu / triton / None (best).
    """
    q, k, v, attn_mask = _autocast_inputs(q, k, v, attn_mask)
    _check_inputs(q, k, v, mix, attn_mask)
    dropout_p = _check_dropout(dropout_p)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    name = resolve_backend(backend, q.device)
    # One int64 seed per call from q's device's generator, drawn whatever the backend (see above).
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device) if dropout_p > 0.0 else None
    if name == "reference":
        return reference.head_mixing_attention(q, k, v, mix, attn_mask=attn_mask, is_causal=is_causal,
                                               scale=scale, dropout_p=dropout_p,
                                               dropout_seed=None if seed is None else int(seed.item()))
    acc = _accumulation_dtype(q.dtype)
    mask = None
    if attn_mask is not None:
        mask = additive_mask(attn_mask, acc, torch.Size((q.shape[0], q.shape[1], q.shape[2], k.shape[2])))
    mix_acc = mix.to(acc)
    if torch.compiler.is_compiling():
        out, _ = torch.ops.subspace_ops.head_mixing_attention(q, k, v, mix_acc, mask, is_causal, scale, dropout_p,
                                                              seed, name)
    else:
        refuse_functorch("head_mixing_attention")
        out, _ = _EagerHeadMixingAttention.apply(q, k, v, mix_acc, mask, is_causal, scale, dropout_p, seed, name)
    return out
