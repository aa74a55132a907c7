// Register-blocked float32 GEMMs for the head-mixing kernel's tile shapes; see head_mixing_gemm.h.
//
// Both keep a block of C in vector registers (AVX-512: 16 of the 32, or 24 for the accumulation's
// 6 x 4 blocks; AVX2: 12 of the 16) and stream the reduction dimension through it. The loops are
// written once (head_mixing_gemm_kernels.inc) and compiled twice, for AVX-512 and for AVX2 + FMA,
// each with block sizes that fit its registers; the entry points below pick the widest this CPU
// runs (or the one set by set_isa, for tests). Blocks at the edges of a tile use the same loops with
// fewer registers.
#include "head_mixing_gemm.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <vector>

namespace subspace_ops::gemm {

#if SUBSPACE_OPS_X86_SIMD  // x86-64 with GCC/Clang: both instruction sets can be compiled

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace isa_avx512 {
struct Simd : simd::Avx512Ops {
  static constexpr int kScoreKeys1 = 16, kScoreKeys2 = 8;  // 16 accumulators either way
  static constexpr int kAccRows = 6, kAccVectors = 4;      // 64 columns by 6 rows: 24 accumulators
  static constexpr int64_t kAccumulateKeyStep = 64;
};
#include "head_mixing_gemm_kernels.inc"
}  // namespace isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
struct Simd : simd::Avx2Ops {
  static constexpr int kScoreKeys1 = 12, kScoreKeys2 = 6;  // 12 accumulators of the 16 registers
  static constexpr int kAccRows = 6, kAccVectors = 2;      // 16 columns by 6 rows: 12 accumulators
  static constexpr int64_t kAccumulateKeyStep = 256;
};
#include "head_mixing_gemm_kernels.inc"
}  // namespace isa_avx2
#pragma GCC pop_options

bool available(int64_t dim) {
  const Isa current = isa();
  const int64_t lanes = current == Isa::kAvx512 ? 16 : 8;
  return current != Isa::kNone && dim > 0 && dim % lanes == 0;
}

void scores_abt(const float* a, int64_t lda, int64_t keys, const PackedRows& b, float* c, int64_t ldc,
                float* row_max) {
  const bool avx512 = isa() == Isa::kAvx512;
  const float* bt = b.data.data();
  if (row_max != nullptr) {
    avx512 ? isa_avx512::scores_all_rows<true>(a, lda, keys, bt, b.ld, b.rows, b.dim, c, ldc, row_max)
           : isa_avx2::scores_all_rows<true>(a, lda, keys, bt, b.ld, b.rows, b.dim, c, ldc, row_max);
  } else {
    avx512 ? isa_avx512::scores_all_rows<false>(a, lda, keys, bt, b.ld, b.rows, b.dim, c, ldc, row_max)
           : isa_avx2::scores_all_rows<false>(a, lda, keys, bt, b.ld, b.rows, b.dim, c, ldc, row_max);
  }
}

void accumulate_atb(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t keys, int64_t rows,
                    int64_t dim, float* c, int64_t ldc) {
  if (isa() == Isa::kAvx512) {
    isa_avx512::accumulate_atb(a, lda, b, ldb, keys, rows, dim, c, ldc);
  } else {
    isa_avx2::accumulate_atb(a, lda, b, ldb, keys, rows, dim, c, ldc);
  }
}

void multiply_add(const float* a, int64_t lda, int64_t keys, const float* b, int64_t ldb, int64_t depth,
                  int64_t cols, float* c, int64_t ldc) {
  if (isa() == Isa::kAvx512) {
    isa_avx512::multiply_add(a, lda, keys, b, ldb, depth, cols, c, ldc);
  } else {
    isa_avx2::multiply_add(a, lda, keys, b, ldb, depth, cols, c, ldc);
  }
}

#else  // not x86-64 GCC/Clang: never available, so never called

bool available(int64_t) { return false; }
void scores_abt(const float*, int64_t, int64_t, const PackedRows&, float*, int64_t, float*) {
  throw std::logic_error("gemm::scores_abt called where gemm::available() is false");
}
void accumulate_atb(const float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t) {
  throw std::logic_error("gemm::accumulate_atb called where gemm::available() is false");
}
void multiply_add(const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float*, int64_t) {
  throw std::logic_error("gemm::multiply_add called where gemm::available() is false");
}

#endif

// Rows padded to 16 floats: whole vectors for either instruction set.
void pack_rows(const float* b, int64_t ldb, int64_t rows, int64_t dim, float alpha, PackedRows& out) {
  constexpr int64_t kPad = 16;
  out.rows = rows;
  out.dim = dim;
  out.ld = (rows + kPad - 1) / kPad * kPad;
  out.data.resize(dim * out.ld);
  for (int64_t t = 0; t < dim; ++t) {  // contiguous writes; the reads stride over ≤ 64 L1-resident rows
    float* column = out.data.data() + t * out.ld;
    for (int64_t i = 0; i < rows; ++i) column[i] = alpha * b[i * ldb + t];
    std::fill(column + rows, column + out.ld, 0.0f);
  }
}

}  // namespace subspace_ops::gemm
