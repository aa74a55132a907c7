"""The op bench cases of ``subspace-ops bench`` under pytest-benchmark.

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json]
    BENCH_CASES=svd-delta-linear BENCH_SHAPE=4096,768,768 pytest benchmarks/ --benchmark-only

The cases, their variants and tensors and the per-mode iteration are the CLI's own
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

OP_CASES = ("rescaled-linear", "scaled-linear", "svd-delta-linear", "lowrank-linear", "head-mixing-attention",
            "head-mixing-attention-causal")  # the e2e cases time whole models: `subspace-ops bench e2e`
DEVICE = torch.device(os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
BACKEND = os.environ.get("BENCH_BACKEND") or None
# Small defaults, one shape per case (a ViT-B layer; one head-mixing call of 512 tokens)
DEFAULT_SHAPES = {("M", "K", "N"): "197,768,768", ("B", "H", "N", "d"): "1,8,512,64"}


def _cases() -> list[str]:
    chosen = [c.strip() for c in os.environ.get("BENCH_CASES", ",".join(OP_CASES)).split(",") if c.strip()]
    unknown = [c for c in chosen if c not in OP_CASES]
    if unknown:
        raise ValueError(f"BENCH_CASES: unknown op case(s) {unknown}; choose from {', '.join(OP_CASES)}")
    return chosen


def _params() -> list:
    """(case, variant, shape) for every case: BENCH_SHAPE (a preset or sizes, ';'-separated) applies to
    the cases whose dimensions it fits; the others keep their default."""
    params, requested = [], [t for t in os.environ.get("BENCH_SHAPE", "").split(";") if t.strip()]
    names, fitted = _cases(), set()
    for name in names:
        case = CASES[name]
        shapes = []
        for text in requested:
            try:
                shapes += case.parse_shape(text, DEVICE.type)
                fitted.add(text)
            except ValueError:
                pass  # sizes of another case's dimensions
        shapes = shapes or case.parse_shape(DEFAULT_SHAPES[tuple(case.dim_names)], DEVICE.type)
        for variant in case.make_variants(BACKEND):  # allocates nothing
            params += [pytest.param(name, variant, shape, id=f"{name}-{variant.name}-{'x'.join(map(str, shape))}")
                       for shape in shapes]
    unused = [text for text in requested if text not in fitted]
    if unused:
        raise ValueError(f"BENCH_SHAPE: {unused} fit(s) none of the cases {names} (M,K,N or B,H,N,d, or a preset)")
    return params


WARMUP = 2


@pytest.fixture(scope="module")
def workloads() -> dict:
    """Workloads built on first use, one per (variant, shape), shared by the modes."""
    return {}


def _workload(cache: dict, variant: Variant, shape: tuple, dtype: torch.dtype) -> Workload:
    key = (id(variant), shape, dtype)
    if key not in cache:
        try:
            cache[key] = variant.setup(shape, dtype, DEVICE)
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


@pytest.mark.parametrize("mode", ["forward", "fwd+bwd"])
@pytest.mark.parametrize(("case_name", "variant", "shape"), _params())
def test_op(benchmark, workloads, case_name: str, variant: Variant, shape: tuple, mode: str) -> None:
    case = CASES[case_name]
    requested_dtype = os.environ.get("BENCH_DTYPE")
    dtype = getattr(torch, requested_dtype) if requested_dtype else case.default_dtype[DEVICE.type]
    try:
        step = _synced(iteration(_workload(workloads, variant, shape, dtype), mode))
    except ValueError as exc:  # e.g. FlexAttention has no backward on CPU
        pytest.skip(f"{variant.name} has no {mode} here: {exc}")
    try:  # warm up outside the timing: the first call compiles / autotunes
        for _ in range(WARMUP):
            step()
    except Exception as exc:
        if not variant.optional:
            raise
        pytest.skip(f"{variant.name} cannot run here: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    benchmark.group = f"{case.name} {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} {mode}"
    benchmark.extra_info.update({"case": case.name, "variant": variant.name, "mode": mode, "device": str(DEVICE),
                                 "dims": dict(zip(case.dim_names, shape))})
    benchmark(step)
