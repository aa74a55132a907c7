#!/usr/bin/env bash
# Build the C++ kernels against the active Python's libtorch with CMake + Ninja and run ctest.
# Usage: bash scripts/ctest.sh [BUILD_DIR]   (default: build/cmake)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build/cmake}"
torch_root="$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
abi="$(python -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
cmake -S "$root" -B "$build" -G Ninja -DTORCH_ROOT="$torch_root" -DTORCH_CXX11_ABI="$abi" >/dev/null
cmake --build "$build" --parallel "${MAX_JOBS:-2}"
ctest --test-dir "$build" --output-on-failure
