"""DDP and FSDP2 (fully_shard) with 2 CPU ranks (gloo) give the gradients of one process, for every method.

One ``torch.multiprocessing.spawn`` runs every (method, strategy) case; each rank takes half of the
batch, and its trainable gradients (gathered from the shards under FSDP2) are compared with the
single-process gradient of the mean loss over the full batch, computed in the same worker. Add a
method by adding an entry to ``ADAPTERS``.
"""

from __future__ import annotations

import copy
import os
import socket
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from subspace_ops import methods
from subspace_ops.adapters import (
    apply_coeff,
    apply_rlrr,
    apply_svd,
    find_modules,
    make_weights_contiguous,
    replace_module,
)
from subspace_ops.checkpoint import load_adapter, save_adapter
from subspace_ops.nn import ScaledLinear

from conftest import tiny_gpt2

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.integration

WORLD = 2
BATCH = 4  # each rank takes BATCH // WORLD


def _apply_ssb(model: nn.Module) -> None:
    """SSB (D1 W D2) on every Linear of the blocks; the backbone frozen, the head trained."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in find_modules(model, ("qkv", "proj", "fc1", "fc2"), nn.Linear):
        replace_module(model, name, ScaledLinear.ssb(linear))
    model.head.requires_grad_(True)


def _apply_lora(model: nn.Module) -> None:
    """Registry LoRA at r=4; A (zero at init, so B would get no gradient) set to small random values."""
    methods.apply(model, "lora", rank=4)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in methods.low_rank_layers(model):
            layer.lora_a.copy_(0.02 * torch.randn(layer.lora_a.shape, generator=g))


# method name -> adapt(model) in place (freezes the backbone, leaves adapter + head trainable)
ADAPTERS = {
    "rlrr": lambda m: apply_rlrr(m),
    "siva": lambda m: apply_svd(m, "siva", perc=0.9),
    "ssb-all-linears": _apply_ssb,
    "coeff": lambda m: apply_coeff(m, backend="cpu"),
    "lora": _apply_lora,
    # every other method of the registry, with its defaults
    **{name: (lambda m, name=name: methods.apply(m, name)) for name in methods.list_methods()
       if name not in ("rlrr", "siva", "coeff", "lora")},
}
# GPT-2 (transformers Conv1D projections, adapted as transposed views of their weights).
GPT2_ADAPTERS = {
    "gpt2-lora": lambda m: methods.apply(m, "lora", rank=4),
    "gpt2-rlrr": lambda m: methods.apply(m, "rlrr", ssf_targets=("ln_1", "ln_2", "ln_f")),
}
STRATEGIES = ("ddp", "fsdp2")


def _model(method: str, perturb: bool = True) -> nn.Module:
    torch.manual_seed(0)
    if method in GPT2_ADAPTERS:
        model = tiny_gpt2()
        GPT2_ADAPTERS[method](model)
    else:
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10
        )
        ADAPTERS[method](model)
    torch.manual_seed(1)
    with torch.no_grad():  # move the adapters off their (often identity) init
        for p in model.parameters():
            if p.requires_grad and perturb:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if not x.is_floating_point():  # token ids: GPT-2's mean next-token loss (the same count per rank)
        return model(x, labels=x).loss
    return nn.functional.cross_entropy(model(x), y)


def _trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad
            if g is not None and hasattr(g, "full_tensor"):  # FSDP2 shards: gather (a collective)
                g = g.full_tensor()
            grads[name.removeprefix("module.")] = g
    return grads


def _wrap(model: nn.Module, strategy: str) -> nn.Module:
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)  # buffers are constants
    from torch.distributed.fsdp import fully_shard

    make_weights_contiguous(model)  # fully_shard refuses the Conv1D weights' transposed views
    for block in model.blocks if hasattr(model, "blocks") else model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def _compare(grads: dict, expected: dict) -> str:
    """'' when equal within fp32 tolerance, else what differs."""
    if grads.keys() != expected.keys():
        return f"parameter names differ: {sorted(set(grads) ^ set(expected))}"
    problems = []
    for name, g in grads.items():
        if g is None:
            problems.append(f"{name}: no gradient")
            continue
        # fp32 tolerance: the two runs sum the batch in a different order (measured: <= 1e-6 of the
        # tensor's largest entry); entries near zero after cancellation need the scaled absolute term.
        try:
            torch.testing.assert_close(g, expected[name], rtol=1e-5, atol=1e-5 * expected[name].abs().max().item())
        except AssertionError as exc:
            problems.append(f"{name}: {str(exc).splitlines()[1:3]}")
    return "; ".join(problems)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    results = {}
    try:
        torch.manual_seed(123)
        images, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))
        tokens = torch.randint(0, 50, (BATCH, 9))
        mine = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        for method in (*ADAPTERS, *GPT2_ADAPTERS):
            x = tokens if method in GPT2_ADAPTERS else images
            base = _model(method)
            single = copy.deepcopy(base)
            _loss(single, x, y).backward()
            expected = _trainable_grads(single)
            for strategy in STRATEGIES:
                model = _wrap(copy.deepcopy(base), strategy)
                _loss(model, x[mine], y[mine]).backward()
                results[method, strategy] = _compare(_trainable_grads(model), expected)
                if strategy == "fsdp2":  # an adapter checkpoint from sharded parameters (gathers: every rank;
                    # each rank writes its own file here, to check what every rank gathered)
                    save_adapter(model, os.path.join(out_dir, f"{method}-rank{rank}.safetensors"), method=method)
                dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_dir = str(tmp_path_factory.mktemp("ranks"))
    try:
        mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
    except mp.ProcessExitedException as exc:
        # A rank killed by a signal, not one that raised (a failed check or a Python error in a worker
        # is a ProcessRaisedException and fails here): run the two-rank job once more, on a fresh port
        # and directory. Seen once in about ten full-suite runs on the 2-vCPU CI machine (2026-11-30):
        # rank 0 aborted with "terminate called without an active exception" from the C++ runtime,
        # while the same job passed 15 times out of 15 on its own; the second run must pass.
        warnings.warn(f"two-rank job crashed ({exc}); running it once more", RuntimeWarning)
        out_dir = str(tmp_path_factory.mktemp("ranks_retry"))
        mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
    return out_dir, [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("method", sorted(ADAPTERS) + sorted(GPT2_ADAPTERS))
def test_two_ranks_match_one_process(distributed_results, method, strategy):
    for rank, results in enumerate(distributed_results[1]):
        assert (method, strategy) in results, f"rank {rank} did not run {method}/{strategy}"
        assert results[method, strategy] == "", f"rank {rank}, {method}/{strategy}: {results[method, strategy]}"


@pytest.mark.parametrize("method", sorted(ADAPTERS) + sorted(GPT2_ADAPTERS))
def test_adapter_saved_from_fsdp2_shards_loads_into_one_process(distributed_results, method):
    """save_adapter gathers DTensor shards: the file equals the unsharded adapter, on every rank."""
    out_dir = distributed_results[0]
    trained = _model(method)
    for rank in range(WORLD):
        fresh = _model(method, perturb=False)
        load_adapter(fresh, os.path.join(out_dir, f"{method}-rank{rank}.safetensors"), method=method)
        for name, p in trained.named_parameters():
            if p.requires_grad:
                # Not bit-equal for SAM-PARSER: its s starts at σ, and the SVD in the worker processes
                # (another thread count) may differ from this process's in the last bits.
                torch.testing.assert_close(fresh.get_parameter(name), p, rtol=1e-6, atol=1e-6,
                                           msg=lambda m: f"rank {rank}: {name}: {m}")
