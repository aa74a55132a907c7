// Why the cpu backend's eager path records its own C++ node instead of a torch.autograd.Function: a
// Python node runs Python and a dozen small tensor ops (views, reshapes, squeezes of the scale
// gradients) between the kernels, and each costs 10-20 µs when it runs right after a GEMM has evicted
// the interpreter's working set from the caches, 10-50× what it costs in a tight loop. At M = 197,
// K = N = 768 (2 threads, the interleaved benchmark) a step through the Python node took
// 0.2-0.25 ms longer than through this one, about 8% of the step. Here the node, the reshapes and the
// gradient bookkeeping are C++; the formulas are those of _gradients in ops/rescaled_linear.py, which
// the registered op (torch.compile) and the triton backend use.
#include "rescaled_linear_autograd.h"

#include "rescaled_linear.h"

#include <torch/autograd.h>

#include <vector>

namespace subspace_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A scale as the kernels take it, [length, rank]: a vector as one column, an absent scale as ones.
at::Tensor scale_matrix(const std::optional<at::Tensor>& scale, int64_t length, int64_t rank, const at::Tensor& x) {
  if (!given(scale)) return at::ones({length, rank}, x.options());
  return (scale->dim() == 1 ? scale->unsqueeze(1) : *scale).contiguous();
}

// x's shape with its last size replaced by `last`.
std::vector<int64_t> with_last(at::IntArrayRef shape, int64_t last) {
  std::vector<int64_t> out(shape.begin(), shape.end());
  out.back() = last;
  return out;
}

struct RescaledLinearFunction : public torch::autograd::Function<RescaledLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& s_l, const std::optional<at::Tensor>& s_r,
                            const std::optional<at::Tensor>& bias, bool residual) {
    const int64_t n = weight.size(0), k = weight.size(1);
    int64_t rank = 1;
    for (const auto* scale : {&s_l, &s_r}) {
      if (given(*scale) && (*scale)->dim() == 2) rank = (*scale)->size(1);
    }
    const at::Tensor x2d = x.reshape({-1, k});
    const at::Tensor a = scale_matrix(s_l, n, rank, x), b = scale_matrix(s_r, k, rank, x);
    ctx->save_for_backward({x2d, weight, a, b});
    ctx->saved_data["residual"] = residual;
    ctx->saved_data["x_shape"] = x.sizes();
    // needs_input_grad counts only the tensors given; these say which edge is which.
    ctx->saved_data["s_l"] = given(s_l) ? s_l->dim() : int64_t{0};  // 0: none
    ctx->saved_data["s_r"] = given(s_r) ? s_r->dim() : int64_t{0};
    ctx->saved_data["bias"] = given(bias);
    // _unsafe_view, not view: a view made inside a custom Function cannot be changed in place, and
    // callers may (timm's BEiT attention does `qkv += bias` after its qkv layer), as with nn.Linear.
    return at::_unsafe_view(rescaled_linear_forward(x2d, weight, a, b, bias, residual), with_last(x.sizes(), n));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // The kernels are not differentiable themselves: say so rather than return a graph that is wrong.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "rescaled_linear: double backward (create_graph=True) is not supported by the cpu backend's "
                "kernels; use backend='reference' for higher-order gradients");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x2d = saved[0], &weight = saved[1], &a = saved[2], &b = saved[3];
    const int64_t s_l_dim = ctx->saved_data["s_l"].toInt(), s_r_dim = ctx->saved_data["s_r"].toInt();
    const bool has_bias = ctx->saved_data["bias"].toBool();
    // Edges in forward's order, one per tensor given: x, weight, then s_l, s_r, bias where present.
    size_t edge = 2;
    const bool need_x = ctx->needs_input_grad(0), need_weight = ctx->needs_input_grad(1);
    const bool need_s_l = s_l_dim > 0 && ctx->needs_input_grad(edge++);
    const bool need_s_r = s_r_dim > 0 && ctx->needs_input_grad(edge++);
    const bool need_bias = has_bias && ctx->needs_input_grad(edge++);

    const at::Tensor grad_y = grads[0].reshape({-1, weight.size(0)});
    variable_list out(6);  // one per forward argument; undefined: no gradient
    if (need_x || need_weight || need_s_l || need_s_r) {
      auto [gx, gw, gs_l, gs_r] = rescaled_linear_backward(grad_y, x2d, weight, a, b,
                                                           ctx->saved_data["residual"].toBool(), need_x, need_weight,
                                                           need_s_l || need_s_r);
      if (need_x) out[0] = gx.view(ctx->saved_data["x_shape"].toIntVector());
      if (need_weight) out[1] = gw;
      if (need_s_l) out[2] = s_l_dim == 1 ? gs_l.squeeze(1) : gs_l;
      if (need_s_r) out[3] = s_r_dim == 1 ? gs_r.squeeze(1) : gs_r;
    }
    if (need_bias) out[4] = grad_y.sum(0);
    return out;
  }
};

}  // namespace

at::Tensor rescaled_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& s_l,
                                    const std::optional<at::Tensor>& s_r, const std::optional<at::Tensor>& bias,
                                    bool residual) {
  // What the kernels cannot check on the flattened x: the Python wrapper calls this node without
  // checking its arguments first and words the error (naming the argument) only when this raises.
  TORCH_CHECK_VALUE(weight.dim() == 2, "rescaled_linear: weight must be 2-D [N, K], got shape ", weight.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == weight.size(1), "rescaled_linear: x must be [..., K] with K = ",
                    weight.size(1), ", got shape ", x.sizes());
  return RescaledLinearFunction::apply(x, weight, s_l, s_r, bias, residual);
}

}  // namespace subspace_ops
