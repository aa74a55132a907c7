// Float32 products of a few rows with a weight matrix, reading the weight once: the CPU's decode-sized
// GEMMs (rescaled linear's stacked path, python/subspace_ops/ops/rescaled_linear.py).
//
// Why not ATen's GEMM: with 2-16 rows MKL's sgemm packs or re-reads the weight per few rows, so on
// the AMD EPYC VM of these measurements (Zen 3, AVX2, 2 threads, 2026-12-03) x Wᵀ at K = N = 4096
// took 5.2 ms with 2 rows and 8.6 ms with 4 where one row (a GEMV) took 2.4 ms, and at
// K = 4096, N = 11008 34 ms with 4 rows against 8.1 ms for one. These loops stream each row of the
// weight from memory once and use it for every row of the input while it is in L1.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace subspace_ops::few_rows {

// The most rows these loops take (matmul's bound).
constexpr int64_t kMaxRows = 16;

// The most rows for which callers use them: all of them. Measured against ATen's products (MKL) on 2
// threads (AMD EPYC Zen 3, AVX2, 2026-12-03) at K = N = 768, K = N = 1024, K = N = 4096 and K = 4096,
// N = 11008: a · Wᵀ 1.6-2.5× faster with 1 row (ATen's GEMV), 3.3-4.7× with 2-4, 1.8-3.8× with 8 and
// 1.3-2.7× with 16; a · W 1.5-3.7× with 2-16 rows, but with 1 row (a walk down W's columns against
// ATen's GEMV along its rows) 0.76-0.78× at K = 4096 (1.1-1.7× at 768-1024), so a · W starts at 2 rows.
constexpr int64_t kPreferredRows = kMaxRows;

// kMaxRows where simd::isa() (cpu_simd.h) is AVX-512 or AVX2 + FMA, else 0 (where it is 0, matmul runs
// ATen's product: tests cap the instruction set after callers have asked).
int64_t max_rows();

// Whether a float32 product of `rows` rows with a weight (· Wᵀ when transpose_weight, else · W) runs
// faster here than ATen's: 1 (· Wᵀ) or 2 (· W) to kPreferredRows rows where max_rows() > 0.
bool prefers(int64_t rows, bool transpose_weight);

// a · Wᵀ or a · W (+ bias, when given and defined) on these loops where prefers(), else ATen's mm / addmm
// (a and weight of one dtype, CPU).
at::Tensor product(const at::Tensor& a, const at::Tensor& weight, bool transpose_weight,
                   const std::optional<at::Tensor>& bias = std::nullopt);

// a [R, L] float32 (R <= kMaxRows), weight [N, K] float32 with unit stride along either dimension, both
// on the CPU. transpose_weight: returns a · weightᵀ [R, N] (L = K); else a · weight [R, K] (L = N).
// Each element of the result is a sum in a fixed order: the same every run for a given instruction set.
at::Tensor matmul(const at::Tensor& a, const at::Tensor& weight, bool transpose_weight);

}  // namespace subspace_ops::few_rows
