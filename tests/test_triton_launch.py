"""What a GPU launch of the Triton kernels depends on that the interpreter never exercises.

The interpreter runs CPU tensors with fixed tiles, so the wrappers' GPU-only choices are checked
here on their own: how the float32 matmul precision is read from torch, that every launch wrapper
runs on its tensors' device, what the autotuners key on, and the choices sized by a GPU's shared
memory (head mixing's fused/chunked strategy, the SVD dd kernel's tiles).
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("triton")

from subspace_ops.triton_kernels import _common  # noqa: E402
from subspace_ops.triton_kernels import head_mixing_attention as hm  # noqa: E402
from subspace_ops.triton_kernels import lowrank_linear as lr  # noqa: E402
from subspace_ops.triton_kernels import rescaled_linear as rl  # noqa: E402
from subspace_ops.triton_kernels import svd_delta_linear as sv  # noqa: E402
from subspace_ops.triton_kernels.head_mixing_chunked import strategy  # noqa: E402

pytestmark = pytest.mark.triton

SM86_SHARED, A100_SHARED = 101376, 166912  # bytes per block (opt-in): L4 / L40S / RTX 4090 / A10, A100


# ---- TF32: torch >= 2.9's legacy getter raises once the new API has been used ----

# Each step changes the process-wide settings left by the ones before it; after step 4 the legacy
# getter torch.backends.cuda.matmul.allow_tf32 raises (torch >= 2.9).
TF32_STEPS = [
    ("", "ieee"),
    ("torch.backends.cuda.matmul.allow_tf32 = True", "tf32"),
    ("torch.backends.cuda.matmul.allow_tf32 = False", "ieee"),
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", "tf32"),
    ("torch.backends.cuda.matmul.fp32_precision = 'ieee'; torch.backends.fp32_precision = 'tf32'", "ieee"),
    ("torch.backends.cuda.matmul.fp32_precision = 'none'", "tf32"),  # 'none': the generic setting's
]


def test_matmul_precision_follows_every_way_torch_is_told_about_tf32():
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    # A fresh process (the settings are process-wide), loading _common.py alone (fast: no package import).
    code = "\n".join([
        "import importlib.util, sys, torch",
        "spec = importlib.util.spec_from_file_location('common', sys.argv[1])",
        "common = importlib.util.module_from_spec(spec); spec.loader.exec_module(common)",
        "common.targets_gpu = lambda t: True  # what a CUDA tensor answers",
        *[f"{step}\nprint(common.matmul_precision(torch.empty(1)), common.matmul_precision(torch.empty(1).double()))"
          for step, _ in TF32_STEPS],
    ])
    done = subprocess.run([sys.executable, "-c", code, _common.__file__], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [word for _, expected in TF32_STEPS for word in (expected, "ieee")]


# ---- Device guard: Triton launches on the current device, not on the tensors' ----

LAUNCHERS = [(module, name) for module in (rl, lr, sv, hm) for name in module.__all__
             if name != "strategy" and callable(getattr(module, name))]


@pytest.mark.parametrize("module, name", LAUNCHERS, ids=[f"{m.__name__.rsplit('.', 1)[1]}.{n}" for m, n in LAUNCHERS])
def test_every_launch_wrapper_runs_on_its_tensors_device(module, name):
    assert getattr(getattr(module, name), "launches_on_device_of", False), (
        f"{module.__name__}.{name} launches Triton kernels without _common.launches_on_device_of")


def test_the_device_guard_is_entered_with_the_first_tensor(monkeypatch):
    entered = []

    @contextmanager
    def device_of(tensor):
        entered.append(tensor)
        yield

    monkeypatch.setattr(torch.cuda, "device_of", device_of)
    x, w, s_l, s_r = torch.randn(3, 16), torch.randn(16, 16), torch.randn(16, 1), torch.randn(16, 1)
    y = rl.rescaled_linear_forward(x, w, s_l, s_r, None, True)
    assert len(entered) == 1 and entered[0] is x
    torch.testing.assert_close(y, x @ (w * (1 + s_l * s_r.T)).T)


# ---- Autotune keys: a power of two of the token count, and the float32 precision ----

def _autotune_key(tuner, args: tuple, kwargs: dict) -> tuple:
    """The key Triton's Autotuner.run builds (triton 3.x): the named key arguments, then every
    tensor argument's dtype."""
    named = {**dict(zip(tuner.arg_names, args)), **kwargs}
    named = {k: v for k, v in named.items() if k in tuner.arg_names}
    return tuple(named[k] for k in tuner.keys if k in named) + tuple(
        str(v.dtype) for v in named.values() if hasattr(v, "dtype"))


class _Recorder:
    """Stands in for an autotuned kernel: records the autotuner key of each launch."""

    def __init__(self, tuner):
        self.tuner, self.keys = tuner, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.keys.append(_autotune_key(self.tuner, args, kwargs))


