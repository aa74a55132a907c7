"""SVDLinear (SiVA, SAM-PARSER, SVDiff) and apply_svd."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from subspace_ops import reference
from subspace_ops.adapters import apply_svd, merge_all, unmerge_all
from subspace_ops.nn import SVD_METHODS, SVDLinear

from conftest import backend_device


def _perturb(layer):
    with torch.no_grad():
        layer.s.add_(0.3 * torch.randn_like(layer.s))


@pytest.mark.parametrize("method", SVD_METHODS)
def test_starts_at_the_pretrained_layer_and_merges_exactly(backend, method):
    device = backend_device(backend)
    base = nn.Linear(24, 20).to(device)
    x = torch.randn(5, 24, device=device)
    expected = base(x)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = SVDLinear(base, method, perc=0.9, backend=backend)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    _perturb(layer)
    y = layer(x)
    assert not torch.allclose(y, expected, atol=1e-3)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.weight, w0) and torch.equal(layer.bias, b0)
    y.sum().backward()
    assert layer.s.grad is not None and layer.weight.grad is None


def test_siva_tunes_the_smallest_singular_values_chosen_by_perc():
    base = nn.Linear(6, 6, bias=False, dtype=torch.float64)
    with torch.no_grad():
        q1, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
        base.weight.copy_(q1 @ torch.diag(torch.tensor([6.0, 5, 4, 3, 2, 1], dtype=torch.float64)) @ q2.T)
    # σ² = 36, 25, 16, 9, 4, 1 (total 91): the top 4 hold 86/91 = 94.5% < 95%, the top 5 hold 98.9%.
    layer = SVDLinear(base, "siva", perc=0.95)
    assert layer.ranks == (1,) and torch.allclose(layer.sigma, torch.tensor([1.0], dtype=torch.float64))
    assert SVDLinear(copy.deepcopy(base), "siva", perc=0.9).ranks == (2,)
    assert SVDLinear(copy.deepcopy(base), "siva", rank=3).ranks == (3,)
    # The tuned direction is the smallest singular pair: u σ vᵀ of the original W.
    torch.testing.assert_close(layer.u[:, 0].abs(), q1[:, 5].abs())
    full = SVDLinear(copy.deepcopy(base), "sam-parser")
    assert full.ranks == (6,) and torch.allclose(full.s, full.sigma.double())


@pytest.mark.parametrize("method", ["sam-parser", "svdiff"])
def test_float64_layers_keep_float64_singular_values(method):
    # d = s - σ and relu(σ + s) - σ are float64-exact only with σ kept in float64: with s = 2σ
    # SAM-PARSER's W_eff is 2W, and with s = -σ SVDiff's is 0 (001 eq. 4-5), to float64 rounding.
    base = nn.Linear(24, 20, bias=False, dtype=torch.float64)
    w = base.weight.detach().clone()
    layer = SVDLinear(base, method)
    assert layer.sigma.dtype == torch.float64
    with torch.no_grad():
        layer.s.copy_(2 * layer.sigma if method == "sam-parser" else -layer.sigma)
    expected = 2 * w if method == "sam-parser" else torch.zeros_like(w)
    weight, _ = layer.merged_weight_and_bias()
    torch.testing.assert_close(weight, expected, rtol=0, atol=1e-13)
    x = torch.randn(5, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ expected.T, rtol=0, atol=1e-13)


def test_fused_qkv_parts_equal_separate_layers():
    d = 8
    fused = nn.Linear(d, 3 * d, dtype=torch.float64)
    layer = SVDLinear(fused, "siva", rank=3, parts=(d, d, d), tuned_parts=(0, 2))
    _perturb(layer)
    x = torch.randn(4, d, dtype=torch.float64)
    pieces = []
    offset = 0
    for part in range(3):
        rows = slice(part * d, (part + 1) * d)
        w = fused.weight[rows]
        if part in (0, 2):
            u, sigma, vh = torch.linalg.svd(w.float(), full_matrices=False)
            s = layer.s[offset:offset + 3]
            offset += 3
            w = w + (u[:, -3:].double() * s) @ vh[-3:].double()
        pieces.append(x @ w.T + fused.bias[rows])
    torch.testing.assert_close(layer(x), torch.cat(pieces, dim=-1), rtol=1e-5, atol=1e-5)
    assert layer.s.numel() == 6


def test_adapter_state_round_trip_and_mismatch_is_refused():
    base = nn.Linear(12, 10)
    layer = SVDLinear(copy.deepcopy(base), "svdiff")
    _perturb(layer)
    state = layer.adapter_state()
    fresh = SVDLinear(copy.deepcopy(base), "svdiff")
    fresh.load_adapter_state(state)
    x = torch.randn(3, 12)
    torch.testing.assert_close(fresh(x), layer(x))
    other = SVDLinear(nn.Linear(12, 10), "svdiff")
    before = other.s.detach().clone()
    with pytest.raises(ValueError, match="different base weights"):
        other.load_adapter_state(state)
    assert torch.equal(other.s, before)
    with pytest.raises(ValueError, match="method"):
        SVDLinear(copy.deepcopy(base), "sam-parser").load_adapter_state(state)


@pytest.mark.parametrize("when", ["cast after attach", "attached in bf16"])
def test_bf16_adapter_state_loads_onto_the_float32_weights_it_came_from(when):
    """model.to(bfloat16) casts the fingerprint with the weights; σ of the bf16-rounded weights move
    within the Weyl bound the comparison allows. Other weights are still refused in float32."""
    torch.manual_seed(0)
    base = nn.Linear(48, 40)
    if when == "cast after attach":
        layer = SVDLinear(copy.deepcopy(base), "siva", perc=0.5).to(torch.bfloat16)
    else:
        layer = SVDLinear(copy.deepcopy(base).to(torch.bfloat16), "siva", perc=0.5)
    assert layer.fingerprint.dtype == torch.bfloat16
    _perturb(layer)
    fresh = SVDLinear(copy.deepcopy(base), "siva", perc=0.5)
    fresh.load_adapter_state(layer.adapter_state())
    torch.testing.assert_close(fresh.s, layer.s.float())
    fp32_state = fresh.adapter_state()
    with pytest.raises(ValueError, match="different base weights"):
        SVDLinear(nn.Linear(48, 40), "siva", perc=0.5).load_adapter_state(fp32_state)


def test_paths_agree_and_are_reported():
    layer = SVDLinear(nn.Linear(16, 16), "siva", rank=8)
    _perturb(layer)
    x_small, x_big = torch.randn(2, 16), torch.randn(64, 16)
    assert layer.chosen_path(2) == "unmerged" and layer.chosen_path(64) == "merged"
    for x in (x_small, x_big):
        expected = reference.svd_delta_linear(x, layer.weight, layer.u, layer.v, layer.delta(), layer.bias)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert "method=siva" in repr(layer) and "path=auto" in repr(layer) and "basis" not in repr(layer)
    assert "basis where cheaper" in repr(SVDLinear(nn.Linear(16, 16), "sam-parser"))


SAM_SVDIFF = ("sam-parser", "svdiff")


@pytest.mark.parametrize("method", SAM_SVDIFF)
@pytest.mark.parametrize("parts, tuned", [(None, None), ((16, 8, 16), None), ((16, 8, 16), (2, 0))],
                         ids=["one-part", "qkv-all", "qkv-v-and-q"])
def test_basis_path_equals_the_reference(method, parts, tuned):
    """((x V) ⊙ (σ + d)) Uᵀ + b equals x (W + U diag(d) Vᵀ)ᵀ + b (float64: exactly up to the SVD's
    rounding; float32 to its tolerance), gradients included, also over a fused projection's parts
    with one part left alone and tuned_parts out of order (U's columns follow tuned_parts)."""
    torch.manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        layer = SVDLinear(nn.Linear(24, 40).to(dtype), method, parts=parts, tuned_parts=tuned, path="basis")
        _perturb(layer)
        with torch.no_grad():
            layer.bias.normal_()
        x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
        y = layer(x)
        expected = reference.svd_delta_linear(x, layer.weight, layer.u, layer.v, layer.delta(), layer.bias)
        torch.testing.assert_close(y, expected, rtol=tol, atol=tol)
        gy = torch.randn_like(y)
        ours = torch.autograd.grad(y, [x, layer.s], gy)
        theirs = torch.autograd.grad(expected, [x, layer.s], gy)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        for tokens in (1, 2, 5, 40):  # without gradients (float32: the few-rows loops up to 16 tokens)
            with torch.no_grad():
                torch.testing.assert_close(layer(x.reshape(-1, 24)[:tokens]), expected.reshape(-1, 40)[:tokens],
                                           rtol=tol, atol=tol)
    layer = SVDLinear(nn.Linear(6, 9).double(), method, parts=parts and (3, 3, 3),
                      tuned_parts=tuned, path="basis")
    _perturb(layer)
    torch.autograd.gradcheck(lambda x, s: torch.func.functional_call(layer, {"s": s}, (x,)),
                             (torch.randn(4, 6, dtype=torch.float64, requires_grad=True),
                              layer.s.detach().clone().requires_grad_()))


@pytest.mark.parametrize("method", SAM_SVDIFF)
def test_basis_path_rule(method):
    """The cheaper of the op's path and the basis path in multiply-adds (the basis weighted by
    BASIS_FLOPS_WEIGHT): basis for small M at 768×768, and for a training step at every M of a
    768→3072 layer; merged beyond ~960 tokens at 768×768 (training) and from 788 without a gradient."""
    layer = SVDLinear(nn.Linear(768, 768), method)
    assert layer.basis_spans_weight()
    assert layer.chosen_path(197) == "basis" and layer.chosen_path(788) == "basis"
    assert layer.chosen_path(2048) == "merged" and layer.chosen_path(4096) == "merged"
    assert layer.chosen_path(197, needs_grad=False) == "basis"
    assert layer.chosen_path(788, needs_grad=False) == "merged"
    wide = SVDLinear(nn.Linear(768, 3072), method)
    assert all(wide.chosen_path(m) == "basis" for m in (1, 197, 4096, 65536))
    qkv = SVDLinear(nn.Linear(768, 3 * 768), method, parts=(768, 768, 768))  # measured: merged at 4096
    assert qkv.chosen_path(788) == "basis" and qkv.chosen_path(4096) == "merged"
    siva = SVDLinear(nn.Linear(768, 768), "siva")
    assert not siva.basis_spans_weight() and siva.chosen_path(197) == "unmerged"
    # The forward asks with needs_grad as autograd will record the call; the bits tell the path.
    twins = {}
    for path in ("merged", "basis"):
        twins[path] = copy.copy(layer)
        twins[path].path = path
    x = torch.randn(788, 768)
    with torch.no_grad():
        forced = {path: twin(x) for path, twin in twins.items()}
        assert not torch.equal(forced["merged"], forced["basis"])
        assert torch.equal(layer(x), forced["merged"])
    assert torch.equal(layer(x).detach(), twins["basis"](x).detach())


@pytest.mark.parametrize("method", SAM_SVDIFF)
def test_basis_path_follows_the_weight(method):
    """The basis path reads U, Σ, V, not W: once W is no longer U Σ Vᵀ (load_state_dict of other weights,
    an in-place copy_) the layer takes the op's path with the new W, and takes the basis path again
    when W is back; 16-bit weights and a trainable W never take it; path="basis" then says why."""
    torch.manual_seed(0)
    layer = SVDLinear(nn.Linear(24, 20), method)
    _perturb(layer)
    x = torch.randn(6, 24)
    original = {n: t.clone() for n, t in layer.state_dict().items()}

    def expected() -> torch.Tensor:
        return reference.svd_delta_linear(x, layer.weight, layer.u, layer.v, layer.delta(), layer.bias)

    assert layer.chosen_path(6) == "basis"
    torch.testing.assert_close(layer(x), expected(), rtol=2e-5, atol=2e-5)
    other = dict(original, weight=torch.randn(20, 24))
    layer.load_state_dict(other)
    assert not layer.basis_spans_weight() and layer.chosen_path(6) == "unmerged"
    torch.testing.assert_close(layer(x), expected(), rtol=1e-5, atol=1e-5)  # the new W
    with torch.no_grad():
        layer.weight.copy_(original["weight"])
    assert layer.basis_spans_weight() and layer.chosen_path(6) == "basis"
    with torch.no_grad():
        layer.weight[3, 5] += 1e-3  # one entry, in place
    assert layer.chosen_path(6) == "unmerged"
    torch.testing.assert_close(layer(x), expected(), rtol=1e-5, atol=1e-5)
    layer.load_state_dict(original)
    assert layer.chosen_path(6) == "basis"
    layer.weight.requires_grad_(True)  # not silently left without its gradient: the op refuses it
    assert layer.chosen_path(6) == "unmerged"
    with pytest.raises(ValueError, match="weight must be frozen"):
        layer(x)
    layer.weight.requires_grad_(False)
    forced = SVDLinear(nn.Linear(24, 20), method, path="basis")
    forced.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="path='basis'.*needs float32/float64"):
        forced(x.to(torch.bfloat16))
    with pytest.raises(ValueError, match="path='basis' needs every singular direction"):
        SVDLinear(nn.Linear(24, 20), "siva", path="basis")
    with pytest.raises(ValueError, match="path must be"):
        SVDLinear(nn.Linear(24, 20), method, path="fast")


