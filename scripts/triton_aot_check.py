"""Compile every Triton kernel for a CUDA GPU ahead of time, on a machine without one.

The test suite runs the Triton kernels in Triton's CPU interpreter, which checks their arithmetic
but not whether they compile for a GPU: shapes that tl.dot rejects, layouts the backend cannot
lower, shared memory beyond what the chip has, register spills. This script catches those here,
before a GPU is at hand. It calls the launch wrappers of ``subspace_ops.triton_kernels`` with CPU
tensors of representative shapes and dtypes, as on CUDA (autotuned configs, CUDA matmul precision),
and where they would launch a kernel it compiles the kernel instead, for every config the autotuner
would try, down to a cubin with Triton's own ptxas. Nothing runs: the outputs are garbage, only the
compiled kernels are looked at.

For each kernel and case it reports the configs compiled, the largest shared memory asked for and
the registers used, and it fails (exit status 1) when a kernel does not compile or when none of a
launch's configs fits the chip's shared memory. Register spills (the per-thread stack frame, which
holds them) are reported as warnings: they cost speed, not correctness.

    python scripts/triton_aot_check.py                 # sm_90 (H100/H200), every dtype and config
    python scripts/triton_aot_check.py --quick         # one config per launch, bfloat16 and float64
    python scripts/triton_aot_check.py --arch 80 --json out.json
    python scripts/triton_aot_check.py --quick --shard 0/2 & python scripts/triton_aot_check.py --quick --shard 1/2

How it works: Triton's active driver is replaced by one that only names the target (no device is
opened), ``JITFunction.run`` compiles and returns instead of launching, and ``Autotuner.run``
compiles each pruned config instead of benchmarking them. These are Triton internals (checked
with Triton 3.8); the script says so when they have moved. It must run without
``TRITON_INTERPRET=1``, which would swap the kernels for interpreted ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

# Largest dynamic shared memory one block may use, by compute capability (CUDA programming guide).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
# SMs of the target, for the wrappers that size their grids by it (A100, H100/H200 SXM, B200).
SMS = {80: 108, 90: 132, 100: 148}


@dataclasses.dataclass
class Compiled:
    """One kernel compiled for one launch of one case."""

    case: str
    kernel: str
    config: str
    seconds: float
    shared: int = 0
    registers: Optional[int] = None
    stack_bytes: Optional[int] = None  # per-thread stack frame: where spilled registers go
    error: Optional[str] = None


def _install_compile_only_triton(arch: int, quick: bool, record: Callable[[Compiled], None],
                                 current_case: Callable[[], str]) -> None:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver:
        """Names the target; everything that would touch a device is absent."""

        def __init__(self) -> None:
            self.target = GPUTarget("cuda", arch, 32)

        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device: Optional[int] = None) -> int:
            return 0

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(CompileOnlyDriver())
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    launch_run = JITFunction.run

    def compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
        config = ", ".join(f"{k}={v}" for k, v in kwargs.items()
                           if k.startswith(("BLOCK", "GROUP", "num_warps", "num_stages")))
        entry = Compiled(current_case(), self.fn.__name__, config, 0.0)
        start = time.perf_counter()
        try:
            kernel = launch_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as error:  # a compile error is the finding, not a crash of the script
            entry.error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
        else:
            entry.shared = int(kernel.metadata.shared)
            entry.registers, entry.stack_bytes = _resource_usage(cuobjdump, kernel.asm["cubin"])
        entry.seconds = time.perf_counter() - start
        record(entry)
        return None

    def compile_every_config(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
        for config in configs[:1] if quick else configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None

    JITFunction.run = compile_instead_of_launch
    Autotuner.run = compile_every_config


def _resource_usage(cuobjdump: str, cubin: bytes) -> tuple[Optional[int], Optional[int]]:
    """(registers per thread, stack-frame bytes per thread) read from the cubin. Triton kernels keep no
    arrays on the stack, so a stack frame is where ptxas put spilled registers (cuobjdump's LOCAL
    column stays 0 for spills)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return (int(regs.group(1)) if regs else None, int(stack.group(1)) if stack else None)


# Input types to compile for: a torch dtype, and for float32 whether torch allows TF32 matmuls, which
# decides tl.dot's precision (matmul_precision): "float32" is IEEE fp32 (FMA, torch's default),
# "float32+tf32" the tensor-core path.
PRECISIONS = {"bfloat16": ("bfloat16", False), "float16": ("float16", False), "float32": ("float32", False),
              "float32+tf32": ("float32", True), "float64": ("float64", False)}


