"""Pure-PyTorch reference implementations of every op in METHODS.md.

These are the ground truth the fused backends are tested against: each one is a direct, readable
transcription of the math (materializing W' or the H×N×N attention maps where the math does), uses
only differentiable torch ops, and works in any dtype (tests run them in float64).

Section numbers refer to ../shared/METHODS.md; equation numbers to the papers in ../shared/papers/.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "rescaled_weight",
    "rescaled_linear",
    "ssf",
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


def ssf(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """SSF scale and shift over the last dimension: ``x · γ + β`` (RLRR's recipe after norms)."""
    return x * gamma + beta
