"""Build the C++ kernels against libtorch with CMake and run their C++ test under ctest."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.cpu_ext
def test_cmake_build_and_ctest(tmp_path):
    missing = [tool for tool in ("cmake", "ninja", "ctest") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} on PATH")
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "ctest.sh"), str(tmp_path / "build")],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=None,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "tests passed" in result.stdout, result.stdout[-2000:]
