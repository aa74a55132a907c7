"""Pure-PyTorch reference implementations of every op in METHODS.md.

These are the ground truth the fused backends are tested against: each one is a direct, readable
transcription of the math (materializing W' or the H×N×N attention maps where the math does), uses
only differentiable torch ops, and works in any dtype (tests run them in float64).

Section numbers refer to docs/METHODS.md; equation numbers to the four papers (README's methods table).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    # §1
    "rescaled_weight",
    "rescaled_linear",
    "ssf",
    # §2
    "svd_delta_weight",
    "svd_delta_linear",
    "siva_select_rank",
    "siva_delta",
    "sam_parser_delta",
    "svdiff_delta",
    # §3
    "coeff_mix",
    "attention_dropout_keep",
    "head_mixing_attention",
    # §4
    "lowrank_delta_weight",
    "lowrank_linear",
    "dora_linear",
    "parallel_adapter",
    "sequential_adapter",
    "spectral_adapter_weight",
    "mpc_orthogonal",
    "mpc_diagonal",
]


# ---------------------------------------------------------------------------------------------
# §1 Rescaled linear family: W' = W ⊙ (c + S_l S_rᵀ)   (RLRR eq. 16/20, SSB/SSL/(IA)³ in 001 §3.2)
# ---------------------------------------------------------------------------------------------
def _as_matrix(scale: Optional[Tensor], length: int, rank: int, like: Tensor) -> Tensor:
    """[L] -> [L, 1]; [L, r] unchanged; None -> ones [L, rank] (an untrained scale)."""
    if scale is None:
        return torch.ones(length, rank, dtype=like.dtype, device=like.device)
    return scale.unsqueeze(-1) if scale.dim() == 1 else scale


def rescaled_weight(
    weight: Tensor, s_l: Optional[Tensor], s_r: Optional[Tensor], *, residual: bool = True
) -> Tensor:
    """W' = W ⊙ (c + S_l S_rᵀ), c = 1 if residual else 0. Materializes the [N, K] matrix."""
    n, k = weight.shape
    rank = next((s.shape[1] for s in (s_l, s_r) if s is not None and s.dim() == 2), 1)
    left = _as_matrix(s_l, n, rank, weight)
    right = _as_matrix(s_r, k, rank, weight)
    modulation = left @ right.T
    if residual:
        modulation = modulation + 1
    return weight * modulation


def rescaled_linear(
    x: Tensor,
    weight: Tensor,
    s_l: Optional[Tensor] = None,
    s_r: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    residual: bool = True,
) -> Tensor:
    """y = x W'ᵀ + b with W' from :func:`rescaled_weight` (METHODS.md §1)."""
    return torch.nn.functional.linear(x, rescaled_weight(weight, s_l, s_r, residual=residual), bias)


def ssf(x: Tensor, gamma: Tensor, beta: Tensor, dim: int = -1) -> Tensor:
    """SSF scale and shift over the channel dimension ``dim`` (the last one by default; 1 for a
    channels-first [B, C, H, W] map): ``x · γ + β`` (RLRR's recipe after norms)."""
    if dim in (-1, x.dim() - 1):
        return x * gamma + beta
    shape = [1] * x.dim()
    shape[dim] = -1
    return x * gamma.reshape(shape) + beta.reshape(shape)


# ---------------------------------------------------------------------------------------------
# §2 SVD-basis family: W' = W + U_I diag(d) V_Iᵀ   (SiVA 002 §3; SAM-PARSER 001 §3.1; SVDiff 001 eq. 34)
# ---------------------------------------------------------------------------------------------
def svd_delta_weight(weight: Tensor, u: Tensor, v: Tensor, d: Tensor) -> Tensor:
    """W + U diag(d) Vᵀ with u [N, k], v [K, k], d [k]."""
    return weight + (u * d) @ v.T


def svd_delta_linear(
    x: Tensor, weight: Tensor, u: Tensor, v: Tensor, d: Tensor, bias: Optional[Tensor] = None
) -> Tensor:
    """y = x (W + U diag(d) Vᵀ)ᵀ + b (METHODS.md §2), W' materialized."""
    return F.linear(x, svd_delta_weight(weight, u, v, d), bias)


