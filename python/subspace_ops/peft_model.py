"""A PeftModel-like entry point for our methods: ``get_peft_model(model, config)``.

    from subspace_ops import methods
    from subspace_ops.peft_model import SubspacePeftModel, get_peft_model

    model = get_peft_model(model, methods.get_config("flora", rank=8))   # or ("flora", {"rank": 8})
    model.print_trainable_parameters()
    ...train...
    model.save_pretrained("out")                                       # adapter weights + config only
    model = SubspacePeftModel.from_pretrained(base_model, "out", is_trainable=True)
    plain = model.merge_and_unload()                                   # mergeable methods

**Why not PEFT's own registry.** PEFT 0.21's ``register_peft_method`` only accepts names already in its
closed ``PeftType`` enum, so a tuner type from outside PEFT is not a supported extension point. The ways
around it (adding members to the enum at import, monkeypatching ``PEFT_TYPE_TO_*`` maps) break on PEFT
releases, and PEFT's save/load/merge paths then call into its ``BaseTunerLayer`` machinery, which our
layers would have to imitate in full. The trade-offs of the wrapper instead:

- (+) independent of PEFT's internals and version (PEFT need not even be installed), every method of
  :mod:`subspace_ops.methods` works, and the adapter file is our validated checkpoint format
  (:mod:`subspace_ops.checkpoint`: checksums, base-weight fingerprint, atomic failure).
- (-) it is not a ``peft.PeftModel``: ``isinstance`` checks and code that reaches into PEFT internals
  (``model.base_model.model``, ``peft.tuners`` layer types, ``PeftModel.from_pretrained`` on our
  directories, PEFT's hub helpers) do not work; ``model.get_base_model()`` is the adapted model. Training
  loops that only call the methods below work. For PEFT's *own* LoRA / IA3 on our kernels use
  :func:`subspace_ops.peft.accelerate` instead.

**HF Trainer.** Trainer unwraps only a ``peft.PeftModel``; for anything else it reads the model's
``forward`` signature: the instance's for the input columns it keeps (``remove_unused_columns``), the
class's (and class name) for the label names (``find_labels``: no labels, no ``eval_loss``). So the wrapper
is an instance of a subclass made once per wrapped class (``SubspacePeftModel[BertForSequenceClassification]``)
whose ``forward`` shows the wrapped class's signature (it still passes every argument through): Trainer's
defaults then act as on the bare model. Pickle / ``torch.save`` / ``deepcopy`` rebuild that subclass from
the wrapped class. Trainer's checkpoints hold the full ``state_dict`` (what ``resume_from_checkpoint`` and
``load_best_model_at_end`` load back); ``callbacks=[SaveAdapterCallback()]`` also writes
``save_pretrained`` into each ``checkpoint-N`` directory, and ``trainer.model.save_pretrained(dir)`` gives
the adapter-only output (``trainer.save_model()`` writes the full ``state_dict``). Label smoothing on a
causal LM: Trainer shifts the labels only for a model whose ``_get_name()`` is a causal LM's, so the
wrapper's ``_get_name()`` is the wrapped model's (its repr keeps the wrapper's class name).

**The interface** (PEFT's names and semantics unless stated):

- ``forward``/``__call__`` pass every argument to the wrapped model (HF kwargs included); attributes the
  wrapper lacks are looked up on the model (``model.config``, ``model.generate`` ...).
- ``print_trainable_parameters()`` / ``get_nb_trainable_parameters()``: PEFT's output format.
- ``save_pretrained(dir, selected_adapters=None)`` writes only the adapter: ``adapter_model.safetensors``
  (written by :func:`~subspace_ops.checkpoint.save_adapter`: the adapter tensors and the trained task head,
  with the base weights' fingerprint and checksums) and ``adapter_config.json`` (``method`` + every config
  field); adapters other than ``"default"`` go to ``dir/<name>/``, as PEFT lays them out.
- ``SubspacePeftModel.from_pretrained(base, dir, adapter_name="default", is_trainable=False)`` adapts
  ``base`` with the saved config and loads the weights. If anything fails (unreadable or corrupt config or
  weights, other base weights, another method) it raises (:class:`~subspace_ops.checkpoint.AdapterLoadError`
  for the files) and ``base`` is as before: same modules, tensors, ``requires_grad`` flags and attention
  implementation. As in PEFT, ``is_trainable=False`` freezes the adapter and puts the model in eval mode,
  and ``config=`` replaces the saved config (e.g. another ``backend`` for another device).
  ``load_adapter(dir, adapter_name)`` loads a further adapter (same method and config) the same way.
- ``merge_and_unload()`` folds the active adapter into the weights and returns the plain model: adapted
  Linear layers become ``nn.Linear`` again (the original module objects, holding the merged weights;
  a transformers ``Conv1D`` becomes that ``Conv1D`` again, its [in, out] weight merged), SSF
  folds into its norm / patch embedding, the trained head is kept (as PEFT keeps ``modules_to_save``).
  Mergeability is decided per layer, before anything changes: head mixing (``coeff``), the Houlsby
  ``adapter`` and parallel adapters with a nonlinearity (``pa``, ``lora`` with ``mpc="n"``) raise
  :class:`AdapterNotMergeableError` (a ``ValueError`` and a ``NotMergeableError``) and leave the model as
  it was; ``pa`` with ``activation="identity"`` merges. ``safe_merge=True`` checks the merged weights are
  finite (and restores the model otherwise). ``unload()`` removes the adapter layers without merging
  (every method, ``coeff`` on timm, transformers and diffusers included; the trained head and BitFit's biases stay,
  as PEFT keeps ``modules_to_save``). Both restore the parameters' original ``requires_grad`` flags; the
  wrapper is unusable afterwards.

**Several adapters: swapped by state.** ``add_adapter(name, config)`` needs the same method *and* config
as the first adapter (the same layer structure; anything else raises ``ValueError``): the adapter layers
are built once, every adapter is a set of values for their trainable tensors (and the trained head), and
``set_adapter(name)`` copies the chosen adapter's values into the live tensors in place, keeping detached
copies of the others. So parameter objects never change (optimizers and ``torch.compile`` graphs stay
valid), one adapter is active at a time (as PEFT's ``set_adapter``), and memory grows by one adapter-sized
copy per adapter. Create a fresh optimizer when you switch adapters during training (moments are per
tensor, not per adapter). A new adapter starts from the values the first one had when it was created (for
the LoRA family, ΔW = 0). ``active_adapter``, ``active_adapters``, ``delete_adapter(name)`` (not the
active one), ``peft_config`` (name → config).

**disable_adapter(): swapped modules.** Inside ``with model.disable_adapter():`` the model *is* the base
model: every module the method replaced is swapped back for the original module object it wrapped
(captured when the adapter was created; it shares the frozen weight tensors, so nothing is copied), a
transformers model runs its original attention implementation instead of ``"subspace_coeff"`` (a
diffusers model its original attention processors), and
parameters of the base model that the method trains (the task head, BitFit's biases) are swapped for
frozen copies of their base values (as PEFT runs a ``modules_to_save`` module's original). Nothing is
zeroed or modified in place; on exit the adapted modules and parameters are put back. The outputs are
those of the unadapted model, bit for bit (one exception: timm BEiT / EVA / Swin-V2 attention whose ``qkv``
was adapted keeps adding its q/v biases after that layer, ``qkv_bias_separate``, rather than inside
``F.linear``: the same sum, rounded once more). Merged layers are refused (unmerge first); ``set_adapter``,
``save_pretrained`` and friends are refused inside the context.

**MoE expert adapters** (``target_parameters``, :mod:`subspace_ops.nn.experts`) are parametrizations of the
experts module, not replaced modules, and every operation above handles them as PEFT does its own:
inside ``disable_adapter()`` each is switched off (reads return the base tensor itself, so the output is the
base model's bit for bit); ``merge_and_unload()`` merges and removes them, leaving the module's stock class
and an ordinary Parameter (the original object) holding W + ΔW under its stock ``state_dict`` key;
``unload()`` removes them leaving W bit for bit. Their factors are trainable tensors, so saving, loading and
several adapters work unchanged; a failed ``from_pretrained`` removes them again. ``set_adapter`` refuses
merged layers (of any kind): the merged weights would keep the active adapter's ΔW.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import warnings
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from . import checkpoint, methods
from . import diffusers as diffusers_integration
from .adapters import is_conv1d, merge_all, merge_blockers, replace_module, unmerge_all
from .nn import SSF, HeadMix, NotMergeableError
from .nn import experts as experts_nn
from .nn.base import ForwardsAttributes, MergeableLinear

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterNotMergeableError", "SubspacePeftModel", "get_peft_model"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
CONFIG_FORMAT = 1  # the "subspace_ops_format" field of adapter_config.json

ConfigLike = Union[methods.MethodConfig, str, tuple]


class AdapterNotMergeableError(NotMergeableError, ValueError):
    """``merge_and_unload()`` of a method without a weight form; the model was left unchanged."""


# ---------------------------------------------------------------------------------------------
# configs
def _as_config(config: ConfigLike) -> methods.MethodConfig:
    """A registry config from a config object, a method name, or ``(name, {field: value})``."""
    if isinstance(config, tuple):
        if len(config) != 2 or not isinstance(config[1], dict):
            raise ValueError(f"config tuple must be (method name, dict of fields), got {config!r}")
        return methods.get_config(config[0], **config[1])
    if isinstance(config, str):
        return methods.get_config(config)
    if isinstance(config, methods.MethodConfig):
        return config
    hint = ""
    if type(config).__module__.startswith("peft"):
        hint = (" (a PEFT config: use peft.get_peft_model for PEFT's own methods, and "
                "subspace_ops.peft.accelerate(model) to run its LoRA/IA3 layers on our kernels)")
    raise ValueError(f"config must be a subspace_ops.methods config, a method name or (name, fields), "
                     f"got {type(config).__name__}{hint}")


def _config_from_dict(data: dict) -> methods.MethodConfig:
    fields = dict(data)
    name = fields.pop("method")
    return methods.get_config(name, **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _read_config(directory: str) -> methods.MethodConfig:
    path = os.path.join(directory, ADAPTER_CONFIG)
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        version = data.pop("subspace_ops_format")
        if version != CONFIG_FORMAT:
            raise ValueError(f"subspace_ops_format {version!r} is not known (knows {CONFIG_FORMAT})")
        data.pop("base_model_name_or_path", None)
        return _config_from_dict(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise checkpoint.AdapterLoadError(path, f"unreadable adapter config ({type(exc).__name__}: {exc})") from exc


def _check_adapter_name(name: object) -> str:
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\"):
        raise ValueError(f"adapter_name must be a non-empty string usable as a directory name, got {name!r}")
    return name


# ---------------------------------------------------------------------------------------------
# model helpers
def _linear_view(layer: MergeableLinear) -> nn.Linear:
    """An nn.Linear holding ``layer``'s weight and bias Parameters (no copy)."""
    view = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    view.weight = layer.weight
    view.bias = layer.bias
    return view


