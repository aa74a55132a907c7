"""Microbenchmarks: one op-agnostic harness (:mod:`.harness`: timing, peak memory, tables,
JSON/CSV, plots) and many cases (:mod:`.cases`: per op, the variants compared side by side).

Run them with ``subspace-ops bench`` (see :mod:`subspace_ops.cli`) or, under pytest-benchmark,
``pytest benchmarks/ --benchmark-only``.
"""

from .cases import CASES
from .harness import Case, Result, Variant, VariantSkipped, Workload, iteration, run_case

__all__ = ["CASES", "Case", "Result", "Variant", "VariantSkipped", "Workload", "iteration", "run_case"]
