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
    # Unoptimized, with the headers' debug assertions (no NDEBUG): this checks that the sources build
    # against libtorch and that the C++ test passes, and -O0 compiles in ~65 s where Release takes
    # ~95 s on 2 cores (the optimized kernels are what the Python extension's tests run).
    debug_build = ["-DCMAKE_BUILD_TYPE=Debug", "-DCMAKE_CXX_FLAGS_DEBUG=-O0"]
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "ctest.sh"), str(tmp_path / "build"), *debug_build],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=None,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "tests passed" in result.stdout, result.stdout[-2000:]
