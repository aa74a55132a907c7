"""Coeff-Tuning on diffusers models (003 §5.2: α in every attention layer of the SDXL UNet, with LoRA).

The independent reference is diffusers' own default processor with its SDPA call replaced by a
direct transcription of 003 eq. 11–12 (softmax maps of every head, mixed by I + α, times V_h), so
everything the processor does around the attention (norms, masks, 4-D maps, residual, rescale)
is diffusers' code, not ours.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

import subspace_ops.diffusers as sd
from subspace_ops import apply_coeff, methods
from subspace_ops.nn import CoeffAttnProcessor, HeadMix
from subspace_ops.checkpoint import AdapterLoadError
from subspace_ops.peft_model import AdapterNotMergeableError, SubspacePeftModel, get_peft_model

from conftest import backend_device, papers_sdpa

diffusers = pytest.importorskip("diffusers")
from diffusers.models import attention_processor  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

pytestmark = pytest.mark.integration

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # PEFT / diffusers spelling: to_out.0 is a suffix


def tiny_unet() -> torch.nn.Module:
    """A 2-level SD-style UNet2DConditionModel (cross attention to 32-d text states; 2 and 4 heads)."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8,
    ).eval()


def unet_inputs(batch: int = 2, text: int = 5) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=3,
                encoder_hidden_states=torch.randn(batch, text, 32, generator=g))


def run(model, **kwargs):
    return model(**(unet_inputs() | kwargs)).sample


def random_alphas(model, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HeadMix):
                m.alpha.copy_(std * torch.randn(m.alpha.shape, generator=g))


ATTENTIONS = {
    "self": dict(query_dim=32, heads=4, dim_head=8),
    "cross+mask": dict(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16),
    "vae 4-D": dict(query_dim=32, heads=2, dim_head=16, norm_num_groups=8, residual_connection=True,
                    rescale_output_factor=2.0, bias=True, _from_deprecated_attn_block=True),
    "qk-norm, norm_cross": dict(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8, qk_norm="layer_norm",
                                cross_attention_norm="layer_norm"),
}


@pytest.mark.parametrize("kind", list(ATTENTIONS))
def test_processor_equals_diffusers_with_the_papers_attention(kind, fused_backend, monkeypatch):
    device = backend_device(fused_backend)
    attn = Attention(**ATTENTIONS[kind]).to(device).eval()
    assert type(attn.processor) is AttnProcessor2_0
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 32, 3, 5, generator=g) if "4-D" in kind else torch.randn(2, 15, 32, generator=g)
    kwargs = {}
    if "cross" in kind:
        kwargs["encoder_hidden_states"] = torch.randn(2, 7, 24, generator=g).to(device)
    if "mask" in kind:  # diffusers' additive [B, 1, Nk] mask: the second sample's last 3 keys are padding
        mask = torch.zeros(2, 1, 7)
        mask[1, :, 4:] = -10000.0
        kwargs["attention_mask"] = mask.to(device)
    x = x.to(device)
    stock = attn(x, **kwargs)
    attn.set_processor(CoeffAttnProcessor(attn.heads, replaced=attn.processor, backend=fused_backend, device=device))
    torch.testing.assert_close(attn(x, **kwargs), stock, rtol=1e-5, atol=1e-5)  # α = 0: unchanged
    with torch.no_grad():
        attn.processor.head_mix.alpha.copy_(0.4 * torch.randn(attn.heads, attn.heads, generator=g))
    ours = attn(x, **kwargs)
    ours.square().sum().backward()
    grad = attn.processor.head_mix.alpha.grad.clone()

    alpha = attn.processor.head_mix.alpha
    replaced = attn.processor.replaced
    attn.set_processor(replaced)
    monkeypatch.setattr(attention_processor.F, "scaled_dot_product_attention", papers_sdpa(alpha))
    expected = attn(x, **kwargs)
    assert not torch.allclose(expected, stock, atol=1e-3)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    alpha.grad = None
    expected.square().sum().backward()
    torch.testing.assert_close(grad, alpha.grad, rtol=1e-4, atol=1e-5)


def test_processor_takes_the_modules_scale():
    """scale_qk=False: scores are not scaled (scale 1), and diffusers runs its classic AttnProcessor."""
    attn = Attention(query_dim=32, heads=2, dim_head=16, scale_qk=False).eval()
    assert type(attn.processor) is attention_processor.AttnProcessor and attn.scale == 1.0
    x = torch.randn(2, 9, 32)
    stock = attn(x)
    assert sd.attach_head_mix(attn, backend="cpu") == [""]  # the module itself
    assert isinstance(attn.processor, CoeffAttnProcessor)
    torch.testing.assert_close(attn(x), stock, rtol=1e-5, atol=1e-5)
    assert sd.detach_head_mix(attn) == 1 and type(attn.processor) is attention_processor.AttnProcessor


