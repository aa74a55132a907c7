"""A PeftModel-like entry point for our methods: ``get_peft_model(model, config)``.

Why not PEFT's own registry: PEFT 0.21's ``register_peft_method`` only accepts names already in its
closed ``PeftType`` enum, so a tuner type from outside PEFT cannot be registered without patching
that enum, which breaks with every PEFT release (and PEFT's save/load would then call code paths
that assume its own tuner layers). Instead :class:`SubspacePeftModel` offers the part of the
PeftModel interface user code touches, on top of :mod:`subspace_ops.methods` and
:mod:`subspace_ops.checkpoint`:

- ``forward``/``__call__`` pass everything to the wrapped model (HF kwargs included); unknown
  attributes are looked up on it (``model.config``, ``model.generate``...).
- ``print_trainable_parameters()`` / ``get_nb_trainable_parameters()`` in PEFT's format.
- ``save_pretrained(dir)`` writes only the adapter: ``adapter_model.safetensors`` (with the base
  weights' fingerprint and checksums) and ``adapter_config.json``; adapters other than "default"
  go to ``dir/<name>/``, as PEFT lays them out. ``SubspacePeftModel.from_pretrained(base, dir)``
  adapts ``base`` with the saved config and loads the weights; if anything fails (corrupt file,
  other base weights) the base model's modules and ``requires_grad`` flags are restored.
- ``merge_and_unload()`` merges mergeable methods into the weights and returns the plain model
  (adapted Linear layers become ``nn.Linear``, SSF folds into its norm); non-mergeable methods raise
  before anything changes. ``unload()`` drops the adapters without merging.
- Several adapters: ``add_adapter(name, config)`` requires the same method and config as the first
  adapter (they are states of one structure): the layers are built once and ``set_adapter(name)``
  copies the chosen adapter's tensors into them (the others are kept as detached copies). A new
  adapter starts from the first adapter's initial values. ``delete_adapter``, ``active_adapter``.
- ``disable_adapter()``: a context manager that runs the base model by swapping each adapted module
  for a plain view of its base (sharing the weight tensors) and setting head-mixing α to 0, then
  swapping back. BitFit has no separate base (it trains the model's own biases) and is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator, Union

import torch
from torch import nn

from . import checkpoint, methods
from .adapters import merge_all, replace_module
from .nn import SSF, HeadMix, SequentialAdapter, TimmCoeffAttention
from .nn.base import MergeableLinear

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "SubspacePeftModel", "get_peft_model"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

ConfigLike = Union[methods.MethodConfig, str, tuple]


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
    raise ValueError(f"config must be a subspace_ops.methods config, a method name or (name, fields), "
                     f"got {type(config).__name__}")


def _config_from_dict(data: dict) -> methods.MethodConfig:
    fields = dict(data)
    name = fields.pop("method")
    return methods.get_config(name, **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _linear_view(layer: MergeableLinear) -> nn.Linear:
    """An nn.Linear sharing ``layer``'s frozen weight and bias tensors (no copy)."""
    view = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    view.weight = layer.weight
    view.bias = layer.bias
    return view


def get_peft_model(model: nn.Module, config: ConfigLike, adapter_name: str = "default") -> "SubspacePeftModel":
    """Adapt ``model`` in place with ``config`` and wrap it (see the module docstring)."""
    return SubspacePeftModel(model, config, adapter_name)


