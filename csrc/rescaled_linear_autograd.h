// The cpu backend's eager autograd node for rescaled_linear's modulated path: the gradient formulas of
// python/subspace_ops/ops/rescaled_linear.py (_gradients) over the kernels of rescaled_linear.h, in C++.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace subspace_ops {

// y = x (W ⊙ (c + S_l S_rᵀ))ᵀ + bias, recorded for autograd as one node whose backward runs in C++.
// x [..., K], weight [N, K], s_l [N] / [N, r] / none (ones, not trained), s_r [K] / [K, r] / none,
// bias [N] / none. Checks its arguments itself (here and in the kernels' check_inputs), raising on any
// the kernels cannot run: the Python entry calls it without checking first and words the error after.
at::Tensor rescaled_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& s_l,
                                    const std::optional<at::Tensor>& s_r, const std::optional<at::Tensor>& bias,
                                    bool residual);

}  // namespace subspace_ops
