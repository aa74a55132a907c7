"""HF PEFT integration: run PEFT's own (IA)³, LoRA, DoRA and AdaLoRA ``Linear`` layers on subspace_ops'
fused ops.

    model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    report = subspace_ops.peft.accelerate(model)   # in place; prints as a table of what was done
    ...train, model.save_pretrained(...) as usual...
    subspace_ops.peft.restore(model)               # back to PEFT's own forward

What each layer computes (same math as PEFT, one fused op instead of PEFT's separate modules):

- (IA)³ ``Linear`` (``peft.tuners.ia3.layer.Linear``): PEFT computes ``base(x) · l`` (not
  feedforward: l scales the output features, the bias included) or ``base(x · l)`` (feedforward: l
  scales the input features). That is ``rescaled_linear(x, W, s_l=l, s_r=None, bias=b·l,
  residual=False)`` resp. ``rescaled_linear(x, W, None, s_r=l, bias=b, residual=False)``.
- LoRA ``Linear`` (``peft.tuners.lora.layer.Linear``): PEFT computes
  ``base(x) + lora_B(lora_A(dropout(x))) · scaling``; that is ``lowrank_linear(x, W, a=lora_B.weight,
  g=None, b=lora_A.weight, bias, scaling=scaling, dropout_p=p, training=dropout.training)``. The
  dropout mask is drawn by the same ``F.dropout`` call on the same RNG stream, so in training mode
  too the result equals PEFT's for a given seed.
- DoRA (a LoRA ``Linear`` with ``use_dora=True``): PEFT computes ``base(x) + (c - 1)·x Wᵀ + c·s·B(A(x))``
  with ``c = m / ‖W + s·BA‖`` per output row, the norm detached (DoRA §4.3), forming the [out, in]
  matrix ``W + s·BA`` on every call. That is ``c ⊙ lowrank_linear(x, W, B, None, A) + bias`` with the
  norm from :func:`~subspace_ops.nn.lowrank.dora_row_norm` (no [out, in] tensor; float32 or better,
  where PEFT uses the input dtype). With active dropout in training PEFT computes ``(c - 1)·W·dropout(x)``
  instead, a second base GEMM on the dropped input: such calls run PEFT's forward (eval calls, and
  dropout 0, are fused).
- AdaLoRA ``SVDLinear`` (``peft.tuners.adalora.layer``): PEFT computes ``base(x) + dropout(x) (Q ⊙ Λ)ᵀ Pᵀ ·
  α / (ranknum + 1e-5)`` with ``lora_A`` = Q [r, in], ``lora_E`` = Λ [r, 1], ``lora_B`` = P [out, r];
  that is ``lowrank_linear(x, W, a=P, g=Λ·α/(ranknum + 1e-5), b=Q, bias, dropout_p=p)`` (G diagonal;
  singular values the rank allocator pruned are zeros in Λ, as in PEFT).

Everything is cast to the dtype PEFT's base layer computes in (the autocast dtype under autocast,
else the base weight's dtype) before the op, as our layers do. When the adapter weights have
another dtype than the base layer (PEFT keeps adapters in float32 on a bf16/fp16 base by default)
PEFT runs the adapter path in the adapter dtype and rounds the sum to the base dtype; the fused op
runs it in the base dtype: the outputs agree to the base dtype's precision, not bit for bit, and
the float32 adapter parameters get gradients computed in the base dtype (as under autocast).

**Only what the fused op expresses is accelerated; everything else runs PEFT's code.** A layer is
accelerated when its type is exactly PEFT's IA3/LoRA ``Linear`` or AdaLoRA ``SVDLinear`` (not a
quantized or otherwise specialized subclass), its base layer is a plain ``nn.Linear`` (or, with
``fan_in_fan_out=True``, GPT-2's transformers ``Conv1D``, whose [in, out] weight the op reads transposed,
without a copy), and (LoRA) its adapters are vanilla LoRA or DoRA (no other variant: aLoRA, Arrow, …),
dropout ``nn.Identity`` or a non-inplace ``nn.Dropout``, ``lora_A``/``lora_B`` plain ``nn.Linear``
(``lora_B`` with a bias only under ``lora_bias=True``, which adds ``s·b_B`` to the base bias), scaling a
number. :func:`accelerate` leaves every other tuner layer as it is and lists it in the report with the
reason. Each call of an accelerated layer then checks what can change between calls: exactly one adapter
of the layer is active, nothing is merged, adapters are enabled, no hooks and no instance-level
``forward`` on the base layer or on the adapter's own modules (``lora_A``, ``lora_B``, ``lora_dropout``,
``lora_magnitude_vector``: the fused op reads their weights and would skip them; e.g. an accelerate
offload hook, an activation-capture or per-sample-gradient hook), no global module hooks, DoRA without
active dropout in training, no ``adapter_names=`` mixed batch or other extra forward arguments, an input
dtype PEFT would accept, adapter and base on one device. When they fail the call runs PEFT's own forward:
never a silently different result, and a ``RuntimeWarning`` (once per reason; not for merged or disabled
adapters, nor a layer with no active adapter, where PEFT's forward is just the base layer) says that the
adapter ran unfused. So a layer accelerated while merged, disabled or without an active adapter
(``set_adapter`` to an adapter on other layers) runs fused once that state ends.
:func:`unsupported_reason` tells why a layer (would) run PEFT's forward.

**Mechanism: a class swap.** An accelerated layer's ``__class__`` becomes :class:`FusedLoraLinear`,
:class:`FusedIA3Linear` or :class:`FusedAdaLoraLinear`, subclasses of PEFT's classes that only
override ``forward`` (and ``__repr__`` shows it: ``lora.FusedLoraLinear``). Trade-offs, against the alternatives:

- The module object, its parameters, buffers and ``state_dict`` keys are untouched, so
  ``save_pretrained`` / ``load_adapter`` / ``merge_and_unload`` / ``set_adapter`` work as before,
  ``isinstance`` checks against PEFT's classes still hold, and :func:`restore` is exact (swap back).
- Unlike replacing ``forward`` on the instance (what accelerate's hooks do), ``copy.deepcopy`` and
  pickling keep working (the classes are importable module attributes), and ``torch.compile`` sees
  an ordinary module.
- ``LoraConfig._register_custom_module`` (PEFT's experimental hook) is an injection-time mapping
  from a base layer type to a LoRA layer class: it only affects models created by ``get_peft_model``
  with that config, cannot convert an existing or ``from_pretrained``-loaded PeftModel, must
  re-implement PEFT's ``Linear`` constructor, and has no (IA)³ counterpart. Not used here.
- The cost: the subclass relies on PEFT's attribute names (``base_layer``, ``lora_A``, ``ia3_l``,
  ``merged_adapters``, ``lora_variant``, …), hence the pinned version range
  :data:`SUPPORTED_PEFT_VERSIONS`; :func:`accelerate` raises :class:`UnsupportedPeftVersionError`
  outside it (the tests pin the same range). Each call re-checks the conditions above: a few
  dictionary lookups, negligible against a linear layer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .adapters import is_conv1d
from .backends import resolve_backend
from .nn.base import compute_dtype
from ._validate import records_gradient
from .nn.lowrank import RowNormKeeper, dora_linear

__all__ = [
    "AccelerateReport",
    "SUPPORTED_PEFT_VERSIONS",
    "UnsupportedPeftVersionError",
    "accelerate",
    "check_peft_version",
    "restore",
    "unsupported_reason",
]

#: The PEFT releases whose layer internals this module was written and tested against (PEP 440).
SUPPORTED_PEFT_VERSIONS = ">=0.21.0,<0.22"

_BACKEND_ATTR = "_subspace_ops_backend"
_DORA_NORMS_ATTR = "_subspace_ops_dora_norms"  # adapter name -> RowNormKeeper, in an accelerated layer's __dict__


class UnsupportedPeftVersionError(RuntimeError):
    """The installed PEFT is outside :data:`SUPPORTED_PEFT_VERSIONS`."""


def check_peft_version() -> str:
    """The installed PEFT version; raises UnsupportedPeftVersionError outside the supported range."""
    try:
        import peft
    except ImportError as exc:
        raise ImportError(
            f"subspace_ops.peft needs peft{SUPPORTED_PEFT_VERSIONS}: pip install 'peft{SUPPORTED_PEFT_VERSIONS}'"
        ) from exc
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        ok = Version(peft.__version__) in SpecifierSet(SUPPORTED_PEFT_VERSIONS, prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise UnsupportedPeftVersionError(
            f"subspace_ops.peft supports peft{SUPPORTED_PEFT_VERSIONS}, but peft {peft.__version__} is installed: "
            f"the accelerated layers depend on PEFT's layer internals, which change between releases. "
            f"Install a supported release (pip install 'peft{SUPPORTED_PEFT_VERSIONS}') or run without acceleration."
        )
    return peft.__version__


# ---------------------------------------------------------------------------------------------
# when the fused path applies
def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` would run more than its forward: hooks, or a forward set on the instance."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__)


def _layer_reason(layer: nn.Module, in_call: bool = True) -> Optional[str]:
    """Conditions shared by IA3 and LoRA layers: the base layer and the layout, and (``in_call``) the state
    that can change between calls: hooks, the merge/disable state."""
    base = getattr(layer, "base_layer", None)
    fan_in_fan_out, conv1d = getattr(layer, "fan_in_fan_out", False), is_conv1d(base)
    if type(base) is not nn.Linear and not conv1d:
        return f"the base layer is {type(base).__name__}, not a plain nn.Linear or a transformers Conv1D"
    if conv1d != bool(fan_in_fan_out):  # PEFT reads a Conv1D's [in, out] weight only with it
        return f"fan_in_fan_out={fan_in_fan_out} on a {type(base).__name__} base layer"
    if not base.weight.is_floating_point():
        return f"the base weight has dtype {base.weight.dtype}"
    if not in_call:
        return None
    if _hooked(base):
        return "the base layer has hooks or a replaced forward (e.g. an offload hook); PEFT must call it"
    if _global_module_hooks():
        return "global nn.Module hooks are registered; they must see the base layer's call"
    if layer.disable_adapters:
        return "adapters are disabled"
    if layer.merged:
        return f"adapter(s) {layer.merged_adapters} are merged into the base weight"
    return None


def _global_module_hooks() -> bool:
    from torch.nn.modules import module as module_impl

    return any(getattr(module_impl, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"
    ))


# PEFT's forward on a layer none of whose adapters is active is the base layer's: no warning for it
NO_ACTIVE_ADAPTER = "no active adapter on this layer"


def _reason_for(layer: nn.Module, adapters: Any, check: Any, in_call: bool) -> tuple[Optional[str], Optional[str]]:
    """(the adapter the fused path computes, None) or (None, reason), with ``check(layer, name, in_call)``
    the per-adapter conditions. In a call exactly one of the layer's adapters must be active. When
    :func:`accelerate` asks (``in_call=False``) only what cannot change by itself counts, for every adapter
    the layer holds: which one is active, merged or disabled, hooks and devices are checked at each call
    (a layer accelerated while merged runs fused once unmerged)."""
    reason = _layer_reason(layer, in_call)
    if reason:
        return None, reason
    if in_call:
        names = [name for name in layer.active_adapters if name in adapters]
        if not names:
            return None, NO_ACTIVE_ADAPTER
        if len(names) > 1:
            return None, f"{len(names)} active adapters on this layer ({names}); the fused path takes exactly one"
    else:
        names = list(adapters)
    for name in names:
        reason = check(layer, name, in_call)
        if reason:
            return None, reason
    return (names[0] if names else None), None


def _ia3_check(layer: nn.Module, name: str, in_call: bool) -> Optional[str]:
    scale = layer.ia3_l[name]
    expected = (1, layer.in_features) if layer.is_feedforward else (layer.out_features, 1)
    if tuple(scale.shape) != expected:
        return f"ia3_l[{name!r}] has shape {tuple(scale.shape)}, expected {expected}"
    if in_call and scale.device != layer.base_layer.weight.device:
        return "the adapter and the base layer are on different devices"
    return None


def _ia3_reason(layer: nn.Module, in_call: bool = True) -> tuple[Optional[str], Optional[str]]:
    return _reason_for(layer, layer.ia3_l, _ia3_check, in_call)


def _dora_reason(layer: nn.Module, name: str, in_call: bool) -> Optional[str]:
    """Conditions for PEFT's DoRA (``use_dora=True``): its own variant and magnitude classes, and no
    active dropout in a training call (PEFT then computes ``result + (c - 1)·W·dropout(x) + ...``: the
    base GEMM twice, once on the dropped input, which the fused op does not express)."""
    variant, magnitude = layer.lora_variant.get(name), layer.lora_magnitude_vector[name]
    if type(variant).__name__ != "DoraLinearVariant" or type(magnitude).__name__ != "DoraLinearLayer":
        return f"adapter {name!r}: DoRA with {type(variant).__name__} / {type(magnitude).__name__}"
    if tuple(magnitude.weight.shape) != (layer.out_features,):
        return f"adapter {name!r}: DoRA magnitude of shape {tuple(magnitude.weight.shape)}"
    if in_call and _hooked(magnitude):
        return f"adapter {name!r}: lora_magnitude_vector has hooks or a replaced forward; PEFT must call it"
    if in_call and layer.training and type(layer.lora_dropout[name]) is not nn.Identity:
        return (f"adapter {name!r} is DoRA with dropout, in training (PEFT then scales W·dropout(x) by "
                "m/‖W + sBA‖ - 1)")
    return None


def _lora_check(layer: nn.Module, name: str, in_call: bool) -> Optional[str]:
    variant = layer.lora_variant.get(name)
    if layer.use_dora.get(name, False):
        reason = _dora_reason(layer, name, in_call)
        if reason:
            return reason
    elif variant is not None:
        return f"adapter {name!r} is a LoRA variant ({type(variant).__name__})"
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_a.bias is not None:
        return f"adapter {name!r}: lora_A / lora_B are not nn.Linear layers, lora_A without a bias"
    if lora_b.bias is not None and not layer.lora_bias.get(name, False):
        return f"adapter {name!r}: lora_B has a bias but lora_bias is not set"
    hooked = [label for label, m in (("lora_A", lora_a), ("lora_B", lora_b)) if in_call and _hooked(m)]
    if hooked:  # the fused op reads their weights, never calls them
        return f"adapter {name!r}: {' and '.join(hooked)} has hooks or a replaced forward; PEFT must call it"
    return _adapter_reason(layer, name, (lora_a.weight, lora_b.weight), in_call)


def _lora_reason(layer: nn.Module, in_call: bool = True) -> tuple[Optional[str], Optional[str]]:
    """(the active adapter, None) when the fused op computes what PEFT's LoRA Linear computes, else
    (None, reason). ``in_call``: also the conditions of the current state (see :func:`_reason_for`)."""
    return _reason_for(layer, layer.lora_A, _lora_check, in_call)


def _adapter_reason(layer: nn.Module, name: str, tensors: tuple[Tensor, ...], in_call: bool) -> Optional[str]:
    """Conditions shared by LoRA and AdaLoRA adapters: dropout, scaling, the adapter's device."""
    dropout = layer.lora_dropout[name]
    if not (type(dropout) is nn.Identity or (type(dropout) is nn.Dropout and not dropout.inplace)):
        return f"adapter {name!r}: dropout {type(dropout).__name__} is not nn.Dropout / nn.Identity"
    scaling = layer.scaling.get(name)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        hint = " (a tensor: the model was prepared for hotswapping)" if isinstance(scaling, Tensor) else ""
        return f"adapter {name!r}: scaling {scaling!r} is not a number{hint}"
    if not in_call:
        return None
    if _hooked(dropout):
        return f"adapter {name!r}: lora_dropout has hooks or a replaced forward; PEFT must call it"
    if any(t.device != layer.base_layer.weight.device for t in tensors):
        return "the adapter and the base layer are on different devices"
    return None


