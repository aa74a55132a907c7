// Fused low-rank linear on the CPU (METHODS.md §4): LoRA (G = I), AdaLoRA/TriLoRA (G diagonal), FLoRA (G r×r).
//
//   h0 = x_d Bᵀ                  [M, r]   (x_d = dropout(x), or x; saved for the backward)
//   y  = x Wᵀ + b, then y += s·h0 (A G)ᵀ     two ATen GEMMs writing one [M, N] buffer
//
//   t  = gy A                    [M, r]
//   gx = gy W, then gx += s·t (G B)         (without dropout; with it, s·t (G B) is returned on its
//                                            own and autograd applies the dropout mask to it)
//   dA = s·(gyᵀ h0) Gᵀ  [N, r]      dB = s·Gᵀ (tᵀ x_d)  [r, K]      dW = gyᵀ x (only when W is trained)
//   dG = s·tᵀ h0 (full)  or its diagonal
//
// With a few rows (decoding) the products with W run on csrc/few_rows_matmul.h's loops, which read W once.
//
// ΔW = s·A G B is never formed, and no [M, N] tensor is allocated besides y (PEFT's LoRA writes three:
// the base output, the adapter output and their scaled sum) and no [M, K] one besides gx. The adapter's
// extra work is five GEMMs with an inner or outer dimension r, i.e. O((M + N + K)·r) memory traffic on
// top of the frozen layer's GEMMs. The scaling and G always ride on an [N, r], [r, K] or [r, r] factor
// (or the GEMM's alpha), never on an [M, r] or [M, N] one: on a shared machine every parallel
// elementwise pass is also one more synchronization of the thread pool.
//
// t = gy A and gyᵀ h0 are computed transposed, as (Aᵀ gyᵀ)ᵀ and (h0ᵀ gy)ᵀ: MKL runs a GEMM with an
// r-column output and a long [M, N] operand several times slower than the same product with r
// output rows. Measured (fp32, r = 8, 2 threads, AMD EPYC): t 1.815 -> 0.810 ms and gyᵀ h0
// 4.565 -> 0.686 ms at M = 4096, K = N = 768; 0.693 -> 0.236 and 0.855 -> 0.265 ms at M = 788,
// N = 1536, K = 384; 0.090 -> 0.034 and 0.093 -> 0.043 ms at M = 197, K = N = 768.
#include "lowrank_linear.h"

#include "few_rows_matmul.h"

