// Rescaled linear on the CPU (METHODS.md §1): RLRR, SSB, SSL, (IA)³.
//
//   y  = x W'ᵀ + b,             W' = W ⊙ (c + S_l S_rᵀ),  c = 1 if residual else 0
//   gx = gy W'
//   G  = gyᵀ x                  (what full fine-tuning writes as dW)
//   ds_l[n,j] = Σ_k G[n,k] W[n,k] S_r[k,j]      ds_r[k,j] = Σ_n G[n,k] W[n,k] S_l[n,j]
//   dW = G ⊙ (c + S_l S_rᵀ)     (only if W is trained)
//
// Why blocks: W' and G are N×K, as big as the weight; materializing them would add a weight-sized
// temporary to every adapted layer, which is what this method is meant to avoid. So W' is formed a
// block of rows (or columns) at a time in a small buffer and consumed at once by one ATen GEMM, and G
// is formed a block of rows at a time and reduced into ds_l, ds_r (and dW) before the next block.
// A training step runs the three GEMMs of full fine-tuning plus O(N·K) elementwise work, and the only
// sizeable temporary of a call is one buffer of about kMaxBlockBytes (rescaled_linear.h), whatever N
// and K are (besides scale-gradient accumulators of [threads, r, N or K]). The exception is a large
// batch (M >= 4·N): there the buffer may hold all of W' (at most a quarter of x's size) and every GEMM
// runs unblocked, which measured ~2% faster per step (block_budget in rescaled_linear.h).
//
// How the GEMMs are blocked: in float32/float64 a GEMM is blocked along its reduction dimension and
// accumulates into its output with beta = 1 (y over blocks of K, gx over blocks of N). Small-M GEMMs
// keep their full output width that way and run nearly as fast as unblocked (blocking the output
// columns instead measured 5-10% slower at M = 197, K = N = 768, 2 threads). In half/bfloat16 a running
// sum in the output would be rounded once per block, so there (and when blocks would be too thin to
// accumulate efficiently) every output column block is written exactly once: y over blocks of N, gx
// over blocks of K. The backward's blocks of N are shared: one pass over W[blk] and G[blk] reduces
// G[blk] into the scale gradients and overwrites it with W'[blk] for gx, so W is read once per backward.
//
// float32 with at most rescaled_gemm::kMaxRows rows on an AVX-512 or AVX2 + FMA CPU skips all of the
// above: the GEMMs of rescaled_linear_gemm.cpp form W' while packing it and reduce G tile by tile in registers,
// so no block of W' or G is ever written (at M = 197, K = N = 768, 2 threads, each kernel runs within
// 0.95-1.11× of MKL's GEMM for the same product; the ATen-blocked kernels' three calls took 2.79-3.11 ms
// where three torch.mm took 2.29-2.57; beyond ~512 rows ATen's GEMMs, which block M, win).
//
// Layout: W is used in place whichever of its dimensions has unit stride (a transposed view, such as
// GPT-2's Conv1D weight, is not copied). With unit stride along N we work on Wᵀ, for which the same
// formulas hold with S_l and S_r swapped: Wᵀ ⊙ (c + S_r S_lᵀ) = W'ᵀ.
#include "rescaled_linear.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "rescaled_linear_gemm.h"

// The row loops below are written to auto-vectorize; on x86-64 GCC also emits AVX-512 and AVX2
// copies and picks one when the library is loaded (the default build flags only allow SSE2).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SUBSPACE_OPS_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SUBSPACE_OPS_VECTOR_CLONES
#endif

