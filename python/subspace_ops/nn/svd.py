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

All three start at the pretrained layer. A fused projection (timm's ``qkv``) is split into
``parts``; each tuned part gets its own SVD and the layer runs them as one op whose ``u`` is
block-sparse (rows of a part only use that part's directions), e.g. SiVA on q and v of a fused qkv.

Paths: the op's "merged" and "unmerged" (:mod:`subspace_ops.ops.svd_delta_linear`), and for SAM-PARSER
and SVDiff, whose U and V hold every singular direction so that W = U Σ Vᵀ, the layer's own "basis"
path y = ((x V) ⊙ (σ + d)) Uᵀ + b: two GEMMs through the k = min(N, K) directions instead of
forming W_eff (N·K·k multiply-adds, twice per step) or adding the low-rank products to x Wᵀ. It
never reads W, so it applies only while W = U Σ Vᵀ holds (:meth:`SVDLinear.basis_spans_weight`),
in float32/float64, with W frozen. ``path=None`` takes the cheapest in multiply-adds
(:meth:`SVDLinear.chosen_path`, the basis path's weighted by BASIS_FLOPS_WEIGHT). Measured on 2 CPU
threads (AMD EPYC, float32, SAM-PARSER, ms per training step merged / unmerged / basis, the rule's
choice marked): M=197 768×768 15.1 / 6.6 / **5.1**; M=788 768×768 22.6 / 22.4 / **17.0**;
M=2048 768×768 **39.3** / 57.5 / 42.6; M=4096 768×768 **64.9** / 114.6 / 84.2; M=788 768→3072
90.0 / 71.6 / **48.5**; M=4096 768→3072 281.4 / 399.8 / **262.2**; M=4096 3072→768 256.1 / 265.2 /
**160.0**; a ViT qkv (three 768×768 parts) at M=788 128.1 / 127.1 / **51.6** and at M=4096
**259.5** / 724.5 / 332.6. Without a gradient (evaluation) the rule counts one pass: M=197
768×768 6.7 / 4.6 / **2.9**, qkv at M=788 62.8 / 80.0 / **33.1**, merged from M=788 at 768×768.
The basis path rounds differently from W (float32 output within ~4e-6 of the float64 reference
where the merged path is within ~8e-7 at 24×48), so a SAM-PARSER or SVDiff layer at attach equals
the pretrained one to rounding, not bit for bit, where it takes this path.

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
from .._validate import records_gradient
from ..ops import svd_delta_linear
from ..ops._few_rows import cpu_float32_eager, weight_product
from ..ops._sizes import rows_to_shape, size_for_choice
from ..ops.svd_delta_linear import choose_path, path_flops
from .base import MergeableLinear, compute_dtype

__all__ = ["SVDLinear", "SVD_METHODS"]

SVD_METHODS = ("siva", "sam-parser", "svdiff")

# The basis path's multiply-adds count this much more against the op's paths: its GEMMs are smaller
# (k = K columns per part) with elementwise passes over x V between them, where the merged path runs
# one N×K GEMM per pass. Without it the rule took the basis path for a ViT qkv at M = 4096 (2 CPU
# threads: 332 ms per step against 259 ms merged); with it every case of the measurements in the
# module docstring takes the faster path.
BASIS_FLOPS_WEIGHT = 1.15


def _is_fsdp2(module: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) manages ``module``'s parameters."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


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
        path: "merged", "unmerged", "basis" (SAM-PARSER, SVDiff; see the module docstring) or None
            (per call, by :meth:`chosen_path`).
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
        if path not in (None, "merged", "unmerged", "basis"):
            raise ValueError(f"path must be 'merged', 'unmerged', 'basis' or None, got {path!r}")
        if path == "basis" and method == "siva":
            raise ValueError("path='basis' needs every singular direction (sam-parser, svdiff); siva tunes only some")
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
        self._basis_key: Optional[tuple] = None  # the weight tensor _basis_exact was checked on
        self._basis_exact = False
        self.basis_spans_weight()
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

    def singular_values(self) -> Tensor:
        """σ + d(s): the adapted layer's singular values on its tuned directions (SAM-PARSER's Σ* = s,
        SVDiff's relu(σ + s), SiVA's σ + s), in the dtype of ``s``."""
        if self.method == "sam-parser":
            return self.s
        sigma = self.sigma.to(self.s.dtype)
        return torch.relu(sigma + self.s) if self.method == "svdiff" else sigma + self.s

    def merged_weight_and_bias(self) -> tuple[Tensor, Optional[Tensor]]:
        return reference.svd_delta_weight(self.weight, self.u, self.v, self.delta().to(self.weight.dtype)), self.bias

    # ---- the basis path (SAM-PARSER, SVDiff): y = ((x V) ⊙ (σ + d)) Uᵀ + b, W never read
    def _part_slices(self) -> list[tuple[slice, Optional[slice]]]:
        """(rows of W, columns of U and V or None if the part is not tuned) for each part."""
        columns, col = {}, 0
        for part, k in zip(self.tuned_parts, self.ranks):  # U's and V's columns follow tuned_parts' order
            columns[part], col = slice(col, col + k), col + k
        slices, row = [], 0
        for index, size in enumerate(self.parts):
            slices.append((slice(row, row + size), columns.get(index)))
            row += size
        return slices

    @torch.no_grad()
    def _weight_matches_basis(self) -> bool:
        """W r = U (Σ (Vᵀ r)) row by row on the tuned parts, for a fixed ±1 probe r, to 32 units of
        rounding of ‖W_i‖·‖r‖ per row: a matrix-vector product through each side. The SVD reconstructs
        W to about one unit (float32 and float64, 6×6 to 3072×768); an edit of W moves its row's
        product by |ΔW_ij| (float32, unit-norm rows, K = 768: edits above ~1e-4 are seen)."""
        w = self.weight
        if w.is_meta:  # (the dtype is checked by basis_spans_weight, the only caller)
            return False
        index = torch.arange(self.in_features, dtype=torch.int64)
        probe = (1.0 - 2.0 * ((index * 2654435761 % (1 << 32)) >> 31)).to(w.device, w.dtype)
        direct = w @ probe
        through = self.u @ ((self.v.T @ probe) * self.sigma.to(w.dtype))
        tolerance = 32 * torch.finfo(w.dtype).eps * float(probe.norm()) * torch.linalg.vector_norm(w, dim=1)
        for rows, columns in self._part_slices():
            if columns is not None and bool(((direct - through)[rows].abs() > tolerance[rows]).any()):
                return False
        return True

    def basis_spans_weight(self) -> bool:
        """Whether W = U Σ Vᵀ on every tuned part, so the basis path computes this layer without reading
        W: SAM-PARSER and SVDiff keep every singular direction (SiVA only some), in float32/float64
        (16-bit U, V would round the reconstruction to 16 bits). Checked (:meth:`_weight_matches_basis`)
        at attach and again, in eager mode, whenever the weight tensor is another or changed in place
        (its storage, device or version counter: ``load_state_dict``, ``copy_``, ``.to()``); under
        ``torch.compile`` the last eager answer stands, and under FSDP2 (which refills W every forward)
        the answer stands until ``load_state_dict``. Writes through ``weight.data`` bypass the version
        counter: after such an edit call :meth:`recheck_basis` (or take ``path="merged"``)."""
        if self.method == "siva" or self.weight.dtype not in (torch.float32, torch.float64):
            return False
        if torch.compiler.is_compiling():
            return self._basis_exact
        if self._basis_key is not None and _is_fsdp2(self):
            # FSDP2 all-gathers W into a refilled tensor every forward; its values change only through
            # load_state_dict, which clears the key (_load_from_state_dict) so that the next call checks.
            return self._basis_exact
        w = self.weight
        key = (w._version, w.data_ptr(), w.device, w.dtype)
        if key != self._basis_key:
            self._basis_exact, self._basis_key = self._weight_matches_basis(), key
        return self._basis_exact

    def recheck_basis(self) -> None:
        """Check W = U Σ Vᵀ again at the next call (after writing W through ``weight.data``)."""
        self._basis_key = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.recheck_basis()  # W may hold other values now

    def _basis_flops(self, tokens: int, needs_grad: bool) -> int:
        """Multiply-adds of the basis path (and its backward when ``needs_grad``): x V over every tuned
        direction, then each tuned part's rows of U (a plain linear for the parts left alone)."""
        per_token = self.in_features * self.rank
        for rows, columns in self._part_slices():
            size = rows.stop - rows.start
            per_token += size * (columns.stop - columns.start) if columns is not None else size * self.in_features
        return int(BASIS_FLOPS_WEIGHT * (2 if needs_grad else 1) * tokens * per_token)

    def chosen_path(self, tokens: int, needs_grad: bool = True) -> str:
        """The path a call with ``tokens`` rows takes: ``path`` if set, else the cheaper in multiply-adds
        of the op's own choice (:func:`~subspace_ops.ops.svd_delta_linear.choose_path`) and, where
        :meth:`basis_spans_weight`, the basis path (ties go to the op)."""
        return self._choose(tokens, needs_grad)[0]

    def _choose(self, tokens: int, needs_grad: bool) -> tuple[str, Optional[str]]:
        """:meth:`chosen_path` and the backend it resolved on the way (None where it needed none), so
        that a call's basis path does not resolve it again."""
        if self.path is not None:
            return self.path, None
        op_path = choose_path(tokens, self.out_features, self.in_features)
        # The basis path has no gradient for W; the reference backend is the ground truth (it forms W').
        if self.weight.requires_grad:
            return op_path, None
        backend = self.resolved_backend()
        if backend == "reference" or not self.basis_spans_weight():
            return op_path, backend
        op_cost = path_flops(op_path, tokens, self.out_features, self.in_features, self.rank, needs_grad)
        return ("basis" if self._basis_flops(tokens, needs_grad) < op_cost else op_path), backend

    def _basis_forward(self, x: Tensor, bias: Optional[Tensor], few_rows: bool) -> Tensor:
        """((x V) ⊙ (σ + d)) Uᵀ + b, part by part (U is block-sparse over a fused projection's parts);
        autograd saves x V [M, k] for the gradient of s. ``few_rows`` (a cpu-backend float32 call that
        records no gradient: decoding): the products run on the few-rows loops where they have a few rows."""
        dtype = x.dtype
        x2 = x.reshape(-1, self.in_features)
        scaled = weight_product(x2, self.v.to(dtype), False, few_rows) * self.singular_values().to(dtype)
        u = self.u.to(dtype)
        outputs = []

        def linear(inputs: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
            if not few_rows:
                return nn.functional.linear(inputs, w, b)
            out = weight_product(inputs, w, True, True)
            return out if b is None else out.add_(b)

        for rows, columns in self._part_slices():
            b = None if bias is None else bias[rows]
            if columns is None:  # a part left alone: its pretrained rows
                outputs.append(linear(x2, self.weight[rows].to(dtype), b))
            else:
                outputs.append(linear(scaled[:, columns], u[rows, columns], b))
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        return rows_to_shape(y, x.shape[:-1])  # not a view: callers may write into the output (FSDP2 warns)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        dtype = compute_dtype(x, self.weight)
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        backend = self._basis_backend(x, dtype)
        if backend is not None:
            few_rows = not records_gradient(x, self.s, self.bias) and cpu_float32_eager(backend, dtype)
            return self._basis_forward(x.to(dtype), cast(self.bias), few_rows)
        return svd_delta_linear(
            x.to(dtype), cast(self.weight), cast(self.u), cast(self.v), cast(self.delta()), cast(self.bias),
            backend=self.backend, path=None if self.path == "basis" else self.path,  # basis: reference backend
        )

    def _basis_backend(self, x: Tensor, dtype: torch.dtype) -> Optional[str]:
        """The backend this call resolved if it runs the basis path, else None: forced (``path="basis"``,
        which raises where it cannot apply) or chosen (:meth:`chosen_path`); never on the reference
        backend."""
        if self.path not in (None, "basis") or self.method == "siva":
            return None
        full_precision = dtype in (torch.float32, torch.float64)
        if self.path == "basis":
            backend = self.resolved_backend()
            if backend == "reference":  # _choose asks this for path=None
                return None
            if not full_precision or self.weight.requires_grad or not self.basis_spans_weight():
                raise RuntimeError(
                    f"SVDLinear(path='basis') computes U diag(σ + d) Vᵀ in place of W: it needs float32/float64, "
                    f"a frozen weight and W = U Σ Vᵀ (the weight unchanged since attach); this call has {dtype}, "
                    f"weight.requires_grad={self.weight.requires_grad}, W = U Σ Vᵀ: {self._basis_exact}")
            return backend
        if not full_precision:
            return None
        needs_grad = records_gradient(x, self.s)  # the backward's GEMMs (a trained bias needs none)
        tokens = size_for_choice(x.numel() // max(self.in_features, 1))  # no guard on a dynamic size
        path, backend = self._choose(tokens, needs_grad)
        return backend if path == "basis" else None

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
        path = self.path or "auto (merged if M·(N+K) >= N·K"
        if self.path is None:
            path += "; basis where cheaper" if self.basis_spans_weight() else ""
            path += ")"
        if path not in ("unmerged", "basis"):
            path += ", merged W_eff kept for the backward if M >= 4·N or 6·k >= M"
        return self._describe() + f", k={list(self.ranks)}, path={path}{parts}"
