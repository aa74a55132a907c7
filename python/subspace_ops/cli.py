"""``subspace-ops`` command line: ``bench`` (microbenchmarks) and ``backends`` (what can run here)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _build_parser() -> argparse.ArgumentParser:
    from .bench.cases import CASES, SHAPE_PRESETS

    parser = argparse.ArgumentParser(prog="subspace-ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="time our ops against the naive formulas and standard layers")
    bench.add_argument("cases", nargs="*", metavar="CASE", help=f"cases to run (default: all): {', '.join(CASES)}")
    bench.add_argument("--shape", action="append", metavar="SHAPE",
                       help=f"a preset ({', '.join(SHAPE_PRESETS)}) or M,K,N; repeatable "
                            "(default: vit-b-cpu on CPU, vit-b and llama-7b on CUDA)")
    bench.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    bench.add_argument("--backend", choices=["reference", "cpu", "triton"], help="our op's backend (default: best)")
    bench.add_argument("--mode", choices=["forward", "fwd+bwd", "both"], default="both")
    bench.add_argument("--repeats", type=int, default=10, help="timed runs per variant (median reported)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed runs per variant first")
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    bench.add_argument("--json", metavar="PATH", help="write the results as JSON")
    bench.add_argument("--csv", metavar="PATH", help="write the results as CSV")
    bench.add_argument("--plot", metavar="PNG", help="draw bar charts of time ratio and peak memory")

    sub.add_parser("backends", help="which backends can run on this machine, and why not")
    return parser


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .bench.cases import CASES, DEFAULT_DTYPE, DEFAULT_PRESET, parse_shape
    from .bench.harness import MODES, format_table, plot, run_variants, write_csv, write_json

    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"argument CASE: unknown case(s) {unknown}; choose from {sorted(CASES)}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("argument --repeats must be >= 1 and --warmup >= 0")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda requested but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype] if args.dtype else DEFAULT_DTYPE[device.type]
    try:
        shapes = [s for text in (args.shape or DEFAULT_PRESET[device.type]) for s in parse_shape(text)]
    except ValueError as exc:
        parser.error(f"argument --shape: {exc}")
    modes = MODES if args.mode == "both" else (args.mode,)
    results = []
    for name in args.cases or list(CASES):
        case = CASES[name]
        for shape in shapes:
            variants = case.variants(shape, dtype, device, args.backend)
            results += run_variants(
                name, "x".join(map(str, shape)), variants, device=device, dtype=dtype, modes=modes,
                baselines=case.baselines, warmup=args.warmup, repeats=args.repeats,
                measure_memory=not args.no_memory,
            )
            print(format_table([r for r in results if r.shape == "x".join(map(str, shape)) and r.case == name]),
                  flush=True)
    if args.json:
        write_json(results, args.json)
    if args.csv:
        write_csv(results, args.csv)
    if args.plot:
        plot(results, args.plot)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "backends":
        from .backends import backend_report

        print(backend_report())
        return 0
    return _bench(args, parser)


if __name__ == "__main__":
    sys.exit(main())
