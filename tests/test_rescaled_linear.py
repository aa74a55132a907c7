"""rescaled_linear (METHODS.md §1) on every backend against the float64 reference."""

from __future__ import annotations

import contextlib
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import subspace_ops
from subspace_ops import reference
from subspace_ops.backends import BackendUnavailableError, resolve_backend
from subspace_ops.ops.rescaled_linear import (
    CPU_SEPARABLE_FORWARD_ONLY_MAX_TOKENS, CPU_STACKED_MAX_ROWS, CPU_STACKED_MAX_ROWS_OWN_GEMMS, choose_path,
    cpu_stacked_max_tokens,
)
from subspace_ops.testing import check_close

from conftest import ON_INTERPRETER, backend_device, require_backend, strided, torch_threads

# Each case: M tokens, K in, N out, rank r, and which features are on. K, N are not multiples of
# any tile size; M covers decode (1), tiny (7) and a ViT sequence (197).
CASES = {
    "m1-rank1-bias": dict(M=1, K=33, N=40, r=1, residual=True, bias=True),
    "m7-rank4-plain": dict(M=7, K=40, N=33, r=4, residual=False, bias=False),
    "m197-3d": dict(M=197, K=24, N=40, r=1, residual=True, bias=False, batch=True),
    "noncontiguous": dict(M=7, K=33, N=24, r=1, residual=True, bias=True, noncontiguous=True),
    "s_l-none-rank4": dict(M=7, K=24, N=33, r=4, residual=True, bias=True, drop="s_l"),
    "ia3-s_r-none": dict(M=7, K=24, N=33, r=1, residual=False, bias=True, drop="s_r"),
    "ssb-3d": dict(M=7, K=33, N=24, r=1, residual=False, bias=True, batch=True),
    "ssl-right-noncontiguous": dict(M=7, K=24, N=33, r=1, residual=False, bias=False, drop="s_l",
                                    noncontiguous=True),
    "both-none": dict(M=5, K=16, N=16, r=1, residual=True, bias=False, drop="both"),
    "weight-grad-rank2": dict(M=7, K=33, N=24, r=2, residual=True, bias=True, weight_grad=True),
}


def make_inputs(case: dict, dtype: torch.dtype, device: str) -> dict:
    """Inputs in float64 (the ground truth is computed from these, then cast)."""
    M, K, N, r = case["M"], case["K"], case["N"], case["r"]
    g = torch.Generator().manual_seed(1234)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    x = randn(3, M, K) if case.get("batch") else randn(M, K)
    weight = randn(N, K) / K**0.5
    if case.get("noncontiguous"):
        x = randn(K, M).T  # a transposed view
        weight = (randn(K, N) / K**0.5).T
    s_l = randn(N) if r == 1 else randn(N, r)
    s_r = randn(K) if r == 1 else randn(K, r)
    drop = case.get("drop")
    if drop in ("s_l", "both"):
        s_l = None
    if drop in ("s_r", "both"):
        s_r = None
    bias = randn(N) if case["bias"] else None
    tensors = dict(x=x, weight=weight, s_l=s_l, s_r=s_r, bias=bias)
    out = {}
    for name, t in tensors.items():
        if t is None:
            out[name] = None
            continue
        t = t.to(device=device, dtype=dtype)
        if case.get("noncontiguous") and name in ("x", "weight"):
            t = t.T.contiguous().T  # keep it a non-contiguous view after the cast
        out[name] = t.requires_grad_(name != "weight" or case.get("weight_grad", False))
    return out


def run(inputs: dict, case: dict, backend: str, grad_y: torch.Tensor, path=None):
    y = subspace_ops.rescaled_linear(
        inputs["x"], inputs["weight"], inputs["s_l"], inputs["s_r"], inputs["bias"],
        residual=case["residual"], backend=backend, path=path,
    )
    names = [n for n, t in inputs.items() if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, [inputs[n] for n in names], grad_y)
    return y, dict(zip(names, grads))


def dtypes_for(backend: str) -> list:
    if backend == "triton" and ON_INTERPRETER:
        return [torch.float32]  # the interpreter computes through numpy: no bf16/fp16 there
    return [torch.float32, torch.bfloat16, torch.float16]


