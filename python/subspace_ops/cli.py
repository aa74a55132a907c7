"""The ``subspace-ops`` command line (also ``python -m subspace_ops``).

``subspace-ops bench [CASE ...] [options]``
    Microbenchmarks: every variant of each case (our op, the naive formula, ``torch.compile`` of
    it, standard layers, PEFT LoRA) side by side; median time, ratio to a baseline, peak memory.
    A bare ``subspace-ops bench`` runs the five op cases (rescaled-linear, scaled-linear,
    svd-delta-linear, lowrank-linear, head-mixing-attention; ``--list`` marks them "default") with the
    device's default shapes and dtype (CUDA: ViT-B M=12608, bfloat16; CPU: M=4096 and M=197,
    K=N=768, float32), forward and forward+backward; the causal and dropout head-mixing cases and the
    end-to-end training steps (e2e*) run when named. See :mod:`subspace_ops.bench.harness` for what is measured and how.
``subspace-ops plot RESULTS.json [...] --out PNG``
    Draw the bar charts of ``bench --plot`` again from files written by ``bench --json``.
``subspace-ops backends``
    Which backends can run on this machine (CPU, and CUDA if present), and why not; with
    ``SUBSPACE_OPS_BACKEND`` set, which backend that makes the ops use per device (or the error they raise).
``subspace-ops verify [options]``
    Every op on this device and every available fused backend against the float64 reference,
    forward and gradients, as a pass/fail table (exit status 1 on any failure). See
    :mod:`subspace_ops.verify`.
``subspace-ops --version``
    The package version.

``bench`` and ``verify`` refuse up front (exit status 2, as for any usage error) a backend that cannot
run on the device, whether it comes from ``--backend`` or from ``SUBSPACE_OPS_BACKEND``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Optional, Sequence

import torch

__all__ = ["main"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODE_CHOICES = {
    "forward": ("forward",),
    "fwd+bwd": ("fwd+bwd",),
    "inference": ("inference",),
    "both": ("forward", "fwd+bwd"),
    "all": ("forward", "fwd+bwd", "inference"),
}
_FALLBACK_BACKENDS = ("reference", "cpu", "triton")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _backend_names() -> tuple[str, ...]:
    try:
        from .backends import BACKENDS
    except ImportError:
        return _FALLBACK_BACKENDS
    return tuple(BACKENDS)


def _per_method_cases() -> list[str]:
    """The cases that take ``--methods`` (one group of variants per method), from their definitions."""
    from .bench.cases import CASES

    return [name for name, case in CASES.items() if case.per_method]


def _build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, argparse.ArgumentParser]:
    """(the top-level parser, the bench subparser, the plot subparser): each subcommand reports its
    usage errors with its own usage line."""
    from . import __version__
    from .bench.cases import CASES
    from .bench.harness import cpu_threads_available

    parser = argparse.ArgumentParser(
        prog="subspace-ops", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{bench,verify,plot,backends}")

    presets = sorted({p for case in CASES.values() for p in case.presets})
    bench = sub.add_parser(
        "bench",
        help="time our ops against the naive formulas and standard layers",
        description="Time every variant of each CASE side by side, forward and/or forward+backward, "
                    "and measure each iteration's peak memory.",
        epilog="examples:\n"
               "  subspace-ops bench                                   # the default cases, shapes, dtype\n"
               "  subspace-ops bench --shape llama-7b --mode fwd+bwd --plot out.png\n"
               "  subspace-ops bench rescaled-linear --shape 4096,768,768 --threads 2 --json r.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("cases", nargs="*", metavar="CASE",
                       help=f"case(s) to run: {', '.join(CASES)} (default: the ones `--list` marks "
                            f"default: {', '.join(n for n, c in CASES.items() if c.in_default_run)})")
    bench.add_argument("--shape", action="append", metavar="SHAPE",
                       help=f"a preset ({', '.join(presets)}) or comma-separated sizes, e.g. M,K,N; "
                            "repeatable (default: the case's default preset for the device)")
    bench.add_argument("--dtype", choices=list(DTYPES),
                       help="default: the case's default for the device (bfloat16 on CUDA, float32 on CPU)")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    bench.add_argument("--backend", choices=_backend_names(),
                       help="backend of our op (default: the best available for the device)")
    bench.add_argument("--mode", choices=list(MODE_CHOICES), default="both",
                       help="forward (training flags), fwd+bwd, inference (no_grad), "
                            "both = forward + fwd+bwd (default), all")
    bench.add_argument("--repeats", type=_int_at_least(1), metavar="N",
                       help="timed iterations per variant, median reported (default: 20 on CPU, 100 on CUDA)")
    bench.add_argument("--warmup", type=_int_at_least(0), metavar="N",
                       help="untimed iterations per variant first; at least one always runs "
                            "(default: 3 on CPU, 10 on CUDA)")
    bench.add_argument("--threads", type=_int_at_least(1), metavar="N",
                       help=f"torch CPU threads (default: all {cpu_threads_available()} cores this process may use)")
    bench.add_argument("--methods", metavar="NAMES",
                       help=f"end-to-end cases ({', '.join(_per_method_cases())}): comma-separated registry "
                            "methods to time (default: each case's own; see --list)")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    bench.add_argument("--no-compile", action="store_true",
                       help="leave out the torch.compile variants (compiling a whole model takes minutes on a GPU)")
    bench.add_argument("--json", metavar="PATH", help="write the results (and run metadata) as JSON")
    bench.add_argument("--csv", metavar="PATH", help="write the results as CSV")
    bench.add_argument("--plot", metavar="PNG", help="draw bar charts of time ratio and peak memory (needs matplotlib)")
    bench.add_argument("--list", action="store_true", help="list the cases, their variants and presets, and exit")

    plot = sub.add_parser("plot", help="draw bench bar charts from --json files (needs matplotlib)",
                          description="Draw the bar charts of `bench --plot` (time ratio and peak memory per "
                                      "mode) from one or more files written by `bench --json`.")
    plot.add_argument("json", nargs="+", metavar="RESULTS.json", help="file(s) written by `bench --json`")
    plot.add_argument("--out", "-o", required=True, metavar="PNG", help="the image to write")

    sub.add_parser("backends", help="which backends can run here, and why not",
                   description="Print every backend for CPU (and CUDA if present) "
                               "with the reason it can or cannot run.")
    verify = sub.add_parser(
        "verify", help="check every op against the float64 reference on this device",
        description="Run every op on this device with every available fused backend (or --backend) and "
                    "compare forward and gradients with the float64 reference; exit 1 on any failure.")
    verify.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    verify.add_argument("--backend", action="append", choices=[b for b in _backend_names() if b != "reference"],
                        help="check only this backend (repeatable; default: every available fused one)")
    verify.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                        help="dtype to check (repeatable; default: float32 and bfloat16)")
    verify.add_argument("--op", action="append", help="check only this op (repeatable)")
    return parser, bench, plot


def _device(name: Optional[str]) -> torch.device:
    """``--device``, or where the ops run by default: CUDA when torch sees a GPU, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _backend_problem(backend: Optional[str], device: torch.device) -> str:
    """Why our ops cannot run on ``device`` with ``backend`` (``--backend``; None: what
    ``$SUBSPACE_OPS_BACKEND`` or the device's default picks), or "" when they can. bench and verify
    both refuse such a run up front: every op would otherwise fail with the same error, row by row."""
    from .backends import explain_backend

    problem = explain_backend(backend, device)[1]
    return f"argument --backend: {problem}" if problem and backend is not None else problem


