"""Token-by-token decoding through an adapted LLaMA-style decoder: what an unmerged adapter costs per
generated token next to the base model (CPU or GPU, random weights from a config).

    python benchmarks/decode_llama.py                                  # hidden 1024, 4 layers, all methods
    python benchmarks/decode_llama.py --hidden 4096 --layers 1 --methods rlrr,lora --json out.json

Each method is applied with its registry defaults (``subspace_ops.methods``) to a copy of the same
base model, its trained tensors moved off their initialization; a prompt of ``--prompt`` tokens is
prefilled, then ``--steps`` tokens are decoded one at a time with the KV cache (greedy), and the
median step is reported. Every method is timed twice in one run: with the fused backends (ours) and
with ``SUBSPACE_OPS_BACKEND=reference`` (the papers' formulas in PyTorch: naive); the base model is
the frozen layers. Rows are interleaved over ``--rounds`` rounds so drift hits all alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings

import torch

METHODS = ("rlrr", "ssb", "ia3", "lora", "dora", "siva", "sam-parser", "coeff")


def _model(hidden: int, layers: int, vocab: int) -> torch.nn.Module:
    import transformers

    mlp = (hidden * 8 // 3 + 63) // 64 * 64  # LLaMA's 8/3 · hidden, rounded up to 64
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 128),
                                      max_position_embeddings=4096)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _step_times(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> tuple[float, float]:
    """(prefill ms, median decode-step ms)."""
    with torch.no_grad():
        start = time.perf_counter()
        out = model(prompt, use_cache=True)
        prefill = time.perf_counter() - start
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - start)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return prefill * 1e3, statistics.median(times) * 1e3


def main(argv=None) -> dict:
    from subspace_ops import methods

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = _model(args.hidden, args.layers, args.vocab)
    models = {"base (frozen)": (base, None)}
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        adapted, _ = methods.apply(copy.deepcopy(base), name)
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for p in adapted.parameters():
                if p.requires_grad:
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
        models[f"{name} ours"] = (adapted, None)
        models[f"{name} naive"] = (adapted, "reference")
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(2))
    samples = {label: [] for label in models}
    saved = os.environ.get("SUBSPACE_OPS_BACKEND")
    try:
        for _ in range(args.rounds):
            for label, (model, backend) in models.items():
                if backend is None:
                    os.environ.pop("SUBSPACE_OPS_BACKEND", None)
                else:
                    os.environ["SUBSPACE_OPS_BACKEND"] = backend
                samples[label].append(_step_times(model, prompt, args.steps))
    finally:
        os.environ.pop("SUBSPACE_OPS_BACKEND", None)
        if saved is not None:
            os.environ["SUBSPACE_OPS_BACKEND"] = saved
    base_step = statistics.median(s[1] for s in samples["base (frozen)"])
    rows = []
    print(f"decode, LLaMA-style hidden {args.hidden} x {args.layers} layers, prompt {args.prompt}, "
          f"{torch.get_num_threads()} threads, ms (x base)")
    print(f"{'variant':22s} {'prefill ms':>11s} {'decode step ms':>15s}")
    for label, values in samples.items():
        prefill = statistics.median(v[0] for v in values)
        step = statistics.median(v[1] for v in values)
        rows.append(dict(variant=label, prefill_ms=prefill, step_ms=step, step_x_base=step / base_step))
        print(f"{label:22s} {prefill:11.1f} {step:9.2f} ({step / base_step:4.2f})")
    result = dict(config=vars(args), threads=torch.get_num_threads(), rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
