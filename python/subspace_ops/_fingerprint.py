"""Fingerprints of tensors: a few float64 sums over a fixed sample, equal up to rounding to a dtype.

Used by adapter checkpoints (is this the base the adapter was trained on?) and by ``unmerge()`` (are
the merged weights still those ``merge()`` wrote?). The method and its tolerance are described in
:mod:`subspace_ops.checkpoint`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

FINGERPRINT_SAMPLES = 1024
_SIGNED_SUMS = 4


def _sign_weights(n: int) -> Tensor:
    """[_SIGNED_SUMS, n] float64: a row of ones and fixed pseudo-random ±1 rows."""
    i = torch.arange(1, n + 1, dtype=torch.int64)
    rows = [torch.ones(n, dtype=torch.float64)]
    for j in range(1, _SIGNED_SUMS):
        h = (i * (2 * j + 1) * 2654435761 + j * 40503) % (1 << 32)  # Knuth's multiplicative hash
        rows.append(1.0 - 2.0 * ((h >> 31) & 1).to(torch.float64))
    return torch.stack(rows)


def _unit_roundoff(dtype_name: str) -> float:
    dtype = getattr(torch, dtype_name, None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return torch.finfo(dtype).eps / 2
    return 0.0


@torch.no_grad()
def fingerprint(t: Tensor) -> dict:
    """{"shape", "dtype", "abs", "sums"} of a local tensor (JSON-serializable)."""
    flat = t.detach().reshape(-1)
    numel = flat.numel()
    n = min(numel, FINGERPRINT_SAMPLES)
    index = torch.arange(n, dtype=torch.int64, device=flat.device) * numel // max(n, 1)
    sample = flat[index].to(device="cpu", dtype=torch.float64)
    sums = _sign_weights(n) @ sample if n else torch.zeros(_SIGNED_SUMS, dtype=torch.float64)
    return {
        "shape": list(t.shape),
        "dtype": str(t.dtype).removeprefix("torch."),
        "abs": float(sample.abs().sum()),
        "sums": [float(s) for s in sums],
    }


def fingerprint_mismatch(saved: dict, live: dict) -> Optional[str]:
    """None when two fingerprints can be of the same values (up to rounding to the coarser dtype), else
    what differs: the shapes ("shape [..], was [..]") or the values ("checksum difference ...")."""
    if list(saved["shape"]) != list(live["shape"]):
        return f"shape {live['shape']}, was {saved['shape']}"
    u = max(_unit_roundoff(saved["dtype"]), _unit_roundoff(live["dtype"]))
    scale = max(saved["abs"], live["abs"])
    tol = (2.0 * u + 1e-12) * scale
    diffs = [abs(x - y) for x, y in zip(saved["sums"], live["sums"])] + [abs(saved["abs"] - live["abs"])]
    if len(saved["sums"]) != len(live["sums"]) or max(diffs) > tol:
        return f"checksum difference {max(diffs):.3g} > tolerance {tol:.3g} for {saved['dtype']} vs {live['dtype']}"
    return None
