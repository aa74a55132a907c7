// Loops over head-mixing score tiles; see head_mixing_tiles.h for the layout and the contracts.
//
// The float entry points are compiled three times (AVX-512, AVX2, baseline x86-64) through GCC/Clang
// function multiversioning, and the loader picks the widest one the CPU has: the extension is built
// from source with the default -march, so without this every loop would be limited to SSE2. The
// float exp_shifted, the heaviest loop, also has a hand-written AVX-512 form (exp16 below), used
// when the CPU has AVX-512.
#include "head_mixing_tiles.h"

#include "head_mixing_gemm.h"  // gemm::isa

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define SUBSPACE_OPS_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define SUBSPACE_OPS_HAVE_X86_EXP 1
#include <immintrin.h>
#else
#define SUBSPACE_OPS_HAVE_X86_EXP 0
#define SUBSPACE_OPS_ISA_CLONES
#endif
#define SUBSPACE_OPS_INLINE inline __attribute__((always_inline))

// The 64-byte vector helpers below are always inlined into their (cloned) callers, so the note that
// passing such vectors by value changes the ABI without AVX-512 does not apply to anything here.
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace subspace_ops::tiles {
namespace {

// exp for float as a branch-free expression the compiler vectorizes: x = n·ln2 + r with
// n = round(x / ln2) (ln2 split in two so that r is exact), exp(r) by a degree-7 polynomial
// (the Cephes expf coefficients), 2ⁿ built in the exponent bits. Max relative error 8e-8 over
// [−87, 88] (measured against double exp); below −87 it returns 0 (exp(−inf) = 0 exactly, as the
// masks need), above 88.72 +inf, and NaN stays NaN.
SUBSPACE_OPS_INLINE float exp_of(float x) {
  const float clamped = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = clamped - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r * r + r + 1.0f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_to_n;
  std::memcpy(&two_to_n, &exponent_bits, sizeof(float));
  float y = poly * two_to_n;
  y = x < -87.0f ? 0.0f : y;
  y = x > 88.72f ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}

SUBSPACE_OPS_INLINE double exp_of(double x) { return std::exp(x); }

template <typename T>
SUBSPACE_OPS_INLINE void row_max_impl(const T* s, Shape shape, T* out) {
  for (int64_t h = 0; h < shape.heads; ++h) {
    T* m = out + h * shape.rows;
    for (int64_t i = 0; i < shape.rows; ++i) m[i] = -std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < shape.keys; ++c) {
      const T* x = s + h * shape.head_stride + c * shape.rows;
      for (int64_t i = 0; i < shape.rows; ++i) m[i] = x[i] > m[i] ? x[i] : m[i];
    }
  }
}

template <typename T>
SUBSPACE_OPS_INLINE void exp_shifted_impl(T* s, Shape shape, const T* shift, T* sums) {
  for (int64_t h = 0; h < shape.heads; ++h) {
    const T* m = shift + h * shape.rows;
    for (int64_t c = 0; c < shape.keys; ++c) {
      T* x = s + h * shape.head_stride + c * shape.rows;
      for (int64_t i = 0; i < shape.rows; ++i) x[i] = exp_of(x[i] - m[i]);
      if (sums != nullptr) {
        T* acc = sums + h * shape.rows;
        for (int64_t i = 0; i < shape.rows; ++i) acc[i] += x[i];
      }
    }
  }
}

#if SUBSPACE_OPS_HAVE_X86_EXP
// exp_of for 16 floats with AVX-512's own rounding and 2ⁿ-scaling instructions (vrndscaleps,
// vscalefps): the same polynomial in about 17 instructions, where the portable form compiles to ~28
// (perf, H = 8, N = 2048: the exp pass's share of the forward fell from 10% to 7%). Max relative
// error 8e-8 on [−87, 0], as
// exp_of; 0 below −87 (and for −inf), NaN kept (the clamps return x when it is NaN).
__attribute__((target("avx512f"), always_inline)) inline __m512 exp16(__m512 x) {
  const __m512 clamped = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), clamped);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
  __m512 poly = _mm512_set1_ps(1.9875691500e-4f);
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.3981999507e-3f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(8.3334519073e-3f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(4.1665795894e-2f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.6666665459e-1f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(poly, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(underflow, _mm512_scalef_ps(y, n), _mm512_setzero_ps());
}

// exp_shifted for float with exp16, head by head and vector of rows by vector of rows, so that the
// row sums stay in a register (a head's slice of a key chunk is L1-sized).
__attribute__((target("avx512f"))) void exp_shifted_avx512(float* s, Shape shape, const float* shift, float* sums) {
  for (int64_t h = 0; h < shape.heads; ++h) {
    for (int64_t i0 = 0; i0 < shape.rows; i0 += 16) {
      const __mmask16 lanes = static_cast<__mmask16>((1u << std::min<int64_t>(16, shape.rows - i0)) - 1u);
      const __m512 row_shift = _mm512_maskz_loadu_ps(lanes, shift + h * shape.rows + i0);
      __m512 row_sum = _mm512_setzero_ps();
      float* x = s + h * shape.head_stride + i0;
      for (int64_t c = 0; c < shape.keys; ++c, x += shape.rows) {
        const __m512 p = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, x), row_shift));
        _mm512_mask_storeu_ps(x, lanes, p);
        row_sum = _mm512_add_ps(row_sum, p);
      }
      if (sums != nullptr) {
        float* acc = sums + h * shape.rows + i0;
        _mm512_mask_storeu_ps(acc, lanes, _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, acc), row_sum));
      }
    }
  }
}

