"""head_mixing_attention (METHODS.md §3) on every backend against the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import subspace_ops
from subspace_ops.ops.head_mixing_attention import additive_mask
from subspace_ops.testing import check_close

from conftest import ON_INTERPRETER, backend_device, require_backend, torch_threads

# name -> (B, H, Nq, Nk, d, is_causal, mask kind). Odd sizes, H = 1, 4, 6, 8, 12, 16 and 20, d not a
# power of two, cross attention (Nq != Nk) both ways, causal with Nq != Nk (top-left triangle).
CASES = {
    "vit-like": (2, 3, 13, 13, 16, False, None),
    "cross": (1, 4, 5, 19, 8, False, None),
    "causal": (2, 2, 17, 17, 16, True, None),
    "causal-cross": (1, 3, 19, 7, 8, True, None),
    "one-head-d40": (1, 1, 9, 9, 40, False, None),
    "twelve-heads": (1, 12, 18, 7, 8, False, None),
    "twenty-heads": (1, 20, 17, 6, 8, False, None),  # H not a power of two, one full row vector + a tail
    "key-padding": (2, 3, 6, 9, 8, False, "key-padding"),
    "additive": (2, 3, 6, 9, 8, False, "additive"),
    "causal+padding": (2, 2, 8, 8, 8, True, "key-padding"),
    # Left padding (as a batch of decoder prompts has): some rows' whole first key block (16 keys in
    # the interpreter) is masked, and keys after it are not; the running max starts at -inf.
    "late-keys": (2, 3, 6, 37, 8, False, "late-keys"),
    # The CPU head mix has compile-time loops for H = 4, 6, 8, 12, 16 over whole vectors of 16 query
    # rows, a few key rows at a time: these have >= 16 query rows, a row tail and odd key counts. Its
    # float32 O += M V loop takes 64 columns x 6 rows (then 2, then 1) and 16/32-column tails: d = 64, 80.
    "eight-heads": (1, 8, 37, 29, 64, False, None),
    "six-heads-padding": (2, 6, 33, 19, 16, False, "key-padding"),
    "four-heads-d80": (1, 4, 20, 23, 80, False, None),
    "sixteen-heads-causal": (1, 16, 20, 20, 16, True, None),
}


def make_mask(kind, batch, heads, n_q, n_k, device):
    g = torch.Generator().manual_seed(3)
    if kind == "key-padding":  # [B, 1, 1, Nk]; batch 0 sees no key at all (fully masked rows)
        keep = torch.rand(batch, 1, 1, n_k, generator=g) > 0.3
        keep[0] = False
        return keep.to(device)
    if kind == "additive":  # a general float bias with some -inf
        bias = torch.randn(batch, heads, n_q, n_k, generator=g, dtype=torch.float64)
        bias[torch.rand(bias.shape, generator=g) < 0.2] = float("-inf")
        return bias.to(device)
    if kind == "late-keys":  # batch 0's even query rows see only keys >= min(600, Nk / 2); its row 1 sees none
        keep = torch.ones(batch, 1, n_q, n_k, dtype=torch.bool)
        keep[0, :, ::2, :min(600, n_k // 2)] = False
        keep[0, :, 1] = False
        return keep.to(device)
    return None


def make_inputs(case, dtype, device, cases=CASES):
    batch, heads, n_q, n_k, dim, _, _ = cases[case]
    g = torch.Generator().manual_seed(7)
    q = torch.randn(batch, heads, n_q, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, heads, n_k, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, heads, n_k, dim, generator=g, dtype=torch.float64)
    mix = torch.eye(heads, dtype=torch.float64) + 0.3 * torch.randn(heads, heads, generator=g, dtype=torch.float64)
    tensors = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (q, k, v)]
    return (*tensors, mix.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype).requires_grad_())


def run(case, inputs, backend, grad_out, cases=CASES, dropout_p=0.0):
    """(out, grads of q, k, v, mix); with dropout, every run draws the same seed (the same mask)."""
    batch, heads, n_q, n_k, _, causal, kind = cases[case]
    q, k, v, mix = inputs
    mask = make_mask(kind, batch, heads, n_q, n_k, q.device)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(q.dtype)
    torch.manual_seed(2024)
    out = subspace_ops.head_mixing_attention(q, k, v, mix, attn_mask=mask, is_causal=causal, dropout_p=dropout_p,
                                             backend=backend)
    return out, torch.autograd.grad(out, inputs, grad_out.to(out.dtype))


def _dtypes(backend):
    if backend == "triton" and ON_INTERPRETER:  # the interpreter's tl.dot is wrong for bf16/fp16
        return [torch.float32]
    return [torch.float32, torch.bfloat16]


def float64_truth(case, device, cases=CASES, dropout_p=0.0):
    """(grad_out, (out, grads) of the float64 reference) for a case."""
    inputs = make_inputs(case, torch.float64, device, cases)
    grad_out = torch.randn(inputs[0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grad_out = grad_out.to(device)
    return grad_out, run(case, inputs, "reference", grad_out, cases, dropout_p)


def check_dtype_against_truth(label, case, backend, dtype, device, grad_out, truth, cases=CASES, dropout_p=0.0):
    """``backend`` in ``dtype`` against the float64 truth, with the papers' naive form in ``dtype`` setting the
    bound: the reference with every input in ``dtype``, mix included (given a wider mix, the reference
    keeps its dtype for the mixing, which makes it more accurate than that form)."""
    q, k, v, mix = make_inputs(case, dtype, device, cases)
    naive_inputs = (q, k, v, mix.detach().to(dtype).requires_grad_())
    out_ref, grads_ref = run(case, naive_inputs, "reference", grad_out, cases, dropout_p)
    out, grads = run(case, make_inputs(case, dtype, device, cases), backend, grad_out, cases, dropout_p)
    out64, grads64 = truth
    check_close(f"{label}/{dtype}/out", out, out64, out_ref)
    for name, a, t, r in zip(("dq", "dk", "dv", "dmix"), grads, grads64, grads_ref):
        check_close(f"{label}/{dtype}/{name}", a, t, r)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_reference(backend, case):
    device = backend_device(backend)
    grad_out, truth = float64_truth(case, device)
    for dtype in _dtypes(backend):
        check_dtype_against_truth(case, case, backend, dtype, device, grad_out, truth)


@pytest.mark.parametrize("causal, kind, dropout_p", [(True, None, 0.0), (False, "key-padding", 0.0),
                                                     (True, "additive", 0.0), (False, None, 0.5),
                                                     (True, "key-padding", 0.5)])
def test_gradcheck_float64(backend, causal, kind, dropout_p):
    device = backend_device(backend)
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 2, n, 4, generator=g, dtype=torch.float64) for n in (4, 5, 5))
    mix = torch.eye(2, dtype=torch.float64) + 0.5 * torch.randn(2, 2, generator=g, dtype=torch.float64)
    inputs = [t.to(device).requires_grad_(True) for t in (q, k, v, mix)]
    mask = make_mask(kind, 2, 2, 4, 5, device)

    def fn(q, k, v, mix):
        torch.manual_seed(5)  # with dropout, the same mask at every evaluation
        return subspace_ops.head_mixing_attention(q, k, v, mix, attn_mask=mask, is_causal=causal, dropout_p=dropout_p,
                                                  backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("causal", [False, True])
def test_identity_mix_is_sdpa(backend, causal):
    """mix = I is plain attention: the op must reproduce torch's SDPA."""
    device = backend_device(backend)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 11, 16, generator=g).to(device) for _ in range(3))
    keep = (torch.rand(2, 1, 1, 11, generator=g) > 0.2).to(device)
    keep[..., 0] = True  # SDPA gives NaN for fully masked rows; keep one key per row
    mask = None if causal else keep
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    mix = torch.eye(4, device=device)
    actual = subspace_ops.head_mixing_attention(q, k, v, mix, attn_mask=mask, is_causal=causal, backend=backend)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_are_zero(backend):
    device = backend_device(backend)
    q, k, v, mix = make_inputs("key-padding", torch.float32, device)
    keep = torch.zeros(2, 1, 1, 9, dtype=torch.bool, device=device)
    keep[1, ..., :4] = True  # batch 0 sees nothing, batch 1 sees 4 keys
    out = subspace_ops.head_mixing_attention(q, k, v, mix, attn_mask=keep, backend=backend)
    assert torch.isfinite(out).all()
    assert out[0].abs().max() == 0 and out[1].abs().max() > 0
    grads = torch.autograd.grad(out.square().sum(), [q, k, v, mix])
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[0][0].abs().max() == 0 and grads[1][1, :, 4:].abs().max() == 0  # no key seen, no gradient


