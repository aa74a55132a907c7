// Rescaled linear's float32 GEMMs for AVX-512 CPUs; see rescaled_linear_avx512.h.
//
// Why write GEMMs at all: with ATen's GEMMs, W' must exist in memory before the GEMM reads it, so every
// pass forms a block of W' (read W, write the block) and the GEMM then packs that block again; G = gyᵀ x
// is written and read back for the scale gradients. At a few hundred tokens those passes cost as much
// as 20-40% of a training step (M = 197, K = N = 768, 2 threads). A GEMM packs its weight operand
// anyway, so here the packing step forms W' (W ⊙ factor, one multiply per element as it is copied), and
// the scale gradients are reduced from each register tile of G as soon as the tile is complete, so a
// step reads W three times and writes nothing weight-sized (unless W itself is trained).
//
// The GEMM is the usual register-tiled one (avx512::fma_tile, shared with head mixing's GEMMs): a tile
// of 6 rows × 64 columns of the output (24 AVX-512 accumulators) is updated per reduction step from
// 4 vectors of a packed panel of B (64 columns × kDepth steps, 32 KB, in L1) and 6 broadcasts of A,
// so each vector load feeds 6 FMAs and both FMA ports stay busy. Threads split the output's 64-column
// panels; each packs its own panels, so the threads never wait for one another, and fetches the block
// of W it packs next while it multiplies the current one (BlockPrefetch). Warm, against MKL's GEMMs
// for the same shapes (torch.mm, M = 197, K = N = 768, 2 threads, interleaved): forward 0.95-0.98×,
// gx 1.05-1.07×, scale gradients 1.07-1.11× of MKL's dW GEMM (which writes dW; these write nothing
// weight-sized).
#include "rescaled_linear_avx512.h"

#include "avx512_tile.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace subspace_ops::rescaled_avx512 {

int64_t max_rows() { return avx512::cpu_supported() ? kMaxRows : 0; }

#if SUBSPACE_OPS_HAVE_AVX512
namespace {

using avx512::kLanes;
constexpr int kVectors = 4;                    // vectors per tile row
constexpr int64_t kPanel = kLanes * kVectors;  // columns per packed panel and tile
constexpr int kRows = 6;                       // rows per tile
constexpr int64_t kDepth = 128;                // reduction steps per packed panel

// The first `count` lanes of a vector (none when count <= 0, all when count >= 16).
SUBSPACE_OPS_AVX512 inline __mmask16 lanes(int64_t count) {
  return count >= kLanes ? static_cast<__mmask16>(0xFFFF)
                         : static_cast<__mmask16>((1u << std::max<int64_t>(count, 0)) - 1u);
}

// c + Σ_j a[p, j] b_t[j, q .. q+15] for the lanes in mask.
SUBSPACE_OPS_AVX512 inline __m512 factor(const ModulatedWeight& w, int64_t p, int64_t q, __mmask16 mask) {
  __m512 f = _mm512_set1_ps(w.c);
  for (int64_t j = 0; j < w.rank; ++j) {
    const __m512 b = _mm512_maskz_loadu_ps(mask, w.b_t + j * w.q_len + q);
    f = _mm512_fmadd_ps(_mm512_set1_ps(w.a[p * w.rank + j]), b, f);
  }
  return f;
}

// W'[p, q .. q+15] for the lanes in mask (zero elsewhere).
SUBSPACE_OPS_AVX512 inline __m512 modulated(const ModulatedWeight& w, int64_t p, int64_t q, __mmask16 mask) {
  return _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, w.w + p * w.ld_w + q), factor(w, p, q, mask));
}

// panel[t, j] = W'[p0 + t, q0 + j] for t < depth, j < width; zero for width <= j < 64.
SUBSPACE_OPS_AVX512 void pack_along_q(const ModulatedWeight& w, int64_t p0, int64_t depth, int64_t q0, int64_t width,
                                      float* panel) {
  for (int64_t t = 0; t < depth; ++t) {
    for (int v = 0; v < kVectors; ++v) {
      const __m512 values = modulated(w, p0 + t, q0 + v * kLanes, lanes(width - v * kLanes));
      _mm512_store_ps(panel + t * kPanel + v * kLanes, values);
    }
  }
}

