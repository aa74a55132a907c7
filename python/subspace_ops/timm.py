"""timm integration: ``subspace_ops.timm.apply(vit, "rlrr")`` adapts a VisionTransformer in place.

Any registry method (:mod:`subspace_ops.methods`) applies to a timm ``VisionTransformer`` with the
defaults the papers use on ViT: RLRR rescales q, k, v (timm's fused ``qkv``, as three matrices),
proj, fc1, fc2 and puts SSF after ``patch_embed``, ``norm1``, ``norm2`` and ``norm``; Coeff-Tuning
replaces every ``Attention`` block by :class:`~subspace_ops.nn.TimmCoeffAttention`; SiVA tunes the
q and v parts of ``qkv``; the classifier ``head`` stays trainable. The adapted model still compiles
with ``torch.compile``.

(``import timm`` below is the timm package: this module's own name does not shadow it, imports are
absolute.)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .adapters import AdaptReport

__all__ = ["apply"]


def _is_vision_transformer(model: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return False
    return isinstance(model, VisionTransformer)


def apply(model: nn.Module, method: Any, **config: Any) -> AdaptReport:
    """Apply ``method`` (a registry name such as "rlrr", "coeff", "siva", "lora", or a config
    object) to the timm VisionTransformer ``model`` in place; returns the report.

    ``config`` overrides the method's config fields (e.g. ``rank=16``, ``backend="cpu"``). Raises
    TypeError for a model that is not a timm VisionTransformer and ValueError (from the registry)
    for unknown methods or fields; the model is unchanged when it raises.
    """
    if not _is_vision_transformer(model):
        raise TypeError(f"model must be a timm VisionTransformer, got {type(model).__name__} "
                        "(for other models use subspace_ops.methods.apply with targets=...)")
    from . import methods

    _, report = methods.apply(model, method, **config)
    return report
