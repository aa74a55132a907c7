"""One benchmark harness for every op: timing, peak memory, tables, JSON/CSV and plots.

A *case* (see :mod:`subspace_ops.bench.cases`) turns a shape into *variants*: our op, the naive
formula the papers use, ``torch.compile`` of it, and the nearest standard layers. Each variant
provides a forward closure and the tensors whose gradients a training step produces; the harness
runs every variant side by side in one process, in two modes:

- ``forward``: the forward pass with the same ``requires_grad`` flags as a training step;
- ``fwd+bwd``: forward, then ``backward`` with one fixed upstream gradient (grads reset to None
  between iterations, so nothing accumulates).

Time: the median of ``repeats`` runs after ``warmup`` runs. On CUDA ``triton.testing.do_bench``
(CUDA events, L2 flushed between runs); on CPU ``time.perf_counter``, variants interleaved round by
round so slow drifts of a shared machine hit every variant alike.

Peak memory: the most memory held at any moment of one iteration beyond what was held before it
(inputs, weights and the upstream gradient excluded; temporaries inside kernels included). CUDA:
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the running sum of the
allocation and free events that ``torch.profiler(profile_memory=True)`` records from the CPU
allocator, which also sees allocations made inside C++ kernels.
"""

from __future__ import annotations

import csv
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

__all__ = ["Variant", "Result", "run_variants", "format_table", "write_json", "write_csv", "plot", "device_name"]

MODES = ("forward", "fwd+bwd")


@dataclass
class Variant:
    """``forward()`` runs one forward pass; ``grads`` are the tensors whose ``.grad`` a step fills;
    ``grad_output`` is the upstream gradient for fwd+bwd. ``skip`` says why it cannot run here."""

    name: str
    forward: Optional[Callable[[], torch.Tensor]] = None
    grads: Sequence[torch.Tensor] = ()
    grad_output: Optional[torch.Tensor] = None
    backend: str = ""
    skip: Optional[str] = None


@dataclass
class Result:
    case: str
    variant: str
    shape: str
    dtype: str
    device: str
    backend: str
    mode: str
    median_ms: Optional[float] = None
    ratio: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    mem_ratio: Optional[float] = None
    baseline: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _step(variant: Variant, mode: str) -> Callable[[], None]:
    if mode == "forward":
        return lambda: variant.forward()

    def forward_backward() -> None:
        variant.forward().backward(variant.grad_output)
        for t in variant.grads:
            t.grad = None

    return forward_backward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_peak_bytes(fn: Callable[[], None]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def _peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    return _cpu_peak_bytes(fn)


def _time_cuda(fn: Callable[[], None], warmup: int, repeats: int) -> float:
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=max(warmup, 1), rep=max(repeats, 1), return_mode="median"))
    except ImportError:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def run_variants(
    case: str,
    shape: str,
    variants: Sequence[Variant],
    *,
    device: torch.device,
    dtype: torch.dtype,
    modes: Sequence[str] = MODES,
    baselines: dict[str, str],
    warmup: int = 3,
    repeats: int = 10,
    measure_memory: bool = True,
) -> list[Result]:
    """Time (and measure memory of) every runnable variant in every mode; ratios to ``baselines[mode]``."""
    results: list[Result] = []
    for mode in modes:
        runnable = [v for v in variants if v.skip is None]
        steps = {v.name: _step(v, mode) for v in runnable}
        times: dict[str, list[float]] = {name: [] for name in steps}
        failures: dict[str, str] = {}
        for name, fn in steps.items():  # warm up (and compile) every variant first
            try:
                for _ in range(max(warmup, 1)):
                    fn()
                _sync(device)
            except Exception as exc:  # a variant that cannot run here is reported, not hidden
                failures[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        live = {n: f for n, f in steps.items() if n not in failures}
        if device.type == "cuda":
            medians = {n: _time_cuda(f, warmup, repeats) for n, f in live.items()}
        else:
            for _ in range(repeats):
                for name, fn in live.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - start) * 1e3)
            medians = {n: statistics.median(t) for n, t in times.items() if t}
        memory = {n: _peak_bytes(f, device) / 2**20 for n, f in live.items()} if measure_memory else {}
        base = baselines.get(mode, "")
        for v in variants:
            note = v.skip or failures.get(v.name, "")
            r = Result(case, v.name, shape, str(dtype).replace("torch.", ""), device_name(device), v.backend, mode,
                       baseline=base, note=note)
            if v.name in medians:
                r.median_ms = medians[v.name]
                r.peak_mem_mb = memory.get(v.name)
                if base in medians:
                    r.ratio = medians[v.name] / medians[base]
                if base in memory and memory[base] > 0 and r.peak_mem_mb is not None:
                    r.mem_ratio = r.peak_mem_mb / memory[base]
            results.append(r)
    return results


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: Sequence[Result]) -> str:
    """An aligned text table, one block per (case, shape, dtype, mode)."""
    header = ["variant", "backend", "median ms", "x baseline", "peak MB", "mem x", "note"]
    lines: list[str] = []
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.case, r.shape, r.dtype, r.mode, r.device), []).append(r)
    for (case, shape, dtype, mode, device), rows in groups.items():
        lines.append(f"\n{case}  shape {shape}  {dtype}  {mode}  on {device}  (baseline: {rows[0].baseline})")
        table = [header] + [
            [r.variant, r.backend, _fmt(r.median_ms, ".3f"), _fmt(r.ratio, ".3f"), _fmt(r.peak_mem_mb, ".1f"),
             _fmt(r.mem_ratio, ".2f"), r.note]
            for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def write_json(results: Sequence[Result], path: str) -> None:
    meta = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": [asdict(r) for r in results]}, f, indent=2)


def write_csv(results: Sequence[Result], path: str) -> None:
    rows = [asdict(r) for r in results]
    for row in rows:
        row.pop("extra", None)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def plot(results: Sequence[Result], path: str) -> None:
    """Grouped bars: time ratio and peak memory per variant, one row of panels per mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"--plot needs matplotlib (pip install matplotlib): {exc}") from exc
    measured = [r for r in results if r.median_ms is not None]
    modes = [m for m in MODES if any(r.mode == m for r in measured)]
    shapes = list(dict.fromkeys(r.shape for r in measured))
    variants = list(dict.fromkeys(r.variant for r in measured))
    fig, axes = plt.subplots(len(modes), 2, figsize=(13, 3.6 * len(modes)), squeeze=False)
    width = 0.8 / max(len(variants), 1)
    for row, mode in enumerate(modes):
        for col, (key, label) in enumerate((("ratio", "time / baseline"), ("peak_mem_mb", "peak memory (MB)"))):
            ax = axes[row][col]
            for i, variant in enumerate(variants):
                values = []
                for shape in shapes:
                    match = [r for r in measured if r.mode == mode and r.shape == shape and r.variant == variant]
                    values.append(getattr(match[0], key) or 0.0 if match else 0.0)
                ax.bar([s + i * width for s in range(len(shapes))], values, width, label=variant)
            ax.set_xticks([s + width * (len(variants) - 1) / 2 for s in range(len(shapes))], shapes, fontsize=8)
            ax.set_title(f"{mode}: {label}", fontsize=10)
            if key == "ratio":
                ax.axhline(1.0, color="black", linewidth=0.8)
    axes[0][0].legend(fontsize=7)
    title = measured[0] if measured else None
    if title is not None:
        fig.suptitle(f"{title.case}, {title.dtype}, {title.device}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
