"""svd_delta_linear (METHODS.md §2) on every backend and both paths against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import subspace_ops
from subspace_ops import reference
from subspace_ops.ops.svd_delta_linear import choose_path, keeps_merged_weight
from subspace_ops.testing import check_close

from conftest import ON_INTERPRETER, backend_device

# (M, K, N, k): k ∈ {1, 5, N}; odd sizes; M = 1 (decode), 7, 197.
CASES = {"k1": (7, 24, 33, 1), "k5-m197": (197, 33, 20, 5), "k-full": (5, 17, 17, 17), "m1": (1, 40, 24, 5)}


def make_inputs(M, K, N, k, dtype, device, *, batch=False, noncontiguous=False):
    g = torch.Generator().manual_seed(99)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = randn(2, M, K) if batch else randn(M, K)
    weight = randn(N, K) / K**0.5
    u, _ = torch.linalg.qr(randn(N, k)) if k <= N else (randn(N, k), None)
    v, _ = torch.linalg.qr(randn(K, k)) if k <= K else (randn(K, k), None)
    d, bias = randn(k), randn(N)
    out = dict(x=x, weight=weight, u=u, v=v, d=d, bias=bias)
    out = {n: t.to(device=device, dtype=dtype) for n, t in out.items()}
    if noncontiguous:
        for n in ("x", "weight", "u", "v"):
            out[n] = out[n].T.contiguous().T
        for n in ("d", "bias"):  # every other element of a buffer (stride 2), as e.g. s[::2] would be
            out[n] = torch.stack([out[n], torch.full_like(out[n], float("nan"))], dim=-1).view(-1)[::2]
    for n in ("x", "d", "bias"):
        out[n].requires_grad_(True)
    return out


def run(inputs, backend, path, grad_y):
    y = subspace_ops.svd_delta_linear(**inputs, backend=backend, path=path)
    grads = torch.autograd.grad(y, [inputs["x"], inputs["d"], inputs["bias"]], grad_y)
    return y, grads


@pytest.mark.parametrize("path", ["merged", "unmerged"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_reference(backend, case, path):
    M, K, N, k = CASES[case]
    device = backend_device(backend)
    dtypes = [torch.float32] if backend == "triton" and ON_INTERPRETER else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        extra = dict(batch=case == "k5-m197", noncontiguous=case in ("k1", "m1"))
        truth = make_inputs(M, K, N, k, torch.float64, device, **extra)
        grad_y = torch.randn(*truth["x"].shape[:-1], N, dtype=torch.float64).to(device)
        y64, g64 = run(truth, "reference", None, grad_y)
        y_ref, g_ref = run(make_inputs(M, K, N, k, dtype, device, **extra), "reference", None, grad_y.to(dtype))
        y, g = run(make_inputs(M, K, N, k, dtype, device, **extra), backend, path, grad_y.to(dtype))
        check_close(f"{case}/{path}/{dtype}/y", y, y64, y_ref)
        for name, a, t, r in zip(("dx", "dd", "dbias"), g, g64, g_ref):
            check_close(f"{case}/{path}/{dtype}/{name}", a, t, r)


# N = 4, k = 2: the merged path keeps W_eff at 3 tokens (6·k >= M) and 16 (4·N <= M), forms it again at 13
@pytest.mark.parametrize("tokens", [3, 13, 16])
@pytest.mark.parametrize("path", ["merged", "unmerged"])
def test_gradcheck_float64(backend, path, tokens):
    assert keeps_merged_weight(tokens, 4, 2) == (tokens != 13)
    device = backend_device(backend)
    inputs = make_inputs(tokens, 5, 4, 2, torch.float64, device)

    def f(x, d, bias):
        return subspace_ops.svd_delta_linear(x, inputs["weight"], inputs["u"], inputs["v"], d, bias,
                                             backend=backend, path=path)

    assert torch.autograd.gradcheck(f, (inputs["x"], inputs["d"], inputs["bias"]), fast_mode=backend == "triton")


def test_dd_is_u_G_v():
    """dd_j = u_jᵀ (gyᵀ x) v_j, written out (METHODS.md §2)."""
    inputs = make_inputs(6, 5, 4, 3, torch.float64, "cpu")
    grad_y = torch.randn(6, 4, dtype=torch.float64)
    _, (_, dd, _) = run(inputs, "cpu", "merged", grad_y)
    G = grad_y.T @ inputs["x"].detach()
    expected = torch.stack([inputs["u"][:, j] @ G @ inputs["v"][:, j] for j in range(3)])
    torch.testing.assert_close(dd, expected)


def test_dd_over_several_blocks_of_G():
    """Below 4·N tokens the C++ merged backward forms G = gyᵀ x in blocks of rows of at most 1.5 MiB
    (block_budget, csrc/rescaled_linear.h): a float64 480×420 weight (1.6 MB) takes two blocks of 240
    rows, and each block's share of dd_j = u_jᵀ G v_j uses its own rows of U."""
    inputs = make_inputs(24, 420, 480, 5, torch.float64, "cpu")
    grad_y = torch.randn(24, 480, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _, (dx, dd, _) = run(inputs, "cpu", "merged", grad_y)
    x, weight, u, v = (inputs[n].detach() for n in ("x", "weight", "u", "v"))
    G = grad_y.T @ x
    torch.testing.assert_close(dd, torch.stack([u[:, j] @ G @ v[:, j] for j in range(5)]))
    torch.testing.assert_close(dx, grad_y @ (weight + u @ torch.diag(inputs["d"].detach()) @ v.T))


def test_fused_basis_weight_kernels():
    w, u, v, d = (torch.randn(*s, dtype=torch.float64) for s in ((20, 18), (20, 5), (18, 5), (5,)))
    expected = reference.svd_delta_weight(w, u, v, d)
    torch.testing.assert_close(subspace_ops.backends.cpu_extension().svd_basis_weight(w, u, v, d), expected)
    if ON_INTERPRETER:
        from subspace_ops.triton_kernels.svd_delta_linear import svd_basis_weight

        torch.testing.assert_close(svd_basis_weight(w, u, v, d), expected)


def test_path_rule():
    assert choose_path(12608, 768, 768) == "merged"
    assert choose_path(1, 4096, 4096) == "unmerged"
    assert choose_path(384, 768, 768) == "merged" and choose_path(383, 768, 768) == "unmerged"


@pytest.mark.parametrize("keep_weight, layout", [(False, "contiguous"), (True, "contiguous"), (False, "strided")])
def test_opcheck(fused_backend, keep_weight, layout):
    inputs = make_inputs(5, 12, 10, 3, torch.float32, backend_device(fused_backend), noncontiguous=layout == "strided")
    args = (inputs["x"], inputs["weight"], inputs["u"], inputs["v"], inputs["d"], inputs["bias"], fused_backend,
            keep_weight)
    torch.library.opcheck(torch.ops.subspace_ops.svd_delta_linear.default, args)
    y, w_eff = torch.ops.subspace_ops.svd_delta_linear(*args)
    assert w_eff.shape == ((10, 12) if keep_weight else (0,))
    grad_y = torch.randn(5, 10, device=inputs["x"].device)
    plain = [t.detach() for t in args[:5]]
    torch.library.opcheck(torch.ops.subspace_ops.svd_delta_linear_backward.default,
                          (grad_y, *plain, w_eff.detach(), fused_backend, True, True))


def test_compile_fullgraph(fused_backend):
    inputs = make_inputs(400, 12, 10, 3, torch.float32, backend_device(fused_backend))

    def f(x, d, bias):
        return subspace_ops.svd_delta_linear(x, inputs["weight"], inputs["u"], inputs["v"], d, bias,
                                             backend=fused_backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = (inputs["x"], inputs["d"], inputs["bias"])
    torch.testing.assert_close(compiled(*args), f(*args))


BAD = [
    (dict(u=torch.randn(5, 3)), ValueError, "u must have size 6"),
    (dict(v=torch.randn(8, 2)), ValueError, "v must have size 3"),
    (dict(d=torch.randn(4)), ValueError, "d must have size 3"),
    (dict(d=torch.randn(3, 1)), ValueError, "d must be 1-D"),
    (dict(x=torch.randn(4, 0), weight=torch.randn(6, 0), v=torch.randn(0, 3)), ValueError,
     "weight must have at least one input feature"),
    (dict(u=torch.randn(6, 3, dtype=torch.float64)), TypeError, "u has dtype"),
    (dict(weight=torch.randn(6, 8, requires_grad=True)), ValueError, "weight must be frozen"),
]


@pytest.mark.parametrize("override,error,message", BAD)
def test_bad_input(override, error, message):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(6, 8), u=torch.randn(6, 3), v=torch.randn(8, 3),
                d=torch.randn(3))
    args.update(override)
    with pytest.raises(error, match=message):
        subspace_ops.svd_delta_linear(**args)
    with pytest.raises(ValueError, match="path must be"):
        subspace_ops.svd_delta_linear(torch.randn(4, 8), torch.randn(6, 8), torch.randn(6, 3), torch.randn(8, 3),
                                      torch.randn(3), path="fast")


@pytest.mark.parametrize("tokens, kept", [(15, False), (16, True), (11, True)])
def test_merged_path_keeps_w_eff_where_it_is_small_next_to_x_or_dear_to_form(tokens, kept):
    """N = 4, k = 2: from M = 4·N tokens, or while 6·k ≥ M (forming W_eff again would be a large share
    of the step), autograd keeps W_eff (and the backward uses it for gx); otherwise the only [N, K]
    tensor saved is the frozen weight itself."""
    inputs = make_inputs(tokens, 6, 4, 2, torch.float64, "cpu")
    y = subspace_ops.svd_delta_linear(**inputs, backend="cpu", path="merged")
    saved = y.grad_fn.saved_tensors
    weight_sized = [t for t in saved if t.shape == (4, 6) and t.data_ptr() != inputs["weight"].data_ptr()]
    assert any(t.data_ptr() == inputs["weight"].data_ptr() for t in saved)
    if kept:
        expected = reference.svd_delta_weight(inputs["weight"], inputs["u"], inputs["v"], inputs["d"].detach())
        assert len(weight_sized) == 1
        torch.testing.assert_close(weight_sized[0], expected)
    else:
        assert weight_sized == []