// exp_of for 8 floats with AVX2 + FMA: the same polynomial and clamps as exp16, with 2ⁿ built in the
// exponent bits (n ∈ [−126, 127] after the clamp). GCC does not vectorize the portable exp_of in
// the AVX2 clone (it stays scalar: on a Zen 3 EPYC the exp pass took 35% of the forward at H = 8,
// N = 2048, against 7% with exp16 on AVX-512 CPUs), hence this explicit form.
__attribute__((target("avx2,fma"), always_inline)) inline __m256 exp8(__m256 x) {
  const __m256 clamped = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(clamped, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), clamped);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682030941723212e-6f), r);
  __m256 poly = _mm256_set1_ps(1.9875691500e-4f);
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.3981999507e-3f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(8.3334519073e-3f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(4.1665795894e-2f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.6666665459e-1f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 scaled = _mm256_mul_ps(y, _mm256_castsi256_ps(exponent));
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  return _mm256_blendv_ps(scaled, _mm256_setzero_ps(), underflow);
}

// exp_shifted with exp8, laid out as exp_shifted_avx512 (rows < 8 of a vector masked by loads and
// stores through a lane mask).
__attribute__((target("avx2,fma"))) void exp_shifted_avx2(float* s, Shape shape, const float* shift, float* sums) {
  alignas(32) static const int32_t kLaneIndex[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  const __m256i lane_index = _mm256_load_si256(reinterpret_cast<const __m256i*>(kLaneIndex));
  for (int64_t h = 0; h < shape.heads; ++h) {
    for (int64_t i0 = 0; i0 < shape.rows; i0 += 8) {
      const int lanes_used = static_cast<int>(std::min<int64_t>(8, shape.rows - i0));
      const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes_used), lane_index);
      const __m256 row_shift = _mm256_maskload_ps(shift + h * shape.rows + i0, lanes);
      __m256 row_sum = _mm256_setzero_ps();
      float* x = s + h * shape.head_stride + i0;
      if (lanes_used == 8) {  // plain loads and stores: Zen cores run vmaskmovps stores in microcode
        for (int64_t c = 0; c < shape.keys; ++c, x += shape.rows) {
          const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(x), row_shift));
          _mm256_storeu_ps(x, p);
          row_sum = _mm256_add_ps(row_sum, p);
        }
      } else {
        for (int64_t c = 0; c < shape.keys; ++c, x += shape.rows) {
          const __m256 p = exp8(_mm256_sub_ps(_mm256_maskload_ps(x, lanes), row_shift));
          _mm256_maskstore_ps(x, lanes, p);
          row_sum = _mm256_add_ps(row_sum, p);  // masked-off lanes add exp(0 − 0) = 1, never stored
        }
      }
      if (sums != nullptr) {
        float* acc = sums + h * shape.rows + i0;
        _mm256_maskstore_ps(acc, lanes, _mm256_add_ps(_mm256_maskload_ps(acc, lanes), row_sum));
      }
    }
  }
}

// apply_dropout for float with AVX2 intrinsics, 8 rows at a time: GCC leaves the portable loop
// scalar (its unsigned compare has no AVX2 instruction), which cost 1.4x the forward's time at
// p = 0.1, H = 8, N = 2048. The compare flips the sign bits of both sides and compares signed.
__attribute__((target("avx2,fma"), always_inline)) inline __m256i hash8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7FEB352D));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int32_t>(0x846CA68BU)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

