"""Empty inputs (no tokens, an empty batch, no queries, no keys) on every backend: outputs of the
right shape, zero gradients of the right shapes, no error. Such calls happen in real pipelines
(an empty micro-batch, a fully pruned sequence, a cross-attention with nothing to attend to); with
no keys every query row is fully masked, whose output is defined as zeros."""

from __future__ import annotations

import pytest
import torch

import subspace_ops

from conftest import LINEAR_CASES, backend_device, linear_case_tensors


def _trained(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.requires_grad_() for t in tensors]


def _assert_zero_grads(tensors, shapes_from) -> None:
    for t, like in zip(tensors, shapes_from):
        assert t.grad is not None and t.grad.shape == like.shape and not t.grad.any()


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=["M=0", "B2-N0", "B0-N3"])
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_ops_with_no_tokens(backend, case, lead):
    device = backend_device(backend)
    x = torch.randn(*lead, 8, device=device, requires_grad=True)
    weight = torch.randn(6, 8, device=device)
    tensors = linear_case_tensors(device)
    trained = _trained(*(tensors[n] for n in ("s_l", "s_r", "d", "a", "g", "b", "bias")))
    y = LINEAR_CASES[case](x, weight, tensors, backend)
    assert y.shape == (*lead, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape
    used = [t for t in trained if t.grad is not None]
    assert used, "no trained tensor got a gradient"
    _assert_zero_grads(used, used)


@pytest.mark.parametrize("sizes", [(0, 5, 5), (1, 0, 0), (1, 3, 0), (1, 0, 3)],
                         ids=["batch0", "no-queries-no-keys", "no-keys", "no-queries"])
def test_head_mixing_attention_with_empty_dimensions(backend, sizes):
    device = backend_device(backend)
    batch, n_q, n_k = sizes
    q = torch.randn(batch, 2, n_q, 4, device=device)
    k, v = torch.randn(batch, 2, n_k, 4, device=device), torch.randn(batch, 2, n_k, 4, device=device)
    mix = torch.eye(2, device=device) + 0.1
    trained = _trained(q, k, v, mix)
    out = subspace_ops.head_mixing_attention(q, k, v, mix, backend=backend)
    assert out.shape == q.shape and not out.any()  # no keys: fully masked rows are zeros
    out.square().sum().backward()
    _assert_zero_grads(trained, trained)
