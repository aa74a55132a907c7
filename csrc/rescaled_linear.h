// Rescaled linear (METHODS.md §1): y = x (W ⊙ (c + S_l S_rᵀ))ᵀ + b, CPU kernels on ATen.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace subspace_ops {

// x2d [M, K], weight [N, K], s_l [N, r], s_r [K, r], bias [N] or none -> y [M, N].
at::Tensor rescaled_linear_forward(const at::Tensor& x2d, const at::Tensor& weight, const at::Tensor& s_l,
                                   const at::Tensor& s_r, const std::optional<at::Tensor>& bias, bool residual);

// -> (gx [M, K], gw [N, K], gs_l [N, r], gs_r [K, r]); a gradient not asked for is undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rescaled_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x2d, const at::Tensor& weight, const at::Tensor& s_l,
    const at::Tensor& s_r, bool residual, bool need_x, bool need_weight, bool need_scales);

// W is processed in blocks of rows (or columns) whose modulated copy takes at most
// kMaxBlockBytes (at least kMinBlock rows): the largest temporary is bounded by a constant that
// fits in the last-level cache, not by N×K. A whole ViT-B 768×768 fp32 matrix is one block;
// a LLaMA-7B 4096×4096 one is 64 blocks of 64 rows.
constexpr int64_t kMaxBlockBytes = int64_t(4) << 20;
constexpr int64_t kMinBlock = 64;

// Rows per block for `length` rows of `width` elements of `element_size` bytes.
inline int64_t block_rows(int64_t length, int64_t width, int64_t element_size) {
  const int64_t fit = kMaxBlockBytes / std::max<int64_t>(1, width * element_size);
  return std::max<int64_t>(1, std::min(length, std::max(kMinBlock, fit)));
}

}  // namespace subspace_ops
