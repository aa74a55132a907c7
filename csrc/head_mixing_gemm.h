// The two GEMM shapes of the head-mixing kernel's forward, for float32 on AVX-512 and AVX2 CPUs.
//
// The kernel multiplies thin query blocks (16–64 rows) by key chunks (256 keys) with a head size of
// 16–256. For one head's 512-key × 32-row × 64 tile, MKL's sgemm (through ATen) measured 110 GFLOP/s
// on one core of the 2-core Xeon this was tuned on, these loops 153 (the core's FMA peak measured
// 218); in the kernel they also save ATen's per-call dispatch (thousands of small GEMMs per call)
// and give the scores' row max from registers. On a CPU with AVX2 + FMA but no AVX-512 the same
// loops run on 8-float vectors (Zen 3 EPYC, B1 H8 N2048 d64, 2 threads: with the AVX2 exp of
// head_mixing_tiles.cpp, the forward went from 338 ms on MKL and scalar exp to 175 ms; without
// masked stores of whole vectors, 120 ms). The backward's products use them too (multiply_add and
// the two above; forward + backward 677 ms on MKL, ~430 ms). Without either, or for a head size
// that is not a multiple of the vector width (16 floats, 8 on AVX2), `available` is false and the
// caller uses ATen's GEMMs.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu_simd.h"

namespace subspace_ops::gemm {

// The instruction set the loops below run with (cpu_simd.h): the widest this CPU has, unless
// set_isa chose a narrower one (tests run the AVX2 loops on AVX-512 CPUs that way).
using simd::Isa;
using simd::isa;
using simd::set_isa;

// Whether the loops below may be called for head size `dim` on this CPU.
bool available(int64_t dim);

// Query rows (b of C = alpha · A Bᵀ below) transposed, scaled by alpha and zero padded to whole
// vectors: data[t · ld + i] = alpha · b[i, t]. Packed once per query block, reused for every key chunk.
struct PackedRows {
  std::vector<float> data;
  int64_t rows = 0, dim = 0, ld = 0;
};
void pack_rows(const float* b, int64_t ldb, int64_t rows, int64_t dim, float alpha, PackedRows& out);

// Scores, key-major: c[j, i] = alpha · Σ_t a[j, t] · b[i, t] for j < keys, i < b.rows, from the
// packed b. a: [keys, b.dim] with row stride lda (keys of one head), c: [keys, b.rows] with row
// stride ldc, overwritten. If row_max is not null it receives max over j of c[j, i] (taken while the
// values are in registers; −inf for keys = 0).
void scores_abt(const float* a, int64_t lda, int64_t keys, const PackedRows& b, float* c, int64_t ldc,
                float* row_max);

// Accumulation over keys: c[i, t] += Σ_j a[j, i] · b[j, t] for i < rows, t < dim (C += Aᵀ B; the
// forward's O_h += M_hᵀ V_h with M_h key-major). a: [keys, rows] with row stride lda, b: [keys, dim]
// with row stride ldb, c: [rows, dim] with row stride ldc.
void accumulate_atb(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t keys, int64_t rows,
                    int64_t dim, float* c, int64_t ldc);

// c[j, t] += Σ_s a[j, s] · b[s, t] for j < keys, t < cols, s < depth (C += A B; the backward's
// dK += dS Q and dV += M dO with dS, M key-major). a: [keys, depth] with row stride lda, b: [depth,
// cols] with row stride ldb, c: [keys, cols] with row stride ldc; cols a multiple of the vector
// width (as `available` requires of the head size).
void multiply_add(const float* a, int64_t lda, int64_t keys, const float* b, int64_t ldb, int64_t depth,
                  int64_t cols, float* c, int64_t ldc);

}  // namespace subspace_ops::gemm
