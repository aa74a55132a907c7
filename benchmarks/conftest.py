"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only`` (not part of the test run)."""
