"""Test configuration.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; the interpreter is
chosen when triton is imported (importing subspace_ops imports it through torch._dynamo), so the
variable is set here, before anything else is imported.
"""

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist workers (the README's `python -m pytest -n 2 --dist loadscope`) share the cores: torch's
# intra-op threads split them, so two workers on two cores run one thread each, not four threads on two.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# torch.compile's on-disk caches key a graph on the names of its custom ops, not on their fake kernels:
# after a change to an op's outputs (a shape, a layout), a cache warmed by the old sources replays the
# old graph. The tests keep their inductor cache per version of the ops' sources.
_OPS_SOURCES = sorted((Path(__file__).resolve().parents[1] / "python" / "subspace_ops" / "ops").glob("*.py"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "subspace_ops_inductor_" + (
    hashlib.sha256(b"".join(p.read_bytes() for p in _OPS_SOURCES)).hexdigest()[:16])))

import pytest  # noqa: E402

import subspace_ops  # noqa: E402
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


@contextlib.contextmanager
def torch_threads(threads: int):
    """Runs the block with torch (and the C++ kernels' at::parallel_for) on `threads` threads, then
    restores the count: the kernels split their work differently by thread count."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def move_off_init(model: torch.nn.Module) -> torch.nn.Module:
    """Every trainable parameter moved off its init by a fixed random step (zero-init adapters would
    otherwise leave most gradients and outputs trivially equal); returns the model."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def tiny_gpt2() -> torch.nn.Module:
    """A 2-block GPT-2 (transformers Conv1D projections, d = 32) without dropout, seeded, in eval mode."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


# Every linear op and path, called as case(x, weight, tensors, backend) with the tensors of
# ``linear_case_tensors``.
LINEAR_CASES = {
    "rescaled_linear": lambda x, w, t, be: subspace_ops.rescaled_linear(
        x, w, t["s_l"], t["s_r"], t["bias"], backend=be),  # the cpu backend's stacked path at so few tokens
    "rescaled_linear modulated": lambda x, w, t, be: subspace_ops.rescaled_linear(
        x, w, t["s_l"], t["s_r"], t["bias"], backend=be, path=None if be == "reference" else "modulated"),
    "rescaled_linear separable": lambda x, w, t, be: subspace_ops.rescaled_linear(
        x, w, t["s_l"], t["s_r"], t["bias"], residual=False, backend=be),
    "svd_delta_linear merged": lambda x, w, t, be: subspace_ops.svd_delta_linear(
        x, w, t["u"], t["v"], t["d"], t["bias"], backend=be, path="merged"),
    "svd_delta_linear unmerged": lambda x, w, t, be: subspace_ops.svd_delta_linear(
        x, w, t["u"], t["v"], t["d"], t["bias"], backend=be, path="unmerged"),
    "lowrank_linear": lambda x, w, t, be: subspace_ops.lowrank_linear(
        x, w, t["a"], t["g"], t["b"], t["bias"], dropout_p=0.2, backend=be),
}



def linear_case_tensors(device, out_features: int = 6, in_features: int = 8) -> dict:
    """Scales, biases and factors for LINEAR_CASES (rank 2 for lowrank, k = 3 for svd)."""
    n, k = out_features, in_features
    tensors = dict(s_l=torch.randn(n), s_r=torch.randn(k), bias=torch.randn(n), d=torch.randn(3), a=torch.randn(n, 2),
                   g=torch.randn(2, 2), b=torch.randn(2, k), u=torch.linalg.qr(torch.randn(n, 3))[0],
                   v=torch.linalg.qr(torch.randn(k, 3))[0])
    return {name: t.to(device) for name, t in tensors.items()}


def strided(t):
    """The same values in a non-contiguous layout: the last two dimensions transposed in memory (a 1-D
    tensor: every other element of a buffer). A leaf with t's requires_grad; None stays None."""
    if t is None:
        return None
    with torch.no_grad():
        if t.dim() >= 2:
            out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        else:
            out = t.new_empty(2 * t.numel())[::2].copy_(t)
    return out.requires_grad_(t.requires_grad)


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


@pytest.fixture(params=["avx512", "avx2", "none"])
def cpu_isa(request):
    """The cpu backend's float32 kernels with their own loops (head mixing's GEMMs and exp,
    rescaled_linear's GEMMs; csrc/cpu_simd.h) capped at one instruction set (AVX-512; AVX2 + FMA,
    which AVX-512 CPUs also run; none: ATen's GEMMs and the portable loops), so that every path this
    CPU can take is tested whatever its widest is."""
    require_backend("cpu")
    from subspace_ops.backends import cpu_extension

    extension = cpu_extension()
    got = extension.cpu_isa(request.param)
    try:
        if got != request.param:
            pytest.skip(f"this CPU does not run {request.param} (widest: {got})")
        yield request.param
    finally:
        extension.cpu_isa("auto")


def papers_sdpa(alphas):
    """F.scaled_dot_product_attention's signature computing Coeff-Tuning's head mixing as 003 eq. 11–12
    write it: every head's softmax map P_g, mixed by I + α, times V_h, i.e. O_h = Σ_g (I + α)[h, g] P_g V_h.
    Monkeypatched over torch's SDPA, it turns a model's own attention code into the independent
    reference. ``alphas``: one α [H, H], or α by number of heads {H: [H, H]}; gradients flow into it.
    Boolean (True: attend) and additive masks, is_causal (top-left aligned) as SDPA, and its output's
    memory layout (the queries': [B, N, H, d] when they are so laid out)."""
    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        assert dropout_p == 0.0 and not enable_gqa
        heads = query.shape[1]
        alpha = alphas[heads] if isinstance(alphas, dict) else alphas
        scores = torch.einsum("bhqd,bhkd->bhqk", query, key) * (query.shape[-1] ** -0.5 if scale is None else scale)
        if is_causal:
            future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        if attn_mask is not None:
            scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                      else scores + attn_mask)
        mix = torch.eye(heads, dtype=alpha.dtype, device=alpha.device) + alpha
        out = torch.einsum("hg,bgqk,bhkd->bhqd", mix.to(query), scores.softmax(-1), value)
        return out.transpose(1, 2).contiguous().transpose(1, 2) if query.transpose(1, 2).is_contiguous() else out
    return attention


def recorded_dropout(monkeypatch) -> list:
    """The dropout_p of every head_mixing_attention call the Coeff layers make, in order."""
    import subspace_ops.nn.attention as attention

    calls, op = [], attention.head_mixing_attention

    def recording(*args, dropout_p=0.0, **kwargs):
        calls.append(dropout_p)
        return op(*args, dropout_p=dropout_p, **kwargs)

    monkeypatch.setattr(attention, "head_mixing_attention", recording)
    return calls


def train_step_outputs(model, backend, seed, *args, **kwargs):
    """model(*args) in training mode with every head mix on ``backend``, after torch.manual_seed(seed)."""
    from subspace_ops.nn import HeadMix

    for m in model.modules():
        if isinstance(m, HeadMix):
            m.backend = backend
    model.train()
    torch.manual_seed(seed)
    return model(*args, **kwargs)
