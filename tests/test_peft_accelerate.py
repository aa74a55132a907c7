"""subspace_ops.peft.accelerate: PEFT's own IA3 / LoRA Linear layers on the fused ops, same results as PEFT."""

from __future__ import annotations

import copy
import importlib
import pickle
import re
import warnings

import pytest
import torch
from torch import nn

from subspace_ops.ops.rescaled_linear import choose_path
from subspace_ops.testing import check_close

from conftest import backend_device

peft = pytest.importorskip("peft")
sop_peft = pytest.importorskip("subspace_ops.peft")

pytestmark = pytest.mark.integration


class Tiny(nn.Module):
    """Three Linear layers (with and without bias) and an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 10, bias=False)
        self.fc3 = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))


def _perturb(model: nn.Module) -> None:
    """Move trainable parameters off their init (LoRA's B starts at zero, IA3's scales at one)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))


def _peft_model(config, seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = peft.get_peft_model(Tiny().to(dtype), config, **kw)
    _perturb(model)
    return model


def _ia3(**kw):
    kw.setdefault("target_modules", ["fc1", "fc2", "fc3"])
    kw.setdefault("feedforward_modules", ["fc2"])
    return peft.IA3Config(**kw)


def _lora(**kw):
    kw.setdefault("target_modules", ["fc1", "fc2", "fc3"])
    return peft.LoraConfig(r=3, lora_alpha=5, **kw)


def _adalora(**kw):
    kw.setdefault("target_modules", ["fc1", "fc2", "fc3"])
    return peft.AdaLoraConfig(init_r=3, target_r=2, lora_alpha=5, total_step=10, **kw)


def _run(model: nn.Module, x: torch.Tensor, seed: int = 7):
    """Output, input gradient and trainable-parameter gradients for a fixed upstream gradient."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks for both models
    y = model(x)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).reshape(y.shape))
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


def _assert_same(ours, theirs, rtol=1e-5, atol=1e-5):
    (y, gx, grads), (y_ref, gx_ref, grads_ref) = ours, theirs
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(gx, gx_ref, rtol=rtol, atol=atol)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=rtol, atol=atol, msg=name)


def _count_fused_calls(monkeypatch) -> dict[str, int]:
    """Count calls of the fused ops made by the accelerated layers."""
    rescaled_module = importlib.import_module("subspace_ops.ops.rescaled_linear")  # the module, not the function
    lowrank_module = importlib.import_module("subspace_ops.ops.lowrank_linear")

    counts = {"ia3": 0, "lora": 0}

    def counting(kind, fn):
        def wrapper(*args, **kwargs):
            counts[kind] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(rescaled_module, "rescaled_linear", counting("ia3", rescaled_module.rescaled_linear))
    lora_op = counting("lora", lowrank_module.lowrank_linear)
    monkeypatch.setattr(lowrank_module, "lowrank_linear", lora_op)
    monkeypatch.setattr(importlib.import_module("subspace_ops.nn.lowrank"), "lowrank_linear", lora_op)  # DoRA's
    return counts


X = lambda: torch.randn(4, 3, 6)  # noqa: E731


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_ia3_matches_peft(backend, train, monkeypatch):
    reference = _peft_model(_ia3()).train(train).to(backend_device(backend))
    model = copy.deepcopy(reference)
    report = sop_peft.accelerate(model, backend=backend)
    assert report.accelerated == {
        "base_model.model.fc1": "ia3", "base_model.model.fc2": "ia3", "base_model.model.fc3": "ia3"
    } and not report.skipped
    assert model.base_model.model.fc2.is_feedforward and not model.base_model.model.fc1.is_feedforward
    counts = _count_fused_calls(monkeypatch)
    x = X().to(backend_device(backend))
    _assert_same(_run(model, x), _run(reference, x))
    assert counts["ia3"] == 3


@pytest.mark.parametrize("options", [{}, {"lora_dropout": 0.25}, {"use_rslora": True, "lora_dropout": 0.1},
                                     {"lora_bias": True, "target_modules": ["fc1", "fc3"]}],
                         ids=["plain", "dropout", "rslora-dropout", "lora-bias"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_lora_matches_peft(backend, options, train, monkeypatch):
    pytest.importorskip("subspace_ops.ops.lowrank_linear")
    reference = _peft_model(_lora(**options)).train(train).to(backend_device(backend))
    model = copy.deepcopy(reference)
    report = sop_peft.accelerate(model, backend=backend)
    layers = len(options.get("target_modules", "123"))
    assert set(report.accelerated.values()) == {"lora"} and len(report.accelerated) == layers and not report.skipped
    counts = _count_fused_calls(monkeypatch)
    x = X().to(backend_device(backend))
    ours = _run(model, x)
    assert any(n.endswith("lora_B.default.bias") for n in ours[2]) == ("lora_bias" in options)
    _assert_same(ours, _run(reference, x))
    assert counts["lora"] == layers


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_dora_matches_peft(backend, dropout, train, monkeypatch):
    """PEFT's DoRA: c ⊙ (x Wᵀ + s·x Bᵀ Aᵀ) + b with c = m / ‖W + sBA‖ (norm detached) on the fused op:
    PEFT's outputs and gradients (the magnitude's included). With dropout in a training call PEFT
    computes (c - 1)·W·dropout(x), which the fused op does not: that call runs PEFT's forward, warned."""
    reference = _peft_model(_lora(use_dora=True, lora_dropout=dropout)).train(train).to(backend_device(backend))
    model = copy.deepcopy(reference)
    report = sop_peft.accelerate(model, backend=backend)
    assert report.accelerated == {f"base_model.model.fc{i}": "dora" for i in (1, 2, 3)} and not report.skipped
    assert re.search(r"fused +dora +base_model\.model\.fc1", str(report))
    counts = _count_fused_calls(monkeypatch)
    monkeypatch.setattr(sop_peft, "_WARNED", set())
    x = X().to(backend_device(backend))
    falls_back = train and dropout > 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = _run(model, x)
    assert any("is DoRA with dropout, in training" in str(w.message) for w in caught) == falls_back
    assert counts["lora"] == (0 if falls_back else 3)
    assert any(n.endswith("lora_magnitude_vector.default.weight") for n in ours[2])
    _assert_same(ours, _run(reference, x))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_one_dimensional_input_has_peft_shape(backend, use_dora, monkeypatch):
    """A 1-D input x [in]: PEFT's LoRA layer returns [out], its DoRA layer [1, out] (the magnitude
    factor is viewed as [1, out] and broadcasts against the [out] base result). The fused layer returns
    exactly PEFT's shape and values, and PEFT's gradients, on the fused op."""
    reference = _peft_model(_lora(use_dora=use_dora)).to(backend_device(backend))
    model = copy.deepcopy(reference)
    sop_peft.accelerate(model, backend=backend)
    counts = _count_fused_calls(monkeypatch)
    x = torch.randn(6, device=backend_device(backend))
    ours = _run(model.base_model.model.fc1, x)
    theirs = _run(reference.base_model.model.fc1, x)
    assert counts["lora"] == 1
    assert ours[0].shape == theirs[0].shape == ((1, 12) if use_dora else (12,))
    _assert_same(ours, theirs)


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_adalora_matches_peft(backend, dropout, train, monkeypatch):
    """PEFT's AdaLoRA SVDLinear, base(x) + dropout(x) (Q ⊙ Λ)ᵀ Pᵀ · α / (ranknum + 1e-5), as lowrank_linear
    with G = diag(Λ)·α / (ranknum + 1e-5): PEFT's outputs and gradients, with one singular value pruned
    (Λ_i = 0, as the rank allocator masks it) and a reduced ranknum. restore() gives PEFT's class back."""
    from peft.tuners.adalora.layer import SVDLinear

    reference = _peft_model(_adalora(lora_dropout=dropout)).train(train).to(backend_device(backend))
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, SVDLinear):
                m.lora_E["default"][1] = 0.0
                m.ranknum["default"].fill_(2.0)
    model = copy.deepcopy(reference)
    report = sop_peft.accelerate(model, backend=backend)
    assert report.accelerated == {f"base_model.model.fc{i}": "adalora" for i in (1, 2, 3)} and not report.skipped
    counts = _count_fused_calls(monkeypatch)
    x = X().to(backend_device(backend))
    ours = _run(model, x)
    assert counts["lora"] == 3
    assert {n.rsplit(".", 2)[-2] for n in ours[2] if "lora_" in n} == {"lora_A", "lora_B", "lora_E"}
    _assert_same(ours, _run(reference, x))
    assert sop_peft.restore(model) == 3 and type(model.base_model.model.fc1) is SVDLinear


