// Register-blocked float32 GEMMs for the head-mixing kernel's tile shapes; see head_mixing_gemm.h.
//
// Both keep a block of C in AVX-512 registers (16 of them, or 24 for the accumulation's 6 x 4
// blocks) and stream the reduction dimension through it with avx512::fma_tile (avx512_tile.h).
// Blocks at the edges of a tile use the same loop with fewer registers.
#include "head_mixing_gemm.h"

#include "avx512_tile.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <vector>

namespace subspace_ops::gemm {

#if SUBSPACE_OPS_HAVE_AVX512
namespace {

using avx512::kLanes;

// c[KB keys, 16·RV rows] = Σ_t a[key, t] · bt[t, row]: KB keys broadcast from a (row stride lda),
// RV vectors of rows loaded from the packed bᵀ (row stride ldbt). The last vector stores only the
// lanes in last_lanes (a tile's rows need not be a multiple of 16). With kMax, row_max[r] also
// takes the maximum over the block's keys.
template <int KB, int RV, bool kMax>
SUBSPACE_OPS_AVX512 inline void scores_block(const float* a, int64_t lda, const float* bt, int64_t ldbt, int64_t dim,
                                             float* c, int64_t ldc, __mmask16 last_lanes, __m512* row_max) {
  __m512 acc[KB][RV];
  for (int kk = 0; kk < KB; ++kk)
    for (int r = 0; r < RV; ++r) acc[kk][r] = _mm512_setzero_ps();
  avx512::fma_tile<KB, RV>(a, lda, 1, bt, ldbt, dim, acc);
  for (int kk = 0; kk < KB; ++kk) {
    for (int r = 0; r < RV - 1; ++r) _mm512_storeu_ps(c + kk * ldc + r * kLanes, acc[kk][r]);
    _mm512_mask_storeu_ps(c + kk * ldc + (RV - 1) * kLanes, last_lanes, acc[kk][RV - 1]);
    if constexpr (kMax) {
      for (int r = 0; r < RV; ++r) row_max[r] = _mm512_max_ps(row_max[r], acc[kk][r]);
    }
  }
}

// All keys for RV vectors of rows: KB keys at a time, then the leftover keys one by one.
template <int KB, int RV, bool kMax>
SUBSPACE_OPS_AVX512 void scores_rows(const float* a, int64_t lda, const float* bt, int64_t ldbt, int64_t keys,
                                     int64_t dim, float* c, int64_t ldc, __mmask16 last_lanes, float* row_max) {
  __m512 max_vectors[RV];
  for (int r = 0; r < RV; ++r) max_vectors[r] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + KB <= keys; j += KB) {
    scores_block<KB, RV, kMax>(a + j * lda, lda, bt, ldbt, dim, c + j * ldc, ldc, last_lanes, max_vectors);
  }
  for (; j < keys; ++j) scores_block<1, RV, kMax>(a + j * lda, lda, bt, ldbt, dim, c + j * ldc, ldc, last_lanes, max_vectors);
  if constexpr (kMax) {
    for (int r = 0; r < RV - 1; ++r) _mm512_storeu_ps(row_max + r * kLanes, max_vectors[r]);
    _mm512_mask_storeu_ps(row_max + (RV - 1) * kLanes, last_lanes, max_vectors[RV - 1]);
  }
}

// c[RB rows, 16·DV columns] += Σ_j a[j, row] · b[j, column]: RB rows broadcast from a (key-major,
// row stride lda), DV vectors of columns loaded from b (row stride ldb).
template <int RB, int DV>
SUBSPACE_OPS_AVX512 inline void accumulate_block(const float* a, int64_t lda, const float* b, int64_t ldb,
                                                 int64_t keys, float* c, int64_t ldc) {
  __m512 acc[RB][DV];
  for (int ii = 0; ii < RB; ++ii)
    for (int v = 0; v < DV; ++v) acc[ii][v] = _mm512_loadu_ps(c + ii * ldc + v * kLanes);
  avx512::fma_tile<RB, DV>(a, 1, lda, b, ldb, keys, acc);
  for (int ii = 0; ii < RB; ++ii)
    for (int v = 0; v < DV; ++v) _mm512_storeu_ps(c + ii * ldc + v * kLanes, acc[ii][v]);
}

// All rows for DV vectors of columns: 8 rows at a time, then 4, then one by one.
template <int DV>
SUBSPACE_OPS_AVX512 void accumulate_columns(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t keys,
                                            int64_t rows, float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + 8 <= rows; i += 8) accumulate_block<8, DV>(a + i, lda, b, ldb, keys, c + i * ldc, ldc);
  for (; i + 4 <= rows; i += 4) accumulate_block<4, DV>(a + i, lda, b, ldb, keys, c + i * ldc, ldc);
  for (; i < rows; ++i) accumulate_block<1, DV>(a + i, lda, b, ldb, keys, c + i * ldc, ldc);
}

}  // namespace

bool available(int64_t dim) { return avx512::cpu_supported() && dim > 0 && dim % kLanes == 0; }

