"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only`` (not part of ``python -m pytest``,
whose testpaths is ``tests``).

Environment knobs (all optional):

- ``BENCH_CASES``: comma-separated op cases (default: all of them: rescaled-linear, scaled-linear,
  svd-delta-linear, lowrank-linear, head-mixing-attention, head-mixing-attention-causal);
- ``BENCH_SHAPE``: presets or sizes, ``;``-separated; each applies to the cases whose dimensions it
  fits (``M,K,N`` for the linear ops, ``B,H,N,d`` for head mixing; a preset such as ``vit-b`` to
  both), e.g. ``"197,768,768;4096,768,768;1,8,2048,64"`` (default per case: ``197,768,768`` and
  ``1,8,512,64``);
- ``BENCH_DTYPE``: float32 / bfloat16 / float16 (default: the case's default for the device);
- ``BENCH_DEVICE``: cpu / cuda (default: cuda if available);
- ``BENCH_BACKEND``: our op's backend (default: the best available).
"""
