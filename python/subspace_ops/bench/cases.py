"""Benchmark cases: ``CASES[name] -> Case`` (the registry) and the cases themselves.

A case names the variants compared side by side, the baseline of each mode and its shape
presets (see :class:`~subspace_ops.bench.harness.Case`). To add one, define its variants' setups
and a ``Case`` below (or in a module of its own next to this one) and add it to ``CASES``; the CLI
(``subspace-ops bench <name>``), the pytest-benchmark suite and the plots pick it up.

Case ``rescaled-linear``
========================
RLRR's ``y = x (W ⊙ (1 + s_l s_rᵀ))ᵀ + b`` (METHODS.md §1).

Variants, compared side by side in one run (``x`` [M, K], ``W`` [N, K], in every variant ``x``
requires grad, as for a layer in the middle of a network):

``subspace_ops``
    ``subspace_ops.rescaled_linear`` with the backend from ``--backend`` (default: the best one
    for the device). RLRR's trainable parameters require grad: ``s_l`` [N], ``s_r`` [K] and the
    bias (RLRR's shift, here trained in place of ``b + shift``: the same math, one add fewer); W is
    frozen. The backend column names the path taken (``rescaled_linear``'s ``choose_path``); the
    ``reference`` backend takes none (it always materializes W'), so its rows say ``reference`` alone.
``subspace_ops modulated``
    The same, forced onto the fused modulated-weight kernels: the default's row differs only where
    the cpu backend takes the stacked path (a few tokens, e.g. ``--shape 4,768,768``).
``naive``
    The papers' formula with the same parameters: materialize ``W' = W * (1 + s_l[:, None] *
    s_r[None, :])``, then ``F.linear``; eager autograd.
``naive+compile``
    ``torch.compile(naive, dynamic=False)`` (one static graph per shape). If compiling fails on
    this platform the row says so ("skipped: ...").
``frozen F.linear``
    ``F.linear(x, W, b)`` with W and b frozen: the cost of the pretrained layer itself; the
    baseline of the ``forward`` and ``inference`` ratios.
``full FT``
    ``F.linear`` with W and b trainable: full fine-tuning; the baseline of the ``fwd+bwd`` ratios.
``peft LoRA r=8``
    PEFT's LoRA (``LoraConfig(r=8, lora_alpha=16, target_modules=["proj"])``) on a module holding
    one ``nn.Linear``; skipped with a message when peft is not installed.

Every variant builds its own tensors from the same seed (identical values), so variants do not
share autograd state; ``grad_output`` is one fixed tensor per variant.

Shape presets (``M,K,N``; M = tokens in the batch):

``vit-b``
    ViT-B/16 attention/MLP-sized 768 -> 768 layer. CUDA: M = 12608 (batch 64 x 197 tokens).
    CPU: M = 4096 and M = 197 (one image), to keep a CPU run around a minute.
``vit-b-full``
    M = 12608, K = N = 768 on any device.
``llama-7b``
    M = 8192 (e.g. 4 x 2048 tokens), K = N = 4096.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .common import LinearInputs, fresh_copy, linear_case, standard_linear_layers
from .harness import Case, Shape, Variant, Workload

__all__ = ["CASES", "RESCALED_LINEAR", "SCALED_LINEAR", "SVD_DELTA_LINEAR", "rescaled_linear_variants",
           "scaled_linear_variants", "svd_delta_linear_variants"]

def _rlrr_params(inp: LinearInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RLRR's trainable tensors: s_l [N], s_r [K] and the (shifted) bias [N]; SSB trains the same
    two scales (its bias is frozen, but training it too costs one column sum)."""
    return (inp.s_l.requires_grad_(True), inp.s_r.requires_grad_(True), inp.bias.requires_grad_(True))


def _naive(x: torch.Tensor, weight: torch.Tensor, s_l: torch.Tensor, s_r: torch.Tensor,
           bias: torch.Tensor) -> torch.Tensor:
    """The seeds' formula: W' = W ⊙ (1 + s_l s_rᵀ) materialized, then a plain linear."""
    return F.linear(x, weight * (1 + s_l[:, None] * s_r[None, :]), bias)


def _naive_scaled(x: torch.Tensor, weight: torch.Tensor, s_l: torch.Tensor, s_r: torch.Tensor,
                  bias: torch.Tensor) -> torch.Tensor:
    """SSB / (IA)³ as PEFT's (IA)³ computes it: scale the input features, the frozen layer, scale
    its output features."""
    return F.linear(x * s_r, weight) * s_l + bias


