"""lowrank_linear (METHODS.md §4: LoRA, AdaLoRA/TriLoRA, FLoRA) on every backend against the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from subspace_ops.ops.lowrank_linear import lowrank_linear
from subspace_ops.testing import check_close

from conftest import ON_INTERPRETER, backend_device, strided

# M tokens, K in, N out, rank r, G kind; K, N are not multiples of any tile, M covers decode (1),
# tiny (7) and a ViT sequence (197); r from 1 to 80.
CASES = {
    "m1-r1-lora-bias": dict(M=1, K=17, N=33, r=1, g="none", bias=True),
    "m7-r4-diag": dict(M=7, K=33, N=17, r=4, g="diag", bias=False),
    "m197-3d-r4-full": dict(M=197, K=17, N=33, r=4, g="full", bias=True, batch=True),
    "noncontiguous-r1-full": dict(M=7, K=33, N=17, r=1, g="full", bias=True, noncontiguous=True),
    "weight-grad-r4-lora": dict(M=7, K=17, N=33, r=4, g="none", bias=True, weight_grad=True),
    "3d-r1-diag-weight-grad": dict(M=7, K=33, N=33, r=1, g="diag", bias=True, batch=True, weight_grad=True),
    # r > 64: the Triton epilogue takes the rank in steps of 64, the second one partial (LLM LoRA ranks).
    "m7-r80-diag": dict(M=7, K=90, N=70, r=80, g="diag", bias=True),
}


def make_inputs(case: dict, dtype: torch.dtype, device: str) -> dict:
    """Float64 values (seeded), cast to dtype; the trainable ones require grad."""
    M, K, N, r = case["M"], case["K"], case["N"], case["r"]
    gen = torch.Generator().manual_seed(4321)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    x = randn(2, M, K) if case.get("batch") else randn(M, K)
    weight = randn(N, K) / K**0.5
    a, b = randn(N, r), randn(r, K) / K**0.5
    g = {"none": None, "diag": randn(r), "full": randn(r, r)}[case["g"]]
    bias = randn(N) if case["bias"] else None
    out = {}
    for name, t in dict(x=x, weight=weight, a=a, g=g, b=b, bias=bias).items():
        if t is None:
            out[name] = None
            continue
        t = t.to(device=device, dtype=dtype)
        if case.get("noncontiguous") and name in ("x", "weight", "a", "b"):
            t = t.mT.contiguous().mT  # same values, transposed strides
        out[name] = t.requires_grad_(name != "weight" or case.get("weight_grad", False))
    return out


def run(inputs: dict, backend: str, grad_y: torch.Tensor, **options):
    y = lowrank_linear(inputs["x"], inputs["weight"], inputs["a"], inputs["g"], inputs["b"], inputs["bias"],
                       scaling=options.pop("scaling", 0.75), backend=backend, **options)
    names = [n for n, t in inputs.items() if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, [inputs[n] for n in names], grad_y)
    return y, dict(zip(names, grads))


def dtypes_for(backend: str) -> list:
    if backend == "triton" and ON_INTERPRETER:
        return [torch.float32]  # the interpreter's tl.dot is not bf16-exact
    return [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_matches_float64_reference(backend, case_name):
    case = CASES[case_name]
    device = backend_device(backend)
    truth = make_inputs(case, torch.float64, device)
    grad_y64 = torch.randn(*truth["x"].shape[:-1], case["N"], dtype=torch.float64,
                           generator=torch.Generator().manual_seed(7)).to(device)
    y64, g64 = run(truth, "reference", grad_y64)
    if case.get("noncontiguous"):
        assert not truth["x"].is_contiguous() and not truth["weight"].is_contiguous()
    for dtype in dtypes_for(backend):
        y_ref, g_ref = run(make_inputs(case, dtype, device), "reference", grad_y64.to(dtype))
        y, g = run(make_inputs(case, dtype, device), backend, grad_y64.to(dtype))
        assert y.dtype == dtype and y.shape == y64.shape
        check_close(f"{case_name}/{dtype}/y", y, y64, y_ref)
        assert sorted(g) == sorted(g64)
        for name in g64:
            check_close(f"{case_name}/{dtype}/d{name}", g[name], g64[name], g_ref[name])


@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("g_kind", ["none", "diag", "full"])
def test_gradcheck_float64(backend, g_kind, rank):
    device = backend_device(backend)
    case = dict(M=3, K=5, N=4, r=rank, g=g_kind, bias=True, weight_grad=True)
    inputs = make_inputs(case, torch.float64, device)
    names = [n for n in ("x", "weight", "a", "g", "b", "bias") if inputs[n] is not None]

    def f(*tensors):
        given = dict(zip(names, tensors))
        return lowrank_linear(given["x"], given["weight"], given["a"], given.get("g"), given["b"], given["bias"],
                              scaling=0.5, backend=backend)

    # The interpreter is slow: one random direction (fast mode) still checks every gradient.
    assert torch.autograd.gradcheck(f, tuple(inputs[n] for n in names), fast_mode=backend == "triton")


@pytest.mark.parametrize("g_kind", ["none", "full"])
def test_dropout_uses_the_references_mask(backend, g_kind):
    """Training with dropout: the same RNG state gives the reference's mask, hence its y and gradients."""
    device = backend_device(backend)
    case = dict(M=9, K=17, N=20, r=2, g=g_kind, bias=True)
    inputs = make_inputs(case, torch.float64, device)
    grad_y = torch.randn(9, 20, dtype=torch.float64, device=device)

    def with_seed(backend_name, **options):
        torch.manual_seed(11)
        return run(inputs, backend_name, grad_y, dropout_p=0.5, **options)

    y, g = with_seed(backend)
    y_ref, g_ref = with_seed("reference", training=True)
    torch.testing.assert_close(y, y_ref)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], msg=name)
    y_plain, _ = run(inputs, backend, grad_y)
    assert not torch.allclose(y, y_plain), "dropout had no effect"
    y_eval, _ = with_seed(backend, training=False)
    torch.testing.assert_close(y_eval, y_plain, rtol=0, atol=0)


