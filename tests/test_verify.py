"""``subspace-ops verify``: passes on working kernels, fails (exit 1) on a broken one."""

from __future__ import annotations

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
