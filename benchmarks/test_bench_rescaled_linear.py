"""The ``rescaled-linear`` bench case under pytest-benchmark.

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json]
    BENCH_SHAPE=4096,768,768 pytest benchmarks/ --benchmark-only

The variants, their tensors and the per-mode iteration are the CLI's own
(:mod:`subspace_ops.bench.cases`, :func:`subspace_ops.bench.harness.iteration`); pytest-benchmark
only replaces the timing loop. Variants that cannot run here (peft missing, torch.compile failing)
are skipped with the reason; on CUDA each call is followed by a synchronize so the kernels are timed.
"""

from __future__ import annotations

import os
from typing import Callable

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed")

from subspace_ops.bench.cases import CASES  # noqa: E402
from subspace_ops.bench.harness import Variant, VariantSkipped, Workload, iteration  # noqa: E402

CASE = CASES["rescaled-linear"]
DEVICE = torch.device(os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
DTYPE = getattr(torch, os.environ["BENCH_DTYPE"]) if os.environ.get("BENCH_DTYPE") else CASE.default_dtype[DEVICE.type]
BACKEND = os.environ.get("BENCH_BACKEND") or None
SHAPES = [s for text in os.environ.get("BENCH_SHAPE", "197,768,768").split(";") if text.strip()
          for s in CASE.parse_shape(text, DEVICE.type)]
VARIANTS: dict[str, Variant] = {v.name: v for v in CASE.make_variants(BACKEND)}  # allocates nothing
WARMUP = 2


@pytest.fixture(scope="module")
def workloads() -> dict:
    """Workloads built on first use, one per (variant, shape), shared by the modes."""
    return {}


def _workload(cache: dict, variant: Variant, shape: tuple) -> Workload:
    key = (variant.name, shape)
    if key not in cache:
        try:
            cache[key] = variant.setup(shape, DTYPE, DEVICE)
        except VariantSkipped as exc:
            cache[key] = exc
        except Exception as exc:
            if not variant.optional:
                raise
            cache[key] = VariantSkipped(f"setup failed: {type(exc).__name__}: {exc}")
    if isinstance(cache[key], VariantSkipped):
        pytest.skip(str(cache[key]))
    return cache[key]


def _synced(fn: Callable[[], None]) -> Callable[[], None]:
    if DEVICE.type != "cuda":
        return fn

    def run() -> None:
        fn()
        torch.cuda.synchronize(DEVICE)

    return run


@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("mode", ["forward", "fwd+bwd"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_rescaled_linear(benchmark, workloads, name: str, mode: str, shape: tuple) -> None:
    variant = VARIANTS[name]
    step = _synced(iteration(_workload(workloads, variant, shape), mode))
    try:  # warm up outside the timing: the first call compiles / autotunes
        for _ in range(WARMUP):
            step()
    except Exception as exc:
        if not variant.optional:
            raise
        pytest.skip(f"{name} cannot run here: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    benchmark.group = f"{CASE.name} {'x'.join(map(str, shape))} {str(DTYPE).replace('torch.', '')} {mode}"
    benchmark.extra_info.update({"variant": name, "mode": mode, "device": str(DEVICE),
                                 "dims": dict(zip(CASE.dim_names, shape))})
    benchmark(step)
