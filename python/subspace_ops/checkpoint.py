"""Adapter checkpoints: only what was trained, in safetensors, tied to the base weights it was trained on.

    save_adapter(model, "rlrr.safetensors", method="rlrr", config={"lr": 1e-3})
    meta = load_adapter(fresh_model_adapted_the_same_way, "rlrr.safetensors")

**What is saved.** Every parameter with ``requires_grad=True`` under its ``named_parameters()`` name
(the adapter parameters and any other trained parameter, e.g. a task head), every adapter parameter
the user has frozen since (a subspace_ops layer's own parameters, HF PEFT's adapter parameters:
:func:`~subspace_ops.adapters.adapter_parameter_ids`; e.g. LoRA's A frozen for a later phase), plus the tensors a
module declares through an ``adapter_state()`` method that are not parameters (SVDLinear's
singular-value fingerprint) under ``"<module>.<key>"``. DDP / ``torch.compile`` wrappers are
unwrapped, so names are those of the bare model. The file is a plain safetensors file; its header
metadata (strings) holds:

====================== ==============================================================================
``format``             ``"subspace_ops.adapter"``
``format_version``     ``"1"`` (:data:`FORMAT_VERSION`); a reader refuses versions it does not know
``subspace_ops_version``, ``torch_version``   the writer's versions (informational)
``method``             the ``method`` argument of :func:`save_adapter` (e.g. ``"rlrr"``, ``"siva"``)
``config``             JSON of the ``config`` argument (how the model was adapted; not interpreted)
``layers``             JSON: per module with a ``method`` attribute or an ``adapter_state()``, its
                       method, the attributes that change what it computes (the names in its
                       ``function_attributes``: LoRA's scaling α/r, an adapter's activation, a fused
                       layer's splits) and the non-tensor entries of its adapter state (SVD ranks, …)
``base_fingerprint``   JSON: the fingerprint of the frozen parameters (below)
``tensor_sha256``      JSON: per tensor, the SHA-256 of its bytes (safetensors itself has no checksum,
                       so flipped bytes in the data section would otherwise load as wrong numbers)
``header_sha256``      SHA-256 of the other metadata fields (canonical JSON), so a damaged header is
                       refused too, even in a field that still parses
====================== ==============================================================================

**Base-weight fingerprint.** For every frozen parameter (``requires_grad=False``, not an adapter's): its shape, dtype
and, in float64, statistics of a fixed strided sample ``x`` of at most :data:`FINGERPRINT_SAMPLES`
elements (flat indices ``⌊i·numel/n⌋``): ``Σ|x_i|`` and four signed sums ``Σ c_ji x_i`` with
``c_0 = 1`` and ``c_1..3`` fixed pseudo-random signs (a multiplicative hash of i and j). Two
parameters match when the shapes are equal and every sum differs by at most
``2·u·Σ|x_i| (+1e-12·Σ|x_i|)``, where ``u`` is the unit roundoff of the coarser of the two dtypes
(saved vs. live). Rounding the same weights to that dtype moves each element by at most ``u·|x_i|``,
so it moves each sum by at most ``u·Σ|x_i|``: the same weights saved in float32 and loaded into a
bfloat16 copy match. Independent weights differ in each signed sum by about ``√(2n)·σ`` against a
tolerance of about ``2u·n·0.8σ`` (bf16, n=1024: 45σ vs 6σ), in four sums at once, so other weights
are refused. The check is per parameter; its cost is one gather of ≤1024 elements per parameter.
Buffers (e.g. BatchNorm statistics) are not fingerprinted.

**Loading** validates everything before touching the model: the file is readable, is safetensors,
has our header with a known format version, every tensor's checksum, every tensor name exists in the
model (a trainable parameter or a declared adapter tensor) with the same shape and a float dtype the
live tensor can take, per-layer methods, function attributes and adapter states agree (files written
before function attributes were recorded have none, and are checked without them), and the fingerprint matches the
model's frozen parameters. Only then are the tensors copied in place under ``torch.no_grad``
(layers with a ``load_adapter_state`` method get their declared state through it, so their own
checks run too); the touched tensors are snapshotted first and restored if anything fails during the
copy. Every failure raises :class:`AdapterLoadError` (a ValueError) naming the file and the problem,
and leaves the model bit-identical. ``strict=False`` allows the model to have adapter tensors the file
lacks (they keep their values; listed in the result's ``"missing"``) and fingerprints frozen
parameters present on both sides only (at least one must be); it never allows unknown names,
different shapes or different base weights.

Models with merged layers are refused on save and load (merged weights are not the base weights).
Under FSDP2 (``fully_shard``), load before sharding; saving gathers DTensors with ``full_tensor()``,
a collective that every rank must enter: call :func:`save_adapter` on every rank with
``write=(rank == 0)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ._fingerprint import FINGERPRINT_SAMPLES, fingerprint, fingerprint_mismatch
from .adapters import _join_name

__all__ = [
    "AdapterLoadError",
    "FINGERPRINT_SAMPLES",
    "FORMAT",
    "FORMAT_VERSION",
    "base_fingerprint",
    "fingerprint_mismatches",
    "load_adapter",
    "save_adapter",
]

FORMAT = "subspace_ops.adapter"
FORMAT_VERSION = 1
KNOWN_FORMAT_VERSIONS = (1,)
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class AdapterLoadError(ValueError):
    """An adapter file cannot be loaded into this model; the model was left unchanged."""

    def __init__(self, path: Any, problem: str) -> None:
        super().__init__(f"{os.fspath(path)}: {problem}")
        self.path = os.fspath(path)
        self.problem = problem


# ---------------------------------------------------------------------------------------------
# model-side helpers
def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _full(t: Tensor) -> Tensor:
    """A plain local tensor with all values (DTensor shards are gathered: a collective)."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t