def _cases(precisions: list, quick: bool) -> list[tuple[str, Callable[[], None], bool]]:
    """(name, call, launches) triples: each call runs launch wrappers as the ops do on CUDA."""
    import torch

    from subspace_ops.triton_kernels import _common
    from subspace_ops.triton_kernels import head_mixing_attention as hm
    from subspace_ops.triton_kernels import lowrank_linear as lr
    from subspace_ops.triton_kernels import rescaled_linear as rl
    from subspace_ops.triton_kernels import svd_delta_linear as sv

    cases = []  # (name, call, whether the call launches Triton kernels)
    for name in precisions:
        dtype, tf32 = getattr(torch, PRECISIONS[name][0]), PRECISIONS[name][1]

        # Every case binds this dtype's randn as a default argument: a free variable would be looked
        # up when the case runs, after the loop has moved on, and every case would use the last dtype.
        def randn(*shape, dtype=dtype, tf32=tf32):
            torch.backends.cuda.matmul.allow_tf32 = tf32  # read by the wrappers at launch
            return torch.randn(*shape, dtype=dtype)

        # Rescaled linear: ViT-B width at rank 1 and 4, and an odd K (masked K tail); frozen W (the
        # scales kernel splits M) and trained W (dW needs one program per tile).
        for m, k, n, r in [(256, 768, 768, 1), (256, 768, 768, 4), (64, 760, 520, 4)]:
            def rescaled(m=m, k=k, n=n, r=r, randn=randn):
                x, w, s_l, s_r, b = randn(m, k), randn(n, k), randn(n, r), randn(k, r), randn(n)
                rl.rescaled_linear_forward(x, w, s_l, s_r, b, True)
                rl.rescaled_linear_forward(x, w, s_l, s_r, None, False)
                rl.rescaled_linear_backward(randn(m, n), x, w, s_l, s_r, True, True, False, True)
                rl.rescaled_linear_backward(randn(m, n), x, w, s_l, s_r, True, False, True, True)
            cases.append((f"rescaled_linear {name} M{m} K{k} N{n} r{r}", rescaled, True))

        # SVD delta: ViT-B q/v with k = 400 and a rank-1 basis.
        for m, k, n, rank in [(256, 768, 768, 400), (64, 760, 520, 1)]:
            def svd(m=m, k=k, n=n, rank=rank, randn=randn):
                x, w, u, v, d = randn(m, k), randn(n, k), randn(n, rank), randn(k, rank), randn(rank)
                sv.svd_delta_linear_forward(x, w, u, v, d, randn(n))
                sv.svd_delta_linear_backward(randn(m, n), x, w, u, v, d, True, True)
            cases.append((f"svd_delta_linear {name} M{m} K{k} N{n} k{rank}", svd, True))

        # Low-rank linear: LoRA (no G), AdaLoRA (diagonal G), FLoRA (full G), with and without dropout.
        for g_kind, dropout in [("none", False), ("diag", True), ("full", False)]:
            def lowrank(g_kind=g_kind, dropout=dropout, m=256, k=768, n=768, r=16, randn=randn):
                x, w, a, b = randn(m, k), randn(n, k), randn(n, r), randn(r, k)
                g = {"none": None, "diag": randn(r), "full": randn(r, r)}[g_kind]
                x_dropped = randn(m, k) if dropout else None
                lr.lowrank_linear_forward(x, x_dropped, w, a, g, b, randn(n), 2.0)
                lr.lowrank_linear_backward(randn(m, n), x, x_dropped, w, a, g, b, randn(m, r), 2.0,
                                           True, dropout, True, True, True, g is not None)
            cases.append((f"lowrank_linear {name} g={g_kind} dropout={dropout}", lowrank, True))

        # Head-mixing attention: the presets (ViT-B H12 d64, LLM H32 d128), ViT-B with attention
        # dropout (the hash mask's uint32 arithmetic), a small LLM (H8 d128), causal, a padding mask,
        # cross attention, d = 256, ViT-H's 16 heads of 80, and two that the fused kernels take in
        # float32 and float64 too (verify's and the fp64 gradchecks' sizes; 8 heads of 64 with dropout,
        # float32's limit), and 4 heads of 64 (the 16-bit limit on sm_86/sm_89).
        shapes = [(2, 12, 197, 197, 64, False, False, 0.0), (2, 12, 197, 197, 64, False, False, 0.1),
                  (1, 32, 256, 256, 128, True, False, 0.0), (1, 8, 256, 256, 128, True, False, 0.0),
                  (2, 4, 100, 77, 64, False, True, 0.0), (2, 12, 64, 64, 64, False, True, 0.0),
                  (1, 4, 128, 128, 256, False, False, 0.0), (1, 16, 128, 128, 80, False, False, 0.0),
                  (2, 3, 13, 13, 16, False, False, 0.0), (2, 8, 64, 64, 64, True, False, 0.1),
                  (2, 4, 64, 64, 64, True, False, 0.1)]
        for batch, heads, n_q, n_k, dim, causal, masked, dropout_p in shapes[:4] if quick else shapes:
            def attention(batch=batch, heads=heads, n_q=n_q, n_k=n_k, dim=dim, causal=causal, masked=masked,
                          dropout_p=dropout_p, randn=randn):
                q, k, v = randn(batch, heads, n_q, dim), randn(batch, heads, n_k, dim), randn(batch, heads, n_k, dim)
                mix = randn(heads, heads)
                mask = randn(batch, 1, 1, n_k).expand(batch, heads, n_q, n_k) if masked else None
                seed = torch.tensor([2**40 + 7], dtype=torch.int64) if dropout_p else None
                options = (dim ** -0.5, dropout_p, seed)
                out, lse = hm.head_mixing_attention_forward(q, k, v, mix, mask, causal, *options)
                hm.head_mixing_attention_backward(randn(*out.shape), q, k, v, mix, mask, lse, causal, *options)
            label = f"B{batch} H{heads} Nq{n_q} Nk{n_k} d{dim}" + (" causal" if causal else "") + (
                " mask" if masked else "") + (f" dropout {dropout_p}" if dropout_p else "")
            # The chunked strategy (too many heads · dims for the fused kernels) launches no kernel.
            plan = hm.strategy(heads, dim, dtype, masked, _common.shared_memory(torch.empty(0)))
            cases.append((f"head_mixing_attention {name} {label} ({plan})", attention, plan == "fused"))
    return cases


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    parser.add_argument("--dtype", action="append", choices=list(PRECISIONS),
                        help="repeatable (default: all; bfloat16 and float64 with --quick); float32 is IEEE, "
                             "float32+tf32 with torch.backends.cuda.matmul.allow_tf32")
    parser.add_argument("--only", metavar="TEXT", help="only the cases whose name contains TEXT")
    parser.add_argument("--quick", action="store_true", help="one config per launch and fewer attention shapes")
    parser.add_argument("--json", metavar="PATH", help="write every compiled kernel's record here")
    parser.add_argument("--shard", metavar="I/N", default="0/1",
                        help="only every N-th case from the I-th (0-based): N processes compile in parallel")
    args = parser.parse_args(argv)
    try:
        shard, shards = (int(part) for part in args.shard.split("/"))
        if not 0 <= shard < shards:
            raise ValueError
    except ValueError:
        parser.error(f"--shard must be I/N with 0 <= I < N, got {args.shard!r}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: it replaces the kernels by interpreted ones, which do not compile")

    from subspace_ops.triton_kernels import _common

    precisions = args.dtype or (["bfloat16", "float64"] if args.quick else list(PRECISIONS))
    records: list[Compiled] = []
    state = {"case": ""}
    try:
        _install_compile_only_triton(args.arch, args.quick, records.append, lambda: state["case"])
    except (ImportError, AttributeError) as error:
        print(f"this Triton's internals differ from what the script patches (Triton 3.8): {error}")
        return 2
    # The wrappers pick CUDA tiles and CUDA matmul precision for CUDA tensors; these are CPU tensors.
    _common.targets_gpu = lambda t: True
    _common._device_sms = lambda device: SMS.get(args.arch, 132)
    _common._device_shared_memory = lambda device: SHARED_LIMIT.get(args.arch, _common.SM90_SHARED_MEMORY)

    failed = False
    limit = SHARED_LIMIT.get(args.arch)
    print(f"Triton AOT compile for sm_{args.arch} (shared memory limit "
          f"{limit if limit else 'unknown'} bytes): {', '.join(precisions)}")
    for case, call, launches in _cases(precisions, args.quick)[shard::shards]:
        if args.only and args.only not in case:
            continue
        state["case"] = case
        first = len(records)
        call()
        mine = records[first:]
        if not launches or not mine:
            ok = launches == bool(mine)
            print(f"{'ok  ' if ok else 'FAIL'} {case}: {len(mine)} kernels compiled, expected "
                  f"{'some' if launches else 'none'}")
            failed |= not ok
            continue
        for kernel in dict.fromkeys(r.kernel for r in mine):
            runs = [r for r in mine if r.kernel == kernel]
            errors = [r for r in runs if r.error]
            ok = [r for r in runs if not r.error]
            fits = [r for r in ok if limit is None or r.shared <= limit]
            spills = [r for r in ok if r.stack_bytes]
            status = "ok  " if not errors and fits else "FAIL"
            failed |= status == "FAIL"
            detail = (f"{len(ok)}/{len(runs)} configs, shared <= {max((r.shared for r in ok), default=0)} B, "
                      f"regs <= {max((r.registers or 0 for r in ok), default=0)}, "
                      f"{sum(r.seconds for r in runs):.1f} s")
            print(f"{status} {case}: {kernel}: {detail}")
            for r in errors:
                print(f"       error [{r.config}]: {r.error}")
            if ok and not fits:
                print(f"       no config fits {limit} B of shared memory")
            for r in spills:
                print(f"       warning: {r.stack_bytes} B/thread stack frame (register spills) [{r.config}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in records], f, indent=1)
    print(f"{len(records)} kernels compiled for sm_{args.arch}: {'FAILED' if failed else 'all ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
