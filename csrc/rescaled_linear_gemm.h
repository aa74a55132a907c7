// Rescaled linear's float32 GEMMs of its own (AVX-512 or AVX2 + FMA), with W' = W ⊙ (c + S_l S_rᵀ)
// formed while a GEMM packs its weight operand and the scale gradients reduced from G = gyᵀ x while G
// is still in registers. Called by rescaled_linear.cpp for float32 inputs of up to max_rows() rows,
// where they replace the ATen GEMMs over blocks of W' (see rescaled_linear_gemm.cpp for why and for
// the measurements).
#pragma once

#include <cstdint>

namespace subspace_ops::rescaled_gemm {

// Above this many rows (tokens) the ATen GEMMs over blocks of W' are used instead: there the passes
// over W are a small part of a step, and these GEMMs do not block the M dimension.
constexpr int64_t kMaxRows = 512;

// The most rows these kernels take on this CPU: kMaxRows where simd::isa() (cpu_simd.h) is AVX-512 or
// AVX2 + FMA, else 0 (then they must not be called).
int64_t max_rows();

// W' in W's stored orientation: w [P, Q] (row stride ld_w, unit stride along Q), and
// W'[p, q] = w[p, q] · (c + Σ_j a[p, j] b_t[j, q]) with a [P, rank] and b_t [rank, Q], both contiguous.
struct ModulatedWeight {
  const float* w;
  int64_t ld_w, p_len, q_len;
  const float* a;
  const float* b_t;
  int64_t rank;
  float c;
};

// out[M, cols] = in[M, depth] · B (+ bias[cols] when bias is not null), every element of out written once:
// B = W'ᵀ (cols run along P, depth along Q) when cols_along_p, else B = W' (cols along Q, depth along P).
// in and out have unit column stride and row strides ld_in, ld_out.
void modulated_matmul(const float* in, int64_t ld_in, int64_t m, const ModulatedWeight& w, bool cols_along_p,
                      const float* bias, float* out, int64_t ld_out);

// With G[p, q] = Σ_m ap[m, p] · bq[m, q] ([P, Q], W's orientation; ap [M, P], bq [M, Q] with unit column
// stride), formed a register tile at a time and never stored whole, writes
//   a_grad[p, j] = Σ_q (G ⊙ w)[p, q] · b_t[j, q]         ([P, rank], contiguous)
//   b_grad[q, j] = Σ_p (G ⊙ w)[p, q] · a[p, j]           ([Q, rank], contiguous)
//   gw[p, q]     = G[p, q] · (c + Σ_j a[p, j] b_t[j, q])   (row stride ld_gw)
// a_grad and b_grad (both or neither) and gw may be null. The sums run in a fixed order (no atomics),
// so the result is the same every run for a given thread count and instruction set.
void reduce_weight_gradients(const float* ap, int64_t ld_ap, const float* bq, int64_t ld_bq, int64_t m,
                             const ModulatedWeight& w, float* a_grad, float* b_grad, float* gw, int64_t ld_gw);

}  // namespace subspace_ops::rescaled_gemm