@pytest.mark.parametrize("config", ["ia3", "lora", "dora"])
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-weights", "autocast-bf16"])
def test_bf16_within_dtype_tolerance(config, autocast, monkeypatch):
    """bf16 base (PEFT keeps the adapters in fp32) or fp32 under bf16 autocast: ours vs the fp64 truth is at
    most ~2x PEFT-in-bf16's own error (the suite's tolerance rule)."""
    if config == "lora":
        pytest.importorskip("subspace_ops.ops.lowrank_linear")
    make = {"ia3": _ia3, "lora": _lora, "dora": lambda: _lora(use_dora=True)}[config]
    dtype = torch.float32 if autocast else torch.bfloat16
    reference = _peft_model(make(), dtype=dtype).eval()
    if not autocast:
        assert reference.base_model.model.fc1.base_layer.weight.dtype == torch.bfloat16
    truth_model = copy.deepcopy(reference).double()
    model = copy.deepcopy(reference)
    sop_peft.accelerate(model)
    x = X()
    truth = _run(truth_model, x.double())
    counts = _count_fused_calls(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = _run(model, x.to(dtype))
        theirs = _run(reference, x.to(dtype))
    assert counts["ia3" if config == "ia3" else "lora"] == 3
    check_close("y", ours[0], truth[0], theirs[0])
    check_close("grad x", ours[1], truth[1], theirs[1])
    for name in truth[2]:
        # fp32 adapter parameters get gradients computed in bf16 (as under autocast): bf16 precision.
        check_close(name, ours[2][name].to(torch.bfloat16), truth[2][name], theirs[2][name].to(torch.bfloat16))


def _forward_hook_model():
    model = _peft_model(_lora())
    model.base_model.model.fc2.base_layer.register_forward_hook(lambda *a: None)
    return model


def _two_active_adapters():
    model = _peft_model(_lora())
    model.add_adapter("other", _lora())
    model.base_model.set_adapter(["default", "other"])
    return model


def _merged():
    model = _peft_model(_ia3(target_modules=["fc1", "fc3"], feedforward_modules=[]))
    model.merge_adapter()
    return model


def _conv1d(config):
    """fc1 (Linear) -> c_fc (GPT-2's transformers Conv1D, weight [in, out]) -> fc3, ``config`` on all three."""
    transformers = pytest.importorskip("transformers")

    class WithConv1D(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, 12)
            self.c_fc = transformers.pytorch_utils.Conv1D(10, 12)
            self.fc3 = nn.Linear(10, 5)

        def forward(self, x):
            return self.fc3(torch.tanh(self.c_fc(torch.relu(self.fc1(x)))))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that fan_in_fan_out does not fit the Linear layers
        model = peft.get_peft_model(WithConv1D(), config)
    _perturb(model)
    return model


def _wrong_fan_in_fan_out():
    """A Conv1D base with fan_in_fan_out=False: PEFT's own layer is then wrong too; left to PEFT."""
    model = _conv1d(peft.LoraConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=True))
    model.base_model.model.c_fc.fan_in_fan_out = False
    return model


