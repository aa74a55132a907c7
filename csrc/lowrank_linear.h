// Fused low-rank linear (METHODS.md §4): LoRA, AdaLoRA/TriLoRA (diagonal G), FLoRA (free r×r G) on the CPU,
//   y = x Wᵀ + s · ((x_d Bᵀ) Gᵀ) Aᵀ + b,   x_d = dropout(x) (or x itself),
// built on ATen GEMMs. Plain ATen/C++ (no Python): compiled into subspace_ops._C by setup.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace subspace_ops {

// x2d [M, K]; x_dropped2d [M, K] or none (none: the adapter path reads x2d); weight [N, K]; a [N, r];
// g none (identity), [r] (diagonal) or [r, r]; b [r, K]; bias [N] or none; all one floating dtype, CPU,
// any strides. -> (y [M, N], h0 [M, r] = x_d Bᵀ, the adapter's down-projection, saved for the backward).
// Temporaries: [M, r] only (no [N, K] and no [M, N] beside y).
std::tuple<at::Tensor, at::Tensor> lowrank_linear_forward(const at::Tensor& x2d,
                                                          const std::optional<at::Tensor>& x_dropped2d,
                                                          const at::Tensor& weight, const at::Tensor& a,
                                                          const std::optional<at::Tensor>& g, const at::Tensor& b,
                                                          const std::optional<at::Tensor>& bias, double scaling);

// grad_y [M, N], h0 [M, r] from the forward. -> (gx [M, K], gx_dropped [M, K], gw [N, K], ga [N, r], gb [r, K],
// gg like g). Without x_dropped2d, gx = gy W + ((gy A)·s G) B in one buffer (need_x) and gx_dropped is
// undefined; with it, gx = gy W (need_x) and gx_dropped = ((gy A)·s G) B (need_x_dropped), which autograd
// sends back through the dropout. A gradient not asked for is an undefined at::Tensor(). The bias
// gradient is left to the caller.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x2d, const std::optional<at::Tensor>& x_dropped2d,
    const at::Tensor& weight, const at::Tensor& a, const std::optional<at::Tensor>& g, const at::Tensor& b,
    const at::Tensor& h0, double scaling, bool need_x, bool need_x_dropped, bool need_weight, bool need_a,
    bool need_b, bool need_g);

}  // namespace subspace_ops
