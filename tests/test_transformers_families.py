"""The registry's default targets on transformers families beyond BERT and LLaMA (built from tiny configs):
every linear layer of the blocks, every norm, the key/value projections, the attention and FFN outputs
are found by the names each family gives them; the head is trained in full and not adapted; fused
q, k, v projections are split where their layout is known and refused where it is not."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from subspace_ops import methods
from subspace_ops.adapters import find_linears, fused_qkv_splits, merge_all, unmerge_all
from subspace_ops.nn import SSF, LowRankLinear, ScaledLinear

from conftest import move_off_init

pytestmark = pytest.mark.integration
T = pytest.importorskip("transformers")

H, FF, V = 32, 64, 100
TEXT = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=FF,
            max_position_embeddings=64, pad_token_id=0)
SEQ2SEQ = dict(vocab_size=V, d_model=H, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=FF, decoder_ffn_dim=FF, dropout=0.0, attention_dropout=0.0,
               activation_dropout=0.0)


def _ids() -> dict:
    return {"input_ids": torch.randint(3, V, (2, 8), generator=torch.Generator().manual_seed(0))}


def _seq2seq_ids() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(3, V, (2, 8), generator=g),
            "decoder_input_ids": torch.randint(3, V, (2, 5), generator=g)}


def _whisper_inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"input_features": torch.randn(2, 8, 16, generator=g),
            "decoder_input_ids": torch.randint(3, V, (2, 5), generator=g)}


# name -> (model factory, inputs, (IA)³'s key/value layers, its FFN-output layers, Houlsby adapter positions)
# by the last one or two components of the module names: what the papers adapt, written out per family.
FAMILIES = {
    "distilbert": (lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
        vocab_size=V, dim=H, n_layers=2, n_heads=4, hidden_dim=FF, dropout=0.0, attention_dropout=0.0,
        seq_classif_dropout=0.0, num_labels=3, pad_token_id=0)), _ids,
        {"k_lin", "v_lin"}, {"lin2"}, {"attention.out_lin", "ffn.lin2"}),
    "deberta-v2": (lambda: T.DebertaV2ForSequenceClassification(T.DebertaV2Config(
        **TEXT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)), _ids,
        {"key_proj", "value_proj"}, {"0.output.dense", "1.output.dense"}, {"output.dense"}),
    "albert": (lambda: T.AlbertForSequenceClassification(T.AlbertConfig(
        **TEXT, embedding_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)), _ids,
        {"key", "value"}, {"ffn_output"}, {"attention.dense", "0.ffn_output"}),
    "t5": (lambda: T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=V, d_model=H, d_kv=8, d_ff=FF, num_layers=2, num_heads=4, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0)), _seq2seq_ids,
        {"k", "v"}, {"wo"}, {"SelfAttention.o", "EncDecAttention.o", "DenseReluDense.wo"}),
    "opt": (lambda: T.OPTForCausalLM(T.OPTConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, ffn_dim=FF, dropout=0.0,
        attention_dropout=0.0, max_position_embeddings=64, word_embed_proj_dim=H, pad_token_id=1)), _ids,
        {"k_proj", "v_proj"}, {"fc2"}, {"self_attn.out_proj", "0.fc2", "1.fc2"}),
    "bart": (lambda: T.BartForConditionalGeneration(T.BartConfig(
        **SEQ2SEQ, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2)), _seq2seq_ids,
        {"k_proj", "v_proj"}, {"fc2"}, {"self_attn.out_proj", "encoder_attn.out_proj", "0.fc2", "1.fc2"}),
    "whisper": (lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
        **SEQ2SEQ, num_mel_bins=8, max_source_positions=8, max_target_positions=16, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, suppress_tokens=None,
        begin_suppress_tokens=None)), _whisper_inputs,
        {"k_proj", "v_proj"}, {"fc2"}, {"self_attn.out_proj", "encoder_attn.out_proj", "0.fc2", "1.fc2"}),
    "phi": (lambda: T.PhiForCausalLM(T.PhiConfig(**TEXT, attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0)),
            _ids, {"k_proj", "v_proj"}, {"fc2"}, {"self_attn.dense", "mlp.fc2"}),
    "phi3": (lambda: T.Phi3ForCausalLM(T.Phi3Config(**TEXT, num_key_value_heads=2, attention_dropout=0.0,
                                                    resid_pdrop=0.0, embd_pdrop=0.0)),
             _ids, {"qkv_proj"}, {"down_proj"}, {"self_attn.o_proj", "mlp.down_proj"}),
    "gpt-neox": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**TEXT, rotary_pct=0.5, attention_dropout=0.0,
                                                              hidden_dropout=0.0)),
                 _ids, None, {"dense_4h_to_h"}, {"attention.dense", "mlp.dense_4h_to_h"}),
    "bloom": (lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=V, hidden_size=H, n_layer=2, n_head=4,
                                                       attention_dropout=0.0, hidden_dropout=0.0)),
              _ids, None, {"dense_4h_to_h"}, {"self_attention.dense", "mlp.dense_4h_to_h"}),
    "gpt2": (lambda: T.GPT2ForSequenceClassification(T.GPT2Config(
        vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, num_labels=3, pad_token_id=0)), _ids,
        {"c_attn"}, {"mlp.c_proj"}, {"attn.c_proj", "mlp.c_proj"}),
    "clip-text": (lambda: T.CLIPTextModel(T.CLIPTextConfig(**{**TEXT, "pad_token_id": 1}, eos_token_id=2,
                                                           attention_dropout=0.0)),
                  _ids, {"k_proj", "v_proj"}, {"fc2"}, {"self_attn.out_proj", "mlp.fc2"}),
}
# Linear layers outside the transformer blocks, which no default adapts: the task heads, poolers, ALBERT's
# embedding projection, Whisper's output projection, DeBERTa's relative-position projections.
OUTSIDE_BLOCKS = ("lm_head", "classifier", "score", "pooler", "embedding_hidden_mapping_in", "proj_out",
                  "pos_key_proj", "pos_query_proj")


def _build(name: str) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    factory, inputs = FAMILIES[name][:2]
    return factory().eval(), inputs()


def _output(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def _tail(name: str, parts: int) -> str:
    return ".".join(name.split(".")[-parts:])


def _matches_expected(name: str, expected: set) -> bool:
    return any(_tail(name, parts) in expected for parts in (1, 2, 3))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_adapts_every_linear_of_the_blocks_and_merges_back(family):
    model, inputs = _build(family)
    with torch.no_grad():
        before = _output(model, inputs)
    block_linears = {n for n, m in model.named_modules() if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
                     and not any(word in n for word in OUTSIDE_BLOCKS)}
    model, report = methods.apply(model, "lora")
    assert set(report.layers) == block_linears
    with torch.no_grad():
        torch.testing.assert_close(_output(model, inputs), before)  # B = 0 at attach
    move_off_init(model)
    out = _output(model, inputs)
    out.float().square().mean().backward()
    adapters = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert adapters and all(m.lora_a.grad is not None and m.lora_a.grad.abs().sum() > 0 for m in adapters)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        merge_all(model)
        torch.testing.assert_close(_output(model, inputs), out, rtol=1e-4, atol=1e-5)
        unmerge_all(model)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ssf_follows_every_norm(family):
    model, inputs = _build(family)
    norms = {n for n, m in model.named_modules() if (isinstance(m, nn.LayerNorm) and m.elementwise_affine)
             or type(m).__name__.endswith(("RMSNorm", "T5LayerNorm"))}
    model, report = methods.apply(model, "ssf")
    assert set(report.layers) == norms
    assert all(isinstance(model.get_submodule(n), SSF) for n in norms)
    _output(model, inputs).float().square().mean().backward()
    assert all(model.get_submodule(n).gamma.grad is not None for n in norms)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ia3_scales_keys_values_and_ffn_output(family):
    model, inputs = _build(family)
    kv, ffn_out = FAMILIES[family][2:4]
    if kv is None:  # q, k, v interleaved per head in one query_key_value: (IA)³ cannot scale k and v alone
        with pytest.raises(ValueError, match="targets .* match no nn.Linear.*one query_key_value layer"):
            methods.apply(model, "ia3")
        return
    with torch.no_grad():
        before = _output(model, inputs)
    expected = {n for n, _ in find_linears(model, ("*",)) if _matches_expected(n, kv | ffn_out)
                and not any(word in n for word in OUTSIDE_BLOCKS)}
    model, report = methods.apply(model, "ia3")
    assert expected and set(report.layers) == expected
    with torch.no_grad():
        torch.testing.assert_close(_output(model, inputs), before)  # scales start at 1


@pytest.mark.parametrize("family", list(FAMILIES))
def test_houlsby_adapter_after_attention_output_and_ffn(family):
    model, inputs = _build(family)
    with torch.no_grad():
        before = _output(model, inputs)
    model, report = methods.apply(model, "adapter")
    positions = FAMILIES[family][4]
    assert report.layers and all(_matches_expected(n, positions) for n in report.layers), report.layers
    assert {p for p in positions if any(_matches_expected(n, {p}) for n in report.layers)} == positions
    with torch.no_grad():
        torch.testing.assert_close(_output(model, inputs), before)  # up-projection zero at attach
    move_off_init(model)
    _output(model, inputs).float().square().mean().backward()  # T5 reads wo.weight.dtype through the adapter


def test_default_trainable_covers_the_task_heads_transformers_names():
    """LLaMA's and GPT-2's sequence-classification ``score``, DistilBERT's ``pre_classifier`` and BART's
    ``classification_head`` are new and trained in full; nothing inside them is adapted."""
    llama = T.LlamaForSequenceClassification(T.LlamaConfig(**TEXT, num_key_value_heads=2, num_labels=3))
    bart = T.BartForSequenceClassification(T.BartConfig(**SEQ2SEQ, max_position_embeddings=64, num_labels=3))
    distilbert = FAMILIES["distilbert"][0]()
    for model, heads in ((llama, ("score",)), (bart, ("classification_head",)),
                         (distilbert, ("pre_classifier", "classifier"))):
        model, report = methods.apply(model, "lora")
        for head in heads:
            module = model.get_submodule(head)
            assert all(p.requires_grad for p in module.parameters())
            assert not any(type(m).__module__.startswith("subspace_ops") for m in module.modules())
        assert report.other_trainable_params == sum(p.numel() for h in heads
                                                    for p in model.get_submodule(h).parameters())


@pytest.mark.parametrize("method", ["siva", "sam-parser", "lora", "ssf", "adapter"])
def test_layers_inside_a_trainable_module_get_no_adapter(method):
    """The head matches the default targets (``fc1``, ``fc2``, a LayerNorm named ``norm``) but is trained in
    full: before, the SVD methods wrapped it and then refused the head weight's gradient at every forward."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("blocks", nn.Sequential(nn.Module()))
    block = model.blocks[0]
    block.norm1, block.fc1, block.fc2 = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(16, 8)
    head = nn.Module()
    head.norm, head.fc1, head.fc2 = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 3)
    model.add_module("head", head)
    model.forward = lambda x: head.fc2(head.fc1(head.norm(block.fc2(block.fc1(block.norm1(x))))))
    targets = {"siva": {"targets": ("fc1", "fc2")}, "adapter": {"targets": ("fc2",)}}.get(method, {})
    model, report = methods.apply(model, method, **targets)
    assert report.layers and all(n.startswith("blocks.") for n in report.layers)
    assert all(type(m).__module__.startswith("torch.nn") and p.requires_grad
               for m in head.modules() for p in m.parameters(recurse=False))
    model(torch.randn(4, 8)).square().mean().backward()
    assert all(p.grad is not None for p in head.parameters())