def _adalora_check(layer: nn.Module, name: str, in_call: bool) -> Optional[str]:
    """PEFT's AdaLoRA ``SVDLinear``: P [out, r], Λ [r, 1], Q [r, in] (``lora_B``, ``lora_E``, ``lora_A``)."""
    right, values, left = layer.lora_A[name], layer.lora_E[name], layer.lora_B[name]
    rank = right.shape[0]
    if rank == 0 or (tuple(right.shape), tuple(values.shape), tuple(left.shape)) != (
            (rank, layer.in_features), (rank, 1), (layer.out_features, rank)):
        return (f"adapter {name!r}: lora_A {tuple(right.shape)}, lora_E {tuple(values.shape)}, lora_B "
                f"{tuple(left.shape)} are not [r, in], [r, 1], [out, r] with r > 0")
    return _adapter_reason(layer, name, (right, values, left, layer.ranknum[name]), in_call)


def _adalora_reason(layer: nn.Module, in_call: bool = True) -> tuple[Optional[str], Optional[str]]:
    return _reason_for(layer, layer.lora_A, _adalora_check, in_call)


def _call_reason(layer: nn.Module, x: Any, args: tuple, kwargs: dict) -> Optional[str]:
    """Per-call conditions: plain ``layer(x)`` on a tensor PEFT would accept."""
    if args or any(v is not None for v in kwargs.values()):
        return "extra forward arguments (e.g. adapter_names=… for a mixed batch)"
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return "the input is not a floating-point tensor"
    weight = layer.base_layer.weight
    if x.device != weight.device:
        return "the input is on another device than the weights"
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != weight.dtype:
        return f"input dtype {x.dtype} differs from the weight's {weight.dtype} outside autocast"
    return None


