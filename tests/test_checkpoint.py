"""Adapter checkpoints (subspace_ops.checkpoint): round trips, and refusals that leave the model untouched."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from subspace_ops.adapters import apply_rlrr, apply_svd, merge_all, unmerge_all
from subspace_ops.checkpoint import AdapterLoadError, base_fingerprint, fingerprint_mismatches, load_adapter, save_adapter

pytest.importorskip("safetensors")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.integration


def _vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10
    ).eval()


def _roberta(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.RobertaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, num_labels=3,
    )
    return transformers.RobertaForSequenceClassification(config).eval()


ROBERTA_RLRR = dict(targets=("query", "key", "value", "dense"), ssf_targets=("LayerNorm",), trainable=("classifier",))

# name -> (model builder, adapt(model), input builder, output of the model)
CASES = {
    "vit-rlrr": (_vit, apply_rlrr, lambda: torch.randn(2, 3, 32, 32), lambda m, x: m(x)),
    "vit-siva": (_vit, lambda m: apply_svd(m, "siva", perc=0.9), lambda: torch.randn(2, 3, 32, 32), lambda m, x: m(x)),
    "roberta-rlrr": (_roberta, lambda m: apply_rlrr(m, **ROBERTA_RLRR), lambda: torch.randint(0, 50, (2, 7)),
                     lambda m, x: m(x).logits),
    "roberta-svdiff": (_roberta, lambda m: apply_svd(m, "svdiff", targets=("query", "value"), trainable=("classifier",)),
                       lambda: torch.randint(0, 50, (2, 7)), lambda m, x: m(x).logits),
}


def _adapted(case: str, seed: int = 0) -> nn.Module:
    build, adapt, _, _ = CASES[case]
    model = build(seed)
    adapt(model)
    return model


def _train(model: nn.Module, case: str, steps: int = 2) -> None:
    _, _, make_input, run = CASES[case]
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        run(model, make_input()).square().mean().backward()
        opt.step()


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, non-persistent ones included."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _tensors(model).items()}


def _assert_bit_identical(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = _tensors(model)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k].detach(), v), f"{k} changed"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One trained, saved adapter per case: (path, trained model, its output on a fixed input)."""
    out = {}
    for case in CASES:
        torch.manual_seed(1)
        model = _adapted(case)
        _train(model, case)
        x = CASES[case][2]()
        with torch.no_grad():
            y = CASES[case][3](model, x)
        path = tmp_path_factory.mktemp("adapters") / f"{case}.safetensors"
        save_adapter(model, path, method=case.split("-")[1], config={"case": case, "perc": 0.9})
        out[case] = (path, model, x, y)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_gives_identical_outputs(saved, case):
    path, trained, x, y = saved[case]
    fresh = _adapted(case)
    with torch.no_grad():
        assert not torch.equal(CASES[case][3](fresh, x), y)
    meta = load_adapter(fresh, path, method=case.split("-")[1])
    with torch.no_grad():
        assert torch.equal(CASES[case][3](fresh, x), y)
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    declared = set(meta["tensors"]) - trainable  # SVD layers' singular-value fingerprints
    assert trainable <= set(meta["tensors"]) and all(n.endswith(".fingerprint") for n in declared)
    assert meta["config"] == {"case": case, "perc": 0.9} and meta["method"] == case.split("-")[1]
    assert meta["format_version"] == 1 and meta["missing"] == []


def test_file_holds_only_the_adapter(saved):
    from safetensors import safe_open

    path, model, _, _ = saved["vit-siva"]
    with safe_open(str(path), "pt") as f:
        names = set(f.keys())
        header = f.metadata()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # SiVA: s per qkv layer + the head; plus each layer's declared singular-value fingerprint buffer.
    assert names == trainable | {"blocks.0.attn.qkv.fingerprint", "blocks.1.attn.qkv.fingerprint"}
    assert not any(n.endswith(".weight") and n.startswith("blocks") for n in names)
    layers = json.loads(header["layers"])
    assert layers["blocks.0.attn.qkv"]["method"] == "siva" and "ranks" in layers["blocks.0.attn.qkv"]["state"]
    assert header["format"] == "subspace_ops.adapter" and header["subspace_ops_version"]


