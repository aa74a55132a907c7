"""Apply a method to a whole model by module-name pattern, and report what it trains.

Patterns are shell-style globs (``fnmatch``). One without a dot is matched against a module name's
last component (``qkv``); one with dots against the full dotted name (``blocks.3.attn.qkv``) or its
trailing components, as PEFT's ``target_modules`` (``to_out.0`` matches
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0``).

timm's fused ``qkv`` projection (and GPT-2's ``c_attn``, Phi-3's ``qkv_proj``: the same [q; k; v]
output layout): the papers adapt W_q, W_k and W_v as three matrices. A layer whose last name component
is one of FUSED_QKV_NAMES is treated as those three (``RLRRLinear(splits=(d, d, d))``: one output scale
per row and one input scale per part; SiVA tunes the q and v parts), so the adapted model has exactly
the parameters of separate q, k, v layers. The three widths are those the attention module declares
(grouped-query layers have narrower k and v), else equal thirds (:func:`fused_qkv_splits`).
``fused_qkv="shared"`` instead treats it as one matrix (one input scale for all three; 2·768 fewer
parameters per block on ViT-B).
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from .nn import SSF, SVD_METHODS, RLRRLinear, SVDLinear
from .nn.base import BITFIT_MARK, MergeableLinear
from .nn.attention import TimmCoeffAttention
from .nn.sdpa_head_mixing import with_head_mixing

__all__ = [
    "AdaptReport",
    "RLRR_LINEAR_TARGETS",
    "RLRR_SSF_TARGETS",
    "TASK_HEADS",
    "apply_coeff",
    "apply_rlrr",
    "apply_svd",
    "check_patterns_match",
    "count_parameters",
    "find_linears",
    "find_modules",
    "find_parameters",
    "make_weights_contiguous",
    "merge_all",
    "merge_blockers",
    "unmerge_all",
    "replace_module",
    "unadapted_expert_parameters",
]

# q, k, v (or timm's fused qkv), the attention output projection and the two MLP layers.
RLRR_LINEAR_TARGETS = ("q", "k", "v", "qkv", "proj", "fc1", "fc2")
# After every LayerNorm, the patch embedding and the final norm (RLRR / SSF recipe).
RLRR_SSF_TARGETS = ("patch_embed", "norm1", "norm2", "norm", "fc_norm")
# timm's task heads, trained in full: the classifier and DeiT's distillation head.
TASK_HEADS = ("head", "head_dist")
# Fused q, k, v projections, [q; k; v] along the output: timm's qkv, GPT-2's c_attn (a Conv1D), Phi-3's
# qkv_proj (grouped-query: fewer k, v rows than q rows).
FUSED_QKV_NAMES = ("qkv", "c_attn", "qkv_proj")


def _int_attr(obj: object, *names: str) -> Optional[int]:
    """The first of ``obj``'s attributes ``names`` that is an int, else None."""
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _declared_qkv_sizes(attention: nn.Module) -> Optional[tuple[int, int, int]]:
    """The q, k, v widths an attention module declares: ``q_dim``/``kv_dim`` (EXAONE-4.5's vision
    attention), or heads × head size with a separate number of key/value heads (grouped-query attention),
    on the module or its ``config`` (transformers: Phi-3)."""
    q_dim, kv_dim = _int_attr(attention, "q_dim"), _int_attr(attention, "kv_dim")
    if q_dim is not None and kv_dim is not None:
        return q_dim, kv_dim, kv_dim
    head_dim = _int_attr(attention, "head_dim")
    for holder in (attention, getattr(attention, "config", None)):
        heads = _int_attr(holder, "num_heads", "num_attention_heads")
        kv_heads = _int_attr(holder, "num_key_value_heads", "num_kv_heads")
        if head_dim is not None and heads is not None and kv_heads is not None:
            return heads * head_dim, kv_heads * head_dim, kv_heads * head_dim
    return None


@functools.lru_cache(maxsize=None)
def _forward_splits_qkv_per_head(cls: type) -> bool:
    """Whether ``cls.forward`` reshapes the fused projection's output to heads first and splits q, k, v
    within each head (TinyViT: ``qkv.view(B, N, self.num_heads, -1).split([kd, kd, vd], dim=3)``), rather
    than [q; k; v] blocks (timm's ViT: ``reshape(B, N, 3, self.num_heads, head_dim)``)."""
    try:
        source = inspect.getsource(inspect.unwrap(cls.forward))
    except (OSError, TypeError):
        return False
    blocks_first = re.search(r"\b3\s*,\s*(?:self\.)?(?:num_heads|heads|n_heads)\b", source)
    heads_first = re.search(r"(?:view|reshape)\([^()]*(?:num_heads|heads)\s*,\s*-1\s*\)\s*\.\s*(?:split|chunk)",
                            source)
    return heads_first is not None and blocks_first is None


