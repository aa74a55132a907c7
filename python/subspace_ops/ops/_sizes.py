"""Sizes: for choices that only affect speed (which path, which operand takes a scale), and the
shape of an op's output.

Such a choice compares a size (the token count M, say) with a bound. Under ``torch.export`` with
a dynamic dimension that size is symbolic, and comparing it would add a guard that pins the
dimension to one side of the bound, which export rejects ("Expected op to be '=='..."). Every path
computes the same result, so there the example input's size decides and the exported program
keeps that choice for every size. Elsewhere (eager, ``torch.compile``, whose guards recompile at
the bound) the size is returned unchanged.
"""

from __future__ import annotations

import torch

_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def size_for_choice(size: "int | torch.SymInt") -> "int | torch.SymInt":
    """``size`` itself, or under torch.export its example value, so that comparing it adds no guard."""
    if isinstance(size, torch.SymInt) and _is_exporting():
        hint = getattr(size.node, "hint", None)  # None for data-dependent sizes: compared as they are
        if hint is not None:
            return int(hint)
    return size


def rows_to_shape(y: torch.Tensor, lead: "tuple[int, ...] | torch.Size") -> torch.Tensor:
    """An op's [M, N] result as [*lead, N], returned by a custom autograd Function as a tensor of its
    own rather than a view: autograd forbids in-place changes to a view made inside a custom
    Function, and callers do write into a layer's output (timm's BEiT/EVA attention: ``qkv += bias``),
    as they may with nn.Linear's. ``aten::_unsafe_view`` is what torch's own matmul uses for this; ``y``
    is a fresh result nobody else holds."""
    shape = (*lead, y.shape[-1])
    if tuple(y.shape) == shape:
        return y
    return torch.ops.aten._unsafe_view(y if y.is_contiguous() else y.contiguous(), shape)
