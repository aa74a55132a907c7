// Head-mixing attention on the CPU (Coeff-Tuning, METHODS.md §3), O(N) memory per head.
//
// Forward, per (batch, block of query rows), all heads together:
//   S_g = scale · Q_g K_gᵀ + mask          a GEMM per head (see below)
//   P_g = exp(S_g − L_g)                    L_g = row log-sum-exp, saved for the backward
//   M_h = Σ_g mix[h,g] P_g                  the head mix (a vectorized loop, head_mixing_tiles.cpp)
//   O_h = M_h V_h                           a GEMM per head
// In float32 with a head size that is a multiple of the vector width (16 floats on AVX-512, 8 on
// AVX2), every per-head GEMM of the forward and the backward runs on register-blocked loops made for
// these thin tiles (head_mixing_gemm.cpp, which also takes the row max from its registers);
// otherwise on ATen's batched GEMMs (MKL). Only the backward's dmix (an H × H result) stays on ATen.
// When the whole key row of a block fits the tile budget (ViT, and N ≤ ~4k at H = 8) this is one
// pass; otherwise a first pass over key blocks computes L and a second recomputes P block by block.
//
// Backward (T_h = dO_h V_hᵀ, E_g = Σ_h mix[h,g] T_h, D_g[i] = Σ_j P_g[i,j] E_g[i,j],
// dS_g = P_g ⊙ (E_g − D_g)), per (batch, query block):
//   D and dmix[h,g] += Σ T_h ⊙ P_g, then dQ_g = scale · dS_g K_g, dK_g += scale · dS_gᵀ Q_g and
//   dV_h += M_hᵀ dO_h.
// FlashAttention's D = rowsum(dO ⊙ O) does not hold once heads are mixed: D needs the block's whole
// key row first (one pass when it fits the tile, else a first pass over key blocks for D alone).
// dK/dV rows are shared by all query blocks of a batch, so each thread needs its own:
//  - B a multiple of the threads, or B ≥ 4 × threads: threads own whole batches and accumulate
//    straight into dK/dV;
//  - else, when the copies (threads − 1 of dK and of dV) take no more than two q-sized tensors:
//    threads 1.. accumulate into private copies, summed in thread order at the end (2 threads at
//    self-attention: one copy);
//  - else (many threads, small batch): two phases: the query blocks compute D, dmix and dQ, then
//    the key blocks, each owned by one thread, recompute P and E to get dK/dV (two more GEMMs).
// dmix partials are summed in chunk order too, so results are deterministic for a thread count.
//
// Dropout (dropout_p > 0, the backbone's attention dropout on the map that multiplies V): the mixed
// tile M is multiplied by keep / (1 − p) before O += M V, and in the backward T (= ∂O/∂M) and M
// get the same factor (then E, dmix and dV follow from them unchanged). keep is regenerated from the
// seed by a counter-based hash (reference.attention_dropout_keep; tiles::apply_dropout) wherever it
// is needed, so nothing of the mask is stored.
#include "head_mixing_attention.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "head_mixing_gemm.h"
#include "head_mixing_tiles.h"

namespace subspace_ops {
namespace {

// Tiles are key-major, [H, keys, rows]: scores come from S_gᵀ = K_g Q_gᵀ, a GEMM whose long side is
// the key dimension. MKL runs the thin-query-block GEMMs of this kernel 1.5–2× faster that way round
// than as Q Kᵀ (measured at H = 8, N = 2048, d = 64, 16–32 query rows), and the vectorized loops run
// along the contiguous query rows.
//
// Memory: a thread holds one [H, keys, rows] tile per live quantity (forward: P, plus a small mixed
// chunk; backward: P, T, E; plus, with thread copies, its own dK/dV). One tile gets q's size divided
// among the threads, between 1 and 2 MB: the upper cap keeps the scratch within issue #5's memory
// target at long rows (at B1 H8 N4096 d64, 2 threads: 1.37x SDPA's peak forward, 1.43x forward +
// backward; with 4 MB tiles it was 1.86x / 1.72x, for ~25% more speed at that size). Within the
// budget a query block is as tall as possible (GEMM efficiency: 32 rows at N = 2048, 16 at 4096)
// and covers the whole key row (P is computed once); rows below kMinQueryRows switch to key blocks
// and two passes.
constexpr int64_t kMinTileBytes = int64_t{1} << 20;
constexpr int64_t kMaxTileBytes = int64_t{2} << 20;
constexpr int64_t kMinQueryRows = 8;
constexpr int64_t kMaxQueryRows = 64;
constexpr int64_t kKeyBlock = 128;   // the two-phase backward's key block (the dK/dV rows one item owns)
constexpr int64_t kMixChunk = 256;   // keys mixed at once in the forward: [H, kMixChunk, rows]

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Problem {
  at::Tensor q, k, v, mix, mask;  // accumulation dtype, contiguous; mask may be undefined
  bool causal = false;
  double scale = 1.0;
  int64_t batch = 0, heads = 0, n_q = 0, n_k = 0, dim = 0;
  double dropout_p = 0.0;
  uint32_t drop_threshold = 0, seed_lo = 0, seed_hi = 0;  // see reference.attention_dropout_keep

  // Keys that query rows [.., i1) can see: SDPA's top-left causal triangle keeps j <= i.
  int64_t key_end(int64_t i1) const { return causal ? std::min(n_k, i1) : n_k; }
  // Query rows that keys [j0, ..) can be seen from.
  int64_t query_begin(int64_t j0) const { return causal ? std::min(n_q, j0) : 0; }
  int64_t elem() const { return q.element_size(); }
};

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mix,
                     const std::optional<at::Tensor>& mask, bool is_causal, double scale, double dropout_p,
                     const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be [B, H, N, D]");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "q [B, H, Nq, D] and k [B, H, Nk, D] disagree: ", q.sizes(), " vs ", k.sizes());
  TORCH_CHECK(mix.dim() == 2 && mix.size(0) == q.size(1) && mix.size(1) == q.size(1), "mix must be [H, H] with H=",
              q.size(1), ", got ", mix.sizes());
  for (const auto* t : {&q, &k, &v, &mix}) TORCH_CHECK(t->device().is_cpu(), "the cpu backend needs CPU tensors");
  Problem p;
  const auto acc = acc_type(q);
  // Detached: the kernels' out= GEMMs run on at::parallel_for workers, whose grad mode is their own.
  p.q = q.detach().to(acc).contiguous();
  p.k = k.detach().to(acc).contiguous();
  p.v = v.detach().to(acc).contiguous();
  p.mix = mix.detach().to(acc).contiguous();
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() == 4 && mask->size(0) == q.size(0) && mask->size(1) == q.size(1) &&
                    mask->size(2) == q.size(2) && mask->size(3) == k.size(2),
                "mask must be viewed as [B, H, Nq, Nk], got ", mask->sizes());
    p.mask = mask->detach().to(acc);  // an expanded view stays a view
  }
  p.causal = is_causal;
  p.scale = scale;
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.n_q = q.size(2);
  p.n_k = k.size(2);
  p.dim = q.size(3);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->defined() && seed->numel() == 1 && seed->scalar_type() == at::kLong,
                "dropout_p > 0 needs seed, a one-element int64 tensor");
    const uint64_t value = static_cast<uint64_t>(seed->item<int64_t>());
    p.dropout_p = dropout_p;
    p.seed_lo = static_cast<uint32_t>(value);
    p.seed_hi = static_cast<uint32_t>(value >> 32);
    // ⌊p · 2³²⌋ as reference.dropout_threshold (p < 1, so below 2³²).
    p.drop_threshold = static_cast<uint32_t>(std::min(4294967295.0, std::floor(dropout_p * 4294967296.0)));
  }
  return p;
}

