"""The registry of benchmark cases: ``CASES[name] -> Case``, one module per case.

To add a case, write ``cases/<op>.py`` defining a :class:`~subspace_ops.bench.harness.Case`
named ``CASE`` (its variants, baselines, shape presets) and register it below; the CLI
(``subspace-ops bench <name>``), the pytest-benchmark suite and the plots pick it up.
"""

from __future__ import annotations

from ..harness import Case
from . import rescaled_linear

__all__ = ["CASES", "Case"]

CASES: dict[str, Case] = {case.name: case for case in (rescaled_linear.CASE,)}
