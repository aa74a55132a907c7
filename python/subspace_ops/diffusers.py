"""diffusers integration: Coeff-Tuning head mixing as an attention processor.

Coeff-Tuning's concept customization (003 §5.2) tunes α in every attention layer of the SDXL UNet
(together with LoRA or DoRA on the projections). diffusers' attention modules (``Attention`` in the
UNets of Stable Diffusion 1.x/2.x and SDXL, ``Transformer2DModel``/PixArt, SD3's MMDiT, Qwen-Image,
the VAE's mid-block; ``FluxAttention``, ``Flux2Attention``, ``WanAttention``... in Flux, Flux.2 and
the video transformers Wan, HunyuanVideo, LTX-Video) delegate the
attention computation to a swappable processor; :func:`attach_head_mix` gives each a processor that
computes what the module's own processor computes with the head-mixing op in place of SDPA (at
α = 0 the output is unchanged):

- the default processors (``AttnProcessor2_0``, ``AttnProcessor``) become a
  :class:`~subspace_ops.nn.CoeffAttnProcessor`, our transcription of what they compute;
- the processors in :data:`ROUTED_PROCESSORS` (fused q/k/v after ``fuse_qkv_projections()``, SD3's
  and Qwen-Image's joint attention, Flux's and Flux.2's double- and single-stream attention,
  HunyuanVideo's and LTX-Video's) become a copy of themselves whose one SDPA call is routed to the
  head-mixing op (:func:`~subspace_ops.nn.sdpa_head_mixing.processor_with_head_mixing`). In joint
  attention the image and text tokens form one sequence, so α mixes the heads' maps over both.
  Copies of processors that dispatch through diffusers' attention backends (Flux, Flux.2,
  Qwen-Image, Wan) run the native one (the one that calls SDPA);
- the processors in :data:`SUMMED_ATTENTION_PROCESSORS` add up several attentions of the same
  queries: IP-Adapter's decoupled cross attention (SD/SDXL UNets, SD3, Flux: the text's attention
  plus each image prompt's, over the image prompt's own key/value projections) and Wan's (one
  attention; in image-to-video cross attention two, text and image context). Their copies route
  every SDPA call, mixing the heads of each of those attention maps by the same α: each map is a
  softmax over its own keys, and α applies to every map the layer computes. The image-prompt
  projections stay the IP-Adapter's (shared with the replaced processor, frozen by Coeff).

Any other processor (added-KV, xFormers, sliced, a custom one) is refused with its name, before
anything changes, because its computation would be lost (for the sliced and xFormers ones, which
compute the default attention to save memory, the error says to set the default processor first).
The model's weights are untouched; :func:`detach_head_mix` puts the replaced processors back.
LoRA on the projections composes with it: ``methods.apply(unet, "lora", targets=("to_q", "to_k",
"to_v", "to_out.0"))`` or PEFT's ``unet.add_adapter(LoraConfig(...))``, before or after.
"""

from __future__ import annotations

import sys
from typing import Optional

from torch import nn

from .nn.attention import CoeffAttnProcessor
from .nn.sdpa_head_mixing import is_head_mixing, processor_with_head_mixing

__all__ = ["ROUTED_PROCESSORS", "SUMMED_ATTENTION_PROCESSORS", "attach_head_mix", "attention_modules",
           "carry_processor_state", "check_attachable", "detach_head_mix", "has_attention", "is_head_mix_processor",
           "processors", "set_processors"]

_DEFAULT_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")
# processors that compute their attention with exactly one SDPA call on [B, heads, N, d] (checked at each call)
ROUTED_PROCESSORS = ("FusedAttnProcessor2_0", "JointAttnProcessor2_0", "FusedJointAttnProcessor2_0",
                     "FluxAttnProcessor", "Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor",
                     "QwenDoubleStreamAttnProcessor2_0", "HunyuanVideoAttnProcessor2_0",
                     "LTXVideoAttnProcessor")
# processors that add up several attentions of the same queries, each an SDPA call mixed by the same α
SUMMED_ATTENTION_PROCESSORS = ("IPAdapterAttnProcessor2_0", "SD3IPAdapterJointAttnProcessor2_0",
                               "FluxIPAdapterAttnProcessor", "WanAttnProcessor")
_SUPPORTED = _DEFAULT_PROCESSORS + ROUTED_PROCESSORS + SUMMED_ATTENTION_PROCESSORS
# the default attention in slices or through xFormers (each skips some of the default's steps: q/k norms...)
_MEMORY_SAVING_PROCESSORS = ("SlicedAttnProcessor", "XFormersAttnProcessor", "AttnProcessorNPU")


def _attention_classes() -> Optional[tuple[type, ...]]:
    """diffusers' attention module classes when diffusers is imported (a model of them exists only then):
    ``Attention`` and the newer models' ``AttentionModuleMixin`` (``FluxAttention``...)."""
    if "diffusers" not in sys.modules:
        return None
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return Attention, AttentionModuleMixin


