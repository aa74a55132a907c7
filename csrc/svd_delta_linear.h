// SVD-basis linear (METHODS.md §2): y = x (W + U diag(d) Vᵀ)ᵀ + b, merged path, CPU kernels on ATen.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace subspace_ops {

// The "SVD-basis scaling" kernel: W_eff = W + U diag(d) Vᵀ (one scale-and-add GEMM).
at::Tensor svd_basis_weight(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, const at::Tensor& d);

// x2d [M, K], weight [N, K], u [N, k], v [K, k], d [k], bias [N] or none -> y [M, N].
at::Tensor svd_delta_linear_forward(const at::Tensor& x2d, const at::Tensor& weight, const at::Tensor& u,
                                    const at::Tensor& v, const at::Tensor& d, const std::optional<at::Tensor>& bias);

// -> (gx [M, K] or undefined, gd [k] or undefined).
std::tuple<at::Tensor, at::Tensor> svd_delta_linear_backward(const at::Tensor& grad_y, const at::Tensor& x2d,
                                                             const at::Tensor& weight, const at::Tensor& u,
                                                             const at::Tensor& v, const at::Tensor& d, bool need_x,
                                                             bool need_d);

}  // namespace subspace_ops
