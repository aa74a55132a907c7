"""Layers of the rescaled-linear family (METHODS.md §1) and SSF scale/shift.

- :class:`RLRRLinear`: RLRR (paper 000, eq. 16): ``y = x (W + s_l ⊙ W ⊙ s_rᵀ)ᵀ + b + f``.
- :class:`ScaledLinear`: SSB (``D1 W D2``), SSL (one of the two) and (IA)³ (one output or input
  vector) from paper 001 §3.2: ``y = x (s_l ⊙ W ⊙ s_rᵀ)ᵀ + b``.
- :class:`SSF`: ``y = f(x) · γ + β`` after a LayerNorm / patch embedding (RLRR's recipe, from SSF).

Every layer wraps an existing module, freezes its weights, and can ``merge()`` its adaptation
into them for inference and ``unmerge()`` back. Merging keeps the original tensors (not a copy:
the merged weight is a new tensor), so ``unmerge()`` restores them bit for bit — dividing the
scales back out would not be exact in floating point.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import reference
from ..ops import rescaled_linear
from ..ops.rescaled_linear import CPU_SEPARABLE_FORWARD_ONLY_MAX_TOKENS, choose_path, cpu_stacked_max_tokens
from .base import ForwardsAttributes, MergeableLinear, NotMergeableError, RestoresOriginals, compute_dtype

__all__ = ["RLRRLinear", "ScaledLinear", "SSF"]


def _kaiming_uniform_vector(length: int) -> Tensor:
    """RLRR's official init for a scale vector: kaiming_uniform_(a=√5) on a [1, length] parameter,
    i.e. U(−1/√length, 1/√length), so W' starts within O(1/√(NK)) of W."""
    vector = torch.empty(1, length)
    nn.init.kaiming_uniform_(vector, a=math.sqrt(5))
    return vector[0]


def _check_splits(splits: Optional[Sequence[int]], out_features: int) -> tuple[int, ...]:
    """``splits`` as a tuple (one part of all ``out_features`` when None), or ValueError."""
    splits = tuple(splits) if splits is not None else (out_features,)
    if sum(splits) != out_features or any(s <= 0 for s in splits):
        raise ValueError(f"splits must be positive and sum to out_features={out_features}, got {splits}")
    return splits


