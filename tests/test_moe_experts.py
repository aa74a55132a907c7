"""LoRA-family adapters on Mixture-of-Experts expert parameters (``target_parameters``, nn/experts.py).

Tiny random transformers MoE models: Mixtral and Qwen3-MoE store experts [E, out, in], GPT-OSS [E, in, out].
The reference for an adapted model is the original model with each expert matrix replaced by
W_e + s·A_e G_e B_e, computed here expert by expert.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

from subspace_ops import methods, reference
from subspace_ops.adapters import merge_all, unmerge_all
from subspace_ops.checkpoint import load_adapter, save_adapter
from subspace_ops.nn import LowRankExperts

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.integration

EXPERTS = ("experts.gate_up_proj", "experts.down_proj")
VOCAB = 64


def _mixtral() -> nn.Module:
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=20, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=32)
    return transformers.MixtralForCausalLM(cfg)


def _qwen3_moe() -> nn.Module:
    cfg = transformers.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, moe_intermediate_size=12,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      num_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
    return transformers.Qwen3MoeForCausalLM(cfg)


def _gpt_oss() -> nn.Module:
    cfg = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=12, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                    num_experts_per_tok=2, max_position_embeddings=32, sliding_window=8,
                                    layer_types=["sliding_attention", "full_attention"])
    return transformers.GptOssForCausalLM(cfg)


FAMILIES = {"mixtral": (_mixtral, "out_in"), "qwen3_moe": (_qwen3_moe, "out_in"), "gpt_oss": (_gpt_oss, "in_out")}


def _model(family: str, seed: int = 0, experts_implementation: str = "grouped_mm") -> nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-OSS's YaRN notice about the tiny context length
        model = FAMILIES[family][0]()
    with torch.no_grad():  # well-scaled random experts (the init of empty 3-D parameters is family-specific)
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_(0.0, 0.2)
    model.config._experts_implementation = experts_implementation
    return model.eval()


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def _expert_layers(model: nn.Module) -> dict[str, LowRankExperts]:
    """Layer by the adapted parameter's name (``...experts.gate_up_proj``)."""
    return {name.replace(".parametrizations.", ".").removesuffix(".0"): m for name, m in model.named_modules()
            if isinstance(m, LowRankExperts)}


def _perturb(model: nn.Module, seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _expert_layers(model).values():
            for p in (layer.lora_a, layer.lora_b, layer.lora_g):
                if p is not None:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p is layer.lora_g else 0.0))


def _hand_delta(layer: LowRankExperts, e: int) -> torch.Tensor:
    """s·A_e G_e B_e for expert e, [out, in], in float64."""
    a, b = layer.lora_a[e].double(), layer.lora_b[e].double()
    g = layer.lora_g
    if g is None:
        middle = torch.eye(layer.rank, dtype=torch.float64)
    elif g.dim() == 2:
        middle = torch.diag(g[e].double())
    else:
        middle = g[e].double()
    return layer.scaling * (a @ middle @ b)


def _reference_model(original: nn.Module, adapted: nn.Module, layout: str) -> nn.Module:
    """``original`` with every adapted expert matrix W_e replaced by W_e + s·A_e G_e B_e (by hand)."""
    ref = copy.deepcopy(original)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, layer in _expert_layers(adapted).items():
            weight = params[name]
            for e in range(weight.shape[0]):
                delta = _hand_delta(layer, e)
                weight[e] += (delta if layout == "out_in" else delta.T).to(weight.dtype)
    return ref


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["lora", "adalora", "flora"])
def test_output_unchanged_at_attach_and_equal_to_hand_reference(family, method):
    model = _model(family)
    original = copy.deepcopy(model)
    x = _tokens()
    before = model(x).logits
    _, report = methods.apply(model, method, rank=2, alpha=4.0, target_parameters=EXPERTS)
    layers = _expert_layers(model)
    assert sorted(layers) == sorted(n for n, p in original.named_parameters() if p.dim() == 3)
    assert all(layer.layout == FAMILIES[family][1] for layer in layers.values())
    torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)  # ΔW = 0 at attach: bit-identical
    _perturb(model)
    after = model(x).logits
    assert (after - before).abs().max() > 1e-3  # the factors change the output
    expected = _reference_model(original, model, FAMILIES[family][1])(x).logits
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_eager_experts_implementation_matches_reference():
    """The eager forward indexes the parameter once per expert: the cached parametrization serves all."""
    model = _model("mixtral", experts_implementation="eager")
    original = copy.deepcopy(model)
    methods.apply(model, "lora", rank=2, target_parameters=EXPERTS, targets=())
    _perturb(model)
    x = _tokens()
    torch.testing.assert_close(model(x).logits, _reference_model(original, model, "out_in")(x).logits,
                               rtol=1e-5, atol=1e-5)


