"""LoRA-family adapters on Mixture-of-Experts expert weights stored as one 3-D parameter per projection.

transformers keeps a MoE layer's experts in one ``*Experts`` module whose projections are 3-D parameters,
e.g. MixtralExperts' ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``; there is no nn.Linear per
expert to wrap. :class:`LowRankExperts` gives every expert e its own factors, so the expert's matrix is

    W_e' = W_e + s·A_e G_e B_e        A_e [N, r] (zero init), B_e [r, K] (kaiming-uniform), G_e as LowRankLinear

with N, K the expert's output and input sizes (the letters and init of :mod:`subspace_ops.nn.lowrank`: A is
the up-projection, PEFT's lora_B; B the down-projection, PEFT's lora_A), ``s = alpha / rank``.

**Layout.** A parameter is stored [E, out, in] (``"out_in"``: the expert computes ``x W_eᵀ``, as Mixtral,
Qwen2/3-MoE, OLMoE, DeepSeek-V3) or [E, in, out] (``"in_out"``: ``x W_e``, as GPT-OSS and Llama-4).
:func:`expert_layout` reads it from the owning module: transformers'
``@use_experts_implementation(is_transposed=...)`` stores the flag on every experts module; a few
undecorated classes are listed in :data:`EXPERT_LAYOUTS`. Any other owner is refused: guessing which side
is the input would train a different (transposed) adapter silently.

**How it is applied.** The layer is a ``torch.nn.utils.parametrize`` parametrization of the experts
module's parameter: every read of ``experts.gate_up_proj`` (whatever experts implementation the model
runs: eager, batched_mm, grouped_mm) returns ``W + s·A G B``, formed with one ``baddbmm``, so it
materializes a tensor of the parameter's size (E·out·in) per forward, as PEFT's ``target_parameters``
does. The experts module runs each forward inside ``parametrize.cached()`` (forward hooks, see
:func:`attach`), so the eager implementation, which indexes the parameter once per expert, still forms
it once. The frozen base tensor becomes ``<module>.parametrizations.<name>.original`` (torch's naming);
the factors are ``<module>.parametrizations.<name>.0.lora_a``, ``lora_b``, ``lora_g``.

**Merging** folds ΔW into the base tensor (in float32 or better, stored in its dtype) and keeps the
original tensor, so ``unmerge()`` restores it bit for bit, as :class:`~subspace_ops.nn.base.MergeableLinear`.
``detach(module, name, keep_merged=True)`` removes a merged layer and leaves the merged tensor as the plain
parameter (``merge_and_unload``); ``layer.disabled = True`` makes reads return the base tensor unchanged
(``disable_adapter``) without detaching anything.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .base import RestoresOriginals
from .lowrank import G_KINDS, _check_rank, _scaling

__all__ = ["EXPERT_LAYOUTS", "LowRankExperts", "adapters", "attach", "detach", "expert_layout"]

#: Layouts of experts modules that transformers' ``@use_experts_implementation`` does not describe
#: (no ``is_transposed`` attribute), by class name, read from their forward: Llama-4 multiplies
#: ``torch.bmm(x, self.gate_up_proj)`` ([E, in, out]); JetMoE's ParallelExperts ``F.linear(x, self.weight[i])``.
EXPERT_LAYOUTS = {"Llama4TextExperts": "in_out", "JetMoeParallelExperts": "out_in"}
LAYOUTS = ("out_in", "in_out")


def _own_class(module: nn.Module) -> type:
    """The module's class, seen through the subclass ``parametrize`` swaps in (``ParametrizedX``)."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def expert_layout(module: nn.Module) -> Optional[str]:
    """``"out_in"`` / ``"in_out"`` for the 3-D parameters of an experts module, None when unknown."""
    flag = getattr(module, "is_transposed", None)  # set by transformers' @use_experts_implementation
    if isinstance(flag, bool):
        return "in_out" if flag else "out_in"
    return EXPERT_LAYOUTS.get(_own_class(module).__name__)