class RLRRLinear(MergeableLinear):
    """RLRR (paper 000, eq. 16): ``W' = W + s_l ⊙ W ⊙ s_rᵀ``, plus a trainable shift added to b.

    Args:
        base: the pretrained nn.Linear; its weight and bias are frozen and shared, not copied.
        splits: for a fused projection such as timm's ``qkv`` (out = 3·dim), the output sizes of
            the fused parts, e.g. ``(dim, dim, dim)``. Each part gets its own ``s_r`` so the layer
            equals separate RLRR q, k and v layers (same parameter count as the paper).
            Implemented as one rank-len(splits) op whose ``S_l`` is block-sparse.
        backend: op backend ("reference", "cpu", "triton" or None for the best available).
    """

    method = "rlrr"
    function_attributes = ("splits",)

    def __init__(
        self, base: nn.Linear, *, splits: Optional[Sequence[int]] = None, backend: Optional[str] = None
    ) -> None:
        super().__init__(base, backend)
        self.splits = splits = _check_splits(splits, self.out_features)
        device, dtype = self.weight.device, self.weight.dtype
        self.s_l = nn.Parameter(_kaiming_uniform_vector(self.out_features).to(device, dtype))
        self.s_r = nn.Parameter(
            torch.stack([_kaiming_uniform_vector(self.in_features) for _ in splits]).to(device, dtype)
        )
        self.shift = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype))

    def scale_matrices(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(S_l [N, parts], S_r [K, parts]) in ``dtype``; S_l is zero outside each row's own part.

        S_l is built from ``splits`` on every call rather than kept as a buffer: the layer's state is
        then all in its state_dict, so a model adapted on the meta device and then loaded is complete."""
        s_l = self.s_l.to(dtype)
        if len(self.splits) == 1:
            return s_l, self.s_r[0].to(dtype)
        return torch.block_diag(*(part[:, None] for part in s_l.split(self.splits))), self.s_r.T.to(dtype)

    def merged_weight_and_bias(self) -> tuple[Tensor, Optional[Tensor]]:
        s_l, s_r = self.scale_matrices(self.weight.dtype)
        weight = reference.rescaled_weight(self.weight, s_l, s_r, residual=True)
        bias = self.shift if self.bias is None else self.bias + self.shift
        return weight, bias

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        dtype = compute_dtype(x, self.weight)
        s_l, s_r = self.scale_matrices(dtype)
        bias = self.shift if self.bias is None else self.bias + self.shift
        return rescaled_linear(
            x.to(dtype), self.weight.to(dtype), s_l, s_r, bias.to(dtype), residual=True, backend=self.backend
        )

    def extra_repr(self) -> str:
        parts = f", splits={self.splits}" if len(self.splits) > 1 else ""
        rank = len(self.splits)
        fp32, fp64 = (cpu_stacked_max_tokens(True, rank, dtype) for dtype in (torch.float32, torch.float64))
        fp32_eval = cpu_stacked_max_tokens(True, rank, torch.float32, needs_grad=False)
        path = (f"path=auto (cpu: stacked up to {fp32} tokens in fp32 ({fp32_eval} without gradients), {fp64} in "
                f"fp64, else modulated)")
        return self._describe() + parts + ", " + path


class ScaledLinear(MergeableLinear):
    """``W' = s_l ⊙ W ⊙ s_rᵀ`` (no residual): SSB, SSL and (IA)³ from paper 001 §3.2.

    Args:
        base: the pretrained nn.Linear (frozen, shared).
        left: train an output-feature scale ``s_l [N]``.
        right: train an input-feature scale ``s_r [K]``.
        method: the name reported by ``extra_repr`` ("ssb": both; "ssl": one singular side;
            "ia3": output scale, as (IA)³'s rescaling of a layer's activations).
        splits: for a fused projection such as timm's ``qkv`` or GPT-2's ``c_attn`` (out = 3·dim),
            the output sizes of its parts, e.g. ``(dim, dim, dim)``; ``scaled_parts`` says which parts
            are adapted (default: all). Each adapted part gets its own scales, as a separate layer
            would: ``s_l`` holds the adapted parts' output scales one after the other, ``s_r`` is
            ``[adapted parts, K]``; the other parts keep ``W`` as it is. (IA)³, SSL and SSB on a
            fused qkv adapt the keys and values only: ``scaled_parts=(False, True, True)``.
    Scales start at one, so the layer starts equal to ``base``.
    """

    function_attributes = ("splits", "scaled_parts")

    def __init__(
        self,
        base: nn.Linear,
        *,
        left: bool = True,
        right: bool = True,
        method: str = "ssb",
        backend: Optional[str] = None,
        splits: Optional[Sequence[int]] = None,
        scaled_parts: Optional[Sequence[bool]] = None,
    ) -> None:
        super().__init__(base, backend)
        if not (left or right):
            raise ValueError("ScaledLinear needs at least one of left=True or right=True")
        splits = _check_splits(splits, self.out_features)
        scaled_parts = tuple(bool(b) for b in scaled_parts) if scaled_parts is not None else (True,) * len(splits)
        if len(scaled_parts) != len(splits) or not any(scaled_parts):
            raise ValueError(f"scaled_parts must have one flag per split ({len(splits)}) with at least one True, "
                             f"got {scaled_parts}")
        self.method, self.splits, self.scaled_parts = method, splits, scaled_parts
        device, dtype = self.weight.device, self.weight.dtype
        scaled_rows = sum(size for size, scaled in zip(splits, scaled_parts) if scaled)
        self.s_l = nn.Parameter(torch.ones(scaled_rows, device=device, dtype=dtype)) if left else None
        # One input scale per adapted part; a plain (unsplit) layer keeps the [K] vector.
        right_shape = (self.in_features,) if len(splits) == 1 else (sum(scaled_parts), self.in_features)
        self.s_r = nn.Parameter(torch.ones(right_shape, device=device, dtype=dtype)) if right else None

    @classmethod
    def ssb(cls, base: nn.Linear, backend: Optional[str] = None) -> "ScaledLinear":
        return cls(base, left=True, right=True, method="ssb", backend=backend)

    @classmethod
    def ssl(cls, base: nn.Linear, side: str = "left", backend: Optional[str] = None) -> "ScaledLinear":
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        return cls(base, left=side == "left", right=side == "right", method="ssl", backend=backend)

    @classmethod
    def ia3(cls, base: nn.Linear, side: str = "left", backend: Optional[str] = None) -> "ScaledLinear":
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        return cls(base, left=side == "left", right=side == "right", method="ia3", backend=backend)

    def _part_scales(self, dtype: torch.dtype) -> list[tuple[Optional[Tensor], Optional[Tensor]]]:
        """A split layer's scales per part, in ``dtype``: (output scales [size], input scales [K]);
        None for a side that is not trained, and for both sides of a part left alone."""
        scales, row, index = [], 0, 0
        for size, scaled in zip(self.splits, self.scaled_parts):
            if not scaled:
                scales.append((None, None))
                continue
            scales.append((None if self.s_l is None else self.s_l[row : row + size].to(dtype),
                           None if self.s_r is None else self.s_r[index].to(dtype)))
            row, index = row + size, index + 1
        return scales

    def scale_matrices(self, dtype: torch.dtype) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The op's (S_l, S_r) in ``dtype``. Unsplit: the trained vectors (None where a side is not
        trained). Split with output scales only: one [N] vector, ones on the parts left alone (the
        separable rank-1 op). Split with input scales: rank = parts, ``S_l [N, parts]`` zero outside
        each row's own part, ``S_r [K, parts]`` ones for the parts left alone."""
        if len(self.splits) == 1:
            return tuple(None if s is None else s.to(dtype) for s in (self.s_l, self.s_r))
        ones = lambda size: torch.ones(size, device=self.weight.device, dtype=dtype)  # noqa: E731
        parts = self._part_scales(dtype)
        left = None
        if self.s_l is not None:
            left = torch.cat([ones(size) if s_l is None else s_l for size, (s_l, _) in zip(self.splits, parts)])
        if self.s_r is None:
            return left, None
        rows = left if left is not None else ones(self.out_features)
        s_l = torch.block_diag(*[piece[:, None] for piece in rows.split(self.splits)])
        return s_l, torch.stack([ones(self.in_features) if s_r is None else s_r for _, s_r in parts], dim=1)

    def merged_weight_and_bias(self) -> tuple[Tensor, Optional[Tensor]]:
        # The bias is added after the scaled product, unscaled, so it merges unchanged.
        s_l, s_r = self.scale_matrices(self.weight.dtype)
        return reference.rescaled_weight(self.weight, s_l, s_r, residual=False), self.bias

    def _by_part(self, dtype: torch.dtype) -> bool:
        """Split with input scales where the rank-1 op is separable (float32/float64): one op per part
        (a plain linear for the parts left alone) instead of one rank-len(splits) modulated op. Each
        part is then one GEMM on the frozen weight rows; at M=4096, K=768, SSB on a ViT qkv
        (2 CPU threads) a training step measured 187 ms against the modulated op's 246 ms."""
        return self.s_r is not None and len(self.splits) > 1 and choose_path(False, 1, dtype) == "separable"

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        dtype = compute_dtype(x, self.weight)
        x, weight = x.to(dtype), self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        if not self._by_part(dtype):
            s_l, s_r = self.scale_matrices(dtype)
            return rescaled_linear(x, weight, s_l, s_r, bias, residual=False, backend=self.backend)
        outputs = []
        biases = [None] * len(self.splits) if bias is None else bias.split(self.splits)
        for w_part, b_part, (s_l, s_r) in zip(weight.split(self.splits), biases, self._part_scales(dtype)):
            if s_r is None:  # a part left alone (every adapted part has its input scale here)
                outputs.append(F.linear(x, w_part, b_part))
            else:
                outputs.append(rescaled_linear(x, w_part, s_l, s_r, b_part, residual=False, backend=self.backend))
        return torch.cat(outputs, dim=-1)

    def extra_repr(self) -> str:
        sides = "+".join(side for side, s in (("left", self.s_l), ("right", self.s_r)) if s is not None)
        dtype = self.weight.dtype
        if len(self.splits) == 1:
            parts, path = "", choose_path(residual=False, rank=1, dtype=dtype)
        else:
            parts = f", splits={self.splits}, scaled_parts={self.scaled_parts}"
            rank = len(self.splits) if self.s_r is not None else 1
            path = "separable per part" if self._by_part(dtype) else choose_path(False, rank, dtype)
        if path.startswith("separable"):
            # Without a gradient (evaluation) the cpu backend may modulate instead (see choose_path).
            tokens = CPU_SEPARABLE_FORWARD_ONLY_MAX_TOKENS + 1
            if choose_path(False, 1, dtype, tokens, backend="cpu", needs_grad=False) == "modulated":
                path += f"; without gradients on cpu: modulated from {tokens} tokens"
        return self._describe() + f", scales={sides}{parts}, path={path} ({dtype} weights)"


def _output_width(module: nn.Module) -> Optional[int]:
    """The channel count of torch's own norms, Linear and convolutions (None for other modules, whose
    attributes of those names may mean something else: transformers' patch embeddings' num_channels
    is their input's)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return module.normalized_shape[-1] if module.normalized_shape else None
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.num_features
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    return None


class SSF(ForwardsAttributes, RestoresOriginals):
    """Scale-and-shift after a module: ``y = inner(x) · γ + β`` over the channel dimension
    ``channel_dim`` (the last one; 1 after a channels-first norm such as timm's LayerNorm2d in ConvNeXt).

    ``inner`` is typically a LayerNorm, a Linear or a timm PatchEmbed. ``fold_into`` names the
    submodule of ``inner`` whose affine parameters produce those channels ("" for ``inner`` itself,
    ``"proj"`` for a patch embedding's Conv2d); :meth:`merge` folds γ, β into it (``w ← w·γ``,
    ``b ← b·γ + β``) and :meth:`unmerge` restores the original tensors exactly. A bias-free ``nn.Linear``
    or ``nn.Conv2d`` (the patch embedding of timm's CLIP-style ViTs, ``pre_norm=True``) gets β as a new
    bias (frozen, as the weights) while merged, so its ``state_dict`` has a ``bias`` entry then;
    :meth:`unmerge` removes it again (``bias`` is None, as before). Norms without a bias (RMSNorm,
    ``LayerNorm(bias=False)``) are not merged: :meth:`merge` raises before changing anything.
    Init as RLRR/SSF: γ ~ N(1, 0.02), β ~ N(0, 0.02).
    """

    method = "ssf"
    # Attributes SSF does not have come from ``inner``: a model's own code may read them
    # (transformers' ViT embeddings read ``patch_embeddings.projection``).
    _wrapped = "inner"

    def __init__(self, inner: nn.Module, dim: int, fold_into: str = "", channel_dim: int = -1) -> None:
        super().__init__()
        if channel_dim not in (-1, 1):
            raise ValueError(f"channel_dim must be -1 (channels last) or 1 (channels first), got {channel_dim!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int (the channel count), got {dim!r}")
        width = _output_width(inner)
        if width is not None and width != dim:
            raise ValueError(f"dim must be {type(inner).__name__}'s output width {width}, got {dim}")
        self.inner = inner
        self.dim = dim
        self.channel_dim = channel_dim
        parameter = next(inner.parameters(), None)
        device = parameter.device if parameter is not None else None
        dtype = parameter.dtype if parameter is not None else None
        self.gamma = nn.Parameter(torch.empty(dim, device=device, dtype=dtype).normal_(1.0, 0.02))
        self.beta = nn.Parameter(torch.empty(dim, device=device, dtype=dtype).normal_(0.0, 0.02))
        self.fold_into = fold_into

    def forward(self, x: Tensor, *args, **kwargs) -> Union[Tensor, tuple]:
        y = self.inner(x, *args, **kwargs)  # e.g. Hiera's patch_embed(x, mask=...)
        if self.merged:
            return y
        if isinstance(y, tuple):  # transformers' Swin patch embeddings return (tokens, their grid size)
            return (reference.ssf(y[0], self.gamma, self.beta, self.channel_dim),) + y[1:]
        return reference.ssf(y, self.gamma, self.beta, self.channel_dim)

    def _fold_target(self) -> tuple[nn.Module, Optional[Tensor], Optional[Tensor]]:
        target = self.inner.get_submodule(self.fold_into)
        weight, bias = getattr(target, "weight", None), getattr(target, "bias", None)
        return target, weight if isinstance(weight, Tensor) else None, bias if isinstance(bias, Tensor) else None

    @staticmethod
    def _takes_new_bias(target: nn.Module) -> bool:
        """A bias-free layer whose forward adds ``self.bias`` when there is one: torch's own Linear and
        Conv2d forwards (a subclass with another forward might ignore a bias it was built without)."""
        return getattr(target, "bias", False) is None and \
            type(target).forward in (nn.Linear.forward, nn.Conv2d.forward)

    @property
    def mergeable(self) -> bool:
        """Whether γ, β fold into ``inner``: it needs a weight of this SSF's width and a bias of it, or to
        be a bias-free Linear/Conv2d that takes β as a new bias. An RMSNorm (no bias) or a LayerNorm without
        a bias has nowhere to put β."""
        target, weight, bias = self._fold_target()
        if weight is None or weight.shape[0] != self.dim:
            return False
        return tuple(bias.shape) == (self.dim,) if bias is not None else self._takes_new_bias(target)

    def _not_mergeable(self) -> str:
        target, weight, bias = self._fold_target()
        shapes = [None if t is None else tuple(t.shape) for t in (weight, bias)]
        return (f"SSF can only merge into a module with a weight and a bias of {self.dim} channels (or a bias-free "
                f"nn.Linear / nn.Conv2d); {type(target).__name__} has weight {shapes[0]} and bias {shapes[1]}")

    def _merged_parameters(self) -> tuple[list[str], list[Optional[Tensor]]]:
        _, weight, bias = self._fold_target()
        prefix = f"{self.fold_into}." if self.fold_into else ""
        return [f"inner.{prefix}weight", f"inner.{prefix}bias"], [weight, bias]

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("SSF is already merged; call unmerge() first")
        if not self.mergeable:
            raise NotMergeableError(self._not_mergeable())
        target, weight, bias = self._fold_target()
        gamma = self.gamma.to(weight.dtype).reshape(-1, *([1] * (weight.dim() - 1)))
        originals = (weight.data, None if bias is None else bias.data)
        weight.data = weight.data * gamma
        if bias is None:  # β alone is the shift; a copy, frozen like the weight it sits beside
            target.bias = nn.Parameter(self.beta.detach().to(weight.dtype, copy=True), requires_grad=False)
        else:
            bias.data = bias.data * self.gamma.to(bias.dtype) + self.beta.to(bias.dtype)
        self._keep_originals(originals)

    @torch.no_grad()
    def unmerge(self) -> None:
        target = self.inner.get_submodule(self.fold_into)
        weight, bias = self._take_originals()
        target.weight.data = weight
        if bias is None:  # the bias merge() created goes: the layer is bias-free again, state_dict keys included
            target.bias = None
        else:
            target.bias.data = bias

    def extra_repr(self) -> str:
        layout = ", channels first" if self.channel_dim == 1 else ""
        return f"method=ssf, dim={self.dim}{layout}" + (", merged" if self.merged else "")
