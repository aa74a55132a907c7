// What the float32 CPU GEMMs share (head mixing's, head_mixing_gemm.cpp; rescaled linear's,
// rescaled_linear_avx512.cpp): whether this CPU runs AVX-512 code, and their register-tile step.
//
// Every one of those GEMMs keeps a tile of C in AVX-512 registers and streams the reduction
// dimension through it: per step, V vector loads of one operand (B) and R broadcasts of the other
// (A) feed R·V FMAs. With R·V = 16-24 accumulators the FMA latency is covered and each loaded vector
// feeds several FMAs, so both FMA ports stay busy. They differ only in where A's values and B's rows
// sit, which fma_tile takes as strides.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#define SUBSPACE_OPS_HAVE_AVX512 1
#include <immintrin.h>
#define SUBSPACE_OPS_AVX512 __attribute__((target("avx512f")))
#else
#define SUBSPACE_OPS_HAVE_AVX512 0
#endif

namespace subspace_ops::avx512 {

// Whether this CPU (and OS) runs AVX-512F code; checked once. The AVX-512 kernels are compiled with
// a target attribute, whatever the build flags, and must be called only where this is true.
inline bool cpu_supported() {
#if SUBSPACE_OPS_HAVE_AVX512
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

constexpr int64_t kLanes = 16;  // floats per vector

#if SUBSPACE_OPS_HAVE_AVX512

// One reduction step: acc[i][v] += a_rows[i][offset] · b_row[16v .. 16v + 15].
template <int R, int V>
SUBSPACE_OPS_AVX512 inline void fma_step(const float* const (&a_rows)[R], int64_t offset, const float* b_row,
                                         __m512 (&acc)[R][V]) {
  __m512 b[V];
  for (int v = 0; v < V; ++v) b[v] = _mm512_loadu_ps(b_row + v * kLanes);
  for (int i = 0; i < R; ++i) {
    const __m512 a_value = _mm512_set1_ps(a_rows[i][offset]);
    for (int v = 0; v < V; ++v) acc[i][v] = _mm512_fmadd_ps(a_value, b[v], acc[i][v]);
  }
}

// acc[i][v] += a[i·a_row + t·a_step] · b[t·ldb + 16v .. 16v + 15] for i < R, v < V, summed over the
// steps t < depth. Two steps per loop iteration: the loop's own instructions compete with the FMAs
// for two of the CPU's ports, so halving them per FMA pays (measured ~4% of rescaled linear's
// 768 × 768 GEMM at 197 rows).
template <int R, int V>
SUBSPACE_OPS_AVX512 inline void fma_tile(const float* a, int64_t a_row, int64_t a_step, const float* b, int64_t ldb,
                                         int64_t depth, __m512 (&acc)[R][V]) {
  const float* rows[R];
  for (int i = 0; i < R; ++i) rows[i] = a + i * a_row;
  int64_t t = 0, offset = 0;
  for (; t + 1 < depth; t += 2, offset += 2 * a_step) {
    fma_step<R, V>(rows, offset, b + t * ldb, acc);
    fma_step<R, V>(rows, offset + a_step, b + (t + 1) * ldb, acc);
  }
  if (t < depth) fma_step<R, V>(rows, offset, b + t * ldb, acc);
}

#endif

}  // namespace subspace_ops::avx512