namespace subspace_ops {
namespace {

// A GEMM accumulated over blocks of its reduction dimension needs blocks at least this deep to stay efficient.
constexpr int64_t kMinAccumulateDepth = 128;

// ---- Row kernels. A row has q_len elements; b_t is [r, q_len] (row j = column j of the scale). ----

// dst[q] = src[q] · (c + Σ_j a[j] b_t[j, q]): one row of W' (src = W) or of dW (src = G).
template <typename scalar_t, typename acc_t>
SUBSPACE_OPS_VECTOR_CLONES void modulate_row(const scalar_t* __restrict src, scalar_t* __restrict dst, int64_t q_len,
                                             const acc_t* __restrict a, const acc_t* __restrict b_t, int64_t r,
                                             acc_t c, acc_t* __restrict scratch) {
  if (r == 1) {  // the common case, in one pass
    const acc_t a0 = a[0];
#pragma omp simd
    for (int64_t q = 0; q < q_len; ++q) dst[q] = static_cast<scalar_t>(static_cast<acc_t>(src[q]) * (c + a0 * b_t[q]));
    return;
  }
#pragma omp simd
  for (int64_t q = 0; q < q_len; ++q) scratch[q] = c;
  for (int64_t j = 0; j < r; ++j) {
    const acc_t a_j = a[j];
    const acc_t* b_j = b_t + j * q_len;
#pragma omp simd
    for (int64_t q = 0; q < q_len; ++q) scratch[q] += a_j * b_j[q];
  }
#pragma omp simd
  for (int64_t q = 0; q < q_len; ++q) dst[q] = static_cast<scalar_t>(static_cast<acc_t>(src[q]) * scratch[q]);
}

// With t = g ⊙ w (one row of G ⊙ W): row_sums[j] += Σ_q t[q] b_t[j, q] and col_sums_t[j, q] += t[q] a[j]
// (row j of col_sums_t starts at col_sums_t + j * col_ld).
template <typename scalar_t, typename acc_t>
SUBSPACE_OPS_VECTOR_CLONES void reduce_row(const scalar_t* __restrict g, const scalar_t* __restrict w, int64_t q_len,
                                           const acc_t* __restrict a, const acc_t* __restrict b_t, int64_t r,
                                           acc_t* __restrict row_sums, acc_t* __restrict col_sums_t, int64_t col_ld,
                                           acc_t* __restrict scratch) {
  if (r == 1) {  // the common case, in one pass
    const acc_t a0 = a[0];
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t q = 0; q < q_len; ++q) {
      const acc_t t = static_cast<acc_t>(g[q]) * static_cast<acc_t>(w[q]);
      sum += t * b_t[q];
      col_sums_t[q] += t * a0;
    }
    row_sums[0] += sum;
    return;
  }
#pragma omp simd
  for (int64_t q = 0; q < q_len; ++q) scratch[q] = static_cast<acc_t>(g[q]) * static_cast<acc_t>(w[q]);
  for (int64_t j = 0; j < r; ++j) {
    const acc_t a_j = a[j];
    const acc_t* b_j = b_t + j * q_len;
    acc_t* col_j = col_sums_t + j * col_ld;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t q = 0; q < q_len; ++q) {
      sum += scratch[q] * b_j[q];
      col_j[q] += scratch[q] * a_j;
    }
    row_sums[j] += sum;
  }
}

// ---- One pass over a block w [P, Q] of W (unit stride along Q); a [P, r], b [Q, r] are its scales. ----

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// What block_pass computes; an undefined tensor is skipped.
struct PassOutputs {
  at::Tensor w_mod;     // [P, Q]  = w ⊙ (c + a bᵀ): a block of W', to feed a GEMM (may alias g)
  at::Tensor g_mod;     // [P, Q]  = g ⊙ (c + a bᵀ): a block of dW
  at::Tensor a_grad;    // [P, r] += (g ⊙ w) b                              (accumulators in acc_type)
  at::Tensor b_grad_t;  // [threads, r, Q]: b_grad_t[task] += aᵀ (g ⊙ w) over the task's rows
};