def test_unet_coeff_trains_only_alpha_and_matches_the_reference_backend():
    unet = tiny_unet()
    before = run(unet)
    report = apply_coeff(unet, backend="cpu")
    heads = [m.heads for _, m in sd.attention_modules(unet)]
    assert len(report.layers) == 8 and report.adapter_params == sum(h * h for h in heads) == 6 * 4 + 2 * 16
    assert report.other_trainable_params == 0
    assert all(isinstance(m.processor, CoeffAttnProcessor) for _, m in sd.attention_modules(unet))
    torch.testing.assert_close(run(unet), before, rtol=1e-5, atol=1e-5)  # zero init: unchanged
    random_alphas(unet)
    fused = run(unet)
    assert not torch.allclose(fused, before, atol=1e-3)
    fused.square().mean().backward()
    grads = {n: p.grad for n, p in unet.named_parameters() if p.grad is not None}
    assert set(grads) == {n for n, _ in unet.named_parameters() if n.endswith("processor.head_mix.alpha")}
    assert len(grads) == 8 and all(g.abs().sum() > 0 for g in grads.values())
    for m in unet.modules():
        if isinstance(m, HeadMix):
            m.backend = "reference"
    torch.testing.assert_close(run(unet), fused, rtol=1e-4, atol=1e-5)
    assert sd.detach_head_mix(unet) == 8
    assert all(type(m.processor) is AttnProcessor2_0 for _, m in sd.attention_modules(unet))
    assert not any("processor" in n for n, _ in unet.named_parameters())
    torch.testing.assert_close(run(unet), before, rtol=0, atol=0)


def test_padded_text_tokens_are_ignored():
    """encoder_attention_mask (1 keep, 0 drop) reaches the cross attention as diffusers' additive mask."""
    unet = tiny_unet()
    apply_coeff(unet, backend="cpu")
    random_alphas(unet)
    inputs = unet_inputs()
    keep = torch.ones(2, 5)
    keep[:, 3:] = 0
    masked = unet(**inputs, encoder_attention_mask=keep).sample
    truncated = unet(**(inputs | dict(encoder_hidden_states=inputs["encoder_hidden_states"][:, :3]))).sample
    torch.testing.assert_close(masked, truncated, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(masked, run(unet), atol=1e-3)


@pytest.mark.parametrize("lora", ["subspace_ops", "peft"])
def test_coeff_with_lora_on_the_projections(lora):
    """003 §5.2's setting: LoRA on q, k, v, out plus α; both kinds of LoRA stay trainable."""
    unet = tiny_unet()
    if lora == "peft":
        peft = pytest.importorskip("peft")
        unet.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=list(LORA_TARGETS),
                                         init_lora_weights="gaussian"))
        lora_params = {n for n, p in unet.named_parameters() if p.requires_grad}
    else:
        _, lora_report = methods.apply(unet, "lora", targets=LORA_TARGETS, rank=2)
        assert len(lora_report.layers) == 4 * 8  # to_out.0 matched as PEFT matches it
        lora_params = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert len(lora_params) == 2 * 4 * 8
    _, report = methods.apply(unet, "coeff", backend="cpu")
    assert report.adapter_params == 56
    assert report.other_trainable_params == sum(p.numel() for n, p in unet.named_parameters() if n in lora_params)
    random_alphas(unet)
    run(unet).square().mean().backward()
    trained = {n for n, p in unet.named_parameters() if p.grad is not None}  # (LoRA's zero factor: zero grads)
    assert trained == lora_params | {n for n, _ in unet.named_parameters() if n.endswith("head_mix.alpha")}
    assert all(p.grad.abs().sum() > 0 for n, p in unet.named_parameters() if n.endswith("head_mix.alpha"))


def test_other_processors_are_refused_and_nothing_changes():
    unet = tiny_unet()
    unet.set_attention_slice(1)  # SlicedAttnProcessor: attention computed in slices, no SDPA call
    processors = sd.processors(unet)
    flags = [p.requires_grad for p in unet.parameters()]
    with pytest.raises(ValueError, match=r"runs SlicedAttnProcessor, not one of the processors.*call "
                                         r"model\.set_default_attn_processor\(\)"):
        apply_coeff(unet)
    with pytest.raises(ValueError, match="SlicedAttnProcessor"):
        methods.apply(unet, "coeff")
    assert sd.processors(unet) == processors and [p.requires_grad for p in unet.parameters()] == flags

    class Custom(AttnProcessor2_0):
        pass

    unet = tiny_unet()
    name, attn = sd.attention_modules(unet)[3]
    attn.set_processor(Custom())
    with pytest.raises(ValueError, match=f"{name}: runs Custom"):
        apply_coeff(unet)
    assert not any(isinstance(m, CoeffAttnProcessor) for m in unet.modules())
    apply_coeff(tiny_unet())  # the default processors alone are fine
    with pytest.raises(ValueError, match="already has a head mix"):
        unet = tiny_unet()
        apply_coeff(unet)
        sd.attach_head_mix(unet)