def _check_rows_masked_with_finfo_min(backend, n_k):
    """transformers' padding masks add finfo(dtype).min: a row whose every key is padding has scores that
    all round to that value, which the reference (as SDPA's math) averages uniformly. Its max is so large
    that max + log Σ == max, so the kernels keep what that sum lost (lse[1]); without it the backward (and
    the Triton forward) gave each of the row's keys probability 1 instead of 1/n."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        g = torch.Generator().manual_seed(5)
        q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=dtype) for n in (5, n_k, n_k))
        mix = torch.eye(2, dtype=dtype) + 0.3 * torch.randn(2, 2, generator=g, dtype=dtype)
        mask = torch.zeros(1, 1, 5, n_k, dtype=dtype)
        mask[..., :2, :] = torch.finfo(dtype).min  # rows 0, 1: every key padding
        mask[..., 2, n_k // 2:] = torch.finfo(dtype).min  # row 2: half its keys
        grad_out = torch.randn(1, 2, 5, 8, generator=g, dtype=dtype)
        results = {}
        for name in (backend, "reference"):
            inputs = [t.clone().requires_grad_() for t in (q, k, v, mix)]
            out = subspace_ops.head_mixing_attention(*inputs, attn_mask=mask, backend=name)
            results[name] = (out, *torch.autograd.grad(out, inputs, grad_out))
        for what, a, b in zip(("out", "dq", "dk", "dv", "dmix"), results[backend], results["reference"]):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"{dtype} Nk={n_k} {what}")


@pytest.mark.parametrize("n_k", [7, 700])  # one pass of the cpu forward, and two (keys beyond its tile)
def test_rows_masked_with_finfo_min(backend, n_k):
    _check_rows_masked_with_finfo_min(backend, n_k)


def test_opcheck_and_compile(fused_backend):
    device = backend_device(fused_backend)
    q, k, v, mix = make_inputs("key-padding", torch.float32, device)
    keep = make_mask("key-padding", 2, 3, 6, 9, device)
    mask = additive_mask(keep, torch.float32, torch.Size((2, 3, 6, 9)))
    torch.library.opcheck(torch.ops.subspace_ops.head_mixing_attention.default,
                          (q, k, v, mix, mask, True, 0.25, 0.0, None, fused_backend))
    seed = torch.tensor([12345], dtype=torch.int64, device=device)
    torch.library.opcheck(torch.ops.subspace_ops.head_mixing_attention.default,
                          (q, k, v, mix, mask, False, 0.25, 0.5, seed, fused_backend))
    if fused_backend == "triton" and ON_INTERPRETER:
        return  # compiling around the interpreter adds nothing but minutes

    def loss(q, k, v, mix):
        out = subspace_ops.head_mixing_attention(q, k, v, mix, attn_mask=keep, backend=fused_backend)
        return out.square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    expected = torch.autograd.grad(loss(q, k, v, mix), [q, k, v, mix])
    actual = torch.autograd.grad(compiled(q, k, v, mix), [q, k, v, mix])
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


# Shapes that take the C++ kernel's other paths (the small CASES all fit one query block and one
# key chunk): several query blocks and the online row max over key chunks of 256 (first key chunk
# fully masked for some rows: the running max starts at -inf), and a key row longer than the tile
# (two-pass forward, D in a first pass in the backward). Run at 1, 2 and 3 threads, so that the
# backward shares dK/dV each way: owned batches (1 thread; B=2 at 2 threads), thread copies (B=1 at
# 2 threads, self-attention), two phases (3 threads; the long key row at 2).
# The "gemm-" cases have a head size that is a multiple of 16, so in float32 (on an AVX-512 CPU) they
# run on csrc/head_mixing_gemm.cpp's loops: 45 query rows (a pair of row vectors, the second partial)
# and 83 keys (blocks of 8 and leftovers) with a mask; causal with a second query block of 6 rows;
# and the row max taken inside the score GEMM over three key chunks (no mask).
CPU_PATH_CASES = {
    "key-chunks-causal": (1, 2, 1100, 1100, 8, True, None),
    "key-chunks-late-keys": (2, 2, 700, 1100, 8, False, "late-keys"),
    "long-key-row": (1, 2, 12, 40000, 8, False, "late-keys"),
    "gemm-tails-additive": (2, 3, 45, 83, 48, False, "additive"),
    "gemm-causal-d64": (1, 2, 70, 70, 64, True, None),
    "gemm-chunks-d16": (1, 2, 40, 600, 16, False, None),
}


def assert_float64_tight(case, ours, truth):
    """(out, grads) of a float64 run against the float64 truth, tightly: the algorithm itself."""
    for name, actual, expected in zip(("out", "dq", "dk", "dv", "dmix"), (ours[0], *ours[1]), (truth[0], *truth[1])):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11, msg=lambda m: f"{case}/{name}: {m}")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("case", sorted(CPU_PATH_CASES))
def test_cpu_kernel_paths_match_reference(case, threads):
    require_backend("cpu")
    with torch_threads(threads):
        grad_out, truth = float64_truth(case, "cpu", CPU_PATH_CASES)
        ours64 = run(case, make_inputs(case, torch.float64, "cpu", CPU_PATH_CASES), "cpu", grad_out, CPU_PATH_CASES)
        assert_float64_tight(case, ours64, truth)
        check_dtype_against_truth(case, case, "cpu", torch.float32, "cpu", grad_out, truth, CPU_PATH_CASES)


@pytest.mark.parametrize("case", ["four-heads-d80", "six-heads-padding", "eight-heads", "twelve-heads",
                                  "sixteen-heads-causal"])
def test_cpu_fixed_head_mix_float64(case):
    """The CPU head mix's compile-time-H loops also run in float64 (8-lane vectors): tightly
    against the float64 reference (the float32 runs of these cases are in test_matches_float64_reference)."""
    require_backend("cpu")
    grad_out, truth = float64_truth(case, "cpu")
    assert_float64_tight(case, run(case, make_inputs(case, torch.float64, "cpu"), "cpu", grad_out), truth)


def test_cpu_memory_is_linear_in_sequence_length():
    """The C++ kernel must not hold [B, H, Nq, Nk]: peak memory of forward + backward stays far below
    one such tensor (the naive form needs several)."""
    from subspace_ops.bench.harness import _cpu_peak_bytes

    heads, n, dim = 4, 2048, 16
    q, k, v = (torch.randn(1, heads, n, dim, requires_grad=True) for _ in range(3))
    mix = torch.eye(heads, requires_grad=True)
    full_map = heads * n * n * 4

    def step():
        out = subspace_ops.head_mixing_attention(q, k, v, mix, is_causal=True, backend="cpu")
        out.backward(torch.ones_like(out))

    step()
    peak = _cpu_peak_bytes(step)
    assert peak < full_map / 2, f"peak {peak / 2**20:.1f} MiB vs one H·N² map {full_map / 2**20:.0f} MiB"


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(q=torch.randn(2, 3, 6)), ValueError, "q must be 4-D"),
        (dict(q=torch.randn(2, 3, 6, 0), k=torch.randn(2, 3, 9, 0), v=torch.randn(2, 3, 9, 0)), ValueError,
         r"q must have a head size d >= 1"),
        (dict(k=torch.randn(2, 3, 9, 4)), ValueError, "k must be"),
        (dict(v=torch.randn(2, 3, 8, 8)), ValueError, "v must have k's shape"),
        (dict(mix=torch.randn(4, 4)), ValueError, "mix must be"),
        (dict(k=torch.randn(2, 3, 9, 8, dtype=torch.float64)), (TypeError, ValueError), "dtype"),
        (dict(q=torch.randint(0, 3, (2, 3, 6, 8))), TypeError, "q"),
        (dict(attn_mask=torch.ones(2, 3, 7, 9, dtype=torch.bool)), ValueError, "attn_mask must broadcast"),
        (dict(attn_mask=torch.ones(2, 1, 1, 9, dtype=torch.int64)), TypeError, "attn_mask must be boolean"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be a float in \[0, 1\), got 1.0"),
        (dict(dropout_p=-0.1), ValueError, "dropout_p must be"),
        (dict(dropout_p="0.1"), ValueError, "dropout_p must be"),
    ],
)
def test_bad_input(change, error, message):
    args = dict(q=torch.randn(2, 3, 6, 8), k=torch.randn(2, 3, 9, 8), v=torch.randn(2, 3, 9, 8), mix=torch.eye(3))
    args.update(change)
    mask = args.pop("attn_mask", None)
    for backend in ("cpu", "reference"):
        with pytest.raises(error, match=message):
            subspace_ops.head_mixing_attention(**args, attn_mask=mask, backend=backend)


def test_a_float64_additive_mask_is_added_in_the_scores_dtype(backend):
    """As the fused kernels do, the reference adds a float mask in q's dtype (it raised before)."""
    device = backend_device(backend)
    q, k, v = (torch.randn(1, 2, 5, 4, device=device) for _ in range(3))
    mask = torch.randn(1, 1, 5, 5, dtype=torch.float64, device=device)
    out = subspace_ops.head_mixing_attention(q, k, v, torch.eye(2, device=device), attn_mask=mask, backend=backend)
    expected = subspace_ops.head_mixing_attention(q, k, v, torch.eye(2, device=device), attn_mask=mask.float(),
                                                  backend="reference")
    torch.testing.assert_close(out, expected)


