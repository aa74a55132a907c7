"""LowRankLinear (LoRA, AdaLoRA/TriLoRA, FLoRA) and DoRALinear (METHODS.md §4) against the reference formulas."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

from subspace_ops import reference
from subspace_ops.nn.lowrank import G_KINDS, DoRALinear, LowRankLinear, dora_row_norm

from conftest import backend_device


def _perturb(layer) -> None:
    """Move every trainable tensor off its init so the adapter's output is not zero."""
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))


def _g_matrix(layer):
    return None if layer.lora_g is None else layer.lora_g


@pytest.mark.parametrize("g", list(G_KINDS))
def test_forward_equals_reference_and_merges_exactly(backend, g):
    device = backend_device(backend)
    base = nn.Linear(20, 18).to(device)
    x = torch.randn(2, 5, 20, device=device)
    expected0 = base(x)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    w0_storage = base.weight.data
    layer = LowRankLinear(base, 4, g=g, alpha=8, backend=backend)
    assert layer.scaling == 2.0 and layer.method == G_KINDS[g]
    torch.testing.assert_close(layer(x), expected0, rtol=1e-6, atol=1e-6)  # A = 0 at init

    _perturb(layer)
    y = layer(x)
    expected = reference.lowrank_linear(x, layer.weight, layer.lora_a, _g_matrix(layer), layer.lora_b, layer.bias,
                                        scaling=2.0)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, expected0, atol=1e-3)

    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert torch.equal(layer.weight, w0) and torch.equal(layer.bias, b0)
    assert layer.weight.data.data_ptr() == w0_storage.data_ptr()  # the original tensor itself, not a copy
    torch.testing.assert_close(layer(x), y)


@pytest.mark.parametrize("g", list(G_KINDS))
def test_gradients_reach_the_adapter_only(g):
    base = nn.Linear(12, 10)
    layer = LowRankLinear(base, 3, g=g, backend="cpu")
    _perturb(layer)
    x = torch.randn(4, 12, requires_grad=True)
    layer(x).square().sum().backward()
    trainable = {"lora_a", "lora_b"} | ({"lora_g"} if g != "none" else set())
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == trainable
    for name, p in layer.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    assert x.grad is not None
    assert layer.weight.grad is None and layer.bias.grad is None


def test_init_and_factors():
    base = nn.Linear(64, 10)
    layer = LowRankLinear(base, 5, g="full", dropout=0.1)
    assert layer.scaling == 1.0  # alpha=None means alpha = rank
    assert torch.count_nonzero(layer.lora_a) == 0
    assert layer.lora_b.abs().max() <= 1 / math.sqrt(64) and torch.count_nonzero(layer.lora_b) > 0
    assert torch.equal(layer.lora_g, torch.eye(5))
    assert torch.equal(LowRankLinear(nn.Linear(4, 3), 2, g="diag").lora_g, torch.ones(2))
    a, b = layer.low_rank_factors()
    assert a is layer.lora_a and b is layer.lora_b and a.shape == (10, 5) and b.shape == (5, 64)
    assert {"lora_a", "lora_b", "lora_g", "weight", "bias"} <= set(layer.state_dict())
    assert "rank=5" in repr(layer) and "g=full" in repr(layer)


def test_dropout_only_in_training():
    layer = LowRankLinear(nn.Linear(16, 8, dtype=torch.float64), 2, dropout=0.5, backend="cpu")
    _perturb(layer)
    x = torch.randn(6, 16, dtype=torch.float64)
    layer.eval()
    y_eval = layer(x)
    torch.testing.assert_close(y_eval, reference.lowrank_linear(x, layer.weight, layer.lora_a, None, layer.lora_b,
                                                                layer.bias))
    layer.train()
    torch.manual_seed(5)
    y_train = layer(x)
    torch.manual_seed(5)
    expected = reference.lowrank_linear(x, layer.weight, layer.lora_a, None, layer.lora_b, layer.bias,
                                        dropout_p=0.5, training=True)
    torch.testing.assert_close(y_train, expected)
    assert not torch.allclose(y_train, y_eval)


def test_bfloat16_layer_merges_and_unmerges_bit_exactly():
    base = nn.Linear(24, 16).to(torch.bfloat16)
    w0 = base.weight.detach().clone()
    layer = LowRankLinear(base, 4, g="diag", backend="cpu")
    _perturb(layer)
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=3e-2, atol=3e-2)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(rank=0), ValueError, "rank must be a positive int"),
    (dict(rank=2, g="lowrank"), ValueError, "g must be one of"),
    (dict(rank=2, dropout=1.0), ValueError, "dropout must be"),
    (dict(rank=2, alpha=float("nan")), ValueError, "alpha must be finite"),
])
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        LowRankLinear(nn.Linear(4, 3), **kwargs)
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        LowRankLinear(nn.Conv1d(4, 3, 1), 2)


