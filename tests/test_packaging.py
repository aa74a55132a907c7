"""The source distribution carries everything a build from it reads (MANIFEST.in).

setuptools puts an Extension's sources (the .cpp files) into an sdist but not the headers and .inc
files they include, so without MANIFEST.in `pip install subspace_ops-*.tar.gz` fails to compile.
The sdist is built from a copy of the checkout, so the test leaves the checkout untouched.
"""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").is_file() or not (ROOT / "csrc").is_dir(),
                                reason="needs a source checkout (setup.py and csrc/)")

# What the build, the ctest build and the README's commands read, besides the Python packages.
TOP_LEVEL_FILES = ("setup.py", "pyproject.toml", "CMakeLists.txt", "README.md", "MANIFEST.in", "LICENSE")
SOURCE_SUFFIXES = {".cpp", ".h", ".inc", ".py", ".sh"}
SOURCE_DIRS = ("csrc", "python/subspace_ops", "triton_kernels", "tests", "benchmarks", "scripts")


def _checkout_copy(dest: Path) -> Path:
    """The checkout's sources in dest: no VCS data, virtual environments, build outputs or caches."""
    skip = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "*.so")
    dest.mkdir()
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name in ("build", "dist") or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dest / entry.name, ignore=skip)
        else:
            shutil.copy2(entry, dest / entry.name)
    return dest


def _sources() -> set[str]:
    found = {name for name in TOP_LEVEL_FILES}
    for directory in SOURCE_DIRS:
        for path in (ROOT / directory).rglob("*"):
            if path.is_file() and path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts:
                found.add(path.relative_to(ROOT).as_posix())
    return found


def test_sdist_carries_every_source_file_the_build_and_the_tests_read(tmp_path):
    checkout = _checkout_copy(tmp_path / "checkout")
    out_dir = tmp_path / "dist"
    build = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", build, str(out_dir)], cwd=checkout, capture_output=True, text=True,
                          env={**os.environ, "SUBSPACE_OPS_NO_EXT": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sdist_name = done.stdout.strip().splitlines()[-1]
    with tarfile.open(out_dir / sdist_name) as sdist:
        members = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    missing = sorted(_sources() - members)
    assert not missing, f"the sdist lacks {missing}: add them to MANIFEST.in"
    assert "csrc/rescaled_linear.h" in members and "csrc/head_mixing_gemm_kernels.inc" in members
    assert not any(name.endswith(".so") for name in members), "a built extension leaked into the sdist"