def paths_for(case: dict, backend: str) -> list:
    """The default path and every forced one the backend can take: the modulated kernels and the
    stacked path (torch GEMMs, so checked once, on the cpu backend, whose default it is at small M)
    for every case; the separable one where it applies (no residual, rank 1)."""
    paths = [None, "modulated"] + (["stacked"] if backend == "cpu" else [])
    return paths + (["separable"] if not case["residual"] and case["r"] == 1 else [])


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_matches_float64_reference(backend, case_name):
    case = CASES[case_name]
    device = backend_device(backend)
    for dtype, path in itertools.product(dtypes_for(backend), paths_for(case, backend)):
        truth_inputs = make_inputs(case, torch.float64, device)
        low_inputs = make_inputs(case, dtype, device)
        grad_y64 = torch.randn(
            *truth_inputs["x"].shape[:-1], case["N"], dtype=torch.float64, generator=torch.Generator().manual_seed(7)
        ).to(device)
        y64, g64 = run(truth_inputs, case, "reference", grad_y64)
        y_ref, g_ref = run(make_inputs(case, dtype, device), case, "reference", grad_y64.to(dtype))
        y, g = run(low_inputs, case, backend, grad_y64.to(dtype), path)
        assert y.dtype == dtype and y.shape == y64.shape
        check_close(f"{case_name}/{dtype}/{path}/y", y, y64, y_ref)
        assert sorted(g) == sorted(g64)
        for name in g64:
            check_close(f"{case_name}/{dtype}/{path}/d{name}", g[name], g64[name], g_ref[name])


@pytest.mark.parametrize("residual, rank, path", [(True, 1, "modulated"), (True, 4, "modulated"),
                                                  (False, 4, "modulated"), (False, 1, "separable"),
                                                  (False, 1, "modulated"), (True, 1, "stacked"),
                                                  (True, 3, "stacked"), (False, 2, "stacked")])
def test_gradcheck_float64(backend, residual, rank, path):
    device = backend_device(backend)
    M, K, N = (3, 5, 4) if backend == "triton" else (7, 9, 6)
    opts = dict(dtype=torch.float64, device=device, requires_grad=True)
    x = torch.randn(M, K, **opts)
    weight = torch.randn(N, K, **opts)
    s_l = torch.randn(N, rank, **opts)
    s_r = torch.randn(K, rank, **opts)
    bias = torch.randn(N, **opts)

    def f(x, weight, s_l, s_r, bias):
        return subspace_ops.rescaled_linear(x, weight, s_l, s_r, bias, residual=residual, backend=backend,
                                            path=path)

    # The interpreter is slow: one random direction (fast mode) still checks every gradient.
    assert torch.autograd.gradcheck(f, (x, weight, s_l, s_r, bias), fast_mode=backend == "triton")