@pytest.mark.parametrize("method", ["lora", "rlrr"])
def test_adapter_tensors_the_user_froze_are_saved(method, tmp_path):
    """Freezing part of a trained adapter (LoRA's A, RLRR's left scales, as LoRA-FA or a second phase
    does) keeps it adapter state: it is in the file, not in the base fingerprint, and a fresh model
    loads it strictly to the same outputs."""
    from subspace_ops import methods

    def adapted():
        return methods.apply(_vit(), method, backend="reference")[0]

    model = adapted()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    frozen = {n for n, p in model.named_parameters() if n.endswith(("lora_a", "s_l"))}
    assert frozen
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "a.safetensors"
    save_adapter(model, path, method=method)
    assert not frozen & set(base_fingerprint(model))
    fresh = adapted()
    meta = load_adapter(fresh, path, method=method)
    assert frozen <= set(meta["tensors"]) and meta["missing"] == []
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["vit-rlrr", "vit-siva"])
def test_fingerprint_accepts_the_same_weights_in_bf16_and_refuses_others(saved, tmp_path, case):
    path, trained, x, _ = saved[case]
    fresh = _adapted(case).to(torch.bfloat16)
    load_adapter(fresh, path)  # the same base weights, cast to bf16: accepted, adapter cast on copy
    for n, p in trained.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fresh.get_parameter(n), p.detach().to(torch.bfloat16), rtol=0, atol=0)
    # and back: saved from the bf16 model, loaded onto the float32 one (SVD fingerprints in bf16 too)
    save_adapter(fresh, tmp_path / "bf16.safetensors", method=case.split("-")[1])
    load_adapter(_adapted(case), tmp_path / "bf16.safetensors")
    # The rule itself: bf16 of the same weights matches, other weights (any dtype) do not.
    fp32 = base_fingerprint(_adapted(case))
    assert not fingerprint_mismatches(fp32, base_fingerprint(fresh))
    other = base_fingerprint(_adapted(case, seed=5).to(torch.bfloat16))
    assert len(fingerprint_mismatches(fp32, other)) >= 10


def test_module_wrappers_are_unwrapped(saved, tmp_path):
    path, trained, x, y = saved["vit-rlrr"]
    fresh = _adapted("vit-rlrr")
    load_adapter(torch.nn.DataParallel(fresh), path)
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


