"""Where each fused backend keeps an op's kernels."""

from __future__ import annotations

import importlib

from ..backends import cpu_extension


def kernel_module(backend: str, op: str):
    """The module with ``<op>_forward`` / ``<op>_backward`` for ``backend``: the C++ extension
    (all ops in one module) or ``subspace_ops.triton_kernels.<op>``."""
    if backend == "cpu":
        return cpu_extension()
    if backend == "triton":
        return importlib.import_module(f"subspace_ops.triton_kernels.{op}")
    raise ValueError(f"backend {backend!r} has no fused kernels for {op}")
