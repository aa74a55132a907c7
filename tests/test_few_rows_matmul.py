"""The cpu backend's few-rows products (csrc/few_rows_matmul.h): a · Wᵀ and a · W for up to 16 rows,
reading W once, against float64 products; and where rescaled_linear uses them."""

from __future__ import annotations

import pytest
import torch

import subspace_ops
from subspace_ops.backends import cpu_extension
from subspace_ops.testing import check_close

from conftest import require_backend, torch_threads


def _weight(layout: str, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """[N, K] float64 stored row-major, as a transposed view (GPT-2's Conv1D), or with a row stride and
    a column stride of 2 (neither unit: the kernel copies it)."""
    if layout == "rows":
        return torch.randn(n, k, generator=g, dtype=torch.float64)
    if layout == "transposed":
        return torch.randn(k, n, generator=g, dtype=torch.float64).T
    return torch.randn(n, 2 * k, generator=g, dtype=torch.float64)[:, ::2]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("layout", ["rows", "transposed", "strided"])
@pytest.mark.parametrize("n, k", [(1, 1), (1, 17), (17, 1), (13, 1030), (130, 37)])
def test_products_match_float64(cpu_isa, n, k, layout, threads):
    """Every row count 0-16 (the loops' blocks of 2 rows of a and 4 rows of W, 4-row tiles and their
    tails), K and N off every vector width (1030 = 8·128 + 6; 37; 1), each weight layout, both
    orientations, at 1-3 threads (the threads split W's rows or the result's columns)."""
    g = torch.Generator().manual_seed(n * 1000 + k)
    w64 = _weight(layout, n, k, g)
    extension = cpu_extension()
    with torch_threads(threads):
        for rows in range(17):
            for transpose in (True, False):
                a64 = torch.randn(rows, k if transpose else n, generator=g, dtype=torch.float64)
                truth = a64 @ (w64.T if transpose else w64)
                got = extension.few_rows_matmul(a64.float(), w64.float(), transpose)
                assert got.shape == truth.shape and got.dtype == torch.float32 and got.is_contiguous()
                name = f"{layout}/rows{rows}/{'a·Wt' if transpose else 'a·W'}"
                w32 = (w64.T if transpose else w64).float()
                check_close(name, got, truth, a64.float() @ w32)  # torch's float32 product: the tolerance


def test_bad_arguments_are_refused():
    require_backend("cpu")
    extension = cpu_extension()
    w = torch.randn(8, 5)
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        extension.few_rows_matmul(torch.randn(17, 5), w, True)
    with pytest.raises(RuntimeError, match="a has 8 columns, expected 5"):
        extension.few_rows_matmul(torch.randn(2, 8), w, True)
    with pytest.raises(RuntimeError, match="float32 CPU tensors"):
        extension.few_rows_matmul(torch.randn(2, 5, dtype=torch.float64), w.double(), True)


def _counting_few_rows(monkeypatch) -> list:
    """Records the row count of every few-rows product the extension runs."""
    extension = cpu_extension()
    original = extension.few_rows_matmul
    calls = []

    def counted(a, weight, transpose):
        calls.append((a.shape[0], transpose))
        return original(a, weight, transpose)

    monkeypatch.setattr(extension, "few_rows_matmul", counted)
    return calls


@pytest.mark.parametrize("residual, path, tokens, rank, expected_rows", [
    (True, "stacked", 2, 3, 8),     # RLRR on a fused qkv: 2 tokens · (1 + 3) stacked rows
    (True, "stacked", 1, 1, 2),     # RLRR decoding one token
    (False, "separable", 5, 1, 5),  # SSB on 5 tokens
])
def test_rescaled_linear_products_with_w_take_the_few_rows_loops(monkeypatch, residual, path, tokens, rank,
                                                                 expected_rows):
    """In float32 on the cpu backend the stacked and separable paths' products with W run on the
    few-rows loops (forward a · Wᵀ, backward a · W), and the step equals the float64 reference."""
    require_backend("cpu")
    if not cpu_extension().few_rows_prefers(2, True):
        pytest.skip("this CPU runs neither AVX-512 nor AVX2 + FMA")
    calls = _counting_few_rows(monkeypatch)
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(1, tokens, 48, generator=g, dtype=torch.float64)
    w64 = torch.randn(40, 48, generator=g, dtype=torch.float64)
    s_l64, s_r64 = torch.randn(40, rank, generator=g, dtype=torch.float64), torch.randn(48, rank, generator=g,
                                                                                     dtype=torch.float64)

    def step(dtype, backend, chosen):
        leaves = [t.to(dtype).requires_grad_() for t in (x64, s_l64, s_r64)]
        y = subspace_ops.rescaled_linear(*leaves[:1], w64.to(dtype), *leaves[1:], residual=residual,
                                         backend=backend, path=chosen)
        return [y, *torch.autograd.grad(y, leaves, torch.ones_like(y))]

    got = step(torch.float32, "cpu", path)
    assert calls == [(expected_rows, True), (expected_rows, False)]
    for name, a, truth, ref32 in zip(["y", "dx", "ds_l", "ds_r"], got, step(torch.float64, "reference", None),
                                     step(torch.float32, "reference", None)):
        check_close(name, a, truth, ref32)
    calls.clear()
    with torch.no_grad():
        subspace_ops.rescaled_linear(x64.float(), w64.float(), s_l64.float(), s_r64.float(), residual=residual,
                                     backend="cpu", path=path)
    assert calls == [(expected_rows, True)]


def test_more_rows_and_other_dtypes_keep_torch_products(monkeypatch):
    """Beyond 16 rows (few_rows::kPreferredRows), in float64 and on the reference backend, no few-rows
    product runs."""
    require_backend("cpu")
    calls = _counting_few_rows(monkeypatch)
    w = torch.randn(40, 48)
    over = 17
    assert not cpu_extension().few_rows_prefers(over, True)
    subspace_ops.rescaled_linear(torch.randn(over, 48), w, torch.randn(40), torch.randn(48), residual=False,
                                 backend="cpu", path="separable")
    subspace_ops.rescaled_linear(torch.randn(1, 48, dtype=torch.float64), w.double(), torch.randn(40).double(),
                                 torch.randn(48).double(), backend="cpu", path="stacked")
    subspace_ops.rescaled_linear(torch.randn(1, 48), w, torch.randn(40), torch.randn(48), backend="reference")
    assert calls == []
