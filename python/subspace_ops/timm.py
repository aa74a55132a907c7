"""timm integration: ``subspace_ops.timm.apply(vit, "rlrr")`` adapts a VisionTransformer in place.

Any registry method (:mod:`subspace_ops.methods`) applies to a timm ``VisionTransformer`` (or a subclass)
with the defaults the papers use on ViT, in timm's module names (:data:`TIMM_DEFAULTS`):

- the block linears are ``qkv`` (timm's fused q, k, v projection), ``proj``, ``fc1``, ``fc2``;
  ``rlrr``, ``siva``, ``sam-parser`` and ``svdiff`` split the fused ``qkv`` into q, k, v
  (:mod:`subspace_ops.adapters`), the other methods treat it as one matrix, as PEFT does on timm;
- RLRR rescales q, k, v, proj, fc1, fc2 and puts SSF after ``patch_embed``, ``norm1``, ``norm2`` and the
  final ``norm`` (``fc_norm`` when the model pools with one); ``ssf`` alone does the SSF part;
- SiVA tunes the q and v parts of ``qkv``; (IA)³ / SSL / SSB scale ``qkv`` (keys and values: as a whole)
  and ``fc2``'s input (the MLP activation); the Houlsby adapter goes after ``attn.proj`` and ``mlp.fc2``;
- Coeff-Tuning replaces every ``Attention`` block by :class:`~subspace_ops.nn.TimmCoeffAttention` and mixes
  the heads of the attention pooling (``attn_pool``, ``AttentionPoolLatent``, of ``global_pool="map"`` models
  such as SigLIP) too, unless it is inside a ``trainable`` module;
- the classifier ``head`` (and DeiT's distillation ``head_dist``) stays trainable (``trainable=("head", "head_dist")``).

Keyword arguments override any config field (``rank=16``, ``backend="cpu"``, ``targets=(...)``,
``trainable=()``...). A config *object* is used as it is (its fields are already explicit). The adapted
model still compiles with ``torch.compile`` (tested with ``fullgraph=True`` for RLRR + Coeff-Tuning).

(This module is ``subspace_ops.timm``; ``from __future__ import annotations`` and absolute imports
mean ``import timm`` / ``from timm.models... import ...`` below is the timm package, never this module.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Union

from torch import nn

from .adapters import RLRR_SSF_TARGETS, TASK_HEADS, AdaptReport

__all__ = ["TIMM_DEFAULTS", "TIMM_LINEAR_TARGETS", "apply", "is_vision_transformer"]

#: timm ViT block linears (q, k, v cover ViT variants with separate projections).
TIMM_LINEAR_TARGETS = ("qkv", "q", "k", "v", "proj", "fc1", "fc2")

#: Per method: the config fields :func:`apply` sets for a timm ViT unless given explicitly.
TIMM_DEFAULTS: dict[str, dict[str, Any]] = {
    "rlrr": {"targets": TIMM_LINEAR_TARGETS, "ssf_targets": RLRR_SSF_TARGETS},
    "ssf": {"targets": RLRR_SSF_TARGETS},
    "ssb": {"targets": ("qkv", "k", "v"), "ff_targets": ("fc2",)},
    "ssl": {"targets": ("qkv", "k", "v"), "ff_targets": ("fc2",)},
    "ia3": {"targets": ("qkv", "k", "v"), "ff_targets": ("fc2",)},
    "siva": {"targets": ("qkv", "q", "v")},
    "sam-parser": {"targets": TIMM_LINEAR_TARGETS},
    "svdiff": {"targets": TIMM_LINEAR_TARGETS},
    "coeff": {},
    "bitfit": {},
    "lora": {"targets": TIMM_LINEAR_TARGETS},
    "adalora": {"targets": TIMM_LINEAR_TARGETS},
    "trilora": {"targets": TIMM_LINEAR_TARGETS},
    "flora": {"targets": TIMM_LINEAR_TARGETS},
    "dora": {"targets": TIMM_LINEAR_TARGETS},
    "pa": {"targets": TIMM_LINEAR_TARGETS},
    "adapter": {"targets": ("*.attn.proj", "*.mlp.fc2")},
    "spectral": {"targets": TIMM_LINEAR_TARGETS},
}
for _fields in TIMM_DEFAULTS.values():
    _fields.setdefault("trainable", TASK_HEADS)
del _fields


def is_vision_transformer(model: object) -> bool:
    """Whether ``model`` is a timm ``VisionTransformer`` (False when timm is not installed)."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return False
    return isinstance(model, VisionTransformer)


def apply(model: nn.Module, method: Union[str, Any], **config: Any) -> AdaptReport:
    """Apply ``method`` (a registry name such as "rlrr", "coeff", "siva", "lora", or a config object) to
    the timm VisionTransformer ``model`` in place, with the timm defaults above; returns the report.

    ``config`` overrides config fields (e.g. ``rank=16``, ``backend="cpu"``). Raises TypeError for a model
    that is not a timm VisionTransformer and ValueError (from the registry) for unknown methods, unknown
    fields or invalid values; the model is unchanged when it raises.
    """
    if not is_vision_transformer(model):
        try:
            import timm  # noqa: F401  (the timm package: absolute import)
        except ImportError:
            raise TypeError("subspace_ops.timm.apply needs timm installed (pip install timm) and a timm "
                            f"VisionTransformer, got {type(model).__name__}") from None
        wrapped = " (a torch.compile wrapper: pass the model itself, compile after adapting)" \
            if hasattr(model, "_orig_mod") else ""
        raise TypeError(f"model must be a timm VisionTransformer, got {type(model).__name__}{wrapped}; for other "
                        "models use subspace_ops.methods.apply(model, method, targets=...)")
    from . import methods

    if isinstance(method, str):
        name = methods.get_config(method).name  # canonical; ValueError for unknown names, model untouched
        known = {f.name for f in dataclasses.fields(methods.METHODS[name].config)}
        defaults = {k: v for k, v in TIMM_DEFAULTS.get(name, {}).items() if k in known}
        method = methods.get_config(name, **{**defaults, **config})
        config = {}
    _, report = methods.apply(model, method, **config)
    return report