def _quiet(build):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "aLoRA is currently only supported for CAUSAL_LM task"
        return build()


# name -> (PEFT model builder, expected skipped layer -> reason pattern)
UNSUPPORTED = {
    "alora": (lambda: _quiet(lambda: _peft_model(_lora(alora_invocation_tokens=[1, 2], target_modules=["fc1"]))),
              {"fc1": "variant \\(ALoraLinearVariant\\)"}),
    "embedding": (lambda: _peft_model(_lora(target_modules=["emb", "fc1"])),
                  {"emb": "not PEFT's IA3, LoRA or AdaLoRA Linear"}),
    "conv1d-fan-in-fan-out-off": (_wrong_fan_in_fan_out, {"c_fc": "fan_in_fan_out=False on a Conv1D"}),
}


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_conv1d_base_layers_match_peft(backend, kind, monkeypatch):
    """GPT-2-style bases (transformers Conv1D, fan_in_fan_out=True) run on the fused ops, their [in, out]
    weight read transposed: same outputs and gradients as PEFT, dropout included (training mode; DoRA
    without dropout)."""
    if kind in ("lora", "dora"):
        config = peft.LoraConfig(r=3, lora_alpha=5, lora_dropout=0.25 if kind == "lora" else 0.0,
                                 target_modules=["fc1", "c_fc", "fc3"], fan_in_fan_out=True, use_dora=kind == "dora")
    else:
        config = peft.IA3Config(target_modules=["fc1", "c_fc", "fc3"], feedforward_modules=["c_fc"],
                                fan_in_fan_out=True)
    reference = _conv1d(config).train().to(backend_device(backend))
    assert reference.base_model.model.c_fc.fan_in_fan_out and not reference.base_model.model.fc1.fan_in_fan_out
    model = copy.deepcopy(reference)
    report = sop_peft.accelerate(model, backend=backend)
    assert len(report.accelerated) == 3 and not report.skipped, str(report)
    assert set(report.accelerated.values()) == {kind}
    counts = _count_fused_calls(monkeypatch)
    x = X().to(backend_device(backend))
    _assert_same(_run(model, x), _run(reference, x))
    assert counts["ia3" if kind == "ia3" else "lora"] == 3


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_layers_are_left_to_peft_and_reported(case):
    make, expected = UNSUPPORTED[case]
    reference = make().eval()
    model = copy.deepcopy(reference)
    report = sop_peft.accelerate(model)
    for short, pattern in expected.items():
        name = f"base_model.model.{short}"
        assert name in report.skipped, str(report)
        assert name not in report.accelerated
        assert re.search(pattern, report.skipped[name]), report.skipped[name]
        assert type(model.get_submodule(name)) is type(reference.get_submodule(name))  # left as it is
        assert name in str(report)
    x = torch.randint(0, 11, (2, 3)) if case == "embedding" else X()
    if case == "embedding":
        run = lambda m: m.base_model.model.fc1(m.base_model.model.emb(x))  # noqa: E731
        torch.testing.assert_close(run(model), run(reference))
    else:
        _assert_same(_run(model, x), _run(reference, x))