def test_peft_model_wrapper_disable_save_load_unload(tmp_path):
    base_out = run(tiny_unet())
    model = get_peft_model(tiny_unet(), ("coeff", {"backend": "cpu"}))
    random_alphas(model.base_model)
    adapted = run(model)
    with model.disable_adapter():
        assert torch.equal(run(model), base_out)
        assert all(type(m.processor) is AttnProcessor2_0 for _, m in sd.attention_modules(model.base_model))
    assert torch.equal(run(model), adapted)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = SubspacePeftModel.from_pretrained(tiny_unet(), tmp_path)
    assert torch.equal(run(loaded), adapted)
    with pytest.raises(AdapterNotMergeableError, match="head mixing"):
        loaded.merge_and_unload()
    plain = loaded.unload()
    assert all(type(m.processor) is AttnProcessor2_0 for _, m in sd.attention_modules(plain))
    assert torch.equal(run(plain), base_out)


def test_processors_replaced_after_coeff_are_reported_not_saved_empty(tmp_path):
    """diffusers' load_ip_adapter (like set_attn_processor) sets new processors on every attention
    module, dropping the head mixing: the wrapper says so rather than saving an adapter without α."""
    model = get_peft_model(tiny_unet(), "coeff")
    model.base_model.set_attn_processor(AttnProcessor2_0())
    for call in (lambda: model.save_pretrained(tmp_path), lambda: model.set_adapter("default")):
        with pytest.raises(RuntimeError, match=r"are no longer in the model: a module or attention processor was "
                                               r"replaced after adapting it \(diffusers' load_ip_adapter"):
            call()
    assert not os.listdir(tmp_path)
    model.unload()  # still possible: puts the processors Coeff replaced back


def test_failed_load_leaves_the_unet_unchanged(tmp_path):
    model = get_peft_model(tiny_unet(), "coeff")
    model.save_pretrained(tmp_path)
    other = diffusers.UNet2DConditionModel(  # other heads: α of other shapes
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(4, 8), norm_num_groups=8)
    processors = sd.processors(other)
    with pytest.raises(AdapterLoadError, match=r"processor\.head_mix\.alpha: shape \(2, 2\) in the file, \(4, 4\)"):
        SubspacePeftModel.from_pretrained(other, tmp_path)
    assert sd.processors(other) == processors
    assert not any(isinstance(m, CoeffAttnProcessor) for m in other.modules())
    assert all(p.requires_grad for p in other.parameters())


def test_compiled_attention_with_coeff_matches_eager():
    """torch.compile(fullgraph=True) through diffusers' Attention.forward and our processor (a UNet
    is many of these; compiling a whole one takes ~40 s on 2 cores)."""
    attn = Attention(**ATTENTIONS["cross+mask"]).eval()
    attn.set_processor(CoeffAttnProcessor(attn.heads, replaced=attn.processor, backend="cpu"))
    with torch.no_grad():
        attn.processor.head_mix.alpha.normal_(0, 0.3)
    x, context, mask = torch.randn(2, 15, 32), torch.randn(2, 7, 24), torch.zeros(2, 1, 7)
    mask[1, :, 5:] = -10000.0
    expected = attn(x, encoder_hidden_states=context, attention_mask=mask)
    compiled = torch.compile(attn, fullgraph=True)
    torch.testing.assert_close(compiled(x, encoder_hidden_states=context, attention_mask=mask), expected,
                               rtol=1e-5, atol=1e-6)


# --- processors whose SDPA call is routed to the head-mixing op: SD3's joint attention, Flux, fused q/k/v ---

def _sd3_attention(fused: bool) -> Attention:
    """SD3's MMDiT attention (JointTransformerBlock): image and text tokens attend jointly, q/k RMS norms."""
    attn = Attention(query_dim=32, added_kv_proj_dim=32, dim_head=8, heads=4, out_dim=32, context_pre_only=False,
                     bias=True, qk_norm="rms_norm", processor=attention_processor.JointAttnProcessor2_0())
    if fused:
        attn.fuse_projections()
        attn.set_processor(attention_processor.FusedJointAttnProcessor2_0())
    return attn


def _unet_fused_attention() -> Attention:
    attn = Attention(query_dim=32, heads=4, dim_head=8)
    attn.fuse_projections()
    attn.set_processor(attention_processor.FusedAttnProcessor2_0())
    return attn


def _flux_attention(single: bool):
    from diffusers.models.transformers.transformer_flux import FluxAttention

    if single:  # FluxSingleTransformerBlock: text and image already one sequence, no output projection
        return FluxAttention(query_dim=32, dim_head=8, heads=4, out_dim=32, bias=True, pre_only=True)
    return FluxAttention(query_dim=32, dim_head=8, heads=4, added_kv_proj_dim=32, context_pre_only=False, bias=True)