// Transposes 16 vectors in place: r[i][j] becomes r[j][i]. Four rounds of shuffles: 2×2 blocks of
// floats, then of float pairs, then of 128-bit lanes (two rounds).
SUBSPACE_OPS_AVX512 inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // u[4g + c], lane L: column 4L + c of rows 4g .. 4g+3.
  __m512 u[16];
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
    const __m512 rows01_lo = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44);  // u0.L0 u0.L1 u1.L0 u1.L1
    const __m512 rows01_hi = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);  // u0.L2 u0.L3 u1.L2 u1.L3
    const __m512 rows23_lo = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
    const __m512 rows23_hi = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_f32x4(rows01_lo, rows23_lo, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(rows01_lo, rows23_lo, 0xDD);
    r[8 + c] = _mm512_shuffle_f32x4(rows01_hi, rows23_hi, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(rows01_hi, rows23_hi, 0xDD);
  }
}

// panel[t, j] = W'[p0 + j, q0 + t] for t < depth, j < width; zero for width <= j < 64. W is read along
// its rows, 16 × 16 blocks at a time, each transposed in registers.
SUBSPACE_OPS_AVX512 void pack_along_p(const ModulatedWeight& w, int64_t p0, int64_t width, int64_t q0, int64_t depth,
                                      float* panel) {
  for (int64_t t0 = 0; t0 < depth; t0 += kLanes) {
    const int64_t steps = std::min(kLanes, depth - t0);
    const __mmask16 mask = lanes(steps);
    for (int v = 0; v < kVectors; ++v) {
      __m512 block[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t j = v * kLanes + i;
        block[i] = j < width ? modulated(w, p0 + j, q0 + t0, mask) : _mm512_setzero_ps();
      }
      transpose16(block);
      for (int64_t i = 0; i < steps; ++i) _mm512_store_ps(panel + (t0 + i) * kPanel + v * kLanes, block[i]);
    }
  }
}

// panel[t, j] = src[t, j] (row stride ld) for t < depth, j < width; zero for width <= j < 64.
SUBSPACE_OPS_AVX512 void pack_rows(const float* src, int64_t ld, int64_t depth, int64_t width, float* panel) {
  for (int64_t t = 0; t < depth; ++t) {
    for (int v = 0; v < kVectors; ++v) {
      _mm512_store_ps(panel + t * kPanel + v * kLanes,
                      _mm512_maskz_loadu_ps(lanes(width - v * kLanes), src + t * ld + v * kLanes));
    }
  }
}

// tiles[tile, t, i] = src[t, p0 + tile·kRows + i] (row stride ld) for the columns p0 .. p_end-1 of src,
// zero past p_end: each tile's kRows columns become one contiguous run that fma_tile reads in order.
// 16 rows of src at a time, so that both the rows read and each tile's run written stay in L1.
SUBSPACE_OPS_AVX512 void pack_tile_rows(const float* src, int64_t ld, int64_t depth, int64_t p0, int64_t p_end,
                                        float* tiles) {
  const __mmask16 tile_lanes = lanes(kRows);
  for (int64_t t0 = 0; t0 < depth; t0 += kLanes) {
    const int64_t t_end = std::min(depth, t0 + kLanes);
    float* tile = tiles;
    for (int64_t tile_p = p0; tile_p < p_end; tile_p += kRows, tile += depth * kRows) {
      const __mmask16 columns = lanes(p_end - tile_p);
      for (int64_t t = t0; t < t_end; ++t) {
        _mm512_mask_storeu_ps(tile + t * kRows, tile_lanes, _mm512_maskz_loadu_ps(columns, src + t * ld + tile_p));
      }
    }
  }
}

// One tile of modulated_matmul: out[R rows, width ≤ 64 columns] = (first ? bias : out) + in · panel.
template <int R>
SUBSPACE_OPS_AVX512 void matmul_tile(const float* in, int64_t ld_in, const float* panel, int64_t depth, bool first,
                                     const float* bias, float* out, int64_t ld_out, int64_t width) {
  __m512 acc[R][kVectors];
  for (int v = 0; v < kVectors; ++v) {
    const __mmask16 mask = lanes(width - v * kLanes);
    for (int i = 0; i < R; ++i) {
      acc[i][v] = !first ? _mm512_maskz_loadu_ps(mask, out + i * ld_out + v * kLanes)
                  : bias != nullptr ? _mm512_maskz_loadu_ps(mask, bias + v * kLanes)
                                    : _mm512_setzero_ps();
    }
  }
  avx512::fma_tile<R, kVectors>(in, ld_in, 1, panel, kPanel, depth, acc);
  for (int v = 0; v < kVectors; ++v) {
    const __mmask16 mask = lanes(width - v * kLanes);
    for (int i = 0; i < R; ++i) _mm512_mask_storeu_ps(out + i * ld_out + v * kLanes, mask, acc[i][v]);
  }
}

