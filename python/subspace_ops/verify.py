"""``subspace-ops verify``: every op, on this device and every available fused backend, against the
float64 reference — forward and every gradient, a few shapes and dtypes — as a pass/fail table.

Meant to be run by users after installing on their own machine (a new GPU, another torch): it
takes well under a minute on CPU. The tolerance is the test suite's
(:func:`subspace_ops.testing.error_and_bound`): the fused result may be at most twice as far from
the float64 truth as the reference run in the same low precision, plus a small floor per dtype.
The exit status is non-zero when any check fails or errors.
"""

from __future__ import annotations

import dataclasses
import traceback
from typing import Callable, Optional, Sequence

import torch

from .backends import available_backends
from .testing import error_and_bound

__all__ = ["CHECKS", "Check", "Outcome", "format_outcomes", "run_checks"]

Inputs = dict  # name -> tensor (those that require grad get their gradient checked)


@dataclasses.dataclass(frozen=True)
class Check:
    """One op at one configuration: ``make(dtype, device, generator) -> (inputs, kwargs)`` and the op
    as ``run(backend, inputs, kwargs) -> output``."""

    op: str
    config: str
    make: Callable[[torch.dtype, torch.device, torch.Generator], tuple[Inputs, dict]]
    run: Callable[[str, Inputs, dict], torch.Tensor]
    frozen: tuple[str, ...] = ()  # inputs the op requires frozen (no gradient checked)


@dataclasses.dataclass
class Outcome:
    op: str
    config: str
    backend: str
    dtype: str
    passed: bool
    worst: str = ""  # the quantity with the largest error / bound ratio
    max_error: float = 0.0
    bound: float = 0.0
    error: str = ""


def _randn(g: torch.Generator, *size: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*size, generator=g, dtype=torch.float64) * scale


def _rescaled(m: int, k: int, n: int, rank: int, residual: bool = True, path: Optional[str] = None) -> Callable:
    def make(dtype, device, g):
        tensors = dict(x=_randn(g, m, k), weight=_randn(g, n, k, scale=k ** -0.5),
                       s_l=_randn(g, n, rank, scale=0.3).squeeze(1), s_r=_randn(g, k, rank, scale=0.3).squeeze(1),
                       bias=_randn(g, n))
        return tensors, dict(residual=residual, path=path)
    return make


def _run_rescaled(backend, t, kw):
    import subspace_ops

    path = None if backend == "reference" else kw["path"]
    return subspace_ops.rescaled_linear(t["x"], t["weight"], t["s_l"], t["s_r"], t["bias"],
                                        residual=kw["residual"], backend=backend, path=path)


def _svd(m: int, k: int, n: int, rank: int, path: str) -> Callable:
    def make(dtype, device, g):
        u = torch.linalg.qr(_randn(g, n, rank))[0]
        v = torch.linalg.qr(_randn(g, k, rank))[0]
        tensors = dict(x=_randn(g, m, k), weight=_randn(g, n, k, scale=k ** -0.5), u=u, v=v, d=_randn(g, rank),
                       bias=_randn(g, n))
        return tensors, dict(path=path)
    return make


def _run_svd(backend, t, kw):
    import subspace_ops

    path = None if backend == "reference" else kw["path"]
    return subspace_ops.svd_delta_linear(t["x"], t["weight"], t["u"], t["v"], t["d"], t["bias"], backend=backend,
                                         path=path)


def _attention(b: int, h: int, nq: int, nk: int, d: int, causal: bool, padding: bool,
               dropout_p: float = 0.0) -> Callable:
    def make(dtype, device, g):
        tensors = dict(q=_randn(g, b, h, nq, d), k=_randn(g, b, h, nk, d), v=_randn(g, b, h, nk, d),
                       mix=torch.eye(h, dtype=torch.float64) + _randn(g, h, h, scale=0.3))
        mask = None
        if padding:
            mask = torch.rand(b, 1, 1, nk, generator=g) > 0.3
            mask[..., 0] = True
        return tensors, dict(attn_mask=mask, is_causal=causal, dropout_p=dropout_p)
    return make