# name -> (PEFT model in a state the fused path does not take now, the layer, the reason, how the state ends)
PASSING_STATES = {
    "hooked-base": (_forward_hook_model, "fc2", "has hooks",
                    lambda m: m.base_model.model.fc2.base_layer._forward_hooks.clear()),
    "two-active": (_two_active_adapters, "fc1", "2 active adapters", lambda m: m.base_model.set_adapter("default")),
    "merged": (_merged, "fc1", "merged into the base weight", lambda m: m.unmerge_adapter()),
}


@pytest.mark.parametrize("case", sorted(PASSING_STATES))
def test_state_at_accelerate_time_does_not_keep_a_layer_off_the_fused_ops(case, monkeypatch):
    """A layer hooked, merged or with two active adapters when accelerate() runs is accelerated: its
    calls run PEFT's forward while that state lasts and the fused op after (it used to stay PEFT's for
    good, silently)."""
    make, short, pattern, end_state = PASSING_STATES[case]
    reference = make().eval()
    model = copy.deepcopy(reference)
    report = sop_peft.accelerate(model)
    name = f"base_model.model.{short}"
    assert name in report.accelerated and not report.skipped, str(report)
    assert re.search(pattern, sop_peft.unsupported_reason(model.get_submodule(name)))
    counts = _count_fused_calls(monkeypatch)
    monkeypatch.setattr(sop_peft, "_WARNED", set())
    x = X()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's RuntimeWarning (not for merged adapters)
        _assert_same(_run(model, x), _run(reference, x))
    kind = "ia3" if case == "merged" else "lora"
    fused_before = counts[kind]
    end_state(model), end_state(reference)
    assert sop_peft.unsupported_reason(model.get_submodule(name)) is None
    _assert_same(_run(model, x), _run(reference, x))
    assert counts[kind] > fused_before


