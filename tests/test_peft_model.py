"""subspace_ops.peft_model: the PeftModel-like wrapper (save/load, merge_and_unload, unload, adapters, disable)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import pickle
import re

import pytest
import torch
from torch import nn

from subspace_ops import checkpoint, methods
from subspace_ops.nn import NotMergeableError
from subspace_ops.peft_model import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterNotMergeableError,
    SubspacePeftModel,
    get_peft_model,
)

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.integration

X = torch.randn(2, 3, 32, 32)
ALL = methods.list_methods()
NOT_MERGEABLE = {"coeff": {}, "pa": {}, "adapter": {}, "lora-mpc-n": {"mpc": "n"}}
MERGEABLE = [m for m in ALL if m not in NOT_MERGEABLE] + ["pa-identity"]


def config(method: str, **fields) -> methods.MethodConfig:
    """A registry config on the cpu backend; "pa-identity" / "lora-mpc-n" are variants."""
    name = {"pa-identity": "pa", "lora-mpc-n": "lora"}.get(method, method)
    fields = {**{"pa-identity": {"activation": "identity"}, "lora-mpc-n": {"mpc": "n"}}.get(method, {}), **fields}
    if "backend" in {f.name for f in dataclasses.fields(methods.METHODS[name].config)}:
        fields.setdefault("backend", "cpu")
    return methods.get_config(name, **fields)


def tiny_vit(seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10, **options).eval()


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Pretend training: move every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must not change: modules (identity and type), tensors, flags, attention."""
    return {
        "modules": [(n, type(m), id(m)) for n, m in model.named_modules()],
        "tensors": {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()},
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "training": [m.training for m in model.modules()],
        "attn": getattr(getattr(model, "config", None), "_attn_implementation", None),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["params"] == before["params"]
    assert after["training"] == before["training"] and after["attn"] == before["attn"]
    assert after["tensors"].keys() == before["tensors"].keys()
    changed = [n for n, t in after["tensors"].items() if not torch.equal(t, before["tensors"][n])]
    assert not changed, f"tensors changed: {changed}"


def no_subspace_modules(model: nn.Module) -> bool:
    return not any(type(m).__module__.startswith("subspace_ops") for m in model.modules())


# ---------------------------------------------------------------------------------------------
def test_print_trainable_parameters_in_peft_format(capsys):
    model = get_peft_model(tiny_vit(), ("lora", {"rank": 4, "backend": "cpu"}))
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    trainable, total = model.get_nb_trainable_parameters()
    percent = 100 * trainable / total
    assert line == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", line)
    assert trainable == model.report.trainable_params
    assert total == sum(p.numel() for p in model.parameters())
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    assert model.num_classes == 10  # attributes of the wrapped model
    assert not any(m.training for m in model.base_model.modules())  # new layers take the eval mode too
    assert get_peft_model(tiny_vit(), "lora").peft_config["default"].rank == 8  # a method name works too


def test_refuses_peft_configs_with_a_hint():
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match="peft.get_peft_model"):
        get_peft_model(tiny_vit(), peft.LoraConfig(r=4, target_modules=["qkv"]))


@pytest.mark.parametrize("method", ["lora", "rlrr", "siva", "coeff", "bitfit", "adapter"])
def test_save_and_from_pretrained_round_trip(method, tmp_path):
    peft_model = get_peft_model(tiny_vit(), config(method))
    trainable = peft_model.get_nb_trainable_parameters()[0]
    perturb(peft_model)
    expected = peft_model(X)
    peft_model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    saved = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert saved["method"] == method and saved["subspace_ops_format"] == 1
    # only the adapter (and the head): far smaller than the model
    assert len(checkpoint._read(str(tmp_path / ADAPTER_WEIGHTS))[0]) < len(peft_model.state_dict())

    loaded = SubspacePeftModel.from_pretrained(tiny_vit(), tmp_path)
    assert torch.equal(loaded(X), expected)
    assert loaded.get_nb_trainable_parameters()[0] == 0 and not loaded.training  # PEFT's is_trainable=False
    loaded = SubspacePeftModel.from_pretrained(tiny_vit(), tmp_path, is_trainable=True)
    assert loaded.get_nb_trainable_parameters()[0] == trainable
    assert torch.equal(loaded(X), expected)
    if method == "lora":  # another backend than the saved one (as on another device)
        loaded = SubspacePeftModel.from_pretrained(tiny_vit(), tmp_path, config=config(method, backend="reference"))
        torch.testing.assert_close(loaded(X), expected)