// The dropout keys of query rows [i0, i0 + rows) of every head of batch b, [H, rows], into keys (or
// nullptr without dropout): reference.attention_dropout_keep's key = mix32(row ⊕ seed_lo) ⊕ seed_hi.
const uint32_t* dropout_keys(const Problem& p, int64_t b, int64_t i0, int64_t rows, std::vector<uint32_t>& keys) {
  if (p.dropout_p <= 0.0) return nullptr;
  keys.resize(p.heads * rows);
  for (int64_t h = 0; h < p.heads; ++h) {
    for (int64_t i = 0; i < rows; ++i) {
      const auto row = static_cast<uint32_t>((b * p.heads + h) * p.n_q + i0 + i);  // mod 2³²
      keys[h * rows + i] = tiles::dropout_hash(row ^ p.seed_lo) ^ p.seed_hi;
    }
  }
  return keys.data();
}


// A flat per-thread buffer handing out contiguous [H, keys, rows] views.
struct Tile {
  at::Tensor flat;
  at::Tensor view(int64_t heads, int64_t keys, int64_t rows, int64_t offset = 0) {
    return flat.narrow(0, offset, heads * keys * rows).view({heads, keys, rows});
  }
};

Tile make_tile(const Problem& p, int64_t elements) { return {at::empty({elements}, p.q.options())}; }

// [H, keys, rows] → [H, keys·rows] (keys may be a slice of a longer tile: dims 1, 2 stay dense).
at::Tensor flat2d(const at::Tensor& t) { return t.view({t.size(0), t.size(1) * t.size(2)}); }

tiles::Shape shape_of(const at::Tensor& tile) { return {tile.size(0), tile.size(1), tile.size(2), tile.stride(0)}; }

// tile [H, keys, rows] (keys from j0) ← tile ⊙ keep / (1 − p) when keys is not null.
template <typename T>
void drop(const Problem& p, const uint32_t* keys, int64_t j0, at::Tensor& tile) {
  if (keys == nullptr) return;
  tiles::apply_dropout(tile.data_ptr<T>(), shape_of(tile), keys, j0, p.drop_threshold,
                       static_cast<T>(1.0 / (1.0 - p.dropout_p)));
}

// Whether the GEMMs run on head_mixing_gemm's AVX-512 loops (float32 with a head size they take)
// rather than on ATen's (MKL) batched GEMMs.
bool uses_own_gemm(const Problem& p) { return p.q.scalar_type() == at::kFloat && gemm::available(p.dim); }

// Row `row` of head h of batch b of a contiguous [B, H, N, D] tensor; the head's rows follow at stride D.
template <typename T>
const T* head_rows(const at::Tensor& t, int64_t b, int64_t h, int64_t row) {
  return t.const_data_ptr<T>() + ((b * t.size(1) + h) * t.size(2) + row) * t.size(3);
}

// The current query block's rows of every head of q (scale folded in) or of dO, packed for
// gemm::scores_abt; unused (empty) when the GEMMs are ATen's.
using QueryPack = std::vector<gemm::PackedRows>;

void pack_query_rows(const Problem& p, const at::Tensor& rows_of, double alpha, int64_t b, int64_t i0, int64_t i1,
                     QueryPack& pack) {
  if (!uses_own_gemm(p)) return;
  pack.resize(p.heads);
  for (int64_t h = 0; h < p.heads; ++h) {
    gemm::pack_rows(head_rows<float>(rows_of, b, h, i0), p.dim, i1 - i0, p.dim, static_cast<float>(alpha), pack[h]);
  }
}

void pack_queries(const Problem& p, int64_t b, int64_t i0, int64_t i1, QueryPack& pack) {
  pack_query_rows(p, p.q, p.scale, b, i0, i1, pack);
}