def _qkv_per_head(attention: nn.Module) -> bool:
    """Whether ``attention`` lays its fused q, k, v projection out per head: timm's MaxViT/CoAtNet ``*_rw``
    attention (``head_first=True``) and TinyViT's (see :func:`_forward_splits_qkv_per_head`)."""
    return getattr(attention, "head_first", False) is True or _forward_splits_qkv_per_head(type(attention))


def fused_qkv_splits(model: nn.Module, name: str, linear: nn.Linear) -> Optional[tuple[int, int, int]]:
    """The widths of q, k and v in a fused projection (:data:`FUSED_QKV_NAMES`), None for other layers.

    They are the sizes the parent attention module declares when it does (grouped-query layers, whose
    k and v are narrower than q), else equal thirds when the layer has 3·d outputs for d inputs or the
    parent's heads × head size is a third of them (every timm ``qkv``). A ``c_attn`` with other sizes is
    not a fused qkv (GPT-2's cross attention holds [k; v] only). Raises ValueError for a ``qkv`` /
    ``qkv_proj`` whose split cannot be known: guessing thirds would scale the wrong rows silently."""
    last = name.rsplit(".", 1)[-1]
    if last not in FUSED_QKV_NAMES:
        return None
    out, parent_name = linear.out_features, name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if last != "c_attn" and _qkv_per_head(parent):
        raise ValueError(f"{name}: {type(parent).__name__} lays its fused q, k, v out per head ([q_h; k_h; v_h] for "
                         "each head h), so no split into three blocks of rows gives q, k and v; use "
                         "fused_qkv='shared' (one matrix) where the method has it, or leave it out of the targets")
    declared = _declared_qkv_sizes(parent)
    if declared is not None and sum(declared) == out:
        return declared
    heads, head_dim = _int_attr(parent, "num_heads", "heads"), _int_attr(parent, "head_dim")
    if out % 3 == 0 and (out == 3 * linear.in_features or (heads and head_dim and 3 * heads * head_dim == out)):
        return (out // 3,) * 3
    if last == "c_attn":
        return None
    raise ValueError(f"{name}: a fused q, k, v projection with {out} outputs for {linear.in_features} inputs, and "
                     f"{type(parent).__name__} does not declare its q, k, v sizes (q_dim/kv_dim, or num_heads, "
                     "head_dim and num_key_value_heads), so where q ends is unknown; use fused_qkv='shared' "
                     "(one matrix) where the method has it, or leave it out of the targets")


@dataclass
class AdaptReport:
    """What an ``apply_*`` call changed: layers touched and parameter counts."""

    method: str
    layers: list[str] = field(default_factory=list)
    adapter_params: int = 0
    other_trainable_params: int = 0
    backbone_params: int = 0
    details: dict = field(default_factory=dict)  # per-layer facts, e.g. SiVA's k per part

    @property
    def trainable_params(self) -> int:
        return self.adapter_params + self.other_trainable_params

    @property
    def permille(self) -> float:
        """Adapter parameters per thousand backbone parameters."""
        return 1000.0 * self.adapter_params / max(self.backbone_params, 1)

    def __str__(self) -> str:
        text = (
            f"{self.method}: {len(self.layers)} layers adapted, adapter params {self.adapter_params:,} "
            f"({self.permille:.2f}‰ of {self.backbone_params:,} backbone params), "
            f"other trainable {self.other_trainable_params:,}, total trainable {self.trainable_params:,}"
        )
        experts = self.details.get("experts_not_adapted")
        return f"{text}; {experts['message']}" if experts else text


def _matches(name: str, patterns: Iterable[str]) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(last, p) if "." not in p else
               fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


def check_patterns_match(model: nn.Module, *, trainable: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
    """Raise ValueError when a ``trainable`` or ``exclude`` pattern matches no module of ``model``: a typo
    in ``trainable`` would otherwise leave the task head frozen without a word. Patterns of the registry's
    defaults (``methods.DEFAULT_TRAINABLE``, ``DEFAULT_EXCLUDE``) are exempt: they list the heads and
    exclusions of several model families at once, so on one model most of them match nothing."""
    from .methods import DEFAULT_EXCLUDE, DEFAULT_TRAINABLE

    names = [name for name, _ in model.named_modules() if name]
    for argument, patterns in (("trainable", trainable), ("exclude", exclude)):
        unmatched = [p for p in patterns if p not in DEFAULT_TRAINABLE + DEFAULT_EXCLUDE
                     and not any(_matches(name, (p,)) for name in names)]
        if unmatched:
            raise ValueError(f"{argument} pattern(s) {unmatched} match no module of {type(model).__name__} "
                             f"(patterns are find_modules globs over module names)")


def find_modules(model: nn.Module, patterns: Sequence[str], kind: type = nn.Module,
                 skip_under: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module of type ``kind`` whose name matches one of ``patterns``, except
    modules matching ``skip_under`` and everything inside them.

    The ``apply_*`` functions pass their ``trainable`` patterns as ``skip_under``: a module trained in
    full (the task head) gets no adapter. SigLIP's pooling ``head`` holds an ``mlp.fc1``/``fc2`` that the
    default targets name; an adapter there would be trained beside the full weights it adapts (or, for
    the SVD methods, would refuse the weight's gradient)."""
    inside = _inside(model, skip_under)
    return [(name, m) for name, m in model.named_modules() if name and isinstance(m, kind) and _matches(name, patterns)
            and not inside(name)]


def _inside(model: nn.Module, skip_under: Sequence[str]) -> Callable[[str], bool]:
    """Whether a module name is one of the modules matching ``skip_under`` or inside one."""
    skipped = [name for name, _ in model.named_modules() if name and _matches(name, skip_under)] if skip_under else []
    return lambda name: any(name == s or name.startswith(s + ".") for s in skipped)


def find_parameters(model: nn.Module, patterns: Sequence[str],
                    skip_under: Sequence[str] = ()) -> list[tuple[str, nn.Module, str]]:
    """``(name, owner, attribute)`` of every parameter whose dotted name (``layers.0.mlp.experts.down_proj``)
    matches one of ``patterns`` (the rules of :func:`find_modules`: ``down_proj`` matches the last
    component), outside the modules matching ``skip_under``. A parameter that already has a
    ``torch.nn.utils.parametrize`` parametrization (one adapted by ``target_parameters``) is listed under
    its own name, not as ``parametrizations.<name>.original``."""
    from torch.nn.utils import parametrize

    inside = _inside(model, skip_under)
    found = []
    for mname, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList) or inside(mname):
            continue
        names = [n for n, p in module._parameters.items() if p is not None]
        if parametrize.is_parametrized(module):
            names += list(module.parametrizations)
        found += [(_join_name(mname, n), module, n) for n in names if _matches(_join_name(mname, n), patterns)]
    return found


def _join_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def unadapted_expert_parameters(model: nn.Module) -> list[str]:
    """Names of the 3-D parameters of Mixture-of-Experts experts modules (a layout :func:`expert_layout`
    knows) that carry no adapter: a LoRA-type method adapts them only when its config names them in
    ``target_parameters``."""
    from torch.nn.utils import parametrize

    from .nn.experts import expert_layout

    return [_join_name(mname, n) for mname, module in model.named_modules()
            if not isinstance(module, parametrize.ParametrizationList) and expert_layout(module) is not None
            for n, p in module._parameters.items() if p is not None and p.dim() == 3]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and its family): ``y = x W + b`` with W stored [in, out]."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, Tensor) \
        and weight.dim() == 2


def conv1d_as_linear(module: nn.Module) -> nn.Linear:
    """An nn.Linear computing what a transformers ``Conv1D`` computes, on the same memory: its weight is
    the transposed view of the Conv1D's [in, out] weight (no copy: every backend takes either
    orientation, and the cpu kernels use it in place), its bias the Conv1D's own Parameter."""
    weight = module.weight
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach().t(), requires_grad=weight.requires_grad)
    linear.bias = module.bias
    return linear


def find_linears(model: nn.Module, patterns: Sequence[str],
                 skip_under: Sequence[str] = ()) -> list[tuple[str, nn.Linear]]:
    """``(name, layer)`` of every nn.Linear whose name matches ``patterns`` (outside ``skip_under``, see
    :func:`find_modules`), and of every matching transformers ``Conv1D`` as an nn.Linear on its memory
    (:func:`conv1d_as_linear`). Raises ValueError for a layer its parent does not call (see
    :func:`_check_called`)."""
    found = [(name, m if isinstance(m, nn.Linear) else conv1d_as_linear(m))
             for name, m in find_modules(model, patterns, skip_under=skip_under)
             if isinstance(m, nn.Linear) or is_conv1d(m)]
    for name, _ in found:
        _check_called(model, name)
    return found


@functools.lru_cache(maxsize=None)
def _forward_reads_weight(cls: type, child: str) -> bool:
    """Whether ``cls.forward``'s source multiplies by ``self.<child>.weight`` itself: passes it to a
    ``linear(...)`` call (``F.linear(x, weight=self.qkv.weight, bias=...)``) or to ``@``. There the layer's
    weight is used without calling the layer. (Reading it for other purposes, as T5's
    ``self.wo.weight.dtype``, is fine.)"""
    try:
        source = inspect.getsource(inspect.unwrap(cls.forward))
    except (OSError, TypeError):
        return False
    weight = rf"self\.{re.escape(child)}\.weight\b(?!\.(?:dtype|device|shape))"
    return re.search(rf"linear\((?:[^()]|\([^()]*\))*{weight}|@\s*{weight}", source) is not None


def _check_called(model: nn.Module, name: str) -> None:
    """An adapter on a layer whose parent reads its weight instead of calling it would be silently
    ignored (no effect, no gradient). timm's BEiT, EVA and Swin-V2 attention do that with their q/v
    biases, unless ``qkv_bias_separate`` (then they call ``qkv`` and add the biases):
    :func:`_route_qkv_through_layer` switches it on for adapted layers. Other such parents are refused."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    # nn.MultiheadAttention hands out_proj.weight to F.multi_head_attention_forward (OpenCLIP, torchvision ViT)
    reads_weight = isinstance(parent, nn.MultiheadAttention) or _forward_reads_weight(type(parent), child)
    if reads_weight and not (child == "qkv" and hasattr(parent, "qkv_bias_separate")):
        raise ValueError(f"{name}: {type(parent).__name__}.forward reads self.{child}.weight directly instead of "
                         f"calling the layer, so an adapter on it would be silently ignored; leave {child!r} out "
                         "of the targets")


def _route_qkv_through_layer(model: nn.Module) -> None:
    """Make timm attention with separate q/v biases (BEiT, EVA, Swin-V2) call an adapted ``qkv`` and add
    the biases after it, instead of ``F.linear(x, qkv.weight, biases)``: the same function, with the
    adapter in it. The flag stays on after unloading (the plain layer computes the same) and is needed
    after merging when the merge gave ``qkv`` a bias (RLRR's shift), which the F.linear path would drop."""
    for m in model.modules():
        if getattr(m, "qkv_bias_separate", True) is False and getattr(m, "q_bias", None) is not None \
                and type(getattr(m, "qkv", None)).__module__.startswith("subspace_ops.nn"):
            m.qkv_bias_separate = True


def no_linear_error(model: nn.Module, argument: str, patterns: Sequence[str]) -> ValueError:
    """The error for ``patterns`` that match no linear layer, naming the types of what they do match."""
    others: dict[str, int] = {}
    for _, m in find_modules(model, patterns):
        others[type(m).__name__] = others.get(type(m).__name__, 0) + 1
    found = "; they match " + ", ".join(f"{count} {kind}" for kind, count in others.items()) if others else ""
    return ValueError(f"{argument} {tuple(patterns)} match no nn.Linear (or transformers Conv1D) in "
                      f"{type(model).__name__}{found}")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _is_rms_norm(module: nn.Module) -> bool:
    """torch's RMSNorm or a model library's own (transformers' LlamaRMSNorm, Qwen2RMSNorm, …, and T5's
    T5LayerNorm, an RMSNorm by another name, with mT5's, UMT5's and LongT5's copies; timm's RmsNorm and
    the channels-first RmsNorm2d)."""
    rms_norm = getattr(nn, "RMSNorm", None)
    name = type(module).__name__
    return (rms_norm is not None and isinstance(module, rms_norm)) \
        or name.endswith(("RMSNorm", "T5LayerNorm", "RmsNorm", "RmsNorm2d"))  # the last two: timm's


def _ssf_for(module: nn.Module) -> Optional[SSF]:
    """An SSF wrapper for a LayerNorm, an RMSNorm or a patch embedding with a ``proj`` / ``projection``
    (whose output is [B, tokens, channels]); None for others.

    After an RMSNorm (LLaMA-style models) SSF trains and runs like after a LayerNorm, but cannot be
    merged: the norm has no bias to take β (``merge()`` raises NotMergeableError, merge_all merges
    nothing)."""
    if isinstance(module, SSF):  # already adapted (it shows its inner module's attributes, proj included)
        return None
    if isinstance(module, nn.LayerNorm):
        if not module.elementwise_affine or len(module.normalized_shape) != 1:
            return None
        # timm's LayerNorm2d (ConvNeXt) normalizes the channels of a [B, C, H, W] map
        channels_first = type(module).__name__.endswith("2d")
        return SSF(module, module.normalized_shape[0], channel_dim=1 if channels_first else -1)
    if _is_rms_norm(module):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 1:
            return None
        return SSF(module, weight.shape[0], channel_dim=1 if type(module).__name__.endswith("2d") else -1)
    for name in ("proj", "projection"):  # timm's PatchEmbed; transformers' ViT/DeiT/DINOv2 patch embeddings
        proj = getattr(module, name, None)
        if isinstance(proj, (nn.Conv2d, nn.Linear)):
            channels = proj.out_channels if isinstance(proj, nn.Conv2d) else proj.out_features
            # γ, β fold into the module's last op: the norm after the projection where there is one (timm's
            # Swin PatchEmbed), else the projection
            return SSF(module, channels, fold_into="norm" if _patch_norm(module) is not None else name)
    return None


def _patch_norm(module: nn.Module) -> Optional[nn.Module]:
    """The norm a (timm) patch embedding applies after its projection, if any."""
    norm = getattr(module, "norm", None)
    return norm if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity) else None


def ssf_layers(model: nn.Module, patterns: Sequence[str], skip_under: Sequence[str] = ()) -> list[tuple[str, SSF]]:
    """``(name, SSF)`` for every LayerNorm, RMSNorm or patch embedding matching ``patterns`` (outside
    ``skip_under``, see :func:`find_modules`). A patch embedding that ends in a matched norm (Swin's
    ``patch_embed`` and ``patch_embed.norm``) gets no SSF of its own: the norm's is at the same place,
    and two in a row would only add parameters."""
    found = find_modules(model, patterns, skip_under=skip_under)
    names = {name for name, _ in found}
    layers = []
    for name, module in found:
        if _patch_norm(module) is not None and f"{name}.norm" in names:
            continue
        layer = _ssf_for(module)
        if layer is not None:
            layers.append((name, layer))
    return layers


def apply_rlrr(
    model: nn.Module,
    *,
    targets: Sequence[str] = RLRR_LINEAR_TARGETS,
    ssf: bool = True,
    ssf_targets: Sequence[str] = RLRR_SSF_TARGETS,
    fused_qkv: str = "split",
    trainable: Sequence[str] = TASK_HEADS,
    exclude: Sequence[str] = (),
    backend: Optional[str] = None,
) -> AdaptReport:
    """RLRR (paper 000) on ``model`` in place: rescaled Linear layers + SSF after norms.

    Every parameter not created here is frozen except modules matching ``trainable`` (default:
    the classification ``head``, trained in the paper's VTAB/FGVC runs). Nothing inside a ``trainable``
    or ``exclude`` module is adapted. Raises ValueError when ``targets`` (or, with ``ssf=True``,
    ``ssf_targets``) match no module.
    """
    if fused_qkv not in ("split", "shared"):
        raise ValueError(f"fused_qkv must be 'split' or 'shared', got {fused_qkv!r}")
    check_patterns_match(model, trainable=trainable, exclude=exclude)
    skip = tuple(trainable) + tuple(exclude)
    linears = find_linears(model, targets, skip_under=skip)
    if not linears:
        raise no_linear_error(model, "targets", targets)
    norms = ssf_layers(model, ssf_targets, skip_under=skip) if ssf else []
    if ssf and not norms:
        raise ValueError(f"ssf_targets {tuple(ssf_targets)} match no LayerNorm, RMSNorm or patch embedding in "
                         f"{type(model).__name__}; name its norms, or pass ssf=False for the rescaled linear "
                         "layers alone")
    splits = {name: fused_qkv_splits(model, name, linear) if fused_qkv == "split" else None for name, linear in linears}
    report, backbone = _start_report(model, "rlrr")  # nothing is changed before the checks pass
    for name, linear in linears:
        replace_module(model, name, RLRRLinear(linear, splits=splits[name], backend=backend))
        report.layers.append(name)

    for name, layer in norms:
        replace_module(model, name, layer)
        report.layers.append(name)

    return _finish_report(model, report, backbone, trainable)


_WRAPPED = ("weight", "bias")  # a subspace_ops layer's parameters that are the wrapped layer's own


def _layer_parameter_ids(model: nn.Module, wrapped: bool) -> set[int]:
    """ids of the direct parameters of every subspace_ops layer in ``model``: the wrapped layer's own
    ``weight``/``bias`` (wrapped=True) or the ones the layer added (False)."""
    return {id(p) for m in model.modules()
            if type(m).__module__.startswith("subspace_ops.nn") and not getattr(type(m), "_holds_backbone", False)
            for n, p in m.named_parameters(recurse=False) if (n in _WRAPPED) == wrapped}


def _peft_adapter_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the adapter parameters of HF PEFT tuner layers (``lora_A``, ``lora_B``, ``ia3_l``...,
    PEFT's ``adapter_layer_names``), e.g. from diffusers' ``unet.add_adapter(LoraConfig(...))``."""
    if "peft" not in sys.modules:  # no PEFT layer can exist
        return set()
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {id(p) for m in model.modules() if isinstance(m, BaseTunerLayer)
            for attr in m.adapter_layer_names if isinstance(getattr(m, attr, None), nn.Module)
            for p in getattr(m, attr).parameters()}


def _bitfit_bias_ids(model: nn.Module) -> set[int]:
    """ids of the biases BitFit trains (modules carrying ``nn.base.BITFIT_MARK``)."""
    return {id(m.bias) for m in model.modules()
            if getattr(m, BITFIT_MARK, False) and isinstance(getattr(m, "bias", None), nn.Parameter)}


def adapter_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters added by an earlier ``apply_*`` call (the direct parameters of subspace_ops layers,
    except the wrapped layer's own ``weight``/``bias``), the biases an earlier BitFit trains, or HF
    PEFT's (its tuner layers' adapter parameters): a method applied after them leaves their
    ``requires_grad`` as it is."""
    return _layer_parameter_ids(model, wrapped=False) | _bitfit_bias_ids(model) | _peft_adapter_parameter_ids(model)


def _start_report(model: nn.Module, method: str) -> tuple[AdaptReport, set[int]]:
    """Freeze every existing parameter (but those of methods applied earlier: methods combine) and
    remember them as the backbone."""
    earlier = adapter_parameter_ids(model)
    report = AdaptReport(method, backbone_params=sum(p.numel() for p in model.parameters() if id(p) not in earlier))
    for p in model.parameters():
        if id(p) not in earlier:
            p.requires_grad_(False)
    return report, {id(p) for p in model.parameters()}


def _finish_report(model: nn.Module, report: AdaptReport, backbone: set[int], trainable: Sequence[str]) -> AdaptReport:
    """Unfreeze the ``trainable`` modules and count adapter vs other trainable parameters."""
    for _, module in find_modules(model, trainable) if trainable else []:
        for p in module.parameters():
            p.requires_grad_(True)
    # A wrapped layer's weight/bias are the backbone's, also where they are new Parameter objects on its
    # memory (a transformers Conv1D's weight seen transposed, conv1d_as_linear).
    wrapped = _layer_parameter_ids(model, wrapped=True)
    for p in model.parameters():
        if id(p) not in backbone and id(p) not in wrapped:
            report.adapter_params += p.numel()
        elif p.requires_grad:
            report.other_trainable_params += p.numel()
    _route_qkv_through_layer(model)
    return report


# SiVA adapts the query and value projections (002 §4); the other SVD methods every matrix.
SVD_TARGETS = {
    "siva": ("q", "v", "qkv", "query", "value", "c_attn"),
    "sam-parser": RLRR_LINEAR_TARGETS,
    "svdiff": RLRR_LINEAR_TARGETS,
}


def apply_svd(
    model: nn.Module,
    method: str = "siva",
    *,
    targets: Optional[Sequence[str]] = None,
    trainable: Sequence[str] = TASK_HEADS,
    exclude: Sequence[str] = (),
    backend: Optional[str] = None,
    **layer_options,
) -> AdaptReport:
    """SiVA / SAM-PARSER / SVDiff on ``model``'s Linear layers, in place (see :class:`SVDLinear`).

    A Linear named ``qkv`` is split into q, k, v parts; SiVA tunes q and v only (its paper's
    choice), the others all three. Nothing inside a ``trainable`` or ``exclude`` module is adapted.
    ``layer_options`` go to SVDLinear (perc, criterion, rank, path). The report's ``details`` give each
    layer's k per part and the SVD time.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"method must be one of {SVD_METHODS}, got {method!r}")
    targets = SVD_TARGETS[method] if targets is None else targets
    check_patterns_match(model, trainable=trainable, exclude=exclude)
    linears = find_linears(model, targets, skip_under=tuple(trainable) + tuple(exclude))
    if not linears:
        raise no_linear_error(model, "targets", targets)
    fused_parts = {name: fused_qkv_splits(model, name, linear) for name, linear in linears}  # checks first
    report, backbone = _start_report(model, method)
    for name, linear in linears:
        options = dict(layer_options)
        parts = fused_parts[name]
        if parts is not None:
            options.setdefault("parts", parts)
            options.setdefault("tuned_parts", (0, 2) if method == "siva" else (0, 1, 2))
        layer = SVDLinear(linear, method, backend=backend, **options)
        replace_module(model, name, layer)
        report.layers.append(name)
        report.details[name] = f"k={list(layer.ranks)} svd={layer.attach_seconds * 1e3:.1f}ms"
    return _finish_report(model, report, backbone, trainable)


# timm attention classes whose forward TimmCoeffAttention reproduces: fused qkv on [B, N, C] tokens, optional
# q/k norm, scale norm and gate, no position bias (timm.models.vision_transformer held it before timm 1.0.16).
TIMM_PLAIN_ATTENTION = (("timm.layers.attention", "Attention"), ("timm.models.vision_transformer", "Attention"),
                        ("timm.models.metaformer", "Attention"))


# Other timm attention computing with SDPA (after its own q, k, v and mask) that with_head_mixing is tested on
# (tests/test_timm_apply.py): α = 0 gives the module's output, and α mixes the heads of its one SDPA call.
# Swin-V2 computes its cosine attention by hand: its copy runs the SDPA form in nn/sdpa_forms.py.
TIMM_SDPA_ATTENTION = (("timm.models.swin_transformer", "WindowAttention"), ("timm.models.beit", "Attention"),
                       ("timm.models.eva", "EvaAttention"), ("timm.layers.attention", "AttentionRope"),
                       ("timm.models.vision_transformer_relpos", "RelPosAttention"), ("timm.models.pvt_v2", "Attention"),
                       ("timm.models.tiny_vit", "Attention"),
                       ("timm.models.swin_transformer_v2", "WindowAttention"),
                       # attention pooling (global_pool="map": SigLIP, ...): latent queries, Nq != Nk
                       ("timm.layers.attention_pool", "AttentionPoolLatent"))


def _timm_attention_blocks(model: nn.Module, skip_under: Sequence[str] = ()
                           ) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """timm's plain ``Attention`` blocks of ``model`` (for :class:`TimmCoeffAttention`) and its
    TIMM_SDPA_ATTENTION modules (Swin, BEiT, EVA, attention pooling, ...; for
    :func:`~subspace_ops.nn.sdpa_head_mixing.with_head_mixing`), outside the modules matching
    ``skip_under`` (as :func:`find_modules`: a module trained in full gets no adapter). Raises ValueError
    naming any other timm multi-head attention (no SDPA path, or an SDPA call whose heads are merged into
    another dimension, as SAM's ViT and NesT do): replacing it would drop what it computes, and adapting
    only the other blocks would be a different method. Other pooling (``AttentionPool2d``, whose output
    is a pooled vector for a ResNet's head) is left as it is."""
    plain, sdpa, others = [], [], []
    for name, m in find_modules(model, ("*",), skip_under=skip_under):
        cls = type(m)
        kind = (cls.__module__, cls.__name__)
        if kind in TIMM_PLAIN_ATTENTION and hasattr(m, "qkv"):
            plain.append((name, m))
        elif kind in TIMM_SDPA_ATTENTION:
            sdpa.append((name, m))
        elif cls.__module__.startswith("timm.") and "Pool" not in cls.__name__ \
                and any(hasattr(m, a) for a in ("num_heads", "heads")) \
                and any(hasattr(m, a) for a in ("qkv", "q", "q_proj", "kv", "wq", "qk", "in_proj")):
            others.append((name, m))
    if others:
        kinds = sorted(set(f"{type(m).__module__}.{type(m).__name__}" for _, m in others))
        plain_names = [kind for kind in TIMM_PLAIN_ATTENTION if kind[0] != "timm.models.vision_transformer"]  # alias
        supported = ", ".join(f"{m}.{c}" for m, c in plain_names + list(TIMM_SDPA_ATTENTION))
        raise ValueError(f"Coeff-Tuning's head mixing supports timm's {supported}; not {', '.join(kinds)} "
                         f"({len(others)} modules, e.g. {others[0][0]}): nothing was changed")
    return plain, sdpa


def apply_coeff(
    model: nn.Module,
    *,
    dropout: float = 0.0,
    trainable: Sequence[str] = TASK_HEADS,
    backend: Optional[str] = None,
    exclude: Sequence[str] = (),
) -> AdaptReport:
    """Coeff-Tuning (paper 003) on ``model`` in place: a trainable α [H, H] per attention layer.

    timm VisionTransformer: every ``Attention`` block becomes a :class:`TimmCoeffAttention`; other timm
    attention that computes with SDPA (Swin, BEiT, EVA, the latent-query attention pooling
    ``AttentionPoolLatent``, ...) a copy with its SDPA call mixed (:mod:`subspace_ops.nn.sdpa_head_mixing`);
    none inside a ``trainable`` or ``exclude`` module.
    transformers models: every attention module gets a HeadMix and the model runs the
    ``"subspace_coeff"`` attention implementation (:mod:`subspace_ops.transformers`). diffusers
    models (UNets, PixArt, SD3, Flux): every attention module gets a head-mixing processor
    (:mod:`subspace_ops.diffusers`). ``dropout`` is the paper's dropout on α (0.1 when combined with
    SSF). Combines with methods applied earlier (their parameters stay trainable). Raises ValueError
    when the model has no attention blocks.
    """
    from . import diffusers as diffusers_integration

    check_patterns_match(model, trainable=trainable, exclude=exclude)
    plain, sdpa = _timm_attention_blocks(model, skip_under=tuple(trainable) + tuple(exclude))
    blocks = plain + sdpa
    hf_modules, diffusers_modules = [], []
    if not blocks and hasattr(model, "set_attn_implementation"):
        from .transformers import check_attachable

        hf_modules = check_attachable(model)
    if not blocks and not hf_modules and diffusers_integration.has_attention(model):
        diffusers_modules = diffusers_integration.check_attachable(model)
    if not blocks and not hf_modules and not diffusers_modules:
        raise ValueError(f"no timm Attention blocks, transformers attention modules or diffusers Attention modules "
                         f"found in {type(model).__name__}")
    layers = [TimmCoeffAttention(block, dropout=dropout, backend=backend) for _, block in plain]  # checks first
    layers += [with_head_mixing(block, block.num_heads, dropout=dropout, backend=backend) for _, block in sdpa]
    report, backbone = _start_report(model, "coeff")
    for (name, _), layer in zip(blocks, layers):
        replace_module(model, name, layer)
        report.layers.append(name)
    if hf_modules:
        from .transformers import attach_head_mix

        report.layers.extend(attach_head_mix(model, dropout=dropout, backend=backend, modules=hf_modules))
    if diffusers_modules:
        report.layers.extend(diffusers_integration.attach_head_mix(model, dropout=dropout, backend=backend,
                                                                   modules=diffusers_modules))
    return _finish_report(model, report, backbone, trainable)


def make_weights_contiguous(model: nn.Module) -> int:
    """Give every adapted layer whose frozen weight is a transposed view (a GPT-2 ``Conv1D``'s, see
    :func:`conv1d_as_linear`) a contiguous copy of it; returns how many were changed.

    For FSDP2: ``fully_shard`` refuses non-contiguous parameters. The copy costs one weight-sized
    tensor per layer (the Conv1D's own [in, out] tensor is freed with it unless something else, such
    as a SubspacePeftModel kept for ``unload()``, still holds the Conv1D). Outputs are unchanged, and
    merge_and_unload still writes the merged weight back into the Conv1D."""
    changed = 0
    for m in model.modules():
        weight = getattr(m, "weight", None)
        if isinstance(m, MergeableLinear) and isinstance(weight, nn.Parameter) and not weight.is_contiguous():
            if m.merged:
                raise RuntimeError(f"{type(m).__name__} is merged; unmerge it before copying its weight")
            m.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=weight.requires_grad)
            changed += 1
    return changed


def merge_blockers(model: nn.Module) -> dict[str, str]:
    """``{module name: why}`` for every layer of ``model`` whose adaptation has no weight form
    (``mergeable`` False: an adapter with a nonlinearity, Coeff-Tuning's head mixing)."""
    return {name: m._not_mergeable() if hasattr(m, "_not_mergeable") else f"{type(m).__name__} has no weight form"
            for name, m in model.named_modules() if getattr(m, "mergeable", True) is False}


def merge_all(model: nn.Module) -> int:
    """``merge()`` every adapted layer of ``model``; returns how many were merged.

    Raises :class:`~subspace_ops.nn.NotMergeableError` before merging anything when a layer cannot
    be merged (:func:`merge_blockers`), so the model is never left half merged.
    """
    from .nn import NotMergeableError

    blocked = merge_blockers(model)
    if blocked:
        raise NotMergeableError(f"{len(blocked)} layer(s) cannot be merged, so nothing was merged: "
                                + "; ".join(dict.fromkeys(blocked.values())))
    layers = [m for m in model.modules() if hasattr(m, "merge") and hasattr(m, "merged") and not m.merged]
    for m in layers:
        m.merge()
    return len(layers)


def unmerge_all(model: nn.Module) -> int:
    """``unmerge()`` every merged layer of ``model``; returns how many were unmerged.

    Raises RuntimeError before unmerging anything when a layer would refuse (its merged weights changed
    since ``merge()``, e.g. by ``load_state_dict``), so the model is never left half unmerged.
    """
    layers = [m for m in model.modules() if hasattr(m, "unmerge") and getattr(m, "merged", False)]
    problems = [p for m in layers if callable(getattr(m, "unmerge_problem", None)) and (p := m.unmerge_problem())]
    if problems:
        raise RuntimeError(f"{len(problems)} layer(s) cannot be unmerged, so nothing was unmerged: " + problems[0])
    for m in layers:
        m.unmerge()
    return len(layers)


@torch.no_grad()
def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
