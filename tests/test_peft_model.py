"""subspace_ops.peft_model: the PeftModel-like wrapper (save/load, merge_and_unload, adapters)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from subspace_ops import checkpoint
from subspace_ops.peft_model import ADAPTER_WEIGHTS, SubspacePeftModel, get_peft_model
from subspace_ops.methods import get_config

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.integration


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10).eval()


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Pretend training: move every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def snapshot(model: nn.Module):
    return ({n: t.clone() for n, t in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, [type(m) for m in model.modules()])


X = torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("method", ["lora", "rlrr", "siva", "coeff"])
def test_save_and_from_pretrained_round_trip(method, tmp_path, capsys):
    peft_model = get_peft_model(tiny_vit(), get_config(method, backend="cpu"))
    peft_model.print_trainable_parameters()
    assert "trainable params:" in capsys.readouterr().out
    perturb(peft_model)
    expected = peft_model(X)
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / ADAPTER_WEIGHTS).exists() and (tmp_path / "adapter_config.json").exists()
    loaded = SubspacePeftModel.from_pretrained(tiny_vit(), tmp_path)
    torch.testing.assert_close(loaded(X), expected)


def test_failed_load_leaves_the_base_model_unchanged(tmp_path):
    peft_model = get_peft_model(tiny_vit(), get_config("lora", backend="cpu"))
    perturb(peft_model)
    peft_model.save_pretrained(tmp_path)
    other = timm.models.vision_transformer.VisionTransformer(  # other base weights
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    before = snapshot(other)
    with pytest.raises(checkpoint.AdapterLoadError):
        SubspacePeftModel.from_pretrained(other, tmp_path)
    after = snapshot(other)
    assert before[1] == after[1] and before[2] == after[2]
    assert all(torch.equal(before[0][n], t) for n, t in after[0].items())
    (tmp_path / ADAPTER_WEIGHTS).write_bytes((tmp_path / ADAPTER_WEIGHTS).read_bytes()[:100])  # truncated
    base = tiny_vit()
    before = snapshot(base)
    with pytest.raises(checkpoint.AdapterLoadError):
        SubspacePeftModel.from_pretrained(base, tmp_path)
    assert snapshot(base)[2] == before[2] and snapshot(base)[1] == before[1]


@pytest.mark.parametrize("method", ["lora", "rlrr", "svdiff"])
def test_merge_and_unload(method):
    peft_model = get_peft_model(tiny_vit(), get_config(method, backend="cpu"))
    perturb(peft_model)
    expected = peft_model(X)
    plain = peft_model.merge_and_unload()
    assert not any(type(m).__module__.startswith("subspace_ops") for m in plain.modules())
    torch.testing.assert_close(plain(X), expected, rtol=1e-4, atol=1e-5)


def test_merge_and_unload_refuses_non_mergeable_methods():
    peft_model = get_peft_model(tiny_vit(), get_config("pa", backend="cpu"))
    before = snapshot(peft_model.base_model)
    with pytest.raises(ValueError, match="not mergeable"):
        peft_model.merge_and_unload()
    assert snapshot(peft_model.base_model)[2] == before[2]


def test_two_adapters_and_disable():
    base_out = tiny_vit()(X)
    peft_model = get_peft_model(tiny_vit(), get_config("lora", backend="cpu"))
    perturb(peft_model, seed=1)
    out_a = peft_model(X)
    peft_model.add_adapter("b", get_config("lora", backend="cpu"))
    peft_model.set_adapter("b")
    torch.testing.assert_close(peft_model(X), base_out)  # a new adapter starts at the initial values
    perturb(peft_model, seed=2)
    out_b = peft_model(X)
    assert not torch.allclose(out_a, out_b)
    peft_model.set_adapter("default")
    torch.testing.assert_close(peft_model(X), out_a)
    peft_model.set_adapter("b")
    torch.testing.assert_close(peft_model(X), out_b)
    with pytest.raises(ValueError, match="same method"):
        peft_model.add_adapter("c", get_config("lora", rank=4, backend="cpu"))
    base_with_b_head = tiny_vit()  # disabled: base layers, but adapter b's trained head
    base_with_b_head.head.load_state_dict(peft_model.base_model.head.state_dict())
    with peft_model.disable_adapter():
        torch.testing.assert_close(peft_model(X), base_with_b_head(X))
    torch.testing.assert_close(peft_model(X), out_b)
    peft_model.delete_adapter("default")
    assert list(peft_model.peft_config) == ["b"]


def test_disable_adapter_runs_the_base_layers():
    """With the head untouched, disabling RLRR+SSF gives exactly the base model's output."""
    base = tiny_vit()
    expected = base(X)
    peft_model = get_peft_model(tiny_vit(), get_config("rlrr", backend="cpu", trainable=()))
    perturb(peft_model)
    assert not torch.allclose(peft_model(X), expected)
    with peft_model.disable_adapter():
        torch.testing.assert_close(peft_model(X), expected)
    assert not torch.allclose(peft_model(X), expected)


transformers = pytest.importorskip("transformers")


def test_roberta_sequence_classification_round_trip(tmp_path):
    def build():
        torch.manual_seed(0)
        config = transformers.RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, attention_probs_dropout_prob=0.0,
                                            hidden_dropout_prob=0.0, num_labels=3)
        return transformers.RobertaForSequenceClassification(config).eval()

    ids = torch.randint(3, 50, (2, 9))
    peft_model = get_peft_model(build(), ("lora", {"backend": "cpu", "trainable": ("classifier",)}))
    perturb(peft_model)
    expected = peft_model(input_ids=ids).logits
    assert peft_model.config.num_labels == 3  # attributes of the wrapped model
    peft_model.save_pretrained(tmp_path)
    loaded = SubspacePeftModel.from_pretrained(build(), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    torch.testing.assert_close(loaded.merge_and_unload()(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