# ---- The Triton backend's chunked strategy (heads · dim too large for the fused kernels) ----


@pytest.fixture
def chunked_triton(monkeypatch):
    """The Triton backend as on a GPU for a head count that needs the chunked strategy, with chunks
    of 4 query rows (several chunks and a short last one on every case)."""
    from subspace_ops.triton_kernels import head_mixing_attention as fused, head_mixing_chunked as chunked

    require_backend("triton")
    monkeypatch.setattr(fused, "_runs_chunked", lambda q, mask: True)
    monkeypatch.setattr(chunked, "chunk_rows", lambda q, n_k: 4)
    return "triton"


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_strategy_matches_float64_reference(chunked_triton, case):
    grad_out, truth = float64_truth(case, "cpu")
    for dtype in (torch.float32, torch.bfloat16):
        check_dtype_against_truth(f"chunked/{case}", case, chunked_triton, dtype, "cpu", grad_out, truth)


def test_chunked_strategy_rows_masked_with_finfo_min(chunked_triton):
    _check_rows_masked_with_finfo_min(chunked_triton, 7)


@pytest.mark.parametrize("causal, kind", [(True, None), (False, "key-padding"), (True, "additive")])
def test_chunked_strategy_gradcheck_float64(chunked_triton, causal, kind):
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 2, n, 4, generator=g, dtype=torch.float64) for n in (9, 5, 5))
    mix = torch.eye(2, dtype=torch.float64) + 0.5 * torch.randn(2, 2, generator=g, dtype=torch.float64)
    inputs = [t.requires_grad_(True) for t in (q, k, v, mix)]
    mask = make_mask(kind, 2, 2, 9, 5, "cpu")

    def fn(q, k, v, mix):
        return subspace_ops.head_mixing_attention(q, k, v, mix, attn_mask=mask, is_causal=causal,
                                                  backend=chunked_triton)

    assert torch.autograd.gradcheck(fn, inputs, atol=1e-7, fast_mode=True)