def _run_attention(backend, t, kw):
    import subspace_ops

    mask = kw["attn_mask"]
    torch.manual_seed(0)  # with dropout, every backend draws the same seed: the reference's mask
    return subspace_ops.head_mixing_attention(t["q"], t["k"], t["v"], t["mix"], is_causal=kw["is_causal"],
                                              attn_mask=None if mask is None else mask.to(t["q"].device),
                                              dropout_p=kw["dropout_p"], backend=backend)


def _lowrank(m: int, k: int, n: int, rank: int, g_kind: str) -> Callable:
    def make(dtype, device, g):
        g_param = {"none": None, "diag": _randn(g, rank), "full": _randn(g, rank, rank)}[g_kind]
        tensors = dict(x=_randn(g, m, k), weight=_randn(g, n, k, scale=k ** -0.5), a=_randn(g, n, rank),
                       b=_randn(g, rank, k), bias=_randn(g, n))
        if g_param is not None:
            tensors["g"] = g_param
        return tensors, dict(scaling=0.5)
    return make


def _run_lowrank(backend, t, kw):
    from .ops.lowrank_linear import lowrank_linear

    return lowrank_linear(t["x"], t["weight"], t["a"], t.get("g"), t["b"], t["bias"], scaling=kw["scaling"],
                          backend=backend)


CHECKS: list[Check] = [
    Check("rescaled_linear", "RLRR modulated M=7 K=33 N=20 r=1", _rescaled(7, 33, 20, 1, True, "modulated"),
          _run_rescaled),
    Check("rescaled_linear", "RLRR stacked M=7 K=33 N=20 r=3", _rescaled(7, 33, 20, 3, True, "stacked"),
          _run_rescaled),
    Check("rescaled_linear", "M=197 K=64 N=48 r=3", _rescaled(197, 64, 48, 3), _run_rescaled),
    Check("rescaled_linear", "SSB separable M=64 K=33 N=20", _rescaled(64, 33, 20, 1, False, "separable"),
          _run_rescaled),
    Check("rescaled_linear", "SSB modulated M=64 K=33 N=20", _rescaled(64, 33, 20, 1, False, "modulated"),
          _run_rescaled),
    Check("svd_delta_linear", "merged M=64 K=33 N=20 k=5", _svd(64, 33, 20, 5, "merged"), _run_svd,
          frozen=("weight", "u", "v")),
    Check("svd_delta_linear", "unmerged M=1 K=40 N=24 k=5", _svd(1, 40, 24, 5, "unmerged"), _run_svd,
          frozen=("weight", "u", "v")),
    Check("head_mixing_attention", "B=2 H=3 N=13 d=16", _attention(2, 3, 13, 13, 16, False, False), _run_attention),
    Check("head_mixing_attention", "causal Nq=19 Nk=7 H=4 d=8", _attention(1, 4, 19, 7, 8, True, False),
          _run_attention),
    Check("head_mixing_attention", "key padding B=2 H=2 N=9 d=8", _attention(2, 2, 9, 9, 8, False, True),
          _run_attention),
    # Long enough for several query blocks and key chunks: the kernels' blocked paths (on the CPU
    # backend, and how its backward shares dK/dV among this machine's threads).
    Check("head_mixing_attention", "causal B=1 H=2 N=1100 d=8", _attention(1, 2, 1100, 1100, 8, True, False),
          _run_attention),
    Check("head_mixing_attention", "key padding B=2 H=2 Nq=600 Nk=1100 d=8",
          _attention(2, 2, 600, 1100, 8, False, True), _run_attention),
    # Dropout on the mixed maps: the kernels' hash mask must be the reference's, bit for bit.
    Check("head_mixing_attention", "dropout 0.25 key padding B=2 H=3 N=13 d=16",
          _attention(2, 3, 13, 13, 16, False, True, 0.25), _run_attention),
    Check("head_mixing_attention", "dropout 0.1 causal B=1 H=4 N=300 d=16",
          _attention(1, 4, 300, 300, 16, True, False, 0.1), _run_attention),
    Check("lowrank_linear", "LoRA M=7 K=33 N=20 r=4", _lowrank(7, 33, 20, 4, "none"), _run_lowrank),
    Check("lowrank_linear", "FLoRA M=197 K=17 N=33 r=4", _lowrank(197, 17, 33, 4, "full"), _run_lowrank),
]