def siva_select_rank(singular_values: Tensor, perc: float, *, criterion: str = "variance") -> int:
    """How many of the smallest singular values SiVA tunes (002 §3, "bottom (1 − perc) of the variance").

    With σ sorted descending and e_i = σ_i² ("variance", the paper's choice) or σ_i ("magnitude"),
    the head keeps the fewest leading values whose cumulative share of Σe reaches ``perc``; the
    remaining k = len(σ) − head values are tuned. So perc = 1 tunes nothing beyond values with zero
    share, and a smaller perc tunes more. (Boundary: a head whose share equals ``perc`` exactly is
    enough.)
    """
    if not 0.0 < perc <= 1.0:
        raise ValueError(f"perc must be in (0, 1], got {perc}")
    if criterion not in ("variance", "magnitude"):
        raise ValueError(f"criterion must be 'variance' or 'magnitude', got {criterion!r}")
    sigma = torch.sort(singular_values.detach().double().flatten(), descending=True).values
    energy = sigma**2 if criterion == "variance" else sigma
    share = torch.cumsum(energy, 0) / energy.sum()
    head = int(torch.searchsorted(share, torch.tensor(perc, dtype=share.dtype) - 1e-12).item()) + 1
    return len(sigma) - min(head, len(sigma))


def siva_delta(s: Tensor) -> Tensor:
    """SiVA: d = s (init 0), the added values on the tuned singular directions."""
    return s


def sam_parser_delta(s: Tensor, sigma: Tensor) -> Tensor:
    """SAM-PARSER (001 §3.1, W = U Σ* Vᵀ with all of Σ* trainable): d = s − σ, s initialized to σ."""
    return s - sigma


def svdiff_delta(s: Tensor, sigma: Tensor) -> Tensor:
    """SVDiff (001 eq. 34, U relu(Σ + D) Vᵀ): d = relu(σ + s) − σ, s initialized to 0."""
    return torch.relu(sigma + s) - sigma


# ---------------------------------------------------------------------------------------------
# §3 Head-mixing attention (Coeff-Tuning, 003): O_h = Σ_g mix[h, g] softmax(scale Q_g K_gᵀ + mask) V_h
# ---------------------------------------------------------------------------------------------
def coeff_mix(alpha: Tensor, dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """α' = I + Dropout(α) for α [H, H] (zero init: the layer starts as standard attention), in at
    least float32: in bfloat16 the sum would round away every diagonal update below 2⁻⁸ (a model cast
    with ``.to(torch.bfloat16)`` holds α in bfloat16)."""
    acc = torch.promote_types(alpha.dtype, torch.float32)
    eye = torch.eye(alpha.shape[0], dtype=acc, device=alpha.device)
    return eye + F.dropout(alpha.to(acc), dropout_p, training)


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
    dropout_seed: Optional[int] = None,
) -> Tensor:
    """Materializes every head's [Nq, Nk] probability map, as the papers' code does.

    q [B, H, Nq, d], k and v [B, H, Nk, d], mix [H, H]. ``attn_mask`` as in SDPA: boolean (True
    = attend) or additive float, broadcastable to [B, H, Nq, Nk]; ``is_causal`` is SDPA's top-left
    aligned lower triangle. A query row whose keys are all masked gets probabilities 0 (and so an
    output of zeros) instead of NaN. ``dropout_p`` > 0 drops entries of each mixed map M_h (the map
    that multiplies V_h, where the backbone drops its probabilities) with the mask of
    :func:`attention_dropout_keep` for ``dropout_seed``, and scales the kept ones by 1 / (1 − p).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    n_q, n_k = q.shape[-2], k.shape[-2]
    keep = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device)
    if is_causal:
        keep = torch.tril(keep)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = keep & attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask.to(scores.dtype)  # in the scores' dtype, as the fused kernels add it
    keep = keep.expand_as(scores)
    scores = scores.masked_fill(~keep, float("-inf"))
    if n_k == 0:  # no keys at all: every row is fully masked (amax has nothing to reduce)
        row_max = scores.new_zeros(*scores.shape[:-1], 1)
    else:
        row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(total > 0, total, torch.ones_like(total))
    # M_h = Σ_g mix[h, g] P_g, with mix in its own dtype where that is wider than the probabilities'
    # (I + α in float32 next to bfloat16 maps: rounding it to bfloat16 would erase small updates of α).
    acc = torch.promote_types(mix.dtype, probs.dtype)
    mixed = torch.einsum("hg,bgij->bhij", mix.to(acc), probs.to(acc)).to(probs.dtype)
    if dropout_p > 0.0:
        if dropout_seed is None:
            raise ValueError("dropout_seed is required when dropout_p > 0")
        keep = attention_dropout_keep(int(dropout_seed), dropout_p, *mixed.shape, device=mixed.device)
        mixed = torch.where(keep, mixed / (1.0 - dropout_p), torch.zeros_like(mixed))
    return torch.einsum("bhij,bhjd->bhid", mixed, v)  # O_h = M_h V_h


_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, constant: int) -> Tensor:
    """x · constant mod 2³² for int64 x in [0, 2³²), without overflowing int64: the constant is split
    in 16-bit halves, so that each partial product stays below 2⁴⁸."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xor-shift-multiply, the "lowbias32" constants); a bijection."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_threshold(dropout_p: float) -> int:
    """The 32-bit threshold below which a hash value drops its entry: ⌊p · 2³²⌋."""
    return min(_MASK32, int(dropout_p * 2.0**32))