__attribute__((target("avx2,fma"))) void apply_dropout_avx2(float* t, Shape shape, const uint32_t* row_keys, int64_t j0,
                                                             uint32_t threshold, float keep_scale) {
  const __m256i sign = _mm256_set1_epi32(static_cast<int32_t>(0x80000000U));
  const __m256i limit = _mm256_set1_epi32(static_cast<int32_t>(threshold ^ 0x80000000U));
  const __m256 scale = _mm256_set1_ps(keep_scale);
  const int64_t whole = shape.rows - shape.rows % 8;
  for (int64_t h = 0; h < shape.heads; ++h) {
    const uint32_t* keys = row_keys + h * shape.rows;
    for (int64_t c = 0; c < shape.keys; ++c) {
      const uint32_t col = static_cast<uint32_t>(j0 + c);
      const __m256i col_v = _mm256_set1_epi32(static_cast<int32_t>(col));
      float* row = t + h * shape.head_stride + c * shape.rows;
      for (int64_t i = 0; i < whole; i += 8) {
        const __m256i key = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i));
        const __m256i bits = _mm256_xor_si256(hash8(_mm256_xor_si256(col_v, key)), sign);
        const __m256 dropped = _mm256_castsi256_ps(_mm256_cmpgt_epi32(limit, bits));  // bits < threshold
        _mm256_storeu_ps(row + i, _mm256_andnot_ps(dropped, _mm256_mul_ps(_mm256_loadu_ps(row + i), scale)));
      }
      for (int64_t i = whole; i < shape.rows; ++i) {
        row[i] = dropout_hash(col ^ keys[i]) >= threshold ? row[i] * keep_scale : 0.0f;
      }
    }
  }
}

#endif

// One vector of T, 64 bytes unless said otherwise; GCC/Clang lower it to whatever the clone's ISA
// has (64 bytes: 1 zmm, 2 ymm, 4 xmm).
template <typename T, int Bytes = 64>
struct Vector {
  typedef T type __attribute__((vector_size(Bytes)));
};

template <typename V, typename T>
SUBSPACE_OPS_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V, typename T>
SUBSPACE_OPS_INLINE void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(v));
}

constexpr int64_t kMaxVectorHeads = 64;  // mix_heads keeps one vector per input head on the stack (4 KB)

// The whole-vector rows of mix_heads for a head count known at compile time, KU key rows at a time:
// the KU·H input vectors stay in registers, and each coefficient vector loaded feeds KU FMAs. (With
// H a runtime value the input vectors live on the stack, and the loop issues about two loads per
// FMA: measured 1.8x slower at H = 8, 32 rows.)
template <typename T, int Bytes, int H, int KU>
SUBSPACE_OPS_INLINE void mix_vector_rows_fixed(const T* coef, const T* src, Shape shape, T* dst,
                                               int64_t dst_head_stride, int64_t vector_rows) {
  using Vec = typename Vector<T, Bytes>::type;
  constexpr int64_t kWidth = sizeof(Vec) / sizeof(T);
  const int64_t rows = shape.rows, keys = shape.keys;
  int64_t c = 0;
  const auto mix_keys = [&](auto key_count, int64_t c0) {
    constexpr int U = decltype(key_count)::value;
    for (int64_t i0 = 0; i0 < vector_rows; i0 += kWidth) {
      Vec x[U][H];
      for (int u = 0; u < U; ++u)
        for (int g = 0; g < H; ++g) x[u][g] = load<Vec>(src + g * shape.head_stride + (c0 + u) * rows + i0);
      for (int h = 0; h < H; ++h) {
        const T* coef_h = coef + h * H * rows + i0;
        Vec acc[U];
        const Vec first = load<Vec>(coef_h);
        for (int u = 0; u < U; ++u) acc[u] = first * x[u][0];
        for (int g = 1; g < H; ++g) {
          const Vec coef_g = load<Vec>(coef_h + g * rows);
          for (int u = 0; u < U; ++u) acc[u] += coef_g * x[u][g];
        }
        for (int u = 0; u < U; ++u) store<Vec>(dst + h * dst_head_stride + (c0 + u) * rows + i0, acc[u]);
      }
    }
  };
  for (; c + KU <= keys; c += KU) mix_keys(std::integral_constant<int, KU>{}, c);
  for (; c < keys; ++c) mix_keys(std::integral_constant<int, 1>{}, c);
}