def _adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """What a checkpoint holds of ``model``'s parameters: the trainable ones and the adapter parameters,
    frozen or not. Not ``requires_grad`` alone: an adapter tensor frozen by the user (LoRA's A after a
    first phase) is still the adapter, and would otherwise be missing from the file and taken for a
    base weight by the fingerprint."""
    from .adapters import adapter_parameter_ids

    adapter = adapter_parameter_ids(model)
    return {n: p for n, p in model.named_parameters() if p.requires_grad or id(p) in adapter}


def _merged_modules(model: nn.Module) -> list[str]:
    return [name or "<root>" for name, m in model.named_modules() if getattr(m, "merged", False) is True]


def _adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that describe their adaptation: a string ``method`` and own trainable parameters, or an
    ``adapter_state()`` method."""
    layers = {}
    saved = {id(p) for p in _adapter_parameters(model).values()}
    for name, m in model.named_modules():
        has_state = callable(getattr(m, "adapter_state", None))
        owns_trainable = any(id(p) in saved for p in m.parameters(recurse=False))
        if has_state or (owns_trainable and isinstance(getattr(m, "method", None), str)):
            layers[name] = m
    return layers


def _split_state(state: dict) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    other = {k: v for k, v in state.items() if not isinstance(v, Tensor)}
    return tensors, other


def _layer_records(model: nn.Module) -> tuple[dict[str, dict], dict[str, Tensor]]:
    """Per adapter layer: {"method", "attributes" (its function_attributes), "state" (non-tensor
    entries), "tensor_keys"}; and the declared adapter tensors that are not trainable parameters, by
    full name."""
    trainable = set(_adapter_parameters(model))
    records, extra = {}, {}
    for name, m in _adapter_layers(model).items():
        record: dict[str, Any] = {}
        if isinstance(getattr(m, "method", None), str):
            record["method"] = m.method
        attributes = getattr(m, "function_attributes", ())
        if attributes:  # same tensors under another scaling or activation compute another function
            record["attributes"] = _jsonable({a: getattr(m, a) for a in attributes}, f"{name}'s function_attributes")
        if callable(getattr(m, "adapter_state", None)):
            tensors, other = _split_state(m.adapter_state())
            record["state"] = _jsonable(other, f"{name}.adapter_state()")
            record["tensor_keys"] = sorted(tensors)
            for key, t in tensors.items():
                full = _join_name(name, key)
                if full not in trainable:
                    extra[full] = t
        records[name] = record
    return records, extra


def _jsonable(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serializable: {exc}") from None


# ---------------------------------------------------------------------------------------------
# fingerprint
@torch.no_grad()
def base_fingerprint(model: nn.Module) -> dict[str, dict]:
    """The fingerprint of ``model``'s frozen parameters (see the module docstring)."""
    model = _unwrap(model)
    result = {}
    adapter = _adapter_parameters(model)
    for name, p in model.named_parameters():
        if name not in adapter:
            result[name] = fingerprint(_full(p))
    return result