def _rotary(tokens: int, generator: torch.Generator):
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    return FluxPosEmbed(theta=10000, axes_dim=[4, 2, 2])(torch.randn(tokens, 3, generator=generator))


def _ip_adapter_attention():
    """UNet cross attention with two IP-Adapters (image prompts of 3 and 5 tokens): three SDPA calls."""
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8)
    attn.set_processor(attention_processor.IPAdapterAttnProcessor2_0(
        hidden_size=32, cross_attention_dim=24, num_tokens=(3, 5), scale=[0.6, 1.3]))
    return attn


def _sd3_ip_adapter_attention():
    attn = _sd3_attention(False)
    attn.set_processor(attention_processor.SD3IPAdapterJointAttnProcessor2_0(
        hidden_size=32, ip_hidden_states_dim=24, head_dim=8, timesteps_emb_dim=16, scale=0.7))
    return attn


def _flux_ip_adapter_attention():
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    attn = _flux_attention(single=False)
    attn.set_processor(FluxIPAdapterAttnProcessor(hidden_size=32, cross_attention_dim=24, num_tokens=(3,), scale=0.8))
    return attn


def _text(g):
    return dict(encoder_hidden_states=torch.randn(2, 4, 32, generator=g))


def _text_rotary(g):
    return _text(g) | dict(image_rotary_emb=_rotary(13, g))


ROUTED = {  # name: (module factory, processor class name, keyword inputs besides 9 image tokens)
    "sd3 joint": (lambda: _sd3_attention(False), "JointAttnProcessor2_0", _text),
    "sd3 joint fused": (lambda: _sd3_attention(True), "FusedJointAttnProcessor2_0", _text),
    "unet fused qkv": (_unet_fused_attention, "FusedAttnProcessor2_0", lambda g: {}),
    "flux double": (lambda: _flux_attention(False), "FluxAttnProcessor", _text_rotary),
    "flux single": (lambda: _flux_attention(True), "FluxAttnProcessor", lambda g: dict(image_rotary_emb=_rotary(9, g))),
    # IP-Adapter: the text's attention plus each image prompt's (SD3's: over image and image-prompt tokens)
    "unet ip-adapter x2": (_ip_adapter_attention, "IPAdapterAttnProcessor2_0", lambda g: dict(encoder_hidden_states=(
        torch.randn(2, 6, 24, generator=g), [torch.randn(2, 3, 24, generator=g), torch.randn(2, 5, 24, generator=g)]))),
    "sd3 ip-adapter": (_sd3_ip_adapter_attention, "SD3IPAdapterJointAttnProcessor2_0", lambda g: _text(g) | dict(
        ip_hidden_states=torch.randn(2, 3, 24, generator=g), temb=torch.randn(2, 16, generator=g))),
    "flux ip-adapter": (_flux_ip_adapter_attention, "FluxIPAdapterAttnProcessor", lambda g: _text_rotary(g) | dict(
        ip_hidden_states=[torch.randn(2, 3, 24, generator=g)])),
}


def _to(value, device):
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value.to(device)


@pytest.mark.parametrize("kind", list(ROUTED))
def test_routed_processor_equals_diffusers_with_the_papers_attention(kind, fused_backend, monkeypatch):
    """The module's own processor with its SDPA calls given the paper's formula is the reference."""
    make, processor_name, inputs = ROUTED[kind]
    device = backend_device(fused_backend)
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    attn = make().to(device).eval()
    assert type(attn.processor).__name__ == processor_name
    args = (torch.randn(2, 9, 32, generator=g).to(device),)
    kwargs = {key: _to(value, device) for key, value in inputs(g).items()}
    stock = attn(*args, **kwargs)
    frozen = {name: p.detach().clone() for name, p in attn.named_parameters()}
    assert sd.attach_head_mix(attn, backend=fused_backend) == [""]
    processor = attn.processor
    assert sd.is_head_mix_processor(processor) and processor.replaced is not None
    # diffusers passes a processor the keyword arguments its __call__ names: the copy names the same
    assert inspect.signature(processor.__call__) == inspect.signature(processor.replaced.__call__)
    torch.testing.assert_close(attn(*args, **kwargs), stock, rtol=1e-5, atol=1e-5)  # α = 0: unchanged
    with torch.no_grad():
        processor.head_mix.alpha.copy_(0.4 * torch.randn(attn.heads, attn.heads, generator=g))
    ours = attn(*args, **kwargs)
    sum(t.square().sum() for t in (ours if isinstance(ours, tuple) else (ours,))).backward()
    grad = processor.head_mix.alpha.grad.clone()

    alpha = processor.head_mix.alpha
    assert sd.detach_head_mix(attn) == 1 and type(attn.processor).__name__ == processor_name
    after = dict(attn.named_parameters())  # the module's and the IP-Adapter's weights, unchanged
    assert after.keys() == frozen.keys() and all(torch.equal(after[name], frozen[name]) for name in frozen)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", papers_sdpa(alpha))
    expected = attn(*args, **kwargs)
    outputs = list(zip(*(t if isinstance(t, tuple) else (t,) for t in (ours, expected, stock))))
    for o, e, s in outputs:  # (image, text) outputs for joint attention
        assert not torch.allclose(e, s, atol=1e-3)
        torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-5)
    alpha.grad = None
    sum(e.square().sum() for _, e, _ in outputs).backward()
    torch.testing.assert_close(grad, alpha.grad, rtol=1e-4, atol=1e-5)