// The same for any head count up to kMaxVectorHeads, one key row at a time.
template <typename T, int Bytes>
SUBSPACE_OPS_INLINE void mix_vector_rows_any(const T* coef, const T* src, Shape shape, T* dst, int64_t dst_head_stride,
                                             int64_t vector_rows) {
  using Vec = typename Vector<T, Bytes>::type;
  constexpr int64_t kWidth = sizeof(Vec) / sizeof(T);
  const int64_t heads = shape.heads, rows = shape.rows;
  Vec x[kMaxVectorHeads];
  for (int64_t c = 0; c < shape.keys; ++c) {
    for (int64_t i0 = 0; i0 < vector_rows; i0 += kWidth) {
      for (int64_t g = 0; g < heads; ++g) x[g] = load<Vec>(src + g * shape.head_stride + c * rows + i0);
      for (int64_t h = 0; h < heads; ++h) {
        const T* coef_h = coef + h * heads * rows + i0;
        Vec acc = load<Vec>(coef_h) * x[0];
        for (int64_t g = 1; g < heads; ++g) acc += load<Vec>(coef_h + g * rows) * x[g];
        store<Vec>(dst + h * dst_head_stride + c * rows + i0, acc);
      }
    }
  }
}

// Key row by key row (the tile is streamed once, in memory order), the row vectors of all input heads
// are loaded once and every output head is a chain of FMAs over them (coefficients from L1).
// Explicit vectors, because the autovectorizer turns the same loop into one that keeps the
// accumulator in memory (2x slower). Common head counts get a compile-time H (registers, above).
// Bytes: the vector size, 64 (AVX-512's 32 registers hold the blocks below) or 32 for AVX2's 16
// registers (with 64-byte vectors, each 2 ymm, the H = 8 blocks spilled: mix_heads took ~10% of
// the forward + backward on a Zen 3 EPYC at H = 8, N = 2048).
template <typename T, int Bytes = 64>
SUBSPACE_OPS_INLINE void mix_heads_impl(const T* coef, const T* src, Shape shape, T* dst, int64_t dst_head_stride) {
  using Vec = typename Vector<T, Bytes>::type;
  constexpr int64_t kWidth = sizeof(Vec) / sizeof(T);
  const int64_t heads = shape.heads, rows = shape.rows;
  // Rows covered by whole vectors (none for H > 64); the rest go through the scalar loop below.
  const int64_t vector_rows = heads <= kMaxVectorHeads ? rows - rows % kWidth : 0;
  if (vector_rows > 0) {
    // KU: as many key rows as leave the H·KU input vectors, KU accumulators and a coefficient in
    // registers (32 of them for 64-byte vectors, 16 for 32-byte ones).
    constexpr bool kWide = Bytes == 64;
    const auto fixed = [&](auto heads_c, auto key_rows_c) {
      mix_vector_rows_fixed<T, Bytes, decltype(heads_c)::value, decltype(key_rows_c)::value>(
          coef, src, shape, dst, dst_head_stride, vector_rows);
    };
    using std::integral_constant;
    switch (heads) {
      case 4: fixed(integral_constant<int, 4>{}, integral_constant<int, kWide ? 4 : 2>{}); break;
      case 6: fixed(integral_constant<int, 6>{}, integral_constant<int, kWide ? 3 : 2>{}); break;
      case 8: fixed(integral_constant<int, 8>{}, integral_constant<int, kWide ? 2 : 1>{}); break;
      case 12: fixed(integral_constant<int, 12>{}, integral_constant<int, kWide ? 2 : 1>{}); break;
      case 16:
        if constexpr (kWide) {
          fixed(integral_constant<int, 16>{}, integral_constant<int, 1>{});
          break;
        }
        [[fallthrough]];
      default: mix_vector_rows_any<T, Bytes>(coef, src, shape, dst, dst_head_stride, vector_rows);
    }
  }
  for (int64_t h = 0; h < heads; ++h) {  // the rows past the last full vector (all rows for H > 64)
    for (int64_t c = 0; c < shape.keys; ++c) {
      T* out = dst + h * dst_head_stride + c * rows;
      for (int64_t i = vector_rows; i < rows; ++i) out[i] = 0;
      for (int64_t g = 0; g < heads; ++g) {
        const T* coef_hg = coef + (h * heads + g) * rows;
        const T* x = src + g * shape.head_stride + c * rows;
        for (int64_t i = vector_rows; i < rows; ++i) out[i] += coef_hg[i] * x[i];
      }
    }
  }
}

template <typename T>
SUBSPACE_OPS_INLINE void add_row_dots_impl(const T* a, const T* b, Shape shape, T* out) {
  for (int64_t h = 0; h < shape.heads; ++h) {
    T* acc = out + h * shape.rows;
    for (int64_t c = 0; c < shape.keys; ++c) {
      const int64_t at = h * shape.head_stride + c * shape.rows;
      for (int64_t i = 0; i < shape.rows; ++i) acc[i] += a[at + i] * b[at + i];
    }
  }
}