def _rewrite(path, out, *, tensors=None, metadata=None):
    """Copy an adapter file with edited tensors / metadata (valid checksums unless told otherwise)."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    from subspace_ops.checkpoint import _digest, _header_digest

    data = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    if tensors is not None:
        data = tensors(data)
        meta["tensor_sha256"] = json.dumps({k: _digest(v) for k, v in data.items()})
    if metadata is not None:
        meta = metadata(meta)
    if tensors is not None or metadata is not None:  # a consistent header: these files test the checks after it
        meta["header_sha256"] = _header_digest(meta)
    save_file(data, str(out), metadata=meta)
    return out


def _bad_files(path, tmp_path):
    raw = path.read_bytes()

    def flip(offset):
        data = bytearray(raw)
        data[offset] ^= 0x5A
        return bytes(data)

    def write(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        return p

    def drop_first(tensors):
        return {k: v for i, (k, v) in enumerate(sorted(tensors.items())) if i}

    def grow(tensors):
        name = next(k for k in sorted(tensors) if k.endswith("s_l"))
        return {**tensors, name: torch.cat([tensors[name], tensors[name][:1]])}

    return {
        "truncated": (write("short.safetensors", raw[: len(raw) - 100]), "truncated"),
        "truncated header": (write("shorter.safetensors", raw[:20]), "truncated|not a safetensors"),
        "empty": (write("empty.safetensors", b""), "too short"),
        "not safetensors": (write("model.pt", b"PK\x03\x04 a zip/pickle file, not safetensors" * 10), "not a safetensors"),
        "missing file": (tmp_path / "nope.safetensors", "cannot read"),
        "missing key": (_rewrite(path, tmp_path / "missing.safetensors", tensors=drop_first), "missing from the file"),
        "extra key": (_rewrite(path, tmp_path / "extra.safetensors",
                               tensors=lambda t: {**t, "blocks.9.mlp.fc1.s_l": torch.ones(3)}), "extra keys"),
        "shape mismatch": (_rewrite(path, tmp_path / "shape.safetensors", tensors=grow), "shape"),
        "dtype": (_rewrite(path, tmp_path / "dtype.safetensors",
                           tensors=lambda t: {k: (v.to(torch.int32) if k == "head.bias" else v) for k, v in t.items()}),
                  "cannot be loaded into"),
        "foreign format": (_rewrite(path, tmp_path / "peft.safetensors", metadata=lambda m: {"format": "pt"}),
                           "header format is 'pt'"),
        "future version": (_rewrite(path, tmp_path / "v9.safetensors", metadata=lambda m: {**m, "format_version": "9"}),
                           "format version 9 is not known"),
        "bad config json": (_rewrite(path, tmp_path / "json.safetensors", metadata=lambda m: {**m, "config": "{"}),
                            "not valid JSON"),
    }


def test_bad_files_raise_and_leave_the_model_unchanged(saved, tmp_path):
    path, _, _, _ = saved["vit-rlrr"]
    model = _adapted("vit-rlrr", seed=0)
    before = _snapshot(model)
    for what, (bad, message) in _bad_files(path, tmp_path).items():
        with pytest.raises(AdapterLoadError, match=message) as info:
            load_adapter(model, bad)
        assert str(bad) in str(info.value), what
        assert isinstance(info.value, ValueError)
        _assert_bit_identical(model, before)


def test_any_flipped_byte_is_refused(saved, tmp_path):
    """A byte flipped anywhere (length field, header, data) raises; safetensors alone would load
    flipped data bytes as wrong numbers, the per-tensor and header checksums catch them."""
    path = saved["vit-rlrr"][0]
    raw = path.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    offsets = [0, 3, 7] + list(range(8, header_end, max(1, (header_end - 8) // 40))) + list(
        range(header_end, len(raw), max(1, (len(raw) - header_end) // 20))
    ) + [len(raw) - 1, raw.index(b"subspace_ops.adapter", 8, header_end) + 7]  # and one in the format field
    model = _adapted("vit-rlrr")
    before = _snapshot(model)
    bad = tmp_path / "flipped.safetensors"
    for offset in offsets:
        data = bytearray(raw)
        data[offset] ^= 0x5A
        bad.write_bytes(bytes(data))
        expected = "checksum mismatch" if offset >= header_end else "corrupt|not a safetensors|truncated"
        with pytest.raises(AdapterLoadError, match=expected):
            load_adapter(model, bad)
    _assert_bit_identical(model, before)


def test_wrong_method_wrong_model_and_other_base_weights_are_refused(saved):
    rlrr_path = saved["vit-rlrr"][0]
    siva_path = saved["vit-siva"][0]
    cases = [
        (_adapted("vit-rlrr"), rlrr_path, {"method": "siva"}, "method is 'rlrr', expected 'siva'"),
        (_adapted("vit-rlrr"), siva_path, {}, "extra keys|missing from the file"),  # SiVA file into an RLRR model
        (_adapted("vit-siva"), rlrr_path, {}, "extra keys"),
        (_adapted("vit-rlrr", seed=3), rlrr_path, {}, "differs from the base weights"),
        (_adapted("vit-siva", seed=3), siva_path, {}, "differs from the base weights|shape"),
        (_adapted("roberta-rlrr"), rlrr_path, {}, "extra keys"),
    ]
    for model, path, kwargs, message in cases:
        before = _snapshot(model)
        with pytest.raises(AdapterLoadError, match=message):
            load_adapter(model, path, **kwargs)
        _assert_bit_identical(model, before)


def test_same_shapes_other_method_is_refused(tmp_path):
    """SAM-PARSER and SVDiff have identical tensor names and shapes: the per-layer method tells them apart."""
    model = _roberta()
    apply_svd(model, "sam-parser", targets=("query",), trainable=())
    save_adapter(model, tmp_path / "sp.safetensors", method="sam-parser")
    other = _roberta()
    apply_svd(other, "svdiff", targets=("query",), trainable=())
    before = _snapshot(other)
    with pytest.raises(AdapterLoadError, match="method 'sam-parser' in the file, 'svdiff' here"):
        load_adapter(other, tmp_path / "sp.safetensors")
    _assert_bit_identical(other, before)


@pytest.mark.parametrize("method, saved_with, loaded_with, message", [
    ("lora", {}, {"alpha": 32}, r"scaling 1\.0 in the file, 4\.0 here"),
    ("dora", {"alpha": 16}, {}, r"scaling 2\.0 in the file, 1\.0 here"),
    ("pa", {}, {"activation": "gelu"}, "activation_name 'relu' in the file, 'gelu' here"),
    ("adapter", {}, {"activation": "relu"}, "activation_name 'gelu' in the file, 'relu' here"),
], ids=["lora-alpha", "dora-alpha", "pa-activation", "adapter-activation"])
def test_same_tensors_other_function_is_refused(method, saved_with, loaded_with, message, tmp_path):
    """LoRA's α and an adapter's activation change what the same tensors compute; the file records them."""
    from subspace_ops import methods

    path = tmp_path / f"{method}.safetensors"
    model, _ = methods.apply(_vit(), method, **saved_with)
    save_adapter(model, path, method=method)
    other, _ = methods.apply(_vit(), method, **loaded_with)
    before = _snapshot(other)
    with pytest.raises(AdapterLoadError, match=message):
        load_adapter(other, path)
    _assert_bit_identical(other, before)
    same, _ = methods.apply(_vit(), method, **saved_with)
    load_adapter(same, path)


def test_files_without_function_attributes_still_load(saved, tmp_path):
    """Files written before the layer records held function attributes load as before."""
    def drop_attributes(meta):
        records = json.loads(meta["layers"])
        assert any("attributes" in r for r in records.values())  # RLRR records its splits
        stripped = {n: {k: v for k, v in r.items() if k != "attributes"} for n, r in records.items()}
        return {**meta, "layers": json.dumps(stripped, sort_keys=True)}

    old = _rewrite(saved["vit-rlrr"][0], tmp_path / "old.safetensors", metadata=drop_attributes)
    load_adapter(_adapted("vit-rlrr"), old)


@pytest.mark.parametrize("method", ["ia3", "ssl", "ssb"])
def test_other_fused_qkv_setting_is_named_in_the_error(method, tmp_path):
    """(IA)³/SSL/SSB on timm's fused qkv: 'split' (k and v parts) and 'shared' (whole matrix) give
    the scales other shapes; the refusal says which setting the file was saved with."""
    from subspace_ops import methods

    path = tmp_path / f"{method}.safetensors"
    shared, _ = methods.apply(_vit(), method, fused_qkv="shared")
    save_adapter(shared, path, method=method, config={"fused_qkv": "shared"})
    split, _ = methods.apply(_vit(), method)
    before = _snapshot(split)
    with pytest.raises(AdapterLoadError, match=r"attn\.qkv is a fused qkv: .*config says fused_qkv='shared'"):
        load_adapter(split, path)
    _assert_bit_identical(split, before)
    save_adapter(shared, path, method=method)  # no config (as files from before the split default)
    with pytest.raises(AdapterLoadError, match="config does not say; .* used 'shared'"):
        load_adapter(split, path)
    matching, _ = methods.apply(_vit(), method, fused_qkv="shared")
    load_adapter(matching, path)


def test_a_failing_layer_check_is_rolled_back(saved, monkeypatch):
    """If a layer's own load_adapter_state refuses after others were copied, everything is restored."""
    from subspace_ops.nn import SVDLinear

    path = saved["vit-siva"][0]
    model = _adapted("vit-siva")
    before = _snapshot(model)
    calls = []

    def refuse_second(self, state, **kw):
        calls.append(self)
        if len(calls) == 2:
            raise ValueError("refused by the layer")
        return original(self, state, **kw)

    original = SVDLinear.load_adapter_state
    monkeypatch.setattr(SVDLinear, "load_adapter_state", refuse_second)
    with pytest.raises(AdapterLoadError, match="rolled back: refused by the layer"):
        load_adapter(model, path)
    assert len(calls) == 2
    _assert_bit_identical(model, before)