def _corrupt(kind: str, directory) -> None:
    weights, cfg = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
    data = weights.read_bytes()
    if kind == "truncated":
        weights.write_bytes(data[: len(data) - 100])
    elif kind == "flipped-byte":
        weights.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    elif kind == "config-json":
        cfg.write_text(cfg.read_text()[:-20])
    elif kind == "config-unknown-field":
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "rnak": 4}))
    elif kind == "other-method":  # the config says rlrr, the weights are lora's
        cfg.write_text(json.dumps({"subspace_ops_format": 1, **config("rlrr").to_dict()}))
    elif kind == "other-rank":  # same method, other structure
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "rank": 4}))
    elif kind == "missing-weights":
        weights.unlink()


@pytest.mark.parametrize("kind", ["other-base", "truncated", "flipped-byte", "config-json", "config-unknown-field",
                                  "other-method", "other-rank", "missing-weights"])
def test_failed_from_pretrained_leaves_the_base_model_unchanged(kind, tmp_path):
    peft_model = get_peft_model(tiny_vit(), config("lora"))
    perturb(peft_model)
    peft_model.save_pretrained(tmp_path)
    base = tiny_vit(seed=1 if kind == "other-base" else 0)
    base.train()
    _corrupt(kind, tmp_path)
    before = snapshot(base)
    with pytest.raises(checkpoint.AdapterLoadError):
        SubspacePeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)


@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_and_unload(method):
    model = tiny_vit()
    qkv = model.blocks[0].attn.qkv
    peft_model = get_peft_model(model, config(method))
    perturb(peft_model)
    expected = peft_model(X)
    plain = peft_model.merge_and_unload()
    assert plain is model and no_subspace_modules(plain)
    assert plain.blocks[0].attn.qkv is qkv and type(qkv) is nn.Linear  # the original module, merged weights
    assert [type(m) for m in plain.modules()] == [type(m) for m in tiny_vit().modules()]
    assert all(p.requires_grad for p in plain.parameters())  # the flags the model had before
    torch.testing.assert_close(plain(X), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="unloaded"):
        peft_model.set_adapter("default")


def test_merge_and_unload_gives_a_bias_to_a_linear_that_had_none():
    """RLRR's shift merges into the bias; a qkv built without one gets it on the original module."""
    model = tiny_vit(qkv_bias=False)
    qkv = model.blocks[0].attn.qkv
    assert qkv.bias is None
    peft_model = get_peft_model(model, config("rlrr"))
    perturb(peft_model)
    expected = peft_model(X)
    # A warning: the architecture (a config's attention_bias, say) may not declare that bias, and a
    # save_pretrained + from_pretrained of the merged model would drop it.
    with pytest.warns(UserWarning, match=r"gave 2 bias-free linear layer\(s\) a bias .* would drop them"):
        plain = peft_model.merge_and_unload()
    assert plain.blocks[0].attn.qkv is qkv and qkv.bias is not None
    torch.testing.assert_close(plain(X), expected, rtol=1e-4, atol=1e-5)


def test_safe_merge_with_non_finite_weights_changes_nothing():
    """safe_merge=True: a merge that would write inf/NaN is undone before the error."""
    peft_model = get_peft_model(tiny_vit(), config("rlrr"))
    perturb(peft_model)
    with torch.no_grad():
        peft_model.base_model.blocks[1].mlp.fc1.s_l[0] = float("inf")
    before = snapshot(peft_model.base_model)
    with pytest.raises(ValueError, match="safe_merge: non-finite"):
        peft_model.merge_and_unload(safe_merge=True)
    assert_unchanged(peft_model.base_model, before)
    assert not any(getattr(m, "merged", False) for m in peft_model.base_model.modules())


@pytest.mark.parametrize("method", list(NOT_MERGEABLE))
def test_merge_and_unload_refuses_non_mergeable_methods(method):
    peft_model = get_peft_model(tiny_vit(), config(method))
    perturb(peft_model)
    expected = peft_model(X)
    before = snapshot(peft_model.base_model)
    with pytest.raises(AdapterNotMergeableError, match="not mergeable") as info:
        peft_model.merge_and_unload()
    assert isinstance(info.value, ValueError) and isinstance(info.value, NotMergeableError)
    assert_unchanged(peft_model.base_model, before)
    assert torch.equal(peft_model(X), expected)


