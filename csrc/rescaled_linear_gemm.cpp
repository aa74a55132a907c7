// Rescaled linear's float32 GEMMs for AVX-512 and AVX2 + FMA CPUs; see rescaled_linear_gemm.h.
//
// Why write GEMMs at all: with ATen's GEMMs, W' must exist in memory before the GEMM reads it, so every
// pass forms a block of W' (read W, write the block) and the GEMM then packs that block again; G = gyᵀ x
// is written and read back for the scale gradients. At a few hundred tokens those passes cost as much
// as 20-40% of a training step (M = 197, K = N = 768, 2 threads). A GEMM packs its weight operand
// anyway, so here the packing step forms W' (W ⊙ factor, one multiply per element as it is copied), and
// the scale gradients are reduced from each register tile of G as soon as the tile is complete, so a
// step reads W three times and writes nothing weight-sized (unless W itself is trained).
//
// The GEMM is the usual register-tiled one (fma_tile of simd_fma_tile.inc, shared with head mixing's
// GEMMs), written once (rescaled_linear_gemm_kernels.inc) and compiled for AVX-512 and for AVX2 + FMA;
// simd::isa() picks the widest this CPU runs. On AVX-512 a tile of 6 rows × 64 columns of the output
// (24 of the 32 registers) is updated per reduction step from 4 vectors of a packed panel of B (64
// columns × 128 steps, 32 KB, in L1) and 6 broadcasts of A, so each vector load feeds 6 FMAs and both
// FMA ports stay busy; on AVX2 the tile is 6 rows × 16 columns (12 of the 16 registers). Threads split
// the output's panels; each packs its own panels, so the threads never wait for one another, and
// fetches the block of W it packs next while it multiplies the current one (BlockPrefetch).
//
// Measured warm against MKL's GEMMs for the same shapes (torch.mm, M = 197, K = N = 768, 2 threads,
// interleaved). AVX-512 (Intel Xeon VM): forward 0.95-0.98×, gx 1.05-1.07×, scale gradients
// 1.07-1.11× of MKL's dW GEMM (which writes dW; these write nothing weight-sized). AVX2 (AMD EPYC
// Zen 3 VM, 2026-12-03, best of 9 rounds): forward 0.99× torch.addmm, backward (gx and the scale
// gradients) 1.05× MKL's two GEMMs, where the ATen-blocked kernels took 1.14× and 1.08×. The AVX2
// panel depth was chosen there from 128, 256, 512, 768 and 1024 steps: the forward's ratio to
// torch.addmm fell with depth, 1.04 at 128 to 0.79-0.89 at 1024 (one build per depth in a noisy
// hour, so only the trend is solid; not profiled further). A 1024-step panel is 64 KB, in L2, and
// K ≤ 1024 is one panel deep.
#include "rescaled_linear_gemm.h"

#include "cpu_simd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace subspace_ops::rescaled_gemm {

int64_t max_rows() { return simd::isa() == simd::Isa::kNone ? 0 : kMaxRows; }

#if SUBSPACE_OPS_X86_SIMD
namespace {

constexpr int64_t kLineFloats = 16;  // floats per 64-byte cache line

// Fetches the cache lines of a block of a row-major matrix (rows × cols floats from `start`, row stride ld)
// into L2 a few lines per call of next(), spread over `calls` calls: the GEMMs fetch the block they pack
// next while they multiply the current one. Without it the packing waits on every line when the matrix
// is not in cache, as in a training step where other layers run in between: after other work had
// evicted W, a 768 × 768 modulated_matmul at 197 rows (2 threads) took 0.15-0.2 ms longer (ATen's
// GEMMs: 0.05 ms), and reduce_weight_gradients lost 0.1 ms packing x's panels.
class BlockPrefetch {
 public:
  BlockPrefetch() = default;
  BlockPrefetch(const float* start, int64_t ld, int64_t rows, int64_t cols, int64_t calls)
      : row_start_(start),
        ld_(ld),
        rows_(rows),
        last_col_(cols - 1),
        row_end_(((cols + kLineFloats - 1) / kLineFloats + 1) * kLineFloats),  // + 1 line: the block need not start on one
        per_call_((rows * (row_end_ / kLineFloats) + calls - 1) / std::max<int64_t>(calls, 1)) {}

