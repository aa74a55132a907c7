"""One benchmark harness for every op: timing, peak memory, tables, JSON/CSV and plots.

The harness knows nothing about any op. A :class:`Case` (see :mod:`subspace_ops.bench.cases`)
names its :class:`Variant` s -- for an op: our kernel, the naive formula of the papers,
``torch.compile`` of that formula and the nearest standard layers -- and each variant's ``setup``
turns ``(shape, dtype, device)`` into a :class:`Workload`: a zero-argument forward closure over
tensors it created (same seed, so every variant sees the same values), the tensors whose ``.grad``
a training step fills, and one fixed upstream gradient. :func:`iteration` turns a workload into the
zero-argument closure that runs one iteration of a mode; :func:`run_case` runs every variant of a
case side by side, in one process, for each mode.

Modes
-----
``forward``
    The forward pass only, with the ``requires_grad`` flags of a training step (so autograd
    records the graph and the forward saves what backward will need). This is the fair
    forward-time comparison for fine-tuning: a kernel cannot win by skipping the work or the
    saved tensors that training requires. Its peak memory is the activation memory a training
    step holds after the forward.
``fwd+bwd``
    ``forward().backward(grad_output)`` with the workload's fixed, pre-made upstream gradient, then
    every tracked tensor's ``.grad`` is set to ``None`` (inside the iteration, as
    ``optimizer.zero_grad(set_to_none=True)`` would), so nothing accumulates between iterations
    and memory is not inflated.
``inference``
    The forward under ``torch.no_grad()``: what serving the un-merged adapter costs. Not part of
    the default run (``--mode all`` adds it); it is *not* the number to compare training kernels on.
``train``
    One whole training step as the workload's ``train_step`` defines it (end-to-end cases:
    forward, loss, backward, optimizer step, zero_grad). Cases that set ``Case.modes`` to it run it
    whatever ``--mode`` says. A workload's ``items`` (e.g. images or tokens per step) turns the
    median into a throughput, shown in the note column and stored as ``throughput``.

Time
----
Every variant first runs ``warmup`` untimed iterations (at least one: it triggers
``torch.compile``, Triton autotuning and lazy initialisation); a variant whose warm-up raises is
reported with the reason, never dropped silently.

- CUDA: ``triton.testing.do_bench`` (CUDA events around each call, L2 cache flushed between
  calls) when triton is importable, else a CUDA-event loop. ``do_bench`` budgets in milliseconds,
  so the harness first times a few calls and converts ``warmup``/``repeats`` into the budgets
  that give about that many calls.
- CPU: ``time.perf_counter`` around each call, ``repeats`` timed calls per variant, with the
  variants interleaved round by round (each round runs every variant once) so that slow drifts of
  a shared machine hit every variant alike. Each round runs them in a fresh order (a seeded
  shuffle), because a call pays for what the call before it left in the caches: in a fixed order
  the first variant always follows the last one, and at M = 197, K = N = 768 (rescaled-linear's
  variants, fwd+bwd, 2 threads) the same variant measured 0.02-0.05 ms (1-2%) slower in first
  place than at its own place later in the round. Python's garbage collector is paused while timing. The
  number of threads is whatever ``torch.get_num_threads()`` says (the CLI's ``--threads``).

Reported: the median (``median_ms``) and the quartiles (``q25_ms``, ``q75_ms``) of the per-call
times, and ``ratio`` = median / the median of the case's baseline variant for that mode.

Peak memory
-----------
``peak_mem_mb`` is the most memory the iteration holds at any moment *beyond what was held before
it started*: the inputs, weights and upstream gradient are excluded; outputs, tensors saved for
backward, gradients and temporaries allocated inside kernels are included. It is measured in one
extra, untimed iteration, after the timing.

- CUDA: ``torch.cuda.max_memory_allocated()`` after ``torch.cuda.reset_peak_memory_stats()``,
  minus ``torch.cuda.memory_allocated()`` before the iteration (the caching allocator's view:
  what tensors hold, not what the allocator has reserved).
- CPU: torch has no CPU allocator statistics, and process-wide RSS high-water marks
  (``getrusage``) are monotone and would need a fresh process per variant. Instead the iteration
  runs once under ``torch.profiler.profile(profile_memory=True)``, which records every allocation
  and free of torch's CPU allocator -- including ones made inside C++ kernels and by intra-op
  worker threads -- and the peak of their running sum is reported. (Kineto's start/stop chatter
  on file descriptor 2 is silenced for that one call.) Memory that bypasses torch's allocator
  (e.g. MKL/oneDNN scratch buffers) is not seen.

``mem_ratio`` = peak / the baseline variant's peak.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch

__all__ = [
    "ALL_MODES",
    "DEFAULT_MODES",
    "Case",
    "Result",
    "Shape",
    "Variant",
    "VariantSkipped",
    "Workload",
    "cpu_threads_available",
    "device_name",
    "format_table",
    "iteration",
    "plot",
    "read_json",
    "run_case",
    "run_metadata",
    "write_csv",
    "write_json",
]

Shape = tuple[int, ...]

#: The modes of the default run (``--mode both``).
DEFAULT_MODES: tuple[str, ...] = ("forward", "fwd+bwd")
#: Every mode the harness knows (``--mode all``).
ALL_MODES: tuple[str, ...] = ("forward", "fwd+bwd", "inference", "train")


class VariantSkipped(Exception):
    """Raised by :attr:`Variant.setup` when the variant cannot run here; the message is the reason."""


@dataclass
class Workload:
    """What a variant's ``setup`` returns: everything one iteration needs, already allocated.

    ``forward`` runs one forward pass and returns the output; ``params`` are the tensors whose
    ``.grad`` a training step fills (reset to ``None`` after every fwd+bwd iteration);
    ``grad_output`` is the fixed upstream gradient for fwd+bwd (``None``: the variant has no
    backward); ``backend`` is a free-form label for the tables ("torch", "inductor", "cpu", ...),
    or a function of the mode that returns it (an op whose path depends on whether it records a
    gradient).
    """

    forward: Callable[[], torch.Tensor]
    params: Sequence[torch.Tensor] = ()
    grad_output: Optional[torch.Tensor] = None
    backend: Union[str, Callable[[str], str]] = ""
    train_step: Optional[Callable[[], None]] = None  # mode "train": one full optimizer step
    items: Optional[tuple[int, str]] = None  # (count, unit) processed per step, e.g. (64, "img")
    no_backward: str = ""  # why grad_output is None, for the fwd+bwd table (default: a generic reason)

    def label(self, mode: str) -> str:
        """The backend label of ``mode``'s rows."""
        return self.backend(mode) if callable(self.backend) else self.backend


