"""Argument checks shared by every op: errors name the argument and say what was expected; and the
refusal of what the fused kernels cannot do (double backward, torch.func transforms); whether autograd
records a call (the ops' paths without gradients)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def check_tensor(name: str, value: object, *, ndims: Optional[Sequence[int]] = None, min_ndim: int = 0) -> Tensor:
    """``value`` must be a floating-point tensor with an allowed number of dimensions."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    if ndims is not None and value.dim() not in ndims:
        expected = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} must be {expected}, got shape {tuple(value.shape)}")
    if value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(value.shape)}")
    return value


def check_size(name: str, value: Tensor, dim: int, expected: int, what: str) -> None:
    if value.shape[dim] != expected:
        raise ValueError(
            f"{name} must have size {expected} ({what}) in dimension {dim}, got shape {tuple(value.shape)}"
        )


def check_like(name: str, value: Tensor, ref_name: str, ref: Tensor) -> None:
    """Same dtype and device as ``ref`` (the ops do not cast behind the caller's back)."""
    if value.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {value.dtype} but {ref_name} has {ref.dtype}; they must match")
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}; they must match")


def check_linear(x: object, weight: object) -> tuple[int, int]:
    """x [..., K] and weight [N, K] of a linear op, with K >= 1 (the kernels' row layouts need a
    feature; no model has an nn.Linear without inputs). Returns (N, K)."""
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndims=(2,))
    out_features, in_features = weight.shape
    if in_features == 0:
        raise ValueError(f"weight must have at least one input feature (in_features = weight.shape[1] >= 1), "
                         f"got shape {tuple(weight.shape)}")
    check_size("x", x, -1, in_features, "in_features = weight.shape[1]")
    check_like("weight", weight, "x", x)
    return out_features, in_features


def records_gradient(*tensors: object) -> bool:
    """Whether autograd records a call on these inputs: grad mode on and one of them requires grad.
    Anything that is not a tensor (None, an argument not checked yet) does not count."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def refuse_functorch(op: str) -> None:
    """Called in eager mode before a fused kernel runs. Its autograd (an ``autograd.Function`` around the
    kernels, or the C++ node of the cpu RLRR path) cannot run under torch.func transforms, whose own
    error names neither the op nor the way out: refuse with both."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError(
            f"{op}: torch.func transforms (grad, vmap, jacrev, jvp, ...; e.g. per-sample gradients) are not "
            "supported by the fused backends; use backend='reference' (pure PyTorch) under them"
        )


def refuse_double_backward(op: str) -> None:
    """Called first in a fused backward. Grad mode is on there only under ``create_graph=True``; the
    kernels (and the tensors a forward saves for them) are not differentiable, so the graph autograd
    would record is incomplete and its second derivatives silently wrong: refuse instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: double backward (torch.autograd.grad(..., create_graph=True)) is not supported by the "
            "fused backends; use backend='reference' for higher-order gradients"
        )