// One tile of reduce_weight_gradients, G[p .. p+R, q .. q+width], over one chunk of its reduction
// (steps rows of ap and bq): ap_tile [steps, kRows] is the chunk of G's rows p .. p+R-1 as pack_tile_rows
// lays them out, panel the chunk of the packed bq panel. The running sum is kept in `partial`
// ([R, 64]) between chunks; after the last chunk the tile's contributions are added to the scale
// gradients' partial sums (row_sums [R, rank, 16]: 16 lanes per row of a_grad, summed once at the end;
// column_sums [rank, Q]: the task's share of b_grad) and dW is written.
template <int R>
SUBSPACE_OPS_AVX512 void gradient_tile(const float* ap_tile, const float* panel, int64_t steps, bool first, bool last,
                                       float* partial, const ModulatedWeight& w, int64_t p, int64_t q, int64_t width,
                                       float* row_sums, float* column_sums, float* gw, int64_t ld_gw) {
  __m512 g[R][kVectors];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < kVectors; ++v)
      g[i][v] = first ? _mm512_setzero_ps() : _mm512_load_ps(partial + i * kPanel + v * kLanes);
  avx512::fma_tile<R, kVectors>(ap_tile, 1, kRows, panel, kPanel, steps, g);
  if (!last) {
    for (int i = 0; i < R; ++i)
      for (int v = 0; v < kVectors; ++v) _mm512_store_ps(partial + i * kPanel + v * kLanes, g[i][v]);
    return;
  }
  __mmask16 masks[kVectors];
  for (int v = 0; v < kVectors; ++v) masks[v] = lanes(width - v * kLanes);
  // With (G ⊙ w)[p + i, :] = g[i] ⊙ w: a_grad[p + i, j] += Σ_q (G ⊙ w) b_t[j, q] and
  // b_grad[:, j] += a[p + i, j] (G ⊙ w).
  if (row_sums != nullptr) {
    for (int64_t j = 0; j < w.rank; ++j) {
      __m512 b[kVectors], column[kVectors];
      float* column_j = column_sums + j * w.q_len + q;
      for (int v = 0; v < kVectors; ++v) {
        b[v] = _mm512_maskz_loadu_ps(masks[v], w.b_t + j * w.q_len + q + v * kLanes);
        column[v] = _mm512_maskz_loadu_ps(masks[v], column_j + v * kLanes);
      }
      for (int i = 0; i < R; ++i) {
        const __m512 a_value = _mm512_set1_ps(w.a[(p + i) * w.rank + j]);
        float* row_j = row_sums + (i * w.rank + j) * kLanes;
        __m512 row = _mm512_load_ps(row_j);
        for (int v = 0; v < kVectors; ++v) {
          const __m512 w_values = _mm512_maskz_loadu_ps(masks[v], w.w + (p + i) * w.ld_w + q + v * kLanes);
          const __m512 gw_prod = _mm512_mul_ps(g[i][v], w_values);
          row = _mm512_fmadd_ps(gw_prod, b[v], row);
          column[v] = _mm512_fmadd_ps(a_value, gw_prod, column[v]);
        }
        _mm512_store_ps(row_j, row);
      }
      for (int v = 0; v < kVectors; ++v) _mm512_mask_storeu_ps(column_j + v * kLanes, masks[v], column[v]);
    }
  }
  if (gw != nullptr) {
    for (int i = 0; i < R; ++i)
      for (int v = 0; v < kVectors; ++v)
        _mm512_mask_storeu_ps(gw + (p + i) * ld_gw + q + v * kLanes, masks[v],
                              _mm512_mul_ps(g[i][v], factor(w, p + i, q + v * kLanes, masks[v])));
  }
}