def test_strategy_rule():
    """Fused up to HP · BLOCK_D = 1024 in 16-bit dtypes, 512 in float32 (what fits an sm_90 SM,
    scripts/triton_aot_check.py)."""
    from subspace_ops.triton_kernels.head_mixing_chunked import chunk_rows, strategy

    fused = [(1, 8), (3, 16), (12, 64), (16, 64), (8, 128), (4, 256)]
    chunked = [(16, 80), (12, 128), (32, 64), (32, 128), (8, 256)]
    assert [strategy(h, d, torch.bfloat16) for h, d in fused] == ["fused"] * len(fused)
    assert [strategy(h, d, torch.float16) for h, d in chunked] == ["chunked"] * len(chunked)
    assert strategy(8, 64, torch.float32) == "fused" and strategy(12, 64, torch.float32) == "chunked"
    assert strategy(4, 64, torch.bfloat16, has_mask=True) == "fused"
    assert strategy(8, 64, torch.bfloat16, has_mask=True) == "chunked"  # BERT's 12 heads too
    assert chunk_rows(torch.empty(2, 32, 4096, 128), 4096) == 128  # one score chunk ≈ q's size
    assert chunk_rows(torch.empty(1, 32, 8, 128), 4096) == 8  # never more rows than there are


# ---- Dropout on the mixed maps (the backbone's attention dropout) ----

