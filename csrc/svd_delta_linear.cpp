// SVD-basis linear on the CPU (METHODS.md §2): SiVA, SAM-PARSER, SVDiff — the merged path.
//
//   W_eff = W + U diag(d) Vᵀ                       (2·N·K·k FLOPs: ~30× less than the main GEMM
//   y     = x W_effᵀ + b                            at ViT-B q with k ≈ 400 and M = 12 608)
//   gx    = gy W_eff
//   dd_j  = u_jᵀ G v_j = Σ_n U[n,j] (G V)[n,j],     G = gyᵀ x formed in blocks of rows and reduced at
//                                                   once; one block (all of G) when M >= 4·N, as in
//                                                   rescaled_linear.h's block_budget.
// The backward forms W_eff again for gx when asked to (need_x): the Python op keeps the forward's W_eff
// instead where it is small next to x (ops/svd_delta_linear.py, keeps_merged_weight) and then asks only for dd.
#include "svd_delta_linear.h"

#include "rescaled_linear.h"  // block_budget, block_rows: the shared temporary budget

namespace subspace_ops {
namespace {

void check_inputs(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, const at::Tensor& d) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [N, K], got ", weight.sizes());
  TORCH_CHECK(u.dim() == 2 && u.size(0) == weight.size(0), "u must be [N, k] with N=", weight.size(0), ", got ",
              u.sizes());
  TORCH_CHECK(v.dim() == 2 && v.size(0) == weight.size(1), "v must be [K, k] with K=", weight.size(1), ", got ",
              v.sizes());
  TORCH_CHECK(d.dim() == 1 && d.size(0) == u.size(1) && v.size(1) == u.size(1), "d must be [k] with k=", u.size(1),
              " (u) = ", v.size(1), " (v), got ", d.sizes());
  for (const auto* t : {&u, &v, &d}) {
    TORCH_CHECK(t->scalar_type() == weight.scalar_type(), "u, v, d must have weight's dtype");
    TORCH_CHECK(t->device().is_cpu(), "the cpu backend needs CPU tensors, got ", t->device());
  }
}

}  // namespace

at::Tensor svd_basis_weight(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, const at::Tensor& d) {
  check_inputs(weight, u, v, d);
  return at::addmm(weight, u * d, v.t());  // the scale by d rides on the small [N, k] factor
}

at::Tensor svd_delta_linear_forward(const at::Tensor& x2d, const at::Tensor& weight, const at::Tensor& u,
                                    const at::Tensor& v, const at::Tensor& d, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x2d.dim() == 2 && x2d.size(1) == weight.size(1), "x2d must be [M, K] with K=", weight.size(1));
  const at::Tensor w_eff = svd_basis_weight(weight, u, v, d);
  if (bias.has_value() && bias->defined()) return at::addmm(*bias, x2d, w_eff.t());
  return at::mm(x2d, w_eff.t());
}

std::tuple<at::Tensor, at::Tensor> svd_delta_linear_backward(const at::Tensor& grad_y, const at::Tensor& x2d,
                                                             const at::Tensor& weight, const at::Tensor& u,
                                                             const at::Tensor& v, const at::Tensor& d, bool need_x,
                                                             bool need_d) {
  check_inputs(weight, u, v, d);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == x2d.size(0) && grad_y.size(1) == weight.size(0),
              "grad_y must be [M, N]");
  at::Tensor gx, gd;
  if (need_x) gx = at::mm(grad_y, svd_basis_weight(weight, u, v, d));
  if (need_d) {
    const int64_t n = weight.size(0), k = weight.size(1);
    const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor gd_acc = at::zeros({u.size(1)}, d.options().dtype(acc));
    const int64_t budget = block_budget(x2d.size(0), n, k, weight.element_size());
    const int64_t rows = block_rows(n, k, weight.element_size(), budget);
    at::Tensor g_block = at::empty({rows, k}, weight.options());
    const at::Tensor v_acc = v.to(acc);
    for (int64_t n0 = 0; n0 < n; n0 += rows) {
      const int64_t nb = std::min(rows, n - n0);
      at::Tensor g = g_block.narrow(0, 0, nb);
      at::mm_out(g, grad_y.narrow(1, n0, nb).t(), x2d);  // G[block] = gy[:, block]ᵀ x
      // dd += Σ_{n in block} U[n, :] ⊙ (G[block] V)[n, :]
      gd_acc.add_((at::mm(g.to(acc), v_acc) * u.narrow(0, n0, nb).to(acc)).sum(0));
    }
    gd = gd_acc.to(d.scalar_type());
  }
  return {gx, gd};
}

}  // namespace subspace_ops