// s [H, j1−j0, i1−i0] ← (scale · Q Kᵀ + mask)ᵀ for query rows [i0, i1) (packed in `pack`) and keys
// [j0, j1); causal entries (j > i) are −inf. If block_max is not null, it receives the [H, rows]
// row maxima of s (from the GEMM's registers when nothing is added to the scores afterwards).
template <typename T>
void scores(const Problem& p, int64_t b, int64_t i0, int64_t i1, int64_t j0, int64_t j1, at::Tensor& s,
            const QueryPack& pack, T* block_max) {
  const int64_t keys = j1 - j0, rows = i1 - i0;
  const bool causal_cut = p.causal && j1 - 1 > i0;  // some key of the block is after some query row
  const bool max_from_gemm = block_max != nullptr && !p.mask.defined() && !causal_cut;
  bool own_gemm = false;
  if constexpr (std::is_same_v<T, float>) {
    own_gemm = uses_own_gemm(p);
    for (int64_t h = 0; own_gemm && h < p.heads; ++h) {
      gemm::scores_abt(head_rows<float>(p.k, b, h, j0), p.dim, keys, pack[h], s.data_ptr<float>() + h * s.stride(0),
                       s.stride(1), max_from_gemm ? block_max + h * rows : nullptr);
    }
  }
  if (!own_gemm) {
    const at::Tensor q_rows = p.q[b].slice(1, i0, i1);
    const at::Tensor k_rows = p.k[b].slice(1, j0, j1);
    at::baddbmm_out(s, s, k_rows, q_rows.transpose(1, 2), /*beta=*/0, /*alpha=*/p.scale);
  }
  if (p.mask.defined()) s.add_(p.mask[b].slice(1, i0, i1).slice(2, j0, j1).transpose(1, 2));
  if (causal_cut) {
    T* data = s.data_ptr<T>();
    for (int64_t h = 0; h < p.heads; ++h) {
      for (int64_t c = 0; c < keys; ++c) {  // key j0 + c is hidden from queries i < j0 + c
        T* key_row = data + h * s.stride(0) + c * rows;
        std::fill(key_row, key_row + std::clamp(j0 + c - i0, int64_t{0}, rows), -std::numeric_limits<T>::infinity());
      }
    }
  }
  if (block_max != nullptr && !(max_from_gemm && own_gemm)) {
    tiles::row_max(s.data_ptr<T>(), shape_of(s), block_max);
  }
}

// Per-thread [H, rows] row statistics and [H, H, rows] mixing coefficients of one query block.
template <typename T>
struct RowScratch {
  std::vector<T> a, b, c, mix_coef, mix_t_coef;
  RowScratch(int64_t heads, int64_t rows)
      : a(heads * rows), b(heads * rows), c(heads * rows), mix_coef(heads * heads * rows),
        mix_t_coef(heads * heads * rows) {}
};

// out[h, g, i] = matrix[h, g] · (row_factor ? row_factor[g, i] : 1): tiles::mix_heads' coefficients.
template <typename T>
const T* mixing_coefficients(const at::Tensor& matrix, int64_t rows, std::vector<T>& out,
                             const T* row_factor = nullptr) {
  const int64_t heads = matrix.size(0);
  const T* m = matrix.data_ptr<T>();
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t g = 0; g < heads; ++g) {
      T* coef = out.data() + (h * heads + g) * rows;
      for (int64_t i = 0; i < rows; ++i) coef[i] = m[h * heads + g] * (row_factor ? row_factor[g * rows + i] : T(1));
    }
  }
  return out.data();
}

// [H, rows] statistic ↔ stat[b, :, i0:i1] of a [B, H, Nq] tensor.
template <typename T>
void load_rows(const at::Tensor& stat, int64_t b, int64_t i0, int64_t rows, T* out) {
  const T* src = stat.data_ptr<T>() + b * stat.stride(0) + i0;
  for (int64_t h = 0; h < stat.size(1); ++h) std::copy(src + h * stat.stride(1), src + h * stat.stride(1) + rows, out + h * rows);
}
template <typename T>
void store_rows(const T* in, at::Tensor& stat, int64_t b, int64_t i0, int64_t rows) {
  T* dst = stat.data_ptr<T>() + b * stat.stride(0) + i0;
  for (int64_t h = 0; h < stat.size(1); ++h) std::copy(in + h * rows, in + (h + 1) * rows, dst + h * stat.stride(1));
}

// Query rows per block and the key block, from the tile budget (see the comment at the top).
struct Blocking {
  int64_t query_rows, key_block, tile_elems;
};

Blocking blocking(const Problem& p) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t q_bytes = p.batch * p.heads * p.n_q * p.dim * p.elem();
  const int64_t tile_bytes = std::clamp(q_bytes / threads, kMinTileBytes, kMaxTileBytes);
  const int64_t per_row = std::max<int64_t>(1, p.heads * p.n_k * p.elem());
  const int64_t rows = std::min(std::clamp(tile_bytes / per_row, kMinQueryRows, kMaxQueryRows),
                                std::max<int64_t>(p.n_q, 1));
  const int64_t key_block = std::min(std::max<int64_t>(kKeyBlock, tile_bytes / (p.heads * rows * p.elem())),
                                     std::max<int64_t>(p.n_k, 1));
  const int64_t phase2_rows = std::max<int64_t>(1, tile_bytes / (p.heads * kKeyBlock * p.elem()));
  return {rows, key_block, p.heads * std::max(rows * key_block, kKeyBlock * phase2_rows)};
}

// Work is split into at most one chunk per thread. Scratch is allocated per chunk by the calling
// thread before the parallel region (as ATen's CPU flash attention does): the profiler's memory
// tracking, which the bench uses, only sees the thread that started it.
int64_t chunk_count(int64_t items) { return std::max<int64_t>(1, std::min<int64_t>(items, at::get_num_threads())); }