DROPOUT_CASES = ["vit-like", "causal-cross", "key-padding", "twelve-heads", "eight-heads", "additive"]


@pytest.mark.parametrize("case", DROPOUT_CASES)
def test_dropout_matches_float64_reference(backend, case):
    """Every backend draws reference.attention_dropout_keep's mask for the same seed: forward and
    gradients equal the reference's, which applies the mask to the materialized mixed maps."""
    device = backend_device(backend)
    grad_out, truth = float64_truth(case, device, dropout_p=0.25)
    if backend != "reference":
        ours64 = run(case, make_inputs(case, torch.float64, device), backend, grad_out, dropout_p=0.25)
        assert_float64_tight(case, ours64, truth)
    for dtype in _dtypes(backend):
        check_dtype_against_truth(case, case, backend, dtype, device, grad_out, truth, dropout_p=0.25)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("case", ["key-chunks-causal", "long-key-row", "gemm-tails-additive"])
def test_cpu_kernel_paths_with_dropout(case, threads):
    """The C++ kernel's other paths (several key chunks, two-pass forward, the two-phase backward at
    3 threads) regenerate the same mask as the reference."""
    require_backend("cpu")
    with torch_threads(threads):
        grad_out, truth = float64_truth(case, "cpu", CPU_PATH_CASES, dropout_p=0.25)
        ours64 = run(case, make_inputs(case, torch.float64, "cpu", CPU_PATH_CASES), "cpu", grad_out, CPU_PATH_CASES,
                     dropout_p=0.25)
        assert_float64_tight(case, ours64, truth)