void pack_rows(const float* b, int64_t ldb, int64_t rows, int64_t dim, float alpha, PackedRows& out) {
  out.rows = rows;
  out.dim = dim;
  out.ld = (rows + kLanes - 1) / kLanes * kLanes;
  out.data.resize(dim * out.ld);
  for (int64_t t = 0; t < dim; ++t) {  // contiguous writes; the reads stride over ≤ 64 L1-resident rows
    float* column = out.data.data() + t * out.ld;
    for (int64_t i = 0; i < rows; ++i) column[i] = alpha * b[i * ldb + t];
    std::fill(column + rows, column + out.ld, 0.0f);
  }
}

template <bool kMax>
SUBSPACE_OPS_AVX512 void scores_all_rows(const float* a, int64_t lda, int64_t keys, const PackedRows& b, float* c,
                                         int64_t ldc, float* row_max) {
  const int64_t vectors = b.ld / kLanes;
  for (int64_t v = 0; v < vectors; v += 2) {
    const bool pair = v + 1 < vectors;  // two vectors of rows per pass while there are two left
    const int64_t last_start = (v + (pair ? 1 : 0)) * kLanes;
    const auto last_lanes = static_cast<__mmask16>((1u << (std::min(b.rows, last_start + kLanes) - last_start)) - 1u);
    const float* bt = b.data.data() + v * kLanes;
    float* max_v = kMax ? row_max + v * kLanes : nullptr;
    if (pair) {
      scores_rows<8, 2, kMax>(a, lda, bt, b.ld, keys, b.dim, c + v * kLanes, ldc, last_lanes, max_v);
    } else {
      scores_rows<16, 1, kMax>(a, lda, bt, b.ld, keys, b.dim, c + v * kLanes, ldc, last_lanes, max_v);
    }
  }
}

void scores_abt(const float* a, int64_t lda, int64_t keys, const PackedRows& b, float* c, int64_t ldc,
                float* row_max) {
  if (row_max != nullptr) {
    scores_all_rows<true>(a, lda, keys, b, c, ldc, row_max);
  } else {
    scores_all_rows<false>(a, lda, keys, b, c, ldc, row_max);
  }
}

// Keys per step of accumulate_atb: a step's rows of b (V) and of a (the mixed probabilities), 16 KB
// and 8 KB at D = 64 and 32 query rows, stay in L1 while every block of query rows reuses them. Over
// whole 256-key chunks each block of rows re-read b from L2 (6-7% slower end to end at B1 H8 N2048
// d64, 2 threads).
constexpr int64_t kAccumulateKeyStep = 64;

SUBSPACE_OPS_AVX512 void accumulate_atb(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t keys,
                                        int64_t rows, int64_t dim, float* c, int64_t ldc) {
  for (int64_t j0 = 0; j0 < keys; j0 += kAccumulateKeyStep) {
    const int64_t step_keys = std::min(kAccumulateKeyStep, keys - j0);
    const float* a_step = a + j0 * lda;
    const float* b_step = b + j0 * ldb;
    int64_t t = 0;
    // 64 columns (a whole row of b at D = 64) by 6 rows: 24 accumulators, and each b vector loaded
    // feeds 6 FMAs (measured ~4% faster end to end than 32 columns by 8 rows).
    for (; t + 4 * kLanes <= dim; t += 4 * kLanes) {
      const float* b_cols = b_step + t;
      float* c_cols = c + t;
      int64_t i = 0;
      for (; i + 6 <= rows; i += 6) accumulate_block<6, 4>(a_step + i, lda, b_cols, ldb, step_keys, c_cols + i * ldc, ldc);
      for (; i + 2 <= rows; i += 2) accumulate_block<2, 4>(a_step + i, lda, b_cols, ldb, step_keys, c_cols + i * ldc, ldc);
      for (; i < rows; ++i) accumulate_block<1, 4>(a_step + i, lda, b_cols, ldb, step_keys, c_cols + i * ldc, ldc);
    }
    for (; t + 2 * kLanes <= dim; t += 2 * kLanes) {
      accumulate_columns<2>(a_step, lda, b_step + t, ldb, step_keys, rows, c + t, ldc);
    }
    if (t < dim) {  // dim % 32 == 16
      accumulate_columns<1>(a_step, lda, b_step + t, ldb, step_keys, rows, c + t, ldc);
    }
  }
}

#else  // not x86-64 GCC/Clang: never available, so never called

bool available(int64_t) { return false; }
void pack_rows(const float*, int64_t, int64_t, int64_t, float, PackedRows&) {
  throw std::logic_error("gemm::pack_rows called where gemm::available() is false");
}
void scores_abt(const float*, int64_t, int64_t, const PackedRows&, float*, int64_t, float*) {
  throw std::logic_error("gemm::scores_abt called where gemm::available() is false");
}
void accumulate_atb(const float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t) {
  throw std::logic_error("gemm::accumulate_atb called where gemm::available() is false");
}

#endif

}  // namespace subspace_ops::gemm