class _Attention(nn.Module):
    def __init__(self, dim: int, out: int, **declared) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, out)
        for key, value in declared.items():
            setattr(self, key, value)


@pytest.mark.parametrize("declared, out, expected", [
    ({"q_dim": 48, "kv_dim": 12}, 72, (48, 12, 12)),                            # EXAONE-4.5 vision
    ({"num_heads": 4, "head_dim": 12, "num_key_value_heads": 1}, 72, (48, 12, 12)),
    ({"num_heads": 4, "head_dim": 8}, 96, (32, 32, 32)),                        # timm, attention width != dim
    ({}, 144, (48, 48, 48)),                                                    # 3·d outputs for d inputs
])
def test_fused_qkv_splits_follow_what_the_attention_declares(declared, out, expected):
    model = nn.Module()
    model.attn = _Attention(48, out, **declared)
    assert fused_qkv_splits(model, "attn.qkv", model.attn.qkv) == expected


def test_grouped_query_qkv_ia3_scales_only_keys_and_values_and_unknown_layouts_are_refused():
    model = nn.Module()
    model.attn = _Attention(48, 72, q_dim=48, kv_dim=12)
    model.forward = lambda x: model.attn.qkv(x)
    weight = model.attn.qkv.weight.detach().clone()
    model, _ = methods.apply(model, "ia3", ff_targets=())
    layer = model.attn.qkv
    assert isinstance(layer, ScaledLinear)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.fill_(2.0)
        merge_all(model)
    changed = (layer.weight.detach() != weight).any(dim=1)
    assert not changed[:48].any() and changed[48:].all()

    unknown = nn.Module()
    unknown.attn = _Attention(48, 72)  # 72 = 3·24, but q need not be 24 wide: nothing says
    unknown.forward = lambda x: unknown.attn.qkv(x)
    state = copy.deepcopy(unknown.state_dict())
    for method, options in (("ia3", {"ff_targets": ()}), ("rlrr", {"ssf": False}), ("siva", {})):
        with pytest.raises(ValueError, match="attn.qkv: a fused q, k, v projection .* does not declare"):
            methods.apply(unknown, method, **options)
        assert type(unknown.attn.qkv) is nn.Linear
    assert all(torch.equal(v, unknown.state_dict()[k]) for k, v in state.items())
    methods.apply(unknown, "ia3", ff_targets=(), fused_qkv="shared")  # one matrix: the user's explicit choice