// out[i] = the sum of the 16 floats at sums + 16 i, for i < count (sums 64-byte aligned).
SUBSPACE_OPS_AVX512 void sum_lanes(const float* sums, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = _mm512_reduce_add_ps(_mm512_load_ps(sums + i * kLanes));
}

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
        row_end_(((cols + kLanes - 1) / kLanes + 1) * kLanes),  // + 1 line: the block need not start on one
        per_call_((rows * (row_end_ / kLanes) + calls - 1) / std::max<int64_t>(calls, 1)) {}

  // Walks the block row by row with counters. With a division and a remainder per line, perf put 13% of
  // modulated_matmul's samples (gx at 197 rows) in this loop; with counters 8%, most of it on the
  // instruction after the prefetches (a burst of ~20 fills the queue of outstanding misses). Issuing one
  // line per inner-loop iteration instead was no faster: the loop has no registers to spare for it.
  void next() {
    for (int64_t issued = 0; issued < per_call_ && row_ < rows_; ++issued) {
      _mm_prefetch(reinterpret_cast<const char*>(row_start_ + std::min(col_, last_col_)), _MM_HINT_T1);
      col_ += kLanes;
      if (col_ == row_end_) col_ = 0, ++row_, row_start_ += ld_;
    }
  }

 private:
  const float* row_start_ = nullptr;
  int64_t ld_ = 0, rows_ = 0, last_col_ = 0, row_end_ = 0, per_call_ = 0, row_ = 0, col_ = 0;
};

// Calls body.template operator()<R>() with R = rows (1 .. kRows) as a compile-time constant.
template <typename Body>
void with_rows(int64_t rows, Body&& body) {
  switch (rows) {
    case 1: body.template operator()<1>(); break;
    case 2: body.template operator()<2>(); break;
    case 3: body.template operator()<3>(); break;
    case 4: body.template operator()<4>(); break;
    case 5: body.template operator()<5>(); break;
    default: body.template operator()<kRows>(); break;
  }
}

}  // namespace

void modulated_matmul(const float* in, int64_t ld_in, int64_t m, const ModulatedWeight& w, bool cols_along_p,
                      const float* bias, float* out, int64_t ld_out) {
  const int64_t cols = cols_along_p ? w.p_len : w.q_len, depth = cols_along_p ? w.q_len : w.p_len;
  const int64_t panels = (cols + kPanel - 1) / kPanel;
  const at::Tensor buffers = at::empty({at::get_num_threads(), kDepth * kPanel}, at::kFloat);
  at::parallel_for(0, panels, 1, [&](int64_t panel_begin, int64_t panel_end) {
    float* panel = buffers.data_ptr<float>() + at::get_thread_num() * kDepth * kPanel;
    for (int64_t col_panel = panel_begin; col_panel < panel_end; ++col_panel) {
      const int64_t col0 = col_panel * kPanel, width = std::min(kPanel, cols - col0);
      for (int64_t d0 = 0; d0 < depth; d0 += kDepth) {
        const int64_t steps = std::min(kDepth, depth - d0);
        if (cols_along_p) {
          pack_along_p(w, col0, width, d0, steps, panel);
        } else {
          pack_along_q(w, d0, steps, col0, width, panel);
        }
        // The block packed next: the next steps of this panel, else the first of the next panel.
        const bool same_panel = d0 + kDepth < depth;
        BlockPrefetch prefetch;
        if (same_panel || col_panel + 1 < panel_end) {
          const int64_t next_col0 = same_panel ? col0 : col0 + kPanel, next_d0 = same_panel ? d0 + kDepth : 0;
          const int64_t next_width = std::min(kPanel, cols - next_col0), next_steps = std::min(kDepth, depth - next_d0);
          const int64_t tiles = (m + kRows - 1) / kRows;
          prefetch = cols_along_p
                         ? BlockPrefetch(w.w + next_col0 * w.ld_w + next_d0, w.ld_w, next_width, next_steps, tiles)
                         : BlockPrefetch(w.w + next_d0 * w.ld_w + next_col0, w.ld_w, next_steps, next_width, tiles);
        }
        const float* bias_cols = bias != nullptr ? bias + col0 : nullptr;
        for (int64_t i = 0; i < m; i += kRows) {
          prefetch.next();
          with_rows(std::min<int64_t>(kRows, m - i), [&]<int R>() {
            matmul_tile<R>(in + i * ld_in + d0, ld_in, panel, steps, d0 == 0, bias_cols, out + i * ld_out + col0,
                           ld_out, width);
          });
        }
      }
    }
  });
}