// Works row by row, so a row of w and g is fetched from memory once and then reused from L1 by every
// output; w_mod is written last, so it may share its memory with g (each row of g is consumed before the
// same row of w_mod is written). Rows are split into one contiguous range per thread (task), and each task adds its column
// sums into its own slice of b_grad_t: no races, and the caller sums the slices in a fixed order, so
// the result does not depend on timing.
void block_pass(const at::Tensor& w, const at::Tensor& g, const at::Tensor& a, const at::Tensor& b, double c,
                const PassOutputs& out) {
  const int64_t p_len = w.size(0), q_len = w.size(1), r = a.size(1);
  const auto acc = acc_type(w.scalar_type());
  const at::Tensor a_acc = a.to(acc).contiguous(), b_t = b.t().to(acc).contiguous();
  const bool reduce = out.a_grad.defined();
  const int64_t min_rows = std::max<int64_t>(1, 16384 / std::max<int64_t>(q_len, 1));  // enough work for a thread
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p_len / min_rows));
  TORCH_INTERNAL_ASSERT(!reduce || out.b_grad_t.size(0) >= tasks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "rescaled_linear_block_pass", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* w_ptr = w.const_data_ptr<scalar_t>();
    const scalar_t* g_ptr = g.defined() ? g.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* w_mod_ptr = out.w_mod.defined() ? out.w_mod.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* g_mod_ptr = out.g_mod.defined() ? out.g_mod.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* a_grad_ptr = reduce ? out.a_grad.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* b_grad_ptr = reduce ? out.b_grad_t.mutable_data_ptr<acc_t>() : nullptr;
    const acc_t* a_ptr = a_acc.const_data_ptr<acc_t>();
    const acc_t* b_ptr = b_t.const_data_ptr<acc_t>();
    const auto ld = [](const at::Tensor& t, int64_t dim) { return t.defined() ? t.stride(dim) : 0; };
    const int64_t w_ld = w.stride(0), g_ld = ld(g, 0), w_mod_ld = ld(out.w_mod, 0), g_mod_ld = ld(out.g_mod, 0);
    const int64_t a_grad_ld = ld(out.a_grad, 0), b_grad_task_ld = ld(out.b_grad_t, 0), b_grad_ld = ld(out.b_grad_t, 1);
    const auto cc = static_cast<acc_t>(c);
    at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
      std::vector<acc_t> scratch(r == 1 ? 0 : q_len);
      for (int64_t task = task_begin; task < task_end; ++task) {
        for (int64_t p = task * p_len / tasks; p < (task + 1) * p_len / tasks; ++p) {
          const acc_t* a_p = a_ptr + p * r;
          if (reduce) {
            reduce_row<scalar_t, acc_t>(g_ptr + p * g_ld, w_ptr + p * w_ld, q_len, a_p, b_ptr, r,
                                        a_grad_ptr + p * a_grad_ld, b_grad_ptr + task * b_grad_task_ld, b_grad_ld,
                                        scratch.data());
          }
          if (g_mod_ptr != nullptr) {
            modulate_row<scalar_t, acc_t>(g_ptr + p * g_ld, g_mod_ptr + p * g_mod_ld, q_len, a_p, b_ptr, r, cc,
                                          scratch.data());
          }
          if (w_mod_ptr != nullptr) {  // last: w_mod may overwrite g, row by row
            modulate_row<scalar_t, acc_t>(w_ptr + p * w_ld, w_mod_ptr + p * w_mod_ld, q_len, a_p, b_ptr, r, cc,
                                          scratch.data());
          }
        }
      }
    });
  });
}

// ---- W in whichever orientation has unit stride along its second dimension. ----

struct Oriented {
  bool transposed;  // false: w = W [N, K], a = S_l, b = S_r.   true: w = Wᵀ [K, N], a = S_r, b = S_l.
  at::Tensor w, a, b;
};

Oriented orient(const at::Tensor& weight, const at::Tensor& s_l, const at::Tensor& s_r) {
  if (weight.stride(1) == 1) return {false, weight, s_l, s_r};
  if (weight.stride(0) == 1) return {true, weight.t(), s_r, s_l};
  return {false, weight.contiguous(), s_l, s_r};  // no unit stride at all: the only case that copies W
}

// The slice [start, start + len) along W's dimension weight_dim (0: N, 1: K), in o's orientation:
// w is sliced along its dimension d, and the scale along that dimension with it.
struct Block {
  int64_t d;
  at::Tensor w, a, b;
};

Block block(const Oriented& o, int64_t weight_dim, int64_t start, int64_t len) {
  const int64_t d = o.transposed ? 1 - weight_dim : weight_dim;
  return {d, o.w.narrow(d, start, len), d == 0 ? o.a.narrow(0, start, len) : o.a,
          d == 1 ? o.b.narrow(0, start, len) : o.b};
}