def test_strict_false_allows_missing_adapter_tensors_only(saved, tmp_path):
    path = saved["vit-rlrr"][0]
    partial = _rewrite(path, tmp_path / "nohead.safetensors",
                       tensors=lambda t: {k: v for k, v in t.items() if not k.startswith("head.")})
    model = _adapted("vit-rlrr")
    head = model.head.weight.detach().clone()
    with pytest.raises(AdapterLoadError, match="missing from the file"):
        load_adapter(model, partial)
    meta = load_adapter(model, partial, strict=False)
    assert meta["missing"] == ["head.bias", "head.weight"] and torch.equal(model.head.weight, head)
    before = _snapshot(other := _adapted("vit-rlrr", seed=4))
    with pytest.raises(AdapterLoadError, match="differs from the base weights"):
        load_adapter(other, partial, strict=False)
    _assert_bit_identical(other, before)


def test_save_refuses_bad_input(tmp_path):
    model = _adapted("vit-rlrr")
    with pytest.raises(ValueError, match="JSON"):
        save_adapter(model, tmp_path / "a.safetensors", method="rlrr", config={"f": object()})
    with pytest.raises(ValueError, match="method"):
        save_adapter(model, tmp_path / "a.safetensors", method="")
    with pytest.raises(ValueError, match="no trainable parameters"):
        save_adapter(nn.Linear(2, 2).requires_grad_(False), tmp_path / "a.safetensors", method="x")
    merge_all(model)
    with pytest.raises(ValueError, match="merged"):
        save_adapter(model, tmp_path / "a.safetensors", method="rlrr")
    unmerge_all(model)
    save_adapter(model, tmp_path / "a.safetensors", method="rlrr", write=False)  # e.g. a rank other than 0
    assert not list(tmp_path.iterdir())
    save_adapter(model, tmp_path / "a.safetensors", method="rlrr")
    merge_all(model)
    before = _snapshot(model)
    with pytest.raises(AdapterLoadError, match="merged"):
        load_adapter(model, tmp_path / "a.safetensors")
    _assert_bit_identical(model, before)
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary files left
