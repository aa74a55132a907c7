"""Sizes: for choices that only affect speed (which path, which operand takes a scale), and the
shape of an op's output.

Such a choice compares a size (the token count M, say) with a bound. Under ``torch.export`` with
a dynamic dimension that size is symbolic, and comparing it would add a guard that pins the
dimension to one side of the bound, which export rejects ("Constraints violated"). Every path
computes the same result at every size, so there the example input's size decides and the exported
program keeps that choice for every size. Elsewhere (eager, ``torch.compile``, whose guards recompile
at the bound) the size is returned unchanged, so the choice is the eager one.
"""

from __future__ import annotations

import torch
from torch.fx.experimental import symbolic_shapes

_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _legacy_optimization_hint(size: "int | torch.SymInt") -> "int | torch.SymInt":
    """torch before ``optimization_hint``: the example value, read off the symbol (non-strict export
    only: Dynamo cannot trace ``.node``); a data-dependent size, which has none, stays symbolic."""
    if isinstance(size, torch.SymInt):
        hint = getattr(size.node, "hint", None)
        if hint is not None:
            return int(hint)
    return size


# torch's own "hint for optimization decisions, adds no guard". Strict export needs it: Dynamo
# computes it from the symbol's example value (for a data-dependent size, from the size hints torch
# keeps for those) and sees a plain int, where it sees a symbolic size as an int it cannot read.
_optimization_hint = getattr(symbolic_shapes, "optimization_hint", _legacy_optimization_hint)


def size_for_choice(size: "int | torch.SymInt") -> "int | torch.SymInt":
    """``size`` itself, or under torch.export (strict or not) its example value, so that comparing it
    adds no guard."""
    if _is_exporting():
        return _optimization_hint(size)
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