class LowRankExperts(RestoresOriginals):
    """A parametrization ``W -> W + s·A G B`` per expert of a 3-D expert parameter (module docstring).

    Args:
        weight: the parameter [E, N, K] (layout "out_in") or [E, K, N] ("in_out"); only its shape,
            dtype and device are read.
        rank: r.
        layout: "out_in" or "in_out" (:func:`expert_layout`).
        g: "none" (LoRA), "diag" (AdaLoRA / TriLoRA: ``lora_g [E, r]``), "full" (FLoRA: ``lora_g [E, r, r]``).
        alpha: s = alpha / rank; None means alpha = rank.
        init: "lora" (A = 0, B kaiming-uniform, G = I) or "adalora" (G = 0, A and B ~ N(0, 0.02)).

    Parameters: ``lora_a [E, N, r]``, ``lora_b [E, r, K]``, ``lora_g`` (None, [E, r] or [E, r, r]).
    """

    function_attributes = ("scaling",)  # recorded by adapter checkpoints (see MergeableLinear)

    def __init__(self, weight: Tensor, rank: int, *, layout: str, g: str = "none", alpha: Optional[float] = None,
                 init: str = "lora") -> None:
        super().__init__()
        if weight.dim() != 3:
            raise ValueError(f"weight must be a 3-D expert parameter [E, out, in] or [E, in, out], got shape "
                             f"{tuple(weight.shape)}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if g not in G_KINDS:
            raise ValueError(f"g must be one of {tuple(G_KINDS)}, got {g!r}")
        if init not in ("lora", "adalora"):
            raise ValueError(f"init must be 'lora' or 'adalora', got {init!r}")
        experts, first, second = weight.shape
        self.num_experts = experts
        self.out_features, self.in_features = (first, second) if layout == "out_in" else (second, first)
        self.layout = layout
        self.rank = _check_rank(rank)
        self.g_kind = g
        self.method = G_KINDS[g]
        self.alpha, self.scaling = _scaling(alpha, rank)
        factory = dict(dtype=weight.dtype, device=weight.device)
        # B per expert as PEFT's lora_A (nn.Linear(in, r·E)): kaiming-uniform with fan_in = in, drawn in
        # float32 for the same values in every dtype. (On a [E, r, in] tensor torch would take fan_in = r·in.)
        down = torch.empty(experts * rank, self.in_features)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        self.lora_a = nn.Parameter(torch.zeros(experts, self.out_features, rank, **factory))
        self.lora_b = nn.Parameter(down.view(experts, rank, self.in_features).to(**factory))
        if g == "none":
            self.register_parameter("lora_g", None)
        elif g == "diag":
            self.lora_g = nn.Parameter(torch.ones(experts, rank, **factory))
        else:
            self.lora_g = nn.Parameter(torch.eye(rank, **factory).repeat(experts, 1, 1))
        if init == "adalora":  # AdaLoRA §3.1: Λ = 0, P and Q ~ N(0, 0.02); ΔW = 0 through Λ
            with torch.no_grad():
                self.lora_g.zero_()
                self.lora_a.normal_(0.0, 0.02)
                self.lora_b.normal_(0.0, 0.02)
        # True: reads return the base tensor as it is (SubspacePeftModel.disable_adapter). A flag rather than
        # detaching: the parametrization, the factors and optimizer references stay exactly as they are.
        self.disabled = False
        # [the ParametrizationList holding the base tensor], set by attach(). A list, not a submodule (that
        # would be a cycle in modules()) nor a weakref: deepcopy must map it to the copy's own list, or
        # merging a copied model would write into the original's weights.
        self._owner: Optional[list] = None

    def low_rank_factors(self) -> tuple[Tensor, Tensor]:
        """(A [E, N, r], B [E, r, K]): per expert the factors the MPC regularizers constrain (G excluded)."""
        return self.lora_a, self.lora_b

    def _up(self, dtype: torch.dtype) -> Tensor:
        """A_e G_e [E, N, r] in ``dtype``."""
        a = self.lora_a.to(dtype)
        if self.lora_g is None:
            return a
        g = self.lora_g.to(dtype)
        return a * g[:, None, :] if self.g_kind == "diag" else torch.bmm(a, g)

    def delta_weight(self) -> Tensor:
        """ΔW in the parameter's layout ([E, N, K] or [E, K, N]) in float32 or better (merging, inspection)."""
        acc = torch.promote_types(self.lora_a.dtype, torch.float32)
        delta = self.scaling * torch.bmm(self._up(acc), self.lora_b.to(acc))
        return delta if self.layout == "out_in" else delta.transpose(1, 2)

    def forward(self, weight: Tensor) -> Tensor:
        if self.merged or self.disabled:
            return weight
        # A parametrization must keep the parameter's dtype; autocast would run baddbmm in its own dtype.
        with torch.autocast(device_type=weight.device.type, enabled=False):
            up, down = self._up(weight.dtype), self.lora_b.to(weight.dtype)
            if self.layout == "out_in":
                return torch.baddbmm(weight, up, down, alpha=self.scaling)
            return torch.baddbmm(weight, down.transpose(1, 2), up.transpose(1, 2), alpha=self.scaling)

    def _original(self) -> nn.Parameter:
        owner = None if self._owner is None else self._owner[0]
        if owner is None:
            raise RuntimeError("LowRankExperts is not attached to an experts parameter (use attach())")
        return owner.original

    def _merged_parameters(self) -> tuple[list[str], list[Optional[Tensor]]]:
        return ["the experts parameter"], [self._original()]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base parameter (reads then return it unchanged); unmerge() restores it exactly."""
        if self.merged:
            raise RuntimeError("LowRankExperts is already merged; call unmerge() first")
        original = self._original()
        delta = self.delta_weight()
        merged = (original.to(delta.dtype) + delta).to(original.dtype)
        originals = [original.data]
        original.data = merged
        self._keep_originals(originals)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base tensor saved by :meth:`merge`."""
        original = self._original()
        (original.data,) = self._take_originals()

    def extra_repr(self) -> str:
        state = (", merged" if self.merged else "") + (", disabled" if self.disabled else "")
        return (f"method={self.method}, experts={self.num_experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}, layout={self.layout}, rank={self.rank}, g={self.g_kind}, "
                f"alpha={self.alpha:g}{state}")


def adapters(model: nn.Module) -> list[tuple[str, nn.Module, str, LowRankExperts]]:
    """``(owner name, owner module, parameter name, layer)`` of every :class:`LowRankExperts` attached in
    ``model``."""
    return [(name, module, attribute, plist[0]) for name, module in model.named_modules()
            if parametrize.is_parametrized(module)
            for attribute, plist in module.parametrizations.items() if isinstance(plist[0], LowRankExperts)]


def _enter_cache(module: nn.Module, args: tuple) -> None:
    context = parametrize.cached()
    context.__enter__()
    module._subspace_parametrize_caches.append(context)


def _exit_cache(module: nn.Module, args: tuple, output: object) -> None:
    caches = module._subspace_parametrize_caches
    if caches:  # always_call: also after a forward that raised
        caches.pop().__exit__(None, None, None)


def attach(module: nn.Module, name: str, layer: LowRankExperts) -> None:
    """Make ``layer`` the parametrization of ``module``'s parameter ``name`` and run ``module``'s forward
    with parametrizations cached (one W + ΔW per forward, however often the forward reads it)."""
    if parametrize.is_parametrized(module, name):
        raise ValueError(f"{type(module).__name__}.{name} already has a parametrization: it is adapted already")
    requires_grad = getattr(module, name).requires_grad
    if "_subspace_parameter_order" not in vars(module):  # for detach(): the module's parameters in their order
        module._subspace_parameter_order = list(module._parameters)
    parametrize.register_parametrization(module, name, layer)
    plist = module.parametrizations[name]
    plist.original.requires_grad_(requires_grad)  # register_parametrization keeps the Parameter as is; be explicit
    layer._owner = [plist]
    if "_subspace_parametrize_caches" not in vars(module):
        module._subspace_parametrize_caches = []
        handles = (module.register_forward_pre_hook(_enter_cache),
                   module.register_forward_hook(_exit_cache, always_call=True))
        module._subspace_parametrize_hooks = handles


def detach(module: nn.Module, name: str, *, keep_merged: bool = False) -> None:
    """Undo :func:`attach`: the base parameter back in place (the same Parameter object), hooks removed with
    the last. Its values are the unmerged ones, or with ``keep_merged=True`` (the layer must be merged) the
    merged W + ΔW, which then cannot be unmerged any more."""
    layer = module.parametrizations[name][0]
    if keep_merged and not (isinstance(layer, LowRankExperts) and layer.merged):
        raise ValueError(f"detach(keep_merged=True): {type(module).__name__}.{name}'s parametrization is not a "
                         "merged LowRankExperts; merge() it first, or detach with keep_merged=False")
    if isinstance(layer, LowRankExperts) and layer.merged:
        if keep_merged:
            layer._merge_record = None  # original's data is the merged tensor: it stays as the plain parameter
        else:
            layer.unmerge()  # remove_parametrizations keeps original's current data, which would be the merged one
    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    if isinstance(layer, LowRankExperts):
        layer._owner = None  # detached: merge() must not write into the parameter any more
    # remove_parametrizations registers the parameter again at the end; put it back in its place, so the
    # module's parameters (state_dict keys, optimizer groups) come in the order they had.
    order = vars(module).get("_subspace_parameter_order", [])
    params = dict(module._parameters)
    module._parameters.clear()
    module._parameters.update({k: params.pop(k) for k in order if k in params})
    module._parameters.update(params)
    if not parametrize.is_parametrized(module) and "_subspace_parametrize_hooks" in vars(module):
        for handle in module._subspace_parametrize_hooks:
            handle.remove()
        del module._subspace_parametrize_hooks, module._subspace_parametrize_caches, module._subspace_parameter_order