def _flux_ids(tokens: int, generator: torch.Generator, axes: int = 3) -> torch.Tensor:
    return torch.randn(tokens, axes, generator=generator)


def _padded_text_mask() -> torch.Tensor:  # the second prompt's last two tokens are padding
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    return mask


def unet_with_ip_adapters() -> torch.nn.Module:
    """tiny_unet as ``load_ip_adapter`` leaves it with two IP-Adapters (image-prompt projections of 4
    and 2 tokens, random weights): IP-Adapter processors on the cross attentions, the default ones on
    the self attentions."""
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    unet = tiny_unet()
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([
        ImageProjection(cross_attention_dim=32, image_embed_dim=16, num_image_text_embeds=n) for n in (4, 2)])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    for name, module in sd.attention_modules(unet):
        if name.endswith("attn2"):
            module.set_processor(attention_processor.IPAdapterAttnProcessor2_0(
                hidden_size=module.to_k.out_features, cross_attention_dim=32, num_tokens=(4, 2), scale=[0.6, 1.2]))
    return unet


# Tiny diffusion transformers (random init, two or three attention modules each) and their inputs: 16 or 32
# image / video tokens, 5 text tokens (the second prompt padded after 3 where the model takes a text mask;
# Wan's image-to-video model cuts its context at 512 text tokens); and the UNet with two IP-Adapters.
DIT_MODELS = {
    "sd3": (lambda: diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16),
        lambda g: dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                       encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                       pooled_projections=torch.randn(2, 16, generator=g), timestep=torch.tensor([3, 3]))),
    "flux": (lambda: diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 2, 2)),
        lambda g: dict(hidden_states=torch.randn(2, 16, 4, generator=g),
                       encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                       pooled_projections=torch.randn(2, 16, generator=g), timestep=torch.tensor([0.5, 0.5]),
                       img_ids=_flux_ids(16, g), txt_ids=torch.zeros(5, 3))),
    "flux2": (lambda: diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False),
        lambda g: dict(hidden_states=torch.randn(2, 16, 4, generator=g),
                       encoder_hidden_states=torch.randn(2, 5, 32, generator=g), timestep=torch.tensor([0.5, 0.5]),
                       img_ids=_flux_ids(16, g, 4), txt_ids=torch.zeros(5, 4))),
    "qwenimage": (lambda: diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4)),
        lambda g: dict(hidden_states=torch.randn(2, 16, 16, generator=g),
                       encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                       encoder_hidden_states_mask=_padded_text_mask(), timestep=torch.tensor([0.5, 0.5]),
                       img_shapes=[(1, 4, 4)] * 2)),
    "wan": (lambda: diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32),
        lambda g: dict(hidden_states=torch.randn(2, 4, 2, 4, 4, generator=g), timestep=torch.tensor([3, 3]),
                       encoder_hidden_states=torch.randn(2, 5, 16, generator=g))),
    "wan i2v": (lambda: diffusers.WanTransformer3DModel(  # cross attention to text and image context: 2 SDPA calls
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=1, image_dim=8, added_kv_proj_dim=16, rope_max_seq_len=32),
        lambda g: dict(hidden_states=torch.randn(2, 4, 2, 4, 4, generator=g), timestep=torch.tensor([3, 3]),
                       encoder_hidden_states=torch.randn(2, 512, 16, generator=g),
                       encoder_hidden_states_image=torch.randn(2, 3, 8, generator=g))),
    "hunyuanvideo": (lambda: diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4), guidance_embeds=False),
        lambda g: dict(hidden_states=torch.randn(2, 4, 2, 4, 4, generator=g), timestep=torch.tensor([3, 3]),
                       encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                       encoder_attention_mask=_padded_text_mask().long(),
                       pooled_projections=torch.randn(2, 8, generator=g))),
    "ltx-video": (lambda: diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=1, caption_channels=16),
        lambda g: dict(hidden_states=torch.randn(2, 32, 4, generator=g), timestep=torch.tensor([3, 3]),
                       encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                       encoder_attention_mask=_padded_text_mask().long(), num_frames=2, height=4, width=4)),
    "unet ip-adapter": (unet_with_ip_adapters, lambda g: unet_inputs() | dict(added_cond_kwargs={"image_embeds": [
        torch.randn(2, 1, 16, generator=g), torch.randn(2, 1, 16, generator=g)]})),
}


