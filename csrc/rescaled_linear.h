// Rescaled linear (METHODS.md §1): y = x (W ⊙ (c + S_l S_rᵀ))ᵀ + b on the CPU, built on ATen GEMMs.
// Plain ATen/C++ (no Python): built into subspace_ops._C by setup.py and into a library by CMakeLists.txt.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

namespace subspace_ops {

// x2d [M, K], weight [N, K], s_l [N, r], s_r [K, r], bias [N] or none (all one floating dtype, CPU;
// any strides) -> y [M, N] = x2d W'ᵀ + bias with W' = weight ⊙ (c + s_l s_rᵀ), c = residual ? 1 : 0.
// W' is formed whole only where it is small next to x (block_budget below; see rescaled_linear.cpp).
at::Tensor rescaled_linear_forward(const at::Tensor& x2d, const at::Tensor& weight, const at::Tensor& s_l,
                                   const at::Tensor& s_r, const std::optional<at::Tensor>& bias, bool residual);

// grad_y [M, N] -> (gx [M, K], gw [N, K], gs_l [N, r], gs_r [K, r]). need_scales computes gs_l and gs_r;
// a gradient not asked for is an undefined at::Tensor(). gs_l and gs_r are accumulated in float32
// (float64 for float64) and returned in the input dtype. The bias gradient is left to the caller.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rescaled_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x2d, const at::Tensor& weight, const at::Tensor& s_l,
    const at::Tensor& s_r, bool residual, bool need_x, bool need_weight, bool need_scales);

// Temporaries: W' and G = grad_yᵀ x are handled in blocks of whole rows (or columns) whose buffer
// holds at most block_budget() bytes (one such buffer per call). kMaxBlockBytes is the budget
// whatever the layer's size; tuned on 2 threads at K = N = 768, float32 (Intel Xeon): 1.5 MiB
// (2 blocks there) keeps large-M steps within ~1-2% of unblocked GEMMs, where 1 MiB (3 blocks) costs
// ~3% more; small M is insensitive to it.
constexpr int64_t kMaxBlockBytes = int64_t{3} << 19;  // 1.5 MiB
// Blocks never get thinner than this (a GEMM per row would be slow); past kMaxBlockBytes / kMinBlockRows
// bytes per row the budget is exceeded, still far below a whole [N, K] temporary.
constexpr int64_t kMinBlockRows = 16;

// The temporary budget of one call on x [tokens, k] and a weight [n, k]: kMaxBlockBytes, or the whole
// weight's size where that is at most a quarter of x (4·n <= tokens), which autograd keeps for the
// backward anyway. Then W' and G are one block each and every GEMM runs unblocked: at M = 4096,
// K = N = 768, float32, 2 threads (AMD EPYC) one block measured 1.5-2.7 ms faster per 77 ms training
// step than two (five interleaved runs of 40 steps; on an Intel Xeon VM, no difference). Small batches
// keep the small budget, so decoding and per-image steps never allocate a weight-sized temporary.
inline int64_t block_budget(int64_t tokens, int64_t n, int64_t k, int64_t element_size) {
  const int64_t whole = n * k * element_size;
  return 4 * n <= tokens ? std::max(kMaxBlockBytes, whole) : kMaxBlockBytes;
}

// Rows per block when a [rows, cols] matrix of element_size-byte elements is processed `budget` bytes
// at a time: balanced blocks (no thin tail block), 1 <= result <= max(rows, 1).
inline int64_t block_rows(int64_t rows, int64_t cols, int64_t element_size, int64_t budget) {
  const int64_t fit = std::max(kMinBlockRows, budget / std::max<int64_t>(1, cols * element_size));
  const int64_t blocks = std::max<int64_t>(1, (rows + fit - 1) / fit);
  return std::max<int64_t>(1, (rows + blocks - 1) / blocks);
}

}  // namespace subspace_ops
