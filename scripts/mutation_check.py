"""Mutation check: does the test suite notice when a kernel or a layer is wrong?

Each mutant below is one small, plausible bug (a dropped factor, a block boundary off by one, a
guard removed, an init changed). The script writes it into the working tree, rebuilds the C++
extension if the mutant is in csrc/, runs the tests that should catch it, and puts the file back
(also on Ctrl-C). A mutant is *killed* when those tests fail; a *surviving* mutant is a bug the suite
would let through: add a test that kills it, then list it here.

    python scripts/mutation_check.py              # all (~45 min on 2 cores: each csrc/ mutant rebuilds)
    python scripts/mutation_check.py T6 C4        # some
    python scripts/mutation_check.py --list

Run it from an editable install (``pip install --no-build-isolation -e .``) with the mutated files
committed or unchanged: it refuses to touch a file with uncommitted changes. Exit status 1 if a
mutant survives. Not part of the test suite (it rewrites sources); run it after changing tests.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent

RL = "tests/test_rescaled_linear.py tests/test_triton_gpu_tiles.py"
SV = "tests/test_svd_delta_linear.py tests/test_triton_gpu_tiles.py"
HM = "tests/test_head_mixing_attention.py tests/test_triton_gpu_tiles.py"
LR = "tests/test_lowrank_linear.py tests/test_triton_gpu_tiles.py"
COEFF = "tests/test_coeff_layers.py tests/test_gradient_checkpointing.py tests/test_methods.py tests/test_timm_apply.py"
PA = "tests/test_peft_accelerate.py"
PEFT = "python/subspace_ops/peft.py"
VERIFY = "python/subspace_ops/verify.py"


class Mutant(NamedTuple):
    name: str
    path: str
    old: str
    new: str
    tests: str  # pytest arguments
    breaks: str
    avx512_only: bool = False  # only AVX-512 CPUs run the mutated code: elsewhere no test can kill it


MUTANTS = [
    # Triton kernels (run in the interpreter)
    Mutant("T1", "triton_kernels/rescaled_linear.py", "tl.sum(t * b[None, :], axis=1)", "tl.sum(t, axis=1)",
           RL + " -k triton", "ds_l epilogue loses its S_r factor"),
    Mutant("T2", "triton_kernels/rescaled_linear.py",
           "        w_ptrs += BLOCK_N * stride_wn\n        sl_ptrs += BLOCK_N * stride_sln\n",
           "        w_ptrs += BLOCK_N * stride_wn\n", RL + " -k triton",
           "gx uses the first S_l block for every N block"),
    Mutant("T3", "triton_kernels/rescaled_linear.py", "m_end = tl.minimum(M, m_start + M_CHUNK)",
           "m_end = tl.minimum(M, m_start + M_CHUNK + BLOCK_M)", RL + " -k triton",
           "M chunks of the scale gradients overlap"),
    Mutant("T5", "triton_kernels/svd_delta_linear.py",
           "scaled_u = (u.to(acc_dtype) * d.to(acc_dtype)[None, :]).to(u.dtype)", "scaled_u = u",
           SV + " -k triton", "W_eff ignores d"),
    Mutant("T6", "triton_kernels/head_mixing_attention.py",
           '        shift = tl.where(new_max == float("-inf"), 0.0, new_max)\n', "        shift = new_max\n",
           HM + " -k triton", "NaN when a row's first key block is fully masked (left padding)"),
    Mutant("T7", "triton_kernels/head_mixing_attention.py",
           "start = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M if IS_CAUSAL else 0",
           "start = (pid_n * BLOCK_N // BLOCK_M + 1) * BLOCK_M if IS_CAUSAL else 0", HM + " -k triton",
           "causal dK/dV skip the diagonal query block"),
    Mutant("T8", "triton_kernels/lowrank_linear.py", "            mask_r = offs_r < R - r0\n",
           "            mask_r = offs_r < R\n", LR + " -k triton", "ranks > 64 read past the factors"),
    Mutant("T9", "triton_kernels/head_mixing_attention.py",
           "            z += tl.where(heads[:, None] == h, z_h[None, :], 0.0)\n",
           "            z += tl.where(heads[None, :] == h, z_h[:, None], 0.0)\n", HM + " -k triton",
           "dmix transposed for H <= 4"),
    # C++ kernels (rebuilt)
    Mutant("C1", "csrc/head_mixing_attention.cpp",
           "if (new_max > running_max[r] && running_max[r] != kNegInf) sums[r] *= ",
           "if (false) sums[r] *= ", HM + " -k cpu", "online softmax sums not rescaled to a new max"),
    Mutant("C2", "csrc/head_mixing_attention.cpp", "std::exp(chunk_shift[r] - running_max[r]) / sums[r]",
           "T(1) / sums[r]", HM + " -k cpu", "key chunks not brought to the final row max"),
    Mutant("C3", "csrc/rescaled_linear.cpp", "        if (n0 == 0) {\n          at::mm_out(gx, gy_cols, w_mod);",
           "        if (n0 <= n_step) {\n          at::mm_out(gx, gy_cols, w_mod);",
           RL + " tests/test_ctest.py -k 'cpu or ctest'", "gx's second N block overwrites the first"),
    Mutant("C4", "csrc/svd_delta_linear.cpp", "u.narrow(0, n0, nb).to(acc)", "u.narrow(0, 0, nb).to(acc)",
           "tests/test_svd_delta_linear.py", "dd takes block 0's rows of U for every block of G"),
    Mutant("C5", "csrc/lowrank_linear.cpp", "      ga = p.mul_(g->mul(scaling));", "      ga = p.mul_(scaling);",
           LR + " -k cpu", "dA ignores a diagonal G"),
    Mutant("C6", "csrc/rescaled_linear_avx512.cpp", "(1u << std::max<int64_t>(count, 0)) - 1u",
           "(1u << std::max<int64_t>(count - 1, 0)) - 1u",
           "tests/test_rescaled_linear.py tests/test_ctest.py -k 'cpu or ctest'",
           "AVX-512 tails drop their last lane (AVX-512 CPUs only)", avx512_only=True),
    Mutant("C7", "csrc/head_mixing_gemm_kernels.inc",
           "  for (; i < rows; ++i) accumulate_block<1, DV>(a + i, lda, b, ldb, keys, c + i * ldc, ldc);\n",
           "", HM + " -k cpu", "O += M V (and dQ += dSᵀ K) skips an odd last query row"),
    Mutant("C9", "csrc/rescaled_linear_autograd.cpp", "return at::_unsafe_view(rescaled_linear_forward(",
           "return at::reshape(rescaled_linear_forward(", "tests/test_output_inplace.py -k 'cpu and rescaled'",
           "the C++ node's output is a view: y += b raises"),
    Mutant("C8", "csrc/head_mixing_attention.cpp", "dmix.addmm_(flat2d(t), flat2d(s).t());",
           "dmix.addmm_(flat2d(s), flat2d(t).t());", HM + " -k cpu", "dmix transposed"),
    # Python: references, layers, integrations, tools
    Mutant("P1", "python/subspace_ops/nn/svd.py",
           "chosen = torch.arange(sigma.numel() - k, sigma.numel(), device=sigma.device)",
           "chosen = torch.arange(0, k, device=sigma.device)", "tests/test_svd_layers.py",
           "SiVA tunes the largest singular values instead of the smallest"),
    Mutant("P2", "python/subspace_ops/reference.py",
           "(gram - torch.diag(torch.diagonal(gram))).square().sum()",
           "(gram - torch.diag(torch.diagonal(gram))).abs().sum()", "tests/test_reference.py tests/test_methods.py",
           "MPC_d's second term not squared"),
    Mutant("P3", "python/subspace_ops/reference.py",
           "head = int(torch.searchsorted(share, torch.tensor(perc, dtype=share.dtype) - 1e-12).item()) + 1",
           "head = int(torch.searchsorted(share, torch.tensor(perc, dtype=share.dtype) - 1e-12).item())",
           "tests/test_reference.py tests/test_svd_layers.py", "SiVA's perc rule off by one"),
    Mutant("P4", "python/subspace_ops/reference.py", "right = torch.cat([v[:, :r] + b, v[:, r:]], dim=1)",
           "right = torch.cat([v[:, :r] - b, v[:, r:]], dim=1)", "tests/test_reference.py tests/test_methods.py",
           "Spectral Adapter's V update sign"),
    Mutant("P5", "python/subspace_ops/checkpoint.py", "            live.copy_(saved)\n", "            pass\n",
           "tests/test_checkpoint.py", "a failed adapter load is not rolled back"),
    Mutant("P6", "python/subspace_ops/nn/rescaled.py", "            row, index = row + size, index + 1\n",
           "            row, index = row + size, index\n", "tests/test_rescaled_layers.py tests/test_methods.py",
           "k and v of a fused qkv share one input scale"),
    Mutant("P7", "python/subspace_ops/nn/lowrank.py", "(weight_sq + (2.0 * scaling) * cross",
           "(weight_sq + (1.0 * scaling) * cross", "tests/test_lowrank_layers.py tests/test_methods.py",
           "DoRA's row norm expansion"),
    Mutant("P8", "python/subspace_ops/nn/base.py", "                self.bias.data = bias.to(self.bias.dtype)\n",
           "                pass\n",
           "tests/test_rescaled_layers.py tests/test_svd_layers.py tests/test_lowrank_layers.py",
           "merge() drops the merged bias"),
    Mutant("P9", "python/subspace_ops/reference.py", "return eye + F.dropout(alpha, dropout_p, training)",
           "return eye + F.dropout(alpha, dropout_p, True)", "tests/test_reference.py tests/test_coeff_layers.py",
           "Coeff's dropout on alpha also in eval"),
    Mutant("P10", "python/subspace_ops/backends.py", "        requested = os.environ.get(ENV_VAR) or None\n",
           "        requested = None\n", "tests/test_rescaled_linear.py -k 'env or backend'",
           "SUBSPACE_OPS_BACKEND ignored"),
    Mutant("P12", "python/subspace_ops/transformers.py",
           "        attention_mask = attention_mask[:, :, :, : key.shape[2]]\n", "        pass\n", COEFF,
           "a mask wider than the keys (static cache) is not cut"),
    Mutant("P13", "python/subspace_ops/nn/attention.py", "return states.repeat_interleave(heads // kv_heads, dim=1)",
           "return states.repeat(1, heads // kv_heads, 1, 1)", COEFF, "GQA pairs query heads with the wrong kv heads"),
    Mutant("P14", "python/subspace_ops/methods.py", "        total = term if total is None else total + term\n",
           "        total = term\n", "tests/test_methods.py tests/test_lowrank_layers.py",
           "mpc_loss keeps only the last layer"),
    Mutant("P15", "python/subspace_ops/transformers.py", "        model.set_attn_implementation(previous)\n",
           "        pass\n", COEFF, "detach_head_mix leaves the coeff attention function on"),
    Mutant("P16", "python/subspace_ops/nn/attention.py", "        q, k = self.q_norm(q), self.k_norm(k)\n", "", COEFF,
           "timm qk_norm skipped"),
    Mutant("P18", "python/subspace_ops/nn/attention.py", "        if gate is not None:\n            x = x * gate\n", "",
           COEFF, "timm's gated attention output not gated"),
    Mutant("P19", "python/subspace_ops/cli.py", "    return 0 if all(o.passed for o in outcomes) else 1\n",
           "    return 0\n", "tests/test_verify.py", "verify exits 0 on a failure"),
    Mutant("P20", "python/subspace_ops/bench/harness.py", "r.ratio = r.median_ms / timing[base][0]",
           "r.ratio = timing[base][0] / r.median_ms", "tests/test_bench_cli.py", "bench ratios inverted"),
    Mutant("P21", "python/subspace_ops/ops/head_mixing_attention.py",
           "scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None", "scale = 1.0 / q.shape[-1] if scale is None",
           "tests/test_head_mixing_attention.py tests/test_coeff_layers.py", "default softmax scale"),
    Mutant("P22", "python/subspace_ops/nn/rescaled.py", "    nn.init.kaiming_uniform_(vector, a=math.sqrt(5))\n",
           "    nn.init.kaiming_uniform_(vector, a=0.0)\n", "tests/test_rescaled_layers.py", "RLRR's official init"),
    Mutant("P23", "python/subspace_ops/methods.py", '"scaled_parts": (False, True, True)}',
           '"scaled_parts": (True, True, True)}', "tests/test_methods.py tests/test_gpt2_conv1d.py",
           "(IA)3/SSL/SSB on a fused qkv also scale q"),
    Mutant("P24", "python/subspace_ops/nn/svd.py",
           "        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=rtol, atol=atol):",
           "        if False:", "tests/test_svd_layers.py tests/test_checkpoint.py",
           "an SVD adapter loads onto other weights"),
    Mutant("P25", "python/subspace_ops/checkpoint.py",
           '        if len(a["sums"]) != len(b["sums"]) or max(diffs) > tol:',
           "        if False:", "tests/test_checkpoint.py", "a checkpoint loads onto other base weights"),
    Mutant("P26", "python/subspace_ops/nn/rescaled.py", ".normal_(1.0, 0.02))", ".normal_(1.0, 0.2))",
           "tests/test_rescaled_layers.py", "SSF's official init"),
    # The PeftModel-like wrapper and the Triton backend's chunked head-mixing strategy
    Mutant("P27", "python/subspace_ops/peft_model.py",
           "{n: p.detach().clone() for n, p in live.items()}", "{n: p.detach() for n, p in live.items()}",
           "tests/test_peft_model.py", "set_adapter stores views that the next adapter overwrites"),
    Mutant("P28", "python/subspace_ops/peft_model.py", "                        original.bias = m.bias\n",
           "                        pass\n", "tests/test_peft_model.py",
           "merge_and_unload drops a merged bias the Linear did not have"),
    Mutant("P29", "python/subspace_ops/peft_model.py",
           "                unmerge_all(model)\n                raise ValueError(f\"safe_merge",
           "                raise ValueError(f\"safe_merge", "tests/test_peft_model.py",
           "safe_merge leaves the model merged with inf/NaN"),
    Mutant("P30", "python/subspace_ops/peft_model.py",
           "            for module, attr, p in reversed(swapped_params):\n"
           "                module._parameters[attr] = p\n",
           "", "tests/test_peft_model.py", "disable_adapter leaves the base weights swapped in"),
    Mutant("P31", "triton_kernels/head_mixing_chunked.py", 's.masked_fill(cols > rows, float("-inf"))',
           's.masked_fill(cols >= rows, float("-inf"))', "tests/test_head_mixing_attention.py -k chunked",
           "chunked causal mask hides the diagonal"),
    Mutant("P32", "triton_kernels/head_mixing_chunked.py",
           '        lse_rows = lse_rows.masked_fill(lse_rows == float("-inf"), float("inf"))\n', "",
           "tests/test_head_mixing_attention.py -k chunked", "chunked: NaN on fully masked rows"),
    Mutant("P33", "triton_kernels/head_mixing_chunked.py", "        dk += scale * (ds.transpose(-1, -2)",
           "        dk = scale * (ds.transpose(-1, -2)", "tests/test_head_mixing_attention.py -k chunked",
           "chunked dK keeps only the last query chunk"),
    Mutant("P34", "triton_kernels/head_mixing_chunked.py", 'return "fused" if row_bytes <= limit else "chunked"',
           'return "fused"', "tests/test_head_mixing_attention.py -k 'chunked or strategy'",
           "LLaMA-size heads sent to the fused kernels (shared-memory overflow on sm_90)"),
    # PEFT's own layers accelerated in place (subspace_ops.peft)
    Mutant("P37", PEFT, "            bias = None if bias is None else bias * scale\n", "", PA,
           "PEFT (IA)3 on attention: the output scale skips the bias"),
    Mutant("P38", PEFT, "dropout_p=p, training=dropout.training,", "dropout_p=p, training=True,", PA,
           "PEFT LoRA dropout also in eval"),
    Mutant("P41", PEFT, "b, bias, scaling=scaling, dropout_p=p,", "b, bias, scaling=scaling, dropout_p=0.0,", PA,
           "PEFT LoRA dropout dropped"),
    Mutant("P42", PEFT, "            scaling = float(self.scaling[name])", "            scaling = 1.0", PA,
           "PEFT LoRA / DoRA scaling (lora_alpha / r) dropped"),
    Mutant("P43", PEFT, "if self.is_feedforward:  # base(x", "if not self.is_feedforward:  # base(x", PA,
           "PEFT (IA)3 feedforward and attention layers swapped"),
    Mutant("P44", PEFT, "weight = base.weight.t() if self.fan_in_fan_out else base.weight", "weight = base.weight",
           PA, "GPT-2 Conv1D base weight read untransposed"),
    Mutant("P45", PEFT, "        dtype = compute_dtype(x, base.weight)\n", "        dtype = base.weight.dtype\n", PA,
           "autocast ignored by the accelerated layers"),
    Mutant("P46", PEFT, '    if layer.disable_adapters:\n        return "adapters are disabled"\n', "", PA,
           "disable_adapter() still runs the adapter"),
    Mutant("P47", PEFT, "    if layer.merged:\n", "    if False:\n", PA, "a merged adapter is added a second time"),
    Mutant("P48", PEFT, "    if args or any(v is not None for v in kwargs.values()):", "    if args:", PA,
           "adapter_names= (mixed batches) ignored"),
    Mutant("P49", PEFT, "    elif variant is not None:", "    elif False:", PA,
           "another LoRA variant (aLoRA) run as plain LoRA"),
    Mutant("P50", PEFT, "        if len(names) > 1:", "        if False:", PA,
           "only the first of several active adapters applied"),
    Mutant("P51", PEFT, "dora_linear(x, weight, a, b, self.lora_magnitude_vector[name].weight, bias,",
           "dora_linear(x, weight, a, b, torch.ones_like(self.lora_magnitude_vector[name].weight), bias,", PA,
           "accelerated DoRA ignores its magnitude vector"),
    Mutant("P52", PEFT, "    if _hooked(base):", "    if False:", PA,
           "a base layer's hooks (e.g. an offload hook) not called"),
    Mutant("P53", PEFT, "    if _global_module_hooks():", "    if False:", PA,
           "global nn.Module hooks do not see the base layers"),
    # Dropout masks from torch's RNG: what torch.manual_seed fixes and activation checkpointing replays
    Mutant("P54", "python/subspace_ops/ops/lowrank_linear.py",
           "    x_dropped = F.dropout(x, dropout_p, True) if training and dropout_p > 0 else None",
           "    x_dropped = (x * (torch.rand(x.shape, generator=torch.Generator().manual_seed("
           "__import__('random').getrandbits(62))) >= dropout_p) / (1 - dropout_p)) "
           "if training and dropout_p > 0 else None",
           "tests/test_gradient_checkpointing.py -k lora", "LoRA's dropout mask drawn from Python's RNG"),
    Mutant("P55", "python/subspace_ops/reference.py", "    return eye + F.dropout(alpha, dropout_p, training)",
           "    return eye + ((alpha * (torch.rand(alpha.shape, generator=torch.Generator().manual_seed("
           "__import__('random').getrandbits(62))) >= dropout_p) / (1 - dropout_p)) "
           "if training and dropout_p > 0 else alpha)",
           "tests/test_gradient_checkpointing.py -k coeff", "Coeff's dropout on alpha drawn from Python's RNG"),
    # torch.export: speed-only size comparisons must not guard a dynamic dimension
    Mutant("P61", "python/subspace_ops/ops/svd_delta_linear.py",
           "    tokens = size_for_choice(x.numel() // max(x.shape[-1], 1))\n",
           "    tokens = x.numel() // max(x.shape[-1], 1)\n", "tests/test_export.py -k siva",
           "export: the SVD path choice pins a dynamic batch"),
    Mutant("P62", "python/subspace_ops/ops/rescaled_linear.py",
           "    if size_for_choice(a.shape[0]) >= size_for_choice(b.shape[1]):", "    if a.shape[0] >= b.shape[1]:",
           "tests/test_export.py -k ia3", "export: the separable path's operand choice pins a dynamic batch"),
    Mutant("P63", "python/subspace_ops/nn/lowrank.py",
           "    parts = [t.detach() if detach else t for t in (weight, a, b)]\n"
           "    return dora_row_norm(*(t.to(acc) for t in parts), scaling)",
           "    with torch.set_grad_enabled(not detach):\n"
           "        return dora_row_norm(*(t.to(acc) for t in (weight, a, b)), scaling)",
           "tests/test_export.py -k dora", "export: DoRA's detached norm as a grad-mode switch"),
    Mutant("P64", "python/subspace_ops/ops/lowrank_linear.py", "    if not -math.inf < scaling < math.inf:",
           "    if not math.isfinite(scaling):", "tests/test_export.py -k 'compiles and lora'",
           "compile(dynamic=True): LoRA's scaling checked by math.isfinite (graph break)"),
    Mutant("P65", "python/subspace_ops/nn/svd.py",
           "        atol = 1e-6 * float(ours.max()) if coarsest < 1e-4 else coarsest * float(ours.norm())\n",
           "        atol = 1e-6 * float(ours.max())\n", "tests/test_svd_layers.py tests/test_checkpoint.py",
           "an SVD adapter trained in bf16 refused by the float32 weights it came from"),
    # Double backward through a fused op is refused, never silently wrong
    Mutant("P66", "python/subspace_ops/ops/rescaled_linear.py",
           '        refuse_double_backward("rescaled_linear (stacked path)")\n', "",
           "tests/test_double_backward.py", "stacked rescaled path: wrong second derivatives"),
    Mutant("P67", "python/subspace_ops/ops/lowrank_linear.py", '    refuse_double_backward("lowrank_linear")\n', "",
           "tests/test_double_backward.py", "lowrank_linear: wrong second derivatives"),
    Mutant("P68", "python/subspace_ops/_validate.py", "    if torch.is_grad_enabled():",
           "    if torch.is_grad_enabled() and False:", "tests/test_double_backward.py",
           "no fused backward refuses create_graph=True"),
    Mutant("P69", "python/subspace_ops/reference.py", "    if n_k == 0:  # no keys at all",
           "    if False:  # no keys at all", "tests/test_empty_inputs.py",
           "reference head mixing with no keys: amax of nothing"),
    Mutant("P70", "python/subspace_ops/transformers.py",
           '    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names', "    return False",
           "tests/test_transformers_vision.py -k head_mixing", "transformers vision encoders get no head mix"),
    Mutant("P71", "python/subspace_ops/nn/base.py", "            return getattr(getattr(self, self._wrapped), name)\n",
           "            raise\n", "tests/test_transformers_vision.py -k 'vit and rlrr'",
           "SSF hides the wrapped patch embedding's attributes from the model's code"),
    Mutant("P72", "python/subspace_ops/adapters.py", '    for name in ("proj", "projection"):',
           '    for name in ("proj",):', "tests/test_transformers_vision.py -k ssf",
           "transformers patch embeddings (projection) get no SSF"),
    Mutant("P73", "python/subspace_ops/adapters.py", '        channels_first = type(module).__name__.endswith("2d")',
           "        channels_first = False", "tests/test_timm_apply.py -k convnext",
           "SSF after timm's LayerNorm2d scales the width instead of the channels"),
    Mutant("P74", "python/subspace_ops/adapters.py", "    if isinstance(module, SSF):  # already adapted",
           "    if False:  # already adapted", "tests/test_timm_apply.py -k already",
           "SSF applied twice wraps the SSF of a patch embedding (a KeyError midway)"),
    # diffusers: the Coeff attention processor and its attach / restore
    Mutant("P75", "python/subspace_ops/nn/attention.py", "        if attn.residual_connection:\n            out = out + residual\n",
           "", "tests/test_diffusers.py -k processor", "processor drops the VAE attention's residual"),
    Mutant("P76", "python/subspace_ops/nn/attention.py",
           "            attention_mask = attn.prepare_attention_mask(attention_mask, key_tokens, batch)\n"
           "            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])\n",
           "            attention_mask = None\n", "tests/test_diffusers.py", "processor ignores the text padding mask"),
    Mutant("P77", "python/subspace_ops/nn/attention.py", "        elif attn.norm_cross:", "        elif False:",
           "tests/test_diffusers.py -k processor", "processor skips cross_attention_norm"),
    Mutant("P78", "python/subspace_ops/nn/attention.py", "scale=attn.scale)", "scale=None)",
           "tests/test_diffusers.py -k processor", "processor ignores the module's attention scale"),
    Mutant("P79", "python/subspace_ops/diffusers.py",
           "        if type(processor).__name__ not in _SUPPORTED:",
           "        if False:", "tests/test_diffusers.py -k refused", "fused / custom processors silently replaced"),
    Mutant("P80", "python/subspace_ops/methods.py",
           "        diffusers_integration.set_processors(model, processors)  # before _modules: a processor may be one\n",
           "", "tests/test_diffusers.py -k failed_load", "a failed load leaves head-mix processors in the UNet"),
    Mutant("P81", "python/subspace_ops/peft_model.py",
           "            diffusers_integration.set_processors(model, self._processors_before)\n            live =",
           "            live =", "tests/test_diffusers.py -k peft_model", "disable_adapter still mixes heads"),
    Mutant("P82", "python/subspace_ops/adapters.py",
           "    return _layer_parameter_ids(model, wrapped=False) | _peft_adapter_parameter_ids(model)",
           "    return _layer_parameter_ids(model, wrapped=False)", "tests/test_diffusers.py -k lora",
           "a method applied after PEFT freezes PEFT's LoRA"),
    Mutant("P83", "python/subspace_ops/adapters.py", ' or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)',
           " for p in patterns)", "tests/test_diffusers.py -k lora",
           "a dotted pattern (to_out.0) matches only full names, unlike PEFT's target_modules"),
    # timm families: layers their parents do not call; SSF after a patch embedding that ends in a norm
    Mutant("P84", "python/subspace_ops/adapters.py", "    _route_qkv_through_layer(model)\n    return report\n",
           "    return report\n", "tests/test_timm_apply.py -k separate",
           "adapters on BEiT/EVA/Swin-V2's qkv silently skipped"),
    Mutant("P85", "python/subspace_ops/adapters.py", "    for name, _ in found:\n        _check_called(model, name)\n",
           "", "tests/test_timm_apply.py -k read_directly", "an adapter on a layer read as .weight is ignored"),
    Mutant("P86", "python/subspace_ops/adapters.py",
           'fold_into="norm" if _patch_norm(module) is not None else name)', "fold_into=name)",
           "tests/test_timm_apply.py -k swin", "SSF after Swin's patch embedding merges before its norm"),
    Mutant("P87", "python/subspace_ops/adapters.py",
           '        if _patch_norm(module) is not None and f"{name}.norm" in names:\n            continue\n', "",
           "tests/test_timm_apply.py -k swin", "two SSFs in a row after Swin's patch embedding"),
    Mutant("P88", "python/subspace_ops/adapters.py",
           "            others.append((name, m))",
           "            sdpa.append((name, m))",
           "tests/test_timm_apply.py -k coeff_refuses", "coeff replaces (and breaks) attention it cannot reproduce"),
    Mutant("P89", "python/subspace_ops/ops/_sizes.py",
           "    return torch.ops.aten._unsafe_view(y if y.is_contiguous() else y.contiguous(), shape)",
           "    return y.reshape(shape)", "tests/test_output_inplace.py", "op outputs are views: y += b raises"),
    # Coeff on timm attention that calls SDPA (Swin, BEiT, EVA, ...)
    Mutant("P90", "python/subspace_ops/nn/sdpa_head_mixing.py", 'attn_mask=options.get("attn_mask"),',
           "attn_mask=None,", "tests/test_timm_apply.py -k coeff_mixes",
           "Swin's relative bias and shift mask dropped from the mixed attention"),
    Mutant("P91", "python/subspace_ops/nn/sdpa_head_mixing.py",
           "            vars(mixed)[key] = copy.copy(value)\n", "            pass\n", "tests/test_timm_apply.py -k swin", "the copy shares containers: the original block gets head_mix"),
    Mutant("P92", "python/subspace_ops/nn/sdpa_head_mixing.py",
           "    if (route.calls < 1 if sums else route.calls != 1) and not",
           "    if False and not", "tests/test_timm_apply.py -k swin", "a block that skips SDPA ignores α silently"),
    Mutant("P93", "python/subspace_ops/adapters.py", ' and not getattr(type(m), "_holds_backbone", False)', "",
           "tests/test_timm_apply.py -k coeff_mixes", "BEiT's q/v biases and bias tables counted (and kept) as adapter"),
    Mutant("P94", "python/subspace_ops/nn/sdpa_head_mixing.py", "        mixed.fused_attn = True\n",
           "        pass\n", "tests/test_timm_apply.py -k swin", "under TIMM_FUSED_ATTN=0 the copy never calls SDPA"),
    # Coeff on diffusers processors whose SDPA call is routed (SD3 joint attention, Flux, fused q/k/v)
    Mutant("P95", "python/subspace_ops/nn/sdpa_head_mixing.py", '        mixed._attention_backend = "native"\n',
           "        pass\n", "tests/test_diffusers.py -k native",
           "a routed Flux processor under another attention backend never calls SDPA"),
    Mutant("P96", "python/subspace_ops/nn/sdpa_head_mixing.py", "        __call__.__wrapped__ = cls.__call__\n",
           "        pass\n", "tests/test_diffusers.py -k routed",
           "the copy's signature hides the processor's: diffusers drops its keyword arguments"),
    Mutant("P97", "python/subspace_ops/nn/sdpa_head_mixing.py",
           'query, key, value = options["query"], options["key"], options["value"]',
           "query, key, value = args[:3]", "tests/test_diffusers.py -k flux",
           "SDPA called with q, k, v by name (diffusers' native backend) fails"),
    Mutant("P98", "python/subspace_ops/diffusers.py", "        if type(module.processor).__name__ in _DEFAULT_PROCESSORS:",
           "        if True:", "tests/test_diffusers.py -k routed",
           "SD3 / Flux / fused processors replaced by the default one (text stream and rotary dropped)"),
    Mutant("P99", "python/subspace_ops/diffusers.py",
           "    return isinstance(processor, CoeffAttnProcessor) or is_head_mixing(processor)",
           "    return isinstance(processor, CoeffAttnProcessor)", "tests/test_diffusers.py -k dit",
           "detach / unload leave routed head-mix processors in SD3 and Flux"),
    Mutant("P100", "python/subspace_ops/diffusers.py", "    return Attention, AttentionModuleMixin",
           "    return (Attention,)", "tests/test_diffusers.py -k dit", "Flux's FluxAttention modules not found"),
    Mutant("P101", "python/subspace_ops/nn/sdpa_forms.py", "    if mask is not None:  # [windows, N, N]",
           "    if False:  # [windows, N, N]", "tests/test_timm_apply.py -k swin_v2",
           "Swin-V2's shifted-window mask dropped from its SDPA form"),
    Mutant("P102", "python/subspace_ops/nn/sdpa_forms.py", "F.normalize(q, dim=-1) * logit_scale,",
           "F.normalize(q, dim=-1) * logit_scale.mean(),", "tests/test_timm_apply.py -k swin_v2",
           "Swin-V2's per-head logit scale averaged over heads"),
    # Coeff on diffusers processors that sum several attentions (IP-Adapter, Wan image-to-video)
    Mutant("P108", "python/subspace_ops/diffusers.py",
           "                sums_attentions=type(module.processor).__name__ in SUMMED_ATTENTION_PROCESSORS)",
           "                sums_attentions=False)", "tests/test_diffusers.py -k 'ip or i2v'",
           "IP-Adapter / Wan image-to-video processors (several SDPA calls) fail at the first forward"),
    Mutant("P111", "python/subspace_ops/nn/sdpa_head_mixing.py", "route.calls < 1 if sums", "route.calls < 0 if sums",
           "tests/test_diffusers.py -k wrong_number", "a summing processor that makes no SDPA call ignores α silently"),
    Mutant("P112", "python/subspace_ops/nn/sdpa_head_mixing.py",
           "        if query.transpose(1, 2).is_contiguous():\n", "        if False:\n",
           "tests/test_diffusers.py -k 'sd3 and ip'",
           "the routed output is not in SDPA's layout: SD3's IP-Adapter processor fails to view it"),
    Mutant("P113", "python/subspace_ops/nn/sdpa_head_mixing.py", '    vars(mixed)["replaced"] = processor',
           "    mixed.replaced = processor", "tests/test_diffusers.py -k 'saves_loads and ip'",
           "the replaced IP-Adapter processor is a submodule: its weights appear twice in the state dict"),
    Mutant("P114", "python/subspace_ops/nn/sdpa_head_mixing.py",
           "    if issubclass(cls, nn.Module) and cls.__call__ is nn.Module.__call__:",
           "    if issubclass(cls, nn.Module):", "tests/test_diffusers.py -k 'routed and ip'",
           "an nn.Module processor (IP-Adapter) gets its forward wrapped, not its __call__: α ignored"),
    Mutant("P115", "python/subspace_ops/peft_model.py", "            if missing:  # e.g. diffusers' load_ip_adapter",
           "            if False:  # e.g. diffusers' load_ip_adapter", "tests/test_diffusers.py -k replaced_after",
           "a wrapper whose Coeff processors were replaced saves an adapter without α"),
    Mutant("P116", "python/subspace_ops/methods.py",
           "    + DIFFUSERS_Q + DIFFUSERS_K + DIFFUSERS_V + DIFFUSERS_ATTENTION_OUT + DIFFUSERS_FFN_OUT + (", "    + (",
           "tests/test_diffusers.py -k every_method", "methods by name adapt only a diffusers model's ff.net.0.proj"),
    Mutant("P117", "python/subspace_ops/methods.py",
           "              ) + FUSED_KV + HF_K + HF_V + DIFFUSERS_K + DIFFUSERS_V",
           "              ) + FUSED_KV + HF_K + HF_V", "tests/test_diffusers.py -k every_method",
           "(IA)³ / SSL / SSB by name find no key or value projection in a diffusers model"),
    Mutant("P118", "python/subspace_ops/diffusers.py",
           "            if type(processor).__name__ in _MEMORY_SAVING_PROCESSORS:", "            if False:",
           "tests/test_diffusers.py -k refused", "the sliced / xFormers refusal does not say how to go on"),
    # default targets across model families: the trained head, fused q, k, v layouts, wrapped modules' calls
    Mutant("P119", "python/subspace_ops/adapters.py",
           '    return lambda name: any(name == s or name.startswith(s + ".") for s in skipped)',
           "    return lambda name: False",
           "tests/test_transformers_families.py -k trainable_module",
           "layers inside the fully trained head get adapters (SVD methods then refuse the head's gradient)"),
    Mutant("P120", "python/subspace_ops/adapters.py", "    if declared is not None and sum(declared) == out:",
           "    if False:", "tests/test_transformers_families.py -k 'fused_qkv_splits or grouped_query or phi3'",
           "a grouped-query fused qkv split into equal thirds (scales on query rows)"),
    Mutant("P121", "python/subspace_ops/adapters.py", '    if last != "c_attn" and _qkv_per_head(parent):',
           "    if False:", "tests/test_timm_families.py -k per_head",
           "a qkv laid out per head (TinyViT, MaxViT *_rw) split into [q; k; v] thirds"),
    Mutant("P122", "python/subspace_ops/nn/rescaled.py",
           "        if isinstance(y, tuple):  # transformers' Swin patch embeddings return (tokens, their grid size)",
           "        if False:", "tests/test_transformers_families.py -k swin",
           "SSF after transformers' Swin patch embeddings fails on their (tokens, size) output"),
    Mutant("P123", "python/subspace_ops/nn/rescaled.py", "        y = self.inner(x, *args, **kwargs)",
           "        y = self.inner(x)", "tests/test_timm_families.py -k keyword",
           "SSF drops the keyword arguments of the module it wraps (Hiera's patch_embed(x, mask=...))"),
    Mutant("P124", "python/subspace_ops/adapters.py",
           '        return SSF(module, weight.shape[0], channel_dim=1 if type(module).__name__.endswith("2d") else -1)',
           "        return SSF(module, weight.shape[0])", "tests/test_timm_families.py -k rms",
           "SSF after timm's channels-first RmsNorm2d scales the last dimension"),
    Mutant("P125", "python/subspace_ops/adapters.py",
           "    reads_weight = isinstance(parent, nn.MultiheadAttention) or _forward_reads_weight(type(parent), child)",
           "    reads_weight = _forward_reads_weight(type(parent), child)",
           "tests/test_transformers_families.py -k multihead",
           "an adapter on nn.MultiheadAttention's out_proj, which its forward never calls"),
    Mutant("P126", "python/subspace_ops/nn/adapters.py", "class SequentialAdapter(ForwardsAttributes, nn.Module):",
           "class SequentialAdapter(nn.Module):", "tests/test_transformers_families.py -k 'houlsby and t5'",
           "the Houlsby adapter hides its layer's attributes (T5 reads wo.weight.dtype)"),
    Mutant("P127", "python/subspace_ops/methods.py", "        return self.trainable + self.exclude",
           "        return self.trainable", "tests/test_timm_families.py -k relative_position",
           "exclude ignored: relative-position MLPs adapted (the Spectral Adapter refuses the whole model)"),
    Mutant("P128", "python/subspace_ops/peft.py",
           '    hooked = [label for label, m in (("lora_A", lora_a), ("lora_B", lora_b)) if in_call and _hooked(m)]',
           "    hooked = []", "tests/test_peft_accelerate.py -k hooks_on_the_adapters",
           "hooks on PEFT's lora_A / lora_B skipped by the fused path, silently"),
    Mutant("P129", "python/subspace_ops/peft.py", "            active, reason = fused._active_adapter(module, in_call=False)",
           "            active, reason = fused._active_adapter(module, in_call=True)",
           "tests/test_peft_accelerate.py -k state_at_accelerate_time",
           "a layer merged / hooked / with two active adapters at accelerate() stays PEFT's for good"),
    # transformers: T5's relative position bias; models that do not run on SDPA
    Mutant("P109", "python/subspace_ops/transformers.py", "    if position_bias is not None:  # T5",
           "    if False:  # T5", "tests/test_coeff_layers.py -k t5", "T5's relative position bias dropped by Coeff"),
    Mutant("P110", "python/subspace_ops/transformers.py", '    if getattr(model, "_supports_sdpa", True) is False:',
           "    if False:", "tests/test_coeff_layers.py -k sinks",
           "Coeff attached to a model whose attention SDPA cannot compute (Gemma 2 soft-capping, GPT-OSS sinks)"),
    # PEFT's DoRA on the fused op (subspace_ops.peft.accelerate)
    Mutant("P103", "python/subspace_ops/peft.py", "                              detach_norm=True, backend=backend)",
           "                              detach_norm=False, backend=backend)",
           "tests/test_peft_accelerate.py -k dora", "accelerated DoRA differentiates its norm (PEFT detaches it)"),
    Mutant("P104", "python/subspace_ops/peft.py",
           "    if in_call and layer.training and type(layer.lora_dropout[name]) is not nn.Identity:",
           "    if False:", "tests/test_peft_accelerate.py -k dora",
           "DoRA with dropout in training fused (PEFT scales W·dropout(x) then)"),
    Mutant("P105", "python/subspace_ops/nn/lowrank.py",
           "    scale = (magnitude.to(acc) / _dora_norm(weight, a, b, scaling, acc, detach_norm)).to(dtype)",
           "    scale = (magnitude.detach().to(acc) / _dora_norm(weight, a, b, scaling, acc, detach_norm)).to(dtype)",
           "tests/test_peft_accelerate.py -k dora tests/test_lowrank_layers.py -k dora",
           "DoRA's magnitude gets no gradient"),
    Mutant("P106", "python/subspace_ops/peft.py",
           "            factor = self.scaling[name] / (self.ranknum[name] + 1e-5)",
           "            factor = self.scaling[name] / 3.0", "tests/test_peft_accelerate.py -k adalora",
           "accelerated AdaLoRA ignores the rank allocator's ranknum"),
    Mutant("P107", "python/subspace_ops/peft.py",
           "                    bias = lora_bias if bias is None else bias + lora_bias\n", "                    pass\n",
           "tests/test_peft_accelerate.py -k lora_matches", "PEFT's lora_bias dropped by the fused LoRA"),
    # subspace-ops verify: what it compares
    Mutant("P56", VERIFY, "                    for name, t in truth.items():",
           "                    for name, t in list(truth.items())[:1]:", "tests/test_verify.py",
           "verify: gradients not compared"),
    Mutant("P57", VERIFY, "                    outcome.passed = False\n", "", "tests/test_verify.py",
           "verify: a crashing kernel passes"),
    Mutant("P58", VERIFY,
           "    return [d for d in requested if not (interpreted and d in (torch.float16, torch.bfloat16))]",
           "    return [d for d in requested if d == torch.float32]", "tests/test_verify.py",
           "verify: bfloat16 never checked"),
    Mutant("P59", VERIFY, 'truth = _forward_and_grads(check, "reference", torch.float64, device)',
           'truth = _forward_and_grads(check, "reference", torch.float32, device)', "tests/test_verify.py",
           "verify: the truth computed in float32"),
    Mutant("P60", VERIFY,
           "    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)",
           "    grad_out = torch.ones(out.shape, dtype=torch.float64)", "tests/test_verify.py",
           "verify: an upstream gradient of ones (blind to mixed-up rows)"),
    # The tolerance rule every comparison uses (subspace_ops.testing)
    Mutant("P39", "python/subspace_ops/testing.py", "bound += 2.0 * max_error(", "bound += 20.0 * max_error(",
           "tests/test_verify.py", "tolerance: 20x the reference's own low-precision error"),
    Mutant("P40", "python/subspace_ops/testing.py", "    torch.bfloat16: 1.6e-2,\n", "    torch.bfloat16: 1.6e-1,\n",
           "tests/test_verify.py", "tolerance: a 10x looser bf16 floor"),
    # Distributed
    Mutant("P35", "python/subspace_ops/adapters.py", "nn.Parameter(weight.detach().contiguous(),",
           "nn.Parameter(weight.detach(),", "tests/test_gpt2_conv1d.py tests/test_distributed.py",
           "Conv1D weight views stay non-contiguous (FSDP2 refuses them)"),
    Mutant("P36", "python/subspace_ops/checkpoint.py", "        t = t.full_tensor()\n", "        t = t.to_local()\n",
           "tests/test_distributed.py", "an FSDP2 save writes one rank's shard"),
    # session 19: CLI backends/version, export without guards, PEFT DoRA 1-D, IP-Adapter scale, SSF bias-free merge,
    # Coeff on timm's attention pooling, MoE expert adapters (target_parameters) and their PEFT-style wrapper
    Mutant('P131', 'python/subspace_ops/backends.py',
           '    return table + _env_override_report(device_types)',
           '    return table',
           'tests/test_bench_cli.py -k reports_the_env_override',
           "`subspace-ops backends` ignores SUBSPACE_OPS_BACKEND (no override lines: the table's default looks in use)"),
    Mutant('P132', 'python/subspace_ops/bench/cases.py',
           '        taken = "" if chosen == "reference" else f" {path or choose_path(residual, 1, dtype, shape[0], ch'
           'osen)}"',
           '        taken = f" {path or choose_path(residual, 1, dtype, shape[0], chosen)}"',
           'tests/test_bench_cli.py -k name_no_path',
           'bench rows of rescaled/scaled-linear on the reference backend carry a path label (modulated/stacked) it d'
           'oes not take'),
    Mutant('P133', 'python/subspace_ops/bench/cases.py',
           '        taken = "" if chosen == "reference" else f" {choose_path(shape[0], shape[2], shape[1])}"',
           '        taken = f" {choose_path(shape[0], shape[2], shape[1])}"',
           'tests/test_bench_cli.py -k name_no_path',
           'bench rows of svd-delta-linear on the reference backend carry a merged/unmerged label it does not take'),
    Mutant('P134', 'python/subspace_ops/cli.py',
           '_backend_problem(b, device) for b in args.backend or [None]',
           '_backend_problem(None, device) for b in args.backend or [None]',
           'tests/test_verify.py -k refuses_a_backend',
           '`verify --backend triton` where triton cannot run prints ERROR rows instead of refusing up front (exit 2)'),
    Mutant('P135', 'python/subspace_ops/cli.py',
           '    return f"argument --backend: {problem}" if problem and backend is not None else problem',
           '    return f"argument --backend: {problem}" if problem and backend is not None else ""',
           'tests/test_bench_cli.py tests/test_verify.py -k refuses_a_backend',
           'an invalid/unavailable SUBSPACE_OPS_BACKEND makes bench/verify run (failed rows) instead of refusing up f'
           'ront'),
    Mutant('P136', 'python/subspace_ops/cli.py',
           "applies to the end-to-end cases ({', '.join(_per_method_cases())}), ",
           'applies to the end-to-end cases (e2e, e2e-llama), ',
           'tests/test_bench_cli.py -k methods_error',
           'the --methods error names a hard-coded list of cases (missing e2e-unet, e2e-flux)'),
    Mutant('P137', 'python/subspace_ops/cli.py',
           '    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")',
           '    pass',
           'tests/test_bench_cli.py -k test_version',
           '`subspace-ops --version` / `python -m subspace_ops --version` missing'),
    Mutant('P138', 'python/subspace_ops/ops/_sizes.py',
           'return _optimization_hint(size)',
           'return _legacy_optimization_hint(size)',
           'tests/test_export.py -k test_strict_export',
           'strict torch.export (Dynamo) of RLRR / SVD methods / (IA)³ with a dynamic token count fails: the speed-on'
           'ly path choice reads the symbolic size (Dynamo cannot read .node.hint) and guards it to one side of the b'
           'ound'),
    Mutant('P139', 'python/subspace_ops/ops/rescaled_linear.py',
           'return stacked.view(count, -1, stacked.shape[-1]).unbind()',
           'return stacked.chunk(count)',
           'tests/test_export.py -k decode',
           "non-strict export of RLRR from a decode-sized example fails: the stacked path's chunk specializes the seq"
           'uence length'),
    Mutant('P140', 'python/subspace_ops/peft.py',
           'return out.unsqueeze(0) if x.dim() == 1 else out',
           'return out',
           'tests/test_peft_accelerate.py -k one_dimensional',
           'accelerated PEFT DoRA returns [out] for a 1-D input where PEFT returns [1, out]'),
    Mutant('P141', 'python/subspace_ops/diffusers.py',
           '            carry_processor_state(module.processor, module.processor.replaced)\n',
           '',
           'tests/test_diffusers.py -k ip_adapter_scale',
           'detach_head_mix puts back the IP-Adapter processor with the scale it had at attach time, losing one set s'
           'ince'),
    Mutant('P142', 'python/subspace_ops/diffusers.py',
           'carry_processor_state(module.processor, by_name[name])\n',
           'pass\n',
           'tests/test_diffusers.py -k ip_adapter_scale',
           'set_processors between a head-mix processor and the one it replaced drops the IP-Adapter scale set on the'
           ' current one'),
    Mutant('P143', 'python/subspace_ops/nn/rescaled.py',
           'if bias is not None else self._takes_new_bias(target)',
           'if bias is not None else False',
           'tests/test_rescaled_layers.py -k bias_free',
           'SSF after a bias-free Conv2d/Linear (timm CLIP-style patch embedding) cannot merge, so merge_all refuses '
           'the whole model'),
    Mutant('P144', 'python/subspace_ops/nn/rescaled.py',
           '        if bias is None:  # the bias merge() created goes: the layer is bias-free again, state_dict keys '
           'included\n            target.bias = None\n        else:\n            target.bias.data = bias\n',
           '        if bias is not None:\n            target.bias.data = bias\n',
           'tests/test_rescaled_layers.py -k bias_free',
           'SSF unmerge leaves the bias merge() created on a bias-free layer (weights and state_dict not restored exa'
           'ctly)'),
    Mutant('P145', 'python/subspace_ops/nn/rescaled.py',
           'type(target).forward in (nn.Linear.forward, nn.Conv2d.forward)',
           'True',
           'tests/test_rescaled_layers.py -k own_forward',
           'SSF merges β as a new bias into a Conv2d subclass whose own forward ignores it (silently wrong merged out'
           'put)'),
    Mutant('P146', 'python/subspace_ops/nn/experts.py',
           'return "in_out" if flag else "out_in"',
           'return "out_in" if flag else "in_out"',
           'tests/test_moe_experts.py -k hand_reference',
           'expert layout read backwards: [E, in, out] adapted as [E, out, in] (or the reverse)'),
    Mutant('P147', 'python/subspace_ops/nn/experts.py',
           'return a * g[:, None, :] if self.g_kind == "diag" else torch.bmm(a, g)',
           'return a if self.g_kind == "diag" else torch.bmm(a, g)',
           'tests/test_moe_experts.py -k hand_reference',
           'diagonal G (AdaLoRA/TriLoRA) ignored on expert parameters'),
    Mutant('P148', 'python/subspace_ops/nn/experts.py',
           'return torch.baddbmm(weight, up, down, alpha=self.scaling)',
           'return torch.baddbmm(weight, up, down)',
           'tests/test_moe_experts.py -k hand_reference',
           'scaling alpha/rank dropped from the expert delta'),
    Mutant('P149', 'python/subspace_ops/nn/experts.py',
           '        self._original().data = self._originals\n',
           '        self._original().data = (self._original().to(torch.float32) - self.delta_weight()).to(self._origi'
           'nal().dtype)\n',
           'tests/test_moe_experts.py -k merge_unmerge',
           'unmerge subtracts the delta instead of restoring the saved base tensor: not bit-exact'),
    Mutant('P150', 'python/subspace_ops/nn/experts.py',
           '        original.data = merged\n',
           '        original.data = original.data\n',
           'tests/test_moe_experts.py -k merge_unmerge',
           'merge marks the layer merged without folding the delta into the base'),
    Mutant('P151', 'python/subspace_ops/nn/experts.py',
           'plist.original.requires_grad_(requires_grad)',
           'plist.original.requires_grad_(True)',
           'tests/test_moe_experts.py -k gradients',
           'the base expert parameter left trainable'),
    Mutant('P152', 'python/subspace_ops/nn/experts.py',
           '    if "_subspace_parametrize_caches" not in vars(module):',
           '    if False:',
           'tests/test_moe_experts.py -k once_per_forward',
           'the adapted parameter re-formed (E·out·in) on every read instead of once per forward'),
    Mutant('P153', 'python/subspace_ops/methods.py',
           '    names = unadapted_expert_parameters(model)\n    if not names:\n        return\n',
           '    names = unadapted_expert_parameters(model)\n    if True:\n        return\n',
           'tests/test_moe_experts.py -k unadapted',
           'plain apply on an MoE model silently leaves the experts frozen'),
    Mutant('P154', 'python/subspace_ops/methods.py',
           '        if not any(_matches(name, (pattern,)) for name, _, _ in found):',
           '        if not found:',
           'tests/test_moe_experts.py -k bad_target_parameters',
           'a target_parameters pattern matching nothing ignored when another pattern matches'),
    Mutant('P155', 'python/subspace_ops/methods.py',
           'found = find_parameters(model, c.target_parameters, skip_under=c.not_adapted)',
           'found = find_parameters(model, c.target_parameters)',
           'tests/test_moe_experts.py -k bad_target_parameters',
           'target_parameters reach into exclude/trainable modules'),
    Mutant('P156', 'python/subspace_ops/methods.py',
           '        if param.dim() != 3 or not param.is_floating_point():',
           '        if param.dim() < 2 or not param.is_floating_point():',
           'tests/test_moe_experts.py -k bad_target_parameters',
           'a 2-D parameter named in target_parameters not refused as such'),
    Mutant('P157', 'python/subspace_ops/methods.py',
           '        if self.dropout:\n            raise ValueError(f"dropout must be 0 with target_parameters',
           '        if False:\n            raise ValueError(f"dropout must be 0 with target_parameters',
           'tests/test_moe_experts.py -k unsupported',
           'dropout silently not applied to the expert adapters'),
    Mutant('P158', 'python/subspace_ops/methods.py',
           'for a_i, b_i in zip(a, b) if a.dim() == 3 else ((a, b),):',
           'for a_i, b_i in ((a, b),):',
           'tests/test_moe_experts.py -k mpc_loss',
           'MPC regularizer computed on stacked [E, N, r] factors instead of per expert'),
    Mutant('P159', 'python/subspace_ops/methods.py',
           '        experts_nn.attach(owner, attribute, layer)\n',
           '        pass\n',
           'tests/test_moe_experts.py -k hand_reference',
           'expert layers built but never attached (experts silently not adapted)'),
    Mutant('P160', 'python/subspace_ops/nn/experts.py',
           '    layer._owner = [plist]',
           '    layer._owner = __import__("weakref").WeakValueDictionary({0: plist})',
           'tests/test_moe_experts.py -k deep_copy',
           "a deep-copied model's expert layers point at the original's base tensor: merging the copy rewrites the or"
           "iginal's weights"),
    Mutant('P161', 'python/subspace_ops/nn/experts.py',
           '    module._parameters.update({k: params.pop(k) for k in order if k in params})\n',
           '',
           'tests/test_moe_experts.py -k in_its_place',
           "detach re-registers the base parameter at the end: the module's parameter order (state_dict, optimizer gr"
           'oups) changes'),
    Mutant('P162', 'python/subspace_ops/peft_model.py',
           'layer.disabled = True',
           'layer.disabled = False',
           'tests/test_moe_experts.py -k test_peft_disable_adapter_runs_the_base_model',
           'disable_adapter() leaves the expert adapters active: the block does not compute the base model'),
    Mutant('P163', 'python/subspace_ops/peft_model.py',
           '            for layer in disabled_experts:\n                layer.disabled = False\n',
           '',
           'tests/test_moe_experts.py -k test_peft_disable_adapter_runs_the_base_model',
           'disable_adapter() does not switch the expert adapters back on when the block ends'),
    Mutant('P164', 'python/subspace_ops/peft_model.py',
           '        self._detach_experts(keep_merged=True)  # the expert',
           '        self._expert_layers()  # the expert',
           'tests/test_moe_experts.py -k test_peft_merge_and_unload_gives_a_stock_model',
           'merge_and_unload() leaves the expert parametrizations attached (not a plain model, non-stock state_dict k'
           'eys)'),
    Mutant('P165', 'python/subspace_ops/peft_model.py',
           'self._detach_experts(keep_merged=True)',
           'self._detach_experts(keep_merged=False)',
           'tests/test_moe_experts.py -k test_peft_merge_and_unload_gives_a_stock_model',
           'merge_and_unload() removes the expert adapters without keeping the merged W + dW'),
    Mutant('P166', 'python/subspace_ops/peft_model.py',
           '        self._detach_experts()\n',
           '        self._expert_layers()\n',
           'tests/test_moe_experts.py -k test_peft_unload_gives_the_stock_model',
           'unload() leaves the expert adapters attached'),
    Mutant('P168', 'python/subspace_ops/peft_model.py',
           '        if merged:  # the merged weights hold the active adapter',
           '        if False:  # the merged weights hold the active adapter',
           'tests/test_moe_experts.py -k test_peft_several_adapters_switch_the_expert_factors',
           "set_adapter() on merged layers: the merged weights keep the previous adapter's dW"),
    Mutant('P169', 'python/subspace_ops/nn/experts.py',
           'if self.merged or self.disabled:',
           'if self.merged:',
           'tests/test_moe_experts.py -k test_peft_disable_adapter_runs_the_base_model',
           'LowRankExperts ignores its disabled flag: disable_adapter() still adds dW'),
    Mutant('P170', 'python/subspace_ops/nn/experts.py',
           'if keep_merged and not (isinstance(layer, LowRankExperts) and layer.merged):',
           'if False:',
           'tests/test_moe_experts.py -k test_expert_detach_keep_merged_needs_a_merged_layer',
           'detach(keep_merged=True) on an unmerged layer silently drops the adapter'),
    Mutant('P171', 'python/subspace_ops/nn/experts.py',
           'layer._owner = None  # detached',
           'pass  # detached',
           'tests/test_moe_experts.py -k test_peft_merge_and_unload_gives_a_stock_model',
           'a detached expert layer can still merge() into the now plain parameter'),
    Mutant('P172', 'python/subspace_ops/peft_model.py',
           '    if name.rsplit(".", 1)[-1] == "processor" and (diffusers_integration.is_head_mix_processor(current)',
           '    if False and (diffusers_integration.is_head_mix_processor(current)',
           'tests/test_diffusers.py -k kept_by_the_peft_wrapper',
           "get_peft_model's disable_adapter/unload drop an IP-Adapter scale set after Coeff was attached"),
    Mutant('P173', 'python/subspace_ops/adapters.py',
           '                       ("timm.layers.attention_pool", "AttentionPoolLatent"))',
           '                       )',
           'tests/test_timm_apply.py -k attention_pool',
           "Coeff leaves timm's attention pooling (attn_pool) unmixed and frozen, unreported"),
    Mutant('P174', 'python/subspace_ops/adapters.py',
           '    plain, sdpa = _timm_attention_blocks(model, skip_under=tuple(trainable) + tuple(exclude))',
           '    plain, sdpa = _timm_attention_blocks(model)',
           'tests/test_timm_apply.py -k attention_pool',
           'Coeff mixes attention inside a module trained in full (trainable) or excluded'),
    Mutant('P175', 'python/subspace_ops/methods.py',
           '            if id(layer) not in expert_layers:\n                experts_nn.detach(module, name)\n',
           '            if False:\n                experts_nn.detach(module, name)\n',
           'tests/test_moe_experts.py -k roll',
           "apply's rollback leaves expert adapters attached before a later step raised (parametrized module, moved p"
           'arameters)'),
    # session 19, second round: Coeff under autocast and unpickled, HF Trainer with the wrapper, frozen
    # adapter tensors in checkpoints, the MoE hint of the scaling methods
    Mutant('P176', 'python/subspace_ops/ops/head_mixing_attention.py',
           '    q, k, v, attn_mask = _autocast_inputs(q, k, v, attn_mask)\n    _check_inputs',
           '    _check_inputs',
           'tests/test_coeff_layers.py -k autocast',
           "head_mixing_attention ignores torch.autocast: LLaMA's float32 rotary q/k next to bfloat16 v raise TypeErr"
           'or (Coeff under bf16 autocast / Trainer bf16)'),
    Mutant('P177', 'python/subspace_ops/transformers.py',
           '        super().__setstate__(state)\n        register()\n',
           '        super().__setstate__(state)\n',
           'tests/test_coeff_layers.py -k pickled',
           "a Coeff-adapted transformers model saved with torch.save(model) fails in a fresh process: 'subspace_coeff"
           "' is not registered on unpickling"),
    Mutant('P178', 'python/subspace_ops/peft_model.py',
           '            cls = _signature_class(type(model))\n',
           '            pass\n',
           'tests/test_peft_model.py -k trainer_defaults_train',
           "get_peft_model wrapper shows forward(*args, **kwargs): Trainer's remove_unused_columns drops every column"),
    Mutant('P179', 'python/subspace_ops/peft_model.py',
           '        forward.__signature__ = signature\n',
           '',
           'tests/test_peft_model.py -k trainer_defaults_on_a_causal_lm',
           "wrapper's forward signature is not the wrapped model's: no label_names / input columns under Trainer"),
    Mutant('P180', 'python/subspace_ops/peft_model.py',
           '        name = f"SubspacePeftModel[{base.__name__}]"\n',
           '        name = "SubspacePeftModel"\n',
           'tests/test_peft_model.py -k forward_shows',
           "wrapper class name loses the wrapped class's: find_labels misses QA models' start/end_positions"),
    Mutant('P181', 'python/subspace_ops/peft_model.py',
           '        if type(self)._signature_of is None:\n            return reduced\n',
           '        if True:\n            return reduced\n',
           'tests/test_peft_model.py -k pickles_copies',
           'the per-class wrapper subclass pickles by name and torch.save / pickle of the wrapper fail'),
    Mutant('P182', 'python/subspace_ops/peft_model.py',
           '            wrapper.save_pretrained(directory)\n',
           '            pass\n',
           'tests/test_peft_model.py -k resume_continues',
           "SaveAdapterCallback writes no adapter files into Trainer's checkpoint directories"),
    Mutant('P183', 'python/subspace_ops/checkpoint.py',
           '    return {n: p for n, p in model.named_parameters() if p.requires_grad or id(p) in adapter}',
           '    return {n: p for n, p in model.named_parameters() if p.requires_grad}',
           'tests/test_checkpoint.py -k froze',
           "save_adapter drops adapter tensors the user froze (LoRA's A): a strict load refuses the file, strict=Fals"
           'e loads random A'),
    Mutant('P184', 'python/subspace_ops/methods.py',
           '        experts = unadapted_expert_parameters(model)\n        if experts:  # a Mixture-of-Experts FFN',
           '        experts = []\n        if experts:  # a Mixture-of-Experts FFN',
           'tests/test_moe_experts.py -k scaling_methods',
           '(IA)3/SSB on an MoE model: the ff_targets error does not say the FFN is 3-D expert parameters nor ff_targ'
           'ets=()'),
    Mutant('P185', 'python/subspace_ops/peft_model.py',
           '                     "forward": forward, "_get_name": _get_name, "_signature_of": base}',
           '                     "forward": forward, "_signature_of": base}',
           'tests/test_peft_model.py -k label_smoothing',
           "Trainer's label smoothing on a causal LM wrapped by get_peft_model does not shift the labels (class name)"),
    # Attention dropout on the mixed maps (session 20)
    Mutant("T10", "triton_kernels/head_mixing_attention.py", "            t *= kept\n", "",
           HM + " -k 'dropout and triton'", "Triton dK/dV kernel: E from the undropped T (dK wrong under dropout)"),
    Mutant("T11", "triton_kernels/head_mixing_attention.py", "        if DROPOUT:\n            mixed *= kept\n", "",
           HM + " -k 'dropout and triton'", "Triton dK/dV kernel: dV from the undropped mixed map"),
    Mutant("T12", "triton_kernels/head_mixing_chunked.py", "            mixed, t = mixed * drop, t * drop",
           "            mixed = mixed * drop", HM + " -k 'chunked and dropout'",
           "chunked Triton strategy: the backward's T misses the dropout mask"),
    Mutant("C10", "csrc/head_mixing_attention.cpp",
           "    drop<T>(p, drop_keys, j0, t);\n    add_row_sum<T>(p, dv_rows", "    add_row_sum<T>(p, dv_rows",
           HM + " -k 'dropout and cpu'", "C++ backward: dV from the undropped mixed map"),
    Mutant("C11", "csrc/head_mixing_tiles.cpp", "  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.6666665459e-1f));",
           "  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.7e-1f));", HM + " -k isa_paths",
           "AVX2 exp8 polynomial off by 2% in one coefficient (AVX2 CPUs only)"),
    # The C++ backward's products on the kernel's own loops (session 21)
    Mutant("C12", "csrc/head_mixing_gemm_kernels.inc",
           "acc[kk][r] = kAccumulate ? Simd::load(c + kk * ldc + r * Simd::kLanes) : Simd::zero();",
           "acc[kk][r] = Simd::zero();", HM + " -k 'isa_paths or cpu_kernel_paths'",
           "multiply_add overwrites dK/dV instead of adding each query block's share"),
    Mutant("C13", "csrc/head_mixing_gemm_kernels.inc", "    } else {\n      scores_rows<Simd::kScoreKeys1, 1, kMax",
           "    } else if (false) {\n      scores_rows<Simd::kScoreKeys1, 1, kMax", HM + " -k isa_paths",
           "scores and multiply_add skip the last vector of rows (columns) when their count is odd"),
    Mutant("C14", "csrc/head_mixing_attention.cpp",
           "          tiles::softmax_grad(e.data_ptr<T>(), s.data_ptr<T>(), shape_of(e), d, static_cast<T>(p.scale));\n"
           "          key_grads(",
           "          tiles::softmax_grad(e.data_ptr<T>(), s.data_ptr<T>(), shape_of(e), d, T(1));\n          key_grads(",
           HM + " -k 'isa_paths or cpu_kernel_paths'", "the two-phase backward's dK misses the scores' scale"),
    Mutant("C15", "csrc/head_mixing_attention.cpp",
           "    pack_query_rows(p, d_out, 1.0, b, i0, i1, tl.grad_pack);\n    std::fill",
           "    pack_query_rows(p, d_out, p.scale, b, i0, i1, tl.grad_pack);\n    std::fill", HM + " -k isa_paths",
           "T = V dOᵀ on the own loops takes the scores' scale (dQ, dK, dmix wrong in float32)"),
    Mutant("P186", "python/subspace_ops/transformers.py", "                   dropout_p=float(dropout))",
           "                   dropout_p=0.0)", "tests/test_coeff_layers.py -k dropout",
           "transformers models under Coeff lose their attention dropout in training (BERT's, GPT-2's 0.1)"),
    Mutant("P187", "python/subspace_ops/nn/attention.py",
           "    return float(attn_drop.p) if training and isinstance(attn_drop, nn.Dropout) else 0.0",
           "    return float(attn_drop.p) if isinstance(attn_drop, nn.Dropout) else 0.0",
           "tests/test_coeff_layers.py -k dropout", "timm Coeff blocks drop attention in evaluation too"),
    Mutant("P188", "python/subspace_ops/nn/sdpa_head_mixing.py",
           '                            dropout_p=float(options.get("dropout_p", 0.0)))',
           "                            dropout_p=0.0)", "tests/test_timm_apply.py -k attention_dropout",
           "BEiT/Swin/EVA under Coeff (routed SDPA) lose their attention dropout"),
    Mutant("P189", "python/subspace_ops/reference.py", "    key = _mix32(row ^ seed_lo) ^ seed_hi  # [B, H, rows]",
           "    key = _mix32(row) ^ seed_hi  # [B, H, rows]", HM + " -k 'dropout and cpu'",
           "the reference's dropout mask ignores half the seed (kernels and reference disagree)"),
    Mutant("P190", "python/subspace_ops/ops/head_mixing_attention.py",
           "    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:",
           "    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:",
           HM + " -k bad_input", "dropout_p = 1 accepted: 1 / (1 − p) divides by zero, NaN outputs"),
]


def _run(cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, cwd=ROOT, capture_output=True, text=True, check=False)


def _rebuild() -> None:
    built = _run(f"{sys.executable} -m pip install -q --no-build-isolation --no-deps -e .")
    if built.returncode:
        raise RuntimeError(f"rebuild failed:\n{built.stdout[-2000:]}{built.stderr[-2000:]}")


def _cpu_runs_avx512() -> bool:
    """Whether the built extension takes its AVX-512 float32 path on this CPU."""
    from subspace_ops.backends import cpu_extension

    return cpu_extension().rescaled_linear_avx512_rows() > 0


def check(mutant: Mutant) -> str:
    """'killed', 'survived' or an error; the file is restored (and csrc rebuilt by the caller)."""
    path = ROOT / mutant.path
    source = path.read_text()
    if source.count(mutant.old) != 1:
        return f"error: the text to mutate occurs {source.count(mutant.old)} times in {mutant.path}"
    path.write_text(source.replace(mutant.old, mutant.new))
    try:
        if mutant.path.startswith("csrc/"):
            _rebuild()
        result = _run(f"{sys.executable} -m pytest -x -q -p no:cacheprovider {mutant.tests}")
    finally:
        path.write_text(source)
    if result.returncode == 1:
        return "killed"
    if result.returncode == 0:
        return "survived"
    return f"error: pytest exit status {result.returncode}: {result.stdout[-300:]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args()
    by_name = {m.name: m for m in MUTANTS}
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:4} {m.path}: {m.breaks}")
        return 0
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutant(s) {unknown}; --list shows them")
    chosen = [by_name[n] for n in args.names] or MUTANTS
    dirty = _run("git status --porcelain -- " + " ".join(sorted({m.path for m in chosen}))).stdout.strip()
    if dirty:
        parser.error(f"uncommitted changes in files to mutate (commit or stash them first):\n{dirty}")
    skipped = [m for m in chosen if m.avx512_only]
    if skipped and _cpu_runs_avx512():
        skipped = []
    for m in skipped:
        print(f"{m.name:4} skipped: this CPU does not run the AVX-512 kernels  {m.breaks}", flush=True)
    chosen = [m for m in chosen if m not in skipped]
    outcomes = {}
    try:
        for m in chosen:
            start = time.perf_counter()
            outcomes[m.name] = check(m)
            print(f"{m.name:4} {outcomes[m.name]:<9} {time.perf_counter() - start:5.0f} s  {m.breaks}", flush=True)
    finally:
        if any(m.path.startswith("csrc/") for m in chosen):
            _rebuild()  # the extension again from the restored sources
    survived = [n for n, o in outcomes.items() if o != "killed"]
    print(f"{len(outcomes) - len(survived)}/{len(outcomes)} mutants killed" +
          (f"; not killed: {survived}" if survived else "") +
          (f"; skipped on this CPU: {[m.name for m in skipped]}" if skipped else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