def dit(name: str):
    """A fresh tiny model (the same weights every call) and its inputs."""
    build, inputs = DIT_MODELS[name]
    torch.manual_seed(0)
    return build().eval(), inputs(torch.Generator().manual_seed(6))


@pytest.mark.parametrize("name", list(DIT_MODELS))
def test_dit_coeff_equals_the_model_with_the_papers_attention(name, monkeypatch):
    """Whole SD3 / Flux / Flux.2 / Qwen-Image / Wan (text- and image-to-video) / HunyuanVideo /
    LTX-Video transformers (joint text-image attention, rotary embeddings, text padding masks,
    HunyuanVideo's token refiner on the default processor) and a UNet with IP-Adapters: reference =
    the stock model with torch's SDPA computing the paper's formula (α picked by the number of heads)."""
    model, inputs = dit(name)
    apply_coeff(model, backend="cpu")
    mixes = [m for m in model.modules() if isinstance(m, HeadMix)]
    assert len(mixes) == len(sd.attention_modules(model)) >= 2
    g = torch.Generator().manual_seed(8)
    alphas = {h: 0.4 * torch.randn(h, h, generator=g) for h in {m.num_heads for m in mixes}}
    with torch.no_grad():
        for m in mixes:
            m.alpha.copy_(alphas[m.num_heads])
        ours = model(**inputs).sample
    stock, _ = dit(name)
    with torch.no_grad():
        base = stock(**inputs).sample
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", papers_sdpa(alphas))
        expected = stock(**inputs).sample
    assert (expected - base).abs().max() > 1e-3 * base.abs().max()
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(DIT_MODELS))
def test_dit_coeff_trains_alpha_saves_loads_and_unloads(name, tmp_path):
    """The models above through get_peft_model: α = 0 leaves the model unchanged, only α trains (not
    the IP-Adapters' projections), the adapter round-trips through a file, unload restores the
    processors exactly."""
    stock, inputs = dit(name)
    base_out = stock(**inputs).sample
    model = get_peft_model(dit(name)[0], ("coeff", {"backend": "cpu"}))
    names = [n for n, m in sd.attention_modules(model.base_model)]
    assert len(names) >= 2 and all(sd.is_head_mix_processor(m.processor) for _, m in
                                   sd.attention_modules(model.base_model))
    torch.testing.assert_close(model(**inputs).sample, base_out, rtol=1e-5, atol=1e-6)
    random_alphas(model.base_model)
    adapted = model(**inputs).sample
    assert not torch.allclose(adapted, base_out, atol=1e-3)
    adapted.square().mean().backward()
    trained = {n: p for n, p in model.named_parameters() if p.grad is not None}
    assert len(trained) == len(names) and all(n.endswith("processor.head_mix.alpha") for n in trained)
    assert all(p.grad.abs().sum() > 0 for p in trained.values())
    # the model's state: the stock model's and the α, each once (no replaced processor's weights again)
    added = set(model.base_model.state_dict()) - set(stock.state_dict())
    assert set(stock.state_dict()) <= set(model.base_model.state_dict()) and len(added) == len(names)
    assert all(key.endswith("processor.head_mix.alpha") for key in added)
    model.save_pretrained(tmp_path)
    loaded = SubspacePeftModel.from_pretrained(dit(name)[0], tmp_path)
    torch.testing.assert_close(loaded(**inputs).sample, adapted, rtol=0, atol=0)
    plain = loaded.unload()
    assert not any(sd.is_head_mix_processor(m.processor) for _, m in sd.attention_modules(plain))
    assert torch.equal(plain(**inputs).sample, base_out)


def test_fused_qkv_unet_with_coeff_equals_the_unfused_one():
    unet = tiny_unet()
    apply_coeff(unet, backend="cpu")
    random_alphas(unet)
    expected = run(unet)
    fused = tiny_unet()
    fused.fuse_qkv_projections()
    apply_coeff(fused, backend="cpu")
    assert {type(m.processor.replaced).__name__ for _, m in sd.attention_modules(fused)} == {"FusedAttnProcessor2_0"}
    fused.load_state_dict(unet.state_dict(), strict=False)  # the α (the fused layer keeps its to_q/k/v too)
    torch.testing.assert_close(run(fused), expected, rtol=1e-5, atol=1e-5)