def attention_dropout_keep(seed: int, dropout_p: float, batch: int, heads: int, n_q: int, n_k: int, *,
                           rows: Optional[tuple[int, int]] = None, device=None) -> Tensor:
    """The keep mask [B, H, Nq, Nk] (bool) of head-mixing attention's dropout, as every backend draws it.

    A counter-based hash, so that a backward (and every backend) regenerates the forward's mask from
    the seed instead of storing B·H·Nq·Nk bits:

        row  = (b · H + h) · Nq + i                       (mod 2³²)
        key  = mix32(row ⊕ seed_lo) ⊕ seed_hi              seed = seed_hi · 2³² + seed_lo
        keep = mix32(j ⊕ key) ≥ ⌊p · 2³²⌋

    ``rows = (r0, r1)`` gives only query rows [r0, r1) (the chunked Triton strategy's blocks).
    """
    r0, r1 = rows if rows is not None else (0, n_q)
    seed_lo, seed_hi = seed & _MASK32, (seed >> 32) & _MASK32
    b = torch.arange(batch, dtype=torch.int64, device=device)[:, None, None]
    h = torch.arange(heads, dtype=torch.int64, device=device)[None, :, None]
    i = torch.arange(r0, r1, dtype=torch.int64, device=device)[None, None, :]
    row = ((b * heads + h) * n_q + i) & _MASK32
    key = _mix32(row ^ seed_lo) ^ seed_hi  # [B, H, rows]
    j = torch.arange(n_k, dtype=torch.int64, device=device)
    return _mix32(j ^ key[..., None]) >= dropout_threshold(dropout_p)


# ---------------------------------------------------------------------------------------------
# §4 Low-rank and adapter family (001 §4): ΔW = A G B, DoRA, adapters, Spectral Adapter, MPC
# ---------------------------------------------------------------------------------------------
def _g_matrix(g: Optional[Tensor], rank: int, like: Tensor) -> Tensor:
    if g is None:  # LoRA
        return torch.eye(rank, dtype=like.dtype, device=like.device)
    return torch.diag(g) if g.dim() == 1 else g  # AdaLoRA/TriLoRA diagonal, FLoRA free r×r


def lowrank_delta_weight(a: Tensor, g: Optional[Tensor], b: Tensor, scaling: float = 1.0) -> Tensor:
    """ΔW = scaling · A G B with a [N, r], b [r, K], g None (I) / [r] (diagonal) / [r, r]."""
    return scaling * (a @ _g_matrix(g, a.shape[1], a) @ b)


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
    training: bool = False,
) -> Tensor:
    """y = x Wᵀ + scaling · ((dropout(x) Bᵀ) Gᵀ) Aᵀ + b (LoRA / AdaLoRA / TriLoRA / FLoRA)."""
    h = F.dropout(x, dropout_p, training) @ b.T
    return F.linear(x, weight, bias) + scaling * (h @ _g_matrix(g, a.shape[1], a).T) @ a.T