// Runs body(chunk) for chunk = 0 .. chunks − 1 in parallel; chunk c owns the items c, c + chunks,
// c + 2·chunks, ... Dealt round-robin, not in contiguous ranges:
// with a causal mask the cost of an item grows with its query (or shrinks with its key) block,
// and contiguous halves would leave one thread with three quarters of the work. The chunk index
// lets per-chunk partial sums be reduced in a fixed order (deterministic for a thread count).
template <typename Body>
void parallel_chunks(int64_t chunks, const Body& body) {
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    // Below autograd: the kernel's thousands of slices and out= GEMMs would otherwise each build
    // autograd view metadata. The guard is thread-local, hence here, on every worker.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t c = c0; c < c1; ++c) body(c);
  });
}

// The per-head products of a key-major tile [H, keys, rows] (dims 1, 2 dense) with rows of x, a
// contiguous [B, H, N, D] tensor, on head_mixing_gemm's loops when uses_own_gemm, else on ATen's
// batched GEMMs:
// out [H, rows, D] += tileᵀ x[b, :, j0 : j0 + keys]   (sum over keys: O += Mᵀ V, dQ += dSᵀ K);
template <typename T>
void add_key_sum(const Problem& p, at::Tensor& out, const at::Tensor& tile, const at::Tensor& x, int64_t b,
                 int64_t j0) {
  const int64_t keys = tile.size(1), rows = tile.size(2);
  if constexpr (std::is_same_v<T, float>) {
    if (uses_own_gemm(p)) {
      for (int64_t h = 0; h < p.heads; ++h) {
        gemm::accumulate_atb(tile.const_data_ptr<float>() + h * tile.stride(0), rows, head_rows<float>(x, b, h, j0),
                             p.dim, keys, rows, p.dim, out.data_ptr<float>() + h * out.stride(0), out.stride(1));
      }
      return;
    }
  }
  out.baddbmm_(tile.transpose(1, 2), x[b].slice(1, j0, j0 + keys));
}

// out [H, keys, D] += tile x[b, :, i0 : i0 + rows]   (sum over query rows: dK += dSᵀ Q, dV += Mᵀ dO
// with dS, M key-major).
template <typename T>
void add_row_sum(const Problem& p, at::Tensor out, const at::Tensor& tile, const at::Tensor& x, int64_t b,
                 int64_t i0) {
  const int64_t keys = tile.size(1), rows = tile.size(2);
  if constexpr (std::is_same_v<T, float>) {
    if (uses_own_gemm(p)) {
      for (int64_t h = 0; h < p.heads; ++h) {
        gemm::multiply_add(tile.const_data_ptr<float>() + h * tile.stride(0), rows, keys, head_rows<float>(x, b, h, i0),
                           p.dim, rows, p.dim, out.data_ptr<float>() + h * out.stride(0), out.stride(1));
      }
      return;
    }
  }
  out.baddbmm_(tile, x[b].slice(1, i0, i0 + rows));
}

// o [H, rows, D] += Mᵀ V for keys [j0, j0 + p_tile.size(1)), with M_h = Σ_g coef[h, g] P_g
// (tiles::mix_heads) times the dropout factor (drop_keys: dropout_keys), mixed kMixChunk keys at a
// time into `mixed`.
template <typename T>
void mix_and_accumulate(const Problem& p, int64_t b, int64_t j0, const at::Tensor& p_tile, const T* coef,
                        const uint32_t* drop_keys, Tile& mixed, at::Tensor& o) {
  const int64_t keys = p_tile.size(1), rows = p_tile.size(2);
  for (int64_t c0 = 0; c0 < keys; c0 += kMixChunk) {
    const int64_t c1 = std::min(keys, c0 + kMixChunk);
    const at::Tensor chunk = p_tile.slice(1, c0, c1);
    at::Tensor m = mixed.view(p.heads, c1 - c0, rows);
    tiles::mix_heads(coef, chunk.data_ptr<T>(), shape_of(chunk), m.data_ptr<T>(), m.stride(0));
    drop<T>(p, drop_keys, j0 + c0, m);
    add_key_sum<T>(p, o, m, p.v, b, j0 + c0);
  }
}

template <typename T>
struct ForwardScratch {
  Tile probs, mixed, acc;
  RowScratch<T> stats;
  std::vector<T> block_max, chunk_shifts;  // [H, rows] of the last key block; m_c: [key chunks, H, rows]
  QueryPack query_pack;
  ForwardScratch(const Problem& p, const Blocking& blk)
      : probs(make_tile(p, blk.tile_elems)),
        mixed(make_tile(p, p.heads * kMixChunk * blk.query_rows)),
        acc(make_tile(p, p.heads * blk.query_rows * p.dim)),
        stats(p.heads, blk.query_rows),
        block_max(p.heads * blk.query_rows),
        chunk_shifts(((blk.key_block + kMixChunk - 1) / kMixChunk) * p.heads * blk.query_rows) {}
};

// Folds a key block's row maxima into a running row max and Σ exp(S − running max) (the sums are
// rescaled to a new max), and sets the shift the block is to be exponentiated with: the new max, or
// 0 where the row is still fully masked (exp(−inf − 0) = 0, no NaN).
template <typename T>
void fold_block_max(const T* block_max, int64_t n_stats, T* running_max, T* sums, T* shift) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < n_stats; ++r) {
    const T new_max = std::max(running_max[r], block_max[r]);
    if (new_max > running_max[r] && running_max[r] != kNegInf) sums[r] *= std::exp(running_max[r] - new_max);
    running_max[r] = new_max;
    shift[r] = new_max == kNegInf ? T(0) : new_max;
  }
}