@dataclass(frozen=True)
class Variant:
    """One implementation under test: a name and a ``setup(shape, dtype, device) -> Workload``.

    ``setup`` raises :class:`VariantSkipped` when the variant cannot run here (a missing package).
    ``optional`` variants (``torch.compile``, third-party layers) that fail when run are reported
    as skipped with the error; a failure of a non-optional variant is reported as ``failed``.
    """

    name: str
    setup: Callable[[Shape, torch.dtype, torch.device], Workload]
    optional: bool = False
    description: str = ""


@dataclass(frozen=True)
class Case:
    """A benchmark case: how to build its variants and which shapes and baselines it uses.

    ``make_variants(backend)`` returns the variants (``backend`` is the CLI's ``--backend`` for
    our op, ``None`` for the default); building them allocates nothing. ``baselines`` maps each
    mode to the variant every ratio is taken against. ``dim_names`` names the shape's entries
    (e.g. ``("M", "K", "N")``): they become columns of the results. ``presets`` maps a preset
    name to shapes per device type (key ``"cpu"``/``"cuda"``, or ``"any"``), ``default_presets``
    the presets a bare run uses per device type, ``default_dtype`` the dtype per device type.
    """

    name: str
    description: str
    make_variants: Callable[[Optional[str]], list[Variant]]
    baselines: Mapping[str, str]
    dim_names: tuple[str, ...]
    presets: Mapping[str, Mapping[str, Sequence[Shape]]]
    default_presets: Mapping[str, Sequence[str]]
    default_dtype: Mapping[str, torch.dtype]
    modes: Optional[tuple[str, ...]] = None  # always run these modes (end-to-end cases: "train")
    in_default_run: bool = True  # part of a bare `subspace-ops bench` (end-to-end cases: no)
    # One group of variants per method: make_variants(backend, methods=...) takes the CLI's --methods.
    per_method: bool = False

    def parse_shape(self, text: str, device_type: str) -> list[Shape]:
        """A preset name (resolved for ``device_type``) or comma-separated positive integers.

        Raises ``ValueError`` with a message listing what is accepted.
        """
        text = text.strip()
        if text in self.presets:
            by_device = self.presets[text]
            shapes = by_device.get(device_type, by_device.get("any"))
            if shapes is None:
                raise ValueError(f"preset {text!r} has no shapes for {device_type}")
            return [tuple(s) for s in shapes]
        parts = [p.strip() for p in text.split(",")]
        wanted = ",".join(self.dim_names)
        if len(parts) != len(self.dim_names) or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(
                f"invalid shape {text!r}: use a preset ({', '.join(self.presets)}) "
                f"or {wanted} as {len(self.dim_names)} positive integers"
            )
        return [tuple(int(p) for p in parts)]

    def default_shapes(self, device_type: str) -> list[Shape]:
        """The shapes of a run without ``--shape`` on ``device_type``."""
        names = self.default_presets.get(device_type, self.default_presets.get("any", ()))
        return [shape for name in names for shape in self.parse_shape(name, device_type)]