def test_phi3_fused_qkv_proj_is_split_by_its_grouped_query_sizes():
    torch.manual_seed(0)
    model = FAMILIES["phi3"][0]()
    model, report = methods.apply(model, "siva")
    layer = model.model.layers[0].self_attn.qkv_proj
    assert layer.parts == (32, 16, 16)  # 4 heads of 8 for q; 2 key/value heads of 8 for k and v
    assert "model.layers.0.self_attn.qkv_proj" in report.layers


def test_multihead_attention_out_proj_is_refused_not_silently_ignored():
    """nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward: an adapter on
    out_proj would never run."""
    model = nn.Module()
    model.attn = nn.MultiheadAttention(16, 2, batch_first=True)
    with pytest.raises(ValueError, match="attn.out_proj: MultiheadAttention.forward reads self.out_proj.weight"):
        methods.apply(model, "lora", targets=("out_proj",))
    assert type(model.attn.out_proj).__module__.startswith("torch.nn")


def test_swin_patch_embeddings_tuple_output_gets_ssf_and_merges():
    """transformers' Swin patch embeddings return (tokens, grid size): SSF scales the tokens."""
    torch.manual_seed(0)
    model = T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                     window_size=4)).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model, report = methods.apply(model, "ssf")
    assert "embeddings.patch_embeddings" in report.layers
    move_off_init(model)
    out = model(pixel_values=pixels).last_hidden_state
    out.square().mean().backward()
    assert model.embeddings.patch_embeddings.gamma.grad is not None
    with torch.no_grad():
        merge_all(model)
        torch.testing.assert_close(model(pixel_values=pixels).last_hidden_state, out, rtol=1e-4, atol=1e-5)