// Scores key block [j0, j1) into s, exponentiates it against the running max (fold_block_max) and
// adds its row sums.
template <typename T>
void score_and_fold(const Problem& p, int64_t b, int64_t i0, int64_t i1, int64_t j0, int64_t j1, at::Tensor& s,
                    ForwardScratch<T>& fs, T* running_max, T* sums, T* shift) {
  scores(p, b, i0, i1, j0, j1, s, fs.query_pack, fs.block_max.data());
  fold_block_max(fs.block_max.data(), s.size(0) * s.size(2), running_max, sums, shift);
  tiles::exp_shifted(s.data_ptr<T>(), shape_of(s), shift, sums);
}

// row_lse = max + log Σ, +inf for a fully masked row (so that exp(s − lse) = 0 later), and row_lost
// = (max − row_lse) + log Σ, what that sum lost to rounding, kept where it exceeds a few ulps (as the
// Triton kernels: head_mixing_chunked.lost_tolerance). It matters where the max is so large that
// max + log Σ == max (every key of the row masked with transformers' finfo.min): there exp(s − lse)
// would give each of the row's n keys probability 1, and exp(s − lse) · exp(−lost) gives 1/n.
template <typename T>
void finish_lse(const T* running_max, const T* sums, int64_t n_stats, T* row_lse, T* row_lost) {
  const T tolerance = 16 * std::numeric_limits<T>::epsilon();
  for (int64_t r = 0; r < n_stats; ++r) {
    const T log_sum = sums[r] > 0 ? std::log(sums[r]) : T(0);
    row_lse[r] = sums[r] > 0 ? running_max[r] + log_sum : T(kInf);
    const T lost = sums[r] > 0 ? (running_max[r] - row_lse[r]) + log_sum : T(0);
    row_lost[r] = std::abs(lost) > tolerance ? lost : T(0);
  }
}

// P ← P · exp(−lost) on the rows of a [heads, keys, rows] tile of exp(S − L) whose L lost part of log Σ
// (finish_lse); no other row is touched.
template <typename T>
void restore_lost_sums(at::Tensor& s, const T* row_lost) {
  const int64_t heads = s.size(0), keys = s.size(1), rows = s.size(2);
  T* data = s.data_ptr<T>();
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t i = 0; i < rows; ++i) {
      if (row_lost[h * rows + i] == T(0)) continue;
      const T factor = std::exp(-row_lost[h * rows + i]);
      for (int64_t c = 0; c < keys; ++c) data[h * s.stride(0) + c * s.stride(1) + i * s.stride(2)] *= factor;
    }
  }
}

// The whole key row fits the tile: one pass over key chunks of kMixChunk keys, each scored and
// exponentiated while it is in cache, with an online row max (as FlashAttention's): chunk c keeps
// exp(S − m_c), m_c the running max when it was done, and the mix folds exp(m_c − m) / Σ into its
// coefficients. Then o = Σ_chunks (mix @ P) V. Row log-sum-exp → row_lse, row_lost.
template <typename T>
void forward_one_pass(const Problem& p, int64_t b, int64_t i0, int64_t i1, const uint32_t* drop_keys,
                      ForwardScratch<T>& fs, at::Tensor& o, T* row_lse, T* row_lost) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t rows = i1 - i0, keys = p.key_end(i1), n_stats = p.heads * rows;
  T *running_max = fs.stats.a.data(), *sums = fs.stats.b.data(), *shift = fs.stats.c.data();
  std::fill(running_max, running_max + n_stats, kNegInf);
  std::fill(sums, sums + n_stats, T(0));
  const auto chunk_tile = [&](int64_t c0, int64_t c1) {  // chunks packed one after another
    return fs.probs.view(p.heads, c1 - c0, rows, p.heads * c0 * rows);
  };
  for (int64_t c0 = 0, chunk = 0; c0 < keys; c0 += kMixChunk, ++chunk) {
    at::Tensor s = chunk_tile(c0, std::min(keys, c0 + kMixChunk));
    score_and_fold(p, b, i0, i1, c0, c0 + s.size(1), s, fs, running_max, sums, shift);
    std::copy(running_max, running_max + n_stats, fs.chunk_shifts.data() + chunk * n_stats);  // m_c
  }
  finish_lse(running_max, sums, n_stats, row_lse, row_lost);
  const int64_t n_chunks = (keys + kMixChunk - 1) / kMixChunk;
  for (int64_t chunk = n_chunks - 1; chunk >= 0; --chunk) {  // the last chunks done are still in cache
    const int64_t c0 = chunk * kMixChunk, c1 = std::min(keys, c0 + kMixChunk);
    const T* chunk_shift = fs.chunk_shifts.data() + chunk * n_stats;
    for (int64_t r = 0; r < n_stats; ++r) {  // P = exp(S − m_c) · exp(m_c − m) / Σ; 0 where masked
      shift[r] = sums[r] > 0 && chunk_shift[r] != kNegInf ? std::exp(chunk_shift[r] - running_max[r]) / sums[r] : T(0);
    }
    const T* coef = mixing_coefficients(p.mix, rows, fs.stats.mix_coef, shift);
    mix_and_accumulate<T>(p, b, c0, chunk_tile(c0, c1), coef, drop_keys, fs.mixed, o);
  }
}