@pytest.mark.parametrize("method", ALL)
def test_unload_gives_the_plain_model_with_the_trained_head(method):
    model = tiny_vit()
    peft_model = get_peft_model(model, config(method))
    perturb(peft_model)
    plain = peft_model.unload()
    fresh = tiny_vit()
    assert plain is model and no_subspace_modules(plain)
    assert [(n, type(m)) for n, m in plain.named_modules()] == [(n, type(m)) for n, m in fresh.named_modules()]
    trained = set(peft_model._adapter_names)  # what the method trained in the base model (head, BitFit biases)
    for name, t in plain.state_dict().items():
        if name not in trained:
            assert torch.equal(t, fresh.state_dict()[name]), name
    fresh.load_state_dict(plain.state_dict())
    assert torch.equal(plain(X), fresh(X))
    assert all(p.requires_grad for p in plain.parameters())


@pytest.mark.parametrize("method", ALL)
def test_disable_adapter_runs_the_base_model(method):
    expected = tiny_vit()(X)
    peft_model = get_peft_model(tiny_vit(), config(method))
    perturb(peft_model)
    adapted = peft_model(X)
    assert not torch.allclose(adapted, expected)
    params = [(n, id(p)) for n, p in peft_model.named_parameters()]
    with peft_model.disable_adapter():
        assert torch.equal(peft_model(X), expected)  # bit for bit: the base modules and the base head
        assert no_subspace_modules(peft_model.base_model)
        with pytest.raises(RuntimeError, match="disable_adapter"):
            peft_model.set_adapter("default")
    assert torch.equal(peft_model(X), adapted)
    assert [(n, id(p)) for n, p in peft_model.named_parameters()] == params


def test_disable_adapter_restores_the_model_when_the_body_raises():
    peft_model = get_peft_model(tiny_vit(), config("rlrr"))
    perturb(peft_model)
    expected = peft_model(X)
    before = snapshot(peft_model)
    with pytest.raises(KeyError):
        with peft_model.disable_adapter():
            raise KeyError("boom")
    assert_unchanged(peft_model, before)
    assert torch.equal(peft_model(X), expected)


def test_disable_adapter_refuses_merged_layers():
    from subspace_ops.adapters import merge_all, unmerge_all

    peft_model = get_peft_model(tiny_vit(), config("lora"))
    merge_all(peft_model)
    with pytest.raises(ValueError, match="merged"):
        with peft_model.disable_adapter():
            pass
    unmerge_all(peft_model)


def test_two_adapters_switch_save_and_load(tmp_path):
    peft_model = get_peft_model(tiny_vit(), config("lora"))
    initial = peft_model(X)
    params = [id(p) for p in peft_model.parameters()]
    perturb(peft_model, seed=1)
    out_a = peft_model(X)
    peft_model.add_adapter("b", config("lora"))
    assert peft_model.active_adapter == "default"
    peft_model.set_adapter("b")
    assert torch.equal(peft_model(X), initial)  # a new adapter starts at the first one's initial values
    perturb(peft_model, seed=2)
    out_b = peft_model(X)
    assert not torch.allclose(out_a, out_b)
    peft_model.set_adapter("default")
    assert torch.equal(peft_model(X), out_a)
    peft_model.set_adapter("b")
    assert torch.equal(peft_model(X), out_b)
    assert [id(p) for p in peft_model.parameters()] == params  # swapped by state: same Parameter objects

    with pytest.raises(ValueError, match="same method and config"):
        peft_model.add_adapter("c", config("lora", rank=4))
    with pytest.raises(ValueError, match="same method and config"):
        peft_model.add_adapter("c", config("rlrr"))
    with pytest.raises(ValueError, match="already exists"):
        peft_model.add_adapter("b", config("lora"))
    with pytest.raises(ValueError, match="active adapter"):
        peft_model.delete_adapter("b")
    with pytest.raises(ValueError, match="unknown adapter"):
        peft_model.set_adapter("nope")

    peft_model.save_pretrained(tmp_path)  # default in tmp_path, b in tmp_path/b (PEFT's layout)
    assert (tmp_path / ADAPTER_WEIGHTS).exists() and (tmp_path / "b" / ADAPTER_WEIGHTS).exists()
    assert peft_model.active_adapter == "b" and torch.equal(peft_model(X), out_b)
    loaded = SubspacePeftModel.from_pretrained(tiny_vit(), tmp_path)
    loaded.load_adapter(tmp_path / "b", "b")
    assert loaded.active_adapter == "default" and torch.equal(loaded(X), out_a)
    loaded.set_adapter("b")
    assert torch.equal(loaded(X), out_b)

    # a failed load_adapter changes nothing
    other = get_peft_model(tiny_vit(), config("lora", rank=4))
    other.save_pretrained(tmp_path / "rank4")
    with pytest.raises(ValueError, match="same method and config"):
        loaded.load_adapter(tmp_path / "rank4", "c")
    (tmp_path / "b" / ADAPTER_WEIGHTS).write_bytes((tmp_path / "b" / ADAPTER_WEIGHTS).read_bytes()[:200])
    with pytest.raises(checkpoint.AdapterLoadError):
        loaded.load_adapter(tmp_path / "b", "c")
    assert list(loaded.peft_config) == ["default", "b"] and torch.equal(loaded(X), out_b)

    peft_model.set_adapter("default")
    peft_model.delete_adapter("b")
    assert list(peft_model.peft_config) == ["default"] and torch.equal(peft_model(X), out_a)