def _outermost(names: list[str]) -> list[str]:
    kept: list[str] = []
    for name in names:  # named_modules order: a parent comes before its children
        if not any(name.startswith(outer + ".") for outer in kept):
            kept.append(name)
    return kept


def _parameter_owners(model: nn.Module, params: dict[int, Any]) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """Every (module, attribute) that holds one of ``params`` (by id; tied parameters give several)."""
    owners = []
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None and id(p) in params:
                owners.append((module, attr, p))
    return owners


def get_peft_model(model: nn.Module, config: ConfigLike, adapter_name: str = "default") -> "SubspacePeftModel":
    """Adapt ``model`` in place with ``config`` (a :mod:`subspace_ops.methods` config, a method name or
    ``(name, {field: value})``) and wrap it in a :class:`SubspacePeftModel` (see the module docstring)."""
    return SubspacePeftModel(model, config, adapter_name)


def _carry_processor_state(name: str, current: nn.Module, other: nn.Module) -> None:
    """Before a diffusers attention processor that is an nn.Module (IP-Adapter's, the ``processor`` of an
    ``Attention``) is swapped between its head-mixing copy and the original: the state set on the one in
    place (an IP-Adapter scale assigned since) goes with the swap, as
    :func:`subspace_ops.diffusers.set_processors` does for the others. Only processors: a timm block's
    head-mixing copy differs from its original on purpose (``fused_attn``)."""
    if name.rsplit(".", 1)[-1] == "processor" and (diffusers_integration.is_head_mix_processor(current)
                                                    or diffusers_integration.is_head_mix_processor(other)):
        diffusers_integration.carry_processor_state(current, other)