// The key row is longer than the tile: pass 1 over key blocks computes the row log-sum-exp (the
// same running max and sums), pass 2 recomputes P = exp(S − L) (· exp(−lost)) block by block and mixes
// it (+inf L: a fully masked row, P = 0).
template <typename T>
void forward_two_passes(const Problem& p, const Blocking& blk, int64_t b, int64_t i0, int64_t i1,
                        const uint32_t* drop_keys, ForwardScratch<T>& fs, at::Tensor& o, T* row_lse,
                        T* row_lost) {
  const int64_t rows = i1 - i0, keys = p.key_end(i1), n_stats = p.heads * rows;
  T *running_max = fs.stats.a.data(), *sums = fs.stats.b.data(), *shift = fs.stats.c.data();
  std::fill(running_max, running_max + n_stats, -std::numeric_limits<T>::infinity());
  std::fill(sums, sums + n_stats, T(0));
  for (int64_t j0 = 0; j0 < keys; j0 += blk.key_block) {
    const int64_t j1 = std::min(keys, j0 + blk.key_block);
    at::Tensor s = fs.probs.view(p.heads, j1 - j0, rows);
    score_and_fold(p, b, i0, i1, j0, j1, s, fs, running_max, sums, shift);
  }
  finish_lse(running_max, sums, n_stats, row_lse, row_lost);
  const T* coef = mixing_coefficients(p.mix, rows, fs.stats.mix_coef);
  for (int64_t j0 = 0; j0 < keys; j0 += blk.key_block) {
    const int64_t j1 = std::min(keys, j0 + blk.key_block);
    at::Tensor s = fs.probs.view(p.heads, j1 - j0, rows);
    scores(p, b, i0, i1, j0, j1, s, fs.query_pack, static_cast<T*>(nullptr));
    tiles::exp_shifted(s.data_ptr<T>(), shape_of(s), row_lse, static_cast<T*>(nullptr));
    restore_lost_sums(s, row_lost);
    mix_and_accumulate<T>(p, b, j0, s, coef, drop_keys, fs.mixed, o);
  }
}

template <typename T>
void forward_items(const Problem& p, const Blocking& blk, at::Tensor& out, at::Tensor& lse) {
  at::Tensor lse_rows = lse[0], lost_rows = lse[1];
  const int64_t q_blocks = (p.n_q + blk.query_rows - 1) / blk.query_rows;
  const int64_t chunks = chunk_count(p.batch * q_blocks);
  std::vector<ForwardScratch<T>> scratch;
  for (int64_t c = 0; c < chunks; ++c) scratch.emplace_back(p, blk);
  parallel_chunks(chunks, [&](int64_t chunk) {
    ForwardScratch<T>& fs = scratch[chunk];
    std::vector<T> row_lse(p.heads * blk.query_rows), row_lost(p.heads * blk.query_rows);
    std::vector<uint32_t> key_buffer;
    for (int64_t item = chunk; item < p.batch * q_blocks; item += chunks) {
      const int64_t b = item / q_blocks, i0 = (item % q_blocks) * blk.query_rows;
      const int64_t i1 = std::min(p.n_q, i0 + blk.query_rows), rows = i1 - i0;
      at::Tensor o = fs.acc.view(p.heads, rows, p.dim).zero_();
      pack_queries(p, b, i0, i1, fs.query_pack);
      const uint32_t* drop_keys = dropout_keys(p, b, i0, rows, key_buffer);
      if (p.key_end(i1) <= blk.key_block) {
        forward_one_pass(p, b, i0, i1, drop_keys, fs, o, row_lse.data(), row_lost.data());
      } else {
        forward_two_passes(p, blk, b, i0, i1, drop_keys, fs, o, row_lse.data(), row_lost.data());
      }
      out[b].slice(1, i0, i1).copy_(o);
      store_rows(row_lse.data(), lse_rows, b, i0, rows);
      store_rows(row_lost.data(), lost_rows, b, i0, rows);
    }
  });
}

// How the backward shares dK/dV among threads (see the comment at the top).
enum class KeyGradients { kOwnedBatches, kThreadCopies, kTwoPhases };

KeyGradients key_gradient_plan(const Problem& p, int64_t q_items) {
  const int64_t threads = chunk_count(q_items);
  // Whole batches per thread while that balances (at most 25% idle).
  if (p.batch % threads == 0 || p.batch >= 4 * threads) return KeyGradients::kOwnedBatches;
  // threads − 1 copies of dK and dV, allowed up to the size of two q-sized tensors.
  if ((threads - 1) * 2 * p.n_k <= 2 * p.n_q) return KeyGradients::kThreadCopies;
  return KeyGradients::kTwoPhases;
}