def _forward_and_grads(check: Check, backend: str, dtype: torch.dtype, device: torch.device):
    g = torch.Generator().manual_seed(0)
    tensors, kwargs = check.make(dtype, device, g)
    tensors = {n: t.to(device=device, dtype=dtype).requires_grad_(n not in check.frozen)
               for n, t in tensors.items()}
    out = check.run(backend, tensors, kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    trained = {n: t for n, t in tensors.items() if t.requires_grad}
    grads = torch.autograd.grad(out, list(trained.values()), grad_out.to(device=device, dtype=out.dtype),
                                allow_unused=True)
    return {"out": out, **{f"d{n}": gr for n, gr in zip(trained, grads)}}


# Triton's interpreter computes tl.dot wrongly for 16-bit inputs: fp32 only there.
_INTERPRETER_16_BIT = "Triton's interpreter computes tl.dot wrongly for 16-bit inputs (float32 only there)"


def _dtypes_for(backend: str, device: torch.device, requested: Sequence[torch.dtype]) -> list[torch.dtype]:
    interpreted = backend == "triton" and device.type == "cpu"
    return [d for d in requested if not (interpreted and d in (torch.float16, torch.bfloat16))]


def _device_and_backends(device: Optional[str], backends: Optional[Sequence[str]]) -> tuple[torch.device, list[str]]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, [b for b in (backends or available_backends(device)) if b != "reference"]


def skipped_dtypes(device: Optional[str] = None, backends: Optional[Sequence[str]] = None,
                   dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16)) -> list[str]:
    """The backend/dtype pairs :func:`run_checks` leaves out, each with the reason (printed by the CLI)."""
    device, backends = _device_and_backends(device, backends)
    return [f"{backend} {str(dtype).replace('torch.', '')}: {_INTERPRETER_16_BIT}"
            for backend in backends for dtype in dtypes if dtype not in _dtypes_for(backend, device, dtypes)]


def run_checks(
    device: Optional[str] = None,
    backends: Optional[Sequence[str]] = None,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
    ops: Optional[Sequence[str]] = None,
) -> list[Outcome]:
    """Run :data:`CHECKS` (optionally only ``ops``) on ``device`` for each fused ``backend``."""
    device, backends = _device_and_backends(device, backends)
    outcomes = []
    for check in CHECKS:
        if ops and check.op not in ops:
            continue
        truth = _forward_and_grads(check, "reference", torch.float64, device)
        for backend in backends:
            for dtype in _dtypes_for(backend, device, dtypes):
                outcome = Outcome(check.op, check.config, backend, str(dtype).replace("torch.", ""), passed=True)
                try:
                    low = _forward_and_grads(check, "reference", dtype, device)
                    actual = _forward_and_grads(check, backend, dtype, device)
                    worst_ratio = -1.0
                    for name, t in truth.items():
                        error, bound = error_and_bound(actual[name], t, low[name])
                        ratio = 0.0 if error == 0 else (error / bound if bound else float("inf"))
                        if ratio > worst_ratio:
                            worst_ratio = ratio
                            outcome.worst, outcome.max_error, outcome.bound = name, error, bound
                    outcome.passed = worst_ratio <= 1.0
                except Exception as exc:  # reported, never hidden: a crash is a failure
                    outcome.passed = False
                    outcome.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
                    if not isinstance(exc, (RuntimeError, ValueError, TypeError, AssertionError)):
                        outcome.error += " | " + traceback.format_exc(limit=1).splitlines()[-1][:80]
                outcomes.append(outcome)
    return outcomes


def format_outcomes(outcomes: Sequence[Outcome]) -> str:
    header = ["op", "config", "backend", "dtype", "result", "worst", "max error", "bound"]
    rows = [header]
    for o in outcomes:
        result = "PASS" if o.passed else ("ERROR" if o.error else "FAIL")
        rows.append([o.op, o.config, o.backend, o.dtype, result, o.worst or "-",
                     f"{o.max_error:.2e}" if not o.error else "-", f"{o.bound:.2e}" if not o.error else o.error])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    failed = sum(not o.passed for o in outcomes)
    lines.append(f"{len(outcomes) - failed}/{len(outcomes)} checks passed" + (f", {failed} FAILED" if failed else ""))
    return "\n".join(lines)
