"""Triton GPU kernels, installed as ``subspace_ops.triton_kernels``.

Each module holds the kernels of one op family plus thin launch wrappers that take and return
torch tensors; autograd and torch.library registration live in ``subspace_ops.ops``.
"""

import importlib as _importlib

_MODULES = ("head_mixing_attention", "head_mixing_chunked", "lowrank_linear", "rescaled_linear", "svd_delta_linear")


def __getattr__(name: str):
    """The op modules, imported on first access (``subspace_ops.triton_kernels.rescaled_linear``)."""
    if name in _MODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