_SIGNATURE_CLASSES: dict[type, type] = {}


def _signature_class(base: type) -> type:
    """The subclass of :class:`SubspacePeftModel` for models of class ``base`` (made once): its ``forward``
    has ``base.forward``'s signature, which is what HF Trainer reads (see the module docstring). Where that
    signature cannot be read, SubspacePeftModel itself (``forward(*args, **kwargs)``)."""
    if base not in _SIGNATURE_CLASSES:
        try:
            signature = inspect.signature(base.forward)  # with ``self``, as for any function read from a class
        except (TypeError, ValueError):
            return SubspacePeftModel

        def forward(self: SubspacePeftModel, *args: Any, **kwargs: Any) -> Any:
            return self.base_model(*args, **kwargs)

        def _get_name(self: SubspacePeftModel) -> str:
            # Trainer's label smoothing shifts the labels only for a model whose _get_name() is a causal
            # LM class's name; nn.Module's own use of it, the repr, keeps this class's name (__repr__).
            return self.base_model._get_name()

        # The name keeps the wrapped class's: Trainer's find_labels also reads it ("QuestionAnswering").
        name = f"SubspacePeftModel[{base.__name__}]"
        forward.__signature__ = signature
        forward.__qualname__ = f"{name}.forward"
        namespace = {"__module__": __name__, "__qualname__": name, "__doc__": SubspacePeftModel.__doc__,
                     "forward": forward, "_get_name": _get_name, "_signature_of": base}
        _SIGNATURE_CLASSES[base] = type(name, (SubspacePeftModel,), namespace)
    return _SIGNATURE_CLASSES[base]