def test_adapted_parameter_is_formed_once_per_forward():
    """The eager forward reads the parameter once per routed expert; without the cached forward every read
    would form W + ΔW (E·out·in) again and keep each copy for the backward."""
    model = _model("mixtral", experts_implementation="eager")
    methods.apply(model, "lora", rank=2, target_parameters=EXPERTS, targets=())
    calls = []
    for layer in _expert_layers(model).values():
        layer.register_forward_hook(lambda m, args, out: calls.append(m))
    model(_tokens())
    assert len(calls) == len(_expert_layers(model))  # every layer once: 2 blocks × (gate_up_proj, down_proj)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_report_counts_expert_factors_and_freezes_base(family):
    model = _model(family)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.dim() == 3}
    with pytest.warns(UserWarning, match="target_parameters"):
        _, plain = methods.apply(copy.deepcopy(model), "flora", rank=3)
    _, report = methods.apply(model, "flora", rank=3, target_parameters=EXPERTS)
    layout = FAMILIES[family][1]
    per_expert = 0
    for e, first, second in shapes.values():
        out, inp = (first, second) if layout == "out_in" else (second, first)
        per_expert += e * (out * 3 + 3 * inp + 3 * 3)  # A, B, G (FLoRA's free r×r)
    assert report.adapter_params == plain.adapter_params + per_expert
    assert set(shapes) <= set(report.layers)
    assert set(report.details["expert_parameters"]) == set(shapes)
    assert "experts_not_adapted" not in report.details
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.endswith(".original") for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == report.adapter_params


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_gradients_reach_every_factor_and_not_the_base(family):
    model = _model(family)
    methods.apply(model, "trilora", rank=2, target_parameters=EXPERTS)
    _perturb(model)
    model(_tokens(), labels=_tokens()).loss.backward()
    for name, layer in _expert_layers(model).items():
        for p in (layer.lora_a, layer.lora_b, layer.lora_g):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in model.named_parameters():
        if name.endswith(".original"):
            assert p.grad is None and not p.requires_grad, name


def test_matches_peft_target_parameters_lora():
    """PEFT's ParamWrapper computes W_e + s·lora_B_e lora_A_e on the same [E, out, in] parameter. Its
    lora_A.weight [r·E, in] holds expert e's rows at e·r + j, its lora_B.weight [out, r·E] expert e's
    column j at j·E + e (get_delta_factors' reshapes); our B_e, A_e go there."""
    peft = pytest.importorskip("peft")
    model = _model("mixtral")
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=6, target_modules=[],
                                                                      target_parameters=list(EXPERTS)))
    methods.apply(model, "lora", rank=2, alpha=6.0, target_parameters=EXPERTS, targets=())
    _perturb(model)
    wrappers = {f"{n}.{m.parameter_name}".replace("base_model.model.", "").replace(".base_layer", ""): m
                for n, m in theirs.named_modules() if type(m).__name__ == "ParamWrapper"}
    layers = _expert_layers(model)
    assert sorted(wrappers) == sorted(layers)
    with torch.no_grad():
        for name, layer in layers.items():
            e, out, r = layer.lora_a.shape
            wrapper = wrappers[name]
            wrapper.lora_A["default"].weight.copy_(layer.lora_b.reshape(e * r, -1))
            wrapper.lora_B["default"].weight.copy_(layer.lora_a.permute(1, 2, 0).reshape(out, r * e))
            assert wrapper.scaling["default"] == layer.scaling
    x = _tokens()
    torch.testing.assert_close(model(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_merge_unmerge_round_trip_is_exact(family):
    model = _model(family)
    methods.apply(model, "adalora", rank=2, target_parameters=EXPERTS)
    _perturb(model)
    x = _tokens()
    unmerged = model(x).logits
    bases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".original")}
    assert merge_all(model) > len(bases)
    merged_bases = dict(model.named_parameters())
    assert any(not torch.equal(merged_bases[n], t) for n, t in bases.items())  # the delta went into W
    torch.testing.assert_close(model(x).logits, unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="merged"):
        save_adapter(model, "/nonexistent/never-written.safetensors", method="adalora")
    unmerge_all(model)
    for name, p in model.named_parameters():
        if name in bases:
            assert torch.equal(p, bases[name]), name
    torch.testing.assert_close(model(x).logits, unmerged, rtol=0, atol=0)