def is_head_mix_processor(processor: object) -> bool:
    """Whether ``processor`` is one :func:`attach_head_mix` set."""
    return isinstance(processor, CoeffAttnProcessor) or is_head_mixing(processor)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every diffusers ``Attention`` in ``model`` (whatever its processor)."""
    classes = _attention_classes()
    if classes is None:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, classes)]


def has_attention(model: nn.Module) -> bool:
    """Whether ``model`` contains diffusers ``Attention`` modules."""
    return bool(attention_modules(model))


def check_attachable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules :func:`attach_head_mix` would adapt; raises if any cannot be."""
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"no diffusers Attention modules found in {type(model).__name__}")
    for name, module in modules:
        processor = module.processor
        if is_head_mix_processor(processor):
            raise ValueError(f"{name} already has a head mix")
        if type(processor).__name__ not in _SUPPORTED:
            hint = ""
            if type(processor).__name__ in _MEMORY_SAVING_PROCESSORS:  # the default attention, computed another way
                hint = ("; it computes the default attention to save memory, which the head-mixing op does too: "
                        "call model.set_default_attn_processor() (or disable_xformers_memory_efficient_attention / "
                        "set_attention_slice(None)) first")
            raise ValueError(f"{name}: runs {type(processor).__name__}, not one of the processors head mixing "
                             f"reproduces {_SUPPORTED}; it would drop what that one computes{hint}")
        to_q = getattr(module, "to_q", None)
        features = to_q.out_features if to_q is not None else None
        if module.heads < 1 or (features is not None and features % module.heads):
            raise ValueError(f"{name}: {features} query features do not split into {module.heads} heads")
    return modules


def attach_head_mix(model: nn.Module, *, dropout: float = 0.0, backend: Optional[str] = None,
                    modules: Optional[list[tuple[str, nn.Module]]] = None) -> list[str]:
    """Set a zero-init :class:`CoeffAttnProcessor` on every attention module of ``model`` (or the
    given ``modules``, as returned by :func:`check_attachable`). Returns the module names. Checks
    everything before changing anything."""
    modules = check_attachable(model) if modules is None else modules
    for name, module in modules:
        device = next(module.parameters()).device
        if type(module.processor).__name__ in _DEFAULT_PROCESSORS:
            processor = CoeffAttnProcessor(module.heads, replaced=module.processor, dropout=dropout, backend=backend,
                                           device=device)
        else:
            processor = processor_with_head_mixing(
                module.processor, module.heads, dropout=dropout, backend=backend, device=device,
                sums_attentions=type(module.processor).__name__ in SUMMED_ATTENTION_PROCESSORS)
        processor.train(module.training)
        module.set_processor(processor)
    return [name for name, _ in modules]


# what a head-mixing copy has that the processor it replaced has not (or has otherwise, on purpose)
_OWN_STATE = ("replaced", "sums_attentions", "head_mix")


def carry_processor_state(source: object, target: object) -> None:
    """Give ``target`` the public attribute values ``source`` holds now, for the attributes ``target`` has:
    a head-mixing copy shares the replaced processor's attribute values only until one is rebound. An
    IP-Adapter scale set while the copy is in place (SD3's and Flux's ``set_ip_adapter_scale`` assign
    ``processor.scale``; so may a user) is the scale the user expects back when the copy is taken out,
    and the train/eval mode of an nn.Module processor is the model's current one. Private state (the
    copy's native ``_attention_backend``, nn.Module internals) stays each processor's own."""
    if not hasattr(target, "__dict__") or not hasattr(source, "__dict__"):
        return
    for key in list(vars(target)):
        if key.startswith("_") or key in _OWN_STATE or key not in vars(source):
            continue
        if vars(source)[key] is not vars(target)[key]:
            vars(target)[key] = vars(source)[key]


def _swaps_with(current: object, new: object) -> bool:
    """Whether ``new`` is the processor ``current`` (a head-mixing copy) replaced, or the copy of ``current``."""
    if is_head_mix_processor(current):
        return getattr(current, "replaced", None) is new
    return is_head_mix_processor(new) and getattr(new, "replaced", None) is current


def detach_head_mix(model: nn.Module) -> int:
    """Put back the processor each head-mix processor replaced, with the state set on the head-mix one
    since (e.g. an IP-Adapter scale, see :func:`carry_processor_state`). Returns how many."""
    count = 0
    for _, module in attention_modules(model):
        if is_head_mix_processor(module.processor):
            carry_processor_state(module.processor, module.processor.replaced)
            module.set_processor(module.processor.replaced)
            count += 1
    return count


def processors(model: nn.Module) -> dict[str, object]:
    """Every attention module's current processor, by module name (to restore with :func:`set_processors`)."""
    return {name: m.processor for name, m in attention_modules(model)}


def set_processors(model: nn.Module, by_name: dict[str, object]) -> None:
    """Set the processors :func:`processors` returned (modules not named keep theirs). Between a head-mix
    processor and the one it replaced, the state set on the current one carries over (:func:`carry_processor_state`)."""
    for name, module in attention_modules(model):
        if name in by_name and module.processor is not by_name[name]:
            if _swaps_with(module.processor, by_name[name]):
                carry_processor_state(module.processor, by_name[name])
            module.set_processor(by_name[name])
