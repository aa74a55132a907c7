"""Which implementation of an op runs, and why.

Three backends serve every op:

- ``"reference"``: pure PyTorch from :mod:`subspace_ops.reference`. Always available; materializes
  the full matrices, so it is the ground truth, not a fast path.
- ``"cpu"``: the C++ extension ``subspace_ops._C`` (ATen GEMMs + ``at::parallel_for``), CPU tensors.
- ``"triton"``: the Triton kernels in ``subspace_ops.triton_kernels``; CUDA tensors, or CPU tensors
  when ``TRITON_INTERPRET=1`` was set before triton was imported (slow; for tests).

``backend=None`` picks the fastest available backend for the tensor's device; the environment
variable ``SUBSPACE_OPS_BACKEND`` overrides that choice. An explicitly requested backend that
cannot run raises :class:`BackendUnavailableError` with the reason. When no fused backend exists
for a device, the default is ``"reference"`` and a warning says so once: nothing falls back silently.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch

BACKENDS = ("reference", "cpu", "triton")
ENV_VAR = "SUBSPACE_OPS_BACKEND"

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendUnavailableError",
    "BackendStatus",
    "backend_status",
    "available_backends",
    "default_backend",
    "resolve_backend",
    "resolve_backend_for",
    "explain_backend",
    "backend_report",
]


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run on the given device."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    device_type: str
    available: bool
    reason: str


@functools.lru_cache(maxsize=None)
def _cpu_extension() -> tuple[Optional[object], str]:
    try:
        module = importlib.import_module("subspace_ops._C")
    except ImportError as exc:
        return None, (
            f"the C++ extension subspace_ops._C is not built ({exc}); reinstall with "
            "`pip install --no-build-isolation .` and a C++ compiler"
        )
    # Which loops the float32 kernels run depends on the CPU (csrc/cpu_simd.h): say so.
    isa, rows = module.cpu_isa(), module.rescaled_linear_gemm_rows()
    gemms = f"own {isa} GEMMs up to {rows} rows, ATen beyond" if rows else "ATen (no AVX2 + FMA on this CPU)"
    return module, f"C++ extension subspace_ops._C (rescaled_linear float32 GEMMs: {gemms})"


@functools.lru_cache(maxsize=None)
def _triton() -> tuple[Optional[object], str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return None, f"triton is not installed ({exc}); `pip install triton`"
    return triton, f"triton {triton.__version__}"


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def cpu_extension():
    """The loaded ``subspace_ops._C`` module; raises BackendUnavailableError if it is not built."""
    module, reason = _cpu_extension()
    if module is None:
        raise BackendUnavailableError(f"backend 'cpu' is unavailable: {reason}")
    return module


def backend_status(name: str, device: Union[str, torch.device]) -> BackendStatus:
    """Whether backend ``name`` can run ops on tensors of ``device``, and why (not)."""
    device_type = torch.device(device).type
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    if name == "reference":
        return BackendStatus(name, device_type, True, "pure PyTorch (materializes W')")
    if name == "cpu":
        if device_type != "cpu":
            return BackendStatus(name, device_type, False, f"the C++ backend only runs CPU tensors, not {device_type}")
        module, reason = _cpu_extension()
        return BackendStatus(name, device_type, module is not None, reason)
    # triton
    module, reason = _triton()
    if module is None:
        return BackendStatus(name, device_type, False, reason)
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return BackendStatus(name, device_type, False, "no CUDA device is available")
        return BackendStatus(name, device_type, True, reason)
    if device_type == "cpu":
        if triton_interpreter_enabled():
            return BackendStatus(name, device_type, True, reason + " (interpreter, TRITON_INTERPRET=1)")
        return BackendStatus(name, device_type, False,
                             "CPU tensors need TRITON_INTERPRET=1 set before importing triton")
    return BackendStatus(name, device_type, False, f"triton kernels do not run on {device_type} tensors")


def available_backends(device: Union[str, torch.device, None] = None) -> list[str]:
    """Names of the backends that can run on ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return [name for name in BACKENDS if backend_status(name, device).available]


# Fastest first, per device type.
_PREFERENCE = {"cuda": ("triton",), "cpu": ("cpu",)}


def default_backend(device_type: str) -> str:
    """The fastest available backend for ``device_type`` ("reference" when no fused one can run)."""
    for name in _PREFERENCE.get(device_type, ()):
        if backend_status(name, device_type).available:
            return name
    return "reference"


def _unavailable(requested: str, device_type: str) -> str:
    """Why backend ``requested`` cannot run on ``device_type`` tensors ("" when it can)."""
    status = backend_status(requested, device_type)
    if status.available:
        return ""
    return f"backend {requested!r} is unavailable for {device_type} tensors: {status.reason}"