@pytest.mark.parametrize("method", SAM_SVDIFF)
def test_reference_backend_forms_the_weight_not_the_basis(method):
    """The reference backend is the ground truth (and the bench's naive rows): it forms W' whatever
    the layer's path, the basis path included."""
    torch.manual_seed(0)
    x = torch.randn(6, 24)
    for path in (None, "basis"):
        layer = SVDLinear(nn.Linear(24, 20), method, backend="reference", path=path)
        _perturb(layer)
        assert path is not None or layer.chosen_path(6) == "unmerged"
        expected = reference.svd_delta_linear(x, layer.weight, layer.u, layer.v, layer.delta(), layer.bias)
        assert torch.equal(layer(x), expected)


def test_basis_check_after_a_write_through_data_and_under_fsdp2(tmp_path, monkeypatch):
    """A write through weight.data bypasses the version counter: recheck_basis() asks again. Under
    FSDP2 (one gloo rank) W is refilled every forward, but checked only at attach and after
    load_state_dict, not at every call (each check is a matrix-vector product and a host sync)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    layer = SVDLinear(nn.Linear(24, 20), "sam-parser")
    layer.weight.data[2, 3] += 0.1
    assert layer.chosen_path(6) == "basis"  # not seen: .data has its own version counter
    layer.recheck_basis()
    assert layer.chosen_path(6) == "unmerged"

    checks = []
    original = SVDLinear._weight_matches_basis
    monkeypatch.setattr(SVDLinear, "_weight_matches_basis", lambda self: checks.append(1) or original(self))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.Sequential(SVDLinear(nn.Linear(24, 24), "sam-parser"), nn.ReLU(),
                              SVDLinear(nn.Linear(24, 20), "svdiff"))
        assert len(checks) == 2
        for m in (model[0], model[2], model):
            fully_shard(m)
        x = torch.randn(6, 24)
        for _ in range(3):
            model(x).sum().backward()
        assert len(checks) == 2 and model[0]._basis_exact and model[2]._basis_exact
        model.load_state_dict(model.state_dict())
        model(x).sum().backward()
        model(x).sum().backward()
        assert len(checks) == 4
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("needs_grad", [True, False])
def test_basis_path_compiles_fullgraph(needs_grad):
    layer = SVDLinear(nn.Linear(24, 40), "sam-parser", parts=(16, 8, 16), tuned_parts=(2, 0))
    _perturb(layer)
    x = torch.randn(2, 5, 24)
    assert layer.chosen_path(10, needs_grad) == "basis"
    compiled = torch.compile(layer, fullgraph=True)
    with torch.set_grad_enabled(needs_grad):
        torch.testing.assert_close(compiled(x), layer(x))


def test_bad_options():
    with pytest.raises(ValueError, match="method must be"):
        SVDLinear(nn.Linear(4, 4), "lora")
    with pytest.raises(ValueError, match="parts must"):
        SVDLinear(nn.Linear(4, 6), parts=(2, 2))
    with pytest.raises(ValueError, match="tuned_parts"):
        SVDLinear(nn.Linear(4, 6), parts=(2, 2, 2), tuned_parts=(3,))
    with pytest.raises(ValueError, match="rank"):
        SVDLinear(nn.Linear(4, 4), "svdiff", rank=2)


timm = pytest.importorskip("timm")


@pytest.mark.integration
def test_apply_siva_to_a_tiny_vit():
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    report = apply_svd(model, "siva", perc=0.95)
    assert report.layers == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    qkv = model.blocks[0].attn.qkv
    assert qkv.tuned_parts == (0, 2) and len(qkv.ranks) == 2
    assert report.adapter_params == sum(m.s.numel() for m in model.modules() if isinstance(m, SVDLinear))
    assert "k=" in report.details["blocks.0.attn.qkv"]
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="match no nn.Linear"):
        apply_svd(nn.Sequential(nn.ReLU()), "svdiff")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    merge_all(model)
    unmerge_all(model)
    assert all(torch.equal(model.get_parameter(n), w) for n, w in frozen.items())
