#!/usr/bin/env bash
# Build the C++ kernels and their tests against the active Python's torch with CMake + Ninja, then run
# them with ctest. Usage: bash scripts/ctest.sh [BUILD_DIR] [CMAKE_ARGS...]
# (default BUILD_DIR: build/cmake in the repo root; CMAKE_ARGS are passed to the configure step, e.g.
# -DCMAKE_BUILD_TYPE=Debug). Honours MAX_JOBS (parallel compile jobs) and PYTHON (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir="${1:-build/cmake}"
shift $(( $# > 0 ? 1 : 0 ))
prefix="$("${PYTHON:-python}" -c 'import torch; print(torch.utils.cmake_prefix_path)')"

cmake -S . -B "$build_dir" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" "$@"
cmake --build "$build_dir" ${MAX_JOBS:+--parallel "$MAX_JOBS"}
ctest --test-dir "$build_dir" --output-on-failure
