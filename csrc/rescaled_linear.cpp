// Rescaled linear on the CPU (METHODS.md §1): RLRR, SSB, SSL, (IA)³.
//
//   y  = x W'ᵀ + b,               W' = W ⊙ (c + S_l S_rᵀ)
//   gx = gy W'
//   G  = gyᵀ x                    (what full fine-tuning writes as dW; never written here)
//   ds_l[n,j] = Σ_k G[n,k] W[n,k] S_r[k,j]      ds_r[k,j] = Σ_n G[n,k] W[n,k] S_l[n,j]
//   dW = G ⊙ (c + S_l S_rᵀ)       (only if W is trained)
//
// W' is formed block by block in a small buffer and consumed at once by one GEMM that writes its
// own slice of the output exactly once (BLAS handles the leading dimension, so no copies):
//   forward: blocks of rows of W    -> columns of y
//   gx:      blocks of columns of W -> columns of gx (gx is never re-read to accumulate)
//   G:       blocks of rows         -> a [rows, K] buffer, reduced at once into ds_l, ds_r
// So a training step runs the three GEMMs of full fine-tuning, and every temporary is bounded by
// kMaxBlockBytes (rescaled_linear.h), whatever N and K are. Smaller blocks would cost speed: each
// block is one more GEMM call that streams all of x (or gy) again.
#include "rescaled_linear.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace subspace_ops {
namespace {

void check_inputs(const at::Tensor& x2d, const at::Tensor& weight, const at::Tensor& s_l, const at::Tensor& s_r) {
  TORCH_CHECK(x2d.dim() == 2, "x2d must be 2-D [M, K], got ", x2d.sizes());
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [N, K], got ", weight.sizes());
  TORCH_CHECK(x2d.size(1) == weight.size(1), "x2d has K=", x2d.size(1), " but weight has K=", weight.size(1));
  TORCH_CHECK(s_l.dim() == 2 && s_l.size(0) == weight.size(0), "s_l must be [N, r] with N=", weight.size(0),
              ", got ", s_l.sizes());
  TORCH_CHECK(s_r.dim() == 2 && s_r.size(0) == weight.size(1), "s_r must be [K, r] with K=", weight.size(1),
              ", got ", s_r.sizes());
  TORCH_CHECK(s_l.size(1) == s_r.size(1), "s_l and s_r must have the same rank, got ", s_l.size(1), " and ",
              s_r.size(1));
  for (const auto* t : {&weight, &s_l, &s_r}) {
    TORCH_CHECK(t->scalar_type() == x2d.scalar_type(), "all inputs must have x's dtype ", x2d.scalar_type(),
                ", got ", t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), "the cpu backend needs CPU tensors, got ", t->device());
  }
  TORCH_CHECK(x2d.device().is_cpu(), "the cpu backend needs CPU tensors, got ", x2d.device());
  TORCH_CHECK(x2d.is_floating_point(), "x2d must be floating point, got ", x2d.scalar_type());
}

// Accumulation type for reductions: float for half/bfloat16/float, double for double.
at::ScalarType accumulate_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// out[i, k] = rows[i, k] * (c + Σ_j s_l[i, j] s_r[k, j]), in one pass over a (row- or column-)
// block of W or G; `rows` needs unit stride along k, s_l / s_r are the matching [*, r] slices.
// With `rows` = W this is a block of W'; with `rows` = G it is a block of dW.
void modulate_rows(const at::Tensor& rows, const at::Tensor& s_l_block, const at::Tensor& s_r, double c,
                   at::Tensor& out) {
  const int64_t n = rows.size(0), k = rows.size(1), r = s_r.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "modulate_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = rows.const_data_ptr<scalar_t>();
    const scalar_t* left = s_l_block.const_data_ptr<scalar_t>();
    const scalar_t* right = s_r.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t src_ld = rows.stride(0), dst_ld = out.stride(0);
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* src_row = src + i * src_ld;
        scalar_t* dst_row = dst + i * dst_ld;
        int64_t kk = 0;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          if (r == 1) {  // the common case (RLRR, SSB), in SIMD registers
            using Vec = at::vec::Vectorized<acc_t>;
            const Vec a(left[i]), cv(static_cast<acc_t>(c));
            for (; kk + Vec::size() <= k; kk += Vec::size()) {
              (Vec::loadu(src_row + kk) * at::vec::fmadd(a, Vec::loadu(right + kk), cv)).store(dst_row + kk);
            }
          }
        }
        if (r == 1) {  // half/bfloat16, and the vector loop's tail
          const acc_t a = static_cast<acc_t>(left[i]);
          for (; kk < k; ++kk) {
            dst_row[kk] = static_cast<scalar_t>(static_cast<acc_t>(src_row[kk]) *
                                                (static_cast<acc_t>(c) + a * static_cast<acc_t>(right[kk])));
          }
        } else {
          for (; kk < k; ++kk) {
            acc_t m = static_cast<acc_t>(c);
            for (int64_t j = 0; j < r; ++j) {
              m += static_cast<acc_t>(left[i * r + j]) * static_cast<acc_t>(right[kk * r + j]);
            }
            dst_row[kk] = static_cast<scalar_t>(static_cast<acc_t>(src_row[kk]) * m);
          }
        }
      }
    });
  });
}

