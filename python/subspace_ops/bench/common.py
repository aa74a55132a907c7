"""What every linear-layer benchmark case shares: the seeded inputs and the standard layers
each case is compared with (frozen ``F.linear``, full fine-tuning, PEFT LoRA)."""

from __future__ import annotations

import functools
import types
from typing import Callable

import torch
import torch.nn.functional as F

from .harness import Case, Shape, Variant, VariantSkipped, Workload

__all__ = ["LINEAR_PRESETS", "LinearInputs", "fresh_copy", "linear_case", "standard_linear_layers"]

LORA_RANK = 8  # PEFT LoRA rank of the comparison row unless a case asks for another


class LinearInputs:
    """The tensors every variant starts from, identical across variants (seeded on the device)."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device: torch.device) -> None:
        m, k, n = shape
        g = torch.Generator(device=device).manual_seed(0)

        def make(*size: int, scale: float = 1.0) -> torch.Tensor:
            return torch.randn(*size, generator=g, device=device, dtype=torch.float32).mul_(scale).to(dtype)

        self.x = make(m, k).requires_grad_(True)
        self.weight = make(n, k, scale=k**-0.5)
        self.bias = make(n, scale=0.02)
        self.s_l = make(n, scale=0.1)
        self.s_r = make(k, scale=0.1)
        self.grad_output = make(m, n)


def fresh_copy(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` with its own code object. Dynamo keeps its compile cache per code object, so every
    setup compiles afresh instead of piling up recompiles until ``recompile_limit`` silently
    falls back to eager."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _setup_frozen(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
    inp = LinearInputs(shape, dtype, device)
    x, weight, bias = inp.x, inp.weight, inp.bias
    return Workload(lambda: F.linear(x, weight, bias), [x], inp.grad_output, "torch")


def _setup_full_ft(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
    inp = LinearInputs(shape, dtype, device)
    x, weight, bias = inp.x, inp.weight.requires_grad_(True), inp.bias.requires_grad_(True)
    return Workload(lambda: F.linear(x, weight, bias), [x, weight, bias], inp.grad_output, "torch")


class _OneLinear(torch.nn.Module):
    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(k, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _setup_peft_lora(shape: Shape, dtype: torch.dtype, device: torch.device, rank: int = LORA_RANK) -> Workload:
    try:
        import peft
    except ImportError:
        raise VariantSkipped("peft not installed (pip install peft)") from None
    inp = LinearInputs(shape, dtype, device)
    _, k, n = shape
    module = _OneLinear(k, n)
    with torch.no_grad():
        module.proj.weight.copy_(inp.weight)
        module.proj.bias.copy_(inp.bias)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"])
    model = peft.get_peft_model(module, config).to(device=device, dtype=dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    x = inp.x
    return Workload(lambda: model(x), [x, *trainable], inp.grad_output, f"peft {peft.__version__}")


def standard_linear_layers(lora_rank: int) -> list[Variant]:
    """The nearest standard layers every linear-family case is compared with."""
    return [
        Variant("frozen F.linear", _setup_frozen, description="pretrained layer, nothing trained"),
        Variant("full FT", _setup_full_ft, description="F.linear with W and b trained"),
        Variant(f"peft LoRA r={lora_rank}", functools.partial(_setup_peft_lora, rank=lora_rank), optional=True,
                description="PEFT LoRA on one nn.Linear"),
    ]


LINEAR_PRESETS = {
    "vit-b": {"cuda": [(12608, 768, 768)], "cpu": [(4096, 768, 768), (197, 768, 768)]},
    "vit-b-full": {"any": [(12608, 768, 768)]},
    "llama-7b": {"any": [(8192, 4096, 4096)]},
}


def linear_case(name: str, description: str, make_variants) -> Case:
    """A linear-layer case: shapes M,K,N with :data:`LINEAR_PRESETS`, ratios to frozen ``F.linear``
    (forward, inference) and to a full-fine-tuning linear (fwd+bwd), bf16 on CUDA, fp32 on CPU."""
    return Case(
        name=name,
        description=description,
        make_variants=make_variants,
        baselines={"forward": "frozen F.linear", "inference": "frozen F.linear", "fwd+bwd": "full FT"},
        dim_names=("M", "K", "N"),
        presets=LINEAR_PRESETS,
        default_presets={"any": ["vit-b"]},
        default_dtype={"cuda": torch.bfloat16, "cpu": torch.float32},
    )