def _setup_ours(backend: Optional[str], residual: bool = True, path: Optional[str] = None):
    def setup(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        import subspace_ops  # lazily: the harness must import without the op

        chosen = subspace_ops.resolve_backend(backend, device)
        inp = LinearInputs(shape, dtype, device)
        s_l, s_r, bias = _rlrr_params(inp)
        x, weight = inp.x, inp.weight

        def forward() -> torch.Tensor:
            return subspace_ops.rescaled_linear(x, weight, s_l, s_r, bias, residual=residual, backend=chosen,
                                                path=path)

        from ..ops.rescaled_linear import choose_path

        def label(mode: str) -> str:
            """Which path ran; the reference backend takes none (it always materializes W'), whatever
            `path` says. Only "inference" runs without recording a gradient."""
            if chosen == "reference":
                return chosen
            return f"{chosen} {path or choose_path(residual, 1, dtype, shape[0], chosen, mode != 'inference')}"

        return Workload(forward, [x, s_l, s_r, bias], inp.grad_output, backend=label)

    return setup


def _setup_formula(formula, compiled: bool):
    def setup(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        # One static graph per shape; compiling is lazy, so a compile error surfaces at warm-up and
        # is reported in the table ("skipped: ..."), as the variant is optional.
        fn = torch.compile(fresh_copy(formula), dynamic=False) if compiled else formula
        inp = LinearInputs(shape, dtype, device)
        s_l, s_r, bias = _rlrr_params(inp)
        x, weight = inp.x, inp.weight
        return Workload(lambda: fn(x, weight, s_l, s_r, bias), [x, s_l, s_r, bias], inp.grad_output,
                        "inductor" if compiled else "torch")

    return setup


def rescaled_linear_variants(backend: Optional[str] = None) -> list[Variant]:
    """The variants of this case; ``backend`` is our op's backend (``None``: the default)."""
    return [
        Variant("subspace_ops", _setup_ours(backend), description="subspace_ops.rescaled_linear, default path"),
        Variant("subspace_ops modulated", _setup_ours(backend, path="modulated"),
                description="the same, forced onto the fused modulated-weight kernels (differs from the default "
                            "only where the cpu backend stacks a few tokens)"),
        Variant("naive", _setup_formula(_naive, False), description="materialize W', then F.linear (eager)"),
        Variant("naive+compile", _setup_formula(_naive, True), optional=True,
                description="torch.compile of the naive formula"),
        *standard_linear_layers(8),
    ]


def scaled_linear_variants(backend: Optional[str] = None) -> list[Variant]:
    """SSB: no residual, rank-1 scales on both sides; our op on its default and its modulated path."""
    return [
        Variant("subspace_ops", _setup_ours(backend, residual=False),
                description="subspace_ops.rescaled_linear(residual=False), default path"),
        Variant("subspace_ops modulated", _setup_ours(backend, residual=False, path="modulated"),
                description="the same on the fused modulated-weight kernels"),
        Variant("naive", _setup_formula(_naive_scaled, False),
                description="F.linear(x * s_r, W) * s_l + b, as PEFT's (IA)³ (eager)"),
        Variant("naive+compile", _setup_formula(_naive_scaled, True), optional=True,
                description="torch.compile of the naive formula"),
        *standard_linear_layers(8),
    ]


RESCALED_LINEAR = linear_case(
    "rescaled-linear",
    "RLRR y = x (W ⊙ (1 + s_l s_rᵀ))ᵀ + b; s_l, s_r, b trained, W frozen (METHODS.md §1)",
    rescaled_linear_variants,
)
SCALED_LINEAR = linear_case(
    "scaled-linear",
    "SSB y = ((x ⊙ s_r) Wᵀ) ⊙ s_l + b (SSL, (IA)³: one side); s_l, s_r, b trained, W frozen (METHODS.md §1)",
    scaled_linear_variants,
)


# ---------------------------------------------------------------------------------------------
# Case ``svd-delta-linear``: SiVA's y = x (W + U diag(d) Vᵀ)ᵀ + b (METHODS.md §2), d trained.
# Variants: ours (merged/unmerged path by the cost rule, shown in the backend column; the reference
# backend, which always materializes W_eff, shows none); the naive
# unmerged formula x Wᵀ + ((x V) ⊙ d) Uᵀ + b and its torch.compile; frozen F.linear; full FT;
# PEFT LoRA r=16. The rank is k = min(400, N, K): the ViT-B q figure (perc 0.95); with no
# pretrained LLaMA weights here the perc-0.997 k cannot be measured, so the same k is used there.
# ---------------------------------------------------------------------------------------------
SVD_RANK = 400


def _svd_inputs(shape: Shape, dtype: torch.dtype, device: torch.device):
    inp = LinearInputs(shape, dtype, device)
    _, k_in, n = shape
    rank = min(SVD_RANK, n, k_in)
    g = torch.Generator(device="cpu").manual_seed(1)
    u = torch.linalg.qr(torch.randn(n, rank, generator=g))[0].to(device=device, dtype=dtype)
    v = torch.linalg.qr(torch.randn(k_in, rank, generator=g))[0].to(device=device, dtype=dtype)
    d = (0.01 * torch.randn(rank, generator=g)).to(device=device, dtype=dtype).requires_grad_(True)
    return inp, u, v, d


def _svd_naive(x, weight, u, v, d, bias):
    """The unmerged formula of the SiVA/SVDiff reference code."""
    return F.linear(x, weight, bias) + ((x @ v) * d) @ u.T


def _setup_svd_ours(backend: Optional[str]):
    def setup(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        import subspace_ops
        from subspace_ops.ops.svd_delta_linear import choose_path

        chosen = subspace_ops.resolve_backend(backend, device)
        inp, u, v, d = _svd_inputs(shape, dtype, device)
        x, weight, bias = inp.x, inp.weight, inp.bias
        # The reference backend takes no path: it always materializes W + U diag(d) Vᵀ.
        taken = "" if chosen == "reference" else f" {choose_path(shape[0], shape[2], shape[1])}"
        label = f"{chosen}{taken} k={d.numel()}"
        return Workload(lambda: subspace_ops.svd_delta_linear(x, weight, u, v, d, bias, backend=chosen),
                        [x, d], inp.grad_output, backend=label)

    return setup


def _setup_svd_naive(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
    inp, u, v, d = _svd_inputs(shape, dtype, device)
    x, weight, bias = inp.x, inp.weight, inp.bias
    return Workload(lambda: _svd_naive(x, weight, u, v, d, bias), [x, d], inp.grad_output, "torch")


def _setup_svd_naive_compiled(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
    compiled = torch.compile(fresh_copy(_svd_naive), dynamic=False)
    inp, u, v, d = _svd_inputs(shape, dtype, device)
    x, weight, bias = inp.x, inp.weight, inp.bias
    return Workload(lambda: compiled(x, weight, u, v, d, bias), [x, d], inp.grad_output, "inductor")


def svd_delta_linear_variants(backend: Optional[str] = None) -> list[Variant]:
    return [
        Variant("subspace_ops", _setup_svd_ours(backend), description="subspace_ops.svd_delta_linear"),
        Variant("naive", _setup_svd_naive, description="x Wᵀ + ((x V) ⊙ d) Uᵀ (eager)"),
        Variant("naive+compile", _setup_svd_naive_compiled, optional=True,
                description="torch.compile of the naive formula"),
        *standard_linear_layers(16),
    ]


SVD_DELTA_LINEAR = linear_case(
    "svd-delta-linear",
    "SiVA y = x (W + U diag(d) Vᵀ)ᵀ + b; d trained, W, U, V frozen (METHODS.md §2)",
    svd_delta_linear_variants,
)


from .attention_case import (  # noqa: E402
    HEAD_MIXING_ATTENTION, HEAD_MIXING_ATTENTION_CAUSAL, HEAD_MIXING_ATTENTION_DROPOUT)
from .e2e import E2E_FLUX, E2E_LLAMA, E2E_UNET, E2E_VIT  # noqa: E402
from .lowrank_case import LOWRANK_LINEAR  # noqa: E402

CASES: dict[str, Case] = {case.name: case for case in (
    RESCALED_LINEAR, SCALED_LINEAR, SVD_DELTA_LINEAR, LOWRANK_LINEAR, HEAD_MIXING_ATTENTION,
    HEAD_MIXING_ATTENTION_CAUSAL, HEAD_MIXING_ATTENTION_DROPOUT, E2E_VIT, E2E_LLAMA, E2E_UNET, E2E_FLUX)}