def dora_linear(
    x: Tensor,
    weight: Tensor,
    a: Tensor,
    b: Tensor,
    magnitude: Tensor,
    bias: Optional[Tensor] = None,
    *,
    scaling: float = 1.0,
) -> Tensor:
    """DoRA: W' = m ⊙ (W + s·AB) / ‖W + s·AB‖, the norm of each output feature's weights.

    DoRA writes W ∈ R^{d×k} and a "column-wise" norm; for torch's nn.Linear weight [N, K] that is
    the norm over K for each of the N outputs (the HF PEFT convention), so m has shape [N].
    """
    merged = weight + scaling * (a @ b)
    return F.linear(x, magnitude[:, None] * merged / merged.norm(dim=1, keepdim=True), bias)


def parallel_adapter(
    x: Tensor, down: Tensor, up: Tensor, activation: Callable[[Tensor], Tensor] = torch.relu, scaling: float = 1.0
) -> Tensor:
    """The parallel branch added to a layer's output: scaling · h(x downᵀ) upᵀ (MPC_n's form)."""
    return scaling * activation(x @ down.T) @ up.T


def sequential_adapter(
    h: Tensor,
    down: Tensor,
    up: Tensor,
    activation: Callable[[Tensor], Tensor] = F.gelu,
    down_bias: Optional[Tensor] = None,
    up_bias: Optional[Tensor] = None,
) -> Tensor:
    """Houlsby adapter after a sublayer: h + f(h W_downᵀ + b_down) W_upᵀ + b_up."""
    return h + F.linear(activation(F.linear(h, down, down_bias)), up, up_bias)


def spectral_adapter_weight(u: Tensor, sigma: Tensor, v: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Spectral Adapter (001 eq. 32–33): [U_r + A, U_rest] Σ [V_r + B, V_rest]ᵀ.

    u [N, n], sigma [n], v [K, n] the thin SVD of W; a [N, r] and b [K, r] tune the top r singular
    vectors. Eq. 33's expansion is W + A Σ_r V_rᵀ + U_r Σ_r Bᵀ + A Σ_r Bᵀ (Σ restricted to the top r
    values: A and B are zero-padded to n columns in eq. 32).
    """
    r = a.shape[1]
    left = torch.cat([u[:, :r] + a, u[:, r:]], dim=1)
    right = torch.cat([v[:, :r] + b, v[:, r:]], dim=1)
    return (left * sigma) @ right.T


def mpc_orthogonal(a: Tensor, b: Tensor) -> Tensor:
    """MPC_o (001 eq. 20): ‖AᵀA − I‖²_F + ‖BBᵀ − I‖²_F for the up projection a [N, r] and the down
    projection b [r, K] (both semi-orthogonal; symmetric in the two, so 001's swapped letters, see
    :func:`mpc_diagonal`, do not matter)."""
    eye = torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
    return (a.T @ a - eye).square().sum() + (b @ b.T - eye).square().sum()


def mpc_diagonal(a: Tensor, b: Tensor) -> Tensor:
    """MPC_d (001 eq. 21) for the up projection a [N, r] and the down projection b [r, K]:
    ‖b bᵀ − I‖²_F + ‖aᵀa − diag(aᵀa)‖²_F, the down projection semi-orthogonal, the up projection's r
    columns only mutually orthogonal (any norms).

    001 writes ‖AᵀA − I‖²_F + ‖BBᵀ − diag(BBᵀ)‖²_F in its own notation (Table 1, ``x ↦ xW``), where
    A [in, r] is the down and B [r, out] the up projection: its A is our bᵀ, its B our aᵀ. METHODS.md
    §4 renames A to the up projection but copies eq. 21 letter for letter, which would swap the two
    constraints; the paper is the authority. (MPC_o is symmetric in the factors.)"""
    eye = torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
    gram = a.T @ a
    return (b @ b.T - eye).square().sum() + (gram - torch.diag(torch.diagonal(gram))).square().sum()