# ---- DoRA


def test_dora_row_norm_equals_the_materialized_norm():
    w, a, b = (torch.randn(*s, dtype=torch.float64) for s in ((9, 13), (9, 4), (4, 13)))
    expected = (w + 0.7 * a @ b).norm(dim=1)
    torch.testing.assert_close(dora_row_norm(w, a, b, 0.7), expected)
    args = tuple(t.clone().requires_grad_(True) for t in (w, a, b))
    assert torch.autograd.gradcheck(lambda w, a, b: dora_row_norm(w, a, b, 0.7), args)


def test_dora_matches_reference(backend):
    device = backend_device(backend)
    base = nn.Linear(17, 11, dtype=torch.float64).to(device)
    x = torch.randn(2, 6, 17, dtype=torch.float64, device=device, requires_grad=True)
    expected0 = base(x)
    layer = DoRALinear(base, 3, alpha=6, backend=backend)
    torch.testing.assert_close(layer(x), expected0)  # m = ‖W‖ and A = 0 at init
    _perturb(layer)
    y = layer(x)
    params = [x, layer.lora_a, layer.lora_b, layer.magnitude]
    expected = reference.dora_linear(x, layer.weight, layer.lora_a, layer.lora_b, layer.magnitude, layer.bias,
                                     scaling=2.0)
    torch.testing.assert_close(y, expected)
    grad_y = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, params, grad_y), torch.autograd.grad(expected, params, grad_y)):
        torch.testing.assert_close(got, want)

    layer.merge()
    torch.testing.assert_close(layer(x), y)
    layer.unmerge()
    assert torch.equal(layer.weight, base.weight)


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_dora_float32_cpu_gradients_match_float64(tokens):
    """float32 on the cpu backend (where a call without gradients takes W Bᵀ from the few-rows loops,
    a training call must keep its gradient to B): every gradient against the float64 reference."""
    layer = DoRALinear(nn.Linear(48, 40), 8, backend="cpu")
    _perturb(layer)
    x = torch.randn(tokens, 48, requires_grad=True)
    params = [x, layer.lora_a, layer.lora_b, layer.magnitude]
    y = layer(x)
    doubled = [t.detach().double().requires_grad_() for t in params]
    expected = reference.dora_linear(doubled[0], layer.weight.double(), *doubled[1:], layer.bias.double(),
                                     scaling=layer.scaling)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    grad_y = torch.randn(y.shape, dtype=torch.float64)
    ours = torch.autograd.grad(y, params, grad_y.float())
    for got, want in zip(ours, torch.autograd.grad(expected, doubled, grad_y)):
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)


def test_dora_gradients_and_detached_norm():
    base = nn.Linear(10, 7, dtype=torch.float64)
    layer = DoRALinear(base, 2, backend="cpu")
    _perturb(layer)
    x = torch.randn(5, 10, dtype=torch.float64)
    layer(x).square().sum().backward()
    assert {n for n, p in layer.named_parameters() if p.grad is not None} == {"lora_a", "lora_b", "magnitude"}
    assert layer.weight.grad is None and layer.bias.grad is None
    a, b = layer.low_rank_factors()
    assert a is layer.lora_a and b is layer.lora_b

    # A bias unfrozen later (e.g. bitfit applied on top) gets the plain bias gradient.
    layer.bias.requires_grad_(True)
    grad_y = torch.randn(3, 5, 7, dtype=torch.float64)
    got = torch.autograd.grad(layer(torch.randn(3, 5, 10, dtype=torch.float64)), layer.bias, grad_y)[0]
    torch.testing.assert_close(got, grad_y.sum((0, 1)))
    layer.bias.requires_grad_(False)

    # detach_norm (DoRA §4.3, PEFT): same forward, gradients with ‖W + sAB‖ held constant.
    detached = DoRALinear(nn.Linear(10, 7, dtype=torch.float64), 2, detach_norm=True, backend="cpu")
    detached.load_state_dict(layer.state_dict())
    torch.testing.assert_close(detached(x), layer(x))
    merged = detached.weight + detached.lora_a @ detached.lora_b
    norm = merged.norm(dim=1, keepdim=True).detach()
    expected = nn.functional.linear(x, detached.magnitude[:, None] * merged / norm, detached.bias)
    params = [detached.lora_a, detached.lora_b, detached.magnitude]
    for got, want in zip(torch.autograd.grad(detached(x).sum(), params), torch.autograd.grad(expected.sum(), params)):
        torch.testing.assert_close(got, want)