def _op_args(backend: str, g_kind: str, dropout: bool, requires_grad: bool):
    device = backend_device(backend)
    case = dict(M=5, K=12, N=10, r=3, g=g_kind, bias=True, batch=True)
    inputs = make_inputs(case, torch.float32, device)
    inputs = {n: None if t is None else t.detach().requires_grad_(requires_grad and n != "weight")
              for n, t in inputs.items()}
    # A leaf of its own: opcheck runs several backward passes, and a dropout node shared between them
    # would be freed after the first (torch 2.13's opcheck fails so; 2.14's happens not to).
    x_dropped = F.dropout(inputs["x"].detach(), 0.5, True).requires_grad_(requires_grad) if dropout else None
    return (inputs["x"], x_dropped, inputs["weight"], inputs["a"], inputs["g"], inputs["b"], inputs["bias"], 0.5,
            backend)


@pytest.mark.parametrize("g_kind,dropout,requires_grad", [("none", False, True), ("diag", True, True),
                                                          ("full", False, False), ("full", True, True)])
def test_opcheck(fused_backend, g_kind, dropout, requires_grad):
    args = _op_args(fused_backend, g_kind, dropout, requires_grad)
    torch.library.opcheck(torch.ops.subspace_ops.lowrank_linear.default, args)


@pytest.mark.parametrize("dropout, layout", [(False, "contiguous"), (True, "contiguous"), (True, "strided")])
def test_opcheck_backward(fused_backend, dropout, layout):
    """The gradients' fake layouts are the kernels' (contiguous) whatever the inputs' layout."""
    args = _op_args(fused_backend, "full", dropout, False)
    if layout == "strided":
        args = tuple(strided(t) if isinstance(t, torch.Tensor) else t for t in args)
    y, h0 = torch.ops.subspace_ops.lowrank_linear(*args)
    grad_y = torch.randn_like(y)
    x, x_dropped, weight, a, g, b, _, scaling, backend = args
    for needs in [(True,) * 6, (True, False, False, True, False, False), (False, True, False, False, True, True)]:
        torch.library.opcheck(torch.ops.subspace_ops.lowrank_linear_backward.default,
                              (grad_y, x, x_dropped, weight, a, g, b, h0, scaling, backend, *needs))


def test_compile_fullgraph_matches_eager(fused_backend):
    from subspace_ops.nn.lowrank import LowRankLinear

    device = backend_device(fused_backend)
    layer = LowRankLinear(torch.nn.Linear(12, 9), 3, g="full", alpha=6, dropout=0.25, backend=fused_backend).to(device)
    with torch.no_grad():
        layer.lora_a.normal_()
    x = torch.randn(2, 4, 12, device=device, requires_grad=True)
    # fallback_random: inductor draws the dropout mask with torch's RNG, as eager does.
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(layer, fullgraph=True,
                                 backend="aot_eager" if fused_backend == "triton" else "inductor")
        params = [x, layer.lora_a, layer.lora_g, layer.lora_b]
        for training in (True, False):
            layer.train(training)
            torch.manual_seed(3)
            y_compiled = compiled(x)
            torch.manual_seed(3)
            y_eager = layer(x)
            torch.testing.assert_close(y_compiled, y_eager)
            for a, b in zip(torch.autograd.grad(y_compiled.sum(), params), torch.autograd.grad(y_eager.sum(), params)):
                torch.testing.assert_close(a, b)


def test_nothing_trainable_runs_forward_only(fused_backend):
    device = backend_device(fused_backend)
    x, w = torch.randn(3, 8, device=device), torch.randn(5, 8, device=device)
    a, b = torch.randn(5, 2, device=device), torch.randn(2, 8, device=device)
    y = lowrank_linear(x, w, a, None, b, scaling=2.0, backend=fused_backend)
    assert not y.requires_grad
    torch.testing.assert_close(y, x @ (w + 2.0 * a @ b).T)


