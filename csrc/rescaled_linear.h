// Rescaled linear (METHODS.md §1): y = x (W ⊙ (c + S_l S_rᵀ))ᵀ + b, CPU kernels on ATen.
#pragma once

#include <ATen/ATen.h>

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

// Rows (or columns) of W processed per block: the largest temporary is [kBlock, K] or [N, kBlock].
constexpr int64_t kBlock = 256;

}  // namespace subspace_ops