def test_dora_without_bias_and_with_dropout():
    layer = DoRALinear(nn.Linear(12, 8, bias=False, dtype=torch.float64), 2, dropout=0.5, backend="cpu")
    _perturb(layer)
    x = torch.randn(4, 12, dtype=torch.float64)
    layer.eval()
    expected = reference.dora_linear(x, layer.weight, layer.lora_a, layer.lora_b, layer.magnitude)
    torch.testing.assert_close(layer(x), expected)
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    dropped = nn.functional.dropout(x, 0.5, True)
    scale = layer.magnitude / (layer.weight + layer.lora_a @ layer.lora_b).norm(dim=1)
    torch.testing.assert_close(y, scale * (x @ layer.weight.T + dropped @ layer.lora_b.T @ layer.lora_a.T))


def test_dora_evaluation_keeps_the_weight_norms_only_while_the_weight_is_unchanged(monkeypatch):
    """Calls without gradients reuse ‖W_n‖² (DoRALinear._kept_weight_sq) and, in float32 on the cpu
    backend, take W Bᵀ from the few-rows loops; every way the frozen W can change is seen: an in-place
    write (version counter), load_state_dict, a new tensor, .to(); writes through .data are not, and
    forget_weight_norms() drops the kept norms. Each output is compared with the reference formula."""
    layer = DoRALinear(nn.Linear(40, 24), 8, backend="cpu")
    _perturb(layer)
    computed = []
    original = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm", lambda *a, **k: computed.append(1) or original(*a, **k))
    x = torch.randn(3, 40)

    def check(expect_recomputed: bool) -> None:
        computed.clear()
        with torch.no_grad():
            got = layer(x)
        recomputed = bool(computed)
        expected = reference.dora_linear(x.double(), layer.weight.double(), layer.lora_a.double(),
                                         layer.lora_b.double(), layer.magnitude.double(), layer.bias.double(),
                                         scaling=layer.scaling)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        assert recomputed == expect_recomputed

    check(True)
    check(False)  # kept
    with torch.no_grad():
        layer.weight.mul_(1.5)  # in place: a new version
    check(True)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["weight"] = torch.randn(24, 40)
    layer.load_state_dict(state)
    check(True)
    layer.weight = nn.Parameter(torch.randn(24, 40), requires_grad=False)
    check(True)
    layer.to(torch.float64)
    x = x.double()
    check(True)
    layer.weight.data.mul_(0.5)  # not seen: the kept norms are stale until forgotten
    with torch.no_grad():
        stale = layer(x)
    layer.forget_weight_norms()
    check(True)
    with torch.no_grad():
        assert not torch.allclose(stale, layer(x))
    # A training call computes the norm with its graph each time, whatever is kept.
    computed.clear()
    layer(x.requires_grad_()).sum().backward()
    assert computed and layer.lora_a.grad is not None


def test_dora_decoding_step_reads_w_once_only_where_it_applies(monkeypatch):
    """dora_linear called without a kept norm (the layers keep theirs): a float32 cpu call of a few tokens that
    records no gradient, without active dropout, takes _dora_decoding_step ([x; B] · Wᵀ in one pass
    over W) and equals the reference, with and without a bias; calls that record a gradient, active
    dropout and more than 16 rows of [x; B] take the op, as does a call given the row norms."""
    from subspace_ops.nn import lowrank as lowrank_module

    taken = []
    original = lowrank_module._dora_decoding_step
    monkeypatch.setattr(lowrank_module, "_dora_decoding_step", lambda *a: taken.append(1) or original(*a))

    def call(layer, x, training=False, row_norm=None):
        return lowrank_module.dora_linear(x, layer.weight, layer.lora_a, layer.lora_b, layer.magnitude, layer.bias,
                                          layer.scaling, detach_norm=True, dropout_p=layer.dropout,
                                          training=training, backend="cpu", row_norm=row_norm)

    for bias in (True, False):
        layer = DoRALinear(nn.Linear(40, 24, bias=bias), 8, dropout=0.1, backend="cpu")
        _perturb(layer)
        for tokens in (1, 3, 8, 9):
            x = torch.randn(1, tokens, 40)
            taken.clear()
            with torch.no_grad():
                got = call(layer, x)
            assert bool(taken) == (tokens + 8 <= 16)
            expected = reference.dora_linear(x.double(), layer.weight.double(), layer.lora_a.double(),
                                             layer.lora_b.double(), layer.magnitude.double(),
                                             None if layer.bias is None else layer.bias.double(),
                                             scaling=layer.scaling)
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        taken.clear()
        call(layer, torch.randn(2, 40, requires_grad=True)).sum().backward()  # records a gradient
        with torch.no_grad():
            call(layer, torch.randn(2, 40), training=True)  # active dropout on the adapter's input
            call(layer, torch.randn(2, 40), row_norm=layer.row_norm())  # the norm is known
        assert not taken


