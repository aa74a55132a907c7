"""subspace_ops: fused kernels for subspace parameter-efficient fine-tuning.

Functional ops live at the top level (``subspace_ops.rescaled_linear``), layers in
``subspace_ops.nn``, the pure-PyTorch ground truth in ``subspace_ops.reference``, and backend
selection in ``subspace_ops.backends``. The integrations (``subspace_ops.timm``, ``.peft``,
``.transformers``, ``.diffusers``), ``.triton_kernels``, ``.testing``, ``.verify`` and ``.bench`` are
imported on first access, so ``import subspace_ops`` does not import timm, transformers or diffusers.
"""

import importlib as _importlib

from . import methods, nn, reference
from .adapters import AdaptReport, apply_coeff, apply_rlrr, apply_svd
from .backends import BackendUnavailableError, available_backends, backend_report, resolve_backend
from .ops import head_mixing_attention, lowrank_linear, rescaled_linear, svd_delta_linear
from .peft_model import SubspacePeftModel, get_peft_model

__version__ = "0.1.0"

__all__ = [
    "AdaptReport",
    "SubspacePeftModel",
    "apply_coeff",
    "apply_rlrr",
    "apply_svd",
    "methods",
    "nn",
    "BackendUnavailableError",
    "available_backends",
    "backend_report",
    "get_peft_model",
    "head_mixing_attention",
    "lowrank_linear",
    "reference",
    "rescaled_linear",
    "resolve_backend",
    "svd_delta_linear",
]

# Submodules imported when first used as an attribute (PEP 562), as the README writes them
# (``subspace_ops.peft.accelerate(model)`` after a plain ``import subspace_ops``).
_LAZY_SUBMODULES = ("bench", "diffusers", "peft", "testing", "timm", "transformers", "triton_kernels", "verify")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