class SubspacePeftModel(nn.Module):
    """The PeftModel-like wrapper returned by :func:`get_peft_model`."""

    def __init__(self, model: nn.Module, config: ConfigLike, adapter_name: str = "default") -> None:
        super().__init__()
        config = _as_config(config)
        _, self.report = methods.apply(model, config)
        self.base_model = model
        self.peft_config: dict[str, methods.MethodConfig] = {adapter_name: config}
        self.active_adapter = adapter_name
        self._initial = self._adapter_state(clone=True)
        self._stored: dict[str, dict[str, torch.Tensor]] = {}  # inactive adapters' tensors

    # -- model protocol ---------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- parameters -------------------------------------------------------------------------------
    def _adapter_state(self, clone: bool = False) -> dict[str, torch.Tensor]:
        state = {n: p for n, p in self.base_model.named_parameters() if p.requires_grad}
        return {n: p.detach().clone() for n, p in state.items()} if clone else state

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = list(self.base_model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    # -- several adapters ---------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: ConfigLike) -> None:
        config = _as_config(config)
        first = next(iter(self.peft_config.values()))
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if config.to_dict() != first.to_dict():
            raise ValueError(f"adapter {adapter_name!r} must have the same method and config as the others "
                             f"({first.to_dict()}), got {config.to_dict()}: adapters here are states of one structure")
        self.peft_config[adapter_name] = config
        self._stored[adapter_name] = {n: t.clone() for n, t in self._initial.items()}

    @torch.no_grad()
    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {list(self.peft_config)}")
        if adapter_name == self.active_adapter:
            return
        live = self._adapter_state()
        self._stored[self.active_adapter] = {n: p.detach().clone() for n, p in live.items()}
        for name, value in self._stored.pop(adapter_name).items():
            live[name].copy_(value)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name == self.active_adapter:
            raise ValueError(f"cannot delete the active adapter {adapter_name!r}; set_adapter() another first")
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}")
        del self.peft_config[adapter_name], self._stored[adapter_name]

    # -- running the base model -----------------------------------------------------------------------
    def _base_views(self) -> tuple[list[tuple[str, nn.Module, nn.Module]], list[HeadMix]]:
        """(name, adapted module, base view) for every wrapper, and the head mixes."""
        if self.peft_config[self.active_adapter].name == "bitfit":
            raise ValueError("bitfit trains the model's own biases: there is no separate base model to run")
        swaps, mixes = [], []
        for name, module in self.base_model.named_modules():
            if any(name.startswith(outer + ".") for outer, _, _ in swaps):
                continue  # inside a wrapper already swapped out as a whole
            if isinstance(module, MergeableLinear):
                if module.merged:
                    raise ValueError(f"{name} is merged; unmerge it first")
                swaps.append((name, module, _linear_view(module)))
            elif isinstance(module, SSF):
                swaps.append((name, module, module.inner))
            elif isinstance(module, SequentialAdapter):
                swaps.append((name, module, module.module))
            elif isinstance(module, HeadMix):
                mixes.append(module)
        return swaps, mixes

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        swaps, mixes = self._base_views()
        alphas = [m.alpha.detach().clone() for m in mixes]
        # outermost first, so a view never replaces a module inside one already swapped out
        for name, _, view in swaps:
            if name:
                replace_module(self.base_model, name, view)
        with torch.no_grad():
            for m in mixes:
                m.alpha.zero_()
        try:
            yield
        finally:
            with torch.no_grad():
                for m, alpha in zip(mixes, alphas):
                    m.alpha.copy_(alpha)
            for name, module, _ in reversed(swaps):
                if name:
                    replace_module(self.base_model, name, module)

    # -- merging and unloading ----------------------------------------------------------------------
    def merge_and_unload(self) -> nn.Module:
        config = self.peft_config[self.active_adapter]
        if not methods.METHODS[config.name].mergeable:
            raise ValueError(f"{config.name} is not mergeable (see subspace_ops.methods.METHODS); nothing changed")
        merge_all(self.base_model)
        return self._unwrap_layers(merged=True)

    def unload(self) -> nn.Module:
        """The base model without adapters (nothing merged)."""
        return self._unwrap_layers(merged=False)

    def _unwrap_layers(self, merged: bool) -> nn.Module:
        if any(isinstance(m, TimmCoeffAttention) for m in self.base_model.modules()):
            raise ValueError("unloading Coeff-Tuning from a timm ViT is not supported (the Attention blocks were "
                             "replaced); use disable_adapter() to run without head mixing. Nothing changed.")
        swaps, mixes = self._base_views() if not merged else self._merged_views()
        for name, _, view in reversed(swaps):
            replace_module(self.base_model, name, view)
        if mixes:  # transformers models: drop the head mixes, restore the attention implementation
            from .transformers import detach_head_mix

            detach_head_mix(self.base_model)
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        return self.base_model

    def _merged_views(self) -> tuple[list[tuple[str, nn.Module, nn.Module]], list[HeadMix]]:
        swaps = []
        for name, module in self.base_model.named_modules():
            if isinstance(module, MergeableLinear):
                view = _linear_view(module)  # shares the merged weight tensors
                module._originals = None  # the merge is final: the originals are not kept
                swaps.append((name, module, view))
            elif isinstance(module, SSF):
                module._originals = None
                swaps.append((name, module, module.inner))
        return swaps, []

    # -- saving and loading ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> None:
        active = self.active_adapter
        try:
            for name, config in self.peft_config.items():
                self.set_adapter(name)
                target = os.path.join(os.fspath(save_directory), "" if name == "default" else name)
                os.makedirs(target, exist_ok=True)
                checkpoint.save_adapter(self.base_model, os.path.join(target, ADAPTER_WEIGHTS), method=config.name,
                                        config=config.to_dict())
                with open(os.path.join(target, ADAPTER_CONFIG), "w") as f:
                    json.dump({"subspace_ops_format": 1, **config.to_dict()}, f, indent=2, default=list)
        finally:
            self.set_adapter(active)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: Union[str, os.PathLike],
                        adapter_name: str = "default") -> "SubspacePeftModel":
        directory = os.fspath(model_id)
        config_path = os.path.join(directory, ADAPTER_CONFIG)
        try:
            with open(config_path) as f:
                data = json.load(f)
            data.pop("subspace_ops_format")
            config = _config_from_dict(data)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise checkpoint.AdapterLoadError(config_path, f"unreadable adapter config ({exc})") from exc
        with methods._restore_on_error(model):  # a failed load puts the base model back as it was
            wrapper = cls(model, config, adapter_name)
            checkpoint.load_adapter(model, os.path.join(directory, ADAPTER_WEIGHTS), method=config.name)
        return wrapper
