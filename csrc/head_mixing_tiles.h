// The elementwise and head-mixing loops of the CPU head-mixing attention kernel, on its score tiles.
//
// A tile holds, per head, a [keys, rows] block of scores (or probabilities, or gradients) with the
// query rows contiguous: element (h, c, i) is at data[h * head_stride + c * rows + i]. Row statistics
// (max, sum, log-sum-exp, D) are [heads, rows] arrays, one value per (head, query row).
//
// Each loop is one pass over the tile, vectorized along the rows. ATen's elementwise ops need two to
// five passes for the same work (sub then exp, mul then sum, ...), and at H = 8, N = 2048 a tile is
// about the size of a core's L2, so every extra pass is a trip to L3. float gets its own exp (see
// head_mixing_tiles.cpp), double uses std::exp (it is the gradcheck path, not a fast one).
#pragma once

#include <cstdint>

namespace subspace_ops::tiles {

struct Shape {
  int64_t heads, keys, rows, head_stride;
};

// out[h, i] = max over c of s[h, c, i] (−inf for an empty or fully masked row).
void row_max(const float* s, Shape shape, float* out);
void row_max(const double* s, Shape shape, double* out);

// s[h, c, i] ← exp(s[h, c, i] − shift[h, i]); when sums is not null, sums[h, i] += Σ_c of the new s.
// exp(−inf) = 0, so masked scores become zero probabilities.
void exp_shifted(float* s, Shape shape, const float* shift, float* sums);
void exp_shifted(double* s, Shape shape, const double* shift, double* sums);

// dst[h, c, i] = Σ_g coef[(h · heads + g) · rows + i] · src[g, c, i]: the head mix with one
// coefficient per (output head, input head, query row), so that a per-row factor of the input
// heads (1 / row sum) folds into the mix. dst uses the same shape (and rows) as src, with its own
// head stride; dst and src must not overlap.
void mix_heads(const float* coef, const float* src, Shape shape, float* dst, int64_t dst_head_stride);
void mix_heads(const double* coef, const double* src, Shape shape, double* dst, int64_t dst_head_stride);

// out[h, i] += Σ_c a[h, c, i] · b[h, c, i]  (a and b share the shape).
void add_row_dots(const float* a, const float* b, Shape shape, float* out);
void add_row_dots(const double* a, const double* b, Shape shape, double* out);

// The 32-bit hash of the attention dropout mask (reference._mix32; a bijection): unsigned arithmetic
// wraps mod 2³² as the reference's does.
inline __attribute__((always_inline)) uint32_t dropout_hash(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352DU;
  x ^= x >> 15;
  x *= 0x846CA68BU;
  return x ^ (x >> 16);
}

// t[h, c, i] ← t[h, c, i] · keep_scale where dropout_hash((j0 + c) ⊕ row_keys[h, i]) ≥ threshold, else 0:
// reference.attention_dropout_keep for keys j0 + c, with row_keys [heads, rows] that row's key.
void apply_dropout(float* t, Shape shape, const uint32_t* row_keys, int64_t j0, uint32_t threshold, float keep_scale);
void apply_dropout(double* t, Shape shape, const uint32_t* row_keys, int64_t j0, uint32_t threshold,
                   double keep_scale);

// e[h, c, i] ← scale · p[h, c, i] · (e[h, c, i] − d[h, i]): the softmax backward dS = P ⊙ (E − D),
// times the scores' scale (which every product of dS carries: dQ = scale · dS K, dK = scale · dSᵀ Q).
void softmax_grad(float* e, const float* p, Shape shape, const float* d, float scale);
void softmax_grad(double* e, const double* p, Shape shape, const double* d, double scale);

}  // namespace subspace_ops::tiles