def _fused_class_of(layer: nn.Module) -> Optional[type]:
    """The accelerated class for ``layer``'s exact PEFT class (or ``layer``'s own when accelerated)."""
    for fused in _fused_classes().values():
        if type(layer) in (fused, fused._peft_class):
            return fused
    return None


def unsupported_reason(layer: nn.Module) -> Optional[str]:
    """Why ``layer`` (a PEFT tuner layer) does not or would not run on the fused ops now; None if it does."""
    fused = _fused_class_of(layer)
    if fused is None:
        return (f"{type(layer).__module__}.{type(layer).__qualname__} is not PEFT's IA3, LoRA or AdaLoRA "
                "Linear layer")
    return fused._active_adapter(layer)[1]


_WARNED: set[str] = set()


def _note_fallback(layer: nn.Module, reason: str) -> None:
    """Warn once per reason when an accelerated layer computes its adapter with PEFT's code (a merged
    or disabled adapter runs only the base layer, which is what PEFT's code does best: no warning)."""
    if layer.disable_adapters or layer.merged or reason == NO_ACTIVE_ADAPTER or reason in _WARNED \
            or torch.compiler.is_compiling():
        return
    _WARNED.add(reason)
    warnings.warn(
        f"subspace_ops.peft: an accelerated {type(layer).__name__} runs PEFT's own forward ({reason}); "
        "the result is PEFT's, without the fused kernels (warned once per reason)",
        RuntimeWarning,
        stacklevel=2,
    )