// A contiguous view of the start of a flat buffer, shaped like t.
at::Tensor buffer_like(const at::Tensor& buffer, const at::Tensor& t) {
  return buffer.narrow(0, 0, t.numel()).view(t.sizes());
}

// The slice of W' along W's dimension weight_dim, formed in `buffer`: a [len, K] or [N, len] view.
at::Tensor modulated_block(const Oriented& o, int64_t weight_dim, int64_t start, int64_t len, double c,
                           const at::Tensor& buffer) {
  const Block blk = block(o, weight_dim, start, len);
  const at::Tensor w_mod = buffer_like(buffer, blk.w);
  block_pass(blk.w, at::Tensor(), blk.a, blk.b, c, {w_mod, {}, {}, {}});
  return o.transposed ? w_mod.t() : w_mod;
}

// Whether a GEMM may be accumulated in its output over blocks of `step` along a reduction dimension of
// length `dim` (see the top of this file).
bool accumulate_over(int64_t step, int64_t dim, at::ScalarType dtype) {
  return (dtype == at::kFloat || dtype == at::kDouble) && step >= std::min(dim, kMinAccumulateDepth);
}

// float32 on an AVX-512 or AVX2 + FMA CPU with at most rescaled_gemm::kMaxRows rows: the GEMMs of
// rescaled_linear_gemm.cpp, which form W' while packing it and reduce G while it is in registers,
// replace the ATen GEMMs over blocks of W' below.
bool use_own_gemms(const at::Tensor& x2d, int64_t n, int64_t k) {
  const int64_t m = x2d.size(0);
  return x2d.scalar_type() == at::kFloat && m > 0 && m <= rescaled_gemm::max_rows() && n > 0 && k > 0;
}

// W' in o's orientation as the own GEMMs take it; a and b_t own the contiguous scales it points to.
struct GemmWeight {
  at::Tensor a, b_t;
  rescaled_gemm::ModulatedWeight view;
};

GemmWeight gemm_weight(const Oriented& o, double c) {
  GemmWeight out{o.a.contiguous(), o.b.t().contiguous(), {}};
  out.view = {o.w.const_data_ptr<float>(), o.w.stride(0),         o.w.size(0), o.w.size(1),
              out.a.const_data_ptr<float>(), out.b_t.const_data_ptr<float>(), o.a.size(1), static_cast<float>(c)};
  return out;
}

// t itself if its rows have unit stride, else a contiguous copy.
at::Tensor unit_column_stride(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

void check_inputs(const at::Tensor& x2d, const at::Tensor& weight, const at::Tensor& s_l, const at::Tensor& s_r) {
  TORCH_CHECK(x2d.dim() == 2, "rescaled_linear: x2d must be 2-D [M, K], got shape ", x2d.sizes());
  TORCH_CHECK(weight.dim() == 2, "rescaled_linear: weight must be 2-D [N, K], got shape ", weight.sizes());
  TORCH_CHECK(x2d.size(1) == weight.size(1), "rescaled_linear: x2d has K = ", x2d.size(1),
              " features but weight [N, K] has K = ", weight.size(1));
  TORCH_CHECK(s_l.dim() == 2 && s_l.size(0) == weight.size(0), "rescaled_linear: s_l must be [N, r] with N = ",
              weight.size(0), ", got shape ", s_l.sizes());
  TORCH_CHECK(s_r.dim() == 2 && s_r.size(0) == weight.size(1), "rescaled_linear: s_r must be [K, r] with K = ",
              weight.size(1), ", got shape ", s_r.sizes());
  TORCH_CHECK(s_l.size(1) == s_r.size(1) && s_l.size(1) >= 1,
              "rescaled_linear: s_l and s_r must have the same rank r >= 1, got ", s_l.size(1), " and ", s_r.size(1));
  const auto dtype = x2d.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "rescaled_linear: x2d must be float32, float64, float16 or bfloat16, got ", dtype);
  const std::pair<const char*, const at::Tensor*> inputs[] = {
      {"x2d", &x2d}, {"weight", &weight}, {"s_l", &s_l}, {"s_r", &s_r}};
  for (const auto& [name, t] : inputs) {
    TORCH_CHECK(t->scalar_type() == dtype, "rescaled_linear: ", name, " must have x2d's dtype ", dtype, ", got ",
                t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), "rescaled_linear: ", name, " must be a CPU tensor, got device ", t->device());
  }
}

