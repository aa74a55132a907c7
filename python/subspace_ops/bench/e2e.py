"""End-to-end case ``e2e``: one training step of a timm ViT per method (issue #8).

A step is forward, cross-entropy loss, backward, AdamW step and ``zero_grad(set_to_none=True)``
on a random-init ``VisionTransformer`` (no weights are downloaded) with random images and labels.
Variants, side by side in one run:

``<method>``
    The method applied with subspace_ops' fused ops (backend from ``--backend``).
``<method>+compile``
    ``torch.compile`` of that whole model (our ops in the graph, the rest fused by Inductor): the
    fair partner of ``naive+compile``, which also compiles the whole network (optional).
``<method> naive``
    The same layers on the ``reference`` backend: the papers' formulas transcribed in plain
    PyTorch (RLRR materializes W' per layer, SiVA runs the unmerged low-rank products, Coeff
    materializes every head's N×N map and mixes it by einsum, LoRA is PEFT's formula).
``<method> naive+compile``
    ``torch.compile`` of the naive model (optional: a failing compile is reported as skipped).
``peft LoRA r=8``
    HF PEFT's LoRA on ``qkv`` (the baseline of the ratios), ``full FT`` (every weight trained) and
    ``frozen forward`` (the model's no-grad forward: the floor a step cannot beat).

Methods: ``rlrr`` (RLRR + SSF, 000), ``coeff`` (head mixing, 003), ``siva`` (002, perc 0.95),
``lora`` (r=8 on ``qkv``, as the PEFT row). The classifier head is trained in every method.
``subspace-ops bench e2e --methods ssb,ia3,dora`` (any names of the :mod:`subspace_ops.methods`
registry, with its defaults) measures other methods instead; a method without a fused op (``ssf``,
``bitfit``, ``adapter``: its config has no ``backend``) is plain PyTorch already, so it gets no
naive / naive+compile rows.

Shapes ``batch,img,depth,dim`` (patch 16, heads = dim / 64, MLP 4·dim, 1000 classes). Presets:
``vit-b`` = (64, 224, 12, 768), ViT-B/16 at batch 64 (CUDA default); ``cpu`` = (4, 224, 4, 384),
a 4-block ViT-S-width model that keeps a CPU run to a few minutes (CPU default).

Case ``e2e-llama``: the same for a LLaMA-style decoder stack (transformers ``LlamaForCausalLM``
from a config, random init, causal-LM loss on random tokens). Shapes ``batch,seq,layers,hidden``
(heads = hidden / 128, MLP 11008/4096 · hidden, vocabulary 32 000 from hidden 2048 up, else
4 096 so the CPU run is not all LM head). Presets: ``llama`` = (1, 1024, 2, 4096) and
(1, 4096, 2, 4096), two LLaMA-7B-sized blocks (CUDA default); ``cpu`` = (1, 256, 2, 256). Methods:
``lora`` (r=8 on q_proj, v_proj, as the PEFT row), ``coeff`` (through transformers' attention
registry), ``siva`` (q_proj, v_proj) and ``rlrr`` (every linear; no SSF: LLaMA has RMSNorm, not the
LayerNorms of RLRR's recipe).

Case ``e2e-unet``: the same for a Stable-Diffusion-style UNet (diffusers ``UNet2DConditionModel``
from a config, random init; Coeff-Tuning's concept-customization setting, 003 §5.2): a denoising
step, MSE between the predicted and the drawn noise, on random latents, timesteps and text states.
Shapes ``batch,latent,channels,text``: SD 1.5's layout (block widths c, 2c, 4c, 4c, cross attention
in the first three levels, 2 layers per block, 8 heads, 768-d text states) at latent size
``latent`` (64 for 512² images) and base width ``channels`` (320 in SD 1.5: the preset ``sd15`` =
(2, 64, 320, 77) is SD 1.5's UNet, 860 M parameters, CUDA default); ``cpu`` = (1, 32, 64, 77).
Methods (default: the two of 003's SDXL runs): ``coeff`` (α in every self and cross attention;
naive: the N×N maps of every head, 1024² at the first level of the CPU preset, 4096² in SD 1.5) and
``lora`` (r=8 on to_q, to_k, to_v, to_out.0, as the PEFT row); ``--methods`` adds others, e.g.
``siva`` (to_q, to_v) or ``rlrr`` (every linear of the attention and feed-forward layers; no SSF).

Case ``e2e-flux``: the same for a Flux-style diffusion transformer (diffusers
``FluxTransformer2DModel`` from a config, random init): a flow-matching step, MSE between the
predicted and the true velocity (noise − latents) at a random t, with random packed latents
(64 channels: 16 latent channels in 2×2 patches), text states, pooled text embedding and guidance.
Shapes ``batch,image,text,blocks,hidden``: ``image`` latent tokens (4096 for a 1024² image),
``text`` tokens (512 in Flux.1-dev), ``blocks`` double-stream blocks followed by twice as many
single-stream blocks (Flux.1: 19 and 38), width ``hidden`` in heads of 128 (Flux.1: 3072, 24
heads). Presets: ``flux`` = (1, 4096, 512, 2, 3072), two double and four single Flux.1-dev blocks
at 1024² (CUDA default; the whole model's 57 blocks would not leave room for the full-FT row);
``cpu`` = (1, 1024, 64, 1, 256), a 32×32 latent, 2 heads. Methods: ``coeff`` (α in every joint
attention: naive = every head's (image + text)² map) and ``lora`` (r=8 on to_q, to_k, to_v,
to_out.0, as the PEFT row).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .harness import Case, Shape, Variant, VariantSkipped, Workload

__all__ = ["E2E_FLUX", "E2E_LLAMA", "E2E_METHODS", "E2E_UNET", "E2E_VIT", "check_methods", "e2e_variants",
           "flux_variants", "llama_variants", "unet_variants"]

LORA_RANK = 8


@dataclasses.dataclass(frozen=True)
class _Task:
    """What differs between the end-to-end cases: the model, how a method is applied, one step."""

    build: Callable[[Shape, torch.device, torch.dtype], nn.Module]
    apply: Callable[[str, nn.Module, str], None]
    workload: Callable[..., Workload]  # (model, params, shape, device, dtype, label) -> Workload
    peft_config: Callable[[], object]  # the PEFT LoRA baseline's config
    peft_description: str


def _has_fused_op(method: str) -> bool:
    """Whether the method's config picks an op backend (so a "naive" reference variant differs)."""
    from ..methods import METHODS

    return any(f.name == "backend" for f in dataclasses.fields(METHODS[method].config))


