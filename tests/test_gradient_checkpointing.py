"""Activation (gradient) checkpointing: a model adapted by any op family trains the same with the
library's own switch on (transformers' ``activation_checkpointing_enable`` / older
``gradient_checkpointing_enable``, reentrant or not; timm's ``set_grad_checkpointing``) as without it. Checkpointing runs every block's forward a second time in
the backward, so this catches ops whose backward depends on state that a recomputed forward does not
reproduce (a dropout mask drawn outside torch's RNG, a saved tensor that is not an input or output)."""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import nn

from subspace_ops import methods

from conftest import move_off_init

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

# One method per op family (and per kind of randomness): rescaled linear + SSF, SVD basis, head
# mixing with dropout on α, LoRA with input dropout, DoRA (row norms), (IA)³ (separable path).
METHODS = {
    "rlrr": {},
    "siva": {"perc": 0.5},
    "coeff": {"dropout": 0.3},
    "lora": {"dropout": 0.2},
    "dora": {},
    "ia3": {},
}


def _adapted(model: nn.Module, name: str) -> nn.Module:
    torch.manual_seed(1)
    return move_off_init(methods.apply(model, name, **METHODS[name])[0]).train()


def _forward_calls(block: nn.Module) -> list[int]:
    """A counter of ``block``'s forward runs (a checkpointed block runs twice per training step).
    Counted as they start: torch's non-reentrant checkpoint stops a recomputation once it has what
    the backward needs, so forward hooks may not see it finish."""
    calls = [0]
    block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _assert_same_training_step(plain: nn.Module, checkpointed: nn.Module, loss: Callable[[nn.Module], torch.Tensor],
                               recomputed: Callable[[nn.Module], nn.Module]):
    plain_calls, checkpointed_calls = _forward_calls(recomputed(plain)), _forward_calls(recomputed(checkpointed))
    torch.manual_seed(5)
    expected = loss(plain)
    expected.backward()
    torch.manual_seed(5)  # the same dropout draws in the first forward; checkpointing replays them
    got = loss(checkpointed)
    got.backward()
    assert plain_calls == [1] and checkpointed_calls == [2], "nothing was recomputed: checkpointing is off"
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    trained = [(n, p, q) for (n, p), (_, q) in zip(plain.named_parameters(), checkpointed.named_parameters())
               if p.requires_grad]
    assert trained
    for name, p, q in trained:
        assert q.grad is not None, f"{name} got no gradient under checkpointing"
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    adapter_grads = [p.grad for n, p, _ in trained if not n.startswith("head.")]
    assert adapter_grads and any(g.abs().sum() > 0 for g in adapter_grads)


def _tiny_llama(**options) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, attn_implementation="sdpa", use_cache=False, **options,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _assert_llama_step_unchanged_by_checkpointing(plain: nn.Module, reentrant: bool) -> None:
    checkpointed = copy.deepcopy(plain)
    kwargs = {"use_reentrant": reentrant}
    if hasattr(checkpointed, "activation_checkpointing_enable"):  # transformers 5.x; the old name warns
        checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    ids = torch.randint(3, 50, (2, 11), generator=torch.Generator().manual_seed(3))
    # transformers checkpoints a decoder layer's forward (its own hooks run once): count its MLP's runs.
    first_mlp = lambda m: next(mod for name, mod in m.named_modules() if name.endswith("layers.0.mlp"))  # noqa: E731
    _assert_same_training_step(plain, checkpointed, lambda m: m(input_ids=ids, labels=ids).loss, first_mlp)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("name", list(METHODS))
def test_transformers_llama_gradient_checkpointing(name, reentrant):
    _assert_llama_step_unchanged_by_checkpointing(_adapted(_tiny_llama(), name), reentrant)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_coeff_attention_dropout_under_checkpointing(reentrant):
    """The backbone's attention dropout under Coeff (LLaMA's attention_dropout) draws its mask from a
    seed taken from torch's RNG, which checkpointing replays: the recomputed forward drops what the
    first one dropped."""
    _assert_llama_step_unchanged_by_checkpointing(_adapted(_tiny_llama(attention_dropout=0.3), "coeff"), reentrant)


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_peft_model_on_our_ops_gradient_checkpointing(kind):
    """HF PEFT's own LoRA (with dropout) and IA3 layers run on our ops by subspace_ops.peft.accelerate,
    under the transformers switch (reentrant, its default before v5)."""
    peft = pytest.importorskip("peft")
    from subspace_ops.peft import accelerate

    if kind == "lora":
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["q_proj", "v_proj", "down_proj"])
    else:
        config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    model = move_off_init(peft.get_peft_model(_tiny_llama(), config)).train()
    report = accelerate(model)
    assert len(report.accelerated) == 6 and not report.skipped, report
    _assert_llama_step_unchanged_by_checkpointing(model, reentrant=True)


@pytest.mark.parametrize("name", [*METHODS, "coeff+attn_drop"])
def test_timm_vit_gradient_checkpointing(name):
    torch.manual_seed(0)
    attn_drop = 0.3 if name == "coeff+attn_drop" else 0.0  # the block's own attention dropout, kept by Coeff
    name = name.split("+")[0]
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10, attn_drop_rate=attn_drop)
    plain = _adapted(vit, name)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    _assert_same_training_step(plain, checkpointed, lambda m: m(images).square().mean(), lambda m: m.blocks[0])
