// The vector instruction sets of the float32 CPU kernels' own loops (head mixing's GEMMs and exp,
// rescaled linear's packing GEMMs): which one runs, and the vector operations they are written with.
//
// Those loops are written once against a `Simd` type and compiled twice, for AVX-512 and for
// AVX2 + FMA (a .inc file included in two `#pragma GCC target` regions); isa() picks the widest
// this CPU runs, and set_isa() caps it so that tests cover the narrower loops on wider CPUs.
// Avx512Ops and Avx2Ops are the operations both share; each kernel family adds its block sizes.
#pragma once

#include <cstdint>
#include <optional>

#if defined(__x86_64__) && defined(__GNUC__)
#define SUBSPACE_OPS_X86_SIMD 1
#include <immintrin.h>
#else
#define SUBSPACE_OPS_X86_SIMD 0
#endif

namespace subspace_ops::simd {

enum class Isa { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest of the three this CPU (and OS) runs, unless set_isa chose a narrower one.
Isa isa();
// Caps isa() at `choice` (never wider than the CPU runs); nullopt restores the default. For tests and
// benchmarks: not thread-safe against kernels running at the same time.
void set_isa(std::optional<Isa> choice);

#if SUBSPACE_OPS_X86_SIMD

#define SUBSPACE_OPS_ALWAYS_INLINE_AVX512 static inline __attribute__((always_inline, target("avx512f")))
#define SUBSPACE_OPS_ALWAYS_INLINE_AVX2 static inline __attribute__((always_inline, target("avx2,fma")))

// A Mask selects the first lanes of a vector (Ops::first(count)): the tails of rows that are not a
// whole number of vectors. Masked loads read (and fault on) only the selected lanes, zeroing the
// rest; masked stores write only the selected lanes.
struct Avx512Ops {
  using Vec = __m512;
  using Mask = __mmask16;
  static constexpr int64_t kLanes = 16;
  SUBSPACE_OPS_ALWAYS_INLINE_AVX512 Vec zero() { return _mm512_setzero_ps(); }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX512 Vec set1(float x) { return _mm512_set1_ps(x); }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX512 Vec load(const float* p) { return _mm512_loadu_ps(p); }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX512 Vec load_aligned(const float* p) { return _mm512_load_ps(p); }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX512 void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX512 void store_aligned(float* p, Vec v) { _mm512_store_ps(p, v); }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX512 Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX512 Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX512 Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX512 float reduce_add(Vec v) { return _mm512_reduce_add_ps(v); }
  // The first `count` lanes (none when count <= 0, all when count >= 16).
  SUBSPACE_OPS_ALWAYS_INLINE_AVX512 Mask first(int64_t count) {
    return count >= kLanes ? static_cast<Mask>(0xFFFF) : static_cast<Mask>((1u << (count > 0 ? count : 0)) - 1u);
  }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX512 Vec load(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX512 void store(float* p, Mask m, Vec v) { _mm512_mask_storeu_ps(p, m, v); }

  // Transposes 16 vectors in place (r[i][j] becomes r[j][i]): 2×2 blocks of floats, then of float
  // pairs, then of 128-bit lanes (two rounds).
  SUBSPACE_OPS_ALWAYS_INLINE_AVX512 void transpose(Vec (&r)[kLanes]) {
    Vec t[16];
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    // u[4g + c], lane L: column 4L + c of rows 4g .. 4g+3.
    Vec u[16];
    for (int g = 0; g < 4; ++g) {
      const __m512d lo_a = _mm512_castps_pd(t[4 * g]), hi_a = _mm512_castps_pd(t[4 * g + 1]);
      const __m512d lo_b = _mm512_castps_pd(t[4 * g + 2]), hi_b = _mm512_castps_pd(t[4 * g + 3]);
      u[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo_a, lo_b));
      u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo_a, lo_b));
      u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi_a, hi_b));
      u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi_a, hi_b));
    }
    // Row 4L + c of the result gathers lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
    for (int c = 0; c < 4; ++c) {
      const Vec rows01_lo = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44);  // u0.L0 u0.L1 u1.L0 u1.L1
      const Vec rows01_hi = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);  // u0.L2 u0.L3 u1.L2 u1.L3
      const Vec rows23_lo = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
      const Vec rows23_hi = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
      r[c] = _mm512_shuffle_f32x4(rows01_lo, rows23_lo, 0x88);
      r[4 + c] = _mm512_shuffle_f32x4(rows01_lo, rows23_lo, 0xDD);
      r[8 + c] = _mm512_shuffle_f32x4(rows01_hi, rows23_hi, 0x88);
      r[12 + c] = _mm512_shuffle_f32x4(rows01_hi, rows23_hi, 0xDD);
    }
  }
};

struct Avx2Ops {
  using Vec = __m256;
  // AVX2 has no mask registers: a lane mask in a vector, and whether it is all lanes, for which a
  // plain load or store is used (AMD's Zen cores run vmaskmovps stores in microcode, ~12 cycles
  // where a store takes 1, and most masks in these kernels are whole).
  struct Mask {
    __m256i lanes;
    bool whole;
  };
  static constexpr int64_t kLanes = 8;
  SUBSPACE_OPS_ALWAYS_INLINE_AVX2 Vec zero() { return _mm256_setzero_ps(); }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX2 Vec set1(float x) { return _mm256_set1_ps(x); }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX2 Vec load(const float* p) { return _mm256_loadu_ps(p); }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX2 Vec load_aligned(const float* p) { return _mm256_load_ps(p); }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX2 void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX2 void store_aligned(float* p, Vec v) { _mm256_store_ps(p, v); }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX2 Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX2 Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX2 Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX2 float reduce_add(Vec v) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    return _mm_cvtss_f32(_mm_add_ss(sum, _mm_movehdup_ps(sum)));
  }
  // The first `count` lanes (none when count <= 0, all when count >= 8).
  SUBSPACE_OPS_ALWAYS_INLINE_AVX2 Mask first(int64_t count) {
    const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int clamped = static_cast<int>(count < 0 ? 0 : count > kLanes ? kLanes : count);
    return {_mm256_cmpgt_epi32(_mm256_set1_epi32(clamped), index), count >= kLanes};
  }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX2 Vec load(Mask m, const float* p) {
    return m.whole ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m.lanes);
  }
  SUBSPACE_OPS_ALWAYS_INLINE_AVX2 void store(float* p, Mask m, Vec v) {
    if (m.whole) return _mm256_storeu_ps(p, v);
    _mm256_maskstore_ps(p, m.lanes, v);
  }

  // Transposes 8 vectors in place (r[i][j] becomes r[j][i]): 2×2 blocks of floats, then of float
  // pairs (within 128-bit lanes), then the 128-bit lanes.
  SUBSPACE_OPS_ALWAYS_INLINE_AVX2 void transpose(Vec (&r)[kLanes]) {
    Vec t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    // u[4g + c] holds columns c (low lane) and c + 4 (high lane) of rows 4g .. 4g+3.
    for (int g = 0; g < 2; ++g) {
      u[4 * g + 0] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
      u[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
      u[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
      u[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
      r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
    }
  }
};

#endif  // SUBSPACE_OPS_X86_SIMD

}  // namespace subspace_ops::simd