def test_routed_processor_runs_the_native_backend_and_refuses_a_wrong_number_of_sdpa_calls():
    from diffusers.models.attention_dispatch import attention_backend

    attn = _flux_attention(single=True).eval()
    x = torch.randn(2, 6, 32)
    stock = attn(x)
    sd.attach_head_mix(attn)
    with torch.no_grad(), attention_backend("flex"):  # a backend that does not call SDPA (FlexAttention)
        torch.testing.assert_close(attn(x), stock, rtol=1e-5, atol=1e-5)

    class FusedAttnProcessor2_0(attention_processor.FusedAttnProcessor2_0):  # an allowed name, two SDPA calls
        def __call__(self, attn, hidden_states, *args, **kwargs):
            torch.nn.functional.scaled_dot_product_attention(*(torch.zeros(1, 4, 2, 8),) * 3)
            return super().__call__(attn, hidden_states, *args, **kwargs)

    attn = _unet_fused_attention()
    attn.set_processor(FusedAttnProcessor2_0())
    sd.attach_head_mix(attn)
    with pytest.raises(RuntimeError, match="FusedAttnProcessor2_0 called F.scaled_dot_product_attention 2 times"):
        attn(torch.randn(2, 6, 32))

    class IPAdapterAttnProcessor2_0(attention_processor.IPAdapterAttnProcessor2_0):  # sums attentions, makes none
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return hidden_states

    attn = _ip_adapter_attention()
    attn.set_processor(IPAdapterAttnProcessor2_0(hidden_size=32, cross_attention_dim=24))
    sd.attach_head_mix(attn)
    with pytest.raises(RuntimeError, match="called F.scaled_dot_product_attention 0 times; head mixing replaces at "
                                           "least one call"):
        attn(torch.randn(2, 6, 32))


def test_compiled_flux_attention_with_coeff_matches_eager():
    """torch.compile(fullgraph=True) through a routed processor (its SDPA call goes to the head-mixing op)."""
    attn = _flux_attention(single=False).eval()
    sd.attach_head_mix(attn, backend="cpu")
    with torch.no_grad():
        attn.processor.head_mix.alpha.normal_(0, 0.3)
    g = torch.Generator().manual_seed(7)
    x, context = torch.randn(2, 9, 32, generator=g), torch.randn(2, 4, 32, generator=g)
    kwargs = dict(encoder_hidden_states=context, image_rotary_emb=_rotary(13, g))
    expected = attn(x, **kwargs)
    compiled = torch.compile(attn, fullgraph=True)(x, **kwargs)
    for ours, eager in zip(compiled, expected):
        torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)


# Every registry method applied by name with its default targets: they name diffusers' layers too.
_LINEAR = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "net.2",
           "proj_mlp", "single_transformer_blocks.*.proj_out")
_DEFAULT_LAYERS = {  # method: the layers its defaults must reach (patterns as the registry's)
    "ssb": ("to_k", "to_v", "add_k_proj", "add_v_proj", "net.2"), "ssl": ("to_k", "to_v", "add_k_proj", "add_v_proj"),
    "ia3": ("to_k", "to_v", "add_k_proj", "add_v_proj", "net.2"), "siva": ("to_q", "to_v", "add_q_proj", "add_v_proj"),
    "adapter": ("to_out.0", "to_add_out", "net.2"), "ssf": ("norm1", "norm2", "norm3"),
}
_DIFFUSERS_METHODS = [n for n in methods.list_methods() if n not in ("coeff", "bitfit")]  # coeff: above


@pytest.mark.parametrize("model_name", ["unet", "flux"])
@pytest.mark.parametrize("name", _DIFFUSERS_METHODS)
def test_every_method_by_name_reaches_diffusers_layers(name, model_name):
    """``methods.apply(model, name)`` with the defaults adapts a UNet's and a Flux transformer's attention
    projections (both streams of joint attention) and feed-forward output, not just the layers whose
    names the other libraries share (``proj``); zero-init methods leave the output as it was."""
    from subspace_ops.adapters import find_modules

    from test_methods import NOT_ZERO_INIT, cpu_kw

    model, inputs = (tiny_unet(), unet_inputs()) if model_name == "unet" else dit("flux")
    if model_name == "flux" and name in ("rlrr", "ssf"):  # adaLN norms have no affine parameters: no SSF place
        with pytest.raises(ValueError, match="match no LayerNorm, RMSNorm or patch embedding"):
            methods.apply(model, name, **cpu_kw(name))
        if name == "ssf":
            return
        name_kw = dict(ssf=False)  # RLRR's scales alone (kaiming init: the output moves)
    else:
        name_kw = {}
    with torch.no_grad():
        before = model(**inputs).sample
    kind = torch.nn.LayerNorm if name == "ssf" else torch.nn.Linear
    expected = {n for n, m in find_modules(model, _DEFAULT_LAYERS.get(name, _LINEAR), kind)
                if name != "ssf" or m.elementwise_affine}
    assert expected
    _, report = methods.apply(model, name, **cpu_kw(name, **name_kw))
    assert expected <= set(report.layers), sorted(expected - set(report.layers))
    with torch.no_grad():
        after = model(**inputs).sample
    if name in NOT_ZERO_INIT:
        assert not torch.allclose(after, before, atol=1e-4)
    else:  # zero-init; our kernels' sums may round differently from F.linear's
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    model(**inputs).sample.square().mean().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