def check_methods(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple, or ValueError naming the unknown ones and the registry's names."""
    from ..methods import list_methods

    if not names:
        raise ValueError("no method given")
    unknown = [n for n in names if n not in list_methods()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown} (choose from {', '.join(list_methods())})")
    return tuple(dict.fromkeys(names))


def _setup_method(task: _Task, method: str, backend: Optional[str], naive: bool, compiled: bool):
    def setup(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        from ..backends import resolve_backend

        fused = _has_fused_op(method)
        chosen = ("reference" if naive else resolve_backend(backend, device)) if fused else None
        model = task.build(shape, device, dtype)
        task.apply(method, model, chosen)
        params = [p for p in model.parameters() if p.requires_grad]
        run = torch.compile(model) if compiled else model
        label = ("inductor of " if compiled else "") + (chosen or "torch")
        return task.workload(run, params, shape, device, dtype, label)

    return setup


def _setup_peft_lora(task: _Task):
    def setup(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        try:
            import peft
        except ImportError:
            raise VariantSkipped("peft not installed (pip install peft)") from None
        model = peft.get_peft_model(task.build(shape, device, dtype), task.peft_config())
        params = [p for p in model.parameters() if p.requires_grad]
        return task.workload(model, params, shape, device, dtype, f"peft {peft.__version__}")

    return setup


def _setup_full_ft(task: _Task):
    def setup(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        model = task.build(shape, device, dtype)
        return task.workload(model, list(model.parameters()), shape, device, dtype, "torch")

    return setup


def _setup_frozen(task: _Task):
    def setup(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        model = task.build(shape, device, dtype).eval()
        workload = task.workload(model, [], shape, device, dtype, "torch (no grad)")

        def step() -> None:
            with torch.no_grad():
                workload.forward()

        workload.train_step = step
        return workload

    return setup


def _variants(task: _Task, backend: Optional[str], methods: Sequence[str]) -> list[Variant]:
    variants = []
    for method in check_methods(methods):
        fused = _has_fused_op(method)
        variants += [
            Variant(method, _setup_method(task, method, backend, False, False),
                    description=f"{method} on fused ops" if fused else f"{method} (plain PyTorch: no fused op)"),
            Variant(f"{method}+compile", _setup_method(task, method, backend, False, True), optional=True,
                    description=f"torch.compile of the whole model with {method} (our ops inside the graph)"),
        ]
        if fused:  # without a fused op, "naive" would be the same model again
            variants += [
                Variant(f"{method} naive", _setup_method(task, method, backend, True, False),
                        description=f"{method}, the papers' formulas (reference backend)"),
                Variant(f"{method} naive+compile", _setup_method(task, method, backend, True, True), optional=True,
                        description=f"torch.compile of {method} naive"),
            ]
    return variants + [
        Variant(f"peft LoRA r={LORA_RANK}", _setup_peft_lora(task), optional=True, description=task.peft_description),
        Variant("full FT", _setup_full_ft(task), description="every parameter trained"),
        Variant("frozen forward", _setup_frozen(task), description="no-grad forward of the frozen model"),
    ]


def _e2e_case(name: str, description: str, make_variants: Callable, dim_names: tuple[str, ...], presets: dict,
              default_presets: dict) -> Case:
    """An end-to-end case: training steps only, PEFT LoRA as the baseline, bf16 on CUDA and fp32 on CPU,
    one table per method, not part of a bare ``subspace-ops bench``."""
    return Case(name=name, description=description, make_variants=make_variants,
                baselines={"train": f"peft LoRA r={LORA_RANK}"}, dim_names=dim_names, presets=presets,
                default_presets=default_presets, default_dtype={"cuda": torch.bfloat16, "cpu": torch.float32},
                modes=("train",), in_default_run=False, per_method=True)


# ---------------------------------------------------------------------------------------------
# e2e: timm ViT
# ---------------------------------------------------------------------------------------------
def _vit(shape: Shape, device: torch.device, dtype: torch.dtype) -> nn.Module:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        raise VariantSkipped("timm not installed (pip install timm)") from None
    _, img, depth, dim = shape
    torch.manual_seed(0)
    model = VisionTransformer(img_size=img, patch_size=16, embed_dim=dim, depth=depth, num_heads=max(dim // 64, 1),
                              num_classes=1000)
    return model.to(device=device, dtype=dtype)


def _adamw_step(params: list[torch.Tensor], loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One training step: ``loss().backward()``, AdamW on ``params``, gradients set to None. The
    frozen-forward variant has no params; it replaces the step with a no-grad forward."""
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None  # none for the frozen model

    def step() -> None:
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _backend_option(backend: Optional[str]) -> dict:
    """``backend=`` for methods with a fused op (None for the others, whose configs have no such field)."""
    return {} if backend is None else {"backend": backend}


def _apply_vit(method: str, model: nn.Module, backend: Optional[str]) -> None:
    from .. import methods

    overrides = {"lora": dict(targets=("qkv",), rank=LORA_RANK, alpha=2 * LORA_RANK), "siva": dict(perc=0.95)}
    methods.apply(model, method, **_backend_option(backend), **overrides.get(method, {}))


def _vit_workload(model: Callable, params: list[torch.Tensor], shape: Shape, device: torch.device,
                  dtype: torch.dtype, label: str) -> Workload:
    batch, img, _, _ = shape
    g = torch.Generator(device=device).manual_seed(1)
    images = torch.randn(batch, 3, img, img, generator=g, device=device).to(dtype)
    labels = torch.randint(0, 1000, (batch,), generator=g, device=device)
    step = _adamw_step(params, lambda: nn.functional.cross_entropy(model(images).float(), labels))
    return Workload(lambda: model(images), params, None, label, train_step=step, items=(batch, "img"))


def _vit_peft_config():
    import peft

    return peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=["qkv"], modules_to_save=["head"])


E2E_METHODS = ("rlrr", "coeff", "siva", "lora")
_VIT = _Task(_vit, _apply_vit, _vit_workload, _vit_peft_config, "HF PEFT LoRA on qkv + head")


def e2e_variants(backend: Optional[str] = None, methods: Sequence[str] = E2E_METHODS) -> list[Variant]:
    return _variants(_VIT, backend, methods)


E2E_VIT = _e2e_case(
    "e2e", "one training step (fwd + bwd + AdamW) of a timm ViT per method vs PEFT LoRA, full FT, frozen",
    e2e_variants, ("batch", "img", "depth", "dim"),
    presets={"vit-b": {"any": [(64, 224, 12, 768)]}, "cpu": {"any": [(4, 224, 4, 384)]}},
    default_presets={"cuda": ["vit-b"], "cpu": ["cpu"]},
)


# ---------------------------------------------------------------------------------------------
# e2e-llama: a LLaMA-style decoder stack
# ---------------------------------------------------------------------------------------------
_LLAMA_ATTENTION = ("q_proj", "v_proj")


def _vocab(hidden: int) -> int:
    return 32000 if hidden >= 2048 else 4096


def _llama(shape: Shape, device: torch.device, dtype: torch.dtype) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise VariantSkipped("transformers not installed (pip install transformers)") from None
    _, seq, layers, hidden = shape
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=_vocab(hidden), hidden_size=hidden, intermediate_size=hidden * 11008 // 4096,
        num_hidden_layers=layers, num_attention_heads=max(hidden // 128, 1), num_key_value_heads=max(hidden // 128, 1),
        max_position_embeddings=max(seq, 2048), attention_dropout=0.0, attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)


def _apply_llama(method: str, model: nn.Module, backend: Optional[str]) -> None:
    from .. import methods

    overrides = {
        "lora": dict(targets=_LLAMA_ATTENTION, rank=LORA_RANK, alpha=2 * LORA_RANK),
        "siva": dict(targets=_LLAMA_ATTENTION, perc=0.997),
        "rlrr": dict(ssf=False),
    }
    methods.apply(model, method, trainable=(), **_backend_option(backend), **overrides.get(method, {}))


def _llama_workload(model: Callable, params: list[torch.Tensor], shape: Shape, device: torch.device,
                    dtype: torch.dtype, label: str) -> Workload:
    batch, seq, _, hidden = shape
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, _vocab(hidden), (batch, seq), generator=g, device=device)
    step = _adamw_step(params, lambda: model(input_ids=ids, labels=ids).loss)
    return Workload(lambda: model(input_ids=ids).logits, params, None, label, train_step=step,
                    items=(batch * seq, "tok"))


def _llama_peft_config():
    import peft

    return peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=list(_LLAMA_ATTENTION))


_LLAMA = _Task(_llama, _apply_llama, _llama_workload, _llama_peft_config, "HF PEFT LoRA on q_proj, v_proj")


def llama_variants(backend: Optional[str] = None, methods: Sequence[str] = E2E_METHODS) -> list[Variant]:
    return _variants(_LLAMA, backend, methods)


E2E_LLAMA = _e2e_case(
    "e2e-llama", "one training step (fwd + bwd + AdamW) of a LLaMA-style decoder stack per method vs PEFT LoRA",
    llama_variants, ("batch", "seq", "layers", "hidden"),
    presets={"llama": {"any": [(1, 1024, 2, 4096), (1, 4096, 2, 4096)]}, "cpu": {"any": [(1, 256, 2, 256)]}},
    default_presets={"cuda": ["llama"], "cpu": ["cpu"]},
)


# ---------------------------------------------------------------------------------------------
# e2e-unet: a Stable-Diffusion-style UNet (diffusers)
# ---------------------------------------------------------------------------------------------
_UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_UNET_TEXT_DIM = 768


def _unet(shape: Shape, device: torch.device, dtype: torch.dtype) -> nn.Module:
    try:
        import diffusers
    except ImportError:
        raise VariantSkipped("diffusers not installed (pip install diffusers)") from None
    _, latent, channels, _ = shape
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(  # SD 1.5's layout at base width ``channels``
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(channels, 2 * channels, 4 * channels, 4 * channels),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=_UNET_TEXT_DIM, attention_head_dim=8, norm_num_groups=min(32, channels // 2))
    model.to(device=device)
    return model if dtype == torch.float32 else model.to(dtype=dtype)  # (diffusers warns on any dtype cast)


def _apply_unet(method: str, model: nn.Module, backend: Optional[str]) -> None:
    from .. import methods

    linears = _UNET_ATTENTION + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
    overrides = {
        "lora": dict(targets=_UNET_ATTENTION, rank=LORA_RANK, alpha=2 * LORA_RANK),
        "siva": dict(targets=("to_q", "to_v"), perc=0.95),
        "rlrr": dict(targets=linears, ssf=False),
    }
    methods.apply(model, method, trainable=(), **_backend_option(backend), **overrides.get(method, {}))


def _unet_workload(model: Callable, params: list[torch.Tensor], shape: Shape, device: torch.device,
                   dtype: torch.dtype, label: str) -> Workload:
    batch, latent, _, text = shape
    g = torch.Generator(device=device).manual_seed(1)
    latents = torch.randn(batch, 4, latent, latent, generator=g, device=device).to(dtype)
    noise = torch.randn(batch, 4, latent, latent, generator=g, device=device).to(dtype)
    states = torch.randn(batch, text, _UNET_TEXT_DIM, generator=g, device=device).to(dtype)
    timesteps = torch.randint(0, 1000, (batch,), generator=g, device=device)

    def forward() -> torch.Tensor:
        return model(latents, timesteps, encoder_hidden_states=states).sample

    step = _adamw_step(params, lambda: nn.functional.mse_loss(forward().float(), noise.float()))
    return Workload(forward, params, None, label, train_step=step, items=(batch, "img"))


def _unet_peft_config():
    import peft

    return peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=list(_UNET_ATTENTION))


_UNET = _Task(_unet, _apply_unet, _unet_workload, _unet_peft_config, "HF PEFT LoRA on to_q, to_k, to_v, to_out.0")
UNET_METHODS = ("coeff", "lora")


def unet_variants(backend: Optional[str] = None, methods: Sequence[str] = UNET_METHODS) -> list[Variant]:
    return _variants(_UNET, backend, methods)


E2E_UNET = _e2e_case(
    "e2e-unet", "one denoising training step (fwd + bwd + AdamW) of an SD-style UNet per method vs PEFT LoRA",
    unet_variants, ("batch", "latent", "channels", "text"),
    presets={"sd15": {"any": [(2, 64, 320, 77)]}, "cpu": {"any": [(1, 32, 64, 77)]}},
    default_presets={"cuda": ["sd15"], "cpu": ["cpu"]},
)


# ---------------------------------------------------------------------------------------------
# e2e-flux: a Flux-style diffusion transformer (diffusers)
# ---------------------------------------------------------------------------------------------
_FLUX_HEAD_DIM = 128


def _flux_widths(hidden: int) -> tuple[int, int]:
    """(text-state width, pooled-embedding width): Flux.1's T5-XXL and CLIP-L at full width, else hidden."""
    return (4096, 768) if hidden >= 1024 else (hidden, hidden)


def _flux(shape: Shape, device: torch.device, dtype: torch.dtype) -> nn.Module:
    try:
        import diffusers
    except ImportError:
        raise VariantSkipped("diffusers not installed (pip install diffusers)") from None
    _, _, _, blocks, hidden = shape
    if hidden % _FLUX_HEAD_DIM:
        raise ValueError(f"hidden must be a multiple of the head size {_FLUX_HEAD_DIM}, got {hidden}")
    text_dim, pooled_dim = _flux_widths(hidden)
    torch.manual_seed(0)
    with device:  # initialized where it runs: the GPU preset's 1.3 B parameters take seconds on a CPU, per variant
        model = diffusers.FluxTransformer2DModel(  # Flux.1-dev's blocks (rotary axes 16 + 56 + 56 = the head size)
            patch_size=1, in_channels=64, num_layers=blocks, num_single_layers=2 * blocks,
            attention_head_dim=_FLUX_HEAD_DIM, num_attention_heads=hidden // _FLUX_HEAD_DIM,
            joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
    return model if dtype == torch.float32 else model.to(dtype=dtype)


def _apply_flux(method: str, model: nn.Module, backend: Optional[str]) -> None:
    from .. import methods

    overrides = {
        "lora": dict(targets=_UNET_ATTENTION, rank=LORA_RANK, alpha=2 * LORA_RANK),
        "siva": dict(targets=("to_q", "to_v"), perc=0.95),
        "rlrr": dict(targets=_UNET_ATTENTION + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"), ssf=False),
    }
    methods.apply(model, method, trainable=(), **_backend_option(backend), **overrides.get(method, {}))


def _latent_ids(tokens: int, device: torch.device) -> torch.Tensor:
    """Flux's (0, row, column) position ids of a square latent grid (one row if ``tokens`` is not a square)."""
    side = int(tokens ** 0.5)
    rows, cols = (side, side) if side * side == tokens else (1, tokens)
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cat([torch.zeros(tokens, 1), grid.float()], dim=1).to(device)


def _flux_workload(model: Callable, params: list[torch.Tensor], shape: Shape, device: torch.device,
                   dtype: torch.dtype, label: str) -> Workload:
    batch, image, text, _, hidden = shape
    text_dim, pooled_dim = _flux_widths(hidden)
    g = torch.Generator(device=device).manual_seed(1)
    latents = torch.randn(batch, image, 64, generator=g, device=device).to(dtype)
    noise = torch.randn(batch, image, 64, generator=g, device=device).to(dtype)
    t = torch.rand(batch, generator=g, device=device)
    noisy = ((1 - t[:, None, None]) * latents + t[:, None, None] * noise).to(dtype)
    inputs = dict(encoder_hidden_states=torch.randn(batch, text, text_dim, generator=g, device=device).to(dtype),
                  pooled_projections=torch.randn(batch, pooled_dim, generator=g, device=device).to(dtype),
                  timestep=t.to(dtype), guidance=torch.full((batch,), 3.5, device=device, dtype=dtype),
                  img_ids=_latent_ids(image, device), txt_ids=torch.zeros(text, 3, device=device))

    def forward() -> torch.Tensor:
        return model(hidden_states=noisy, **inputs).sample

    step = _adamw_step(params, lambda: nn.functional.mse_loss(forward().float(), (noise - latents).float()))
    return Workload(forward, params, None, label, train_step=step, items=(batch, "img"))


_FLUX = _Task(_flux, _apply_flux, _flux_workload, _unet_peft_config, "HF PEFT LoRA on to_q, to_k, to_v, to_out.0")


def flux_variants(backend: Optional[str] = None, methods: Sequence[str] = UNET_METHODS) -> list[Variant]:
    return _variants(_FLUX, backend, methods)


E2E_FLUX = _e2e_case(
    "e2e-flux", "one flow-matching training step (fwd + bwd + AdamW) of Flux-style blocks per method vs PEFT LoRA",
    flux_variants, ("batch", "image", "text", "blocks", "hidden"),
    presets={"flux": {"any": [(1, 4096, 512, 2, 3072)]}, "cpu": {"any": [(1, 1024, 64, 1, 256)]}},
    default_presets={"cuda": ["flux"], "cpu": ["cpu"]},
)
