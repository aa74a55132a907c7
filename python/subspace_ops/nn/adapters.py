"""Adapter layers of paper 001 §4.3 and §5 (METHODS.md §4): parallel, sequential and spectral adapters.

- :class:`ParallelAdapterLinear`: the parallel adapter PA (001 eq. 25, He et al. 2021a) and LoRA + MPC_n
  (001 §4.2): ``y = x Wᵀ + b + s·h(dropout(x) downᵀ) upᵀ`` beside a frozen nn.Linear.
- :class:`SequentialAdapter`: the Houlsby adapter (001 eq. 22) after any module m:
  ``out = m(x) + f(m(x) W_downᵀ + b_down) W_upᵀ + b_up``.
- :class:`SpectralLinear`: the Spectral Adapter (001 eq. 32–33, Zhang & Pilanci 2024):
  ``W' = [U_r + A, U_rest] Σ [V_r + B, V_rest]ᵀ`` on the top r singular vectors of W.

Every layer starts exactly at the module it wraps (the up-projection, resp. A and B, are zero).
PA with the identity activation and the Spectral Adapter merge exactly into W (:class:`MergeableLinear`:
``unmerge()`` restores the original tensors bit for bit); PA with a nonlinearity and the sequential
adapter cannot be written as a weight and raise :class:`NotMergeableError` from ``merge()``.

Naming follows METHODS.md §4 (and :mod:`subspace_ops.nn.lowrank`): ``A [N, r]`` is the up-projection,
``B [r, K]`` the down-projection, so ``low_rank_factors()`` of a PA returns ``(up, down)`` for the MPC
regularizers (:func:`subspace_ops.methods.mpc_loss`).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import reference
from ..ops.lowrank_linear import lowrank_linear
from .base import ForwardsAttributes, MergeableLinear, NotMergeableError, compute_dtype

__all__ = ["ACTIVATIONS", "NotMergeableError", "ParallelAdapterLinear", "SequentialAdapter", "SpectralLinear"]

#: Activation names the adapters accept ("identity" makes a PA linear, i.e. LoRA, and mergeable).
ACTIVATIONS: dict[str, Optional[Callable[[Tensor], Tensor]]] = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "identity": None,
}


def _activation(activation: Union[str, Callable[[Tensor], Tensor]]) -> tuple[str, Optional[Callable]]:
    if callable(activation):
        return getattr(activation, "__name__", type(activation).__name__), activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)} or a callable, got {activation!r}")
    return activation, ACTIVATIONS[activation]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _kaiming_down(rows: int, cols: int, like: Tensor) -> Tensor:
    """nn.Linear's default weight init (kaiming-uniform, a = √5), drawn in float32 then cast."""
    down = torch.empty(rows, cols)
    nn.init.kaiming_uniform_(down, a=math.sqrt(5))
    return down.to(dtype=like.dtype, device=like.device)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class ParallelAdapterLinear(MergeableLinear):
    """Parallel adapter PA (001 eq. 25: ``xW → xW + h(xA)B``) and LoRA + MPC_n (001 §4.2) on a frozen nn.Linear.

    ``y = x Wᵀ + b + s · h(dropout(x) downᵀ) upᵀ`` — the branch is ``reference.parallel_adapter``.

    Args:
        base: the pretrained nn.Linear; its weight and bias are frozen and shared, not copied.
        rank: r, the width of the bottleneck.
        activation: h: "relu" (default: He et al. 2021a's PA), "gelu", "silu", "tanh", "identity" or a
            callable. "identity" is LoRA exactly; it runs through the fused
            :func:`~subspace_ops.ops.lowrank_linear.lowrank_linear` op and merges.
        alpha: s = alpha / rank as LoRA; None means alpha = rank (s = 1).
        dropout: dropout on the adapter's input (training mode only), as LoRA's ``lora_dropout``.
        backend: op backend of the linear (identity) path. With a nonlinearity the layer is three
            plain torch GEMMs (``x Wᵀ + b``, ``x downᵀ [M, r]``, then ``addmm`` of ``h(·) upᵀ`` into the
            output): h sits between the two thin products, so it cannot enter the fused op's epilogue.

    Parameters: ``up [N, r]`` (zeros, so the layer starts exactly at ``base``) and ``down [r, K]``
    (kaiming-uniform, nn.Linear's init; the LoRA init of PEFT and of He et al.'s "lora" adapter init).
    No biases: 001's PA (eq. 25) has none, which is why its parameter count equals LoRA's in 001
    Tables 2–4.

    ``merge()`` raises :class:`NotMergeableError` unless the activation is "identity": with h in between,
    the update ``h(x downᵀ) upᵀ`` depends on x and is no weight (001 eq. 26).
    """

    method = "pa"
    function_attributes = ("scaling", "activation_name")

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        *,
        activation: Union[str, Callable[[Tensor], Tensor]] = "relu",
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(base, backend)
        self.rank = _positive_int("rank", rank)
        self.activation_name, self._activation = _activation(activation)
        alpha = float(rank if alpha is None else alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha}")
        self.alpha, self.scaling = alpha, alpha / rank
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        self.up = nn.Parameter(torch.zeros(self.out_features, rank, dtype=self.weight.dtype, device=self.weight.device))
        self.down = nn.Parameter(_kaiming_down(rank, self.in_features, self.weight))

    @property
    def mergeable(self) -> bool:
        return self._activation is None

    def low_rank_factors(self) -> tuple[Tensor, Tensor]:
        """(A [N, r], B [r, K]) = (up, down), the factors the MPC regularizers constrain."""
        return self.up, self.down

    def merged_weight_and_bias(self) -> tuple[Tensor, Optional[Tensor]]:
        if not self.mergeable:
            raise NotMergeableError(self._not_mergeable())
        acc = _acc_dtype(self.weight.dtype)
        delta = reference.lowrank_delta_weight(self.up.to(acc), None, self.down.to(acc), self.scaling)
        return self.weight.to(acc) + delta, self.bias

    def merge(self) -> None:
        if not self.mergeable:  # checked before anything is touched
            raise NotMergeableError(self._not_mergeable())
        super().merge()

    def _not_mergeable(self) -> str:
        return (
            f"ParallelAdapterLinear with activation={self.activation_name!r} cannot be merged: the nonlinearity "
            "between the two projections makes the update h(x downᵀ) upᵀ depend on the input (001 eq. 26), so it "
            "has no weight form; use activation='identity' (= LoRA) for a mergeable adapter"
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        dtype = compute_dtype(x, self.weight)
        x = x.to(dtype)
        weight, up, down = self.weight.to(dtype), self.up.to(dtype), self.down.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        if self._activation is None:
            return lowrank_linear(x, weight, up, None, down, bias, scaling=self.scaling, dropout_p=self.dropout,
                                  training=self.training, backend=self.backend)
        x_in = F.dropout(x, self.dropout, True) if self.training and self.dropout > 0 else x
        hidden = self._activation(F.linear(x_in, down))
        lead = x.shape[:-1]
        y = F.linear(x, weight, bias).reshape(-1, self.out_features)
        y = torch.addmm(y, hidden.reshape(-1, self.rank), up.T, alpha=self.scaling)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (self._describe() + f", rank={self.rank}, activation={self.activation_name}, alpha={self.alpha:g}, "
                f"dropout={self.dropout:g}")


class SequentialAdapter(ForwardsAttributes, nn.Module):
    """Houlsby adapter (001 eq. 22: ``x → x + h(xA)B``) after a module m.

    ``out = m(x) + f(m(x) W_downᵀ + b_down) W_upᵀ + b_up``;

    the output is ``reference.sequential_adapter(m(x), ...)``. Houlsby et al. place one after the attention
    output projection and one after the FFN's second linear of every block (before the residual add);
    :func:`subspace_ops.methods.apply` does that by module-name pattern.

    Args:
        module: the wrapped module (kept as the child ``module``; its parameters are left as they are —
            ``methods.apply`` freezes the backbone). Its output must be a tensor ``[..., dim]``.
        bottleneck: m, the adapter's hidden size.
        dim: the feature size of ``module``'s output; default ``module.out_features``.
        activation: f: "gelu" (default: the host transformers' own FFN nonlinearity, and the default of
            ``reference.sequential_adapter``), "relu", "silu", "tanh", "identity" or a callable.

    Parameters: ``down_weight [m, dim]`` (kaiming-uniform, nn.Linear's init), ``down_bias [m]``,
    ``up_weight [dim, m]`` and ``up_bias [dim]`` (zeros). Houlsby et al. initialize both projections
    near zero (N(0, 10⁻²)), i.e. near the identity; the up-projection here is exactly zero so the
    adapted model equals the pretrained one at attach, and the down-projection keeps a normal scale so
    the up-projection gets gradients of a useful size from the first step.

    Not mergeable (the nonlinearity sits on the layer's output): ``merge()`` raises :class:`NotMergeableError`.
    """

    method = "adapter"
    function_attributes = ("activation_name",)  # recorded by adapter checkpoints (see MergeableLinear)
    # Attributes the adapter does not have come from the wrapped module: a model's own code may read them
    # (T5's feed-forward reads ``self.wo.weight.dtype``).
    _wrapped = "module"

    def __init__(
        self,
        module: nn.Module,
        bottleneck: int,
        *,
        dim: Optional[int] = None,
        activation: Union[str, Callable[[Tensor], Tensor]] = "gelu",
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        dim = getattr(module, "out_features", None) if dim is None else dim
        if dim is None:
            raise ValueError(f"dim is required: {type(module).__name__} has no out_features to infer it from")
        self.dim = _positive_int("dim", dim)
        self.bottleneck = _positive_int("bottleneck", bottleneck)
        self.activation_name, self._activation = _activation(activation)
        self.module = module
        like = next(module.parameters(), None)
        like = like if like is not None else torch.empty(0)
        factory = dict(dtype=like.dtype, device=like.device)
        self.down_weight = nn.Parameter(_kaiming_down(bottleneck, dim, like))
        self.down_bias = nn.Parameter(torch.zeros(bottleneck, **factory))
        self.up_weight = nn.Parameter(torch.zeros(dim, bottleneck, **factory))
        self.up_bias = nn.Parameter(torch.zeros(dim, **factory))

    merged = False
    mergeable = False

    def _not_mergeable(self) -> str:
        return ("SequentialAdapter cannot be merged: its nonlinearity acts on the wrapped module's output "
                "(001 eq. 22), so the adapted layer has no weight form")

    def merge(self) -> None:
        raise NotMergeableError(self._not_mergeable())

    def unmerge(self) -> None:
        raise RuntimeError("SequentialAdapter is not merged")

    def forward(self, *args, **kwargs) -> Tensor:
        h = self.module(*args, **kwargs)
        if not isinstance(h, Tensor):
            raise TypeError(f"SequentialAdapter needs a tensor output from {type(self.module).__name__}, "
                            f"got {type(h).__name__}")
        dtype = h.dtype
        hidden = F.linear(h, self.down_weight.to(dtype), self.down_bias.to(dtype))
        if self._activation is not None:
            hidden = self._activation(hidden)
        return h + F.linear(hidden, self.up_weight.to(dtype), self.up_bias.to(dtype))

    def extra_repr(self) -> str:
        return f"method=adapter, dim={self.dim}, bottleneck={self.bottleneck}, activation={self.activation_name}"


class SpectralLinear(MergeableLinear):
    """Spectral Adapter (001 eq. 32–33): ``W' = [U_r + A, U_rest] Σ [V_r + B, V_rest]ᵀ`` on a frozen nn.Linear.

    At attach, once: the thin SVD ``W = U Σ Vᵀ`` (float64 for float64 weights, float32 otherwise); the top r
    singular triplets are kept as frozen buffers ``u_r [N, r]``, ``sigma_r [r]``, ``v_r [K, r]`` and the
    layer trains ``spectral_a [N, r]`` (A) and ``spectral_b [K, r]`` (B), both zero, so it starts exactly at
    the wrapped layer. Each singular pair's sign is fixed (the largest-magnitude entry of ``u_r[:, j]`` is
    positive, ``v_r[:, j]`` flipped with it), so A and B mean the same on every device and library.

    Forward, without forming W' or reconstructing W from its SVD: eq. 32 minus W is

        ΔW = (U_r + A) Σ_r (V_r + B)ᵀ − U_r Σ_r V_rᵀ = (U_r + A) Σ_r Bᵀ + A Σ_r V_rᵀ,

    (the expansion of eq. 33 with Σ restricted to the top r values), a rank-2r product
    ``[U_r + A, A] · diag(σ_r, σ_r) · [B, V_r]ᵀ``, so the layer is one call of the fused op
    ``lowrank_linear(x, W, a=[U_r + A, A], g=[σ_r, σ_r], b=[B, V_r]ᵀ, bias)``. This form subtracts
    nothing: at A = B = 0 both terms are exact zeros (the alternative ``(U_r + A)Σ(V_r + B)ᵀ − U_rΣV_rᵀ``
    cancels two large top-singular-value terms and is only zero up to rounding). Cost: the main GEMM plus
    two thin GEMMs through an ``[M, 2r]`` activation.

    Args:
        base: the pretrained nn.Linear (frozen, shared).
        rank: r ≤ min(N, K), the number of top singular vectors tuned.
        backend: op backend ("reference", "cpu", "triton" or None).

    ``merge()`` folds ΔW into the weight (computed in float32 or better); ``unmerge()`` restores W bit for bit.
    Singular vectors of repeated singular values are not unique: for such a W, A and B are tied to the
    basis stored in the ``u_r``/``v_r`` buffers (they are persistent, i.e. in the state dict).
    """

    method = "spectral"

    def __init__(self, base: nn.Linear, rank: int, *, backend: Optional[str] = None) -> None:
        super().__init__(base, backend)
        self.rank = _positive_int("rank", rank)
        if rank > min(self.out_features, self.in_features):
            raise ValueError(f"rank must be <= min(out_features, in_features) = "
                             f"{min(self.out_features, self.in_features)}, got {rank}")
        svd_dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            u, sigma, vh = torch.linalg.svd(self.weight.to(svd_dtype), full_matrices=False)
            u, sigma, v = u[:, :rank], sigma[:rank], vh[:rank].T
            pivot = u.abs().argmax(dim=0)
            signs = torch.where(u.gather(0, pivot[None])[0] < 0, -1.0, 1.0).to(svd_dtype)
            u, v = u * signs, v * signs
        factory = dict(dtype=self.weight.dtype, device=self.weight.device)
        self.register_buffer("u_r", u.to(**factory).contiguous())
        self.register_buffer("sigma_r", sigma.to(**factory))
        self.register_buffer("v_r", v.to(**factory).contiguous())
        self.spectral_a = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        self.spectral_b = nn.Parameter(torch.zeros(self.in_features, rank, **factory))

    def lowrank_form(self, dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor]:
        """(a [N, 2r], g [2r], b [2r, K]) with ΔW = a diag(g) b (see the class docstring)."""
        dtype = dtype or self.weight.dtype
        u, sigma, v = self.u_r.to(dtype), self.sigma_r.to(dtype), self.v_r.to(dtype)
        a, b = self.spectral_a.to(dtype), self.spectral_b.to(dtype)
        return torch.cat([u + a, a], dim=1), torch.cat([sigma, sigma]), torch.cat([b.T, v.T], dim=0)

    def delta_weight(self) -> Tensor:
        """ΔW = W' − W [N, K] in float32 or better (for merging and inspection; the forward never forms it)."""
        return reference.lowrank_delta_weight(*self.lowrank_form(_acc_dtype(self.weight.dtype)))

    def merged_weight_and_bias(self) -> tuple[Tensor, Optional[Tensor]]:
        delta = self.delta_weight()
        return self.weight.to(delta.dtype) + delta, self.bias

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        dtype = compute_dtype(x, self.weight)
        a, g, b = self.lowrank_form(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return lowrank_linear(x.to(dtype), self.weight.to(dtype), a, g, b, bias, scaling=1.0, backend=self.backend)

    def extra_repr(self) -> str:
        return self._describe() + f", rank={self.rank}"
