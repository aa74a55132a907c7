"""Low-rank layers (METHODS.md §4, paper 001 §4): LoRA, AdaLoRA/TriLoRA, FLoRA and DoRA on the fused op.

- :class:`LowRankLinear`: ``W' = W + s·A G B`` with ``A [N, r]``, ``B [r, K]`` and G the identity
  (``g="none"``: LoRA), a trainable diagonal (``g="diag"``: AdaLoRA / TriLoRA) or a trainable free
  r×r matrix (``g="full"``: FLoRA); forward through :func:`subspace_ops.ops.lowrank_linear.lowrank_linear`.
- :class:`DoRALinear`: ``W' = m ⊙ (W + s·A B) / ‖W + s·A B‖`` (the norm of each output row), forward
  ``y = (m / ‖·‖) ⊙ lowrank_linear(x, W, A, None, B) + b``; the norm is computed without forming
  W + s·AB (see :func:`dora_row_norm`).

Naming: METHODS.md writes ``ΔW = A G B`` with A the up-projection ``[N, r]`` and B the down-projection
``[r, K]``, so ``lora_a`` here is PEFT's ``lora_B.weight`` and ``lora_b`` is PEFT's ``lora_A.weight``.
Initialization follows PEFT's LoRA (with the letters swapped): the up-projection ``lora_a`` is zero and
the down-projection ``lora_b`` is kaiming-uniform (a = √5, as nn.Linear), so every layer starts exactly
equal to the wrapped one; G starts at the identity (``ones [r]`` / ``eye(r)``).

Scaling: ``s = alpha / rank`` as PEFT's ``lora_alpha / r``; ``alpha=None`` means ``alpha = rank``,
i.e. ``s = 1`` (PEFT's default is lora_alpha = 8, whatever r is: pass ``alpha=8`` to match it).

Dropout (``dropout``, PEFT's ``lora_dropout``) applies to the adapter's input only, in training mode.

Merging: ``merge()`` folds the adaptation into ``weight`` (computed in float32 or better, stored in the
weight's dtype) and keeps the original tensor, so ``unmerge()`` restores it bit for bit.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import reference
from .._validate import records_gradient
from ..backends import resolve_backend
from ..ops._few_rows import FEW_ROWS_MAX, cpu_float32_eager, weight_product
from ..ops.lowrank_linear import lowrank_linear
from .base import MergeableLinear, compute_dtype

__all__ = ["DoRALinear", "LowRankLinear", "G_KINDS", "dora_linear", "dora_row_norm"]

#: ``g`` options of :class:`LowRankLinear` and the method each one is.
G_KINDS = {"none": "lora", "diag": "adalora", "full": "flora"}


def _check_rank(rank: object) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    return rank


def _check_dropout(dropout: object) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    return float(dropout)


def _scaling(alpha: Optional[float], rank: int) -> tuple[float, float]:
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    return alpha, alpha / rank


def _lora_factors(out_features: int, in_features: int, rank: int, like: Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    """(A [N, r] zeros, B [r, K] kaiming-uniform as PEFT's lora_A), in like's dtype and device."""
    down = torch.empty(rank, in_features)  # initialized in float32 for the same values in every dtype
    nn.init.kaiming_uniform_(down, a=math.sqrt(5))
    factory = dict(dtype=like.dtype, device=like.device)
    return nn.Parameter(torch.zeros(out_features, rank, **factory)), nn.Parameter(down.to(**factory))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class LowRankLinear(MergeableLinear):
    """``y = x Wᵀ + s·((dropout(x) Bᵀ) Gᵀ) Aᵀ + b`` on a frozen nn.Linear (see the module docstring).

    Args:
        base: the pretrained nn.Linear; its weight and bias are frozen and shared, not copied.
        rank: r.
        g: "none" (LoRA), "diag" (AdaLoRA / TriLoRA: trainable ``lora_g [r]``) or "full"
            (FLoRA: trainable ``lora_g [r, r]``).
        alpha: s = alpha / rank; None means alpha = rank (s = 1).
        dropout: dropout probability on the adapter's input (training mode only).
        backend: op backend ("reference", "cpu", "triton" or None for the best available).

    Parameters: ``lora_a [N, r]`` (zeros), ``lora_b [r, K]`` (kaiming-uniform), ``lora_g`` (None,
    ``ones [r]`` or ``eye(r)``).
    """

    function_attributes = ("scaling",)

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        *,
        g: str = "none",
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(base, backend)
        if g not in G_KINDS:
            raise ValueError(f"g must be one of {tuple(G_KINDS)}, got {g!r}")
        self.rank = _check_rank(rank)
        self.g_kind = g
        self.method = G_KINDS[g]
        self.alpha, self.scaling = _scaling(alpha, rank)
        self.dropout = _check_dropout(dropout)
        self.lora_a, self.lora_b = _lora_factors(self.out_features, self.in_features, rank, self.weight)
        factory = dict(dtype=self.weight.dtype, device=self.weight.device)
        if g == "none":
            self.register_parameter("lora_g", None)
        elif g == "diag":
            self.lora_g = nn.Parameter(torch.ones(rank, **factory))
        else:
            self.lora_g = nn.Parameter(torch.eye(rank, **factory))

    def low_rank_factors(self) -> tuple[Tensor, Tensor]:
        """(A [N, r], B [r, K]) — the factors the MPC regularizers constrain (G is not included)."""
        return self.lora_a, self.lora_b

    def delta_weight(self) -> Tensor:
        """ΔW = s·A G B [N, K] in float32 or better (for merging and inspection; the forward never forms it)."""
        acc = _acc_dtype(self.weight.dtype)
        g = None if self.lora_g is None else self.lora_g.to(acc)
        return reference.lowrank_delta_weight(self.lora_a.to(acc), g, self.lora_b.to(acc), self.scaling)

    def merged_weight_and_bias(self) -> tuple[Tensor, Optional[Tensor]]:
        delta = self.delta_weight()
        return self.weight.to(delta.dtype) + delta, self.bias

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        dtype = compute_dtype(x, self.weight)
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return lowrank_linear(
            x.to(dtype), cast(self.weight), cast(self.lora_a), cast(self.lora_g), cast(self.lora_b), cast(self.bias),
            scaling=self.scaling, dropout_p=self.dropout, training=self.training, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return self._describe() + f", rank={self.rank}, g={self.g_kind}, alpha={self.alpha:g}, dropout={self.dropout:g}"


def dora_row_norm(weight: Tensor, a: Tensor, b: Tensor, scaling: float, weight_sq: Optional[Tensor] = None,
                  weight_b: Optional[Tensor] = None) -> Tensor:
    """‖W_n + s·(A B)_n‖ for every output row n, without forming W + s·AB [N, K]:

        ‖W_n + s(AB)_n‖² = ‖W_n‖² + 2s·A_n·(W Bᵀ)_n + s²·A_n (B Bᵀ) A_nᵀ

    i.e. one thin GEMM ``W Bᵀ [N, r]`` (the only pass over W besides ‖W_n‖²; ``weight_sq`` and
    ``weight_b`` may supply either), the r×r Gram ``B Bᵀ`` and row sums of [N, r] products. Computed
    in the inputs' dtype (callers pass float32 or better), clamped at 0 before the square root.
    Differentiable in all of weight, a, b (and in a supplied ``weight_b``).

    Accuracy: the cross term is negative when the adapter points against W_n, so the sum cancels; the
    squared norm's relative error is about u·‖W_n‖²/‖W_n + s(AB)_n‖² (u the unit roundoff). It is
    float32-accurate while the adapted row keeps a fair part of W_n's norm, as fine-tuning updates small
    against W do; an adapter that cancels most of a row (‖W'_n‖ = 1% of ‖W_n‖: u·10⁴) loses digits
    there, which the merged layer (the norm of the formed row) does not.
    """
    if weight_sq is None:  # a reduction over W's rows: no [N, K] temporary, as weight.square() would be
        weight_sq = torch.linalg.vector_norm(weight, dim=1).square()
    cross = (a * (weight @ b.T if weight_b is None else weight_b)).sum(1)
    quad = ((a @ (b @ b.T)) * a).sum(1)
    return (weight_sq + (2.0 * scaling) * cross + (scaling * scaling) * quad).clamp_min(0).sqrt()


def _dora_norm(weight: Tensor, a: Tensor, b: Tensor, scaling: float, acc: torch.dtype, detach: bool,
               weight_sq: Optional[Tensor] = None, few_rows: bool = False) -> Tensor:
    """:func:`dora_row_norm` of the tensors as given, in ``acc``; ``detach``: a constant for autograd
    (its inputs detached, so no graph is built for it; detach() rather than a no_grad block:
    torch.export records grad-mode switches as wrap_with_set_grad_enabled nodes, which its loader
    rejects, torch 2.14). ``few_rows`` (:func:`~subspace_ops.ops._few_rows.cpu_float32_eager`): W Bᵀ
    is computed as (B Wᵀ)ᵀ on the cpu backend's few-rows loops (r rows, W read once) where no
    gradient flows through it."""
    weight, a, b = (t.detach() if detach else t for t in (weight, a, b))
    weight, a, b = weight.to(acc), a.to(acc), b.to(acc)
    weight_b = None
    if few_rows and not records_gradient(weight, b):
        weight_b = weight_product(b, weight, True, True).T
    return dora_row_norm(weight, a, b, scaling, weight_sq, weight_b)


class RowNormKeeper:
    """DoRA's row norms ‖W_n + s·(AB)_n‖ kept between calls that record no gradient (evaluation,
    decoding), so that such a call reads W once, as LoRA's, instead of two or three times (W Bᵀ,
    ‖W_n‖², the op). Serves :class:`DoRALinear` and PEFT's DoRA layers accelerated by
    :mod:`subspace_ops.peft`.

    A kept norm is reused while W, A, B and the scaling are the same tensors, unchanged: each
    tensor itself (a weak reference: a dead or other tensor never matches, and nothing is held
    alive), its version counter (in-place writes, ``load_state_dict``), storage and device
    (``.to()``, ``.data =``). ‖W_n‖², which only W's changes touch, is kept apart, so the first
    call after a training step redoes only W Bᵀ. Not seen by those checks:

    - torch's fused AdamW (``fused=True``; torch 2.14's CPU build) updates parameters without
      bumping their version counters: so a call that records a gradient (an optimizer step can only
      follow one) drops the row norms, and ‖W_n‖² when W itself is trained (:meth:`row_norm`'s
      ``recording``);
    - writes through ``.data`` (PEFT's merge/unmerge write W that way): the owner calls :meth:`forget`.

    None under torch.compile (no state across traced calls) and on the reference backend (the
    papers' formula, computed afresh each call)."""

    def __init__(self) -> None:
        self.forget()

    def forget(self, weight_too: bool = True) -> None:
        """Drop the kept row norms (and ‖W_n‖² with ``weight_too``): the next call computes them."""
        self._norm: Optional[Tensor] = None
        self._norm_of: tuple = ()
        if weight_too:
            self._weight_sq: Optional[Tensor] = None
            self._weight_sq_of: tuple = ()

    def __getstate__(self) -> dict:
        return {}  # not state: weak references do not pickle, and a copy computes its norms anew

    def __setstate__(self, state: dict) -> None:
        self.forget()

    def row_norm(self, weight: Tensor, a: Tensor, b: Tensor, scaling: float, acc: torch.dtype, backend: str, *,
                 recording: bool, transposed_weight: bool = False) -> Optional[Tensor]:
        """‖W_n + s·(AB)_n‖ in ``acc`` for a call that records no gradient, from the kept one while it
        holds (see the class docstring); None for a call that does (``recording``: its norm carries a
        graph), which also drops what the step that may follow can change. ``weight`` is the parameter
        itself, ``[N, K]`` or, with ``transposed_weight`` (GPT-2's Conv1D under PEFT), ``[K, N]``."""
        if recording:  # also when compiling: Dynamo replays the drop as a side effect of the graph
            self.forget(weight_too=weight.requires_grad)
            return None
        if torch.compiler.is_compiling() or backend == "reference":
            return None
        w = weight.t() if transposed_weight else weight
        weight_state = (_state(weight), acc)
        if not self._holds(self._weight_sq_of, (weight,), weight_state):
            self._weight_sq = torch.linalg.vector_norm(w.detach().to(acc), dim=1).square()
            self._weight_sq_of, self._norm_of = ((weakref.ref(weight),), weight_state), ()
        norm_state = (weight_state, _state(a), _state(b), scaling)
        if not self._holds(self._norm_of, (weight, a, b), norm_state):
            self._norm = _dora_norm(w, a, b, scaling, acc, True, self._weight_sq, cpu_float32_eager(backend, acc))
            self._norm_of = (tuple(weakref.ref(t) for t in (weight, a, b)), norm_state)
        return self._norm

    @staticmethod
    def _holds(kept: tuple, tensors: tuple, state: tuple) -> bool:
        return bool(kept) and kept[1] == state and all(ref() is t for ref, t in zip(kept[0], tensors))


def _state(t: Tensor) -> tuple:
    return t._version, t.data_ptr(), t.device


def dora_linear(x: Tensor, weight: Tensor, a: Tensor, b: Tensor, magnitude: Tensor, bias: Optional[Tensor],
                scaling: float, *, detach_norm: bool, dropout_p: float = 0.0, training: bool = False,
                backend: Optional[str] = None, row_norm: Optional[Tensor] = None) -> Tensor:
    """DoRA's forward: ``c ⊙ lowrank_linear(x, W, A, None, B) + bias`` with ``c = m / ‖W + s·AB‖`` per
    output row, the norm from :func:`dora_row_norm` in float32 or better from ``weight``, ``a``, ``b``
    as given (no [N, K] tensor), or ``row_norm`` if the caller keeps it for a call without gradients;
    the op runs in ``x``'s dtype (``bias`` already in it). Serves :class:`DoRALinear` and PEFT's DoRA
    layers accelerated by :mod:`subspace_ops.peft`."""
    dtype = x.dtype
    acc = _acc_dtype(dtype)
    if row_norm is None:
        few_rows = cpu_float32_eager(resolve_backend(backend, weight.device), acc)
        rows = x.numel() // max(x.shape[-1], 1)
        if (few_rows and all(t.dtype == acc for t in (x, weight, a, b, magnitude))
                and rows + b.shape[0] <= FEW_ROWS_MAX and not (training and dropout_p > 0)
                and not records_gradient(x, weight, a, b, magnitude, bias)):
            return _dora_decoding_step(x, weight, a, b, magnitude, bias, scaling)
        row_norm = _dora_norm(weight, a, b, scaling, acc, detach_norm, few_rows=few_rows)
    scale = (magnitude.to(acc) / row_norm).to(dtype)
    z = lowrank_linear(x, weight.to(dtype), a.to(dtype), None, b.to(dtype), None, scaling=scaling,
                       dropout_p=dropout_p, training=training, backend=backend)
    if not records_gradient(z, scale, bias):  # no node to build (its apply binds a signature per call)
        return _ScaleFeatures.forward(z, scale, bias)
    return _ScaleFeatures.apply(z, scale, bias)


def _dora_decoding_step(x: Tensor, weight: Tensor, a: Tensor, b: Tensor, magnitude: Tensor, bias: Optional[Tensor],
                        scaling: float) -> Tensor:
    """:func:`dora_linear` for a float32 cpu call of a few tokens that records no gradient (decoding)
    and is given no kept norm (a direct call: the layers keep theirs, :class:`RowNormKeeper`): x Wᵀ
    and the norm's W Bᵀ come from one pass over W, as the rows of [x; B] · Wᵀ on the few-rows loops
    (M + r rows), where the op and the norm would each read W."""
    x2 = x.reshape(-1, x.shape[-1])
    tokens = x2.shape[0]
    both = weight_product(torch.cat([x2, b]), weight, True, True)  # [M + r, N]
    base, weight_b = both[:tokens], both[tokens:].T  # x Wᵀ [M, N], W Bᵀ [N, r]
    norm = dora_row_norm(weight, a, b, scaling, weight_b=weight_b)
    y = torch.addmm(base, x2 @ b.T, a.T, alpha=scaling)  # x Wᵀ + s·(x Bᵀ) Aᵀ
    y = y * (magnitude / norm) if bias is None else torch.addcmul(bias, y, magnitude / norm)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class _ScaleFeatures(torch.autograd.Function):
    """``z ⊙ scale (+ bias)`` with ``scale``, ``bias`` [N] over z's last dimension: DoRA's per-output
    factor. The forward is one ``addcmul``; the backward writes one [..., N] tensor (gy ⊙ scale) and
    reduces gy ⊙ z with ``linalg.vecdot``, where autograd's own addcmul backward first copies z·value
    (value = 1) into a new [..., N] tensor. At M = 788, 384 -> 1536 (2 CPU threads) that copy was
    0.6 ms of a 17.7 ms DoRA layer step. Written with ``setup_context`` and PyTorch ops only, so
    torch.func transforms (grad, vmap: per-sample gradients) can run it on the reference backend."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
        return z * scale if bias is None else torch.addcmul(bias, z, scale)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        z, scale, bias = inputs
        ctx.save_for_backward(z, scale)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        z, scale = ctx.saved_tensors
        need_z, need_scale, need_bias = ctx.needs_input_grad
        rows = grad_y.reshape(-1, grad_y.shape[-1])
        grad_z = grad_y * scale if need_z else None
        grad_scale = torch.linalg.vecdot(rows, z.reshape(rows.shape), dim=0) if need_scale else None
        grad_bias = rows.sum(0) if ctx.has_bias and need_bias else None
        return grad_z, grad_scale, grad_bias


class DoRALinear(MergeableLinear):
    """DoRA: ``W' = m ⊙ (W + s·A B) / ‖W + s·A B‖`` with the norm over each output row (PEFT's convention).

    Forward: ``y = c ⊙ lowrank_linear(x, W, A, None, B) + b`` with ``c = m / ‖W + s·AB‖ [N]``, the norm from
    :func:`dora_row_norm` (no [N, K] tensor) and the per-output scale and bias applied in one
    ``torch.addcmul`` (:class:`_ScaleFeatures`). Equals ``x W'ᵀ + b`` exactly in real arithmetic; with
    dropout only the adapter's input is dropped: c ⊙ (x Wᵀ + s·(dropout(x) Bᵀ) Aᵀ). (PEFT's DoRA, in a
    training call with dropout, computes x Wᵀ + (c - 1)·dropout(x) Wᵀ + c·s·(dropout(x) Bᵀ) Aᵀ instead;
    the two agree without dropout and in eval.)

    Args:
        base, rank, alpha, dropout, backend: as :class:`LowRankLinear`.
        detach_norm: treat the norm as a constant in the backward (DoRA §4.3 and PEFT do this to save
            memory). Default False: exact gradients of the formula above, as ``reference.dora_linear``.

    Parameters: ``lora_a [N, r]`` (zeros), ``lora_b [r, K]`` (kaiming-uniform) and ``magnitude [N]``,
    initialized to the row norms of W, so the layer starts exactly at the wrapped one (up to rounding
    of m / ‖W‖).

    A call that records no gradient (evaluation, decoding) reuses the row norms of the previous such
    call while W, A, B and the scaling are unchanged (:class:`RowNormKeeper`), so that a decoding
    step reads W once, as LoRA's; writes through ``.data`` are not seen: call
    :meth:`forget_weight_norms` after them.
    """

    method = "dora"
    function_attributes = ("scaling",)

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        *,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        detach_norm: bool = False,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(base, backend)
        self.rank = _check_rank(rank)
        self.alpha, self.scaling = _scaling(alpha, rank)
        self.dropout = _check_dropout(dropout)
        self.detach_norm = bool(detach_norm)
        self.lora_a, self.lora_b = _lora_factors(self.out_features, self.in_features, rank, self.weight)
        with torch.no_grad():
            norms = self.weight.to(_acc_dtype(self.weight.dtype)).norm(dim=1)
        self.magnitude = nn.Parameter(norms.to(self.weight.dtype))
        self.forget_weight_norms()

    def low_rank_factors(self) -> tuple[Tensor, Tensor]:
        """(A [N, r], B [r, K])."""
        return self.lora_a, self.lora_b

    def forget_weight_norms(self) -> None:
        """Drop the kept ‖W_n‖² and row norms (see :class:`RowNormKeeper`): the next call computes them."""
        self._norms = RowNormKeeper()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.forget_weight_norms()  # W, A, B may hold other values now

    def row_norm(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """‖W + s·AB‖ per output row [N], in float32 or better (``dtype``'s promotion with float32)."""
        return _dora_norm(self.weight, self.lora_a, self.lora_b, self.scaling, _acc_dtype(dtype or self.weight.dtype),
                          self.detach_norm)

    def merged_weight_and_bias(self) -> tuple[Tensor, Optional[Tensor]]:
        acc = _acc_dtype(self.weight.dtype)
        merged = self.weight.to(acc) + self.scaling * (self.lora_a.to(acc) @ self.lora_b.to(acc))
        return self.magnitude.to(acc)[:, None] * merged / merged.norm(dim=1, keepdim=True), self.bias

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        dtype = compute_dtype(x, self.weight)
        row_norm = self._norms.row_norm(
            self.weight, self.lora_a, self.lora_b, self.scaling, _acc_dtype(dtype),
            resolve_backend(self.backend, self.weight.device),
            recording=records_gradient(x, self.weight, self.lora_a, self.lora_b, self.magnitude, self.bias))
        return dora_linear(x.to(dtype), self.weight, self.lora_a, self.lora_b, self.magnitude,
                           None if self.bias is None else self.bias.to(dtype), self.scaling,
                           detach_norm=self.detach_norm, dropout_p=self.dropout, training=self.training,
                           backend=self.backend, row_norm=row_norm)

    def extra_repr(self) -> str:
        return (self._describe() + f", rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout:g}, "
                f"detach_norm={self.detach_norm}")