@pytest.mark.parametrize("module", ["lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector"])
def test_hooks_on_the_adapters_own_modules_run_peft_forward(module, monkeypatch):
    """The fused op reads lora_A's and lora_B's weights (and DoRA's magnitude) without calling those
    modules: a hook on one of them (activation capture, per-sample gradients) must see its call."""
    dora = module == "lora_magnitude_vector"
    reference = _peft_model(_lora(use_dora=dora, lora_dropout=0.0 if dora else 0.1)).eval()
    model = copy.deepcopy(reference)
    sop_peft.accelerate(model)
    counts = _count_fused_calls(monkeypatch)
    monkeypatch.setattr(sop_peft, "_WARNED", set())
    seen = []
    for m in (model, reference):
        getattr(m.base_model.model.fc2, module)["default"].register_forward_hook(lambda *a: seen.append(1))
    x = X()
    with pytest.warns(RuntimeWarning, match=f"runs PEFT's own forward \\(adapter 'default': {module}"):
        _assert_same(_run(model, x), _run(reference, x))
    assert len(seen) == 2 and counts["lora"] == 2  # fc1 and fc3 fused; fc2 PEFT's, its hook called


def test_state_changes_after_accelerate_fall_back_to_peft(monkeypatch):
    """Merging, disabling, DoRA with dropout in training, or adapter_names= run PEFT's forward."""
    pytest.importorskip("subspace_ops.ops.lowrank_linear")
    reference = _peft_model(_lora()).eval()
    model = copy.deepcopy(reference)
    sop_peft.accelerate(model)
    counts = _count_fused_calls(monkeypatch)
    monkeypatch.setattr(sop_peft, "_WARNED", set())  # each fallback reason warns once per process
    x = X()

    with model.disable_adapter(), reference.disable_adapter(), warnings.catch_warnings():
        warnings.simplefilter("error")  # disabled (or merged) adapters: PEFT runs the base layer, no warning
        _assert_same(_run(model, x), _run(reference, x))
    assert counts["lora"] == 0

    for m in (model, reference):
        m.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    assert counts["lora"] == 0
    for m in (model, reference):
        m.unmerge_adapter()

    for m in (model, reference):  # a DoRA adapter (with dropout) added later: fused in eval, PEFT's in training
        torch.manual_seed(3)
        m.add_adapter("dora", _lora(use_dora=True, lora_dropout=0.1))
        _perturb(m)
        m.set_adapter("dora")
    assert sop_peft.unsupported_reason(model.base_model.model.fc1) is None
    _assert_same(_run(model, x), _run(reference, x))
    assert counts["lora"] == 3
    model.train(), reference.train()
    assert sop_peft.unsupported_reason(model.base_model.model.fc1).startswith("adapter 'dora' is DoRA with dropout")
    with pytest.warns(RuntimeWarning, match="runs PEFT's own forward \\(adapter 'dora' is DoRA with dropout"):
        _assert_same(_run(model, x), _run(reference, x))
    assert counts["lora"] == 3
    model.eval(), reference.eval()
    counts["lora"] = 0

    for m in (model, reference):
        m.set_adapter("default")
    names = ["default", "__base__", "__base__", "default"]  # a mixed batch (PEFT refuses DoRA there)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="extra forward arguments"):
        torch.testing.assert_close(model(x, adapter_names=names), reference(x, adapter_names=names))
    assert counts["lora"] == 0
    _assert_same(_run(model, x), _run(reference, x))
    assert counts["lora"] == 3  # back on the fused path


def test_global_module_hooks_see_peft_base_layers(monkeypatch):
    """A global nn.Module hook (a profiler, a debugging tool) registered after accelerate must see
    each base layer's call, as it does under PEFT: the accelerated layers run PEFT's forward while one
    is registered, and the fused op again once it is removed."""
    pytest.importorskip("subspace_ops.ops.lowrank_linear")
    from torch.nn.modules.module import register_module_forward_hook

    reference = _peft_model(_lora()).eval()
    model = copy.deepcopy(reference)
    sop_peft.accelerate(model)
    counts = _count_fused_calls(monkeypatch)
    monkeypatch.setattr(sop_peft, "_WARNED", set())
    base_layers = {id(m.base_layer): n for n, m in model.named_modules() if hasattr(m, "base_layer")}
    assert len(base_layers) == 3
    x, seen = X(), []
    handle = register_module_forward_hook(
        lambda module, *_: seen.append(base_layers[id(module)]) if id(module) in base_layers else None)
    try:
        with pytest.warns(RuntimeWarning, match="global nn.Module hooks"):
            _assert_same(_run(model, x), _run(reference, x))
    finally:
        handle.remove()
    assert sorted(seen) == sorted(base_layers.values()) and counts["lora"] == 0
    _assert_same(_run(model, x), _run(reference, x))
    assert counts["lora"] == 3