// For one block of rows: gs_l[i, j] = Σ_k T[i,k] s_r[k,j] and gs_r_acc[k, j] += Σ_i T[i,k] s_l[i,j]
// with T = G ⊙ W, in a single pass over G and W (T is never stored). Each thread sums its rows'
// contribution to gs_r into its own slice of `partial`; the slices are added at the end.
void reduce_scale_grads(const at::Tensor& g, const at::Tensor& w_rows, const at::Tensor& s_l_block,
                        const at::Tensor& s_r, at::Tensor& gs_l_block, at::Tensor& gs_r_acc) {
  const int64_t n = g.size(0), k = g.size(1), r = s_r.size(1);
  const int64_t threads = at::get_num_threads();
  at::Tensor partial = at::zeros({threads, k, r}, gs_r_acc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "reduce_scale_grads", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
    const scalar_t* w_ptr = w_rows.const_data_ptr<scalar_t>();
    const scalar_t* left = s_l_block.const_data_ptr<scalar_t>();
    const scalar_t* right = s_r.const_data_ptr<scalar_t>();
    scalar_t* out_left = gs_l_block.mutable_data_ptr<scalar_t>();
    acc_t* partial_ptr = partial.mutable_data_ptr<acc_t>();
    const int64_t g_ld = g.stride(0), w_ld = w_rows.stride(0);
    at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
      acc_t* mine = partial_ptr + at::get_thread_num() * k * r;
      std::vector<acc_t> row_sum(r);
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* g_row = g_ptr + i * g_ld;
        const scalar_t* w_row = w_ptr + i * w_ld;
        int64_t kk = 0;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          if (r == 1) {  // the common case, in SIMD registers (a scalar loop is latency-bound)
            using Vec = at::vec::Vectorized<acc_t>;
            const Vec left_i(left[i]);
            Vec sum(0);
            for (; kk + Vec::size() <= k; kk += Vec::size()) {
              const Vec t = Vec::loadu(g_row + kk) * Vec::loadu(w_row + kk);
              sum = at::vec::fmadd(t, Vec::loadu(right + kk), sum);
              at::vec::fmadd(t, left_i, Vec::loadu(mine + kk)).store(mine + kk);
            }
            row_sum[0] = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, sum);
          }
        }
        if (kk == 0) std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
        for (; kk < k; ++kk) {  // general rank, half/bfloat16, and the vector loop's tail
          const acc_t t = static_cast<acc_t>(g_row[kk]) * static_cast<acc_t>(w_row[kk]);
          for (int64_t j = 0; j < r; ++j) {
            row_sum[j] += t * static_cast<acc_t>(right[kk * r + j]);
            mine[kk * r + j] += t * static_cast<acc_t>(left[i * r + j]);
          }
        }
        for (int64_t j = 0; j < r; ++j) out_left[i * r + j] = static_cast<scalar_t>(row_sum[j]);
      }
    });
  });
  gs_r_acc.add_(partial.sum(0));
}

}  // namespace

