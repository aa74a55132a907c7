"""Products with a frozen weight on the cpu backend's few-rows loops (``csrc/few_rows_matmul.h``).

With a few rows (decoding one or a few tokens, the stacked path's blocks) MKL's GEMM re-reads or packs
W for every few rows, so on the CPU measured ``x · Wᵀ`` with 2-8 rows costs 2-4× one row's GEMV.
The extension's loops stream W from memory once and use each vector of it for every row: on 2 threads
(AMD EPYC Zen 3, AVX2) 1.3-4.7× faster than torch's products at 1-16 rows (``x · W`` from 2 rows);
the C++ side (``few_rows::prefers``) holds the rule and the measurements. The ops' Python paths (rescaled_linear's
stacked and separable paths, svd_delta_linear's unmerged path, SVDLinear's basis path) call
:func:`weight_product` where they would write ``rows @ W.T``; the C++ kernels (lowrank_linear) call
the loops themselves. Only in eager mode: under ``torch.compile`` the products stay torch's, which
Inductor sees.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from ._sizes import size_for_choice

__all__ = ["FEW_ROWS_MAX", "cpu_float32_eager", "scaled_matmul", "weight_product"]

# The loops' own bound (few_rows::kMaxRows); the rule for fewer rows is asked of the extension.
FEW_ROWS_MAX = 16


@functools.lru_cache(maxsize=None)
def _prefers(rows: int, transpose: bool) -> bool:
    """The extension's few_rows::prefers, asked once per (rows, orientation): False without it."""
    from ..backends import BackendUnavailableError, cpu_extension

    try:
        return cpu_extension().few_rows_prefers(rows, transpose)
    except BackendUnavailableError:
        return False


def cpu_float32_eager(backend: str, dtype: torch.dtype) -> bool:
    """Whether a call's products with W may run on the few-rows loops: the cpu backend, float32, eager."""
    return backend == "cpu" and dtype == torch.float32 and not torch.compiler.is_compiling()


def scaled_matmul(a: Tensor, b: Tensor, scale: Optional[Tensor]) -> Tensor:
    """(a ⊙ scale) @ b, the scale running over a's columns (b's rows), applied to whichever of the
    two is smaller: a [M, L] or b [L, C], i.e. M vs C rows of L (a transient copy, never saved)."""
    if scale is None:
        return a @ b
    if size_for_choice(a.shape[0]) >= size_for_choice(b.shape[1]):
        return a @ (b * scale[:, None])
    return (a * scale) @ b


def weight_product(rows: Tensor, weight: Tensor, transpose: bool, few_rows: bool,
                   scale: Optional[Tensor] = None) -> Tensor:
    """(rows ⊙ scale) · Wᵀ (``transpose``) or (rows ⊙ scale) · W for rows [M, L], the scale running over
    rows' columns (None: none): on the few-rows loops when ``few_rows`` (:func:`cpu_float32_eager`) and
    the extension prefers them for M rows, else torch's product."""
    if few_rows and rows.shape[0] <= FEW_ROWS_MAX and _prefers(rows.shape[0], transpose):
        from ..backends import cpu_extension

        return cpu_extension().few_rows_matmul(rows if scale is None else rows * scale, weight, transpose)
    return scaled_matmul(rows, weight.T if transpose else weight, scale)