def test_restore_state_dict_copy_and_pickle():
    reference = _peft_model(_ia3())
    model = copy.deepcopy(reference)
    keys = list(model.state_dict())
    sop_peft.accelerate(model)
    layer = model.base_model.model.fc1
    assert type(layer).__name__ == "FusedIA3Linear" and isinstance(layer, peft.tuners.ia3.Linear)
    assert "FusedIA3Linear" in repr(model)
    assert list(model.state_dict()) == keys
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone.base_model.model.fc1) is sop_peft.FusedIA3Linear
    assert type(copy.deepcopy(model).base_model.model.fc2) is sop_peft.FusedIA3Linear
    again = sop_peft.accelerate(model)  # idempotent
    assert len(again.accelerated) == 3
    assert sop_peft.restore(model) == 3
    assert type(layer) is peft.tuners.ia3.Linear and not hasattr(layer, "_subspace_ops_backend")
    assert list(model.state_dict()) == keys
    x = X()
    _assert_same(_run(model, x), _run(reference, x), rtol=0, atol=0)  # PEFT's own forward again, bit for bit
    assert sop_peft.restore(model) == 0


@pytest.mark.parametrize("config", ["ia3", "lora"])
def test_save_pretrained_and_from_pretrained(tmp_path, config):
    if config == "lora":
        pytest.importorskip("subspace_ops.ops.lowrank_linear")
    model = _peft_model(_ia3() if config == "ia3" else _lora())
    sop_peft.accelerate(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(X()).square().mean().backward()
        opt.step()
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(Tiny(), tmp_path)
    report = sop_peft.accelerate(loaded)
    assert len(report.accelerated) == 3
    x = X()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("config", ["ia3", "lora"])
def test_accelerated_model_compiles_to_the_fused_ops(config):
    """torch.compile(fullgraph=True) traces the accelerated layers (their checks included) to our registered ops."""
    if config == "lora":
        pytest.importorskip("subspace_ops.ops.lowrank_linear")
    reference = _peft_model(_ia3() if config == "ia3" else _lora()).eval()
    model = copy.deepcopy(reference)
    sop_peft.accelerate(model)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    compiled = torch.compile(model, backend=capture, fullgraph=True)
    x = X()  # 12 tokens
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference(x))
    assert len(graphs) == 1
    if config == "lora":
        assert graphs[0].count("subspace_ops.lowrank_linear") == 3
        return
    # float32 (IA)³ with a gradient takes rescaled_linear's separable path (torch ops, no fused op);
    # without one, the fused op where choose_path says so (the own float32 GEMMs beyond 8 tokens).
    modulated = choose_path(False, 1, torch.float32, tokens=12, backend="cpu", needs_grad=False) == "modulated"
    assert graphs[0].count("subspace_ops.rescaled_linear") == (3 if modulated else 0)
    assert graphs[0].count("matmul") == (0 if modulated else 3)
    torch.testing.assert_close(compiled(x), reference(x))  # grad mode on: Dynamo traces again
    assert len(graphs) == 2  # the separable path's autograd.Function, traced whole (its matmuls inside)
    assert graphs[1].count("subspace_ops.rescaled_linear") == 0
    assert graphs[1].count("= call_function[target=torch.ops.higher_order.autograd_function_apply]") == 3


@pytest.mark.parametrize("version", ["0.20.1", "0.22.0", "1.0.0", "not-a-version"])
def test_other_peft_versions_are_refused(monkeypatch, version):
    monkeypatch.setattr(peft, "__version__", version)
    model = _peft_model(_ia3())
    with pytest.raises(sop_peft.UnsupportedPeftVersionError, match=r"peft>=0.21.0,<0.22"):
        sop_peft.accelerate(model)
    assert type(model.base_model.model.fc1) is peft.tuners.ia3.Linear


def test_supported_range_includes_the_installed_peft():
    assert sop_peft.check_peft_version() == peft.__version__


