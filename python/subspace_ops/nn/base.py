"""Plumbing shared by the layers: a frozen wrapped nn.Linear, exact merge/unmerge, backend reporting."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..backends import resolve_backend

__all__ = ["ForwardsAttributes", "MergeableLinear", "NotMergeableError", "compute_dtype"]


class NotMergeableError(RuntimeError):
    """``merge()`` on a layer whose adaptation has no weight form it can be folded into (a nonlinear
    adapter, or an SSF shift after a module without a bias)."""


class ForwardsAttributes:
    """Mixin for a module that wraps another (named by the class attribute ``_wrapped``): attributes
    the wrapper does not have come from the wrapped module, so code written for that module still
    finds what it reads. List it before ``nn.Module`` in the bases."""

    _wrapped: str

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self._wrapped:
                raise
            return getattr(getattr(self, self._wrapped), name)


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype F.linear would compute in: the autocast dtype when autocast is on, else W's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


class MergeableLinear(nn.Module):
    """Shared plumbing: a frozen wrapped nn.Linear, exact merge/unmerge, backend reporting."""

    method: str = ""

    def __init__(self, base: nn.Linear, backend: Optional[str]) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.backend = backend
        self._originals: Optional[tuple[Tensor, Optional[Tensor]]] = None

    @property
    def merged(self) -> bool:
        return self._originals is not None

    # Subclasses provide the merged weight and bias, computed by the reference formula.
    def merged_weight_and_bias(self) -> tuple[Tensor, Optional[Tensor]]:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adaptation into ``weight``/``bias`` (inference runs a plain F.linear)."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is already merged; call unmerge() first")
        weight, bias = self.merged_weight_and_bias()
        self._originals = (self.weight.data, None if self.bias is None else self.bias.data)
        self.weight.data = weight.to(self.weight.dtype)
        if bias is not None:
            if self.bias is None:
                self.bias = nn.Parameter(bias.to(self.weight.dtype), requires_grad=False)
            else:
                self.bias.data = bias.to(self.bias.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original ``weight``/``bias`` tensors saved by :meth:`merge`."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged")
        weight, bias = self._originals
        self.weight.data = weight
        if bias is None:
            self.bias = None
        else:
            self.bias.data = bias
        self._originals = None

    def resolved_backend(self) -> str:
        return resolve_backend(self.backend, self.weight.device)

    def _describe(self) -> str:
        chosen = self.resolved_backend()
        backend = chosen if self.backend is not None else f"auto->{chosen}"
        state = ", merged" if self.merged else ""
        return (
            f"method={self.method}, in_features={self.in_features}, out_features={self.out_features}, "
            f"backend={backend}{state}"
        )
