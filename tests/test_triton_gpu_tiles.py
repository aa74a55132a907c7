"""The Triton kernels' arithmetic at the tile sizes they use on a GPU.

The other Triton tests run every kernel in the interpreter with one small tile (16), where a shape
spans many tiles. On a GPU the autotuner picks among much larger tiles (up to 256 × 128, reduction
steps of 8 to 64), under which the same shapes end in partial tiles, a single K step or an M split of
another alignment. Here each GPU tile is swapped in for the interpreter's and the ops' forward and
gradients are compared with the float64 reference, so that masking and tail logic is checked at the
sizes that will run. (Whether the tiles compile and fit a GPU is test_triton_aot.py's part.)
"""

from __future__ import annotations

import pytest
import torch

import subspace_ops
from subspace_ops.ops.lowrank_linear import lowrank_linear

from conftest import ON_INTERPRETER, require_backend

pytestmark = [
    pytest.mark.triton,
    pytest.mark.slow,
    pytest.mark.skipif(not ON_INTERPRETER, reason="on a GPU the autotuner runs these tiles itself"),
]


def _gpu_tiles() -> list:
    from subspace_ops.triton_kernels._common import FMA_TILES, TENSOR_CORE_TILES

    return sorted({(rows, cols, red) for rows, cols, red, _, _ in TENSOR_CORE_TILES + FMA_TILES})


TILES = _gpu_tiles()
M, K, N = 150, 136, 130  # more than one tile, the last one partial, in each dimension for most tiles above


def _randn(*shape, grad=False):
    t = torch.randn(*shape, dtype=torch.float64)
    return t.requires_grad_(grad)


def _compare(fused, reference, inputs, grad_y):
    """Forward and the gradients of every input that requires one, fused vs reference."""
    trained = [t for t in inputs if t is not None and t.requires_grad]
    y = fused()
    y_ref = reference()
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for g, g_ref in zip(torch.autograd.grad(y, trained, grad_y), torch.autograd.grad(y_ref, trained, grad_y)):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tile", TILES, ids=lambda t: "x".join(map(str, t)))
def test_rescaled_linear_at_gpu_tiles(monkeypatch, tile):
    require_backend("triton")
    from subspace_ops.triton_kernels import _common, rescaled_linear as kernels

    rows, cols, red = tile
    monkeypatch.setattr(kernels, "_INTERPRETER_BLOCKS", dict(BLOCK_M=rows, BLOCK_N=cols, BLOCK_K=red, GROUP=8))
    monkeypatch.setattr(_common, "m_chunk", lambda m, tiles, sms, align: align)  # scales kernel: M split
    x, weight, s_l, s_r, bias = _randn(M, K, grad=True), _randn(N, K), _randn(N, 2, grad=True), \
        _randn(K, 2, grad=True), _randn(N, grad=True)
    grad_y = torch.randn(M, N, dtype=torch.float64)

    def run(backend):
        return lambda: subspace_ops.rescaled_linear(x, weight, s_l, s_r, bias, residual=True, backend=backend)

    _compare(run("triton"), run("reference"), [x, weight, s_l, s_r, bias], grad_y)
    weight.requires_grad_(True)  # dW: the scales kernel then takes all of M in one program
    _compare(run("triton"), run("reference"), [x, weight, s_l, s_r, bias], grad_y)


@pytest.mark.parametrize("tile", TILES, ids=lambda t: "x".join(map(str, t)))
def test_lowrank_linear_at_gpu_tiles(monkeypatch, tile):
    require_backend("triton")
    from subspace_ops.triton_kernels import lowrank_linear as kernels

    rows, cols, red = tile
    monkeypatch.setattr(kernels, "_INTERPRETER_BLOCKS", dict(BLOCK_M=rows, BLOCK_C=cols, BLOCK_D=red, GROUP=8))
    x, weight, a, g, b, bias = _randn(M, K, grad=True), _randn(N, K), _randn(N, 8, grad=True), \
        _randn(8, 8, grad=True), _randn(8, K, grad=True), _randn(N, grad=True)
    grad_y = torch.randn(M, N, dtype=torch.float64)

    def run(backend):
        return lambda: lowrank_linear(x, weight, a, g, b, bias, scaling=0.5, backend=backend)

    _compare(run("triton"), run("reference"), [x, weight, a, g, b, bias], grad_y)


@pytest.mark.parametrize("small", [False, True], ids=["tensor-core-blocks", "small-blocks"])
def test_svd_delta_linear_at_gpu_blocks(monkeypatch, small):
    """The dd kernel's GPU blocks, and its M split at the GPU's 128-row alignment."""
    require_backend("triton")
    from subspace_ops.triton_kernels import _common, svd_delta_linear as kernels

    grad_d = kernels._GRAD_D_BLOCKS_SMALL if small else kernels._GRAD_D_BLOCKS
    blocks = {name: value for name, value in grad_d.items() if name.startswith("BLOCK")}
    monkeypatch.setattr(kernels, "_INTERPRETER_BLOCKS", blocks)
    monkeypatch.setattr(_common, "m_chunk", lambda m, tiles, sms, align: 128)  # 3 chunks of M = 300
    x, weight, bias = _randn(2 * M, K, grad=True), _randn(N, K), _randn(N, grad=True)
    u, v, d = torch.linalg.qr(_randn(N, 40))[0], torch.linalg.qr(_randn(K, 40))[0], _randn(40, grad=True)
    grad_y = torch.randn(2 * M, N, dtype=torch.float64)

    def run(backend):
        return lambda: subspace_ops.svd_delta_linear(x, weight, u, v, d, bias, backend=backend, path="merged")

    _compare(run("triton"), run("reference"), [x, weight, u, v, d, bias], grad_y)


def _head_tiles() -> list:
    from subspace_ops.triton_kernels import head_mixing_attention as kernels

    return sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kernels._HEADS_CONFIGS})


@pytest.mark.parametrize("tile", _head_tiles(), ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("kind", ["causal", "mask"])
def test_head_mixing_attention_at_gpu_tiles(monkeypatch, tile, kind):
    """All-heads kernels (LSE, forward, dQ, dK/dV) with each GPU (BLOCK_M, BLOCK_N); cross attention
    (Nq ≠ Nk, neither a multiple of the tiles), causal or with an additive mask."""
    require_backend("triton")
    from subspace_ops.triton_kernels import head_mixing_attention as kernels

    monkeypatch.setattr(kernels, "_INTERPRETER_BLOCKS", {"BLOCK_M": tile[0], "BLOCK_N": tile[1]})
    batch, heads, n_q, n_k, dim = 2, 3, 45, 70, 16
    q, k, v = (_randn(batch, heads, n, dim, grad=True) for n in (n_q, n_k, n_k))
    mix = (torch.eye(heads, dtype=torch.float64) + 0.3 * torch.randn(heads, heads, dtype=torch.float64))
    mix.requires_grad_(True)
    mask = None if kind == "causal" else torch.randn(batch, 1, n_q, n_k, dtype=torch.float64)
    grad_y = torch.randn(batch, heads, n_q, dim, dtype=torch.float64)

    def run(backend):
        return lambda: subspace_ops.head_mixing_attention(q, k, v, mix, attn_mask=mask, is_causal=kind == "causal",
                                                          backend=backend)

    _compare(run("triton"), run("reference"), [q, k, v, mix], grad_y)
