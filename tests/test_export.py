"""Dynamic shapes. torch.export of adapted models: the fused ops appear in the exported graph as
``subspace_ops::`` custom ops, a dynamic batch / sequence dimension is accepted, strict (Dynamo) or
not, from any example size (speed-only path choices do not pin it), the program saves and loads,
and it computes what the eager model computes at other sizes too. Serving an unmerged adapter
matters most for Coeff-Tuning, whose head mixing has no merged form. And torch.compile(dynamic=True,
fullgraph=True) of the same models trains as eager."""

from __future__ import annotations

import io
import os
import shutil

import pytest
import torch
from torch import nn
from torch.export import Dim

from subspace_ops import methods

from conftest import move_off_init, require_backend

pytestmark = pytest.mark.integration
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

# method -> (registry options, the op the exported ViT must call; None: plain torch ops, e.g. the
# separable path of (IA)³/SSB in float32, or SiVA's unmerged formula at these few tokens)
VIT_METHODS = {
    "rlrr": ({}, "rescaled_linear"),
    "coeff": ({}, "head_mixing_attention"),
    "sam-parser": ({"path": "merged"}, "svd_delta_linear"),
    "svdiff": ({}, None),  # SVDLinear's basis path at these sizes: torch ops
    "siva": ({"perc": 0.5}, None),
    "lora": ({}, "lowrank_linear"),
    "dora": ({}, "lowrank_linear"),  # the registry's detach_norm=True: a detach, no grad-mode switch
    "ia3": ({}, None),
    "ssb": ({}, None),
}


def _saved_and_loaded(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return torch.export.load(buffer)


def _fused_ops(program: torch.export.ExportedProgram) -> set[str]:
    targets = (str(node.target) for node in program.graph.nodes)
    return {target.split(".")[1] for target in targets if target.startswith("subspace_ops.")}


def _adapted(model: nn.Module, name: str, **options) -> nn.Module:
    torch.manual_seed(1)
    return move_off_init(methods.apply(model, name, **options)[0]).eval()


@pytest.mark.parametrize("name", list(VIT_METHODS))
def test_timm_vit_exports_with_a_dynamic_batch(name):
    require_backend("cpu")
    options, op = VIT_METHODS[name]
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    model = _adapted(vit, name, **options)
    images = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (images,), dynamic_shapes=({0: Dim("batch", min=1, max=256)},))
    assert _fused_ops(program) == ({op} if op else set())
    loaded = _saved_and_loaded(program)
    # 17 and 680 tokens lie on either side of the SVD and stacked-path thresholds for these layers
    for batch in (2, 1, 40):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            torch.testing.assert_close(loaded.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(VIT_METHODS))
def test_timm_vit_compiles_with_dynamic_shapes(name):
    """Symbolic sizes (and floats such as LoRA's scaling) reach the ops' Python checks and path
    choices and their fake kernels: no graph break, the eager outputs and gradients at every size."""
    require_backend("cpu")
    options = VIT_METHODS[name][0]
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=10)
    model = _adapted(vit, name, **options).train()
    trained = [p for p in model.parameters() if p.requires_grad]
    torch._dynamo.reset()  # each method's ViT recompiles the same code objects: not toward one limit
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend="aot_eager")
    for batch in (2, 40):  # 34 and 680 tokens: either side of the SVD and stacked-path thresholds
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        outputs = []
        for run in (compiled, model):
            torch.manual_seed(0)  # the same dropout draws (Coeff's α, LoRA's input)
            y = run(x)
            outputs.append((y, torch.autograd.grad(y.square().mean(), trained)))
        (y_compiled, g_compiled), (y_eager, g_eager) = outputs
        torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
        for got, expected in zip(g_compiled, g_eager):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["coeff", "lora", "rlrr"])
