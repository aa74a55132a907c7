"""Microbenchmarks: one harness (:mod:`.harness`), many cases (:mod:`.cases`); see ``subspace-ops bench``."""
