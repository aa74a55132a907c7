"""The ``rescaled-linear`` bench case under pytest-benchmark, reusing the CLI's variant definitions.

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json]
    BENCH_SHAPE=4096,768,768 pytest benchmarks/ --benchmark-only
"""

import os

import pytest
import torch

from subspace_ops.bench.cases import CASES, DEFAULT_DTYPE, parse_shape

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = parse_shape(os.environ.get("BENCH_SHAPE", "197,768,768"))[0]
CASE = CASES["rescaled-linear"]
VARIANTS = [v.name for v in CASE.variants(SHAPE, DEFAULT_DTYPE[DEVICE.type], DEVICE, None)]


@pytest.fixture(scope="module")
def variants():
    return {v.name: v for v in CASE.variants(SHAPE, DEFAULT_DTYPE[DEVICE.type], DEVICE, None)}


def _synced(fn):
    if DEVICE.type != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize())


@pytest.mark.parametrize("mode", ["forward", "fwd+bwd"])
@pytest.mark.parametrize("name", VARIANTS)
def test_rescaled_linear(benchmark, variants, name, mode):
    variant = variants[name]
    if variant.skip:
        pytest.skip(variant.skip)
    benchmark.group = f"rescaled-linear {'x'.join(map(str, SHAPE))} {mode}"

    def step():
        y = variant.forward()
        if mode == "fwd+bwd":
            y.backward(variant.grad_output)
            for t in variant.grads:
                t.grad = None

    benchmark(_synced(step))