def test_forward_equals_paper_formula():
    """001 §4: W' = W + s·A G B, written out."""
    x, w = torch.randn(5, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    a, b, g, bias = (torch.randn(*s, dtype=torch.float64) for s in ((4, 3), (3, 6), (3, 3), (4,)))
    for g_arg, g_mat in ((None, torch.eye(3, dtype=torch.float64)), (g[0], torch.diag(g[0])), (g, g)):
        expected = x @ (w + 0.5 * a @ g_mat @ b).T + bias
        torch.testing.assert_close(lowrank_linear(x, w, a, g_arg, b, bias, scaling=0.5, backend="cpu"), expected)


def _base_args():
    return dict(x=torch.randn(4, 8), weight=torch.randn(6, 8), a=torch.randn(6, 3), g=None, b=torch.randn(3, 8),
                bias=None)


BAD_INPUTS = [
    (dict(x=torch.randn(4, 7)), ValueError, "x must have size 8"),
    (dict(weight=torch.randn(6)), ValueError, "weight must be 2-D"),
    (dict(x=torch.randn(4, 0), weight=torch.randn(6, 0), b=torch.randn(3, 0)), ValueError,
     "weight must have at least one input feature"),
    (dict(a=torch.randn(5, 3)), ValueError, "a must have size 6"),
    (dict(a=torch.randn(6, 0), b=torch.randn(0, 8)), ValueError, "a must have rank r >= 1"),
    (dict(b=torch.randn(2, 8)), ValueError, "b must have size 3"),
    (dict(b=torch.randn(3, 9)), ValueError, "b must have size 8"),
    (dict(g=torch.randn(4)), ValueError, "g must have size 3"),
    (dict(g=torch.randn(3, 2)), ValueError, "g must have size 3"),
    (dict(g=torch.randn(3, 3, 3)), ValueError, "g must be 1-D or 2-D"),
    (dict(bias=torch.randn(5)), ValueError, "bias must have size 6"),
    (dict(x=torch.randn(4, 8, dtype=torch.float64)), TypeError, "weight has dtype torch.float32 but x"),
    (dict(g=torch.randn(3, dtype=torch.float64)), TypeError, "g has dtype"),
    (dict(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, "x must have a floating-point dtype"),
    (dict(b=[[1.0]]), TypeError, "b must be a torch.Tensor"),
    (dict(a=torch.randn(6, 3, device="meta")), ValueError, "a is on meta"),
]


@pytest.mark.parametrize("override,error,message", BAD_INPUTS)
def test_bad_input_names_the_argument(override, error, message):
    args = _base_args()
    args.update(override)
    with pytest.raises(error, match=message):
        lowrank_linear(**args, backend="cpu")


@pytest.mark.parametrize("option,error,message", [
    (dict(scaling="2"), TypeError, "scaling must be a real number"),
    (dict(scaling=float("inf")), ValueError, "scaling must be finite"),
    (dict(dropout_p=1.5), ValueError, "dropout_p must be in"),
    (dict(dropout_p=True), TypeError, "dropout_p must be a real number"),
    (dict(training="yes"), TypeError, "training must be a bool"),
])
def test_bad_options(option, error, message):
    with pytest.raises(error, match=message):
        lowrank_linear(**_base_args(), backend="cpu", **option)


@pytest.mark.integration
def test_bench_case_runs_and_variants_agree():
    """The ``lowrank-linear`` case is registered; on a tiny shape its variants run, and ours computes what
    the naive PEFT formula and PEFT's DoRA (as PEFT runs it, and accelerated) compute from the same values."""
    pytest.importorskip("peft")
    from subspace_ops.bench.cases import CASES
    from subspace_ops.bench.harness import run_case

    case = CASES["lowrank-linear"]
    shape, dtype, device = (8, 16, 24), torch.float32, torch.device("cpu")
    variants = {v.name: v for v in case.make_variants("cpu")}
    assert {"subspace_ops", "naive", "naive+compile", "subspace_ops DoRA", "peft DoRA r=16",
            "peft DoRA r=16 accelerated", "frozen F.linear", "full FT", "peft LoRA r=16"} == set(variants)
    outputs = {name: variants[name].setup(shape, dtype, device).forward()
               for name in ("subspace_ops", "naive", "subspace_ops DoRA", "peft DoRA r=16", "peft DoRA r=16 accelerated")}
    torch.testing.assert_close(outputs["subspace_ops"], outputs["naive"])
    torch.testing.assert_close(outputs["subspace_ops DoRA"], outputs["peft DoRA r=16"])
    torch.testing.assert_close(outputs["peft DoRA r=16 accelerated"], outputs["peft DoRA r=16"])
    chosen = [variants[n] for n in ("subspace_ops", "naive", "subspace_ops DoRA", "full FT", "frozen F.linear")]
    results = run_case(case, shape, dtype=dtype, device=device, warmup=1, repeats=1, measure_memory=False,
                       variants=chosen)
    assert {(r.variant, r.mode) for r in results} == {(v.name, m) for v in chosen for m in ("forward", "fwd+bwd")}
    assert all(r.status == "ok" for r in results), [(r.variant, r.note) for r in results if r.status != "ok"]