// The backward's outputs in o's orientation (o.w is [P, Q]); an undefined tensor is not asked for.
struct Gradients {
  at::Tensor gx;        // [M, K]
  at::Tensor gw_o;      // [P, Q]
  at::Tensor a_grad;    // [P, r] accumulator, zeroed (the own GEMMs write it instead)
  at::Tensor b_grad_t;  // [threads, r, Q] accumulators, zeroed (backward_aten only)
  at::Tensor b_grad;    // [Q, r] (backward_own_gemms only: written whole)
};

void backward_own_gemms(const at::Tensor& grad_y, const at::Tensor& x2d, const Oriented& o, double c,
                     const Gradients& out) {
  const GemmWeight w = gemm_weight(o, c);
  const at::Tensor x_rows = unit_column_stride(x2d), gy_rows = unit_column_stride(grad_y);
  const int64_t m = x2d.size(0);
  if (out.gx.defined()) {  // gx = gy W': its columns run along K, which is o's P exactly when o is transposed
    rescaled_gemm::modulated_matmul(gy_rows.const_data_ptr<float>(), gy_rows.stride(0), m, w.view, o.transposed,
                                      nullptr, out.gx.mutable_data_ptr<float>(), out.gx.stride(0));
  }
  const bool need_scales = out.a_grad.defined(), need_weight = out.gw_o.defined();
  if (need_scales || need_weight) {  // G in o's orientation: gyᵀ x [N, K], or xᵀ gy when o is Wᵀ
    const at::Tensor& ap = o.transposed ? x_rows : gy_rows;
    const at::Tensor& bq = o.transposed ? gy_rows : x_rows;
    rescaled_gemm::reduce_weight_gradients(
        ap.const_data_ptr<float>(), ap.stride(0), bq.const_data_ptr<float>(), bq.stride(0), m, w.view,
        need_scales ? out.a_grad.mutable_data_ptr<float>() : nullptr,
        need_scales ? out.b_grad.mutable_data_ptr<float>() : nullptr,
        need_weight ? out.gw_o.mutable_data_ptr<float>() : nullptr, need_weight ? out.gw_o.stride(0) : 0);
  }
}

