"""Double backward: the fused kernels are not differentiable, so ``create_graph=True`` through a
fused op raises (a graph recording only part of the dependencies would give silently wrong second
derivatives: measured before this check, e.g. 9.23 for 95.0 on the stacked rescaled path). The
reference backend is plain PyTorch and differentiates twice; a first-order backward run inside
``torch.enable_grad()`` is not refused. torch.func transforms (grad, vmap) cannot run the fused
kernels' autograd either: refused with the way out, and run on the reference backend."""

from __future__ import annotations

import pytest
import torch

import subspace_ops

from conftest import backend_device, require_backend

F64 = torch.float64


def _inputs(device: str):
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=F64).to(device)  # noqa: E731
    x = r(5, 8).requires_grad_()
    weight = r(6, 8)
    u, v = torch.linalg.qr(r(6, 3))[0], torch.linalg.qr(r(8, 3))[0]
    q = r(1, 2, 5, 4).requires_grad_()
    mix = torch.eye(2, dtype=F64, device=device) + r(2, 2)
    trained = dict(s_l=r(6), s_r=r(8), d=r(3), a=r(6, 2), b=r(2, 8), mix=mix)
    for t in trained.values():
        t.requires_grad_()
    return x, weight, u, v, q, r(1, 2, 5, 4), r(1, 2, 5, 4), trained


# op name -> (run(backend, tensors) -> output, the trained input differentiated first, then the second)
CASES = {
    "rescaled_linear modulated": (lambda be, x, w, u, v, q, k, val, t: subspace_ops.rescaled_linear(
        x, w, t["s_l"], t["s_r"], backend=be, path=None if be == "reference" else "modulated"), "s_l", "s_r"),
    "rescaled_linear stacked": (lambda be, x, w, u, v, q, k, val, t: subspace_ops.rescaled_linear(
        x, w, t["s_l"], t["s_r"], backend=be, path=None if be == "reference" else "stacked"), "s_l", "s_r"),
    "rescaled_linear separable": (lambda be, x, w, u, v, q, k, val, t: subspace_ops.rescaled_linear(
        x, w, t["s_l"], t["s_r"], residual=False, backend=be, path=None if be == "reference" else "separable"),
        "s_l", "s_r"),
    "svd_delta_linear merged": (lambda be, x, w, u, v, q, k, val, t: subspace_ops.svd_delta_linear(
        x, w, u, v, t["d"], backend=be, path="merged"), "d", "x"),
    "lowrank_linear": (lambda be, x, w, u, v, q, k, val, t: subspace_ops.lowrank_linear(
        x, w, t["a"], None, t["b"], backend=be), "a", "b"),
    "head_mixing_attention": (lambda be, x, w, u, v, q, k, val, t: subspace_ops.head_mixing_attention(
        q, k, val, t["mix"], backend=be), "mix", "q"),
}


def _first_then_second(backend: str, case: str, device: str):
    run, first, second = CASES[case]
    x, w, u, v, q, k, val, trained = _inputs(device)
    named = {**trained, "x": x, "q": q}
    y = run(backend, x, w, u, v, q, k, val, trained)
    (grad,) = torch.autograd.grad(y.square().sum(), named[first], create_graph=True)
    return torch.autograd.grad(grad.sum(), named[second])[0]


@pytest.mark.parametrize(("backend_name", "case"), [
    (backend_name, case) for backend_name in ("cpu", "triton") for case in CASES
    if not (backend_name == "triton" and "stacked" in case)  # the stacked path is the cpu backend's
])
def test_fused_backends_refuse_double_backward(backend_name, case):
    require_backend(backend_name)
    with pytest.raises(RuntimeError, match="double backward .* is not supported by the (fused|cpu) backend"):
        _first_then_second(backend_name, case, backend_device(backend_name))


@pytest.mark.parametrize("case", list(CASES))
def test_reference_backend_differentiates_twice(case):
    """The reference's second derivative against finite differences of its first (gradgradcheck)."""
    run, first, second = CASES[case]
    x, w, u, v, q, k, val, trained = _inputs("cpu")
    named = {**trained, "x": x, "q": q}
    inputs = (named[first], named[second])

    def function(a, b):
        swapped = dict(named, **{first: a, second: b})
        tensors = {n: swapped[n] for n in trained}
        return run("reference", swapped["x"], w, u, v, swapped["q"], k, val, tensors)

    assert torch.autograd.gradgradcheck(function, inputs)


def test_first_order_backward_under_enable_grad_is_not_refused(fused_backend):
    x, w, _, _, _, _, _, trained = _inputs(backend_device(fused_backend))
    y = subspace_ops.lowrank_linear(x, w, trained["a"], None, trained["b"], backend=fused_backend)
    with torch.enable_grad():
        y.sum().backward()
    assert trained["a"].grad is not None and trained["b"].grad is not None


def _torch_func_grad(backend: str, case: str, device: str):
    """torch.func.grad of the case's loss in its first trained input, and autograd's gradient."""
    run, first, _ = CASES[case]
    x, w, u, v, q, k, val, trained = _inputs(device)
    named = {**trained, "x": x, "q": q}

    def loss(t):
        swapped = dict(named, **{first: t})
        y = run(backend, swapped["x"], w, u, v, swapped["q"], k, val, {n: swapped[n] for n in trained})
        return y.square().sum()

    expected = torch.autograd.grad(loss(named[first]), named[first])[0]
    return torch.func.grad(loss)(named[first].detach()), expected


@pytest.mark.parametrize(("backend_name", "case"), [
    (backend_name, case) for backend_name in ("cpu", "triton") for case in CASES
    if not (backend_name == "triton" and "stacked" in case)
])
def test_fused_backends_refuse_torch_func_transforms(backend_name, case):
    """torch.func (grad, vmap: per-sample gradients) cannot run the fused kernels' autograd: a clear
    error naming the op and the reference backend, not torch's about autograd.Function internals."""
    require_backend(backend_name)
    with pytest.raises(RuntimeError, match=r"torch.func transforms .* not supported by the fused backends; "
                                           r"use backend='reference'"):
        _torch_func_grad(backend_name, case, backend_device(backend_name))


@pytest.mark.parametrize("case", list(CASES))
def test_reference_backend_runs_under_torch_func(case):
    got, expected = _torch_func_grad("reference", case, "cpu")
    torch.testing.assert_close(got, expected)


def test_dora_per_sample_gradients_on_the_reference_backend():
    """vmap(grad) through DoRALinear (its per-output scale is an autograd.Function with a vmap rule)
    equals one autograd backward per sample."""
    from subspace_ops.nn import DoRALinear

    torch.manual_seed(0)
    layer = DoRALinear(torch.nn.Linear(8, 6, dtype=F64), 2, backend="reference")
    with torch.no_grad():
        layer.lora_a.normal_()
    params = {n: p.detach() for n, p in layer.named_parameters() if p.requires_grad}
    x = torch.randn(4, 8, dtype=F64)

    def loss(p, sample):
        return torch.func.functional_call(layer, p, (sample[None],)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        layer.zero_grad()
        layer(x[i : i + 1]).square().sum().backward()
        for n, p in layer.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(per_sample[n][i], p.grad)
