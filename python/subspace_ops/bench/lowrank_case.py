"""Benchmark case ``lowrank-linear``: LoRA's ``y = x Wᵀ + s·(x Bᵀ) Aᵀ + b`` (METHODS.md §4), W frozen.

Variants (``x`` [M, K], ``W`` [N, K]; in every variant ``x`` requires grad, as for a layer in the
middle of a network; the adapters have rank r = 16 and scaling s = 2, i.e. PEFT's
``LoraConfig(r=16, lora_alpha=32)``; A and B are random, not zero, so every product is real work):

``subspace_ops``
    ``lowrank_linear(x, W, A, None, B, b, scaling=2)`` with the backend from ``--backend``; trainable
    A [N, r] and B [r, K]; W and b frozen (as PEFT's LoRA).
``naive``
    What PEFT's ``lora.Linear.forward`` computes, in plain eager PyTorch:
    ``F.linear(x, W, b) + F.linear(F.linear(x, B), A) * s``.
``naive+compile``
    ``torch.compile(naive, dynamic=False)``; reported as skipped if compiling fails here.
``subspace_ops DoRA``
    :class:`subspace_ops.nn.lowrank.DoRALinear` (r = 16, s = 2, ``detach_norm=True`` as PEFT): the
    row norm of W + s·AB from a thin GEMM (no [N, K] tensor), the op, one ``addcmul``. Calls without
    gradients (``--mode inference``) reuse the row norms kept from the previous call, as evaluation
    and decoding do (W, A, B unchanged); a training call computes them.
``peft DoRA r=16``
    PEFT's ``LoraConfig(r=16, lora_alpha=32, use_dora=True)`` on one nn.Linear (optional).
``peft DoRA r=16 accelerated``
    The same PEFT model after :func:`subspace_ops.peft.accelerate` (PEFT's layer, our op and row norm,
    kept between calls without gradients as in ``subspace_ops DoRA``).
``frozen F.linear`` / ``full FT`` / ``peft LoRA r=16``
    The standard layers of every linear case (:func:`subspace_ops.bench.common.standard_linear_layers`).

Baselines: frozen F.linear (forward, inference) and full FT (fwd+bwd), as the other linear cases; the
issue's CPU target is ``subspace_ops`` ≤ ``peft LoRA r=16`` in fwd+bwd at the vit-b preset.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .common import LinearInputs, fresh_copy, linear_case, standard_linear_layers
from .harness import Shape, Variant, VariantSkipped, Workload

__all__ = ["LOWRANK_LINEAR", "LOWRANK_RANK", "lowrank_linear_variants"]

LOWRANK_RANK = 16
LOWRANK_ALPHA = 32  # PEFT's lora_alpha: scaling = alpha / rank = 2


def _lora_inputs(shape: Shape, dtype: torch.dtype, device: torch.device):
    """The shared seeded inputs plus A [N, r] and B [r, K], trainable."""
    inp = LinearInputs(shape, dtype, device)
    _, k, n = shape
    g = torch.Generator(device="cpu").manual_seed(2)
    a = (torch.randn(n, LOWRANK_RANK, generator=g) * 0.02).to(device=device, dtype=dtype).requires_grad_(True)
    b = (torch.randn(LOWRANK_RANK, k, generator=g) * k**-0.5).to(device=device, dtype=dtype).requires_grad_(True)
    return inp, a, b


def _naive(x, weight, a, b, bias, scaling: float):
    """PEFT's lora.Linear.forward (dropout = identity): base layer, then the adapter's output scaled and added."""
    return F.linear(x, weight, bias) + F.linear(F.linear(x, b), a) * scaling


def _setup_ours(backend: Optional[str]):
    def setup(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        import subspace_ops
        from subspace_ops.ops.lowrank_linear import lowrank_linear

        chosen = subspace_ops.resolve_backend(backend, device)
        inp, a, b = _lora_inputs(shape, dtype, device)
        x, weight, bias = inp.x, inp.weight, inp.bias
        scaling = LOWRANK_ALPHA / LOWRANK_RANK
        return Workload(lambda: lowrank_linear(x, weight, a, None, b, bias, scaling=scaling, backend=chosen),
                        [x, a, b], inp.grad_output, backend=chosen)

    return setup


def _setup_naive(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
    inp, a, b = _lora_inputs(shape, dtype, device)
    x, weight, bias = inp.x, inp.weight, inp.bias
    scaling = LOWRANK_ALPHA / LOWRANK_RANK
    return Workload(lambda: _naive(x, weight, a, b, bias, scaling), [x, a, b], inp.grad_output, "torch")


def _setup_naive_compiled(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
    compiled = torch.compile(fresh_copy(_naive), dynamic=False)
    inp, a, b = _lora_inputs(shape, dtype, device)
    x, weight, bias = inp.x, inp.weight, inp.bias
    scaling = LOWRANK_ALPHA / LOWRANK_RANK
    return Workload(lambda: compiled(x, weight, a, b, bias, scaling), [x, a, b], inp.grad_output, "inductor")


def _linear_from(inp: LinearInputs, shape: Shape, dtype: torch.dtype, device: torch.device) -> torch.nn.Linear:
    _, k, n = shape
    linear = torch.nn.Linear(k, n, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(inp.weight)
        linear.bias.copy_(inp.bias)
    return linear


def _setup_ours_dora(backend: Optional[str]):
    def setup(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        import subspace_ops
        from subspace_ops.nn.lowrank import DoRALinear

        chosen = subspace_ops.resolve_backend(backend, device)
        inp, a, b = _lora_inputs(shape, dtype, device)
        layer = DoRALinear(_linear_from(inp, shape, dtype, device), LOWRANK_RANK, alpha=LOWRANK_ALPHA,
                           detach_norm=True, backend=chosen)
        with torch.no_grad():
            layer.lora_a.copy_(a)
            layer.lora_b.copy_(b)
        x = inp.x
        return Workload(lambda: layer(x), [x, layer.lora_a, layer.lora_b, layer.magnitude], inp.grad_output,
                        backend=chosen)

    return setup


class _OneLinear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _setup_peft_dora(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
    return _peft_dora(shape, dtype, device)


def _setup_peft_dora_accelerated(backend: Optional[str]):
    def setup(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        return _peft_dora(shape, dtype, device, accelerate_backend=backend, accelerate=True)

    return setup


def _peft_dora(shape: Shape, dtype: torch.dtype, device: torch.device, *, accelerate: bool = False,
               accelerate_backend: Optional[str] = None) -> Workload:
    """PEFT's DoRA on one nn.Linear; ``accelerate``: after ``subspace_ops.peft.accelerate`` (our op)."""
    try:
        import peft
    except ImportError:
        raise VariantSkipped("peft not installed (pip install peft)") from None
    inp, a, b = _lora_inputs(shape, dtype, device)
    config = peft.LoraConfig(r=LOWRANK_RANK, lora_alpha=LOWRANK_ALPHA, target_modules=["proj"], use_dora=True)
    model = peft.get_peft_model(_OneLinear(_linear_from(inp, shape, dtype, device)), config).to(device=device,
                                                                                                 dtype=dtype)
    layer = model.base_model.model.proj
    with torch.no_grad():  # the same adapter values as ours (PEFT's lora_A is our B, lora_B our A)
        layer.lora_A["default"].weight.copy_(b)
        layer.lora_B["default"].weight.copy_(a)
    trainable = [p for p in model.parameters() if p.requires_grad]
    x = inp.x
    if not accelerate:
        return Workload(lambda: model(x), [x, *trainable], inp.grad_output, f"peft {peft.__version__}")
    from subspace_ops import peft as subspace_peft

    report = subspace_peft.accelerate(model, backend=accelerate_backend)
    if report.accelerated != {"base_model.model.proj": "dora"}:
        raise VariantSkipped(f"not accelerated: {report.skipped}")
    return Workload(lambda: model(x), [x, *trainable], inp.grad_output, f"peft {peft.__version__} + {report.backend}")