void backward_aten(const at::Tensor& grad_y, const at::Tensor& x2d, const Oriented& o, double c,
                   const Gradients& out) {
  const at::Tensor& weight = o.w;
  const int64_t m = x2d.size(0), n = grad_y.size(1), k = x2d.size(1);
  const int64_t budget = block_budget(m, n, k, weight.element_size());
  const int64_t n_step = block_rows(n, k, weight.element_size(), budget);
  const bool need_x = out.gx.defined(), need_weight = out.gw_o.defined(), need_scales = out.a_grad.defined();
  const bool need_g = need_weight || need_scales;
  const bool gx_by_rows = need_x && accumulate_over(n_step, n, x2d.scalar_type());
  at::Tensor gx = out.gx;
  // Over blocks of N: G[blk] = gy[:, blk]ᵀ x, then one pass over W[blk] and G[blk] reduces G[blk] into the
  // scale gradients (and dW[blk]) and forms W'[blk], in place of G[blk], for gx += gy[:, blk] W'[blk].
  if (need_g || gx_by_rows) {
    const at::Tensor buffer = at::empty({n_step * k}, weight.options());
    for (int64_t n0 = 0; n0 < n; n0 += n_step) {
      const int64_t nb = std::min(n_step, n - n0);
      const Block blk = block(o, 0, n0, nb);
      const at::Tensor gy_cols = grad_y.narrow(1, n0, nb);
      at::Tensor g;
      PassOutputs pass;
      if (need_g) {  // G[blk] in o's orientation: [nb, K], or its transpose [K, nb]
        g = buffer_like(buffer, blk.w);
        if (blk.d == 0) {
          at::mm_out(g, gy_cols.t(), x2d);
        } else {
          at::mm_out(g, x2d.t(), gy_cols);
        }
      }
      if (gx_by_rows) pass.w_mod = buffer_like(buffer, blk.w);
      if (need_weight) pass.g_mod = out.gw_o.narrow(blk.d, n0, nb);
      if (need_scales) {
        pass.a_grad = blk.d == 0 ? out.a_grad.narrow(0, n0, nb) : out.a_grad;
        pass.b_grad_t = blk.d == 1 ? out.b_grad_t.narrow(2, n0, nb) : out.b_grad_t;
      }
      block_pass(blk.w, g, blk.a, blk.b, c, pass);
      if (gx_by_rows) {
        const at::Tensor w_mod = o.transposed ? pass.w_mod.t() : pass.w_mod;  // W'[blk], [nb, K]
        if (n0 == 0) {
          at::mm_out(gx, gy_cols, w_mod);
        } else {
          gx.addmm_(gy_cols, w_mod);
        }
      }
    }
    if (gx_by_rows && n == 0) gx.zero_();
  }
  if (need_x && !gx_by_rows) {
    // gx[:, blk] = gy W'[:, blk] over blocks of K, each column slice written (and rounded) once.
    const int64_t k_step = block_rows(k, n, weight.element_size(), budget);
    const at::Tensor buffer = at::empty({n * k_step}, weight.options());
    for (int64_t k0 = 0; k0 < k; k0 += k_step) {
      const int64_t kb = std::min(k_step, k - k0);
      at::Tensor gx_cols = gx.narrow(1, k0, kb);
      at::mm_out(gx_cols, grad_y, modulated_block(o, 1, k0, kb, c, buffer));
    }
  }
}

}  // namespace