def _ip_scales(model) -> dict:
    return {name: m.processor.scale for name, m in sd.attention_modules(model) if hasattr(m.processor, "scale")}


def test_ip_adapter_scale_set_after_coeff_is_kept_when_coeff_is_taken_out():
    """An IP-Adapter scale set while Coeff's processors are in place is the scale the user has: detaching
    Coeff (detach_head_mix; set_processors between a head-mix processor and the one it replaced) gives
    back the replaced processors with it, and a scale set on those meanwhile goes back with the head-mix
    ones. SD3's ``set_ip_adapter_scale`` (like Flux's) assigns ``processor.scale``; so may a user (the
    UNet pipelines' one writes into the list, which both processors share). Reference: the unadapted UNet
    given that scale directly."""
    from types import SimpleNamespace

    from diffusers.loaders.ip_adapter import SD3IPAdapterMixin

    model, inputs = dit("unet ip-adapter")
    reference = dit("unet ip-adapter")[0]
    for _, m in sd.attention_modules(reference):
        if hasattr(m.processor, "scale"):
            m.processor.scale = [0.1, 0.2]
    with torch.no_grad():
        expected = reference(**inputs).sample
    sd.attach_head_mix(model)
    for _, m in sd.attention_modules(model):
        if hasattr(m.processor, "scale"):
            m.processor.scale = [0.1, 0.2]
    assert sd.detach_head_mix(model) == 8
    assert set(map(tuple, _ip_scales(model).values())) == {(0.1, 0.2)}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, expected, rtol=0, atol=0)

    unet = dit("unet ip-adapter")[0]
    before = sd.processors(unet)
    sd.attach_head_mix(unet)
    adapted = sd.processors(unet)
    for _, m in sd.attention_modules(unet):
        if hasattr(m.processor, "scale"):
            m.processor.scale = [0.3, 0.4]
    sd.set_processors(unet, before)  # back to the replaced processors (as processors() saved them)
    assert sd.processors(unet) == before and set(map(tuple, _ip_scales(unet).values())) == {(0.3, 0.4)}
    for _, m in sd.attention_modules(unet):  # set while those are in place: kept with the head-mix ones again
        if hasattr(m.processor, "scale"):
            m.processor.scale = [0.5, 0.6]
    sd.set_processors(unet, adapted)
    assert sd.processors(unet) == adapted and set(map(tuple, _ip_scales(unet).values())) == {(0.5, 0.6)}

    attn = _sd3_ip_adapter_attention()
    holder = torch.nn.Module()
    holder.attn = attn
    sd.attach_head_mix(holder)
    SD3IPAdapterMixin.set_ip_adapter_scale(SimpleNamespace(transformer=SimpleNamespace(
        attn_processors={"attn": attn.processor})), 0.25)
    assert sd.detach_head_mix(holder) == 1
    assert type(attn.processor) is attention_processor.SD3IPAdapterJointAttnProcessor2_0
    assert attn.processor.scale == 0.25


def test_ip_adapter_scale_set_after_coeff_is_kept_by_the_peft_wrapper():
    """get_peft_model swaps IP-Adapter processors (nn.Modules) through its module list, not through
    set_processors: disable_adapter and unload must carry a scale assigned since, both ways. Reference:
    the unadapted UNet given that scale directly (α = 0 at attach, so the adapted model equals it too)."""
    model, inputs = dit("unet ip-adapter")
    reference = dit("unet ip-adapter")[0]

    def set_scale(m, scale):
        for _, attn in sd.attention_modules(m):
            if hasattr(attn.processor, "scale"):
                attn.processor.scale = scale

    def expected(scale):
        set_scale(reference, scale)
        with torch.no_grad():
            return reference(**inputs).sample

    wrapped = get_peft_model(model, ("coeff", {"backend": "cpu"}))
    set_scale(wrapped.base_model, [0.1, 0.2])
    with wrapped.disable_adapter(), torch.no_grad():
        assert set(map(tuple, _ip_scales(wrapped.base_model).values())) == {(0.1, 0.2)}
        torch.testing.assert_close(wrapped(**inputs).sample, expected([0.1, 0.2]), rtol=0, atol=0)
        set_scale(wrapped.base_model, [0.3, 0.4])  # set on the original processors: back with the adapted ones
    assert all(sd.is_head_mix_processor(m.processor) for _, m in sd.attention_modules(wrapped.base_model))
    assert set(map(tuple, _ip_scales(wrapped.base_model).values())) == {(0.3, 0.4)}
    set_scale(wrapped.base_model, [0.5, 0.6])
    plain = wrapped.unload()
    assert not any(sd.is_head_mix_processor(m.processor) for _, m in sd.attention_modules(plain))
    assert set(map(tuple, _ip_scales(plain).values())) == {(0.5, 0.6)}
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).sample, expected([0.5, 0.6]), rtol=0, atol=0)
