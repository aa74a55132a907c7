"""Helpers shared by the Triton kernels: tile order, interpreter detection, matmul precision."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["accumulation_types", "grouped_tile", "interpreting", "matmul_precision", "targets_gpu"]


@triton.jit
def grouped_tile(pid, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP: tl.constexpr):
    """Program id -> (row tile, column tile). Consecutive programs walk GROUP row tiles down one
    column tile before moving right, so the column operand's tiles are re-read from L2, not HBM."""
    tiles_r = tl.cdiv(rows, BLOCK_ROWS)
    tiles_c = tl.cdiv(cols, BLOCK_COLS)
    per_group = GROUP * tiles_c
    first_r = (pid // per_group) * GROUP
    group_size = tl.minimum(tiles_r - first_r, GROUP)
    return first_r + (pid % per_group) % group_size, (pid % per_group) // group_size


def targets_gpu(t: torch.Tensor) -> bool:
    """Whether kernels launched on ``t`` are compiled for a GPU. The one place the wrappers ask;
    scripts/triton_aot_check.py answers True for CPU tensors to compile the GPU path without a GPU."""
    return t.is_cuda


def interpreting(t: torch.Tensor) -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, CPU tensors):
    fixed small tiles there, autotuned ones on the GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1" or not targets_gpu(t)


def matmul_precision(t: torch.Tensor) -> str:
    """tl.dot's input precision: TF32 for float32 only where torch allows it for its own matmuls."""
    if t.dtype == torch.float32 and targets_gpu(t) and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def accumulation_types(t: torch.Tensor):
    """(Triton, torch) accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return (tl.float64, torch.float64) if t.dtype == torch.float64 else (tl.float32, torch.float32)
