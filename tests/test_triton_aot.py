"""Every Triton kernel compiles for sm_90 (H100/H200), checked here without a GPU.

The interpreter tests check the kernels' arithmetic; this checks that the GPU path compiles (tl.dot
shapes, layouts) and fits the chip's shared memory, by running scripts/triton_aot_check.py in its
quick mode (one config per launch, bfloat16) in a process without TRITON_INTERPRET.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.triton
def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "triton_aot_check.py"), "--quick"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    if result.returncode == 2:  # this Triton's internals differ from the ones the script patches
        pytest.skip(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "all ok" in result.stdout
