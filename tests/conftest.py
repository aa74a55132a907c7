"""Test configuration.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; the interpreter is
chosen when triton is imported (importing subspace_ops imports it through torch._dynamo), so the
variable is set here, before anything else is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from subspace_ops.backends import backend_status  # noqa: E402

# Triton runs on the GPU when there is one, else on CPU tensors in the interpreter (small shapes).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_INTERPRETER = TRITON_DEVICE == "cpu"


def backend_device(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


def require_backend(backend: str) -> None:
    """Fail (not skip) when a backend the suite should cover is missing: a skipped kernel test
    would hide a broken build. SUBSPACE_OPS_ALLOW_MISSING=triton,cpu turns that into a skip."""
    status = backend_status(backend, backend_device(backend))
    if status.available:
        return
    allowed = os.environ.get("SUBSPACE_OPS_ALLOW_MISSING", "").split(",")
    if backend in allowed:
        pytest.skip(f"backend {backend!r} unavailable: {status.reason}")
    pytest.fail(f"backend {backend!r} unavailable: {status.reason} (set SUBSPACE_OPS_ALLOW_MISSING={backend} to skip)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["reference", "cpu", "triton"])
def backend(request) -> str:
    """Every backend of an op; the test's tensors go on ``backend_device(backend)``."""
    require_backend(request.param)
    return request.param


@pytest.fixture(params=["cpu", "triton"])
def fused_backend(request) -> str:
    require_backend(request.param)
    return request.param
