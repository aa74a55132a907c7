"""Coeff-Tuning's head mixing inside an attention module that calls torch's SDPA.

timm's Swin (window attention: relative-position bias plus the shifted-window mask), BEiT
(relative-position bias), EVA (rotary embeddings), SAM's ViT (decomposed relative position) and
other blocks prepare q, k, v and a mask their own way, then call
``F.scaled_dot_product_attention(q, k, v, attn_mask=...)``. :func:`with_head_mixing` returns a copy of
such a module (the same submodules, parameters and buffers under the same names, plus
``head_mix``) whose forward is the module's own, run with every SDPA call routed to a
:class:`~subspace_ops.nn.HeadMix` (a ``TorchFunctionMode``): ``O_h = Σ_g α'[h, g] softmax(scale·Q_g
K_gᵀ + mask) V_h`` with exactly the q, k, v, mask and scale the module computed, so at α = 0 it
computes what it did. The original module is left as it was (restoring is putting it back).

The copy's class is a subclass of the module's, made on first use and registered in this module
(``HeadMixing__<module>___<class>``) so that pickle finds it. Its forward must call SDPA exactly once
with 4-D [B, H, N, d] inputs; otherwise it raises (a module computing attention another way would
silently ignore α). A module whose forward computes the attention by hand (Swin-V2's cosine
attention) runs the SDPA form of its forward from :mod:`subspace_ops.nn.sdpa_forms` instead.
SDPA's ``dropout_p`` (timm's ``attn_drop`` in training) is passed on to the op, which drops
entries of the mixed maps (see :mod:`subspace_ops.nn.attention`).

:func:`processor_with_head_mixing` does the same for a diffusers attention processor: the copy's
class subclasses the processor's class (and nn.Module, for a plain callable processor) and routes
the SDPA calls of the processor's own ``__call__``. A processor that sums several attentions
(IP-Adapter's text and image-prompt attention) may call SDPA more than once; each call is mixed
by the same α.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .attention import HeadMix, repeat_kv_heads
from .sdpa_forms import SDPA_FORMS

__all__ = ["is_head_mixing", "processor_with_head_mixing", "with_head_mixing"]

_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_PREFIX = "HeadMixing__"


class _RouteSdpa(TorchFunctionMode):
    """Inside it, F.scaled_dot_product_attention(q, k, v, ...) is ``head_mix(q, k, v, ...)``."""

    def __init__(self, head_mix: HeadMix, owner: str) -> None:
        super().__init__()
        self.head_mix = head_mix
        self.owner = owner
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        options = dict(zip(_SDPA_PARAMETERS, args)) | kwargs  # callers pass q, k, v by position or by name
        query, key, value = options["query"], options["key"], options["value"]
        if query.dim() != 4:
            raise ValueError(f"{self.owner} calls SDPA with {query.dim()}-D queries; head mixing needs [B, H, N, d]")
        if options.get("enable_gqa", False):
            key, value = repeat_kv_heads(key, query.shape[1]), repeat_kv_heads(value, query.shape[1])
        self.calls += 1
        out = self.head_mix(query, key, value, attn_mask=options.get("attn_mask"),
                            is_causal=bool(options.get("is_causal", False)), scale=options.get("scale"),
                            dropout_p=float(options.get("dropout_p", 0.0)))
        if query.transpose(1, 2).is_contiguous():
            # SDPA's output follows the queries' [B, N, H, d] memory layout, which callers may rely on
            # (SD3's IP-Adapter processor views out.transpose(1, 2)); the copy is one reshape would make
            out = out.transpose(1, 2).contiguous().transpose(1, 2)
        return out


def _class_name(cls: type) -> str:
    return f"{_PREFIX}{cls.__module__.replace('.', '__')}___{cls.__qualname__}"


def _call_routed(self: Any, call: Any, args: tuple, kwargs: dict) -> Any:
    """``call(*args, **kwargs)`` with its SDPA call (or, where ``self.sums_attentions``, each of its
    SDPA calls) routed to ``self.head_mix``."""
    route = _RouteSdpa(self.head_mix, self._routed_name)
    with route:
        out = call(*args, **kwargs)
    sums = getattr(self, "sums_attentions", False)
    if (route.calls < 1 if sums else route.calls != 1) and not torch.compiler.is_compiling():
        expected = "at least one call" if sums else "exactly one call"
        raise RuntimeError(f"{self._routed_name} called F.scaled_dot_product_attention {route.calls} times; head "
                           f"mixing replaces {expected} ({self._route_hint})")
    return out


def _mixing_class(cls: type) -> type:
    """The subclass of ``cls`` that routes SDPA to ``self.head_mix`` (made once per class): around
    ``forward`` for an nn.Module, around ``__call__`` for a diffusers attention processor (a plain
    callable class, whose subclass is also an nn.Module so that α is a parameter of the model, or an
    nn.Module with its own ``__call__``, as IP-Adapter's)."""
    name = _class_name(cls)
    module = sys.modules[__name__]
    if name in vars(module):
        return vars(module)[name]

    namespace: dict[str, Any] = {"__module__": __name__, "__qualname__": name, "_routed_name": cls.__name__,
                                 "__doc__": f"{cls.__name__} with Coeff-Tuning's head mixing (see {__name__})."}
    if issubclass(cls, nn.Module) and cls.__call__ is nn.Module.__call__:
        sdpa_form = SDPA_FORMS.get((cls.__module__, cls.__qualname__))  # for a forward without an SDPA call

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            own = super(mixing, self).forward if sdpa_form is None else sdpa_form.__get__(self)
            return _call_routed(self, own, args, kwargs)

        bases: tuple[type, ...] = (cls,)
        namespace.update(forward=forward, _holds_backbone=True,  # its own parameters are the model's, not ours
                         _route_hint="set fused_attn if the module has it")
    else:
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return _call_routed(self, cls.__call__.__get__(self), args, kwargs)

        # diffusers passes a processor only the keyword arguments its __call__ names (inspect.signature,
        # which follows __wrapped__): the copy must name the processor's own.
        __call__.__wrapped__ = cls.__call__
        bases = (cls,) if issubclass(cls, nn.Module) else (cls, nn.Module)
        namespace.update(__call__=__call__, extra_repr=lambda self: f"replaced={type(self.replaced).__name__}",
                         _holds_backbone=True, _route_hint="it must run diffusers' native attention backend")
    mixing = type(name, bases, namespace)
    setattr(module, name, mixing)
    return mixing


def __getattr__(name: str) -> type:
    # pickle looks the copies' classes up here; in a new process they are made again from the name
    if name.startswith(_PREFIX) and "___" in name:
        module_part, _, qualname = name[len(_PREFIX):].partition("___")
        import importlib

        owner: Any = importlib.import_module(module_part.replace("__", "."))
        for part in qualname.split("."):
            owner = getattr(owner, part)
        return _mixing_class(owner)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_head_mixing(module: object) -> bool:
    """Whether ``module`` is a copy made by :func:`with_head_mixing` or :func:`processor_with_head_mixing`."""
    return type(module).__module__ == __name__ and type(module).__name__.startswith(_PREFIX)


def _module_copy(module: nn.Module) -> nn.Module:
    """``module`` as an instance of its mixing class: the same submodules and tensors, its own
    containers (so adding ``head_mix`` leaves the original as it was)."""
    mixed = copy.copy(module)
    for key, value in list(vars(mixed).items()):
        if key.startswith("_") and isinstance(value, (dict, set)):
            vars(mixed)[key] = copy.copy(value)
    mixed.__class__ = _mixing_class(type(module))
    return mixed


def with_head_mixing(attention: nn.Module, num_heads: int, *, dropout: float = 0.0,
                     backend: Optional[str] = None) -> nn.Module:
    """A copy of ``attention`` with a zero-init ``head_mix`` (α [num_heads, num_heads]) applied to its
    SDPA call (see the module docstring). ``attention`` itself is not changed."""
    mixed = _module_copy(attention)
    if hasattr(mixed, "fused_attn"):  # timm: the SDPA path (the manual one computes the same at α = 0)
        mixed.fused_attn = True
    weight = next(attention.parameters(), None)
    mixed.head_mix = HeadMix(num_heads, dropout=dropout, backend=backend,
                             device=None if weight is None else weight.device)
    return mixed


def processor_with_head_mixing(processor: object, num_heads: int, *, dropout: float = 0.0,
                               backend: Optional[str] = None, device=None, sums_attentions: bool = False) -> nn.Module:
    """A copy of a diffusers attention processor (SD3's ``JointAttnProcessor2_0``, Flux's
    ``FluxAttnProcessor``, IP-Adapter's ``IPAdapterAttnProcessor2_0``...) with a zero-init ``head_mix``
    applied to its SDPA call; ``replaced`` is ``processor``, which is not changed. ``sums_attentions``:
    the processor adds up several attentions of the same queries (IP-Adapter: the text's and each
    image prompt's), each one an SDPA call that gets the same mixing; otherwise a call other than
    the first one raises. An nn.Module processor (IP-Adapter's, holding its image-prompt key/value
    projections) keeps those modules, shared with the original. Processors that dispatch through
    diffusers' attention backends (Flux) are set to the native one, the backend that calls SDPA: the
    head-mixing op computes the attention whatever backend was chosen."""
    if isinstance(processor, nn.Module):
        mixed = _module_copy(processor)
    else:
        mixing = _mixing_class(type(processor))
        mixed = mixing.__new__(mixing)  # not the processor's __init__: its state is copied below
        nn.Module.__init__(mixed)
        vars(mixed).update(vars(processor))
    if hasattr(mixed, "_attention_backend"):
        mixed._attention_backend = "native"
    vars(mixed)["replaced"] = processor  # not a submodule: its tensors, the copy's too, are saved once
    mixed.sums_attentions = sums_attentions
    mixed.head_mix = HeadMix(num_heads, dropout=dropout, backend=backend, device=device)
    return mixed