# ---------------------------------------------------------------------------------------------
# transformers: RobertaForSequenceClassification (forward kwargs, attention-registry head mixing)
def tiny_roberta(seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
                                     num_labels=3)
    return transformers.RobertaForSequenceClassification(cfg).eval()


IDS = torch.randint(3, 50, (2, 9))
MASK = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])


def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS, attention_mask=MASK).logits


def test_roberta_lora_round_trip_adapters_disable_and_merge(tmp_path):
    base_logits = logits(tiny_roberta())
    peft_model = get_peft_model(tiny_roberta(), ("lora", {"backend": "cpu"}))
    assert "classifier.out_proj.weight" in peft_model._adapter_names  # the task head is trained and saved
    perturb(peft_model, seed=1)
    out_a = logits(peft_model)
    assert peft_model.config.num_labels == 3  # attributes of the wrapped model
    peft_model.add_adapter("b", ("lora", {"backend": "cpu"}))
    peft_model.set_adapter("b")
    perturb(peft_model, seed=2)
    out_b = logits(peft_model)
    peft_model.set_adapter("default")
    assert torch.equal(logits(peft_model), out_a)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model), base_logits)
    assert torch.equal(logits(peft_model), out_a)

    peft_model.save_pretrained(tmp_path)
    loaded = SubspacePeftModel.from_pretrained(tiny_roberta(), tmp_path)
    assert torch.equal(logits(loaded), out_a)
    loaded.load_adapter(tmp_path / "b", "b")
    loaded.set_adapter("b")
    assert torch.equal(logits(loaded), out_b)
    merged = loaded.merge_and_unload()
    assert no_subspace_modules(merged)
    torch.testing.assert_close(logits(merged), out_b, rtol=1e-4, atol=1e-5)


def test_roberta_coeff_disable_unload_and_failed_load(tmp_path):
    base_logits = logits(tiny_roberta())
    peft_model = get_peft_model(tiny_roberta(), ("coeff", {"backend": "cpu", "trainable": ()}))
    assert peft_model.config._attn_implementation == "subspace_coeff"
    perturb(peft_model)
    adapted = logits(peft_model)
    assert not torch.allclose(adapted, base_logits)
    with peft_model.disable_adapter():  # the original attention implementation, not α = 0
        assert peft_model.config._attn_implementation == "sdpa"
        assert torch.equal(logits(peft_model), base_logits)
    assert peft_model.config._attn_implementation == "subspace_coeff" and torch.equal(logits(peft_model), adapted)
    peft_model.save_pretrained(tmp_path)

    other = tiny_roberta(seed=1)  # other base weights: refused, attention implementation and modules restored
    before = snapshot(other)
    with pytest.raises(checkpoint.AdapterLoadError, match="differs from the base weights"):
        SubspacePeftModel.from_pretrained(other, tmp_path)
    assert_unchanged(other, before)
    assert not hasattr(other, "_subspace_previous_attn")

    with pytest.raises(AdapterNotMergeableError):
        peft_model.merge_and_unload()
    plain = peft_model.unload()
    assert plain.config._attn_implementation == "sdpa" and no_subspace_modules(plain)
    assert torch.equal(logits(plain), base_logits)