template <typename T>
SUBSPACE_OPS_INLINE void softmax_grad_impl(T* e, const T* p, Shape shape, const T* d, T scale) {
  for (int64_t h = 0; h < shape.heads; ++h) {
    const T* dh = d + h * shape.rows;
    for (int64_t c = 0; c < shape.keys; ++c) {
      const int64_t at = h * shape.head_stride + c * shape.rows;
      for (int64_t i = 0; i < shape.rows; ++i) e[at + i] = scale * p[at + i] * (e[at + i] - dh[i]);
    }
  }
}

template <typename T>
SUBSPACE_OPS_INLINE void apply_dropout_impl(T* t, Shape shape, const uint32_t* row_keys, int64_t j0,
                                            uint32_t threshold, T keep_scale) {
  for (int64_t h = 0; h < shape.heads; ++h) {
    const uint32_t* keys = row_keys + h * shape.rows;
    for (int64_t c = 0; c < shape.keys; ++c) {
      const uint32_t col = static_cast<uint32_t>(j0 + c);
      T* row = t + h * shape.head_stride + c * shape.rows;
      for (int64_t i = 0; i < shape.rows; ++i) {
        row[i] = dropout_hash(col ^ keys[i]) >= threshold ? row[i] * keep_scale : T(0);
      }
    }
  }
}

}  // namespace

void apply_dropout(float* t, Shape shape, const uint32_t* row_keys, int64_t j0, uint32_t threshold,
                   float keep_scale) {
#if SUBSPACE_OPS_HAVE_X86_EXP
  if (gemm::isa() != gemm::Isa::kNone) return apply_dropout_avx2(t, shape, row_keys, j0, threshold, keep_scale);
#endif
  apply_dropout_impl(t, shape, row_keys, j0, threshold, keep_scale);
}
void apply_dropout(double* t, Shape shape, const uint32_t* row_keys, int64_t j0, uint32_t threshold,
                   double keep_scale) {
  apply_dropout_impl(t, shape, row_keys, j0, threshold, keep_scale);
}

SUBSPACE_OPS_ISA_CLONES void row_max(const float* s, Shape shape, float* out) { row_max_impl(s, shape, out); }
void row_max(const double* s, Shape shape, double* out) { row_max_impl(s, shape, out); }

SUBSPACE_OPS_ISA_CLONES void exp_shifted(float* s, Shape shape, const float* shift, float* sums) {
#if SUBSPACE_OPS_HAVE_X86_EXP
  // The head-mixing kernel's instruction set (gemm::isa: the CPU's widest, or the one tests set).
  switch (gemm::isa()) {
    case gemm::Isa::kAvx512: return exp_shifted_avx512(s, shape, shift, sums);
    case gemm::Isa::kAvx2: return exp_shifted_avx2(s, shape, shift, sums);
    case gemm::Isa::kNone: break;
  }
#endif
  exp_shifted_impl(s, shape, shift, sums);
}
void exp_shifted(double* s, Shape shape, const double* shift, double* sums) { exp_shifted_impl(s, shape, shift, sums); }

#if SUBSPACE_OPS_HAVE_X86_EXP
static __attribute__((target("avx2,fma"))) void mix_heads_avx2(const float* coef, const float* src, Shape shape,
                                                                float* dst, int64_t dst_head_stride) {
  mix_heads_impl<float, 32>(coef, src, shape, dst, dst_head_stride);
}
#endif

SUBSPACE_OPS_ISA_CLONES void mix_heads(const float* coef, const float* src, Shape shape, float* dst,
                                       int64_t dst_head_stride) {
#if SUBSPACE_OPS_HAVE_X86_EXP
  if (gemm::isa() == gemm::Isa::kAvx2) return mix_heads_avx2(coef, src, shape, dst, dst_head_stride);
#endif
  mix_heads_impl(coef, src, shape, dst, dst_head_stride);
}
void mix_heads(const double* coef, const double* src, Shape shape, double* dst, int64_t dst_head_stride) {
  mix_heads_impl(coef, src, shape, dst, dst_head_stride);
}

SUBSPACE_OPS_ISA_CLONES void add_row_dots(const float* a, const float* b, Shape shape, float* out) {
  add_row_dots_impl(a, b, shape, out);
}
void add_row_dots(const double* a, const double* b, Shape shape, double* out) { add_row_dots_impl(a, b, shape, out); }

SUBSPACE_OPS_ISA_CLONES void softmax_grad(float* e, const float* p, Shape shape, const float* d, float scale) {
  softmax_grad_impl(e, p, shape, d, scale);
}
void softmax_grad(double* e, const double* p, Shape shape, const double* d, double scale) {
  softmax_grad_impl(e, p, shape, d, scale);
}

}  // namespace subspace_ops::tiles