def fingerprint_mismatches(saved: dict, live: dict, *, strict: bool = True) -> list[str]:
    """Problems comparing two fingerprints (empty when they match)."""
    problems = []
    if strict:
        missing = sorted(set(saved) - set(live))
        added = sorted(set(live) - set(saved))
        if missing:
            problems.append(f"frozen parameters in the file's fingerprint but not frozen in the model: {_few(missing)}")
        if added:
            problems.append(f"frozen parameters of the model absent from the file's fingerprint: {_few(added)}")
    common = sorted(set(saved) & set(live))
    if not common:
        problems.append("no frozen parameter in common with the file's fingerprint")
    for name in common:
        a, b = saved[name], live[name]
        if list(a["shape"]) != list(b["shape"]):
            problems.append(f"frozen parameter {name} has shape {b['shape']}, the file's base had {a['shape']}")
        elif problem := fingerprint_mismatch(a, b):
            problems.append(f"frozen parameter {name} differs from the base weights the adapter was trained on "
                            f"({problem})")
    return problems


def _few(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


def _digest(t: Tensor) -> str:
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# save
def save_adapter(
    model: nn.Module, path: "str | os.PathLike", *, method: str, config: Optional[dict] = None, write: bool = True
) -> None:
    """Write the adapter state of ``model`` (trainable parameters + declared adapter tensors) to ``path``.

    ``method`` names the method (stored, checked by ``load_adapter(..., method=...)``); ``config``
    (JSON-serializable) records how the model was adapted. The file is written to a temporary name
    and renamed, so an interrupted save never leaves a partial file at ``path``. ``write=False``
    does everything but writing: under FSDP2 every rank must gather the shards, one writes
    (``write=dist.get_rank() == 0``).
    """
    from safetensors.torch import save

    if not isinstance(method, str) or not method:
        raise ValueError(f"method must be a non-empty string, got {method!r}")
    config = _jsonable({} if config is None else config, "config")
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    model = _unwrap(model)
    merged = _merged_modules(model)
    if merged:
        raise ValueError(f"cannot save an adapter from merged layers ({_few(merged)}): unmerge them first")
    tensors = dict(_adapter_parameters(model))
    if not tensors:
        raise ValueError(f"{type(model).__name__} has no trainable parameters: nothing to save")
    records, extra = _layer_records(model)
    tensors.update(extra)
    tensors = {name: _full(t).to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "subspace_ops_version": _package_version(),
        "torch_version": torch.__version__,
        "method": method,
        "config": json.dumps(config, sort_keys=True),
        "layers": json.dumps(records, sort_keys=True),
        "base_fingerprint": json.dumps(base_fingerprint(model), sort_keys=True),
        "tensor_sha256": json.dumps({name: _digest(t) for name, t in tensors.items()}, sort_keys=True),
    }
    metadata["header_sha256"] = _header_digest(metadata)
    data = save(tensors, metadata=metadata)
    if not write:
        return
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".adapter-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _header_digest(metadata: dict[str, str]) -> str:
    fields = {k: v for k, v in metadata.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()


def _package_version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------------------------
# load
def _read(path: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and header metadata of a safetensors file, with errors that say what is wrong."""
    from safetensors.torch import load

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise AdapterLoadError(path, f"cannot read the file: {exc.strerror or exc}") from None
    if len(data) < 8:
        raise AdapterLoadError(path, f"not a safetensors file: {len(data)} bytes, too short for a header")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise AdapterLoadError(
            path,
            f"not a safetensors file, or truncated: the header length field says {header_len} bytes, the file "
            f"has {len(data) - 8} after it",
        )
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterLoadError(path, f"not a safetensors file or a corrupt header: {exc}") from None
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (KeyError, IndexError, TypeError, ValueError):
        raise AdapterLoadError(path, "corrupt header: a tensor entry without valid data_offsets") from None
    available = len(data) - 8 - header_len
    if ends and max(ends) > available:
        raise AdapterLoadError(path, f"truncated: the tensors need {max(ends)} data bytes, the file has {available}")
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError on any malformed file
        raise AdapterLoadError(path, f"corrupt safetensors data: {exc}") from None
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        raise AdapterLoadError(path, "a safetensors file without metadata: not written by subspace_ops.save_adapter")
    return tensors, metadata


def _parse_metadata(path: str, metadata: dict[str, str]) -> dict[str, Any]:
    # A header carrying our checksum claims to be ours, so a wrong format is a foreign file only when
    # that checksum is absent or intact; otherwise the damaged field may be any, 'format' included
    # (a flipped byte there is corruption, not a foreign file).
    header_intact = metadata.get("header_sha256") == _header_digest(metadata)
    if metadata.get("format") != FORMAT and (header_intact or "header_sha256" not in metadata):
        raise AdapterLoadError(
            path, f"header format is {metadata.get('format')!r}, expected {FORMAT!r}: not written by save_adapter"
        )
    if not header_intact:
        raise AdapterLoadError(path, "corrupt or edited header: its checksum does not match")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise AdapterLoadError(path, f"bad format_version {metadata.get('format_version')!r}") from None
    if version not in KNOWN_FORMAT_VERSIONS:
        raise AdapterLoadError(
            path, f"format version {version} is not known to this subspace_ops (knows {KNOWN_FORMAT_VERSIONS}); "
            "upgrade subspace_ops"
        )
    parsed: dict[str, Any] = {
        "format": FORMAT,
        "format_version": version,
        "subspace_ops_version": metadata.get("subspace_ops_version"),
        "torch_version": metadata.get("torch_version"),
        "method": metadata.get("method"),
    }
    for key, kind in (("config", dict), ("layers", dict), ("base_fingerprint", dict), ("tensor_sha256", dict)):
        try:
            value = json.loads(metadata[key])
        except KeyError:
            raise AdapterLoadError(path, f"header lacks {key!r}") from None
        except ValueError as exc:
            raise AdapterLoadError(path, f"corrupt header: field {key!r} is not valid JSON: {exc}") from None
        if not isinstance(value, kind):
            raise AdapterLoadError(path, f"header field {key!r} must be a JSON object")
        parsed[key] = value
    return parsed


def _castable(src: torch.dtype, dst: torch.dtype) -> bool:
    return src == dst or (src.is_floating_point and dst.is_floating_point)


def _check_against_model(tensors: dict[str, Tensor], meta: dict, model: nn.Module, strict: bool) -> list[str]:
    """Every mismatch between the file and the model, as messages; records the missing names in ``meta``."""
    problems: list[str] = []
    params = dict(model.named_parameters())
    trainable = _adapter_parameters(model)
    records, declared = _layer_records(model)
    live = {**trainable, **declared}

    unknown = sorted(set(tensors) - set(live))
    if unknown:
        frozen = [n for n in unknown if n in params]
        other = [n for n in unknown if n not in params]
        if frozen:
            problems.append(f"tensors that are frozen (not adapter) parameters in the model: {_few(frozen)}")
        if other:
            problems.append(f"tensors with no counterpart in the model (extra keys): {_few(other)}")
    missing = sorted(set(live) - set(tensors))
    if missing and strict:
        problems.append(f"adapter tensors of the model missing from the file: {_few(missing)}")
    meta["missing"] = missing
    reshaped = []
    for name in sorted(set(tensors) & set(live)):
        src, dst = tensors[name], live[name]
        if tuple(src.shape) != tuple(dst.shape):
            problems.append(f"{name}: shape {tuple(src.shape)} in the file, {tuple(dst.shape)} in the model")
            reshaped.append(name)
        elif not _castable(src.dtype, dst.dtype):
            problems.append(f"{name}: dtype {src.dtype} in the file cannot be loaded into {dst.dtype}")
    problems += _fused_qkv_hint(reshaped, records, meta.get("config", {}))

    saved_layers = meta["layers"]
    for name in sorted(set(saved_layers) | set(records)):
        saved, current = saved_layers.get(name), records.get(name)
        if saved is None:
            if strict:
                problems.append(f"layer {name} ({current.get('method', 'adapter')}) is not in the file")
            continue
        if current is None:
            problems.append(f"layer {name} ({saved.get('method', 'adapter')}) of the file is not an adapter layer here")
            continue
        if saved.get("method") != current.get("method"):
            problems.append(f"layer {name}: method {saved.get('method')!r} in the file, {current.get('method')!r} here")
        elif "attributes" in saved and saved["attributes"] != current.get("attributes"):
            here = current.get("attributes", {})
            differ = [f"{a} {v!r} in the file, {here.get(a)!r} here" for a, v in sorted(saved["attributes"].items())
                      if here.get(a) != v]
            problems.append(f"layer {name}: " + ("; ".join(differ) or
                                                 f"attributes {saved['attributes']} in the file, {here} here"))
        elif saved.get("state") != current.get("state") or saved.get("tensor_keys") != current.get("tensor_keys"):
            problems.append(f"layer {name}: adapter state {saved.get('state')} in the file, {current.get('state')} here")

    problems += fingerprint_mismatches(meta["base_fingerprint"], base_fingerprint(model), strict=strict)
    return problems


def _fused_qkv_hint(reshaped: list[str], records: dict[str, dict], config: Any) -> list[str]:
    """The likely cause when the scales of (IA)³/SSL/SSB on a fused qkv do not fit: the file and the
    model were adapted with different ``fused_qkv`` settings (whole matrix vs k and v parts)."""
    from .adapters import FUSED_QKV_NAMES

    for name in reshaped:
        layer = name.rpartition(".")[0]
        method = records.get(layer, {}).get("method")
        if method in ("ia3", "ssl", "ssb") and layer.rpartition(".")[2] in FUSED_QKV_NAMES:
            saved = config.get("fused_qkv") if isinstance(config, dict) else None
            said = (f"its config says fused_qkv={saved!r}" if saved else
                    "its config does not say; files from before 'split' became the default used 'shared'")
            return [f"{layer} is a fused qkv: {method} scales its k and v parts with fused_qkv='split' (the "
                    f"default) and the whole matrix with fused_qkv='shared'; adapt the model with the setting "
                    f"the file was saved with ({said})"]
    return []


def load_adapter(
    model: nn.Module, path: "str | os.PathLike", *, strict: bool = True, method: Optional[str] = None
) -> dict[str, Any]:
    """Load an adapter written by :func:`save_adapter` into ``model`` in place; returns its metadata.

    ``model`` must be adapted the same way as the saved one (same method and layers, same base
    weights up to dtype). ``method``, if given, must equal the file's. Raises :class:`AdapterLoadError`
    and leaves ``model`` bit-identical on any problem (see the module docstring for what is checked
    and what ``strict=False`` relaxes). The result holds the parsed header (``config`` as a dict),
    ``tensors`` (the names loaded) and ``missing`` (model adapter tensors the file lacked).
    """
    path = os.fspath(path)
    tensors, raw = _read(path)
    meta = _parse_metadata(path, raw)
    digests = meta.pop("tensor_sha256")
    if set(digests) != set(tensors):
        raise AdapterLoadError(path, "the checksum list does not name the file's tensors: corrupt or edited header")
    corrupt = sorted(name for name, t in tensors.items() if _digest(t) != digests[name])
    if corrupt:
        raise AdapterLoadError(path, f"corrupt: checksum mismatch in {_few(corrupt)}")
    if method is not None and meta["method"] != method:
        raise AdapterLoadError(path, f"the adapter's method is {meta['method']!r}, expected {method!r}")

    model = _unwrap(model)
    merged = _merged_modules(model)
    if merged:
        raise AdapterLoadError(path, f"the model has merged layers ({_few(merged)}): unmerge them before loading")
    problems = _check_against_model(tensors, meta, model, strict)
    if problems:
        more = f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""
        raise AdapterLoadError(path, "does not fit this model: " + "; ".join(problems[:8]) + more)

    _copy_in(path, model, tensors, meta["layers"])
    meta["tensors"] = sorted(tensors)
    return meta


@torch.no_grad()
def _copy_in(path: str, model: nn.Module, tensors: dict[str, Tensor], saved_layers: dict) -> None:
    """Copy the validated tensors into the model; restore every touched tensor if anything fails."""
    params = dict(model.named_parameters())
    layers = _adapter_layers(model)
    declared = {}  # full name -> (layer name, key) of declared adapter tensors that are not parameters
    for lname, record in saved_layers.items():
        for key in record.get("tensor_keys", []):
            declared[_join_name(lname, key)] = (lname, key)
    # Snapshot everything the copy or a layer's load_adapter_state writes: the loaded parameters and
    # the tensors each layer declares in its adapter state (adapter-sized, never the base weights).
    targets: dict[int, Tensor] = {}
    for name in tensors:
        if name in params:
            targets[id(params[name])] = params[name]
    for lname, record in saved_layers.items():
        for key in record.get("tensor_keys", []):
            t = _get_tensor(layers[lname], key)
            targets[id(t)] = t
    snapshot = [(t, t.detach().clone()) for t in targets.values()]
    try:
        for lname, record in saved_layers.items():
            m = layers[lname]
            if not callable(getattr(m, "load_adapter_state", None)):
                continue
            state = dict(record.get("state", {}))
            state.update({key: tensors[_join_name(lname, key)] for key in record.get("tensor_keys", [])
                          if _join_name(lname, key) in tensors})
            m.load_adapter_state(state)
        for name, t in tensors.items():
            if name in params:
                params[name].copy_(t)
            elif name in declared:
                lname, key = declared[name]
                if not callable(getattr(layers[lname], "load_adapter_state", None)):
                    _get_tensor(layers[lname], key).copy_(t)
    except Exception as exc:
        for live, saved in snapshot:
            live.copy_(saved)
        raise AdapterLoadError(path, f"loading failed and was rolled back: {exc}") from exc


def _get_tensor(module: nn.Module, key: str) -> Tensor:
    t = getattr(module, key, None)
    if not isinstance(t, Tensor):
        raise ValueError(f"{type(module).__name__} declares adapter tensor {key!r} but has no such attribute")
    return t