def _tuned_launch_keys(monkeypatch, module, tuned_names, call, rows, precision="ieee"):
    """The autotuner keys of call(M) for each M in rows, as on a GPU (tuned path, given precision)."""
    monkeypatch.setattr(module, "_interpreting", lambda t: False)
    monkeypatch.setattr(module, "_precision", lambda t: precision)
    tuners = {name: getattr(module, name) for name in tuned_names}
    recorders = {name: _Recorder(getattr(tuner, "tuner", tuner)) for name, tuner in tuners.items()}
    for name, recorder in recorders.items():
        monkeypatch.setattr(module, name, recorder)
    for m in rows:
        call(m)
    return {name: r.keys for name, r in recorders.items()}


def _rescaled_step(m):
    x, w, s_l, s_r = torch.randn(m, 32), torch.randn(24, 32), torch.randn(24, 1), torch.randn(32, 1)
    rl.rescaled_linear_forward(x, w, s_l, s_r, None, True)
    rl.rescaled_linear_backward(torch.randn(m, 24), x, w, s_l, s_r, True, True, False, True)


def _lowrank_gemm(m):
    lr.gemm_lowrank(torch.randn(m, 32), torch.randn(24, 32), torch.randn(m, 4), torch.randn(24, 4), None)


CASES = [(rl, ("_forward_tuned", "_grad_x_tuned", "_grad_scales_tuned"), _rescaled_step),
         (lr, ("_gemm_lowrank_tuned",), _lowrank_gemm)]


@pytest.mark.parametrize("module, tuned, call", CASES, ids=["rescaled_linear", "lowrank_linear"])
def test_gemm_autotuners_tune_once_per_power_of_two_of_tokens_and_per_precision(monkeypatch, module, tuned, call):
    # Dynamic padding: 8 sequences padded to 400..419 tokens -> 20 token counts, one power of two.
    padded = range(8 * 400, 8 * 420, 8)
    ieee = _tuned_launch_keys(monkeypatch, module, tuned, call, [*padded, 8 * 600])
    tf32 = _tuned_launch_keys(monkeypatch, module, tuned, call, [8 * 500], precision="tf32")
    for name in tuned:
        keys = ieee[name]
        assert len(set(keys[:-1])) == 1, f"{name}: {len(set(keys[:-1]))} autotune keys for one power of two"
        assert keys[-1] != keys[0], f"{name}: 4800 tokens (the next power of two) share 3200's key"
        assert tf32[name][0] != keys[0], f"{name}: TF32 and IEEE float32 share a key (and their tuned tiles)"


# ---- Choices sized by a GPU's shared memory ----

def test_head_mixing_fuses_fewer_heads_on_gpus_with_less_shared_memory():
    # H100: ViT-B's 12 heads of 64 in bf16 (16 padded heads x 64 x 2 B) fuse; an A100 has just enough.
    assert strategy(12, 64, torch.bfloat16) == "fused"
    assert strategy(12, 64, torch.bfloat16, shared_memory=A100_SHARED) == "fused"
    # sm_86 / sm_89 (99 KiB): the dQ kernel asks for 161 KiB at ViT-B, 128 KiB at 8 heads of 64 (ptxas).
    assert strategy(12, 64, torch.bfloat16, shared_memory=SM86_SHARED) == "chunked"
    assert strategy(8, 64, torch.bfloat16, shared_memory=SM86_SHARED) == "chunked"
    assert strategy(4, 64, torch.bfloat16, shared_memory=SM86_SHARED) == "fused"
    assert strategy(2, 64, torch.float32, shared_memory=SM86_SHARED) == "fused"
    assert strategy(4, 64, torch.bfloat16, has_mask=True, shared_memory=SM86_SHARED) == "fused"
    # Less than that (no GPU it was compiled for): never fused.
    assert strategy(1, 16, torch.bfloat16, shared_memory=64 * 1024) == "chunked"


def test_head_mixing_wrappers_ask_the_tensors_gpu_for_its_shared_memory(monkeypatch):
    asked = []
    monkeypatch.setattr(hm, "_interpreting", lambda t: False)
    monkeypatch.setattr(_common, "shared_memory", lambda t: asked.append(t) or SM86_SHARED)
    q = torch.randn(1, 12, 5, 64, dtype=torch.bfloat16)
    assert hm._runs_chunked(q, None) and asked == [q]
    assert not hm._runs_chunked(q[:, :4], None)


@pytest.mark.parametrize("shared, block_m", [(232448, 32), (A100_SHARED, 32), (SM86_SHARED, 16)])
def test_svd_dd_kernel_takes_small_tf32_tiles_where_its_large_ones_do_not_fit(monkeypatch, shared, block_m):
    monkeypatch.setattr(sv, "_interpreting", lambda t: False)
    monkeypatch.setattr(sv, "_precision", lambda t: "tf32")
    monkeypatch.setattr(sv, "_shared_memory", lambda t: shared)
    blocks = sv._blocks(torch.empty(1), sv._GRAD_D_BLOCKS, sv._GRAD_D_BLOCKS_SMALL)
    assert blocks["BLOCK_M"] == block_m
    assert blocks == ({**sv._GRAD_D_BLOCKS, "BLOCK_M": 32} if block_m == 32 else sv._GRAD_D_BLOCKS_SMALL)
