// Products of a few rows with a weight, reading the weight once; see few_rows_matmul.h for why.
//
// Two loops cover both orientations of a row-major matrix b [P, Q] (unit stride along Q):
//   dot_rows:  a · bᵀ, each result a dot product along b's rows (threads split b's rows);
//   axpy_rows: a · b, each row of b added, scaled, into every row of the result (threads split the
//              result's columns).
// a · Wᵀ is dot_rows on W when W is row-major and axpy_rows on Wᵀ when W is a transposed view (GPT-2's
// Conv1D weight); a · W the other way round. Both read b in order along its rows, a few rows at a time,
// so the hardware prefetchers stream it, and reuse each loaded vector for every row of a.
#include "few_rows_matmul.h"

#include "cpu_simd.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace subspace_ops::few_rows {

int64_t max_rows() { return simd::isa() == simd::Isa::kNone ? 0 : kMaxRows; }

bool prefers(int64_t rows, bool transpose_weight) {
  return max_rows() > 0 && rows >= (transpose_weight ? 1 : 2) && rows <= kPreferredRows;
}

#if SUBSPACE_OPS_X86_SIMD

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace isa_avx512 {
using Simd = simd::Avx512Ops;
#include "few_rows_matmul_kernels.inc"
}  // namespace isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
using Simd = simd::Avx2Ops;
#include "few_rows_matmul_kernels.inc"
}  // namespace isa_avx2
#pragma GCC pop_options

namespace {

// out = a · bᵀ (dot) or a · b for a row-major b [p_len, q_len] with row stride ld_b.
void run(bool dot, const float* a, int64_t ld_a, int64_t rows, const float* b, int64_t ld_b, int64_t p_len,
         int64_t q_len, float* out, int64_t ld_out) {
  switch (simd::isa()) {
    case simd::Isa::kAvx512:
      return dot ? isa_avx512::dot_rows(a, ld_a, rows, b, ld_b, p_len, q_len, out, ld_out)
                 : isa_avx512::axpy_rows(a, ld_a, rows, b, ld_b, p_len, q_len, out, ld_out);
    case simd::Isa::kAvx2:
      return dot ? isa_avx2::dot_rows(a, ld_a, rows, b, ld_b, p_len, q_len, out, ld_out)
                 : isa_avx2::axpy_rows(a, ld_a, rows, b, ld_b, p_len, q_len, out, ld_out);
    case simd::Isa::kNone: break;
  }
  TORCH_CHECK(false, "few_rows::matmul called where max_rows() is 0");
}

}  // namespace

#else  // not x86-64 GCC/Clang: max_rows() is 0, so never called

namespace {
void run(bool, const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "few_rows::matmul called where max_rows() is 0");
}
}  // namespace

#endif

at::Tensor matmul(const at::Tensor& a, const at::Tensor& weight, bool transpose_weight) {
  TORCH_CHECK(a.dim() == 2 && weight.dim() == 2, "few_rows::matmul: a and weight must be 2-D, got ", a.dim(),
              "-D and ", weight.dim(), "-D");
  TORCH_CHECK(a.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && a.is_cpu() && weight.is_cpu(),
              "few_rows::matmul: a and weight must be float32 CPU tensors");
  const int64_t n = weight.size(0), k = weight.size(1), rows = a.size(0);
  TORCH_CHECK(rows <= kMaxRows, "few_rows::matmul: at most ", kMaxRows, " rows, got ", rows);
  TORCH_CHECK(a.size(1) == (transpose_weight ? k : n), "few_rows::matmul: a has ", a.size(1), " columns, expected ",
              transpose_weight ? k : n);
  // Only where simd::set_isa capped the loops after a caller asked max_rows() (tests): ATen's product.
  if (max_rows() == 0) return at::mm(a, transpose_weight ? weight.t() : weight);
  const at::Tensor a_dense = a.contiguous();
  // b: the row-major matrix the loops read: W itself, or Wᵀ when W is a transposed view.
  at::Tensor b = weight;
  bool b_is_weight = true;
  if (weight.stride(1) != 1 && k != 1) {
    if (weight.stride(0) == 1 || n == 1) {
      b = weight.t(), b_is_weight = false;
    } else {
      b = weight.contiguous();
    }
  }
  // a · Wᵀ = a · bᵀ (dot) when b = W, a · b when b = Wᵀ; a · W the other way round.
  const bool dot = transpose_weight == b_is_weight;
  const int64_t p_len = b.size(0), q_len = b.size(1);
  at::Tensor out = at::empty({rows, dot ? p_len : q_len}, a.options());
  if (rows == 0 || out.numel() == 0) return out;
  run(dot, a_dense.data_ptr<float>(), a_dense.stride(0), rows, b.data_ptr<float>(), b.stride(0), p_len, q_len,
      out.data_ptr<float>(), out.stride(0));
  return out;
}

at::Tensor product(const at::Tensor& a, const at::Tensor& weight, bool transpose_weight,
                   const std::optional<at::Tensor>& bias) {
  const bool with_bias = bias.has_value() && bias->defined();
  if (a.scalar_type() == at::kFloat && a.dim() == 2 && prefers(a.size(0), transpose_weight)) {
    at::Tensor out = matmul(a, weight, transpose_weight);
    return with_bias ? out.add_(*bias) : out;
  }
  const at::Tensor b = transpose_weight ? weight.t() : weight;
  return with_bias ? at::addmm(*bias, a, b) : at::mm(a, b);
}

}  // namespace subspace_ops::few_rows