@pytest.mark.parametrize("case", ["vit-like", "causal", "key-padding"])
def test_chunked_strategy_with_dropout(chunked_triton, case):
    grad_out, truth = float64_truth(case, "cpu", dropout_p=0.25)
    assert_float64_tight(case, run(case, make_inputs(case, torch.float64, "cpu"), chunked_triton, grad_out,
                                   dropout_p=0.25), truth)


def test_dropout_mask_statistics():
    """The hash mask keeps each entry with probability 1 − p, independently of the position: the
    kept fraction overall, per key column and per (batch, head, row), within 5 binomial sigmas, and
    different seeds or neighbouring rows give different masks."""
    from subspace_ops.reference import attention_dropout_keep

    p = 0.1
    keep = attention_dropout_keep(987654321987, p, 2, 4, 64, 256).double()
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    per_column = keep.mean(dim=(0, 1, 2))  # 512 samples each
    assert (per_column - (1 - p)).abs().max().item() < 5 * (p * (1 - p) / 512) ** 0.5
    per_row = keep.mean(dim=-1)  # 256 samples each
    assert (per_row - (1 - p)).abs().max().item() < 5 * (p * (1 - p) / 256) ** 0.5
    flat = keep.flatten() - keep.mean()  # neighbours along the key axis are uncorrelated
    assert abs((flat[:-1] * flat[1:]).mean().item()) / flat.var().item() < 0.02
    other_seed = attention_dropout_keep(987654321988, p, 2, 4, 64, 256).double()
    assert (keep != other_seed).double().mean().item() > 0.15  # 2p(1−p) = 0.18 for independent masks
    assert (keep[:, :, 1:] != keep[:, :, :-1]).double().mean().item() > 0.15
    rows = attention_dropout_keep(987654321987, p, 2, 4, 64, 256, rows=(10, 20)).double()
    assert torch.equal(rows, keep[:, :, 10:20])


