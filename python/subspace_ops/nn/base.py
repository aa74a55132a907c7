"""Plumbing shared by the layers: a frozen wrapped nn.Linear, exact merge/unmerge, backend reporting."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .._fingerprint import fingerprint, fingerprint_mismatch
from ..backends import BackendUnavailableError, resolve_backend

__all__ = ["BITFIT_MARK", "ForwardsAttributes", "MergeableLinear", "NotMergeableError", "RestoresOriginals",
           "compute_dtype"]

# Set (True) on a module whose own ``bias`` BitFit trains. Methods applied later leave that bias trainable
# (methods combine), and a layer wrapping the module keeps it trainable and carries the mark. A module
# attribute, not one on the Parameter: deepcopy and ``.to()`` with swapped tensors drop Parameter attributes.
BITFIT_MARK = "_subspace_ops_bitfit"


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


class RestoresOriginals(nn.Module):
    """Base of the modules whose ``merge()`` overwrites parameters and whose ``unmerge()`` puts the
    original tensors back (bit-exact).

    Two things would otherwise break that round trip. ``.to()``, ``.half()`` and ``.cuda()`` convert a
    module's parameters but not the plain tensors it keeps, so the kept originals follow the same
    conversion here (``_apply``): unmerging after ``.to(torch.float64)`` gives the originals in float64,
    as unmerging first would have. And weights replaced while merged (``load_state_dict``) would be
    thrown away by unmerge: ``merge()`` keeps a fingerprint of what it wrote (1024 sampled elements,
    tolerant of dtype conversion; :mod:`subspace_ops._fingerprint`) and ``unmerge()`` refuses, changing
    nothing, when the parameters no longer match it.
    """

    # (originals, fingerprints of the merged parameters) while merged, else None.
    _merge_record: Optional[tuple[list[Optional[Tensor]], list[Optional[dict]]]] = None

    @property
    def merged(self) -> bool:
        return self._merge_record is not None

    def _merged_parameters(self) -> tuple[list[str], list[Optional[Tensor]]]:
        """(names, tensors) of the live parameters merge() wrote, in the order it kept their originals."""
        raise NotImplementedError

    def _keep_originals(self, originals: Sequence[Optional[Tensor]]) -> None:
        """Called by merge() once it has written the merged parameters."""
        written = [None if t is None else fingerprint(t) for t in self._merged_parameters()[1]]
        self._merge_record = (list(originals), written)

    def unmerge_problem(self) -> Optional[str]:
        """Why :meth:`unmerge` would refuse (a merged parameter changed since merge()), or None."""
        if not self.merged:
            return None
        for name, live, saved in zip(*self._merged_parameters(), self._merge_record[1]):
            problem = None if saved is None else (
                "it is gone" if live is None else fingerprint_mismatch(saved, fingerprint(live)))
            if problem:
                return (f"{type(self).__name__}.unmerge(): {name} changed after merge() ({problem}), e.g. by "
                        f"load_state_dict on the merged model; unmerging would discard that change, so the layer "
                        f"stays merged. Load weights into unmerged layers (or adapt the loaded model anew).")
        return None

    def _take_originals(self) -> list[Optional[Tensor]]:
        """Called by unmerge(): the originals, once the live parameters are checked to be what merge() wrote."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged")
        problem = self.unmerge_problem()
        if problem:
            raise RuntimeError(problem)
        originals = self._merge_record[0]
        self._merge_record = None
        return originals

    def __setstate__(self, state: dict) -> None:
        legacy = state.pop("_originals", None)  # pickled before the merge record: the originals alone
        super().__setstate__(state)
        if legacy is not None:
            originals = list(legacy) if isinstance(legacy, tuple) else [legacy]
            self._merge_record = (originals, [None] * len(originals))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        module = super()._apply(fn, recurse)
        if self._merge_record is not None:
            originals, written = self._merge_record
            self._merge_record = ([None if t is None else fn(t) for t in originals], written)
        return module


class MergeableLinear(RestoresOriginals):
    """Shared plumbing: a frozen wrapped nn.Linear, exact merge/unmerge, backend reporting."""

    method: str = ""
    # Non-tensor attributes that change what the layer computes from its tensors (LoRA's scaling, a
    # fused layer's splits): an adapter checkpoint records them and refuses a layer whose values differ.
    function_attributes: tuple[str, ...] = ()

    def __init__(self, base: nn.Linear, backend: Optional[str]) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if getattr(base, BITFIT_MARK, False):  # BitFit, applied earlier, trains this bias
            setattr(self, BITFIT_MARK, True)
        elif self.bias is not None:
            self.bias.requires_grad_(False)
        self.backend = backend

    # Subclasses provide the merged weight and bias, computed by the reference formula.
    def merged_weight_and_bias(self) -> tuple[Tensor, Optional[Tensor]]:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adaptation into ``weight``/``bias`` (inference runs a plain F.linear)."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is already merged; call unmerge() first")
        weight, bias = self.merged_weight_and_bias()
        originals = (self.weight.data, None if self.bias is None else self.bias.data)
        self.weight.data = weight.to(self.weight.dtype)
        if bias is not None:
            if self.bias is None:
                self.bias = nn.Parameter(bias.to(self.weight.dtype), requires_grad=False)
            else:
                self.bias.data = bias.to(self.bias.dtype)
        self._keep_originals(originals)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original ``weight``/``bias`` tensors saved by :meth:`merge`."""
        weight, bias = self._take_originals()
        self.weight.data = weight
        if bias is None:
            self.bias = None
        else:
            self.bias.data = bias

    def _merged_parameters(self) -> tuple[list[str], list[Optional[Tensor]]]:
        return ["weight", "bias"], [self.weight, self.bias]

    def resolved_backend(self) -> str:
        return resolve_backend(self.backend, self.weight.device)

    def _describe(self) -> str:
        try:
            chosen = self.resolved_backend()
        except BackendUnavailableError as exc:  # e.g. backend="triton" on a layer not yet moved to its GPU
            chosen = f"{self.backend} (unavailable: {exc})"
        backend = chosen if self.backend is not None else f"auto->{chosen}"
        state = ", merged" if self.merged else ""
        return (
            f"method={self.method}, in_features={self.in_features}, out_features={self.out_features}, "
            f"backend={backend}{state}"
        )