at::Tensor rescaled_linear_forward(const at::Tensor& x2d, const at::Tensor& weight, const at::Tensor& s_l,
                                   const at::Tensor& s_r, const std::optional<at::Tensor>& bias, bool residual) {
  check_inputs(x2d, weight, s_l, s_r);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "rescaled_linear: bias must be [N] with N = ",
                weight.size(0), ", got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x2d.scalar_type(), "rescaled_linear: bias must have x2d's dtype ",
                x2d.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK(bias->device().is_cpu(), "rescaled_linear: bias must be a CPU tensor, got device ", bias->device());
  }
  const Oriented o = orient(weight, s_l, s_r);
  const int64_t m = x2d.size(0), n = weight.size(0), k = weight.size(1);
  const double c = residual ? 1.0 : 0.0;
  at::Tensor y = at::empty({m, n}, x2d.options());
  if (k == 0 || n == 0) return has_bias ? y.copy_(bias->expand({m, n})) : y.zero_();

  if (use_own_gemms(x2d, n, k)) {
    const GemmWeight w = gemm_weight(o, c);
    const at::Tensor x_rows = unit_column_stride(x2d), bias_c = has_bias ? bias->contiguous() : at::Tensor();
    rescaled_gemm::modulated_matmul(x_rows.const_data_ptr<float>(), x_rows.stride(0), m, w.view, !o.transposed,
                                      has_bias ? bias_c.const_data_ptr<float>() : nullptr, y.mutable_data_ptr<float>(),
                                      n);
    return y;
  }

  const int64_t budget = block_budget(m, n, k, weight.element_size());
  const int64_t k_step = block_rows(k, n, weight.element_size(), budget);
  if (accumulate_over(k_step, k, x2d.scalar_type())) {
    // y = Σ over blocks of K of x[:, blk] W'[:, blk]ᵀ, accumulated in y; the first block adds the bias.
    const at::Tensor buffer = at::empty({n * k_step}, weight.options());
    for (int64_t k0 = 0; k0 < k; k0 += k_step) {
      const int64_t kb = std::min(k_step, k - k0);
      const at::Tensor w_mod_t = modulated_block(o, 1, k0, kb, c, buffer).t();  // W'[:, blk]ᵀ, [kb, N]
      const at::Tensor x_cols = x2d.narrow(1, k0, kb);
      if (k0 > 0) {
        y.addmm_(x_cols, w_mod_t);
      } else if (has_bias) {
        at::addmm_out(y, *bias, x_cols, w_mod_t);
      } else {
        at::mm_out(y, x_cols, w_mod_t);
      }
    }
  } else {
    // y[:, blk] = x W'[blk]ᵀ (+ b[blk]) over blocks of N; BLAS writes the column slice in place (ldc = N).
    const int64_t n_step = block_rows(n, k, weight.element_size(), budget);
    const at::Tensor buffer = at::empty({n_step * k}, weight.options());
    for (int64_t n0 = 0; n0 < n; n0 += n_step) {
      const int64_t nb = std::min(n_step, n - n0);
      const at::Tensor w_mod_t = modulated_block(o, 0, n0, nb, c, buffer).t();  // W'[blk]ᵀ, [K, nb]
      at::Tensor y_cols = y.narrow(1, n0, nb);
      if (has_bias) {
        at::addmm_out(y_cols, bias->narrow(0, n0, nb), x2d, w_mod_t);
      } else {
        at::mm_out(y_cols, x2d, w_mod_t);
      }
    }
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rescaled_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x2d, const at::Tensor& weight, const at::Tensor& s_l,
    const at::Tensor& s_r, bool residual, bool need_x, bool need_weight, bool need_scales) {
  check_inputs(x2d, weight, s_l, s_r);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == x2d.size(0) && grad_y.size(1) == weight.size(0),
              "rescaled_linear: grad_y must be [M, N] = [", x2d.size(0), ", ", weight.size(0), "], got shape ",
              grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x2d.scalar_type(), "rescaled_linear: grad_y must have x2d's dtype ",
              x2d.scalar_type(), ", got ", grad_y.scalar_type());
  TORCH_CHECK(grad_y.device().is_cpu(), "rescaled_linear: grad_y must be a CPU tensor, got device ", grad_y.device());
  const Oriented o = orient(weight, s_l, s_r);
  const int64_t n = weight.size(0), k = weight.size(1), r = s_l.size(1);
  const double c = residual ? 1.0 : 0.0;

  at::Tensor gx, gw, gs_l, gs_r;
  if (need_x) gx = at::empty_like(x2d, at::MemoryFormat::Contiguous);
  // In o's orientation (o.w is [P, Q]): gw_o [P, Q]; the scale gradients of o's rows a_grad [P, r] and of its
  // columns, b_grad [Q, r] (own GEMMs) or accumulators b_grad_t [threads, r, Q] summed below (ATen).
  Gradients out;
  out.gx = gx;
  if (need_weight) out.gw_o = at::empty(o.w.sizes(), weight.options());
  const bool own_gemms = use_own_gemms(x2d, n, k);
  if (need_scales && own_gemms) {
    out.a_grad = at::empty({o.w.size(0), r}, x2d.options());
    out.b_grad = at::empty({o.w.size(1), r}, x2d.options());
  } else if (need_scales) {
    const auto acc_options = x2d.options().dtype(acc_type(x2d.scalar_type()));
    out.a_grad = at::zeros({o.w.size(0), r}, acc_options);
    out.b_grad_t = at::zeros({at::get_num_threads(), r, o.w.size(1)}, acc_options);
  }
  if (own_gemms) {
    backward_own_gemms(grad_y, x2d, o, c, out);
  } else {
    backward_aten(grad_y, x2d, o, c, out);
  }
  if (need_weight) gw = o.transposed ? out.gw_o.t() : out.gw_o;
  if (need_scales) {
    const at::Tensor grad_a = own_gemms ? out.a_grad : out.a_grad.to(s_l.scalar_type());
    const at::Tensor grad_b = own_gemms ? out.b_grad : out.b_grad_t.sum(0).t().contiguous().to(s_l.scalar_type());
    gs_l = o.transposed ? grad_b : grad_a;
    gs_r = o.transposed ? grad_a : grad_b;
  }
  return {gx, gw, gs_l, gs_r};
}

}  // namespace subspace_ops
