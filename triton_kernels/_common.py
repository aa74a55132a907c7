"""Helpers shared by the Triton kernels: tile order, GEMM tiles per dtype, interpreter detection,
matmul precision."""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETER_SMS", "SM90_SHARED_MEMORY", "accumulation_types", "gemm_configs", "grouped_tile",
           "interpreting", "launches_on_device_of", "m_chunk", "m_chunk_for", "matmul_precision", "num_sms",
           "prune_gemm_configs", "shared_memory", "targets_gpu", "tf32_allowed", "tuning_rows"]


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


def tf32_allowed() -> bool:
    """Whether torch runs float32 CUDA matmuls in TF32, however the user said so. torch >= 2.9 has
    ``torch.backends.cuda.matmul.fp32_precision`` (set directly, through the generic
    ``torch.backends.fp32_precision``, or by the legacy setters); its legacy getter ``allow_tf32``
    raises once the new API has been used, so it is read only on older torch."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    return precision == "tf32" if precision is not None else bool(matmul.allow_tf32)


def matmul_precision(t: torch.Tensor) -> str:
    """tl.dot's input precision: TF32 for float32 only where torch allows it for its own matmuls."""
    if t.dtype == torch.float32 and targets_gpu(t) and tf32_allowed():
        return "tf32"
    return "ieee"


def launches_on_device_of(launch: Callable) -> Callable:
    """Decorates a launch wrapper so its kernels run on the device of its first tensor argument.
    Triton launches on the *current* CUDA device and stream, not on the tensors' device: tensors on
    cuda:1 while device 0 is current (a model split over GPUs) would fault or race without this. A
    no-op for CPU tensors (the interpreter)."""

    @functools.wraps(launch)
    def wrapper(*args, **kwargs):
        tensor = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        with torch.cuda.device_of(tensor) if tensor is not None else contextlib.nullcontext():
            return launch(*args, **kwargs)

    wrapper.launches_on_device_of = True
    return wrapper


def tuning_rows(rows: int) -> int:
    """What the GEMM autotuners key on instead of a token count: the next power of two. Keyed on the
    count itself, every new batch shape (dynamic padding changes it nearly every step) would
    benchmark every config again; within a power of two the best tiles hardly change."""
    return triton.next_power_of_2(max(int(rows), 1))


# Shared memory one block may use on an H100/H200 (sm_90), the GPU the fused head-mixing limits and the
# fixed SVD tiles were sized for (scripts/triton_aot_check.py).
SM90_SHARED_MEMORY = 232448


@functools.lru_cache(maxsize=None)
def _device_shared_memory(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def shared_memory(t: torch.Tensor) -> int:
    """Shared memory (bytes) one block may use on ``t``'s GPU: 227 KiB on an H100, 163 KiB on an A100,
    99 KiB on sm_86/sm_89 (L4, L40S, RTX 4090, A10); scripts/triton_aot_check.py answers for its target."""
    return _device_shared_memory(t.device)


def accumulation_types(t: torch.Tensor):
    """(Triton, torch) accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return (tl.float64, torch.float64) if t.dtype == torch.float64 else (tl.float32, torch.float32)


# GEMM tiles as (output rows, output columns, reduction step, warps, stages).
# Tensor-core tiles for 2-byte inputs on an H100. Per ptxas for sm_90a (bf16), the 4-warp ones fit
# two programs per SM, so one program's MMA can overlap the other's elementwise prologue work.
TENSOR_CORE_TILES = (
    (128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (256, 128, 64, 8, 3),
    (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4),
)
# float32 with IEEE precision (torch's default: TF32 off) runs tl.dot on the FMA units, whose operands
# live in registers: the tensor-core tiles there compile to 32 registers and 6-15 KB of spills per
# thread (ptxas, sm_90, scripts/triton_aot_check.py). These compile without spilling, for the plain
# GEMMs and for the ones that modulate an operand tile first.
FMA_TILES = ((128, 128, 8, 8, 3), (64, 128, 16, 8, 3), (128, 64, 16, 8, 3), (64, 64, 16, 4, 3), (64, 64, 8, 4, 3))


def gemm_configs(rows: str, cols: str, red: str, tiles=TENSOR_CORE_TILES) -> list:
    """Autotuner configs from ``tiles``, naming the kernel's row, column and reduction block sizes."""
    return [triton.Config({rows: r, cols: c, red: k, "GROUP": 8}, num_warps=w, num_stages=s)
            for r, c, k, w, s in tiles]


def prune_gemm_configs(red: str, fp64_tile: dict, fma_names: Optional[tuple] = None):
    """An ``early_config_prune`` hook for configs sized for 2-byte inputs (the first tensor argument
    decides): float64 (no tensor cores) gets ``fp64_tile`` alone; float32 gets half the reduction step
    (shared memory), or with ``fma_names = (rows, cols)`` and IEEE precision, :data:`FMA_TILES`."""

    def prune(configs, named_args, **kwargs):
        size = next(v for v in named_args.values() if isinstance(v, torch.Tensor)).element_size()
        if size <= 2:
            return configs
        if size == 8:
            return [triton.Config({**configs[0].kwargs, **fp64_tile}, num_warps=4, num_stages=2)]
        if fma_names is not None and kwargs.get("PRECISION") == "ieee":
            return gemm_configs(*fma_names, red, tiles=FMA_TILES)
        halved = {}
        for cfg in configs:
            kw = {**cfg.kwargs, red: cfg.kwargs[red] // 2}
            halved.setdefault(tuple(sorted(kw.items())) + (cfg.num_warps, cfg.num_stages),
                              triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        return list(halved.values())

    return prune


@functools.lru_cache(maxsize=None)
def _device_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_sms(t: torch.Tensor) -> int:
    """Streaming multiprocessors of ``t``'s GPU (scripts/triton_aot_check.py answers for its target)."""
    return _device_sms(t.device)


# A pretend SM count for the interpreter, with which small test shapes exercise the M split.
INTERPRETER_SMS = 32


def m_chunk_for(t: torch.Tensor, M: int, tiles: int, gpu_align: int, interpreter_align: int) -> int:
    """:func:`m_chunk` for kernels launched on ``t``: its GPU's SM count and ``gpu_align``, or in the
    interpreter :data:`INTERPRETER_SMS` and ``interpreter_align`` (the interpreter's small BLOCK_M)."""
    if interpreting(t):
        return m_chunk(M, tiles, INTERPRETER_SMS, interpreter_align)
    return m_chunk(M, tiles, num_sms(t), gpu_align)


def m_chunk(M: int, tiles: int, sms: int, align: int) -> int:
    """Rows of M per program for kernels that reduce G = gyᵀ x over M for each of ``tiles`` output
    tiles: with few tiles (768×768 in 128×128 tiles: 36) one program per tile would leave most SMs
    idle, so M is split into chunks whose partial results are summed afterwards. Minimizes
    waves × (rows + epilogue), the epilogue costed like 2·align rows of main loop; a multiple of align."""
    best_rows, best_cost = M, None
    for split in range(1, min(32, triton.cdiv(M, 2 * align)) + 1):
        rows = triton.cdiv(triton.cdiv(M, split), align) * align
        cost = triton.cdiv(tiles * triton.cdiv(M, rows), sms) * (rows + 2 * align)
        if best_cost is None or cost < best_cost:
            best_rows, best_cost = rows, cost
    return best_rows