def _verify(args) -> int:
    from .verify import CHECKS, format_outcomes, run_checks, skipped_dtypes

    known = sorted({c.op for c in CHECKS})
    unknown = [op for op in args.op or [] if op not in known]
    if unknown:
        print(f"subspace-ops verify: unknown --op {unknown}; known ops: {known}", file=sys.stderr)
        return 2
    if args.device is not None and args.device not in ("cpu", "cuda"):
        print(f"subspace-ops verify: --device must be cpu or cuda, got {args.device!r}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("subspace-ops verify: --device cuda, but torch sees no CUDA device here", file=sys.stderr)
        return 2
    device = _device(args.device)
    problems = [p for p in dict.fromkeys(_backend_problem(b, device) for b in args.backend or [None]) if p]
    if problems:
        for problem in problems:
            print(f"subspace-ops verify: {problem}; see `subspace-ops backends`", file=sys.stderr)
        return 2
    dtypes = [DTYPES[d] for d in args.dtype] if args.dtype else [torch.float32, torch.bfloat16]
    outcomes = run_checks(args.device, args.backend, dtypes, args.op)
    skipped = skipped_dtypes(args.device, args.backend, dtypes)
    for note in skipped:
        print(f"subspace-ops verify: skipped {note}", file=sys.stderr)
    if not outcomes:
        print("subspace-ops verify: " + ("every requested backend and dtype was skipped (above)" if skipped else
                                         "no fused backend can run on this device (see `subspace-ops backends`)"),
              file=sys.stderr)
        return 1
    print(format_outcomes(outcomes))
    return 0 if all(o.passed for o in outcomes) else 1


def _list_cases() -> str:
    from .bench.cases import CASES

    lines = []
    for case in CASES.values():
        lines.append(f"{case.name}{' (default)' if case.in_default_run else ''}: {case.description}")
        lines.append(f"  shape: {','.join(case.dim_names)}; baselines: "
                     + ", ".join(f"{mode} -> {name}" for mode, name in case.baselines.items()))
        for variant in case.make_variants(None):
            lines.append(f"  - {variant.name}: {variant.description}")
        for name, by_device in case.presets.items():
            shapes = "; ".join(f"{dev}: " + " ".join("x".join(map(str, s)) for s in shapes)
                               for dev, shapes in by_device.items())
            lines.append(f"  preset {name}: {shapes}")
    return "\n".join(lines)


def _check_image_format(parser: argparse.ArgumentParser, option: str, path: Optional[str]) -> None:
    """Before any work: the file name's extension must be an image format matplotlib writes."""
    if path is None:
        return
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if extension not in formats:
        parser.error(f"argument {option}: {path!r} does not name an image format matplotlib writes "
                     f"(give a file name ending in one of: .{', .'.join(sorted(formats))}; e.g. .png)")


def _check_writable(bench: argparse.ArgumentParser, option: str, path: Optional[str]) -> None:
    if path is None:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        bench.error(f"argument {option}: directory {parent!r} does not exist")
    # checked before the benchmark runs, so that its results are not lost at the end
    if os.path.isdir(path):
        bench.error(f"argument {option}: {path!r} is a directory; give a file name")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        bench.error(f"argument {option}: cannot write {path!r}: {exc.strerror}")
    if not existed:
        os.remove(path)


def _bench(args: argparse.Namespace, bench: argparse.ArgumentParser) -> int:
    from .bench.cases import CASES
    from .bench.harness import cpu_threads_available, device_name, format_table, plot, run_case, run_metadata
    from .bench.harness import write_csv, write_json

    if args.list:
        print(_list_cases())
        return 0
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        bench.error(f"argument CASE: unknown case(s) {', '.join(map(repr, unknown))} "
                    f"(choose from {', '.join(CASES)})")
    names = args.cases or [name for name, case in CASES.items() if case.in_default_run]
    cases = [CASES[name] for name in dict.fromkeys(names)]

    device = _device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        bench.error("argument --device: cuda requested but torch.cuda.is_available() is False")
    problem = _backend_problem(args.backend, device)
    if problem:
        bench.error(problem)
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        bench.error("argument --plot: needs matplotlib (pip install 'subspace_ops[plot]')")
    _check_image_format(bench, "--plot", args.plot)
    for option in ("json", "csv", "plot"):
        _check_writable(bench, f"--{option}", getattr(args, option))

    variants = {}
    if args.methods is not None:
        from .bench.e2e import check_methods

        not_per_method = [case.name for case in cases if not case.per_method]
        if not_per_method:
            bench.error(f"argument --methods: applies to the end-to-end cases ({', '.join(_per_method_cases())}), "
                        f"not {not_per_method}")
        try:
            chosen = check_methods([m.strip() for m in args.methods.split(",") if m.strip()])
        except ValueError as exc:
            bench.error(f"argument --methods: {exc}")
        variants = {case.name: case.make_variants(args.backend, methods=chosen) for case in cases}
    if args.no_compile:
        variants = {case.name: [v for v in variants.get(case.name) or case.make_variants(args.backend)
                                if "compile" not in v.name] for case in cases}

    shapes = {}
    for case in cases:
        try:
            shapes[case.name] = (
                [s for text in args.shape for s in case.parse_shape(text, device.type)]
                if args.shape else case.default_shapes(device.type)
            )
        except ValueError as exc:
            bench.error(f"argument --shape: {exc}")

    on_cuda = device.type == "cuda"
    repeats = args.repeats if args.repeats is not None else (100 if on_cuda else 20)
    warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 3)
    modes = MODE_CHOICES[args.mode]
    threads_before = torch.get_num_threads()
    threads = args.threads or (cpu_threads_available() if device.type == "cpu" else threads_before)
    torch.set_num_threads(threads)
    run_modes = list(dict.fromkeys(mode for case in cases for mode in (case.modes or modes)))  # e2e: train only
    try:
        print(f"subspace-ops bench on {device_name(device)}: modes {', '.join(run_modes)}; "
              f"{warmup} warm-up + {repeats} timed iterations per variant", flush=True)
        results = []
        for case in cases:
            dtype = DTYPES[args.dtype] if args.dtype else case.default_dtype[device.type]
            for shape in shapes[case.name]:
                rows = run_case(case, shape, dtype=dtype, device=device, backend=args.backend,
                                modes=case.modes or modes, warmup=warmup, repeats=repeats,
                                measure_memory=not args.no_memory, variants=variants.get(case.name))
                print(format_table(rows), flush=True)
                results += rows
        meta = run_metadata(argv=sys.argv[1:] if args.argv is None else list(args.argv), device=device_name(device),
                            modes=run_modes, warmup=warmup, repeats=repeats, threads=threads)
    finally:
        torch.set_num_threads(threads_before)

    if args.json:
        write_json(results, args.json, meta)
    if args.csv:
        write_csv(results, args.csv)
    if args.plot:
        plot(results, args.plot)
    for path in (args.json, args.csv, args.plot):
        if path:
            print(f"wrote {path}")
    failed = [f"{r.variant} ({r.mode}, {r.shape}): {r.note}" for r in results if r.status == "failed"]
    if failed:
        print("FAILED variants:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


def _plot(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .bench.harness import plot, read_json

    if importlib.util.find_spec("matplotlib") is None:
        parser.error("plot needs matplotlib (pip install 'subspace_ops[plot]')")
    missing = [path for path in args.json if not os.path.isfile(path)]
    if missing:
        parser.error(f"argument RESULTS.json: no such file: {', '.join(missing)}")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        parser.error(f"argument --out: directory {parent!r} does not exist")
    _check_image_format(parser, "--out", args.out)
    try:
        results = [r for path in args.json for r in read_json(path)]
    except (ValueError, TypeError) as exc:  # not JSON, or not a bench file
        parser.error(f"argument RESULTS.json: {exc}")
    try:
        plot(results, args.out)
    except RuntimeError as exc:  # files without a single timing (every variant skipped or failed)
        parser.error(f"argument RESULTS.json: {exc}")
    print(f"wrote {args.out}")
    return 0


def _backends() -> int:
    try:
        from .backends import backend_report
    except ImportError:
        backend_report = None
    if backend_report is not None:
        print(backend_report())
        return 0
    import subspace_ops

    for device_type in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        print(f"{device_type}: available {subspace_ops.available_backends(device_type)}; "
              f"default {subspace_ops.resolve_backend(None, device_type)!r}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Usage errors raise ``SystemExit(2)`` with argparse's message naming the argument.
    """
    parser, bench, plot = _build_parser()
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    if args.command == "backends":
        return _backends()
    if args.command == "verify":
        return _verify(args)
    if args.command == "plot":
        return _plot(args, plot)
    return _bench(args, bench)


if __name__ == "__main__":
    sys.exit(main())