def test_nothing_to_accelerate_or_a_bad_backend_changes_nothing():
    with pytest.raises(ValueError, match="no PEFT tuner layers"):
        sop_peft.accelerate(Tiny())
    model = _peft_model(_lora())
    with pytest.raises(ValueError, match="backend"):
        sop_peft.accelerate(model, backend="no-such-backend")
    assert type(model.base_model.model.fc1) is peft.tuners.lora.Linear


def test_roberta_lora_and_ia3_gradients_match(monkeypatch):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("subspace_ops.ops.lowrank_linear")
    config = transformers.RobertaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    ids = torch.randint(0, 50, (2, 9))
    for peft_config in (
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query", "value", "dense"]),
        peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]),
    ):
        torch.manual_seed(0)
        reference = peft.get_peft_model(transformers.RobertaModel(config), peft_config).train()
        _perturb(reference)
        model = copy.deepcopy(reference)
        report = sop_peft.accelerate(model)
        # LoRA: query, value and the three "dense" per layer + the pooler; IA3: key, value, both "output.dense".
        assert len(report.accelerated) == (2 * 5 + 1 if isinstance(peft_config, peft.LoraConfig) else 2 * 4)
        counts = _count_fused_calls(monkeypatch)
        results = []
        for m in (model, reference):
            m.zero_grad()
            torch.manual_seed(1)
            m(ids).last_hidden_state.square().mean().backward()
            results.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
        assert sum(counts.values()) == len(report.accelerated)
        for name in results[1]:
            torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("base", ["linear", "conv1d"])
def test_dora_evaluation_keeps_row_norms_until_the_adapter_changes(base, monkeypatch):
    """Accelerated DoRA layers keep ‖W + sBA‖ between calls without gradients (subspace_ops'
    RowNormKeeper) and recompute it after every change PEFT makes: a training step with fused AdamW
    (which bumps no version counter), merge/unmerge (which write W through .data), loading adapter
    weights, accelerate() after PEFT's own class ran; each output equals PEFT's (GPT-2's Conv1D base:
    the weight read transposed)."""
    lowrank_module = importlib.import_module("subspace_ops.nn.lowrank")
    computed = []
    original = lowrank_module.dora_row_norm
    monkeypatch.setattr(lowrank_module, "dora_row_norm", lambda *a, **k: computed.append(1) or original(*a, **k))
    if base == "linear":
        reference = _peft_model(_lora(use_dora=True))
    else:
        reference = _conv1d(peft.LoraConfig(r=3, lora_alpha=5, target_modules=["fc1", "c_fc", "fc3"],
                                            fan_in_fan_out=True, use_dora=True))
    model = copy.deepcopy(reference)
    assert len(sop_peft.accelerate(model, backend="cpu").accelerated) == 3
    x = torch.randn(1, 6)

    def check(recomputed: bool) -> None:
        computed.clear()
        with torch.no_grad():
            ours = model(x)
        assert bool(computed) == recomputed
        with torch.no_grad():
            torch.testing.assert_close(ours, reference(x), rtol=1e-5, atol=1e-5)

    check(True)
    check(False)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05, fused=True)
                  for m in (model, reference)]
    for m, optimizer in zip((model, reference), optimizers):
        m(torch.randn(5, 6, generator=torch.Generator().manual_seed(3))).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    check(True)
    check(False)
    for m in (model, reference):
        m.merge_adapter()
        m.unmerge_adapter()
    check(True)
    check(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Already unmerged. Nothing to do."
        model.unmerge_adapter()  # whatever it writes goes through .data: the kept norms are dropped
    check(True)
    state = {k: v + 0.1 for k, v in peft.get_peft_model_state_dict(reference).items()}
    for m in (model, reference):
        peft.set_peft_model_state_dict(m, state)
    check(True)
    check(False)
    sop_peft.restore(model)
    with torch.no_grad():
        for m in (model, reference):  # PEFT's class writes W through .data; accelerate() must not trust kept norms
            m.merge_adapter()
            m.unmerge_adapter()
    sop_peft.accelerate(model, backend="cpu")
    check(True)
    if base == "linear":  # (the Conv1D model's class is local to _conv1d: not picklable)
        restored = pickle.loads(pickle.dumps(model))  # kept norms hold weak references: not pickled
        with torch.no_grad():
            torch.testing.assert_close(restored(x), reference(x), rtol=1e-5, atol=1e-5)
