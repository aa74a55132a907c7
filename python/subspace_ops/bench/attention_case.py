"""Cases ``head-mixing-attention``, ``-causal`` and ``-dropout`` (METHODS.md §3).

Coeff-Tuning's ``O_h = Σ_g α'[h, g] softmax(scale Q_g K_gᵀ) V_h`` with q, k, v [B, H, N, d] and a
dense α' = I + α (α ~ N(0, 0.1²)); q, k, v and α require grad (a layer inside a network).

Variants, side by side in one run:

``subspace_ops``
    ``subspace_ops.head_mixing_attention`` with the ``--backend`` backend.
``naive``
    The papers' form: every head's [N, N] probability map materialized, mixed by einsum
    (``subspace_ops.reference.head_mixing_attention``).
``naive+compile``
    ``torch.compile`` of the naive form.
``sdpa`` and ``sdpa <kernel>``
    ``F.scaled_dot_product_attention`` with no mixing: the cost of plain attention, the baseline
    of every ratio. ``sdpa`` lets torch choose; ``sdpa flash`` / ``sdpa efficient`` / ``sdpa math``
    pin one kernel (each skipped where the kernel cannot run).
``flex``
    FlexAttention (``torch.nn.attention.flex_attention``, compiled) with no mixing; optional. It has
    no backward on CPU, so there its forward runs on inputs that do not require grad and its
    fwd+bwd row is skipped.

``head-mixing-attention-dropout`` trains with attention dropout p = 0.1 (BERT's, BART's): ours with
``dropout_p``, the naive form with ``F.dropout`` on its mixed maps, SDPA with its ``dropout_p``
(FlexAttention has none and is left out).

Shapes ``B,H,N,d`` (self attention, Nq = Nk = N). Presets: ``vit-b`` (64, 12, 197, 64),
``llm`` (8, 32, 1024, 128) and (2, 32, 4096, 128), ``cpu`` (1, 8, 2048, 64) and ``cpu-4096``
(1, 8, 4096, 64), the issue's CPU targets (time at 2048, memory at 4096). A bare ``subspace-ops bench``
runs the non-causal case only, with ``vit-b`` and ``llm`` on CUDA and ``cpu`` on CPU.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .common import fresh_copy
from .harness import Case, Shape, Variant, VariantSkipped, Workload

__all__ = ["HEAD_MIXING_ATTENTION", "HEAD_MIXING_ATTENTION_CAUSAL", "HEAD_MIXING_ATTENTION_DROPOUT",
           "attention_variants"]


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device, *, mixing: bool = True):
    batch, heads, n, dim = shape
    g = torch.Generator(device=device).manual_seed(0)

    def make(*size: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32).mul_(scale).to(dtype)

    q, k, v = (make(batch, heads, n, dim).requires_grad_(True) for _ in range(3))
    grad_out = make(batch, heads, n, dim)
    alpha = make(heads, heads, scale=0.1).float().requires_grad_(True)
    params = [q, k, v, alpha] if mixing else [q, k, v]
    return q, k, v, alpha, grad_out, params


def _naive(q, k, v, alpha, causal: bool, dropout_p: float = 0.0):
    from subspace_ops import reference

    mix = torch.eye(alpha.shape[0], device=alpha.device) + alpha
    if dropout_p == 0.0:
        return reference.head_mixing_attention(q, k, v, mix.to(q.dtype), is_causal=causal)
    # The papers' code with the backbone's dropout: maps materialized, mixed, F.dropout, times V.
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    mixed = torch.einsum("hg,bgij->bhij", mix.to(q.dtype), scores.softmax(-1))
    return F.dropout(mixed, dropout_p) @ v


def _setup_ours(backend: Optional[str], causal: bool, dropout_p: float = 0.0):
    def setup(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        import subspace_ops

        chosen = subspace_ops.resolve_backend(backend, device)
        q, k, v, alpha, grad_out, params = _inputs(shape, dtype, device)
        eye = torch.eye(shape[1], device=device)

        def forward() -> torch.Tensor:
            return subspace_ops.head_mixing_attention(q, k, v, eye + alpha, is_causal=causal, dropout_p=dropout_p,
                                                      backend=chosen)

        return Workload(forward, params, grad_out, backend=chosen)

    return setup


def _setup_naive(causal: bool, compiled: bool, dropout_p: float = 0.0):
    def setup(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        q, k, v, alpha, grad_out, params = _inputs(shape, dtype, device)
        fn = torch.compile(fresh_copy(_naive), dynamic=False) if compiled else _naive
        return Workload(lambda: fn(q, k, v, alpha, causal, dropout_p), params, grad_out,
                        "inductor" if compiled else "torch")

    return setup


_SDPA_KERNELS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


def _setup_sdpa(causal: bool, kernel: Optional[str], dropout_p: float = 0.0):
    def setup(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v, _, grad_out, params = _inputs(shape, dtype, device, mixing=False)
        context = (functools.partial(sdpa_kernel, getattr(SDPBackend, _SDPA_KERNELS[kernel])) if kernel
                   else contextlib.nullcontext)

        def forward() -> torch.Tensor:
            with context():
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)

        try:
            forward()
        except RuntimeError as exc:  # the pinned kernel does not support this device/dtype/shape
            raise VariantSkipped(f"sdpa {kernel} unavailable: {str(exc).splitlines()[0][:80]}") from None
        return Workload(forward, params, grad_out, f"sdpa {kernel or 'auto'}")

    return setup


def _setup_flex(causal: bool):
    def setup(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError:
            raise VariantSkipped("FlexAttention needs torch >= 2.5") from None
        q, k, v, _, grad_out, params = _inputs(shape, dtype, device, mixing=False)
        block_mask = None
        if causal:
            n = shape[2]
            block_mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, n, n, device=device)
        compiled = torch.compile(flex_attention, dynamic=False)
        if device.type == "cpu":
            # FlexAttention has no CPU backward and refuses inputs that require grad: time its forward on
            # detached inputs (no autograd graph to record, which the others build) and skip fwd+bwd.
            q, k, v = q.detach(), k.detach(), v.detach()
            return Workload(lambda: compiled(q, k, v, block_mask=block_mask), backend="flex (inductor, no grad)",
                            no_backward="FlexAttention has no backward on CPU")
        return Workload(lambda: compiled(q, k, v, block_mask=block_mask), params, grad_out, "flex (inductor)")

    return setup


def attention_variants(backend: Optional[str] = None, *, causal: bool = False,
                       dropout_p: float = 0.0) -> list[Variant]:
    kind = ("causal " if causal else "") + (f"dropout {dropout_p} " if dropout_p else "")
    variants = [
        Variant("subspace_ops", _setup_ours(backend, causal, dropout_p),
                description=f"{kind}subspace_ops.head_mixing_attention"),
        Variant("naive", _setup_naive(causal, False, dropout_p),
                description="per-head [N, N] maps mixed by einsum (eager)"),
        Variant("naive+compile", _setup_naive(causal, True, dropout_p), optional=True,
                description="torch.compile of the naive form"),
        Variant("sdpa", _setup_sdpa(causal, None, dropout_p), description="F.scaled_dot_product_attention, no mixing"),
        *[Variant(f"sdpa {kernel}", _setup_sdpa(causal, kernel, dropout_p), optional=True,
                  description=f"SDPA pinned to the {kernel} kernel, no mixing") for kernel in _SDPA_KERNELS],
    ]
    if dropout_p == 0.0:  # FlexAttention has no dropout
        variants.append(Variant("flex", _setup_flex(causal), optional=True,
                                description="FlexAttention (compiled), no mixing"))
    return variants


_PRESETS = {
    "vit-b": {"any": [(64, 12, 197, 64)]},
    "llm": {"any": [(8, 32, 1024, 128), (2, 32, 4096, 128)]},
    "cpu": {"any": [(1, 8, 2048, 64)]},
    "cpu-4096": {"any": [(1, 8, 4096, 64)]},
}


def _case(causal: bool, dropout_p: float = 0.0) -> Case:
    return Case(
        name="head-mixing-attention" + ("-causal" if causal else "") + ("-dropout" if dropout_p else ""),
        description=("causal " if causal else "")
        + "Coeff-Tuning O_h = Σ_g α'[h,g] softmax(QK_gᵀ/√d) V_h; q, k, v, α trained (METHODS.md §3)"
        + (f"; attention dropout {dropout_p} on the mixed maps (SDPA: on its probabilities)" if dropout_p else ""),
        make_variants=functools.partial(attention_variants, causal=causal, dropout_p=dropout_p),
        baselines={"forward": "sdpa", "inference": "sdpa", "fwd+bwd": "sdpa"},
        dim_names=("B", "H", "N", "d"),
        presets=_PRESETS,
        default_presets={"cuda": ["vit-b", "llm"], "cpu": ["cpu"]},
        default_dtype={"cuda": torch.bfloat16, "cpu": torch.float32},
        in_default_run=not causal and not dropout_p,
    )


HEAD_MIXING_ATTENTION = _case(causal=False)
HEAD_MIXING_ATTENTION_CAUSAL = _case(causal=True)
HEAD_MIXING_ATTENTION_DROPOUT = _case(causal=False, dropout_p=0.1)