def test_dropout_is_unbiased_and_off_at_zero():
    """E[dropout(M)] = M: the mean output over many seeds approaches the output without dropout;
    dropout_p = 0 draws nothing (the generator's state is untouched) and changes nothing."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 3, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mix = torch.eye(3, dtype=torch.float64) + 0.3 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    plain = subspace_ops.head_mixing_attention(q, k, v, mix, backend="reference")
    torch.manual_seed(0)
    outs = torch.stack([subspace_ops.head_mixing_attention(q, k, v, mix, dropout_p=0.3, backend="reference")
                        for _ in range(2000)])
    assert not torch.equal(outs[0], outs[1])
    spread = outs.std(0) / 2000**0.5
    assert ((outs.mean(0) - plain).abs() <= 5 * spread + 1e-12).all()
    state = torch.get_rng_state()
    again = subspace_ops.head_mixing_attention(q, k, v, mix, dropout_p=0.0, backend="reference")
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(again, plain)


def test_dropout_compiles(fused_backend):
    """dropout_p with torch.compile(fullgraph=True): the seed is drawn inside the graph. With
    inductor's fallback_random the compiled step draws eager's seed, so both give the same result."""
    if fused_backend == "triton" and ON_INTERPRETER:
        pytest.skip("compiling around the interpreter adds nothing but minutes")
    import torch._inductor.config as inductor_config

    device = backend_device(fused_backend)
    q, k, v, mix = make_inputs("vit-like", torch.float32, device)

    def loss(q, k, v, mix):
        return subspace_ops.head_mixing_attention(q, k, v, mix, dropout_p=0.3, backend=fused_backend).square().sum()

    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(loss, fullgraph=True)
        torch.manual_seed(9)
        actual = torch.autograd.grad(compiled(q, k, v, mix), [q, k, v, mix])
    torch.manual_seed(9)
    expected = torch.autograd.grad(loss(q, k, v, mix), [q, k, v, mix])
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


# ---- The C++ kernel's own loops on each instruction set this CPU runs ----


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("case", ["gemm-tails-additive", "gemm-causal-d64", "gemm-chunks-d16", "key-chunks-causal"])
def test_cpu_isa_paths_match_reference(cpu_isa, case, threads):
    """d = 48, 64, 16 and 8 (a multiple of AVX2's 8 lanes, not of AVX-512's 16): scores with the row max
    from registers, tails of rows and keys, the accumulation's column blocks, exp, and the backward's
    products (T, dQ, dK, dV) on each ISA; 2 threads share dK/dV through a private copy (or own whole
    batches), 3 threads take the two-phase backward (query blocks, then key blocks)."""
    with torch_threads(threads):
        _check_isa_case(cpu_isa, case)


def _check_isa_case(cpu_isa, case):
    grad_out, truth = float64_truth(case, "cpu", CPU_PATH_CASES)
    check_dtype_against_truth(f"{cpu_isa}/{case}", case, "cpu", torch.float32, "cpu", grad_out, truth,
                              CPU_PATH_CASES)
    grad_out, truth = float64_truth(case, "cpu", CPU_PATH_CASES, dropout_p=0.25)
    check_dtype_against_truth(f"{cpu_isa}/{case}/dropout", case, "cpu", torch.float32, "cpu", grad_out, truth,
                              CPU_PATH_CASES, dropout_p=0.25)


def test_cpu_isa_switch_is_reported_and_validated():
    require_backend("cpu")
    from subspace_ops.backends import cpu_extension

    extension = cpu_extension()
    widest = extension.cpu_isa("auto")
    assert widest in ("avx512", "avx2", "none")
    try:
        assert extension.cpu_isa("none") == "none"
        with pytest.raises(RuntimeError, match="isa must be"):
            extension.cpu_isa("sse")
    finally:
        assert extension.cpu_isa("auto") == widest