void reduce_weight_gradients(const float* ap, int64_t ld_ap, const float* bq, int64_t ld_bq, int64_t m,
                             const ModulatedWeight& w, float* a_grad, float* b_grad, float* gw, int64_t ld_gw) {
  // Tasks split the rows of G (so each owns its rows of a_grad) into runs of whole tiles. Each task lays
  // its columns of ap out tile by tile once, and packs each 64-column panel of bq in turn.
  const bool scales = a_grad != nullptr;
  const int64_t tiles = (w.p_len + kRows - 1) / kRows;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  const int64_t max_task_rows = (tiles + tasks - 1) / tasks * kRows;
  // Per task, each part a whole number of cache lines, at these offsets: the bq panel, the partial sums
  // of its tiles, its rows' a_grad sums (16 lanes each), its share of b_grad [rank, Q], then ap's tiles.
  const auto lines = [](int64_t floats) { return (floats + kLanes - 1) / kLanes * kLanes; };
  const int64_t partials_at = m * kPanel;
  const int64_t row_sums_at = partials_at + max_task_rows * kPanel;
  const int64_t column_sums_at = row_sums_at + (scales ? max_task_rows * w.rank * kLanes : 0);
  const int64_t ap_tiles_at = column_sums_at + (scales ? lines(w.rank * w.q_len) : 0);
  const int64_t task_floats = ap_tiles_at + lines(m * max_task_rows);
  const at::Tensor buffers = at::empty({tasks, task_floats}, at::kFloat);
  float* const base = buffers.data_ptr<float>();
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      float* task_buffer = base + task * task_floats;
      float* panel = task_buffer;
      float* partials = task_buffer + partials_at;
      float* row_sums = scales ? task_buffer + row_sums_at : nullptr;
      float* column_sums = scales ? task_buffer + column_sums_at : nullptr;
      float* ap_tiles = task_buffer + ap_tiles_at;
      const int64_t p_begin = task * tiles / tasks * kRows;
      const int64_t p_end = std::min(w.p_len, (task + 1) * tiles / tasks * kRows);
      if (scales) std::fill_n(row_sums, ap_tiles_at - row_sums_at, 0.0f);  // row and column sums
      pack_tile_rows(ap, ld_ap, m, p_begin, p_end, ap_tiles);
      for (int64_t q = 0; q < w.q_len; q += kPanel) {
        const int64_t width = std::min(kPanel, w.q_len - q);
        pack_rows(bq + q, ld_bq, m, width, panel);
        BlockPrefetch next_panel;  // bq's columns the next panel packs
        if (q + kPanel < w.q_len) {
          const int64_t calls = (m + kDepth - 1) / kDepth * ((p_end - p_begin + kRows - 1) / kRows);
          next_panel = BlockPrefetch(bq + q + kPanel, ld_bq, m, std::min(kPanel, w.q_len - q - kPanel), calls);
        }
        for (int64_t t0 = 0; t0 < m; t0 += kDepth) {  // chunks of the panel that stay in L1
          const int64_t steps = std::min(kDepth, m - t0);
          for (int64_t p = p_begin; p < p_end; p += kRows) {
            next_panel.next();
            const float* ap_tile = ap_tiles + (p - p_begin) * m + t0 * kRows;  // tile (p - p_begin) / kRows
            float* tile_row_sums = scales ? row_sums + (p - p_begin) * w.rank * kLanes : nullptr;
            with_rows(std::min<int64_t>(kRows, p_end - p), [&]<int R>() {
              gradient_tile<R>(ap_tile, panel + t0 * kPanel, steps, t0 == 0, t0 + steps == m,
                               partials + (p - p_begin) * kPanel, w, p, q, width, tile_row_sums, column_sums, gw,
                               ld_gw);
            });
          }
        }
      }
      if (scales) sum_lanes(row_sums, (p_end - p_begin) * w.rank, a_grad + p_begin * w.rank);
    }
  });
  if (scales) {  // b_grad[q, j] = the tasks' shares summed in task order (the same result every run)
    for (int64_t q = 0; q < w.q_len; ++q) {
      for (int64_t j = 0; j < w.rank; ++j) {
        float sum = 0.0f;
        for (int64_t task = 0; task < tasks; ++task) sum += base[task * task_floats + column_sums_at + j * w.q_len + q];
        b_grad[q * w.rank + j] = sum;
      }
    }
  }
}

#else  // not x86-64 GCC/Clang: max_rows() is 0, so never called

void modulated_matmul(const float*, int64_t, int64_t, const ModulatedWeight&, bool, const float*, float*, int64_t) {
  TORCH_CHECK(false, "rescaled_avx512::modulated_matmul called where max_rows() is 0");
}
void reduce_weight_gradients(const float*, int64_t, const float*, int64_t, int64_t, const ModulatedWeight&, float*,
                             float*, float*, int64_t) {
  TORCH_CHECK(false, "rescaled_avx512::reduce_weight_gradients called where max_rows() is 0");
}

#endif

}  // namespace subspace_ops::rescaled_avx512
