"""Coeff-Tuning layers: HeadMix, TimmCoeffAttention, apply_coeff on timm and transformers models."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import subspace_ops
import subspace_ops.transformers
from subspace_ops import apply_coeff, apply_rlrr, head_mixing_attention, reference
from subspace_ops.nn import HeadMix, TimmCoeffAttention

from conftest import ON_INTERPRETER, backend_device, papers_sdpa, recorded_dropout, train_step_outputs

timm = pytest.importorskip("timm")


def tiny_vit(**kw) -> nn.Module:
    cfg = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    cfg.update(kw)
    return timm.models.vision_transformer.VisionTransformer(**cfg)


def test_head_mix_starts_as_standard_attention_and_mixes_heads():
    mix = HeadMix(4, backend="cpu")
    q, k, v = (torch.randn(2, 4, 9, 8) for _ in range(3))
    torch.testing.assert_close(mix(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))
    with torch.no_grad():
        mix.alpha.normal_()
    expected = reference.head_mixing_attention(q, k, v, torch.eye(4) + mix.alpha.detach())
    torch.testing.assert_close(mix(q, k, v), expected, rtol=1e-5, atol=1e-5)


def test_head_mix_dropout_on_alpha_only_in_training():
    mix = HeadMix(3, dropout=0.5)
    with torch.no_grad():
        mix.alpha.fill_(1.0)
    torch.manual_seed(0)
    train_mix = mix.mix()
    dropped = train_mix - torch.eye(3)
    assert set(dropped.unique().tolist()) <= {0.0, 2.0} and (dropped == 0).any()  # inverted dropout on α
    mix.eval()
    torch.testing.assert_close(mix.mix(), torch.eye(3) + 1.0)


def test_head_mixing_attention_under_autocast_takes_inputs_as_sdpa(backend):
    """Under autocast the op casts q, k, v and a float mask to the autocast dtype, as autocast does for
    SDPA: LLaMA's rotary embedding hands attention float32 q, k next to a bfloat16 v. At mix = I the
    result is SDPA's under the same autocast; mix stays float32 and its gradient is that of the
    formula in float32 on the bfloat16-rounded inputs (the backward runs inside the autocast region,
    as CPU training loops often call it)."""
    if backend == "triton" and ON_INTERPRETER:
        pytest.skip("the Triton interpreter's tl.dot is wrong for bfloat16")
    device = backend_device(backend)
    q, k = torch.randn(2, 4, 6, 8, device=device), torch.randn(2, 4, 7, 8, device=device)
    v = torch.randn(2, 4, 7, 8, device=device).to(torch.bfloat16)
    mask = torch.randn(2, 1, 6, 7, device=device)  # additive, float32
    mix = torch.eye(4, device=device, requires_grad=True)
    with pytest.raises(TypeError, match="v has dtype torch.bfloat16 but q has torch.float32"):
        head_mixing_attention(q, k, v, mix, attn_mask=mask, backend=backend)  # outside autocast: one dtype
    with torch.autocast(device, dtype=torch.bfloat16):
        out = head_mixing_attention(q, k, v, mix, attn_mask=mask, backend=backend)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.float().square().sum().backward()
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    assert mix.grad.dtype == torch.float32
    mix32 = torch.eye(4, device=device, requires_grad=True)
    rounded = [t.to(torch.bfloat16).float() for t in (q, k, v, mask)]
    reference_out = reference.head_mixing_attention(*rounded[:3], mix32, attn_mask=rounded[3])
    (expected_grad,) = torch.autograd.grad(reference_out, mix32, 2 * out.detach().float())
    torch.testing.assert_close(mix.grad, expected_grad, rtol=2e-2, atol=2e-2)


def test_bfloat16_model_keeps_small_diagonal_updates_of_alpha(backend):
    """A model cast to bfloat16 holds α in bfloat16; I + α must not be rounded there (1 + 3e-3 is 1.0
    in bfloat16), by the layer or by a backend, or every diagonal update below 2⁻⁸ is lost."""
    if backend == "triton" and ON_INTERPRETER:
        pytest.skip("the Triton interpreter's tl.dot is wrong for bfloat16")
    device = backend_device(backend)
    layer = HeadMix(4, backend=backend).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.alpha.copy_(3e-3 * torch.eye(4))
    mix = layer.mix()
    assert layer.alpha.dtype == torch.bfloat16 and mix.dtype == torch.float32
    assert torch.equal(mix.diagonal(), 1 + layer.alpha.diagonal().float())
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g).to(device=device, dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        out = layer(q, k, v)
        layer.alpha.zero_()
        plain = layer(q, k, v)
    changed = (out != plain).float().mean().item()
    assert changed > 0.2, f"α = 3e-3·I changed {changed:.0%} of the bfloat16 outputs"


@pytest.mark.parametrize("bad", [dict(num_heads=0), dict(num_heads=2, dropout=1.0)])
def test_head_mix_bad_arguments(bad):
    with pytest.raises(ValueError):
        HeadMix(**bad)


def test_timm_attention_replacement_matches_reference(fused_backend):
    model = tiny_vit().eval()
    block = model.blocks[0].attn
    layer = TimmCoeffAttention(block, backend=fused_backend)
    x = torch.randn(2, 17, 48)
    torch.testing.assert_close(layer(x), block(x), rtol=1e-5, atol=1e-5)  # α = 0: unchanged
    with torch.no_grad():
        layer.head_mix.alpha.normal_(0, 0.5)
    q, k, v = block.qkv(x).reshape(2, 17, 3, 3, 16).permute(2, 0, 3, 1, 4)
    mixed = reference.head_mixing_attention(q, k, v, torch.eye(3) + layer.head_mix.alpha)
    expected = block.proj(mixed.transpose(1, 2).reshape(2, 17, 48))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert set(layer.state_dict()) == set(block.state_dict()) | {"head_mix.alpha"}


@pytest.mark.parametrize("options", [dict(qk_norm=True), dict(scale_norm=True), dict(gated=True),
                                     dict(attn_head_dim=8, qkv_bias=True)])
def test_timm_attention_variants_unchanged_at_zero_alpha(options):
    """timm Attention's options around the attention itself: q/k norms, the norm before proj, the
    sigmoid output gate, a head size other than dim / heads. At α = 0 the layer computes what the
    block does (random norm/gate weights, so that skipping one would show)."""
    from timm.layers import Attention

    if "gated" in options and "gated" not in Attention.__init__.__code__.co_varnames:
        pytest.skip("this timm's Attention has no gate")
    norm = nn.LayerNorm if options.get("qk_norm") or options.get("scale_norm") else None
    block = Attention(48, num_heads=3, norm_layer=norm, **options).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    layer = TimmCoeffAttention(block, backend="cpu")
    x = torch.randn(2, 17, 48)
    torch.testing.assert_close(layer(x), block(x), rtol=1e-5, atol=1e-5)


def test_timm_attention_keeps_the_blocks_attention_dropout(monkeypatch):
    """A block built with attn_drop_rate keeps its attention dropout: in training the op gets the
    block's p (and the fused backend drops what the reference drops for the same seed); in
    evaluation p = 0, and at α = 0 the layer is the block."""
    block = tiny_vit(attn_drop_rate=0.25).blocks[0].attn
    layer = TimmCoeffAttention(block, backend="cpu")
    with torch.no_grad():
        layer.head_mix.alpha.normal_(0, 0.3)
    x = torch.randn(2, 17, 48)
    calls = recorded_dropout(monkeypatch)
    out = train_step_outputs(layer, "cpu", 1, x)
    assert calls == [0.25]
    torch.testing.assert_close(out, train_step_outputs(layer, "reference", 1, x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(train_step_outputs(layer, "cpu", 2, x), out)  # another seed, another mask
    zero = TimmCoeffAttention(block, backend="cpu").eval()
    calls.clear()
    torch.testing.assert_close(zero(x), block.eval()(x), rtol=1e-5, atol=1e-5)
    assert calls == [0.0]


@pytest.mark.integration
def test_apply_coeff_vit_b16_parameter_count():
    """Coeff-Tuning on ViT-B/16: 12 layers × 12 × 12 = 1 728 parameters (003, METHODS.md §3)."""
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    report = apply_coeff(model)
    assert report.adapter_params == 1728
    assert len(report.layers) == 12


@pytest.mark.integration
def test_apply_coeff_tiny_vit_trains_only_alpha_and_head():
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    report = apply_coeff(model, backend="cpu")
    assert report.adapter_params == 2 * 3 * 3
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    model(x).square().sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {"blocks.0.attn.head_mix.alpha", "blocks.1.attn.head_mix.alpha", "head.weight", "head.bias"}


@pytest.mark.integration
@pytest.mark.parametrize("order", ["rlrr-first", "coeff-first"])
def test_coeff_combines_with_rlrr_and_ssf(order):
    """RLRR (rescaled q, k, v, proj, fc1, fc2 + SSF) and Coeff in one model, either order; compiles."""
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    reference_model = copy.deepcopy(model)
    first, second = (apply_rlrr, apply_coeff) if order == "rlrr-first" else (apply_coeff, apply_rlrr)
    r1 = first(model, backend="cpu")
    r2 = second(model, backend="cpu")
    coeff = r1 if order == "coeff-first" else r2
    rlrr = r2 if order == "coeff-first" else r1
    assert coeff.adapter_params == 18
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"blocks.0.attn.head_mix.alpha", "blocks.0.attn.qkv.s_l", "blocks.0.norm1.gamma"} <= trainable
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == (
        rlrr.adapter_params + coeff.adapter_params + 48 * 10 + 10)
    # RLRR's init is not the identity (s_r ~ kaiming), SSF's neither: compare with the reference backend
    out = model(x)
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = "reference"
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-4)
    assert not torch.equal(out, before) and torch.isfinite(out).all()
    del reference_model
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), out, rtol=1e-4, atol=1e-4)


transformers = pytest.importorskip("transformers")


def tiny_roberta():
    config = transformers.RobertaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
        attn_implementation="sdpa",
    )
    return transformers.RobertaModel(config).eval()


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config).eval()


def _set_backend(model, backend):
    for m in model.modules():
        if isinstance(m, HeadMix):
            m.backend = backend


@pytest.mark.integration
@pytest.mark.parametrize("build", [tiny_roberta, tiny_llama], ids=["roberta", "llama"])
def test_transformers_head_mixing(build):
    torch.manual_seed(0)
    model = build()
    ids = torch.randint(3, 50, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0  # padding in the second sequence
    kwargs = dict(input_ids=ids, attention_mask=mask)
    first = lambda out: out[0]  # noqa: E731  last_hidden_state / logits
    before = first(model(**kwargs))
    report = apply_coeff(model, backend="cpu")
    heads = model.config.num_attention_heads
    assert report.adapter_params == model.config.num_hidden_layers * heads * heads
    assert model.config._attn_implementation == "subspace_coeff"
    after = first(model(**kwargs))
    torch.testing.assert_close(after[0], before[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after[1, :8], before[1, :8], rtol=1e-5, atol=1e-5)  # padded keys ignored
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HeadMix):
                m.alpha.normal_(0, 0.3)
    fused = first(model(**kwargs))
    _set_backend(model, "reference")
    expected = first(model(**kwargs))
    torch.testing.assert_close(fused[:, :8], expected[:, :8], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(fused[0], before[0], atol=1e-3)
    _set_backend(model, "cpu")
    fused.sum().backward() if fused.requires_grad else first(model(**kwargs)).sum().backward()
    alphas = [m.alpha for m in model.modules() if isinstance(m, HeadMix)]
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in alphas)
    assert subspace_ops.transformers.detach_head_mix(model) == model.config.num_hidden_layers
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(first(model(**kwargs)), before)


@pytest.mark.integration
def test_transformers_llama_head_mixing_under_cpu_autocast():
    """LLaMA under bfloat16 autocast (HF Trainer bf16=True, accelerate): its rotary embedding returns
    float32 q, k and v is bfloat16. At α = 0 the model computes what stock SDPA does under the same
    autocast; with α ≠ 0, what the reference backend does; α (float32) gets a float32 gradient."""
    torch.manual_seed(0)
    stock = tiny_llama()
    model = copy.deepcopy(stock)
    apply_coeff(model, backend="cpu")
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0
    kwargs = dict(input_ids=torch.randint(3, 50, (2, 11)), attention_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = stock(**kwargs).logits
        at_zero = model(**kwargs).logits
    torch.testing.assert_close(at_zero[:, :8], expected[:, :8], rtol=1e-2, atol=1e-2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HeadMix):
                m.alpha.normal_(0, 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(**kwargs).logits
    fused.float().square().sum().backward()
    for m in model.modules():
        if isinstance(m, HeadMix):
            assert m.alpha.grad.dtype == torch.float32
            assert torch.isfinite(m.alpha.grad).all() and m.alpha.grad.abs().sum() > 0
    _set_backend(model, "reference")
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        by_reference = model(**kwargs).logits
    assert not torch.allclose(fused[:, :8].float(), expected[:, :8].float(), atol=5e-2)  # α did mix heads
    torch.testing.assert_close(fused[:, :8].detach(), by_reference[:, :8], rtol=1e-2, atol=1e-2)


@pytest.mark.integration
def test_transformers_model_pickled_whole_runs_in_a_fresh_process(tmp_path):
    """``torch.save(model)`` of a Coeff-adapted model, loaded by a new interpreter that imports nothing
    of subspace_ops: the config names "subspace_coeff", an entry of transformers' process-wide attention
    registry that the pickle does not carry; unpickling the head mixes registers it. Same logits."""
    torch.manual_seed(0)
    model = tiny_llama()
    apply_coeff(model, backend="cpu")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HeadMix):
                m.alpha.normal_(0, 0.3)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    inputs = dict(input_ids=torch.randint(3, 50, (2, 9)), attention_mask=mask)
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.save(model, tmp_path / "model.pt")
    torch.save(inputs, tmp_path / "inputs.pt")
    code = ("import sys, torch\n"
            "model = torch.load(sys.argv[1], weights_only=False)\n"
            "with torch.no_grad():\n"
            "    torch.save(model(**torch.load(sys.argv[2])).logits, sys.argv[3])\n")
    paths = [str(tmp_path / name) for name in ("model.pt", "inputs.pt", "logits.pt")]
    result = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(paths[2]), expected)


@pytest.mark.integration
@pytest.mark.parametrize("family", ["roberta", "gpt2"])
def test_transformers_attention_dropout_is_applied_in_training(monkeypatch, family):
    """RoBERTa (attention_probs_dropout_prob) and GPT-2 (attn_pdrop) keep their attention dropout of
    0.1 under Coeff: the op gets p = 0.1 in training (fused = reference for the same seed) and 0 in
    evaluation, where α = 0 is the stock model."""
    if family == "roberta":
        config = transformers.RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                            intermediate_size=64, attention_probs_dropout_prob=0.1,
                                            hidden_dropout_prob=0.0, attn_implementation="sdpa")
        model = transformers.RobertaModel(config).eval()
    else:
        config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_implementation="sdpa")
        model = transformers.GPT2Model(config).eval()
    ids = torch.randint(3, 50, (2, 9))
    stock = model(input_ids=ids)[0]
    apply_coeff(model, backend="cpu")
    calls = recorded_dropout(monkeypatch)
    torch.testing.assert_close(model.eval()(input_ids=ids)[0], stock, rtol=1e-5, atol=1e-5)
    assert calls == [0.0]
    for m in model.modules():
        if isinstance(m, HeadMix):
            with torch.no_grad():
                m.alpha.normal_(0, 0.3)
    calls.clear()
    out = train_step_outputs(model, "cpu", 3, input_ids=ids)[0]
    assert calls == [0.1]
    torch.testing.assert_close(out, train_step_outputs(model, "reference", 3, input_ids=ids)[0],
                               rtol=1e-5, atol=1e-5)


def test_transformers_attention_function_takes_a_mask_longer_than_the_keys():
    """transformers may pass a 4-D mask wider than the keys (a static cache's full length): the
    function uses its first Nk columns, as transformers' own SDPA function does."""
    module = nn.Module()
    module.head_mix, module.is_causal = HeadMix(4, backend="cpu"), False
    with torch.no_grad():
        module.head_mix.alpha.normal_(0, 0.3)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    mask = torch.randn(2, 1, 5, 10)  # additive, 3 columns past the 7 keys
    out, _ = subspace_ops.transformers.coeff_attention_forward(module, q, k, v, mask, scaling=0.3)
    expected = reference.head_mixing_attention(q, k, v, torch.eye(4) + module.head_mix.alpha.detach(),
                                               attn_mask=mask[..., :7], scale=0.3)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_transformers_t5_relative_position_bias(monkeypatch):
    """T5 passes its relative position bias to the attention function (encoder self, causal decoder
    self, cross attention; padded source tokens): added to the mask as transformers' SDPA path does.
    Reference: the stock SDPA model with torch's SDPA computing the paper's formula."""
    config = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   dropout_rate=0.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    stock = transformers.T5ForConditionalGeneration(config).eval()
    model = copy.deepcopy(stock)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    kwargs = dict(input_ids=torch.randint(3, 50, (2, 7)), attention_mask=mask,
                  decoder_input_ids=torch.randint(3, 50, (2, 5)))
    with torch.no_grad():
        before = stock(**kwargs).logits
    report = apply_coeff(model, backend="cpu")
    assert report.adapter_params == 6 * 16  # 2 encoder self + 2 decoder self + 2 cross attention
    torch.testing.assert_close(model(**kwargs).logits, before, rtol=1e-5, atol=1e-5)
    alpha = 0.4 * torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HeadMix):
                m.alpha.copy_(alpha)
    ours = model(**kwargs).logits
    ours.square().sum().backward()
    assert all(m.alpha.grad.abs().sum() > 0 for m in model.modules() if isinstance(m, HeadMix))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", papers_sdpa(alpha))
    with torch.no_grad():
        expected = stock(**kwargs).logits
    assert not torch.allclose(expected, before, atol=1e-3)
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.integration
def test_transformers_models_off_sdpa_or_with_sinks_are_refused():
    """Gemma 2 (logit soft-capping) does not run on SDPA: refused before anything changes. A call
    with attention sinks or soft-capping is refused rather than computed without them."""
    config = transformers.Gemma2Config(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8, intermediate_size=32)
    model = transformers.Gemma2ForCausalLM(config).eval()
    implementation = model.config._attn_implementation
    with pytest.raises(ValueError, match="Gemma2ForCausalLM does not run on transformers' SDPA attention"):
        apply_coeff(model)
    assert model.config._attn_implementation == implementation
    assert not any(isinstance(m, HeadMix) for m in model.modules())
    module = nn.Module()
    module.head_mix, module.is_causal = HeadMix(4, backend="cpu"), False
    q = torch.randn(1, 4, 3, 8)
    for option in ("s_aux", "sinks", "softcap"):
        with pytest.raises(ValueError, match=f"does not support {option}"):
            subspace_ops.transformers.coeff_attention_forward(module, q, q, q, None, **{option: torch.zeros(4)})