def test_llama_exports_with_dynamic_batch_and_sequence(name):
    """Causal head mixing through transformers' attention-function registry, and the linear ops."""
    require_backend("cpu")
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, attn_implementation="sdpa", use_cache=False,
    )
    torch.manual_seed(0)
    model = _adapted(transformers.LlamaForCausalLM(config), name, **({"trainable": ()} if name == "rlrr" else {}))
    # 26 tokens: above the cpu backend's stacked-path bound for RLRR (24 tokens on ATen GEMMs, 4 on its own),
    # so that the example takes the fused op on any CPU and the exported program keeps it.
    ids = torch.randint(3, 50, (2, 13), generator=torch.Generator().manual_seed(0))
    dims = {"input_ids": {0: Dim("batch", min=1, max=16), 1: Dim("seq", min=2, max=60)}}
    program = torch.export.export(model, (), {"input_ids": ids}, dynamic_shapes=dims)
    assert {"coeff": "head_mixing_attention", "lora": "lowrank_linear", "rlrr": "rescaled_linear"}[name] in (
        _fused_ops(program))
    loaded = _saved_and_loaded(program)
    for shape in ((2, 11), (3, 29)):
        other = torch.randint(3, 50, shape, generator=torch.Generator().manual_seed(shape[1]))
        with torch.no_grad():
            torch.testing.assert_close(loaded.module()(input_ids=other).logits, model(input_ids=other).logits,
                                       rtol=1e-5, atol=1e-5)


class _TokenBlock(nn.Module):
    """A pre-norm block of named layers every method here targets: a fused ``qkv`` (RLRR: rank 3),
    ``proj``, ``fc1``, ``fc2``; no attention, so that a token count costs nothing to vary."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        x = x + self.proj(q * torch.sigmoid(k) + v)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


# method -> the op its layers call at the large example's 48 tokens (None: plain torch ops). At the
# decode-sized example's 2 tokens none calls one: RLRR takes the stacked path (2 rows ≤ the stacked
# bound even at rank 3), the SVD methods the unmerged formula, (IA)³ the separable path.
TOKEN_METHODS = {"rlrr": "rescaled_linear", "siva": "svd_delta_linear", "sam-parser": "svd_delta_linear",
                 "ia3": None}


def _export_tokens(model: nn.Module, example_tokens: int, strict: bool) -> torch.export.ExportedProgram:
    example = torch.randn(1, example_tokens, 16, generator=torch.Generator().manual_seed(example_tokens))
    dims = ({1: Dim("tokens", min=1, max=256)},)
    return torch.export.export(model, (example,), dynamic_shapes=dims, strict=strict)


def _check_at_token_counts(program: torch.export.ExportedProgram, model: nn.Module, counts: tuple[int, ...]) -> None:
    for tokens in counts:
        x = torch.randn(1, tokens, 16, generator=torch.Generator().manual_seed(100 + tokens))
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5,
                                       msg=lambda m, t=tokens: f"{t} tokens: {m}")


@pytest.mark.parametrize("example_tokens", [2, 48])
@pytest.mark.parametrize("name", list(TOKEN_METHODS))
def test_strict_export_with_a_dynamic_token_count(name, example_tokens):
    """Dynamo (strict=True) traces the ops' speed-only path choices too: they read the example's size
    without a guard (a guard on either side of a bound fails export), and the path the example takes
    (the stacked, unmerged, separable path at 2 tokens, the fused ops at 48) holds at every count."""
    require_backend("cpu")
    model = _adapted(_TokenBlock(), name)
    program = _export_tokens(model, example_tokens, strict=True)
    assert _fused_ops(program) == ({TOKEN_METHODS[name]} - {None} if example_tokens > 2 else set())
    _check_at_token_counts(_saved_and_loaded(program), model, (example_tokens, 1, 7, 197))


def test_non_strict_export_of_rlrr_from_a_decode_sized_example():
    """The stacked path (2 rows here) splits its GEMM output into its c + r blocks of M rows: exact at
    every symbolic M, where ``chunk`` pinned M to the example's value."""
    require_backend("cpu")
    model = _adapted(_TokenBlock(), "rlrr")
    program = _export_tokens(model, 2, strict=False)
    assert _fused_ops(program) == set()  # the stacked path: plain torch ops
    _check_at_token_counts(program, model, (197, 1, 5))


@pytest.mark.slow
def test_aot_inductor_package_of_a_coeff_vit(tmp_path):
    """AOTInductor compiles the exported program to a shared library; our ops stay custom-op calls
    that its runtime hands back to the registered (Python) implementations."""
    require_backend("cpu")
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("AOTInductor needs a C++ compiler")
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=10)
    model = _adapted(vit, "coeff")
    images = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (images,))
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "coeff.pt2"))
    compiled = torch._inductor.aoti_load_package(package)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images), rtol=1e-5, atol=1e-5)
