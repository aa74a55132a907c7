"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only`` (not part of ``python -m pytest``,
whose testpaths is ``tests``).

Environment knobs (all optional):

- ``BENCH_SHAPE``: a preset or ``M,K,N`` (default ``197,768,768``; repeat with ``;``, e.g.
  ``"197,768,768;4096,768,768"``);
- ``BENCH_DTYPE``: float32 / bfloat16 / float16 (default: the case's default for the device);
- ``BENCH_DEVICE``: cpu / cuda (default: cuda if available);
- ``BENCH_BACKEND``: our op's backend (default: the best available).
"""