# ---------------------------------------------------------------------------------------------
# the accelerated classes
def _peft_classes():
    from peft.tuners.adalora.layer import SVDLinear as AdaLoraLinear
    from peft.tuners.ia3.layer import Linear as IA3Linear
    from peft.tuners.lora.layer import Linear as LoraLinear

    return IA3Linear, LoraLinear, AdaLoraLinear


class _FusedForward:
    """The forward shared by the accelerated classes: check, then the fused op or PEFT's own forward.

    A subclass sets ``_active_adapter`` (layer -> (adapter, None) or (None, reason)) and implements
    ``_fused(x, weight, bias, adapter, backend)`` on tensors already cast to the compute dtype."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        name, reason = type(self)._active_adapter(self)
        reason = reason or _call_reason(self, x, args, kwargs)
        if reason:
            _note_fallback(self, reason)
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        dtype = compute_dtype(x, base.weight)
        bias = None if base.bias is None else base.bias.to(dtype)
        # [out, in]: a Conv1D's weight seen transposed (fan_in_fan_out holds exactly for Conv1D bases here)
        weight = base.weight.t() if self.fan_in_fan_out else base.weight
        return self._fused(x.to(dtype), weight.to(dtype), bias, name, getattr(self, _BACKEND_ATTR, None))


def _dora_norms(layer: nn.Module, adapter: str) -> RowNormKeeper:
    """The kept DoRA row norms of one adapter of an accelerated LoRA layer (see :class:`RowNormKeeper`)."""
    return layer.__dict__.setdefault(_DORA_NORMS_ATTR, {}).setdefault(adapter, RowNormKeeper())


def _forget_dora_norms(layer: nn.Module) -> None:
    layer.__dict__.pop(_DORA_NORMS_ATTR, None)


def _build_classes() -> dict[str, type]:
    IA3Linear, LoraLinear, AdaLoraLinear = _peft_classes()

    class FusedIA3Linear(_FusedForward, IA3Linear):
        """PEFT's (IA)³ Linear computed by ``rescaled_linear`` (see :mod:`subspace_ops.peft`)."""

        _active_adapter = staticmethod(_ia3_reason)

        def _fused(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], name: str, backend: Optional[str]):
            from .ops.rescaled_linear import rescaled_linear

            scale = self.ia3_l[name].reshape(-1).to(x.dtype)
            if self.is_feedforward:  # base(x · l): l scales the input features
                return rescaled_linear(x, weight, None, scale, bias, residual=False, backend=backend)
            # base(x) · l: l scales the output features, bias included
            bias = None if bias is None else bias * scale
            return rescaled_linear(x, weight, scale, None, bias, residual=False, backend=backend)

    class FusedLoraLinear(_FusedForward, LoraLinear):
        """PEFT's LoRA Linear computed by ``lowrank_linear`` (see :mod:`subspace_ops.peft`)."""

        _active_adapter = staticmethod(_lora_reason)

        def _fused(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], name: str, backend: Optional[str]):
            from .ops.lowrank_linear import lowrank_linear

            dropout = self.lora_dropout[name]
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            a, b = self.lora_B[name].weight.to(x.dtype), self.lora_A[name].weight.to(x.dtype)
            scaling = float(self.scaling[name])
            if not self.use_dora.get(name, False):
                lora_bias = self.lora_B[name].bias  # lora_bias=True: s·b_B joins the base bias
                if lora_bias is not None:
                    lora_bias = scaling * lora_bias.to(x.dtype)
                    bias = lora_bias if bias is None else bias + lora_bias
                return lowrank_linear(x, weight, a, None, b, bias, scaling=scaling, dropout_p=p,
                                      training=dropout.training, backend=backend)
            # DoRA: PEFT's result + (c - 1)·x Wᵀ + c·s·x Bᵀ Aᵀ is c ⊙ (x Wᵀ + s·x Bᵀ Aᵀ) + bias, with
            # c = m / ‖W + s·AB‖ per output row, the norm held constant (DoRA §4.3, PEFT) and computed
            # without the [N, K] matrix W + s·AB that PEFT forms (dropout is inactive here: _dora_reason),
            # or kept from the previous call without gradients while W, A, B are unchanged
            magnitude = self.lora_magnitude_vector[name].weight
            row_norm = _dora_norms(self, name).row_norm(
                self.base_layer.weight, self.lora_B[name].weight, self.lora_A[name].weight, scaling,
                torch.promote_types(x.dtype, torch.float32), resolve_backend(backend, x.device),
                recording=records_gradient(x, weight, a, b, magnitude, bias), transposed_weight=self.fan_in_fan_out)
            out = dora_linear(x, weight, a, b, magnitude, bias, scaling, detach_norm=True, backend=backend,
                              row_norm=row_norm)
            # PEFT's DoRA term is (c - 1)·... with c viewed as [1, out]: broadcast against a 1-D input's
            # [out] result it returns [1, out] (plain LoRA keeps [out]); callers may rely on that shape
            return out.unsqueeze(0) if x.dim() == 1 else out

        def unmerge(self, *args: Any, **kwargs: Any) -> None:
            # PEFT's unmerge writes W back through .data, which no version counter sees (while merged, the
            # forward is PEFT's and reads no kept norm)
            _forget_dora_norms(self)
            return super().unmerge(*args, **kwargs)

    class FusedAdaLoraLinear(_FusedForward, AdaLoraLinear):
        """PEFT's AdaLoRA SVDLinear computed by ``lowrank_linear`` (see :mod:`subspace_ops.peft`)."""

        _active_adapter = staticmethod(_adalora_reason)

        def _fused(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], name: str, backend: Optional[str]):
            from .ops.lowrank_linear import lowrank_linear

            dropout = self.lora_dropout[name]
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            # PEFT: dropout(x) @ (Q ⊙ Λ)ᵀ @ Pᵀ · scaling / (ranknum + 1e-5); the factor goes into G = diag(Λ)
            # as a tensor (ranknum is one), so no host sync and Λ's gradient carries it
            factor = self.scaling[name] / (self.ranknum[name] + 1e-5)
            values = (self.lora_E[name].reshape(-1) * factor).to(x.dtype)
            return lowrank_linear(x, weight, self.lora_B[name].to(x.dtype), values, self.lora_A[name].to(x.dtype),
                                  bias, dropout_p=p, training=dropout.training, backend=backend)

    classes = (FusedIA3Linear, FusedLoraLinear, FusedAdaLoraLinear)
    for cls, peft_class, kind in zip(classes, (IA3Linear, LoraLinear, AdaLoraLinear), ("ia3", "lora", "adalora")):
        cls._peft_class, cls._kind = peft_class, kind  # restore() swaps back to _peft_class
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    return {cls.__name__: cls for cls in classes}