at::Tensor rescaled_linear_forward(const at::Tensor& x2d_in, const at::Tensor& weight_in, const at::Tensor& s_l_in,
                                   const at::Tensor& s_r_in, const std::optional<at::Tensor>& bias, bool residual) {
  check_inputs(x2d_in, weight_in, s_l_in, s_r_in);
  const at::Tensor x2d = x2d_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor s_l = s_l_in.contiguous(), s_r = s_r_in.contiguous();
  const int64_t m = x2d.size(0), n = weight.size(0), k = weight.size(1);
  const double c = residual ? 1.0 : 0.0;
  at::Tensor y = at::empty({m, n}, x2d.options());
  const int64_t rows = block_rows(n, k, weight.element_size());
  at::Tensor w_block = at::empty({rows, k}, weight.options());
  for (int64_t n0 = 0; n0 < n; n0 += rows) {
    const int64_t nb = std::min(rows, n - n0);
    at::Tensor w_mod = w_block.narrow(0, 0, nb);
    modulate_rows(weight.narrow(0, n0, nb), s_l.narrow(0, n0, nb), s_r, c, w_mod);
    at::Tensor y_cols = y.narrow(1, n0, nb);  // strided view: BLAS writes it in place (ldc = N)
    if (bias.has_value() && bias->defined()) {
      at::addmm_out(y_cols, bias->narrow(0, n0, nb), x2d, w_mod.t());
    } else {
      at::mm_out(y_cols, x2d, w_mod.t());
    }
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rescaled_linear_backward(
    const at::Tensor& grad_y_in, const at::Tensor& x2d_in, const at::Tensor& weight_in, const at::Tensor& s_l_in,
    const at::Tensor& s_r_in, bool residual, bool need_x, bool need_weight, bool need_scales) {
  check_inputs(x2d_in, weight_in, s_l_in, s_r_in);
  TORCH_CHECK(grad_y_in.dim() == 2 && grad_y_in.size(0) == x2d_in.size(0) && grad_y_in.size(1) == weight_in.size(0),
              "grad_y must be [M, N] = [", x2d_in.size(0), ", ", weight_in.size(0), "], got ", grad_y_in.sizes());
  TORCH_CHECK(grad_y_in.scalar_type() == x2d_in.scalar_type(), "grad_y must have x's dtype");
  const at::Tensor grad_y = grad_y_in.contiguous(), x2d = x2d_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor s_l = s_l_in.contiguous(), s_r = s_r_in.contiguous();
  const int64_t n = weight.size(0), k = weight.size(1);
  const double c = residual ? 1.0 : 0.0;
  const auto acc = accumulate_type(x2d.scalar_type());

  at::Tensor gx, gw, gs_l, gs_r;
  if (need_x) gx = at::empty_like(x2d);
  if (need_weight) gw = at::empty_like(weight);
  at::Tensor gs_r_acc;
  if (need_scales) {
    gs_l = at::empty_like(s_l);
    gs_r_acc = at::zeros(s_r.sizes(), s_r.options().dtype(acc));
  }
  if (need_x) {  // gx[:, block] = gy W'[:, block], one GEMM per block of columns of W
    const int64_t cols = block_rows(k, n, weight.element_size());
    at::Tensor w_block = at::empty({n, cols}, weight.options());
    for (int64_t k0 = 0; k0 < k; k0 += cols) {
      const int64_t kb = std::min(cols, k - k0);
      at::Tensor w_mod = w_block.narrow(1, 0, kb);
      modulate_rows(weight.narrow(1, k0, kb), s_l, s_r.narrow(0, k0, kb), c, w_mod);
      at::Tensor gx_cols = gx.narrow(1, k0, kb);
      at::mm_out(gx_cols, grad_y, w_mod);
    }
  }
  if (need_weight || need_scales) {  // G[block] = gy[:, block]ᵀ x, reduced before the next block
    const int64_t rows = block_rows(n, k, weight.element_size());
    at::Tensor g_block = at::empty({rows, k}, weight.options());
    for (int64_t n0 = 0; n0 < n; n0 += rows) {
      const int64_t nb = std::min(rows, n - n0);
      const at::Tensor s_l_rows = s_l.narrow(0, n0, nb);
      at::Tensor g = g_block.narrow(0, 0, nb);
      at::mm_out(g, grad_y.narrow(1, n0, nb).t(), x2d);
      if (need_weight) {
        at::Tensor gw_rows = gw.narrow(0, n0, nb);
        modulate_rows(g, s_l_rows, s_r, c, gw_rows);
      }
      if (need_scales) {
        at::Tensor gs_l_rows = gs_l.narrow(0, n0, nb);
        reduce_scale_grads(g, weight.narrow(0, n0, nb), s_l_rows, s_r, gs_l_rows, gs_r_acc);
      }
    }
  }
  if (need_scales) gs_r = gs_r_acc.to(s_r.scalar_type());
  return {gx, gw, gs_l, gs_r};
}

}  // namespace subspace_ops