def _new_with_signature_of(base: type) -> SubspacePeftModel:
    """An empty instance of ``_signature_class(base)``, for unpickling (SubspacePeftModel.__reduce_ex__)."""
    return SubspacePeftModel.__new__(_signature_class(base))


class SubspacePeftModel(ForwardsAttributes, nn.Module):
    """The PeftModel-like wrapper returned by :func:`get_peft_model` (see the module docstring)."""

    _wrapped = "base_model"  # attributes the wrapper lacks are the model's (config, generate, ...)
    _signature_of: Optional[type] = None  # on a subclass from _signature_class: the wrapped class

    def __new__(cls, model: Any = None, *args: Any, **kwargs: Any) -> "SubspacePeftModel":
        # model=None: unpickling / copying, which pass the class to make (see __reduce_ex__). A subclass of
        # the user's own keeps its forward; another signature class (type(w).from_pretrained) is replaced.
        made_here = cls is SubspacePeftModel or cls._signature_of is not None
        if made_here and isinstance(model, nn.Module) and not isinstance(model, SubspacePeftModel):
            cls = _signature_class(type(model))
        return super().__new__(cls)

    def __repr__(self) -> str:
        # nn.Module's repr starts with _get_name(), which a signature class gives the wrapped model's name
        return type(self).__name__ + super().__repr__()[len(self._get_name()):]

    def __reduce_ex__(self, protocol: Any) -> Any:
        # A class from _signature_class is made at run time and has no importable name: pickle (torch.save,
        # deepcopy) rebuilds it from the wrapped class instead; the state is nn.Module's as usual.
        reduced = super().__reduce_ex__(protocol)
        if type(self)._signature_of is None:
            return reduced
        return (_new_with_signature_of, (type(self)._signature_of,), *reduced[2:])

    def __init__(self, model: nn.Module, config: ConfigLike, adapter_name: str = "default") -> None:
        super().__init__()
        config = _as_config(config)
        adapter_name = _check_adapter_name(adapter_name)
        if isinstance(model, SubspacePeftModel):
            raise ValueError("model is already a SubspacePeftModel; use add_adapter() for another adapter")
        before = dict(model.named_modules())
        flags = [(p, p.requires_grad) for p in model.parameters()]
        attn_before = methods._attn_implementation(model)
        processors_before = diffusers_integration.processors(model)
        _, self.report = methods.apply(model, config)  # checks everything first; unchanged if it raises
        self.base_model = model
        self.peft_config: dict[str, methods.MethodConfig] = {adapter_name: config}
        self.active_adapter = adapter_name
        # What the model was: the replaced modules (outermost), flags, attention implementation.
        changed = [name for name, m in model.named_modules() if name in before and before[name] is not m]
        self._replaced: list[tuple[str, nn.Module]] = [(name, before[name]) for name in _outermost(changed)]
        self._flags_before = flags
        self._attn_before = attn_before if methods._attn_implementation(model) != attn_before else None
        self._attn_adapted = methods._attn_implementation(model)
        # diffusers attention modules whose processor the method replaced (Coeff-Tuning's): before / after.
        processors_after = diffusers_integration.processors(model)
        self._processors_before = {n: p for n, p in processors_before.items() if processors_after[n] is not p}
        self._processors_adapted = {n: processors_after[n] for n in self._processors_before}
        # Expert parameters adapted by target_parameters: a parametrization of the module that owns them
        # (nn/experts.py), not a replaced module, so the module swaps below never reach them.
        modules_before = {id(m) for m in before.values()}
        self._experts = [(owner, attribute) for owner, _, attribute, layer in experts_nn.adapters(model)
                         if id(layer) not in modules_before]
        # One adapter = the values of the tensors the method made trainable (adapter + head), by name.
        existing = {id(p) for p, _ in flags}
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._adapter_names: tuple[str, ...] = tuple(n for n, _ in trainable)
        # Base parameters the method trains (head, BitFit biases): their base values, for disable_adapter.
        self._base_values: dict[str, torch.Tensor] = {n: p.detach().clone() for n, p in trainable if id(p) in existing}
        self._initial = self._adapter_state(clone=True)
        self._stored: dict[str, dict[str, torch.Tensor]] = {}  # inactive adapters' values
        self._disabled = False
        self._unloaded = False

    # -- model protocol ---------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The wrapped (adapted) model."""
        return self.base_model

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def _check_usable(self, what: str, needs_adapter: bool = True) -> None:
        if self._unloaded:
            raise RuntimeError(f"{what}: the adapters were unloaded (merge_and_unload/unload); this wrapper is spent")
        if self._disabled:
            raise RuntimeError(f"{what} is not allowed inside disable_adapter()")
        if needs_adapter:
            present = dict(self.base_model.named_parameters())
            missing = [n for n in self._adapter_names if n not in present]
            if missing:  # e.g. diffusers' load_ip_adapter after Coeff-Tuning: it sets new attention processors
                raise RuntimeError(
                    f"{what}: the adapter's parameters {missing[:4]}{' …' if len(missing) > 4 else ''} are no longer "
                    "in the model: a module or attention processor was replaced after adapting it (diffusers' "
                    "load_ip_adapter or set_attn_processor drop Coeff-Tuning's processors: load IP-Adapters first)")

    def _expert_layers(self) -> list[tuple[nn.Module, str, experts_nn.LowRankExperts]]:
        """``(owner module, parameter name, layer)`` of the adapter's expert parametrizations."""
        layers = []
        for owner_name, attribute in self._experts:
            owner = self.base_model.get_submodule(owner_name)
            layers.append((owner, attribute, owner.parametrizations[attribute][0]))
        return layers

    def _merged_layers(self) -> list[str]:
        """Names of the layers (of any kind, expert adapters included) whose adapter is merged now."""
        return [n for n, m in self.base_model.named_modules() if getattr(m, "merged", False) is True]

    def _detach_experts(self, keep_merged: bool = False) -> None:
        """Remove the expert parametrizations: each parameter is the plain Parameter it was (same object,
        stock state_dict key), holding W (or, with ``keep_merged``, the merged W + ΔW)."""
        for owner, attribute, _ in self._expert_layers():
            experts_nn.detach(owner, attribute, keep_merged=keep_merged)

    # -- parameters -------------------------------------------------------------------------------
    def _adapter_state(self, clone: bool = False) -> dict[str, torch.Tensor]:
        params = dict(self.base_model.named_parameters())
        return {n: params[n].detach().clone() if clone else params[n] for n in self._adapter_names}

    @contextlib.contextmanager
    def _adapter_flags(self) -> Iterator[None]:
        """``requires_grad`` as right after adapting (adapter + head trainable, the rest frozen): what
        checkpoint.save_adapter / load_adapter take as "the adapter" and "the base"."""
        names = set(self._adapter_names)
        flags = [(n, p, p.requires_grad) for n, p in self.base_model.named_parameters()]
        try:
            for n, p, _ in flags:
                p.requires_grad_(n in names)
            yield
        finally:
            for _, p, flag in flags:
                p.requires_grad_(flag)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters) of the model, as PEFT counts them."""
        params = list(self.base_model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    # -- several adapters ---------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: ConfigLike) -> None:
        """Add an adapter of the same method and config as the existing ones (see the module docstring);
        it starts from the first adapter's initial values and is not activated."""
        self._check_usable("add_adapter")
        adapter_name = _check_adapter_name(adapter_name)
        config = _as_config(config)
        first = next(iter(self.peft_config.values()))
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if config.to_dict() != first.to_dict():
            raise ValueError(
                f"adapter {adapter_name!r} must have the same method and config as the existing adapters "
                f"({first.to_dict()}), got {config.to_dict()}: adapters of a SubspacePeftModel share one layer "
                "structure and are swapped by state; wrap another copy of the model for a different method")
        self.peft_config[adapter_name] = config
        self._stored[adapter_name] = {n: t.clone() for n, t in self._initial.items()}

    @torch.no_grad()
    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter: its values are copied into the adapter tensors."""
        self._check_usable("set_adapter")
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {list(self.peft_config)}")
        if adapter_name == self.active_adapter:
            return
        merged = self._merged_layers()
        if merged:  # the merged weights hold the active adapter's ΔW, which new factor values would not change
            raise ValueError(f"set_adapter: layers {merged[:4]} are merged; unmerge them first "
                             "(subspace_ops.adapters.unmerge_all)")
        live = self._adapter_state()
        incoming = self._stored[adapter_name]
        self._stored[self.active_adapter] = {n: p.detach().clone() for n, p in live.items()}
        for name, value in incoming.items():
            live[name].copy_(value)
        del self._stored[adapter_name]
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_usable("delete_adapter", needs_adapter=False)
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {list(self.peft_config)}")
        if adapter_name == self.active_adapter:
            raise ValueError(f"cannot delete the active adapter {adapter_name!r}; set_adapter() another one first")
        del self.peft_config[adapter_name], self._stored[adapter_name]

    # -- running the base model -----------------------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model inside the ``with`` block (swapped modules; see the module docstring)."""
        if self._unloaded:
            raise RuntimeError("disable_adapter: the adapters were unloaded; this wrapper is spent")
        if self._disabled:  # nested: already the base model
            yield
            return
        merged = self._merged_layers()
        if merged:
            raise ValueError(f"disable_adapter: layers {merged[:4]} are merged; unmerge them first "
                             "(subspace_ops.adapters.unmerge_all)")
        model = self.base_model
        swapped_modules: list[tuple[str, nn.Module]] = []
        swapped_params: list[tuple[nn.Module, str, nn.Parameter]] = []
        disabled_experts: list[experts_nn.LowRankExperts] = []
        try:
            for _, _, layer in self._expert_layers():  # reads of the expert parameter return W itself
                layer.disabled = True
                disabled_experts.append(layer)
            for name, original in self._replaced:
                adapted = model.get_submodule(name)
                original.train(adapted.training)
                _carry_processor_state(name, adapted, original)
                replace_module(model, name, original)
                swapped_modules.append((name, adapted))
            if self._attn_before is not None:
                model.set_attn_implementation(self._attn_before)
            diffusers_integration.set_processors(model, self._processors_before)
            live = {id(p): self._base_values[n] for n, p in model.named_parameters() if n in self._base_values}
            for module, attr, p in _parameter_owners(model, live):
                base = live[id(p)].to(device=p.device, dtype=p.dtype)
                module._parameters[attr] = nn.Parameter(base, requires_grad=False)
                swapped_params.append((module, attr, p))
            self._disabled = True
            yield
        finally:
            self._disabled = False
            for layer in disabled_experts:
                layer.disabled = False
            for module, attr, p in reversed(swapped_params):
                module._parameters[attr] = p
            if self._attn_before is not None:
                model.set_attn_implementation(self._attn_adapted)
            diffusers_integration.set_processors(model, self._processors_adapted)
            for name, adapted in reversed(swapped_modules):
                _carry_processor_state(name, model.get_submodule(name), adapted)
                replace_module(model, name, adapted)

    # -- merging and unloading ----------------------------------------------------------------------
    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[Sequence[str]] = None) -> nn.Module:
        """Fold the active adapter into the weights and return the plain model (see the module docstring).
        ``progressbar`` is accepted for PEFT compatibility and ignored; ``adapter_names`` may only name the
        active adapter (adapters here are states of one structure, so they cannot be summed)."""
        self._check_usable("merge_and_unload")
        if adapter_names is not None and list(adapter_names) != [self.active_adapter]:
            raise ValueError(f"adapter_names: only the active adapter ({self.active_adapter!r}) can be merged; "
                             "set_adapter() the one to merge first")
        model = self.base_model
        blockers = merge_blockers(model)
        if blockers:
            method = self.peft_config[self.active_adapter].name
            reasons = "; ".join(dict.fromkeys(blockers.values()))
            raise AdapterNotMergeableError(
                f"{method} is not mergeable ({len(blockers)} layer(s), e.g. {next(iter(blockers))}: {reasons}); "
                "nothing changed. Use unload() to drop the adapters, or keep the wrapper for inference")
        merge_all(model)
        if safe_merge:
            bad = [n for n, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
            if bad:
                unmerge_all(model)
                raise ValueError(f"safe_merge: non-finite values in {bad[:4]} after merging; nothing changed")
        self._detach_experts(keep_merged=True)  # the expert parameters become plain, holding W + ΔW
        replaced = dict(self._replaced)
        biased = []
        for name, m in reversed(list(model.named_modules())):  # deepest first
            if isinstance(m, MergeableLinear):
                original = replaced.get(name)
                if isinstance(original, nn.Linear) and original.weight is m.weight:
                    if original.bias is not m.bias:  # merging created a bias (e.g. RLRR's shift)
                        original.bias = m.bias
                        biased.append(name)
                    plain: nn.Module = original
                elif original is not None and is_conv1d(original):  # GPT-2's layer: weight stored [in, out]
                    original.weight.data = m.weight.data.t().contiguous()
                    if m.bias is not None:
                        original.bias.data = m.bias.data
                    plain = original
                else:
                    plain = _linear_view(m)
                plain.train(m.training)
                replace_module(model, name, plain)
            elif isinstance(m, SSF):  # merged into its inner module's weights
                replace_module(model, name, m.inner)
        if biased:
            warnings.warn(
                f"merge_and_unload: merging gave {len(biased)} bias-free linear layer(s) a bias (e.g. "
                f"{biased[-1]}: RLRR's shift has no other place in a merged weight). The model computes what the "
                "adapted one did, but its architecture may declare no bias there (a transformers config's "
                "attention_bias / mlp_bias, or none at all), so save_pretrained + from_pretrained would drop "
                "them. Save the merged state_dict yourself, or save the adapter (save_pretrained before merging)",
                stacklevel=2)
        return self._finish_unload()

    def unload(self) -> nn.Module:
        """The base model without the adapter layers, nothing merged (trained head / BitFit biases kept)."""
        self._check_usable("unload", needs_adapter=False)
        model = self.base_model
        unmerge_all(model)  # the original modules share the weight Parameters
        self._detach_experts()
        for name, original in self._replaced:
            adapted = model.get_submodule(name)
            original.train(adapted.training)
            _carry_processor_state(name, adapted, original)
            replace_module(model, name, original)
        diffusers_integration.set_processors(model, self._processors_before)
        if any(isinstance(m, HeadMix) for m in model.modules()) or self._attn_before is not None:
            from .transformers import detach_head_mix

            detach_head_mix(model)
        return self._finish_unload()

    def _finish_unload(self) -> nn.Module:
        for p, flag in self._flags_before:
            p.requires_grad_(flag)
        self._unloaded = True
        self._stored.clear()
        return self.base_model

    # -- saving and loading ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory: Union[str, os.PathLike],
                        selected_adapters: Optional[Sequence[str]] = None) -> None:
        """Write each adapter (default: all) to ``save_directory`` ("default") or ``save_directory/<name>``:
        ``adapter_model.safetensors`` + ``adapter_config.json``."""
        self._check_usable("save_pretrained")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"selected_adapters: unknown adapters {unknown}; adapters: {list(self.peft_config)}")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {os.fspath(save_directory)!r} is a file, not a directory")
        base_name = getattr(getattr(self.base_model, "config", None), "name_or_path", None)
        active = self.active_adapter
        try:
            for name in names:
                config = self.peft_config[name]
                self.set_adapter(name)
                target = os.path.join(os.fspath(save_directory), "" if name == "default" else name)
                os.makedirs(target, exist_ok=True)
                with self._adapter_flags():
                    checkpoint.save_adapter(self.base_model, os.path.join(target, ADAPTER_WEIGHTS),
                                            method=config.name, config=config.to_dict())
                record = {"subspace_ops_format": CONFIG_FORMAT, **config.to_dict()}
                if base_name:
                    record["base_model_name_or_path"] = base_name
                with open(os.path.join(target, ADAPTER_CONFIG), "w") as f:
                    json.dump(record, f, indent=2, default=list)
        finally:
            self.set_adapter(active)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: Union[str, os.PathLike], adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[ConfigLike] = None) -> "SubspacePeftModel":
        """Adapt ``model`` with the config saved in the directory ``model_id`` and load the adapter weights.

        On any failure ``model`` is left as it was and the error is raised (AdapterLoadError for the files).
        ``is_trainable=False`` (PEFT's default) freezes the adapter and calls ``eval()``. ``config``, as in
        PEFT, replaces the saved config, e.g. to pick another kernel backend on another device:
        ``config=dataclasses.replace(saved_config, backend=None)``; the weights must still fit it."""
        directory = os.fspath(model_id)
        config = _read_config(directory) if config is None else _as_config(config)
        with methods._restore_on_error(model):  # also takes out the expert adapters (parametrizations)
            wrapper = cls(model, config, adapter_name)
            checkpoint.load_adapter(model, os.path.join(directory, ADAPTER_WEIGHTS), method=config.name)
        if not is_trainable:
            for p in model.parameters():
                p.requires_grad_(False)
            wrapper.eval()
        return wrapper

    def load_adapter(self, model_id: Union[str, os.PathLike], adapter_name: str,
                     is_trainable: bool = False) -> dict:
        """Load a saved adapter (same method and config) as ``adapter_name``; the active adapter stays active.
        On failure nothing changes. Returns the checkpoint metadata. ``is_trainable=False`` calls ``eval()``
        as PEFT does (the adapter tensors are shared, so their ``requires_grad`` is left alone)."""
        self._check_usable("load_adapter")
        directory = os.fspath(model_id)
        config = _read_config(directory)
        self.add_adapter(adapter_name, config)
        active = self.active_adapter
        try:
            self.set_adapter(adapter_name)
            with self._adapter_flags():
                meta = checkpoint.load_adapter(self.base_model, os.path.join(directory, ADAPTER_WEIGHTS),
                                               method=config.name)
            self.set_adapter(active)
        except BaseException:
            self.set_adapter(active)
            self.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            self.eval()
        return meta


