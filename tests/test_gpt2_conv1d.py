"""GPT-2-style models: transformers' ``Conv1D`` (``y = x W + b``, W stored [in, out]) is adapted as a
linear layer on the same memory (its weight seen transposed, never copied), and everything a
Linear-based model gets works on it: every backend, training, exact merge/unmerge, and the PEFT-style
wrapper's merge_and_unload / unload back to ``Conv1D`` modules."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from subspace_ops import adapters, get_peft_model, methods
from subspace_ops.adapters import conv1d_as_linear
from subspace_ops.nn import NotMergeableError
from subspace_ops.peft_model import SubspacePeftModel

from conftest import move_off_init, require_backend, tiny_gpt2

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

TARGETS = ("c_attn", "c_proj", "c_fc")  # every projection of a GPT-2 block (c_attn: fused q, k, v)
# Per method: the options a GPT-2 needs (its module names) and whether it starts as the identity.
CASES = {
    "lora": ({}, True),  # the registry's default targets name GPT-2's projections
    "flora": ({"targets": TARGETS}, True),
    "dora": ({"targets": TARGETS}, True),
    "pa": ({"targets": TARGETS, "activation": "identity"}, True),
    "spectral": ({"targets": TARGETS}, True),
    "siva": ({"perc": 0.5}, True),  # default targets: c_attn, split into q, k, v; q and v tuned
    "sam-parser": ({"targets": TARGETS}, True),
    "svdiff": ({"targets": TARGETS}, True),
    "ia3": ({}, True),  # default targets: k, v of c_attn (split; q untouched) and mlp.c_proj's input
    "ssb": ({}, True),
    "rlrr": ({"targets": TARGETS, "ssf_targets": ("ln_1", "ln_2", "ln_f")}, False),  # SSF: γ ~ N(1, 0.02)
    "adapter": ({"targets": ("*.attn.c_proj", "*.mlp.c_proj"), "bottleneck": 4}, False),  # merge: not mergeable
    "coeff": ({}, True),  # head mixing through transformers' attention registry (causal); no weights to merge
}


IDS = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))


def _conv1ds(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, Conv1D)}


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("method", ["rlrr", "ssb", "siva", "lora", "dora"])
def test_a_conv1d_adapts_like_the_equivalent_linear(method, backend):
    """The layer built on a Conv1D (transposed weight view) equals the one built on an nn.Linear holding
    a contiguous copy of that weight, with the same adapter values, forward and gradients."""
    require_backend(backend)
    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # nf = 24 outputs, nx = 16 inputs: weight [16, 24]
    linear = nn.Linear(16, 24)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    view = conv1d_as_linear(conv)
    assert view.weight.data_ptr() == conv.weight.data_ptr() and view.bias is conv.bias  # no copy
    options = {k: v for k, v in CASES[method][0].items() if k not in ("targets", "ff_targets", "ssf_targets")}
    options.update({"ssf": False} if method == "rlrr" else {"ff_targets": ()} if method == "ssb" else {})
    config = methods.get_config(method, backend=backend, targets=("layer",), **options)
    on_conv = methods.apply(nn.ModuleDict({"layer": conv}), config)[0]["layer"]
    on_linear = methods.apply(nn.ModuleDict({"layer": linear}), config)[0]["layer"]
    move_off_init(on_conv)
    on_linear.load_state_dict(on_conv.state_dict())
    x = torch.randn(2, 5, 16, dtype=torch.float32, requires_grad=True)
    y_conv, y_linear = on_conv(x), on_linear(x)
    torch.testing.assert_close(y_conv, y_linear, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y_conv)
    got = torch.autograd.grad(y_conv, [x, *[p for p in on_conv.parameters() if p.requires_grad]], grad)
    want = torch.autograd.grad(y_linear, [x, *[p for p in on_linear.parameters() if p.requires_grad]], grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", list(CASES))
def test_gpt2_trains_merges_and_unmerges_exactly(method):
    base = tiny_gpt2()
    reference = base(IDS).logits
    conv_weights = {n: w.detach().clone() for n, w in _conv1ds(base).items()}
    options, identity_at_attach = CASES[method]
    model, report = methods.apply(copy.deepcopy(base), method, **options)
    if method == "lora":
        assert len(report.layers) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in both blocks
        # r·(in + out) per layer; the Conv1D weights, adapted as transposed views, are not counted
        config = report.details["config"]
        assert report.adapter_params == 2 * config.rank * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    c_attn = model.transformer.h[0].attn.c_attn  # GPT-2's fused [q; k; v], split as timm's qkv
    if method == "rlrr":
        assert c_attn.splits == (32, 32, 32) and tuple(c_attn.s_r.shape) == (3, 32)
    if method in ("ia3", "ssb"):  # k, v of c_attn and the FFN's second linear, per block; q left alone
        blocks = [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_proj")]
        assert sorted(report.layers) == blocks
        assert c_attn.splits == (32, 32, 32) and c_attn.scaled_parts == (False, True, True)
        # (IA)³: l_k, l_v [32] each + l_ff [128]; SSB: both sides of k, v (4·32) and of mlp.c_proj (128 + 32)
        assert report.adapter_params == 2 * ((2 * 32 + 128) if method == "ia3" else (4 * 32 + 128 + 32))
    if method == "siva":
        assert report.layers == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
        assert c_attn.parts == (32, 32, 32) and c_attn.tuned_parts == (0, 2)
    assert report.layers
    if identity_at_attach:
        torch.testing.assert_close(model(IDS).logits, reference, rtol=1e-5, atol=1e-5)
    move_off_init(model)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("attn.c_attn.weight"))
    model.eval()
    adapted = model(IDS).logits
    assert not torch.allclose(adapted, reference, atol=1e-4)  # the adapters do something
    if method in ("adapter", "coeff"):
        # Houlsby adapters have a nonlinearity, head mixing acts on attention maps: neither merges
        with pytest.raises(NotMergeableError, match="nothing was merged"):
            adapters.merge_all(model)
        return
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adapters.merge_all(model)
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-5, atol=1e-5)
    adapters.unmerge_all(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=0, atol=0)
    # Every base weight is as before the round trip: adapted layers hold the Conv1D's [in, out]
    # weight as a transposed view (no copy), the others are still Conv1Ds.
    for name, layer in model.named_modules():
        weight = getattr(layer, "weight", None) if name in conv_weights else None
        if weight is not None:
            stored = weight if isinstance(layer, Conv1D) else weight.t()
            assert stored.is_contiguous() and torch.equal(stored, conv_weights[name]), name


def test_peft_wrapper_saves_loads_merges_back_into_conv1d_and_unloads(tmp_path):
    base = tiny_gpt2()
    merged_model = get_peft_model(copy.deepcopy(base), methods.get_config("lora", targets=TARGETS, rank=4))
    move_off_init(merged_model)
    adapted = merged_model(IDS).logits
    merged_model.save_pretrained(tmp_path)
    reloaded = SubspacePeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    torch.testing.assert_close(reloaded(IDS).logits, adapted, rtol=0, atol=0)
    plain = merged_model.merge_and_unload()
    assert sorted(_conv1ds(plain)) == sorted(_conv1ds(base))  # Conv1D modules again, [in, out] weights
    torch.testing.assert_close(plain(IDS).logits, adapted, rtol=1e-5, atol=1e-5)
    fresh = tiny_gpt2()
    fresh.load_state_dict(plain.state_dict())  # the merged model saves as a plain GPT-2
    torch.testing.assert_close(fresh(IDS).logits, adapted, rtol=1e-5, atol=1e-5)

    before = {k: v.clone() for k, v in base.state_dict().items()}
    wrapped = get_peft_model(base, methods.get_config("lora", targets=TARGETS, rank=4))
    move_off_init(wrapped)
    unloaded = wrapped.unload()
    assert sorted(_conv1ds(unloaded)) == sorted(_conv1ds(tiny_gpt2()))
    assert all(torch.equal(before[k], v) for k, v in unloaded.state_dict().items())


def test_cross_attention_c_attn_is_not_split_as_qkv():
    """GPT-2's cross-attention c_attn holds [k; v] (2·d outputs): it stays one matrix, while the
    self-attention c_attn (3·d outputs) is split into q, k, v."""
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=48, n_layer=1, n_head=4,
                                     add_cross_attention=True)
    model, _ = methods.apply(transformers.GPT2LMHeadModel(config), "rlrr", ssf=False)
    block = model.transformer.h[0]
    assert block.attn.c_attn.splits == (48, 48, 48)
    assert block.crossattention.c_attn.splits == (96,)


def test_make_weights_contiguous_for_fsdp2():
    """FSDP2 refuses non-contiguous parameters; make_weights_contiguous copies the transposed views and
    changes nothing else (outputs, merge back into the Conv1D)."""
    model = get_peft_model(tiny_gpt2(), methods.get_config("rlrr", ssf_targets=("ln_1",)))
    move_off_init(model)
    model.eval()
    before = model(IDS).logits
    assert any(not p.is_contiguous() for p in model.parameters())
    assert adapters.make_weights_contiguous(model) == 8
    assert all(p.is_contiguous() for p in model.parameters())
    assert adapters.make_weights_contiguous(model) == 0
    torch.testing.assert_close(model(IDS).logits, before, rtol=1e-5, atol=1e-5)
    plain = model.merge_and_unload()
    assert len(_conv1ds(plain)) == 8
    torch.testing.assert_close(plain(IDS).logits, before, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_of_an_adapted_gpt2():
    """torch.compile runs the registered ops (and their fake kernels) on the Conv1D weights' transposed
    views: the same loss and adapter gradients as eager."""
    eager, _ = methods.apply(tiny_gpt2(), "rlrr", ssf_targets=("ln_1",))
    move_off_init(eager)
    compiled = copy.deepcopy(eager)
    eager(IDS, labels=IDS).loss.backward()
    loss = torch.compile(compiled)(IDS, labels=IDS).loss
    loss.backward()
    torch.testing.assert_close(loss, eager(IDS, labels=IDS).loss.detach(), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
