"""subspace_ops: fused kernels for subspace parameter-efficient fine-tuning.

Functional ops live at the top level (``subspace_ops.rescaled_linear``), layers in
``subspace_ops.nn``, the pure-PyTorch ground truth in ``subspace_ops.reference``, and backend
selection in ``subspace_ops.backends``.
"""

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