namespace subspace_ops {
namespace {

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_inputs(const at::Tensor& x2d, const std::optional<at::Tensor>& x_dropped2d, const at::Tensor& weight,
                  const at::Tensor& a, const std::optional<at::Tensor>& g, const at::Tensor& b) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [N, K], got ", weight.sizes());
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(x2d.dim() == 2 && x2d.size(1) == k, "x2d must be [M, K] with K=", k, ", got ", x2d.sizes());
  if (present(x_dropped2d)) {
    TORCH_CHECK(x_dropped2d->sizes() == x2d.sizes(), "x_dropped2d must have x2d's shape ", x2d.sizes(), ", got ",
                x_dropped2d->sizes());
  }
  TORCH_CHECK(a.dim() == 2 && a.size(0) == n, "a must be [N, r] with N=", n, ", got ", a.sizes());
  const int64_t r = a.size(1);
  TORCH_CHECK(b.dim() == 2 && b.size(0) == r && b.size(1) == k, "b must be [r, K] with r=", r, ", K=", k, ", got ",
              b.sizes());
  if (present(g)) {
    TORCH_CHECK((g->dim() == 1 && g->size(0) == r) || (g->dim() == 2 && g->size(0) == r && g->size(1) == r),
                "g must be [r] or [r, r] with r=", r, ", got ", g->sizes());
  }
  for (const auto* t : {&x2d, &a, &b}) {
    TORCH_CHECK(t->scalar_type() == weight.scalar_type(), "x2d, a, b must have weight's dtype");
    TORCH_CHECK(t->device().is_cpu(), "the cpu backend needs CPU tensors, got ", t->device());
  }
}

// A G [N, r]: the up-projection with G folded in (N·r² work instead of M·r² on the activation).
at::Tensor up_projection(const at::Tensor& a, const std::optional<at::Tensor>& g) {
  if (!present(g)) return a;
  if (g->dim() == 1) return a * *g;
  return at::mm(a, *g);
}

// G B [r, K]: the down-projection with G folded in.
at::Tensor down_projection(const at::Tensor& b, const std::optional<at::Tensor>& g) {
  if (!present(g)) return b;
  if (g->dim() == 1) return b * g->unsqueeze(1);
  return at::mm(*g, b);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lowrank_linear_forward(const at::Tensor& x2d,
                                                          const std::optional<at::Tensor>& x_dropped2d,
                                                          const at::Tensor& weight, const at::Tensor& a,
                                                          const std::optional<at::Tensor>& g, const at::Tensor& b,
                                                          const std::optional<at::Tensor>& bias, double scaling) {
  check_inputs(x2d, x_dropped2d, weight, a, g, b);
  const at::Tensor& xd = present(x_dropped2d) ? *x_dropped2d : x2d;
  at::Tensor h0 = at::mm(xd, b.t());
  at::Tensor y = few_rows::product(x2d, weight, true, bias);  // decoding: W read once
  y.addmm_(h0, up_projection(a, g).t(), /*beta=*/1, /*alpha=*/scaling);  // accumulates into y in place
  return {y, h0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x2d, const std::optional<at::Tensor>& x_dropped2d,
    const at::Tensor& weight, const at::Tensor& a, const std::optional<at::Tensor>& g, const at::Tensor& b,
    const at::Tensor& h0, double scaling, bool need_x, bool need_x_dropped, bool need_weight, bool need_a,
    bool need_b, bool need_g) {
  check_inputs(x2d, x_dropped2d, weight, a, g, b);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == x2d.size(0) && grad_y.size(1) == weight.size(0),
              "grad_y must be [M, N] = [", x2d.size(0), ", ", weight.size(0), "], got ", grad_y.sizes());
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == x2d.size(0) && h0.size(1) == a.size(1), "h0 must be [M, r], got ",
              h0.sizes());
  const bool dropped = present(x_dropped2d);
  const bool diagonal = present(g) && g->dim() == 1;
  const at::Tensor& xd = dropped ? *x_dropped2d : x2d;
  need_x_dropped = need_x_dropped && dropped;
  need_g = need_g && present(g);
  const bool adapter_x = need_x_dropped || (need_x && !dropped);  // u B is needed

  // Every scale by s or G is applied to an [N, r], [r, K] or [r, r] factor, never to an [M, r] one.
  at::Tensor gx, gxd, gw, ga, gb, gg, t;
  if (adapter_x || need_b || need_g) t = at::mm(a.t(), grad_y.t()).t();  // [M, r], a transposed view
  if (need_x) {
    gx = few_rows::product(grad_y, weight, false);
    if (!dropped) gx.addmm_(t, down_projection(b, g), /*beta=*/1, /*alpha=*/scaling);  // gy W + s·t G B
  }
  if (need_x_dropped) gxd = at::mm(t, down_projection(b, g).mul(scaling));
  if (need_weight) gw = at::mm(grad_y.t(), x2d);
  if (need_a) {  // s · (gyᵀ h0) Gᵀ
    at::Tensor p = at::mm(h0.t(), grad_y).t().contiguous();  // gyᵀ h0 [N, r]
    if (!present(g)) {
      ga = p.mul_(scaling);
    } else if (diagonal) {
      ga = p.mul_(g->mul(scaling));
    } else {
      ga = at::mm(p, g->t().mul(scaling));
    }
  }
  if (need_b) {  // s · Gᵀ (tᵀ x_d)
    at::Tensor q = at::mm(t.t(), xd);
    if (!present(g)) {
      gb = q.mul_(scaling);
    } else if (diagonal) {
      gb = q.mul_(g->mul(scaling).unsqueeze(1));
    } else {
      gb = at::mm(g->t().mul(scaling), q);
    }
  }
  if (need_g) {  // s · tᵀ h0, or its diagonal: one r×M×r GEMM either way
    at::Tensor full = at::mm(t.t(), h0).mul_(scaling);
    gg = diagonal ? full.diagonal().clone() : full;
  }
  return {gx, gxd, gw, ga, gb, gg};
}

}  // namespace subspace_ops