# ---------------------------------------------------------------------------------------------
# HF Trainer
def _save_adapter_callback_class() -> type:
    """Made on first use, so that importing this module does not import transformers."""
    from accelerate.utils import extract_model_from_parallel
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class SaveAdapterCallback(TrainerCallback):
        """``Trainer(..., callbacks=[SaveAdapterCallback()])``: after Trainer writes a checkpoint, writes the
        wrapper's ``save_pretrained`` files into it too (``adapter_model.safetensors``, ``adapter_config.json``),
        so every ``checkpoint-N`` loads with ``SubspacePeftModel.from_pretrained``. Trainer's own files stay
        (its ``resume_from_checkpoint`` / ``load_best_model_at_end`` read the full ``model.safetensors``)."""

        def on_save(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None,
                    **kwargs: Any) -> None:
            if not args.should_save:  # only the process that wrote the checkpoint
                return
            wrapper = extract_model_from_parallel(model, keep_torch_compile=False) if model is not None else None
            if not isinstance(wrapper, SubspacePeftModel):
                raise TypeError(f"SaveAdapterCallback: the Trainer's model must be a SubspacePeftModel "
                                f"(get_peft_model), got {type(wrapper).__name__}")
            directory = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if not os.path.isdir(directory):  # e.g. a hyperparameter-search trial's run directory
                raise RuntimeError(f"SaveAdapterCallback: Trainer's checkpoint directory {directory!r} does not "
                                   "exist; call model.save_pretrained(dir) yourself for this run")
            wrapper.save_pretrained(directory)

    SaveAdapterCallback.__module__ = __name__
    SaveAdapterCallback.__qualname__ = "SaveAdapterCallback"
    return SaveAdapterCallback


_LAZY: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    # SaveAdapterCallback subclasses transformers' TrainerCallback: built on first use (pickle finds it here too)
    if name == "SaveAdapterCallback":
        if name not in _LAZY:
            _LAZY[name] = _save_adapter_callback_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
