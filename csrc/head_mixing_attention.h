// Head-mixing attention (Coeff-Tuning, METHODS.md §3) on the CPU:
//   O_h = Σ_g mix[h, g] · softmax(scale · Q_g K_gᵀ + mask)_g · V_h,
// computed block by block with O(N) memory per head (never a [B, H, Nq, Nk] tensor).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace subspace_ops {

// q [B, H, Nq, D], k and v [B, H, Nk, D], mix [H, H]; mask an additive floating tensor viewed as
// [B, H, Nq, Nk] (zero strides allowed; -inf = masked). is_causal: query i sees keys j <= i.
// -> (out [B, H, Nq, D] in q's dtype, lse [2, B, H, Nq]: lse[0] the row log-sum-exp L of the masked,
// scaled scores, +inf for a fully masked row so that its probabilities are exp(s - L) = 0; lse[1] what
// max + log-sum lost to rounding in L, nonzero only where the row max is huge: P = exp((s - L) - lse[1])).
// lse is float64 for float64 inputs, float32 otherwise. dropout_p > 0: dropout on the mixed maps with
// the mask reference.attention_dropout_keep draws from seed (a one-element int64 tensor); the
// backward takes the same dropout_p and seed.
std::tuple<at::Tensor, at::Tensor> head_mixing_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, const at::Tensor& mix,
                                                                 const std::optional<at::Tensor>& mask,
                                                                 bool is_causal, double scale, double dropout_p = 0.0,
                                                                 const std::optional<at::Tensor>& seed = std::nullopt);

// -> (dq, dk, dv in the inputs' dtype, dmix [H, H] in lse's dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_mixing_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mix,
    const std::optional<at::Tensor>& mask, const at::Tensor& lse, bool is_causal, double scale, double dropout_p = 0.0,
    const std::optional<at::Tensor>& seed = std::nullopt);

}  // namespace subspace_ops