_CLASSES: dict[str, type] = {}


def _fused_classes() -> dict[str, type]:
    if not _CLASSES:
        _CLASSES.update(_build_classes())
        globals().update(_CLASSES)
    return _CLASSES


def __getattr__(name: str) -> Any:
    # FusedIA3Linear / FusedLoraLinear / FusedAdaLoraLinear subclass PEFT's classes, so they are built on
    # first use (importing this module does not import peft); pickle finds them here too.
    if name in ("FusedIA3Linear", "FusedLoraLinear", "FusedAdaLoraLinear"):
        check_peft_version()
        return _fused_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# public entry points
@dataclass
class AccelerateReport:
    """What :func:`accelerate` did: accelerated layers (name → "ia3"/"lora"/"dora"/"adalora") and skipped
    ones (name → reason)."""

    backend: str
    accelerated: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"subspace_ops.peft.accelerate: {len(self.accelerated)} layers on the fused ops "
                 f"(backend {self.backend}), {len(self.skipped)} left to PEFT"]
        lines += [f"  fused  {kind:7s} {name}" for name, kind in self.accelerated.items()]
        lines += [f"  PEFT           {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def accelerate(model: nn.Module, *, backend: Optional[str] = None) -> AccelerateReport:
    """Make the PEFT IA3 / LoRA / DoRA / AdaLoRA ``Linear`` layers of ``model`` compute through subspace_ops'
    fused ops.

    In place and undoable (:func:`restore`); parameters and ``state_dict`` keys do not change. Layers
    whose configuration the fused ops cannot express are left as they are and listed in the report's
    ``skipped`` with the reason. Calling it again re-checks every layer (and sets the backend).
    ``backend``: "reference", "cpu", "triton" or None (the best for the weights' device); a requested
    backend that cannot run raises :class:`~subspace_ops.BackendUnavailableError` before anything changes.
    """
    check_peft_version()
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuner_layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if not tuner_layers:
        raise ValueError(f"{type(model).__name__} has no PEFT tuner layers: nothing to accelerate")
    report, plan, devices = AccelerateReport(backend=""), [], set()
    for name, module in tuner_layers:
        fused = _fused_class_of(module)
        if fused is None:
            active, reason = None, unsupported_reason(module)
        else:
            active, reason = fused._active_adapter(module, in_call=False)
        if reason is None:
            kind = "dora" if fused._kind == "lora" and module.use_dora.get(active, False) else fused._kind
            plan.append((name, module, fused, kind))
            devices.add(module.base_layer.weight.device)
        else:
            report.skipped[name] = reason
    # Resolve the backend for every device first: an unavailable backend raises before any change.
    chosen = {resolve_backend(backend, device) for device in devices}
    report.backend = "/".join(sorted(chosen)) if chosen else (backend or "auto")
    for name, module, fused, kind in plan:
        module.__class__ = fused
        setattr(module, _BACKEND_ATTR, backend)
        _forget_dora_norms(module)  # W may have been written (merged, unmerged) while PEFT's class ran it
        report.accelerated[name] = kind
    return report


def restore(model: nn.Module) -> int:
    """Undo :func:`accelerate`: every accelerated layer gets PEFT's class back. Returns how many."""
    if not _CLASSES:
        return 0
    restored = 0
    for module in model.modules():
        if type(module) in _CLASSES.values():
            module.__class__ = type(module)._peft_class
            module.__dict__.pop(_BACKEND_ATTR, None)
            _forget_dora_norms(module)
            restored += 1
    return restored