  // Walks the block row by row with counters. With a division and a remainder per line, perf put 13% of
  // modulated_matmul's samples (gx at 197 rows) in this loop; with counters 8%, most of it on the
  // instruction after the prefetches (a burst of ~20 fills the queue of outstanding misses). Issuing one
  // line per inner-loop iteration instead was no faster: the loop has no registers to spare for it.
  void next() {
    for (int64_t issued = 0; issued < per_call_ && row_ < rows_; ++issued) {
      _mm_prefetch(reinterpret_cast<const char*>(row_start_ + std::min(col_, last_col_)), _MM_HINT_T1);
      col_ += kLineFloats;
      if (col_ == row_end_) col_ = 0, ++row_, row_start_ += ld_;
    }
  }

 private:
  const float* row_start_ = nullptr;
  int64_t ld_ = 0, rows_ = 0, last_col_ = 0, row_end_ = 0, per_call_ = 0, row_ = 0, col_ = 0;
};

}  // namespace

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace isa_avx512 {
struct Simd : simd::Avx512Ops {
  static constexpr int kVectors = 4;        // 64 columns by 6 rows: 24 of the 32 registers accumulate
  static constexpr int kRows = 6;
  static constexpr int64_t kDepth = 128;    // a packed panel: 64 columns × 128 steps, 32 KB (L1)
};
#include "rescaled_linear_gemm_kernels.inc"
}  // namespace isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
struct Simd : simd::Avx2Ops {
  static constexpr int kVectors = 2;        // 16 columns by 6 rows: 12 of the 16 registers accumulate
  static constexpr int kRows = 6;
  static constexpr int64_t kDepth = 1024;   // a packed panel: 16 columns × 1024 steps, 64 KB (L2)
};
#include "rescaled_linear_gemm_kernels.inc"
}  // namespace isa_avx2
#pragma GCC pop_options

void modulated_matmul(const float* in, int64_t ld_in, int64_t m, const ModulatedWeight& w, bool cols_along_p,
                      const float* bias, float* out, int64_t ld_out) {
  switch (simd::isa()) {
    case simd::Isa::kAvx512: return isa_avx512::modulated_matmul(in, ld_in, m, w, cols_along_p, bias, out, ld_out);
    case simd::Isa::kAvx2: return isa_avx2::modulated_matmul(in, ld_in, m, w, cols_along_p, bias, out, ld_out);
    case simd::Isa::kNone: break;
  }
  TORCH_CHECK(false, "rescaled_gemm::modulated_matmul called where max_rows() is 0");
}

void reduce_weight_gradients(const float* ap, int64_t ld_ap, const float* bq, int64_t ld_bq, int64_t m,
                             const ModulatedWeight& w, float* a_grad, float* b_grad, float* gw, int64_t ld_gw) {
  switch (simd::isa()) {
    case simd::Isa::kAvx512:
      return isa_avx512::reduce_weight_gradients(ap, ld_ap, bq, ld_bq, m, w, a_grad, b_grad, gw, ld_gw);
    case simd::Isa::kAvx2:
      return isa_avx2::reduce_weight_gradients(ap, ld_ap, bq, ld_bq, m, w, a_grad, b_grad, gw, ld_gw);
    case simd::Isa::kNone: break;
  }
  TORCH_CHECK(false, "rescaled_gemm::reduce_weight_gradients called where max_rows() is 0");
}

#else  // not x86-64 GCC/Clang: max_rows() is 0, so never called

void modulated_matmul(const float*, int64_t, int64_t, const ModulatedWeight&, bool, const float*, float*, int64_t) {
  TORCH_CHECK(false, "rescaled_gemm::modulated_matmul called where max_rows() is 0");
}
void reduce_weight_gradients(const float*, int64_t, const float*, int64_t, int64_t, const ModulatedWeight&, float*,
                             float*, float*, int64_t) {
  TORCH_CHECK(false, "rescaled_gemm::reduce_weight_gradients called where max_rows() is 0");
}

#endif

}  // namespace subspace_ops::rescaled_gemm
