"""Comparison helpers shared by the test suite and ``subspace-ops verify``.

The tolerance rule (adopted from FlashAttention's tests): a fused kernel run in a low precision is
compared with the float64 ground truth, and its error may be at most twice the error of the
reference implementation run in that same low precision, plus a small absolute floor per dtype.
A kernel that is as accurate as plain PyTorch in bf16 passes; a kernel with a real bug does not.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["ABS_FLOOR", "check_close", "error_and_bound", "max_error"]

# Absolute error floor per dtype, relative to the magnitude of the ground truth.
ABS_FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def max_error(actual: Tensor, expected: Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0


def check_close(
    name: str,
    actual: Optional[Tensor],
    truth: Optional[Tensor],
    low_precision_reference: Optional[Tensor] = None,
) -> float:
    """Assert ``actual`` is as close to the float64 ``truth`` as the rule above allows.

    Returns the max abs error. ``low_precision_reference`` is the reference implementation run in
    ``actual``'s dtype; if omitted, only the absolute floor applies.
    """
    if truth is None or actual is None:
        if truth is None and actual is None:
            return 0.0
        raise AssertionError(f"{name}: expected {'no' if truth is None else 'a'} gradient, got {actual!r:.40}")
    if actual.shape != truth.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(truth.shape)}")
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{name}: non-finite values in the result")
    error, bound = error_and_bound(actual, truth, low_precision_reference)
    if error > bound:
        raise AssertionError(f"{name}: max abs error {error:.3e} exceeds the bound {bound:.3e} ({actual.dtype})")
    return error


def error_and_bound(
    actual: Optional[Tensor], truth: Optional[Tensor], low_precision_reference: Optional[Tensor] = None
) -> tuple[float, float]:
    """(max abs error of ``actual`` vs ``truth``, the bound the rule above allows). A missing or
    extra gradient, a shape mismatch or a non-finite value is an infinite error."""
    if truth is None or actual is None:
        return (0.0, 0.0) if truth is None and actual is None else (float("inf"), 0.0)
    if actual.shape != truth.shape or not torch.isfinite(actual).all():
        return float("inf"), 0.0
    error = max_error(actual, truth)
    scale = max(1.0, truth.double().abs().max().item()) if truth.numel() else 1.0
    bound = ABS_FLOOR[actual.dtype] * scale
    if low_precision_reference is not None:
        bound += 2.0 * max_error(low_precision_reference, truth)
    return error, bound
