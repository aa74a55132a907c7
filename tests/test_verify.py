"""``subspace-ops verify``: passes on working kernels, fails (exit 1) on a broken one."""

from __future__ import annotations

import pytest
import torch

from subspace_ops import cli, verify


def test_verify_passes_on_the_cpu_backend(capsys):
    assert cli.main(["verify", "--backend", "cpu", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "checks passed" in out
    assert {line.split()[0] for line in out.splitlines()[1:-1]} == {c.op for c in verify.CHECKS}


def test_verify_reports_a_wrong_kernel(monkeypatch, capsys):
    from subspace_ops.backends import cpu_extension

    ext = cpu_extension()

    class Broken:  # the extension with forwards that are off by a little (eager: the C++ autograd node)
        def __getattr__(self, name):
            return getattr(ext, name)

        @staticmethod
        def rescaled_linear_forward(*args):
            return ext.rescaled_linear_forward(*args) * (1 + 1e-3)

        @staticmethod
        def rescaled_linear_autograd(*args):
            return ext.rescaled_linear_autograd(*args) * (1 + 1e-3)

    monkeypatch.setattr("subspace_ops.ops._dispatch.cpu_extension", lambda: Broken())
    assert cli.main(["verify", "--backend", "cpu", "--dtype", "float32", "--op", "rescaled_linear"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "rescaled_linear" in out


def test_verify_rejects_unknown_op(capsys):
    assert cli.main(["verify", "--op", "nope"]) == 2
    assert "unknown --op" in capsys.readouterr().err


def test_error_and_bound_counts_missing_gradients_as_failures():
    from subspace_ops.testing import error_and_bound

    assert error_and_bound(None, torch.ones(2))[0] == float("inf")
    assert error_and_bound(torch.tensor([float("nan")]), torch.ones(1))[0] == float("inf")
    assert error_and_bound(None, None) == (0.0, 0.0)


def test_tolerance_rule_numbers():
    """The rule: error ≤ 2 × (the reference's own error in that dtype) + ABS_FLOOR[dtype] × max(1, max |truth|),
    pinned from both sides in bf16 (so that loosening the factor or the floor fails here)."""
    from subspace_ops.testing import ABS_FLOOR, check_close, error_and_bound

    truth = torch.linspace(-1, 1, 9, dtype=torch.float64)  # exact in bf16
    reference_bf16 = truth.clone()
    reference_bf16[3] += 0.1  # the reference formula's own error in bf16
    bound = 2 * 0.1 + ABS_FLOOR[torch.bfloat16]
    for share, ok in ((0.8, True), (1.25, False)):
        actual = truth.to(torch.bfloat16)
        actual[5] += share * bound
        measured, allowed = error_and_bound(actual, truth, reference_bf16)
        assert allowed == pytest.approx(bound) and (measured <= allowed) == ok, (share, measured, allowed)
    assert ABS_FLOOR[torch.float32] == 2e-5 and ABS_FLOOR[torch.bfloat16] == 1.6e-2
    with pytest.raises(AssertionError, match="exceeds the bound"):
        check_close("y", truth.to(torch.float32) + 1e-4, truth)
