"""SVD-basis layers (METHODS.md §2): SiVA, SAM-PARSER and SVDiff in one class, :class:`SVDLinear`.

At attach time the frozen weight is decomposed once, ``W = U Σ Vᵀ`` (thin SVD on the layer's
device, in float64 for float64 weights and float32 otherwise, which is also the dtype of the kept
singular values ``sigma``); the chosen singular directions
become frozen buffers ``u [N, k]``, ``v [K, k]`` in the weight's dtype, and the layer trains one
vector ``s [k]`` turned into ``d`` by the method:

| method       | directions                              | d                   | s at init |
|--------------|-----------------------------------------|---------------------|-----------|
| ``siva``     | the k smallest: the bottom (1 − perc) of | ``s``               | 0         |
|              | the variance (``siva_select_rank``)      |                     |           |
| ``sam-parser``| all                                    | ``s − σ``           | σ         |
| ``svdiff``   | all                                     | ``relu(σ + s) − σ`` | 0         |

All three start exactly at the pretrained layer. A fused projection (timm's ``qkv``) is split into
``parts``; each tuned part gets its own SVD and the layer runs them as one op whose ``u`` is
block-sparse (rows of a part only use that part's directions), e.g. SiVA on q and v of a fused qkv.

The adapter state (:meth:`adapter_state`) is ``s`` plus the per-part ranks and a fingerprint of
the singular values of the weight it was trained on; :meth:`load_adapter_state` refuses a state
from different weights and leaves the layer unchanged. The fingerprint is kept in the weight's dtype
(``model.to(torch.bfloat16)`` casts it with the weights), and it tells which precision the weights
had: the same weights rounded to 16 bits move each singular value by at most ‖ΔW‖₂ ≤ ‖ΔW‖_F ≤
u·‖W‖_F = u·‖σ‖₂ (Weyl; u the unit roundoff), so when either side is 16-bit the comparison allows
eps·‖σ‖₂ (twice that bound) and a state trained in bf16 loads onto the float32 weights it came from.
That tolerance is coarse (singular values of two random inits of a 768×768 layer agree within it),
so in 16 bits the strong check is :func:`subspace_ops.checkpoint.load_adapter`'s checksum
fingerprint of the base weights, which it runs before any layer's.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .. import reference
from ..ops import svd_delta_linear
from ..ops.svd_delta_linear import choose_path
from .base import MergeableLinear, compute_dtype

__all__ = ["SVDLinear", "SVD_METHODS"]

SVD_METHODS = ("siva", "sam-parser", "svdiff")


class SVDLinear(MergeableLinear):
    """y = x (W + U diag(d(s)) Vᵀ)ᵀ + b on a frozen nn.Linear; see the module docstring.

    Args:
        base: the pretrained nn.Linear (frozen, shared).
        method: "siva", "sam-parser" or "svdiff".
        perc: SiVA's variance threshold (0.95 for ViT/RoBERTa, 0.997 for LLaMA-2 in the paper).
        criterion: SiVA's "variance" (σ², the paper) or "magnitude" (σ).
        rank: SiVA with a fixed number of smallest singular values per part instead of ``perc``.
        parts: output sizes of a fused projection (e.g. ``(d, d, d)`` for qkv); default one part.
        tuned_parts: indices of the parts to adapt (default all), e.g. ``(0, 2)`` for q and v.
        path: "merged", "unmerged" or None (per call, by :func:`choose_path`).
    """

    def __init__(
        self,
        base: nn.Linear,
        method: str = "siva",
        *,
        perc: float = 0.95,
        criterion: str = "variance",
        rank: Optional[int] = None,
        parts: Optional[Sequence[int]] = None,
        tuned_parts: Optional[Sequence[int]] = None,
        path: Optional[str] = None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(base, backend)
        if method not in SVD_METHODS:
            raise ValueError(f"method must be one of {SVD_METHODS}, got {method!r}")
        parts = tuple(parts) if parts is not None else (self.out_features,)
        if sum(parts) != self.out_features or any(p <= 0 for p in parts):
            raise ValueError(f"parts must be positive and sum to out_features={self.out_features}, got {parts}")
        tuned = tuple(range(len(parts))) if tuned_parts is None else tuple(tuned_parts)
        if not tuned or any(not 0 <= i < len(parts) for i in tuned):
            raise ValueError(f"tuned_parts must index parts {tuple(range(len(parts)))}, got {tuned_parts}")
        if rank is not None and (method != "siva" or rank < 0):
            raise ValueError("rank (a fixed k) is a SiVA option and must be >= 0")
        if method == "siva" and rank is None and self.weight.is_meta:
            raise ValueError("perc: SiVA chooses k from the weight's singular values, and a weight on the meta "
                             "device has none; adapt after loading the weights, or give a fixed rank=k")
        self.method, self.path = method, path
        self.parts, self.tuned_parts = parts, tuned

        start = time.perf_counter()
        svd_dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        offsets = [sum(parts[:i]) for i in range(len(parts))]
        us, vs, sigmas, fingerprint, ranks = [], [], [], [], []
        with torch.no_grad():
            for i in tuned:
                rows = slice(offsets[i], offsets[i] + parts[i])
                u, sigma, vh = torch.linalg.svd(self.weight[rows].to(svd_dtype), full_matrices=False)
                fingerprint.append(sigma)
                if method == "siva":
                    k = rank if rank is not None else reference.siva_select_rank(sigma, perc, criterion=criterion)
                    k = min(k, sigma.numel())
                    chosen = torch.arange(sigma.numel() - k, sigma.numel(), device=sigma.device)  # the smallest
                else:
                    chosen = torch.arange(sigma.numel(), device=sigma.device)
                block_u = u.new_zeros(self.out_features, chosen.numel())
                block_u[rows] = u[:, chosen]
                us.append(block_u)
                vs.append(vh[chosen].T)
                sigmas.append(sigma[chosen])
                ranks.append(int(chosen.numel()))
        dtype = self.weight.dtype
        self.register_buffer("u", torch.cat(us, dim=1).to(dtype))
        self.register_buffer("v", torch.cat(vs, dim=1).to(dtype))
        self.register_buffer("sigma", torch.cat(sigmas))  # in the SVD's dtype: float64 for float64 weights
        self.register_buffer("fingerprint", torch.cat(fingerprint).to(dtype))
        self.ranks = tuple(ranks)
        init = self.sigma.clone() if method == "sam-parser" else torch.zeros_like(self.sigma)
        self.s = nn.Parameter(init.to(dtype))
        self.attach_seconds = time.perf_counter() - start

    @property
    def rank(self) -> int:
        return sum(self.ranks)

    def delta(self) -> Tensor:
        """d(s): the change of the tuned singular values."""
        sigma = self.sigma.to(self.s.dtype)
        if self.method == "siva":
            return reference.siva_delta(self.s)
        if self.method == "sam-parser":
            return reference.sam_parser_delta(self.s, sigma)
        return reference.svdiff_delta(self.s, sigma)

    def merged_weight_and_bias(self) -> tuple[Tensor, Optional[Tensor]]:
        return reference.svd_delta_weight(self.weight, self.u, self.v, self.delta().to(self.weight.dtype)), self.bias

    def chosen_path(self, tokens: int) -> str:
        return self.path or choose_path(tokens, self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        dtype = compute_dtype(x, self.weight)
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return svd_delta_linear(
            x.to(dtype), cast(self.weight), cast(self.u), cast(self.v), cast(self.delta()), cast(self.bias),
            backend=self.backend, path=self.path,
        )

    # ---- adapter checkpoints: s only, tied to the weights it was trained on
    def adapter_state(self) -> dict:
        return {"method": self.method, "ranks": list(self.ranks), "s": self.s.detach().clone(),
                "fingerprint": self.fingerprint.clone()}

    @torch.no_grad()
    def load_adapter_state(self, state: dict, *, rtol: float = 1e-4) -> None:
        """Load ``s``; raises ValueError (layer unchanged) if the state was made for other weights."""
        if state.get("method") != self.method:
            raise ValueError(f"adapter state is for method {state.get('method')!r}, this layer is {self.method!r}")
        if list(state.get("ranks", [])) != list(self.ranks):
            raise ValueError(f"adapter state has ranks {state.get('ranks')}, this layer has {list(self.ranks)}")
        theirs, ours = state["fingerprint"], self.fingerprint
        coarsest = max(torch.finfo(d).eps for d in (theirs.dtype, ours.dtype, self.weight.dtype))
        theirs, ours = theirs.to(ours.device, torch.float64), ours.to(torch.float64)
        # SVD noise only, unless 16-bit weights are involved (see the module docstring)
        atol = 1e-6 * float(ours.max()) if coarsest < 1e-4 else coarsest * float(ours.norm())
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=rtol, atol=atol):
            raise ValueError(
                "adapter state was trained on different base weights: their singular values do not match "
                "this layer's (refusing to load)"
            )
        self.s.copy_(state["s"].to(self.s))

    def extra_repr(self) -> str:
        parts = f", parts={self.parts}, tuned_parts={self.tuned_parts}" if len(self.parts) > 1 else ""
        path = self.path or "auto (merged if M·(N+K) >= N·K)"
        if path != "unmerged":
            path += ", merged W_eff kept for the backward if M >= 4·N or 6·k >= M"
        return self._describe() + f", k={list(self.ranks)}, path={path}{parts}"