def test_merging_a_deep_copy_leaves_the_original_alone():
    model = _model("mixtral")
    methods.apply(model, "lora", rank=2, target_parameters=EXPERTS, targets=())
    _perturb(model)
    twin = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge_all(twin)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    x = _tokens()
    torch.testing.assert_close(twin(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    model = _model("qwen3_moe")
    methods.apply(model, "lora", rank=2, target_parameters=EXPERTS)
    _perturb(model)
    path = tmp_path / "moe.safetensors"
    save_adapter(model, path, method="lora")
    fresh = _model("qwen3_moe")  # same seed: the same base weights
    methods.apply(fresh, "lora", rank=2, target_parameters=EXPERTS)
    meta = load_adapter(fresh, path, method="lora")
    expert_keys = {k for k in meta["tensors"] if ".parametrizations." in k}
    assert expert_keys == {f"{n}.parametrizations.{p}.0.{f}" for n, p in
                           (k.rsplit(".", 1) for k in _expert_layers(model)) for f in ("lora_a", "lora_b")}
    x = _tokens()
    torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)
    other = _model("qwen3_moe", seed=5)  # other base weights: refused by the fingerprint
    methods.apply(other, "lora", rank=2, target_parameters=EXPERTS)
    with pytest.raises(ValueError, match="differs from the base weights"):
        load_adapter(other, path)


def test_plain_apply_names_the_unadapted_experts():
    model = _model("mixtral")
    with pytest.warns(UserWarning, match="target_parameters"):
        _, report = methods.apply(model, "lora", rank=2)
    note = report.details["experts_not_adapted"]
    assert note["parameters"] == [n for n, p in model.named_parameters() if p.dim() == 3]
    assert "target_parameters=('experts.gate_up_proj', 'experts.down_proj')" in str(report)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # adapting them all: nothing to say
        _, report = methods.apply(_model("mixtral"), "lora", rank=2, target_parameters=EXPERTS)
    assert "experts_not_adapted" not in report.details


def test_mpc_loss_sums_over_experts():
    model = _model("mixtral")
    methods.apply(model, "adalora", rank=2, target_parameters=EXPERTS, targets=())
    expected = sum(reference.mpc_orthogonal(layer.lora_a[e].double(), layer.lora_b[e].double())
                   for layer in _expert_layers(model).values() for e in range(layer.num_experts))
    torch.testing.assert_close(methods.mpc_loss(model, "o").double(), expected, rtol=1e-5, atol=1e-6)


def test_failed_attach_rolls_back_every_expert(monkeypatch):
    from subspace_ops.nn import experts as experts_nn

    model = _model("mixtral")
    names = [n for n, _ in model.named_parameters()]
    x = _tokens()
    before = model(x).logits
    attach, calls = experts_nn.attach, []

    def failing_attach(module, name, layer):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("attach failed")
        attach(module, name, layer)

    monkeypatch.setattr(experts_nn, "attach", failing_attach)
    with pytest.raises(RuntimeError, match="attach failed"):
        methods.apply(model, "lora", rank=2, target_parameters=EXPERTS, targets=())
    assert [n for n, _ in model.named_parameters()] == names  # no parametrization left behind
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules())
    torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)