struct BackwardTiles {
  Tile probs, dots, mixed;
  QueryPack query_pack, grad_pack;  // the query block's q (scaled) and dO
  BackwardTiles(const Problem& p, int64_t elems)
      : probs(make_tile(p, elems)), dots(make_tile(p, elems)), mixed(make_tile(p, elems)) {}
};

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_items(const Problem& p, const Blocking& blk,
                                                                          const at::Tensor& d_out,
                                                                          const at::Tensor& lse) {
  const at::Tensor lse_rows = lse[0], lost_rows = lse[1];
  const int64_t q_blocks = (p.n_q + blk.query_rows - 1) / blk.query_rows;
  const KeyGradients plan = key_gradient_plan(p, p.batch * q_blocks);
  const bool by_batch = plan == KeyGradients::kOwnedBatches;  // items: whole batches, else query blocks
  const int64_t items = by_batch ? p.batch : p.batch * q_blocks, chunks = chunk_count(items);
  const int64_t k_blocks = (p.n_k + kKeyBlock - 1) / kKeyBlock;  // phase 2's items, for two phases
  const int64_t key_chunks = plan == KeyGradients::kTwoPhases ? chunk_count(p.batch * k_blocks) : 0;
  at::Tensor dq = at::empty_like(p.q), dk = at::zeros_like(p.k), dv = at::zeros_like(p.v);
  at::Tensor row_d = at::empty({p.batch, p.heads, p.n_q}, p.q.options());  // D_g[i], kept for phase 2
  const at::Tensor mix_t = p.mix.t().contiguous();
  std::vector<BackwardTiles> tiles_of;
  std::vector<at::Tensor> dmix_parts, dq_rows_of, dk_parts(chunks), dv_parts(chunks);
  for (int64_t c = 0; c < std::max(chunks, key_chunks); ++c) tiles_of.emplace_back(p, blk.tile_elems);
  for (int64_t c = 0; c < chunks; ++c) {
    dmix_parts.push_back(at::zeros({p.heads, p.heads}, p.q.options()));
    dq_rows_of.push_back(at::empty({p.heads * blk.query_rows * p.dim}, p.q.options()));
    if (plan == KeyGradients::kThreadCopies && c > 0) {
      dk_parts[c] = at::zeros_like(p.k);
      dv_parts[c] = at::zeros_like(p.v);
    }
  }

  // probs ← P, dots ← T = V dOᵀ (⊙ the dropout factor), mixed ← E_g = Σ_h mix[h, g] T_h, as
  // [H, keys, rows] tiles.
  const auto tile_products = [&](int64_t b, int64_t i0, int64_t i1, int64_t j0, int64_t j1, const T* row_lse,
                                 const T* row_lost, const T* coef_e, const uint32_t* drop_keys,
                                 const BackwardTiles& tl, at::Tensor& s, at::Tensor& t, at::Tensor& e) {
    scores(p, b, i0, i1, j0, j1, s, tl.query_pack, static_cast<T*>(nullptr));
    tiles::exp_shifted(s.data_ptr<T>(), shape_of(s), row_lse, static_cast<T*>(nullptr));
    restore_lost_sums(s, row_lost);
    if (uses_own_gemm(p)) {  // T_h = V_h dO_hᵀ, key-major: the scores' GEMM with dO's rows packed
      for (int64_t h = 0; h < p.heads; ++h) {
        gemm::scores_abt(head_rows<float>(p.v, b, h, j0), p.dim, j1 - j0, tl.grad_pack[h],
                         t.data_ptr<float>() + h * t.stride(0), t.stride(1), nullptr);
      }
    } else {
      at::bmm_out(t, p.v[b].slice(1, j0, j1), d_out[b].slice(1, i0, i1).transpose(1, 2));
    }
    drop<T>(p, drop_keys, j0, t);
    tiles::mix_heads(coef_e, t.data_ptr<T>(), shape_of(t), e.data_ptr<T>(), e.stride(0));
  };
  // dK[keys] += dSᵀ Q (dS carries the scale), and M = mix @ P (⊙ the dropout factor) into T's
  // buffer (T is spent): dV[keys] += Mᵀ dO.
  const auto key_grads = [&](int64_t b, int64_t i0, int64_t j0, const T* coef_m, const uint32_t* drop_keys,
                             const at::Tensor& s, at::Tensor& t, const at::Tensor& ds, at::Tensor dk_rows,
                             at::Tensor dv_rows) {
    add_row_sum<T>(p, dk_rows, ds, p.q, b, i0);
    tiles::mix_heads(coef_m, s.data_ptr<T>(), shape_of(s), t.data_ptr<T>(), t.stride(0));
    drop<T>(p, drop_keys, j0, t);
    add_row_sum<T>(p, dv_rows, t, d_out, b, i0);
  };

  // Per query block: D, dmix, dQ, and (unless two phases) dK/dV.
  const auto query_block = [&](int64_t chunk, int64_t b, int64_t i0, BackwardTiles& tl, RowScratch<T>& stats,
                               std::vector<uint32_t>& key_buffer, at::Tensor& dmix, at::Tensor& dq_acc) {
    const int64_t i1 = std::min(p.n_q, i0 + blk.query_rows), rows = i1 - i0, keys = p.key_end(i1);
    T *row_lse = stats.a.data(), *d = stats.b.data(), *row_lost = stats.c.data();
    load_rows(lse_rows, b, i0, rows, row_lse);
    load_rows(lost_rows, b, i0, rows, row_lost);
    pack_queries(p, b, i0, i1, tl.query_pack);
    pack_query_rows(p, d_out, 1.0, b, i0, i1, tl.grad_pack);
    std::fill(d, d + p.heads * rows, T(0));
    const T* coef_e = mixing_coefficients(mix_t, rows, stats.mix_t_coef);
    const T* coef_m = mixing_coefficients(p.mix, rows, stats.mix_coef);
    const uint32_t* drop_keys = dropout_keys(p, b, i0, rows, key_buffer);
    at::Tensor dq_rows = dq_acc.narrow(0, 0, p.heads * rows * p.dim).view({p.heads, rows, p.dim}).zero_();
    at::Tensor dk_b = plan == KeyGradients::kThreadCopies && chunk > 0 ? dk_parts[chunk][b] : dk[b];
    at::Tensor dv_b = plan == KeyGradients::kThreadCopies && chunk > 0 ? dv_parts[chunk][b] : dv[b];
    const bool one_pass = keys <= blk.key_block;
    for (int pass = 0; pass < (one_pass ? 1 : 2); ++pass) {
      for (int64_t j0 = 0; j0 < keys; j0 += blk.key_block) {
        const int64_t j1 = std::min(keys, j0 + blk.key_block), cols = j1 - j0;
        at::Tensor s = tl.probs.view(p.heads, cols, rows), t = tl.dots.view(p.heads, cols, rows);
        at::Tensor e = tl.mixed.view(p.heads, cols, rows);
        tile_products(b, i0, i1, j0, j1, row_lse, row_lost, coef_e, drop_keys, tl, s, t, e);
        if (pass == 0) {  // dmix[h, g] += Σ T_h ⊙ P_g ; D_g += rowsum(P_g ⊙ E_g)
          dmix.addmm_(flat2d(t), flat2d(s).t());
          tiles::add_row_dots(e.data_ptr<T>(), s.data_ptr<T>(), shape_of(e), d);
        }
        if (one_pass || pass == 1) {  // dS = scale · P ⊙ (E − D); dQ += dS K
          tiles::softmax_grad(e.data_ptr<T>(), s.data_ptr<T>(), shape_of(e), d, static_cast<T>(p.scale));
          add_key_sum<T>(p, dq_rows, e, p.k, b, j0);
          if (plan != KeyGradients::kTwoPhases)
            key_grads(b, i0, j0, coef_m, drop_keys, s, t, e, dk_b.slice(1, j0, j1), dv_b.slice(1, j0, j1));
        }
      }
    }
    dq[b].slice(1, i0, i1).copy_(dq_rows);
    if (plan == KeyGradients::kTwoPhases) store_rows(d, row_d, b, i0, rows);
  };

  parallel_chunks(chunks, [&](int64_t chunk) {
    RowScratch<T> stats(p.heads, blk.query_rows);
    std::vector<uint32_t> key_buffer;
    for (int64_t item = chunk; item < items; item += chunks) {
      const auto run = [&](int64_t b, int64_t i0) {
        query_block(chunk, b, i0, tiles_of[chunk], stats, key_buffer, dmix_parts[chunk], dq_rows_of[chunk]);
      };
      if (by_batch) {
        for (int64_t qb = 0; qb < q_blocks; ++qb) run(item, qb * blk.query_rows);
      } else {
        run(item / q_blocks, (item % q_blocks) * blk.query_rows);
      }
    }
  });
  for (int64_t c = 1; c < chunks && plan == KeyGradients::kThreadCopies; ++c) {
    dk.add_(dk_parts[c]);
    dv.add_(dv_parts[c]);
  }

  if (plan == KeyGradients::kTwoPhases) {  // per key block: dK and dV, every key row owned by one item
    const int64_t query_chunk = std::max<int64_t>(1, blk.tile_elems / (p.heads * kKeyBlock));
    parallel_chunks(key_chunks, [&](int64_t chunk) {
      BackwardTiles& tl = tiles_of[chunk];
      RowScratch<T> stats(p.heads, query_chunk);
      std::vector<uint32_t> key_buffer;
      for (int64_t item = chunk; item < p.batch * k_blocks; item += key_chunks) {
        const int64_t b = item / k_blocks, j0 = (item % k_blocks) * kKeyBlock;
        const int64_t j1 = std::min(p.n_k, j0 + kKeyBlock), cols = j1 - j0;
        for (int64_t i0 = p.query_begin(j0); i0 < p.n_q; i0 += query_chunk) {
          const int64_t i1 = std::min(p.n_q, i0 + query_chunk), rows = i1 - i0;
          T *row_lse = stats.a.data(), *d = stats.b.data(), *row_lost = stats.c.data();
          load_rows(lse_rows, b, i0, rows, row_lse);
          load_rows(lost_rows, b, i0, rows, row_lost);
          load_rows(row_d, b, i0, rows, d);
          pack_queries(p, b, i0, i1, tl.query_pack);
          pack_query_rows(p, d_out, 1.0, b, i0, i1, tl.grad_pack);
          const T* coef_e = mixing_coefficients(mix_t, rows, stats.mix_t_coef);
          const T* coef_m = mixing_coefficients(p.mix, rows, stats.mix_coef);
          at::Tensor s = tl.probs.view(p.heads, cols, rows), t = tl.dots.view(p.heads, cols, rows);
          at::Tensor e = tl.mixed.view(p.heads, cols, rows);
          const uint32_t* drop_keys = dropout_keys(p, b, i0, rows, key_buffer);
          tile_products(b, i0, i1, j0, j1, row_lse, row_lost, coef_e, drop_keys, tl, s, t, e);
          tiles::softmax_grad(e.data_ptr<T>(), s.data_ptr<T>(), shape_of(e), d, static_cast<T>(p.scale));
          key_grads(b, i0, j0, coef_m, drop_keys, s, t, e, dk[b].slice(1, j0, j1), dv[b].slice(1, j0, j1));
        }
      }
    });
  }

  at::Tensor dmix = dmix_parts[0];
  for (int64_t c = 1; c < chunks; ++c) dmix.add_(dmix_parts[c]);
  return {dq, dk, dv, dmix};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> head_mixing_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, const at::Tensor& mix,
                                                                 const std::optional<at::Tensor>& mask,
                                                                 bool is_causal, double scale, double dropout_p,
                                                                 const std::optional<at::Tensor>& seed) {
  const Problem p = make_problem(q, k, v, mix, mask, is_causal, scale, dropout_p, seed);
  at::Tensor out = at::empty({p.batch, p.heads, p.n_q, p.dim}, p.q.options());
  at::Tensor lse = at::empty({2, p.batch, p.heads, p.n_q}, p.q.options());  // (L, lost): see finish_lse
  AT_DISPATCH_FLOATING_TYPES(p.q.scalar_type(), "head_mixing_attention_forward",
                             [&] { forward_items<scalar_t>(p, blocking(p), out, lse); });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_mixing_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mix,
    const std::optional<at::Tensor>& mask, const at::Tensor& lse, bool is_causal, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  const Problem p = make_problem(q, k, v, mix, mask, is_causal, scale, dropout_p, seed);
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "grad_out must have q's shape ", q.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(lse.dim() == 4 && lse.size(0) == 2 && lse.size(1) == p.batch && lse.size(2) == p.heads &&
                  lse.size(3) == p.n_q,
              "lse must be [2, B, H, Nq] (L and what it lost), got ", lse.sizes());
  const at::Tensor d_out = grad_out.detach().to(p.q.scalar_type()).contiguous();
  const at::Tensor row_lse = lse.detach().to(p.q.scalar_type()).contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(p.q.scalar_type(), "head_mixing_attention_backward",
                             [&] { grads = backward_items<scalar_t>(p, blocking(p), d_out, row_lse); });
  auto& [dq, dk, dv, dmix] = grads;
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()), dmix};
}

}  // namespace subspace_ops