@functools.lru_cache(maxsize=None)
def _resolve(requested: Optional[str], device_type: str) -> str:
    if requested is not None:
        problem = _unavailable(requested, device_type)
        if problem:
            raise BackendUnavailableError(problem)
        return requested
    chosen = default_backend(device_type)
    if chosen == "reference":  # warned once per device type: the result is cached
        reasons = "; ".join(
            f"{name}: {backend_status(name, device_type).reason}" for name in _PREFERENCE.get(device_type, ())
        )
        warnings.warn(
            f"subspace_ops: no fused backend for {device_type} tensors ({reasons or 'none exists'}); "
            "using the 'reference' backend, which materializes the full weight. "
            f"Set {ENV_VAR}=reference to silence this.",
            RuntimeWarning,
            stacklevel=4,
        )
    return chosen


# Dynamo runs this eagerly and treats the answer as a constant, so compiled graphs hold no
# backend-selection logic (the backend is a static argument of the registered op).
@torch.compiler.assume_constant_result
def _resolve_as_constant(requested: Optional[str], device_type: str) -> str:
    return _resolve(requested, device_type)


def resolve_backend(requested: Optional[str], device: Union[str, torch.device]) -> str:
    """The backend an op will use: ``requested``, else ``$SUBSPACE_OPS_BACKEND``, else the best available.

    Raises ``ValueError`` for an unknown name and :class:`BackendUnavailableError` when the
    requested backend cannot run on ``device``.
    """
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return resolve_backend_for(requested, device_type)


def resolve_backend_for(requested: Optional[str], device_type: str) -> str:
    """:func:`resolve_backend` for a device type ("cpu", "cuda"): the ops' per-call entry, which
    reads the device type off a tensor without building a ``torch.device``."""
    return _resolve_as_constant(_requested(requested), device_type)


def _requested(requested: Optional[str]) -> Optional[str]:
    """``requested``, else ``$SUBSPACE_OPS_BACKEND`` (unset or empty: None); ValueError for a name that is
    not a backend, naming the variable when the name came from it."""
    if requested is None:
        requested = os.environ.get(ENV_VAR) or None
        if requested is not None and requested not in BACKENDS:
            raise ValueError(f"environment variable {ENV_VAR}={requested!r} is not a backend: expected one of "
                             f"{', '.join(BACKENDS)} (or unset it for the device's default)")
        return requested
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {requested!r}")
    return requested


def explain_backend(requested: Optional[str], device: Union[str, torch.device]) -> tuple[Optional[str], str]:
    """What :func:`resolve_backend` does for ``requested`` on ``device``, without raising or warning:
    ``(backend, "")`` with the backend ops will use, or ``(None, why)`` with why they will raise instead
    (an unknown name, or a backend that cannot run there; naming ``$SUBSPACE_OPS_BACKEND`` when the name
    came from it). For the CLI, which refuses such a run up front rather than failing in every op."""
    device_type = torch.device(device).type
    try:
        name = _requested(requested)
    except ValueError as exc:
        return None, str(exc)
    if name is None:
        return default_backend(device_type), ""
    problem = _unavailable(name, device_type)
    if problem and requested is None:  # the name came from the environment: say so
        problem = f"environment variable {ENV_VAR}={name}: {problem}"
    return (None, problem) if problem else (name, "")


def backend_report() -> str:
    """A human-readable table of every backend on CPU and (if present) CUDA, with reasons."""
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = [("device", "backend", "available", "reason")]
    for device_type in device_types:
        default = default_backend(device_type)
        for name in BACKENDS:
            status = backend_status(name, device_type)
            mark = ("yes" if status.available else "no") + (" (default)" if name == default else "")
            rows.append((device_type, name, mark, status.reason))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    table = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3] for row in rows)
    return table + _env_override_report(device_types)


def _env_override_report(device_types: list[str]) -> str:
    """Lines saying what ``$SUBSPACE_OPS_BACKEND`` makes ops use per device type ("" when it is unset):
    the table's defaults do not apply while it is set."""
    value = os.environ.get(ENV_VAR)
    if not value:
        return ""
    if value not in BACKENDS:  # the same error on every device: said once
        problem = explain_backend(None, device_types[0])[1]
        return f"\n\n{problem}\n  every op and layer given no backend raises ValueError"
    lines = [f"\n\n{ENV_VAR}={value} overrides the defaults (for ops and layers given no backend):"]
    for device_type in device_types:
        chosen, problem = explain_backend(value, device_type)
        lines.append(f"  {device_type}: " + (f"ops use {chosen!r}" if chosen is not None
                                               else f"ops raise BackendUnavailableError: {problem}"))
    return "\n".join(lines)