def test_failure_after_attaching_rolls_the_experts_back(monkeypatch):
    """apply's own rollback (methods._restore_on_error) also takes out expert adapters attached before a
    later step raised: module classes, parameter names and the output as before."""
    model = _model("mixtral")
    names, classes = [n for n, _ in model.named_parameters()], [type(m) for m in model.modules()]
    x = _tokens()
    before = model(x).logits

    def failing_report(*args, **kwargs):
        raise RuntimeError("report failed")

    monkeypatch.setattr(methods, "_finish_report", failing_report)
    with pytest.raises(RuntimeError, match="report failed"):
        methods.apply(model, "lora", rank=2, target_parameters=EXPERTS)
    assert [n for n, _ in model.named_parameters()] == names
    assert [type(m) for m in model.modules()] == classes
    torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)


class _Conv(nn.Module):
    """A 3-D parameter whose layout nothing declares (an nn.Conv1d weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("overrides, match", [
    (dict(target_parameters=("experts.nonexistent",)), "matches no parameter"),
    (dict(target_parameters=(*EXPERTS, "experts.typo")), "'experts.typo' matches no parameter"),
    (dict(target_parameters=("q_proj.weight",)), "2-D"),
    (dict(target_parameters=EXPERTS, exclude=("experts",)), "matches no parameter"),
])
def test_bad_target_parameters_leave_the_model_unchanged(overrides, match):
    model = _model("mixtral")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        methods.apply(model, "lora", rank=2, **overrides)
    assert not any(isinstance(m, LowRankExperts) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and len(state) == len(
        model.state_dict())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method, overrides, match", [
    ("dora", {}, "dora cannot adapt 3-D expert parameters"),
    ("pa", {}, "pa cannot adapt"),
    ("lora", {"mpc": "n"}, "mpc='n' cannot adapt"),
    ("lora", {"dropout": 0.1}, "dropout must be 0 with target_parameters"),
])
def test_unsupported_combinations_are_refused(method, overrides, match):
    with pytest.raises(ValueError, match=match):
        methods.get_config(method, target_parameters=EXPERTS, **overrides)


def test_unknown_layout_and_double_adaptation_are_refused():
    with pytest.raises(ValueError, match="layout .* is unknown"):
        methods.apply(_Conv(), "lora", rank=2, targets=(), target_parameters=("conv.weight",))
    model = _model("mixtral")
    methods.apply(model, "lora", rank=2, target_parameters=EXPERTS)
    with pytest.raises(ValueError, match="already has a parametrization"):
        methods.apply(model, "flora", rank=2, targets=(), target_parameters=EXPERTS)
    with pytest.raises(ValueError, match="targets must name at least one"):
        methods.get_config("lora", targets=())


# ---------------------------------------------------------------------------------------------
# SubspacePeftModel (peft_model.py) with expert adapters: as PEFT's wrapper on its target_parameters LoRA.
def _wrapped(family: str, targets_linears: bool = True, **fields):
    """(adapted wrapper with moved factors, a deep copy of the base model taken before adapting)."""
    from subspace_ops.peft_model import get_peft_model

    model = _model(family)
    base = copy.deepcopy(model)
    extra = {} if targets_linears else {"targets": ()}
    wrapper = get_peft_model(model, methods.get_config("lora", rank=2, alpha=4.0, target_parameters=EXPERTS,
                                                       **extra, **fields))
    _perturb(model)
    _perturb_linears(model)
    return wrapper, base


def _perturb_linears(model: nn.Module, seed: int = 3) -> None:
    """Move the nn.Linear LoRA factors too, so that the linears' adapters also change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ".parametrizations." not in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def _assert_stock(model: nn.Module, family: str) -> None:
    """No parametrization, hook or attribute of ours left: the stock classes and state_dict keys."""
    stock = _model(family)
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in stock.named_modules()]
    assert list(model.state_dict()) == list(stock.state_dict())
    for name, m in model.named_modules():
        assert not torch.nn.utils.parametrize.is_parametrized(m), name
        assert not m._forward_pre_hooks and not m._forward_hooks, name
        assert not [a for a in vars(m) if a.startswith("_subspace")], name
    assert all(type(p) is nn.Parameter and p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("targets_linears", [True, False])
def test_peft_disable_adapter_runs_the_base_model(family, targets_linears):
    wrapper, base = _wrapped(family, targets_linears)
    x = _tokens()
    adapted = wrapper(x).logits
    expected = base(x).logits
    assert (adapted - expected).abs().max() > 1e-3
    with wrapper.disable_adapter():
        torch.testing.assert_close(wrapper(x).logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(wrapper(x).logits, adapted, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="inside the block"):
        with wrapper.disable_adapter():
            raise RuntimeError("inside the block")
    torch.testing.assert_close(wrapper(x).logits, adapted, rtol=0, atol=0)
    merge_all(wrapper)
    with pytest.raises(ValueError, match="merged"):
        with wrapper.disable_adapter():
            pass
    unmerge_all(wrapper)
    torch.testing.assert_close(wrapper(x).logits, adapted, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_peft_merge_and_unload_gives_a_stock_model_with_merged_experts(family):
    wrapper, base = _wrapped(family)
    model = wrapper.base_model
    x = _tokens()
    adapted = wrapper(x).logits
    # W + ΔW expert by expert (float64), from the factors; and the base Parameter objects, which stay
    expected = dict(_reference_model(base, model, FAMILIES[family][1]).named_parameters())
    layers = _expert_layers(model)
    originals = {name: layer._owner[0].original for name, layer in layers.items()}
    plain = wrapper.merge_and_unload()
    _assert_stock(plain, family)
    params = dict(plain.named_parameters())
    for name, original in originals.items():
        assert params[name] is original  # the same object: optimizer references to it stay valid
        torch.testing.assert_close(params[name], expected[name], rtol=1e-6, atol=1e-6)
        assert not torch.equal(params[name], dict(base.named_parameters())[name])
    torch.testing.assert_close(plain(x).logits, adapted, rtol=1e-5, atol=1e-5)
    stock = _model(family, seed=7)
    stock.load_state_dict(plain.state_dict(), strict=True)
    torch.testing.assert_close(stock(x).logits, adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="spent"):
        wrapper.unload()
    layer = next(iter(layers.values()))  # detached: merging it again must not write into the plain model
    with pytest.raises(RuntimeError, match="not attached"):
        layer.merge()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("merged", [False, True])
def test_peft_unload_gives_the_stock_model_with_the_original_weights(family, merged):
    wrapper, base = _wrapped(family)
    if merged:  # merged layers are unmerged first: W comes back bit for bit
        merge_all(wrapper)
    plain = wrapper.unload()
    _assert_stock(plain, family)
    state = base.state_dict()
    assert all(torch.equal(t, state[n]) for n, t in plain.state_dict().items())
    x = _tokens()
    torch.testing.assert_close(plain(x).logits, base(x).logits, rtol=0, atol=0)


def test_expert_detach_keep_merged_needs_a_merged_layer():
    from subspace_ops.nn import experts as experts_nn

    model = _model("mixtral")
    methods.apply(model, "lora", rank=2, target_parameters=EXPERTS, targets=())
    experts = model.model.layers[0].mlp.experts
    with pytest.raises(ValueError, match="keep_merged=True.*not a merged LowRankExperts"):
        experts_nn.detach(experts, "gate_up_proj", keep_merged=True)
    assert torch.nn.utils.parametrize.is_parametrized(experts, "gate_up_proj")  # refused before any change


def test_detach_puts_the_parameter_back_in_its_place():
    """Adapting one of two expert parameters and taking the adapter out again keeps the module's parameter
    order (state_dict keys, optimizer groups built from parameters()): torch's remove_parametrizations
    would register the parameter again at the end."""
    from subspace_ops.nn import experts as experts_nn

    model = _model("mixtral")
    names = [n for n, _ in model.named_parameters()]
    methods.apply(model, "lora", rank=2, target_parameters=("experts.gate_up_proj",), targets=())
    for layer in model.model.layers:
        experts_nn.detach(layer.mlp.experts, "gate_up_proj")
    assert [n for n, _ in model.named_parameters()] == names


def test_peft_save_and_from_pretrained_round_trip(tmp_path):
    import json

    from safetensors import safe_open

    from subspace_ops.checkpoint import AdapterLoadError
    from subspace_ops.peft_model import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SubspacePeftModel

    wrapper, _ = _wrapped("qwen3_moe")
    x = _tokens()
    expected = wrapper(x).logits
    wrapper.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert saved["target_parameters"] == list(EXPERTS)
    with safe_open(str(tmp_path / ADAPTER_WEIGHTS), "pt") as f:
        keys = set(f.keys())
    adapted = (name.rsplit(".", 1) for name in _expert_layers(wrapper.base_model))
    factors = {f"{owner}.parametrizations.{p}.0.{f}" for owner, p in adapted for f in ("lora_a", "lora_b")}
    assert factors <= keys and not any(k.endswith(".original") for k in keys)  # factors only, no base tensor
    loaded = SubspacePeftModel.from_pretrained(_model("qwen3_moe"), tmp_path)
    assert loaded.peft_config["default"] == wrapper.peft_config["default"]
    torch.testing.assert_close(loaded(x).logits, expected, rtol=0, atol=0)
    with loaded.disable_adapter():  # the loaded wrapper knows its expert adapters too
        torch.testing.assert_close(loaded(x).logits, _model("qwen3_moe")(x).logits, rtol=0, atol=0)

    other = _model("qwen3_moe", seed=5)  # other base weights: refused, and the base model is as it was
    names, before = list(other.state_dict()), other(x).logits
    with pytest.raises(AdapterLoadError):
        SubspacePeftModel.from_pretrained(other, tmp_path)
    _assert_stock(other, "qwen3_moe")
    assert list(other.state_dict()) == names
    torch.testing.assert_close(other(x).logits, before, rtol=0, atol=0)


def test_peft_several_adapters_switch_the_expert_factors(tmp_path):
    from subspace_ops.peft_model import SubspacePeftModel

    wrapper, base = _wrapped("mixtral", targets_linears=False)
    x = _tokens()
    first = wrapper(x).logits
    wrapper.add_adapter("other", wrapper.peft_config["default"])
    wrapper.set_adapter("other")  # starts from the initial factors: ΔW = 0, the base model exactly
    torch.testing.assert_close(wrapper(x).logits, base(x).logits, rtol=0, atol=0)
    _perturb(wrapper, seed=9)
    second = wrapper(x).logits
    assert (second - first).abs().max() > 1e-3
    merge_all(wrapper)  # merged weights hold this adapter's ΔW: switching is refused, nothing changes
    with pytest.raises(ValueError, match="set_adapter: .* merged"):
        wrapper.set_adapter("default")
    assert wrapper.active_adapter == "other"
    unmerge_all(wrapper)
    wrapper.set_adapter("default")
    torch.testing.assert_close(wrapper(x).logits, first, rtol=0, atol=0)
    wrapper.save_pretrained(tmp_path)
    loaded = SubspacePeftModel.from_pretrained(_model("mixtral"), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    torch.testing.assert_close(loaded(x).logits, first, rtol=0, atol=0)
    loaded.set_adapter("other")
    torch.testing.assert_close(loaded(x).logits, second, rtol=0, atol=0)
    wrapper.delete_adapter("other")
    assert list(wrapper.peft_config) == ["default"]
    torch.testing.assert_close(wrapper.merge_and_unload()(x).logits, first, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["ia3", "ssb"])
def test_scaling_methods_name_the_experts_when_the_ffn_targets_match_nothing(method):
    """(IA)³/SSB scale the FFN output by default; on an MoE model that FFN is 3-D expert parameters, and the
    error says so and how to go on (ff_targets=()), which then adapts the attention alone."""
    model = _model("mixtral")
    with pytest.raises(ValueError, match=r"3-D parameters \(e\.g\. model\.layers\.0\.mlp\.experts\..*ff_targets=\(\)"):
        methods.apply(model, method)
    _, report = methods.apply(model, method, ff_targets=())
    assert report.layers and all("experts" not in name for name in report.layers)