def test_dora_evaluation_keeps_the_row_norms_while_w_a_b_and_the_scaling_are_unchanged(monkeypatch):
    """DoRALinear's calls without gradients reuse ‖W_n + s(AB)_n‖ until W, A, B or the scaling
    change: in-place writes, load_state_dict, a new tensor, a scaling change, and each optimizer's step
    (SGD, AdamW for-loop / foreach bump the version counters; fused AdamW does not, so the training call
    before a step drops the kept norms); ‖W_n‖² is not recomputed for a change of A or B alone. Every
    output equals the reference."""
    from subspace_ops.nn import lowrank as lowrank_module

    norms, weight_norms = [], []
    original_norm, original_vector_norm = lowrank_module.dora_row_norm, torch.linalg.vector_norm
    monkeypatch.setattr(lowrank_module, "dora_row_norm", lambda *a, **k: norms.append(1) or original_norm(*a, **k))
    monkeypatch.setattr(torch.linalg, "vector_norm",
                        lambda *a, **k: weight_norms.append(1) or original_vector_norm(*a, **k))
    layer = DoRALinear(nn.Linear(40, 24), 4, backend="cpu")
    _perturb(layer)
    x = torch.randn(1, 40)

    def check(norm_recomputed: bool, weight_norm_recomputed: bool = False) -> None:
        norms.clear()
        weight_norms.clear()
        with torch.no_grad():
            got = layer(x)
        assert (bool(norms), bool(weight_norms)) == (norm_recomputed, weight_norm_recomputed)
        expected = reference.dora_linear(x.double(), layer.weight.double(), layer.lora_a.double(),
                                         layer.lora_b.double(), layer.magnitude.double(), layer.bias.double(),
                                         scaling=layer.scaling)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)

    check(True, True)
    check(False)
    with torch.no_grad():
        layer.magnitude.mul_(2.0)  # m is not in the norm: nothing to recompute
    check(False)
    with torch.no_grad():
        layer.lora_a.add_(0.1)
    check(True)
    with torch.no_grad():
        layer.lora_b.mul_(1.1)
    check(True)
    check(False)
    for optimizer in (torch.optim.SGD(layer.parameters(), lr=0.1),
                      torch.optim.AdamW(layer.parameters(), lr=0.1, foreach=False),
                      torch.optim.AdamW(layer.parameters(), lr=0.1, foreach=True),
                      torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)):
        layer(torch.randn(3, 40)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        check(True)
        check(False)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["lora_a"] = torch.randn(24, 4)
    layer.load_state_dict(state)
    check(True, True)
    layer.lora_b = nn.Parameter(torch.randn(4, 40))
    check(True)
    layer.scaling = 0.5
    check(True)
    with torch.no_grad():
        layer.weight.add_(0.1)
    check(True, True)
    layer.lora_a.data.mul_(2.0)  # not seen until forgotten
    layer.forget_weight_norms()
    check(True, True)
    with torch.no_grad():
        kept = layer(x)
    for copied in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):  # kept norms are not carried
        norms.clear()
        with torch.no_grad():
            torch.testing.assert_close(copied(x), kept, rtol=0, atol=0)
        assert norms
    # the reference backend is the papers' formula: it keeps nothing
    layer = DoRALinear(nn.Linear(40, 24), 4, backend="reference")
    _perturb(layer)
    check(True, True)
    check(True, True)


def test_dora_compiled_training_steps_drop_the_norms_eager_evaluation_kept():
    """torch.compile(fullgraph=True) traces DoRALinear's 'a gradient call drops the kept norms' as a
    side effect it replays, so eager evaluation after compiled fused-AdamW steps (which bump no version
    counter) computes the norms of the new A, B."""
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(40, 24), 4, backend="cpu")
    _perturb(layer)
    x = torch.randn(2, 40)
    with torch.no_grad():
        layer(x)  # keeps the norms of the initial A, B
    compiled = torch.compile(layer, fullgraph=True)
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1, fused=True)
    for _ in range(2):
        compiled(torch.randn(3, 40)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        got = layer(x)
    expected = reference.dora_linear(x.double(), layer.weight.double(), layer.lora_a.double(), layer.lora_b.double(),
                                     layer.magnitude.double(), layer.bias.double(), scaling=layer.scaling)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
