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


def _with_cpu_extension(monkeypatch, **overrides):
    """Serve the cpu backend's kernels from the extension with some functions replaced; returns the real one."""
    from subspace_ops.backends import cpu_extension

    ext = cpu_extension()

    class Patched:
        def __getattr__(self, name):
            return overrides[name] if name in overrides else getattr(ext, name)

    monkeypatch.setattr("subspace_ops.ops._dispatch.cpu_extension", lambda: Patched())
    return ext


def test_verify_reports_a_wrong_kernel(monkeypatch, capsys):
    # both forward entry points off by a little (the registered op's and the eager C++ autograd node)
    ext = _with_cpu_extension(
        monkeypatch,
        rescaled_linear_forward=lambda *args: ext.rescaled_linear_forward(*args) * (1 + 1e-3),
        rescaled_linear_autograd=lambda *args: ext.rescaled_linear_autograd(*args) * (1 + 1e-3),
    )
    assert cli.main(["verify", "--backend", "cpu", "--dtype", "float32", "--op", "rescaled_linear"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "rescaled_linear" in out


def test_verify_checks_gradients_with_a_random_upstream_gradient(monkeypatch, capsys):
    """A backward that pairs the upstream gradient's rows with the wrong tokens: the forward is right,
    and a gradient of ones (the same in every row) would not show it."""
    ext = _with_cpu_extension(
        monkeypatch, lowrank_linear_backward=lambda grad_y, *rest: ext.lowrank_linear_backward(grad_y.flip(0), *rest))
    assert cli.main(["verify", "--backend", "cpu", "--dtype", "float32", "--op", "lowrank_linear"]) == 1
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("lowrank_linear")]
    assert rows and all("FAIL" in row for row in rows)
    assert all(row[row.index("FAIL") + 1] != "out" for row in rows)  # the worst error is a gradient's


def test_verify_reports_a_crashing_kernel(monkeypatch, capsys):
    def crash(*args):
        raise RuntimeError("kernel exploded")

    _with_cpu_extension(monkeypatch, lowrank_linear_forward=crash)
    assert cli.main(["verify", "--backend", "cpu", "--dtype", "float32", "--op", "lowrank_linear"]) == 1
    out = capsys.readouterr().out
    assert "ERROR" in out and "kernel exploded" in out and "PASS" not in out


def test_verify_default_dtypes_and_float64_truth(monkeypatch):
    """By default each fused backend is checked in float32 and bfloat16 (float32 only for Triton's
    CPU interpreter), every time against the op's float64 reference."""
    calls = []
    original = verify._forward_and_grads

    def recording(check, backend, dtype, device):
        calls.append((check.config, backend, dtype))
        return original(check, backend, dtype, device)

    monkeypatch.setattr(verify, "_forward_and_grads", recording)
    outcomes = verify.run_checks(device="cpu", backends=["cpu"], ops=["lowrank_linear"])
    assert all(o.passed for o in outcomes)
    configs = [c.config for c in verify.CHECKS if c.op == "lowrank_linear"]
    assert sorted((o.config, o.dtype) for o in outcomes) == sorted(
        (c, d) for c in configs for d in ("bfloat16", "float32"))
    for config in configs:
        assert (config, "reference", torch.float64) in calls
        assert {(b, d) for c, b, d in calls if c == config} == {
            ("reference", torch.float64), ("reference", torch.float32), ("reference", torch.bfloat16),
            ("cpu", torch.float32), ("cpu", torch.bfloat16)}
    cpu = torch.device("cpu")
    assert verify._dtypes_for("triton", cpu, (torch.float32, torch.bfloat16)) == [torch.float32]
    assert verify._dtypes_for("triton", torch.device("cuda"), (torch.float32, torch.bfloat16)) == [
        torch.float32, torch.bfloat16]


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


@pytest.mark.parametrize("device, message", [("tpu", "--device must be cpu or cuda"),
                                             ("cuda", "torch sees no CUDA device")])
def test_verify_names_a_device_it_cannot_use(device, message, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("checks the error when CUDA is missing")
    assert cli.main(["verify", "--device", device, "--op", "lowrank_linear"]) == 2
    assert message in capsys.readouterr().err


def test_verify_says_which_dtypes_it_skips(capsys):
    """Triton's interpreter runs float32 only: a bfloat16 request is reported as skipped, with the reason,
    not dropped silently (and the exit status says nothing ran)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("checks the CPU interpreter")
    assert cli.main(["verify", "--device", "cpu", "--backend", "triton", "--dtype", "bfloat16",
                     "--op", "lowrank_linear"]) == 1
    err = capsys.readouterr().err
    assert "skipped triton bfloat16: Triton's interpreter" in err and "every requested backend and dtype" in err


@pytest.mark.parametrize("env, argv, message", [
    ({}, ["--backend", "triton"], "argument --backend: backend 'triton' is unavailable for cpu tensors: "),
    ({}, ["--backend", "cpu", "--backend", "triton"],
     "argument --backend: backend 'triton' is unavailable for cpu tensors: "),
    ({"SUBSPACE_OPS_BACKEND": "bogus"}, [],
     "environment variable SUBSPACE_OPS_BACKEND='bogus' is not a backend: expected one of reference, cpu, triton"),
    ({"SUBSPACE_OPS_BACKEND": "triton"}, [],
     "environment variable SUBSPACE_OPS_BACKEND=triton: backend 'triton' is unavailable for cpu tensors: "),
])
def test_verify_refuses_a_backend_that_cannot_run_up_front(env, argv, message, monkeypatch, capsys):
    """As `bench`: a backend that cannot run on the device (triton on CPU tensors without
    TRITON_INTERPRET=1) or an unknown SUBSPACE_OPS_BACKEND is a usage error (exit 2) named before any
    check runs, not a table of ERROR rows."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("SUBSPACE_OPS_BACKEND", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["verify", "--device", "cpu", "--dtype", "float32", "--op", "lowrank_linear", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("subspace-ops verify: ") and message in captured.err, captured.err
    assert captured.out == "" and "Traceback" not in captured.err