@dataclass
class Result:
    """One row: one variant of one case, at one shape, dtype, device and mode."""

    case: str
    variant: str
    shape: str
    dims: dict[str, int]
    dtype: str
    device: str
    backend: str
    mode: str
    median_ms: Optional[float] = None
    q25_ms: Optional[float] = None
    q75_ms: Optional[float] = None
    ratio: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    mem_ratio: Optional[float] = None
    baseline: str = ""
    status: str = "ok"  # "ok" | "skipped" | "failed"
    note: str = ""
    throughput: Optional[float] = None  # items per second (mode "train" of end-to-end cases)
    throughput_unit: str = ""

    def to_row(self) -> dict[str, Any]:
        """A flat dict: the shape's named dimensions (e.g. M, K, N) become columns."""
        row: dict[str, Any] = {"case": self.case, "variant": self.variant, "shape": self.shape}
        row.update(self.dims)
        for key in ("dtype", "device", "backend", "mode", "median_ms", "q25_ms", "q75_ms", "ratio",
                    "peak_mem_mb", "mem_ratio", "baseline", "status", "note", "throughput", "throughput_unit"):
            row[key] = getattr(self, key)
        return row


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------
def cpu_threads_available() -> int:
    """The CPU cores this process may run on (its affinity mask), the ``--threads`` default."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name()`` on CUDA; the CPU model and torch's thread count on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {_cpu_model()} ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# One iteration
# ---------------------------------------------------------------------------------------------
def iteration(workload: Workload, mode: str) -> Callable[[], None]:
    """The zero-argument closure that runs one iteration of ``mode`` (see the module docstring)."""
    if mode == "forward":

        def forward() -> None:
            workload.forward()

        return forward
    if mode == "inference":

        def inference() -> None:
            with torch.no_grad():
                workload.forward()

        return inference
    if mode == "fwd+bwd":
        if workload.grad_output is None:
            raise ValueError(workload.no_backward or "this variant has no backward (its workload has no grad_output)")
        params, grad_output = tuple(workload.params), workload.grad_output

        def forward_backward() -> None:
            workload.forward().backward(grad_output)
            for p in params:
                p.grad = None

        return forward_backward
    if mode == "train":
        if workload.train_step is None:
            raise ValueError("this variant has no training step")
        return workload.train_step
    raise ValueError(f"unknown mode {mode!r}; expected one of {ALL_MODES}")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def _summary(times_ms: Sequence[float]) -> tuple[float, float, float]:
    """(median, 25th percentile, 75th percentile)."""
    if len(times_ms) == 1:
        return times_ms[0], times_ms[0], times_ms[0]
    q25, _, q75 = statistics.quantiles(times_ms, n=4, method="inclusive")
    return statistics.median(times_ms), q25, q75


def _time_cuda(fn: Callable[[], None], warmup: int, repeats: int, params: Sequence[torch.Tensor]
               ) -> tuple[float, float, float]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 3, 1e-3)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        q25, q50, q75 = do_bench(
            fn,
            warmup=max(warmup, 1) * estimate_ms,
            rep=repeats * estimate_ms,
            grad_to_none=list(params) or None,
            quantiles=[0.25, 0.5, 0.75],
        )
        return float(q50), float(q25), float(q75)
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return _summary([s.elapsed_time(e) for s, e in zip(starts, ends)])


def _time_cpu_interleaved(steps: Mapping[str, Callable[[], None]], repeats: int
                          ) -> dict[str, tuple[float, float, float]]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    order = list(steps.items())
    shuffle = random.Random(0).shuffle  # the same orders every run
    try:
        for _ in range(repeats):
            shuffle(order)
            for name, fn in order:
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: _summary(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _silence_fd2() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null (kineto prints start/stop lines there from C++)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak of the allocation stream the profiler records while ``fn`` runs.

    The profiler records the allocations of the thread that enabled it (ATen's intra-op worker
    threads do not inherit it), so a kernel must allocate its scratch on the calling thread to be
    counted; ours do (csrc/head_mixing_attention.cpp says why), as does ATen's CPU flash attention.
    """
    from torch.profiler import ProfilerActivity, profile

    with _silence_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The complete, signed allocation stream (a private but long-standing API; if it goes away the
    # AttributeError is reported as "memory not measured" in the row's note).
    stream = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for _, nbytes in sorted(stream, key=lambda event: event[0]):
        current += nbytes
        peak = max(peak, current)
    return peak


def _peak_bytes(fn: Callable[[], None], device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    return _cpu_peak_bytes(fn)


# ---------------------------------------------------------------------------------------------
# Running a case
# ---------------------------------------------------------------------------------------------
def _error_text(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:160]}"


def run_case(
    case: Case,
    shape: Shape,
    *,
    dtype: torch.dtype,
    device: torch.device,
    backend: Optional[str] = None,
    modes: Sequence[str] = DEFAULT_MODES,
    warmup: int = 3,
    repeats: int = 10,
    measure_memory: bool = True,
    variants: Optional[Sequence[Variant]] = None,
) -> list[Result]:
    """Time (and measure the peak memory of) every variant of ``case`` at ``shape``, per mode.

    Returns one :class:`Result` per variant and mode, skipped and failed variants included (with
    ``status`` and ``note`` saying why). Ratios are to ``case.baselines[mode]``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    variants = list(variants if variants is not None else case.make_variants(backend))
    shape_text = "x".join(map(str, shape))
    dims = dict(zip(case.dim_names, shape))
    dev_name = device_name(device)
    dtype_name = str(dtype).replace("torch.", "")

    workloads: dict[str, Workload] = {}
    setup_notes: dict[str, tuple[str, str]] = {}  # name -> (status, note)
    for v in variants:
        try:
            workloads[v.name] = v.setup(shape, dtype, device)
        except VariantSkipped as exc:
            setup_notes[v.name] = ("skipped", f"skipped: {exc}")
        except Exception as exc:  # reported in the table, never hidden
            setup_notes[v.name] = ("skipped" if v.optional else "failed", f"setup failed: {_error_text(exc)}")

    results: list[Result] = []
    for mode in modes:
        notes = dict(setup_notes)
        steps: dict[str, Callable[[], None]] = {}
        for v in variants:
            if v.name not in workloads:
                continue
            try:
                step = iteration(workloads[v.name], mode)
                for _ in range(max(warmup, 1)):  # the first call compiles / autotunes
                    step()
                _sync(device)
                steps[v.name] = step
            except Exception as exc:
                status = "skipped" if v.optional else "failed"
                notes[v.name] = (status, f"{status}: {_error_text(exc)}")

        timing: dict[str, tuple[float, float, float]] = {}
        if device.type == "cuda":
            for name, step in steps.items():
                timing[name] = _time_cuda(step, warmup, repeats, workloads[name].params)
        else:
            timing = _time_cpu_interleaved(steps, repeats)

        memory: dict[str, Optional[float]] = {}
        if measure_memory:
            for name, step in steps.items():
                try:
                    peak = _peak_bytes(step, device)
                except Exception as exc:  # a broken profiler must not lose the timings
                    peak = None
                    notes[name] = ("ok", f"memory not measured: {_error_text(exc)}")
                memory[name] = None if peak is None else peak / 2**20

        base = case.baselines.get(mode, "")
        for v in variants:
            status, note = notes.get(v.name, ("ok", ""))
            workload = workloads.get(v.name)
            r = Result(case.name, v.name, shape_text, dims, dtype_name, dev_name,
                       workload.label(mode) if workload else "", mode, baseline=base, status=status, note=note)
            if v.name in timing:
                r.median_ms, r.q25_ms, r.q75_ms = timing[v.name]
                if base in timing and timing[base][0] > 0:
                    r.ratio = r.median_ms / timing[base][0]
                r.peak_mem_mb = memory.get(v.name)
                if workload.items and r.median_ms:
                    r.throughput = workload.items[0] / (r.median_ms / 1e3)
                    r.throughput_unit = f"{workload.items[1]}/s"
                    r.note = (r.note + " " if r.note else "") + f"{r.throughput:,.1f} {r.throughput_unit}"
                base_mem = memory.get(base)
                if r.peak_mem_mb is not None and base_mem:
                    r.mem_ratio = r.peak_mem_mb / base_mem
            results.append(r)
    return results


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fmt_mb(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.3g}"


def format_table(results: Sequence[Result]) -> str:
    """An aligned text table, one block per (case, shape, dtype, mode, device)."""
    header = ["variant", "backend", "median ms", "IQR ms", "x baseline", "peak MB", "mem x", "note"]
    groups: dict[tuple[str, ...], list[Result]] = {}
    for r in results:
        groups.setdefault((r.case, r.shape, r.dtype, r.mode, r.device), []).append(r)
    lines: list[str] = []
    for (case, shape, dtype, mode, device), rows in groups.items():
        dims = " ".join(f"{k}={v}" for k, v in rows[0].dims.items()) or shape
        lines.append(f"\n{case}  {dims}  {dtype}  {mode}  on {device}  (baseline: {rows[0].baseline or '-'})")
        table = [header] + [
            [r.variant, r.backend or "-", _fmt(r.median_ms, ".3f"),
             "-" if r.q25_ms is None or r.q75_ms is None else f"{r.q25_ms:.3f}-{r.q75_ms:.3f}",
             _fmt(r.ratio, ".2f"), _fmt_mb(r.peak_mem_mb), _fmt(r.mem_ratio, ".2f"), r.note]
            for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def run_metadata(**extra: Any) -> dict[str, Any]:
    """Versions and machine facts stored next to the results (``extra`` is added as is)."""
    meta: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    meta.update(extra)
    return meta


def write_json(results: Sequence[Result], path: str, meta: Optional[Mapping[str, Any]] = None) -> None:
    """``{"meta": {...}, "results": [row, ...]}`` with rows as in :meth:`Result.to_row`."""
    payload = {"meta": dict(meta) if meta is not None else run_metadata(),
               "results": [r.to_row() for r in results]}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def read_json(path: str) -> list[Result]:
    """The results of a file written by :func:`write_json` (``--json``), e.g. to plot them again."""
    with open(path) as f:
        try:
            payload = json.load(f)
        except json.JSONDecodeError as exc:  # e.g. the --csv file: name the file, not only the parse error
            raise ValueError(f"{path}: not a subspace-ops bench JSON file (it is not JSON: {exc})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        raise ValueError(f"{path}: not a subspace-ops bench JSON file (expected {{'meta': ..., 'results': [...]}})")
    fields = {f.name for f in dataclasses.fields(Result)} - {"dims"}
    results = []
    for row in payload["results"]:
        # Every column that is not a Result field is one of the shape's named dimensions.
        results.append(Result(**{k: v for k, v in row.items() if k in fields},
                              dims={k: v for k, v in row.items() if k not in fields}))
    return results


def write_csv(results: Sequence[Result], path: str) -> None:
    """One CSV row per result; columns are the union of the rows' keys, in first-seen order."""
    rows = [r.to_row() for r in results]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def plot(results: Sequence[Result], path: str) -> None:
    """Grouped bar charts: one row of panels per mode, time ratio (left) and peak memory (right).

    Bars are variants, groups are (case, shape, dtype); the device is in the title. Needs
    matplotlib (imported here, with the Agg backend); raises ``RuntimeError`` if it is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(f"--plot needs matplotlib: pip install 'subspace_ops[plot]' ({exc})") from exc

    measured = [r for r in results if r.median_ms is not None]
    if not measured:
        raise RuntimeError("nothing to plot: no variant produced a timing")
    modes = list(dict.fromkeys(r.mode for r in measured))
    groups = list(dict.fromkeys((r.case, r.shape, r.dtype) for r in measured))
    variants = list(dict.fromkeys(r.variant for r in measured))
    lookup = {(r.mode, r.case, r.shape, r.dtype, r.variant): r for r in measured}
    multi_case = len({g[0] for g in groups}) > 1
    labels = [(f"{c}\n" if multi_case else "") + f"{s}\n{d}" for c, s, d in groups]

    # One group (e.g. an end-to-end case at one shape): the variants label the x axis themselves;
    # several groups: bars grouped per (case, shape, dtype), variants in the legend.
    single = len(groups) == 1
    width_in = max(8.0, 0.55 * len(variants) + 4) if single else max(8.0, 2.6 * len(groups) + 5)
    fig, axes = plt.subplots(len(modes), 2, figsize=(width_in, 3.6 * len(modes) + (2.0 if single else 0.8)),
                             squeeze=False)
    width = 0.8 if single else 0.8 / len(variants)
    # Distinct colors for up to 20 variants (the default cycle repeats after 10).
    colors = [plt.get_cmap("tab20" if len(variants) > 10 else "tab10")(i) for i in range(20)]
    panels = (("ratio", "time / baseline (lower is better)"), ("peak_mem_mb", "peak memory, MB (lower is better)"))
    for col, (key, label) in enumerate(panels):
        # One y scale per column, across modes: log when the values span more than 50x.
        positive = [v for r in measured if (v := getattr(r, key)) is not None and v > 0]
        log_scale = bool(positive) and max(positive) / min(positive) > 50
        for row, mode in enumerate(modes):
            ax = axes[row][col]
            for i, variant in enumerate(variants):
                xs, values = [], []
                for g, group in enumerate(groups):
                    r = lookup.get((mode, *group, variant))
                    value = getattr(r, key) if r is not None else None
                    if value is not None:
                        xs.append(i if single else g + (i - (len(variants) - 1) / 2) * width)
                        values.append(value)
                ax.bar(xs, values, width, label=variant, color=colors[i % len(colors)])
            if single:
                ax.set_xticks(range(len(variants)), variants, fontsize=8, rotation=45, ha="right")
                ax.set_xlabel(labels[0].replace("\n", " "), fontsize=8)
            else:
                ax.set_xticks(range(len(groups)), labels, fontsize=8)
            baseline = next((r.baseline for r in measured if r.mode == mode), "")
            ax.set_title(f"{mode}: {label}" + (f"\nbaseline: {baseline}" if key == "ratio" else ""), fontsize=9)
            if log_scale:
                ax.set_yscale("log")
            if key == "ratio":
                ax.axhline(1.0, color="black", linewidth=0.8)
            ax.grid(axis="y", alpha=0.3)
    if not single:
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, names, loc="lower center", ncol=min(len(variants), 6), fontsize=8, frameon=False)
    cases = ", ".join(dict.fromkeys(r.case for r in measured))
    devices = ", ".join(dict.fromkeys(r.device for r in measured))
    fig.suptitle(f"{cases} on {devices}", fontsize=11)
    fig.tight_layout(rect=(0, 0 if single else 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)

