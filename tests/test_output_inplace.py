"""An op's output can be changed in place, as nn.Linear's can: timm's BEiT / EVA / Swin-V2 attention
does ``qkv = self.qkv(x); qkv += bias`` once the q/v biases go after the layer. Autograd forbids
that on a view created inside a custom Function (a [M, N] result reshaped to [B, T, N] there was
one), so every op returns its output as a tensor of its own. Checked on every backend and path,
for 2-D and 3-D inputs: the in-place add runs, and gives the gradients of the out-of-place one."""

from __future__ import annotations

import pytest
import torch

import subspace_ops

from conftest import LINEAR_CASES, backend_device, linear_case_tensors

TRAINED = ("s_l", "s_r", "d", "a", "g", "b", "bias")


def _grads(run, inputs, in_place: bool) -> list[torch.Tensor]:
    for t in inputs:
        t.grad = None
    torch.manual_seed(5)  # lowrank_linear's dropout draws the same mask both times
    y = run()
    if in_place:
        y += 1.0
    else:
        y = y + 1.0
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(6), dtype=y.dtype).to(y.device)
    (y * weights).sum().backward()
    return [t.grad.clone() for t in inputs if t.grad is not None]


@pytest.mark.parametrize("lead", [(7,), (2, 7), (3, 30)], ids=["2-D", "3-D", "3-D M=90"])
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_op_output_can_be_changed_in_place(backend, case, lead):
    device = backend_device(backend)
    x = torch.randn(*lead, 8, device=device, requires_grad=True)
    weight = torch.randn(6, 8, device=device)
    tensors = linear_case_tensors(device)
    inputs = [x] + [tensors[n].requires_grad_() for n in TRAINED]
    run = lambda: LINEAR_CASES[case](x, weight, tensors, backend)  # noqa: E731
    expected = _grads(run, inputs, in_place=False)
    for got, want in zip(_grads(run, inputs, in_place=True), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_head_mixing_output_can_be_changed_in_place(backend):
    device = backend_device(backend)
    q, k, v = (torch.randn(2, 3, 9, 8, device=device, requires_grad=True) for _ in range(3))
    mix = (torch.eye(3) + 0.3 * torch.randn(3, 3)).to(device).requires_grad_()
    run = lambda: subspace_ops.head_mixing_attention(q, k, v, mix, backend=backend)  # noqa: E731
    expected = _grads(run, [q, k, v, mix], in_place=False)
    for got, want in zip(_grads(run, [q, k, v, mix], in_place=True), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