def test_forward_equals_paper_formula():
    """RLRR eq. 16 transcribed literally: W + s_left ⊙ W ⊙ s_rightᵀ, plus b + f."""
    x, W = torch.randn(5, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    s_left, s_right, b, f = (torch.randn(n, dtype=torch.float64) for n in (4, 6, 4, 4))
    W_ft = torch.empty_like(W)
    for i in range(4):
        for j in range(6):
            W_ft[i, j] = W[i, j] + s_left[i] * W[i, j] * s_right[j]
    expected = x @ W_ft.T + b + f
    got = subspace_ops.rescaled_linear(x, W, s_left, s_right, b + f, residual=True, backend="reference")
    torch.testing.assert_close(got, expected)
    # SSB (001 eq. 7, D1 W D2): no residual.
    expected_ssb = x @ (torch.diag(s_left) @ W @ torch.diag(s_right)).T
    torch.testing.assert_close(reference.rescaled_linear(x, W, s_left, s_right, residual=False), expected_ssb)


def _opcheck_args(backend: str, requires_grad: bool):
    device = backend_device(backend)
    opts = dict(dtype=torch.float32, device=device)
    x = torch.randn(2, 5, 12, **opts, requires_grad=requires_grad)
    weight = torch.randn(10, 12, **opts)
    s_l = torch.randn(10, 2, **opts, requires_grad=requires_grad)
    s_r = torch.randn(12, 2, **opts, requires_grad=requires_grad)
    bias = torch.randn(10, **opts, requires_grad=requires_grad)
    return (x, weight, s_l, s_r, bias, True, backend)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(fused_backend, requires_grad):
    torch.library.opcheck(torch.ops.subspace_ops.rescaled_linear.default, _opcheck_args(fused_backend, requires_grad))


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_opcheck_backward(fused_backend, layout):
    """The gradients' fake layouts are the kernels' (contiguous) whatever the inputs' layout."""
    args = _opcheck_args(fused_backend, False)
    x, weight, s_l, s_r, bias, residual, backend = [strided(a) if layout == "strided" and isinstance(a, torch.Tensor)
                                                    else a for a in args]
    grad_y = torch.randn(2, 5, 10, device=x.device)
    for needs in [(True, True, True), (True, False, False), (False, False, True)]:
        torch.library.opcheck(
            torch.ops.subspace_ops.rescaled_linear_backward.default,
            (grad_y, x, weight, s_l, s_r, residual, backend, *needs),
        )


# RLRR on 64 tokens runs the modulated kernels (the registered op), on 4 tokens the cpu backend's
# stacked path; SSB the separable path.
@pytest.mark.parametrize("method, tokens", [("rlrr", 64), ("rlrr", 4), ("ssb", 4)])
def test_compile_fullgraph_matches_eager(fused_backend, method, tokens):
    device = backend_device(fused_backend)
    base = torch.nn.Linear(12, 9)
    if method == "rlrr":
        layer = subspace_ops.nn.RLRRLinear(base, backend=fused_backend).to(device)
        trained = [layer.s_l, layer.s_r, layer.shift]
    else:
        layer = subspace_ops.nn.ScaledLinear.ssb(base, backend=fused_backend).to(device)
        with torch.no_grad():
            layer.s_l.normal_(), layer.s_r.normal_()
        trained = [layer.s_l, layer.s_r]
    x = torch.randn(tokens, 12, device=device, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if fused_backend == "triton" else "inductor")
    y_eager, y_compiled = layer(x), compiled(x)
    torch.testing.assert_close(y_compiled, y_eager)
    g_eager = torch.autograd.grad(y_eager.sum(), [x, *trained])
    g_compiled = torch.autograd.grad(y_compiled.sum(), [x, *trained])
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("tokens", [64, 4])
def test_compile_fullgraph_without_gradient(fused_backend, tokens):
    """Evaluation under torch.compile traces the no-gradient paths whole (the separable path writing
    y over z; the modulated op where choose_path takes it) and matches eager."""
    device = backend_device(fused_backend)
    layer = subspace_ops.nn.ScaledLinear.ssb(torch.nn.Linear(12, 9), backend=fused_backend).to(device)
    with torch.no_grad():
        layer.s_l.normal_(), layer.s_r.normal_()
    x = torch.randn(2, tokens // 2, 12, device=device)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if fused_backend == "triton" else "inductor")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x))
        torch.testing.assert_close(layer(x), reference.rescaled_linear(x, layer.weight, layer.s_l, layer.s_r,
                                                                       layer.bias, residual=False))


BAD_INPUTS = [
    (dict(x=torch.randn(4, 7)), ValueError, "x must have size 8"),
    (dict(weight=torch.randn(6)), ValueError, "weight must be 2-D"),
    (dict(s_l=torch.randn(5)), ValueError, "s_l must have size 6"),
    (dict(s_r=torch.randn(8, 2), s_l=torch.randn(6, 3)), ValueError, "same rank"),
    (dict(s_r=torch.randn(8, 3)), ValueError, "same rank"),  # a vector s_l is r = 1
    (dict(s_l=torch.randn(6, 2)), ValueError, "same rank"),
    (dict(s_r=torch.randn(8, 1, 1)), ValueError, "s_r must be 1-D or 2-D"),
    (dict(bias=torch.randn(5)), ValueError, "bias must have size 6"),
    (dict(x=torch.randn(4, 8, dtype=torch.float64)), TypeError, "weight has dtype torch.float32 but x"),
    (dict(s_l=torch.randn(6, dtype=torch.float16)), TypeError, "s_l has dtype"),
    (dict(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, "x must have a floating-point dtype"),
    (dict(weight=[[1.0]]), TypeError, "weight must be a torch.Tensor"),
    (dict(s_l=torch.randn(6, device="meta")), ValueError, "s_l is on meta"),
    # Shapes a kernel could run on after flattening x or reading r off the scales: refused too.
    (dict(x=torch.randn(4, 16)), ValueError, "x must have size 8"),
    (dict(x=torch.tensor(1.0), weight=torch.randn(6, 1), s_r=None), ValueError, "x must have at least 1"),
    (dict(s_l=torch.randn(6, 0), s_r=torch.randn(8, 0)), ValueError, "s_l must have rank >= 1"),
    (dict(bias=torch.randn(6, 1)), ValueError, "bias must be 1-D"),
    (dict(x=torch.randn(4, 0), weight=torch.randn(6, 0), s_r=torch.randn(0)), ValueError,
     "weight must have at least one input feature"),  # no model has a Linear without inputs
]


@pytest.mark.parametrize("override,error,message", BAD_INPUTS)
def test_bad_input_names_the_argument(override, error, message, backend):
    """Every backend and path raises the same argument-naming error (the cpu backend's C++ node
    checks its arguments itself; the Python checks then word the error)."""
    args = dict(x=torch.randn(4, 8), weight=torch.randn(6, 8), s_l=torch.randn(6), s_r=torch.randn(8), bias=None)
    args.update(override)
    for path in (None, "modulated", "stacked"):
        with pytest.raises(error, match=message):
            subspace_ops.rescaled_linear(**args, backend=backend, path=path)


def test_backend_selection(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda-magic", "cpu")
    with pytest.raises(BackendUnavailableError, match="only runs CPU tensors"):
        resolve_backend("cpu", "cuda")
    monkeypatch.setenv("SUBSPACE_OPS_BACKEND", "reference")
    assert resolve_backend(None, "cpu") == "reference"
    monkeypatch.setenv("SUBSPACE_OPS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        subspace_ops.rescaled_linear(torch.randn(2, 3), torch.randn(4, 3))
    monkeypatch.delenv("SUBSPACE_OPS_BACKEND")
    assert "reference" in subspace_ops.available_backends("cpu")
    assert resolve_backend("reference", "cpu") == "reference"
    if os.environ.get("SUBSPACE_OPS_ALLOW_MISSING") is None:
        assert resolve_backend(None, "cpu") == "cpu"  # the C++ extension is the CPU default


def test_frozen_everything_needs_no_backward(fused_backend):
    """With nothing requiring grad, the op runs forward only and returns a plain tensor."""
    device = backend_device(fused_backend)
    x, w = torch.randn(3, 8, device=device), torch.randn(5, 8, device=device)
    y = subspace_ops.rescaled_linear(x, w, torch.ones(5, device=device), None, backend=fused_backend)
    assert not y.requires_grad
    torch.testing.assert_close(y, F.linear(x, 2 * w))


def test_missing_extension_is_reported_not_hidden(monkeypatch):
    """Without subspace_ops._C the package still imports; 'cpu' says why it is unavailable."""
    import importlib

    from subspace_ops import backends

    real_import = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == "subspace_ops._C":
            raise ImportError("simulated: extension not built")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    backends._cpu_extension.cache_clear()
    backends._resolve.cache_clear()
    try:
        status = backends.backend_status("cpu", "cpu")
        assert not status.available and "simulated: extension not built" in status.reason
        with pytest.raises(BackendUnavailableError, match="not built"):
            subspace_ops.rescaled_linear(torch.randn(2, 3), torch.randn(4, 3), backend="cpu")
        with pytest.warns(RuntimeWarning, match="using the 'reference' backend"):
            assert resolve_backend(None, "cpu") == "reference"
    finally:
        monkeypatch.undo()
        backends._cpu_extension.cache_clear()
        backends._resolve.cache_clear()


def test_layer_under_autocast_runs_in_the_autocast_dtype():
    layer = subspace_ops.nn.RLRRLinear(torch.nn.Linear(16, 8))
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.s_l.grad is not None and layer.s_l.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), layer(x), rtol=3e-2, atol=3e-2)


def test_path_rule_and_errors():
    assert choose_path(residual=False, rank=1) == "separable"
    assert choose_path(residual=False, rank=1, dtype=torch.float64) == "separable"
    assert choose_path(residual=False, rank=1, dtype=torch.bfloat16) == "modulated"
    assert choose_path(residual=True, rank=1) == "modulated" and choose_path(residual=False, rank=2) == "modulated"
    # The cpu backend stacks the c + r input blocks for a few rows, full precision only; in float64
    # (ATen GEMMs on every CPU) up to CPU_STACKED_MAX_ROWS of them.
    rows = CPU_STACKED_MAX_ROWS
    assert cpu_stacked_max_tokens(True, 3, torch.float64) == rows // 4
    assert choose_path(True, 3, torch.float64, tokens=rows // 4, backend="cpu") == "stacked"
    assert choose_path(True, 3, torch.float64, tokens=rows // 4 + 1, backend="cpu") == "modulated"
    tokens = cpu_stacked_max_tokens(True, 1, torch.float32)
    assert tokens >= 1
    assert choose_path(True, 1, torch.float32, tokens=tokens, backend="cpu") == "stacked"
    assert choose_path(True, 1, torch.float32, tokens=tokens + 1, backend="cpu") == "modulated"
    tokens = cpu_stacked_max_tokens(False, 2, torch.float32)
    assert choose_path(False, 2, torch.float32, tokens=tokens + 1, backend="cpu") == "modulated"
    # Where the own float32 GEMMs run, a training call stacks up to 16 rows, one without gradients up to 8.
    if cpu_stacked_max_tokens(True, 1, torch.float32) == CPU_STACKED_MAX_ROWS_OWN_GEMMS // 2:
        assert cpu_stacked_max_tokens(True, 1, torch.float32, needs_grad=False) == 4
        assert choose_path(True, 1, torch.float32, tokens=8, backend="cpu") == "stacked"
        assert choose_path(True, 1, torch.float32, tokens=8, backend="cpu", needs_grad=False) == "modulated"
        assert choose_path(True, 1, torch.float32, tokens=4, backend="cpu", needs_grad=False) == "stacked"
    assert choose_path(True, 1, torch.float32, tokens=1, backend="triton") == "modulated"  # reads W once
    assert choose_path(True, 1, torch.bfloat16, tokens=1, backend="cpu") == "modulated"
    # A call without a gradient: the own float32 GEMMs' forward beats the separable one's two
    # scalings beyond the few tokens the cpu backend stacks; not in float64 (ATen GEMMs) nor on triton.
    own = cpu_stacked_max_tokens(True, 1, torch.float32) == CPU_STACKED_MAX_ROWS_OWN_GEMMS // 2
    bound = CPU_SEPARABLE_FORWARD_ONLY_MAX_TOKENS
    assert choose_path(False, 1, torch.float32, tokens=bound, backend="cpu", needs_grad=False) == "separable"
    beyond = "modulated" if own else "separable"
    assert choose_path(False, 1, torch.float32, tokens=bound + 1, backend="cpu", needs_grad=False) == beyond
    assert choose_path(False, 1, torch.float32, tokens=4096, backend="cpu") == "separable"
    assert choose_path(False, 1, torch.float64, tokens=4096, backend="cpu", needs_grad=False) == "separable"
    assert choose_path(False, 1, torch.float32, tokens=4096, backend="triton", needs_grad=False) == "separable"
    assert choose_path(False, 1, torch.float32, needs_grad=False) == "separable"  # tokens unknown
    x, weight = torch.randn(3, 8), torch.randn(5, 8)
    s_l, s_r = torch.randn(5, 2), torch.randn(8, 2)
    with pytest.raises(ValueError, match="path must be one of"):
        subspace_ops.rescaled_linear(x, weight, s_l, s_r, path="fast")
    with pytest.raises(ValueError, match="path='separable' needs residual=False and rank-1 scales"):
        subspace_ops.rescaled_linear(x, weight, s_l, s_r, residual=False, path="separable")
    with pytest.raises(ValueError, match="path='separable' needs"):
        subspace_ops.rescaled_linear(x, weight, s_l[:, 0], s_r[:, 0], residual=True, path="separable")


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("m", [203, 512, 513])
@pytest.mark.parametrize("weight_layout", ["rows", "transposed"])
def test_cpu_float32_gemm_tiling(cpu_isa, m, weight_layout, threads):
    """The cpu backend's float32 GEMMs (csrc/rescaled_linear_gemm_kernels.inc, up to 512 rows, on
    each instruction set this CPU runs; ATen's beyond, and with cpu_isa "none") on shapes that cross
    every tile edge: 203 rows = 33 six-row tiles + 5, and two 128-step chunks of G's reduction on
    AVX-512; K = 1030 = 8·128 + 6 = 1024 + 6 (packed panels of 128 steps on AVX-512, 1024 on AVX2,
    each with a 6-step tail, so the output accumulates over panels), N = 130 (64- and 16-column
    panels + 2); W stored as [N, K] or as a transposed [K, N] (GPT-2's Conv1D). Rank 3, residual,
    bias, and every gradient, W's included, against the float64 reference. At 2 and 3 threads: the
    threads split the output's panels, and G's rows into one run of whole tiles per thread."""
    k, n, rank = 1030, 130, 3
    g = torch.Generator().manual_seed(5)
    x64 = torch.randn(m, k, generator=g, dtype=torch.float64)
    w64 = torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5
    s_l64 = torch.randn(n, rank, generator=g, dtype=torch.float64)
    s_r64 = torch.randn(k, rank, generator=g, dtype=torch.float64)
    b64 = torch.randn(n, generator=g, dtype=torch.float64)
    gy64 = torch.randn(m, n, generator=g, dtype=torch.float64)

    def grads(dtype, backend):
        weight = w64.to(dtype)
        if weight_layout == "transposed":
            weight = weight.T.contiguous().T
        leaves = [t.to(dtype).requires_grad_() for t in (x64, s_l64, s_r64, b64)] + [weight.requires_grad_()]
        x, s_l, s_r, bias, weight = leaves
        y = subspace_ops.rescaled_linear(x, weight, s_l, s_r, bias, backend=backend, path="modulated")
        return [y, *torch.autograd.grad(y, leaves, gy64.to(dtype))]

    names = ["y", "dx", "ds_l", "ds_r", "dbias", "dweight"]
    with torch_threads(threads):
        got_cpu = grads(torch.float32, "cpu")
    for name, got, truth, ref32 in zip(names, got_cpu, grads(torch.float64, "reference"),
                                       grads(torch.float32, "reference")):
        check_close(f"m{m}/{weight_layout}/{name}", got, truth, ref32)


@pytest.mark.parametrize("given", ["s_l+bias", "s_r-matrix", "bias-only", "both-vectors"])
def test_cpu_eager_node_is_cpp_and_maps_each_gradient(given):
    """In eager mode the cpu backend's modulated path records one C++ autograd node
    (csrc/rescaled_linear_autograd.cpp), not a Python one. That node numbers its inputs' gradient
    slots over the tensors actually given, so absent scales or bias shift them: every combination
    must still send each gradient (W's and the bias's included) to its own argument."""
    require_backend("cpu")
    g = torch.Generator().manual_seed(11)

    def make(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64, requires_grad=True)

    x, weight = make(2, 3, 7), make(5, 7)
    s_l, s_r, bias = {
        "s_l+bias": (make(5), None, make(5)),
        "s_r-matrix": (None, make(7, 2), None),
        "bias-only": (None, None, make(5)),
        "both-vectors": (make(5), make(7), None),
    }[given]
    y = subspace_ops.rescaled_linear(x, weight, s_l, s_r, bias, backend="cpu", path="modulated")
    assert "RescaledLinearFunction" in y.grad_fn.name(), y.grad_fn.name()
    leaves = [t for t in (x, weight, s_l, s_r, bias) if t is not None]

    def f(*tensors):
        it = iter(tensors)
        args = [next(it) if t is not None else None for t in (x, weight, s_l, s_r, bias)]
        return subspace_ops.rescaled_linear(*args, backend="cpu", path="modulated")

    assert torch.autograd.gradcheck(f, tuple(leaves))


def test_cpu_eager_node_refuses_double_backward():
    """The kernels are not differentiable themselves: create_graph=True must fail loudly, not return
    a second-order graph that silently misses their terms."""
    require_backend("cpu")
    x = torch.randn(3, 8, requires_grad=True)
    s_l, s_r = torch.randn(5, requires_grad=True), torch.randn(8, requires_grad=True)
    y = subspace_ops.rescaled_linear(x, torch.randn(5, 8), s_l, s_r, backend="cpu", path="modulated")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), s_l, create_graph=True)


def test_separable_path_runs_one_gemm_per_pass():
    """SSB's step on the separable path: one GEMM forward, one backward (no G = gyᵀ x, no W pass),
    counted with the profiler, against three ATen GEMMs for the modulated kernels' G-based scale
    gradients (in float64: in float32 on AVX2/AVX-512 CPUs those run GEMMs of their own, not ATen's)."""
    from torch.profiler import ProfilerActivity, profile

    require_backend("cpu")

    def gemms(path, dtype):
        x = torch.randn(64, 48, dtype=dtype, requires_grad=True)
        weight = torch.randn(40, 48, dtype=dtype)
        s_l = torch.randn(40, dtype=dtype, requires_grad=True)
        s_r = torch.randn(48, dtype=dtype, requires_grad=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            subspace_ops.rescaled_linear(x, weight, s_l, s_r, residual=False, backend="cpu", path=path).sum().backward()
        return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"))

    assert gemms("separable", torch.float32) == 2
    assert gemms("modulated", torch.float64) >= 3


@pytest.mark.parametrize("recording", ["no_grad", "inference_mode", "nothing_trained"])
def test_call_without_gradient_takes_the_forward_only_path(recording):
    """A call autograd does not record (evaluation) takes choose_path(..., needs_grad=False): on the
    own float32 GEMMs, the modulated kernels beyond the stacked bound; with a gradient, the separable
    path. The bits tell which path ran: the two round differently."""
    from subspace_ops.backends import cpu_extension

    require_backend("cpu")
    own_gemms = cpu_extension().rescaled_linear_gemm_rows() > 0
    bound = CPU_SEPARABLE_FORWARD_ONLY_MAX_TOKENS
    g = torch.Generator().manual_seed(3)
    for tokens in (bound, bound + 1, 197):
        x = torch.randn(tokens, 96, generator=g)
        weight = torch.randn(80, 96, generator=g) / 10
        s_l, s_r, bias = (torch.randn(n, generator=g).requires_grad_() for n in (80, 96, 80))
        forced = {path: subspace_ops.rescaled_linear(x, weight, s_l, s_r, bias, residual=False, backend="cpu",
                                                     path=path).detach() for path in ("separable", "modulated")}
        assert not torch.equal(forced["separable"], forced["modulated"])
        expected = "modulated" if own_gemms and tokens > bound else "separable"
        assert choose_path(False, 1, torch.float32, tokens, "cpu", needs_grad=False) == expected
        if recording == "nothing_trained":
            context, args = contextlib.nullcontext(), (x, weight, *(t.detach() for t in (s_l, s_r, bias)))
        else:
            context, args = getattr(torch, recording)(), (x, weight, s_l, s_r, bias)
        with context:
            y = subspace_ops.rescaled_linear(*args, residual=False, backend="cpu")
        assert torch.equal(y, forced[expected]), (tokens, expected)
        y = subspace_ops.rescaled_linear(x, weight, s_l, s_r, bias, residual=False, backend="cpu")
        assert torch.equal(y.detach(), forced["separable"]) and y.requires_grad


@pytest.mark.parametrize("given", ["s_l+bias", "s_l", "bias", "s_r-only"])
def test_separable_path_without_gradient_writes_only_its_output(given):
    """Without a gradient the separable path writes y over its GEMM's output z: the result matches
    the float64 reference (3-D input) and no input changes."""
    g = torch.Generator().manual_seed(5)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    given64 = dict(x=randn(2, 5, 24), weight=randn(16, 24), s_l=randn(16) if "s_l" in given else None,
                   s_r=randn(24), bias=randn(16) if "bias" in given else None)
    truth = reference.rescaled_linear(**given64, residual=False)
    for dtype in (torch.float64, torch.float32):
        inputs = {name: None if t is None else t.to(dtype) for name, t in given64.items()}
        before = {name: None if t is None else t.clone() for name, t in inputs.items()}
        with torch.no_grad():
            y = subspace_ops.rescaled_linear(**inputs, residual=False, path="separable")
        assert y.shape == truth.shape and y.dtype == dtype
        torch.testing.assert_close(y.double(), truth, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-5)
        assert all(t is None or torch.equal(t, before[name]) for name, t in inputs.items())


def test_stacked_path_runs_one_gemm_per_pass():
    """RLRR's step on the stacked path (a few tokens on the cpu backend, its default there): one
    GEMM forward and one backward over the stacked blocks, W frozen. In float64 (float32's products
    run on the few-rows loops instead: tests/test_few_rows_matmul.py counts those)."""
    from torch.profiler import ProfilerActivity, profile

    require_backend("cpu")
    x = torch.randn(1, 2, 48, requires_grad=True, dtype=torch.float64)  # 2 tokens · (1 + 3) = 8 stacked rows
    weight = torch.randn(40, 48, dtype=torch.float64)
    s_l = torch.randn(40, 3, requires_grad=True, dtype=torch.float64)
    s_r = torch.randn(48, 3, requires_grad=True, dtype=torch.float64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        subspace_ops.rescaled_linear(x, weight, s_l, s_r, backend="cpu").sum().backward()
    assert sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_")) == 2