# ---------------------------------------------------------------------------------------------
# HF Trainer with its default arguments (it inspects forward's signature: the wrapper shows the wrapped one)
def tiny_bert(seed: int = 0, cls: str = "BertForSequenceClassification") -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3,
                                     attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    return getattr(transformers, cls)(config)


def tiny_llama(seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32))


def classification_rows(n: int = 8) -> list[dict]:
    """What a datasets table gives Trainer, an unused column ("idx") included."""
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(0, 64, (8,), generator=g), "labels": torch.tensor(i % 3), "idx": i}
            for i in range(n)]


def trainer_for(model: nn.Module, rows: list[dict], out, **args):
    """A Trainer with TrainingArguments' defaults except what a tiny CPU run needs (and ``args``)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    callbacks = args.pop("callbacks", None)
    args = {"max_steps": 2, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 4, **args}
    targs = transformers.TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], disable_tqdm=True,
                                           save_strategy=args.pop("save_strategy", "no"), **args)
    return transformers.Trainer(model=model, args=targs, train_dataset=rows, eval_dataset=rows, callbacks=callbacks)


def mean_loss(model: nn.Module, batches: list[dict]) -> float:
    """The model's own loss averaged over eval batches of 4: what Trainer's eval_loss must be."""
    with torch.no_grad():
        losses = [model(**{k: torch.stack([r[k] for r in batches[i:i + 4]]) for k in ("input_ids", "labels")}).loss
                  for i in range(0, len(batches), 4)]
    return torch.stack(losses).mean().item()


def test_wrapper_forward_shows_the_wrapped_models_signature():
    transformers = pytest.importorskip("transformers")
    from transformers.utils import can_return_loss, find_labels

    for cls in ("BertForSequenceClassification", "BertForQuestionAnswering", "BertForPreTraining"):
        base = tiny_bert(cls=cls)
        expected = inspect.signature(type(base).forward)
        labels = find_labels(type(base))
        wrapper = get_peft_model(base, ("lora", {"backend": "cpu"}))
        assert isinstance(wrapper, SubspacePeftModel) and type(wrapper).__name__ == f"SubspacePeftModel[{cls}]"
        assert inspect.signature(wrapper.forward) == inspect.signature(base.forward)  # Trainer's input columns
        assert inspect.signature(type(wrapper).forward) == expected
        assert find_labels(type(wrapper)) == labels and labels  # labels / start_positions.. / next_sentence_label
        assert can_return_loss(type(wrapper)) == can_return_loss(type(base))
    assert type(get_peft_model(tiny_bert(), "lora")) is type(wrapper := get_peft_model(tiny_bert(), "lora"))
    assert isinstance(wrapper.base_model, transformers.BertForSequenceClassification)


def test_wrapper_pickles_copies_and_compiles_with_its_signature_class(tmp_path):
    from subspace_ops import peft_model

    model = get_peft_model(tiny_bert(), ("lora", {"backend": "cpu"})).eval()
    perturb(model)
    ids = torch.stack([r["input_ids"] for r in classification_rows(2)])
    out = model(ids).logits
    copied = copy.deepcopy(model)
    assert type(copied) is type(model) and torch.equal(copied(ids).logits, out)
    torch.save(model, tmp_path / "wrapper.pt")
    peft_model._SIGNATURE_CLASSES.clear()  # as in a new process: loading makes the class again
    loaded = torch.load(tmp_path / "wrapper.pt", weights_only=False)
    assert type(loaded).__name__ == "SubspacePeftModel[BertForSequenceClassification]"
    assert torch.equal(loaded(ids).logits, out)
    assert inspect.signature(loaded.forward) == inspect.signature(tiny_bert().forward)
    assert torch.equal(pickle.loads(pickle.dumps(model))(ids).logits, out)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(input_ids=ids).logits, out, rtol=1e-5, atol=1e-6)


def test_trainer_defaults_train_and_evaluate_with_eval_loss(tmp_path):
    rows = classification_rows()
    model = get_peft_model(tiny_bert(), ("lora", {"backend": "cpu"}))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = trainer_for(model, rows, tmp_path)  # remove_unused_columns=True: keeps input_ids, labels
    assert trainer.label_names == ["labels"]
    trainer.train()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(mean_loss(model.eval(), rows), rel=1e-5)


def test_trainer_load_best_model_at_end(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = get_peft_model(tiny_bert(), ("lora", {"backend": "cpu"}))
    # greater_is_better: the worst loss is "best", so the restored checkpoint is not the last one
    trainer = trainer_for(model, classification_rows(), tmp_path, max_steps=3, eval_strategy="steps", eval_steps=1,
                          save_strategy="steps", save_steps=1, load_best_model_at_end=True, learning_rate=0.05,
                          greater_is_better=True)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert trainer.args.metric_for_best_model == "loss" and not best.endswith("checkpoint-3")
    saved = safetensors.load_file(f"{best}/model.safetensors")
    assert all(torch.equal(p, saved[n]) for n, p in model.state_dict().items())  # the best one, restored
    assert trainer.evaluate()["eval_loss"] == pytest.approx(trainer.state.best_metric, rel=1e-6)


def test_trainer_resume_continues_identically_and_checkpoints_hold_the_adapter(tmp_path):
    from subspace_ops.peft_model import SaveAdapterCallback

    rows = classification_rows()

    def run(out, resume=None):
        model = get_peft_model(tiny_bert(), ("lora", {"backend": "cpu"}))
        trainer = trainer_for(model, rows, out, max_steps=4, save_strategy="steps", save_steps=2,
                              callbacks=[SaveAdapterCallback()])
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    theirs = resumed.state_dict()
    assert all(torch.equal(p, theirs[n]) for n, p in straight.state_dict().items())

    ids = torch.stack([r["input_ids"] for r in rows])
    for step in (2, 4):  # every checkpoint directory loads with from_pretrained, as the full state_dict does
        directory = tmp_path / "a" / f"checkpoint-{step}"
        full = get_peft_model(tiny_bert(), ("lora", {"backend": "cpu"}))
        full.load_state_dict(pytest.importorskip("safetensors.torch").load_file(directory / "model.safetensors"))
        adapter = SubspacePeftModel.from_pretrained(tiny_bert(), directory)
        assert torch.equal(adapter(ids).logits, full.eval()(ids).logits)
    straight.save_pretrained(tmp_path / "final")  # the adapter-only output of a run
    assert torch.equal(SubspacePeftModel.from_pretrained(tiny_bert(), tmp_path / "final")(ids).logits,
                       straight.eval()(ids).logits)


def test_trainer_defaults_on_a_causal_lm(tmp_path):
    g = torch.Generator().manual_seed(7)
    rows = []
    for _ in range(8):
        ids = torch.randint(0, 64, (10,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(10, dtype=torch.long), "labels": ids.clone()})
    model = get_peft_model(tiny_llama(), ("lora", {"backend": "cpu"}))
    trainer = trainer_for(model, rows, tmp_path)
    assert trainer.label_names == ["labels"]
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(mean_loss(model.eval(), rows), rel=1e-5)


def test_trainer_label_smoothing_on_a_causal_lm_shifts_the_labels(tmp_path):
    """Trainer's label smoother shifts the labels only for a model whose _get_name() is a causal LM's: the
    wrapper answers with the wrapped model's name, so its loss is the bare model's (unshifted labels would
    smooth towards the wrong tokens, silently). The repr keeps the wrapper's own class name."""
    g = torch.Generator().manual_seed(3)
    rows = [{"input_ids": ids, "attention_mask": torch.ones(10, dtype=torch.long), "labels": ids.clone()}
            for ids in torch.randint(0, 64, (4, 10), generator=g)]
    model = get_peft_model(tiny_llama(), ("lora", {"backend": "cpu"}))
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    wrapped = trainer_for(model, rows, tmp_path / "wrapped", label_smoothing_factor=0.1)
    bare = trainer_for(model.base_model, rows, tmp_path / "bare", label_smoothing_factor=0.1)
    with torch.no_grad():
        ours = wrapped.compute_loss(model, dict(batch))
        expected = bare.compute_loss(model.base_model, dict(batch))
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)
    assert repr(model).startswith("SubspacePeftModel[LlamaForCausalLM](\n  (base_model): LlamaForCausalLM(")