def lowrank_linear_variants(backend: Optional[str] = None) -> list[Variant]:
    """The variants of this case; ``backend`` is our op's backend (``None``: the default)."""
    return [
        Variant("subspace_ops", _setup_ours(backend), description=f"lowrank_linear, LoRA r={LOWRANK_RANK}"),
        Variant("naive", _setup_naive, description="F.linear + lora_B(lora_A(x))·s as PEFT computes it (eager)"),
        Variant("naive+compile", _setup_naive_compiled, optional=True,
                description="torch.compile of the naive formula"),
        Variant("subspace_ops DoRA", _setup_ours_dora(backend),
                description=f"DoRALinear r={LOWRANK_RANK}, norm detached as PEFT"),
        Variant(f"peft DoRA r={LOWRANK_RANK}", _setup_peft_dora, optional=True,
                description="PEFT LoRA with use_dora=True on one nn.Linear"),
        Variant(f"peft DoRA r={LOWRANK_RANK} accelerated", _setup_peft_dora_accelerated(backend), optional=True,
                description="the same PEFT layer after subspace_ops.peft.accelerate (our op and row norm)"),
        *standard_linear_layers(LOWRANK_RANK),
    ]


LOWRANK_LINEAR = linear_case(
    "lowrank-linear",
    "LoRA y = x Wᵀ + s·(x Bᵀ) Aᵀ + b, r=16; A, B trained, W frozen (METHODS.md §4)",
    lowrank_linear_variants,
)
