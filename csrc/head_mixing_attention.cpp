// Head-mixing attention on the CPU (Coeff-Tuning, METHODS.md §3), O(N) memory per head.
//
// Forward, per (batch, block of query rows), all heads together:
//   S_g = scale · Q_g K_gᵀ + mask          [H, rows, keys]   one batched GEMM
//   P_g = exp(S_g − L_g)                    L_g = row log-sum-exp, saved for the backward
//   M   = mix @ P   (as [H, H] @ [H, rows·keys])               the head mix: one GEMM
//   O_h = M_h V_h                                              one batched GEMM
// When the whole key row of a block fits the tile budget (ViT, and N ≤ ~4k at H = 8) this is one
// pass; otherwise a first pass over key blocks computes L and a second recomputes P block by block.
//
// Backward (T_h = dO_h V_hᵀ, E_g = Σ_h mix[h,g] T_h, D_g[i] = Σ_j P_g[i,j] E_g[i,j]):
//   phase 1, per (batch, query block): D, dmix[h,g] += Σ T_h ⊙ P_g, dQ_g = scale · dS_g K_g
//   phase 2, per (batch, key block):   dS_g = P_g ⊙ (E_g − D_g), dK_g = scale · dS_gᵀ Q_g,
//                                      dV_h = M_hᵀ dO_h
// FlashAttention's D = rowsum(dO ⊙ O) does not hold once heads are mixed, hence phase 1. Splitting
// the work by key blocks in phase 2 lets every thread own its dK/dV rows: no per-thread copies of
// dK/dV and no atomics. dmix partials are summed in chunk order, so results are deterministic for a
// given thread count.
#include "head_mixing_attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace subspace_ops {
namespace {

// Tiles are key-major, [H, keys, rows]: scores come from S_gᵀ = K_g Q_gᵀ, a GEMM whose long side is
// the key dimension. MKL runs the thin-query-block GEMMs of this kernel 1.5–2× faster that way round
// than as Q Kᵀ (measured at H = 8, N = 2048, d = 64, 16–32 query rows), and a block's softmax
// statistics are reductions over dim 1.
//
// Memory: a thread holds one [H, keys, rows] tile per live quantity (forward: P, plus a small mixed
// chunk; backward: P, T, E). One tile is capped at q's size divided among the threads, so the
// forward's scratch is about one more output: measured 1.37x SDPA's peak at B1 H8 N4096 d64 (fp32,
// 2 threads; 1.07x for forward+backward, whose baseline holds dq, dk, dv). Within that
// cap a query block is as tall as possible (GEMM efficiency) and covers the whole key row (P is
// computed once); rows below kMinQueryRows switch to key blocks and two passes.
constexpr int64_t kMinTileBytes = int64_t{1} << 20;
constexpr int64_t kMaxTileBytes = int64_t{8} << 20;
constexpr int64_t kMinQueryRows = 8;
constexpr int64_t kMaxQueryRows = 64;
constexpr int64_t kKeyBlock = 128;   // phase 2's key block (the rows of dK/dV one item owns)
constexpr int64_t kMixChunk = 512;   // keys mixed at once in the forward: [H, kMixChunk, rows]

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Problem {
  at::Tensor q, k, v, mix, mix_t, mask;  // accumulation dtype, contiguous; mask may be undefined
  bool causal = false;
  double scale = 1.0;
  int64_t batch = 0, heads = 0, n_q = 0, n_k = 0, dim = 0;

  // Keys that query rows [.., i1) can see: SDPA's top-left causal triangle keeps j <= i.
  int64_t key_end(int64_t i1) const { return causal ? std::min(n_k, i1) : n_k; }
  // Query rows that keys [j0, ..) can be seen from.
  int64_t query_begin(int64_t j0) const { return causal ? std::min(n_q, j0) : 0; }
  int64_t elem() const { return q.element_size(); }
};

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mix,
                     const std::optional<at::Tensor>& mask, bool is_causal, double scale) {
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
  p.mix_t = p.mix.t().contiguous();
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
  return p;
}

// A flat per-thread buffer handing out contiguous [H, keys, rows] views.
struct Tile {
  at::Tensor flat;
  at::Tensor view(int64_t heads, int64_t keys, int64_t rows) {
    return flat.narrow(0, 0, heads * keys * rows).view({heads, keys, rows});
  }
};

Tile make_tile(const Problem& p, int64_t elements) { return {at::empty({elements}, p.q.options())}; }

// out ← a @ b for an out that is a view (ATen's *_out functions take an lvalue).
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

// [H, keys, rows] → [H, keys·rows] (keys may be a slice of a longer tile: dims 1, 2 stay dense).
at::Tensor flat2d(const at::Tensor& t) { return t.view({t.size(0), t.size(1) * t.size(2)}); }

// A per-row statistic of a query block, [B, H, Nq] → [H, 1, rows], broadcasting over keys.
at::Tensor row_stat(const at::Tensor& stat, int64_t b, int64_t i0, int64_t i1) {
  return stat[b].slice(1, i0, i1).unsqueeze(1);
}

// s [H, j1−j0, i1−i0] ← (scale · Q Kᵀ + mask)ᵀ for query rows [i0, i1) and keys [j0, j1);
// causal entries (j > i) are −inf.
void scores(const Problem& p, int64_t b, int64_t i0, int64_t i1, int64_t j0, int64_t j1, at::Tensor s) {
  const at::Tensor q_rows = p.q[b].slice(1, i0, i1);
  const at::Tensor k_rows = p.k[b].slice(1, j0, j1);
  at::baddbmm_out(s, s, k_rows, q_rows.transpose(1, 2), /*beta=*/0, /*alpha=*/p.scale);
  if (p.mask.defined()) s.add_(p.mask[b].slice(1, i0, i1).slice(2, j0, j1).transpose(1, 2));
  if (p.causal && j1 - 1 > i0) {
    const int64_t keys = j1 - j0, rows = i1 - i0;
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "head_mixing_causal", [&] {
      scalar_t* data = s.data_ptr<scalar_t>();
      const auto neg_inf = -std::numeric_limits<scalar_t>::infinity();
      for (int64_t h = 0; h < p.heads; ++h) {
        for (int64_t c = 0; c < keys; ++c) {  // key j0 + c is hidden from queries i < j0 + c
          const int64_t hidden_rows = std::clamp(j0 + c - i0, int64_t{0}, rows);
          scalar_t* key_row = data + (h * keys + c) * rows;
          std::fill(key_row, key_row + hidden_rows, neg_inf);
        }
      }
    });
  }
}

// s ← exp(s − rowmax) in place; returns the row log-sum-exp [H, 1, rows] (−inf for an empty row)
// and, through `sums`, the row sums of the exponentials.
at::Tensor exp_and_lse(const at::Tensor& s, at::Tensor& sums) {
  at::Tensor row_max = s.amax(1, /*keepdim=*/true);
  row_max.masked_fill_(row_max == -kInf, 0);  // a fully masked row: exp(−inf − 0) = 0, no NaN
  s.sub_(row_max).exp_();
  sums = s.sum(1, /*keepdim=*/true);
  return row_max.add_(sums.log());
}

// o [H, rows, D] += Σ over keys of (mix @ P)ᵀ V, mixing kMixChunk keys at a time; p_tile holds P
// for keys [j0, j0 + p_tile.size(1)).
void mix_and_accumulate(const Problem& p, int64_t b, int64_t j0, const at::Tensor& p_tile, Tile& mixed,
                        at::Tensor& o) {
  const int64_t keys = p_tile.size(1), rows = p_tile.size(2);
  for (int64_t c0 = 0; c0 < keys; c0 += kMixChunk) {
    const int64_t c1 = std::min(keys, c0 + kMixChunk);
    at::Tensor m = mixed.view(p.heads, c1 - c0, rows);
    mm_into(flat2d(m), p.mix, flat2d(p_tile.slice(1, c0, c1)));  // M_h = Σ_g mix[h, g] P_g
    o.baddbmm_(m.transpose(1, 2), p.v[b].slice(1, j0 + c0, j0 + c1));  // O_h += M_h V_h
  }
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

// Runs body(chunk, first, stride) in at most one chunk per thread; chunk c owns the items
// c, c + stride, c + 2·stride, ... of [0, items). Dealt round-robin, not in contiguous ranges:
// with a causal mask the cost of an item grows with its query (or shrinks with its key) block,
// and contiguous halves would leave one thread with three quarters of the work. The chunk index
// lets per-chunk partial sums be reduced in a fixed order (deterministic for a thread count).
template <typename Body>
int64_t parallel_chunks(int64_t items, const Body& body) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(items, at::get_num_threads()));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) body(c, c, chunks);
  });
  return chunks;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> head_mixing_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, const at::Tensor& mix,
                                                                 const std::optional<at::Tensor>& mask,
                                                                 bool is_causal, double scale) {
  const Problem p = make_problem(q, k, v, mix, mask, is_causal, scale);
  const Blocking blk = blocking(p);
  const int64_t q_blocks = (p.n_q + blk.query_rows - 1) / blk.query_rows;
  at::Tensor out = at::empty({p.batch, p.heads, p.n_q, p.dim}, p.q.options());
  at::Tensor lse = at::empty({p.batch, p.heads, p.n_q}, p.q.options());

  parallel_chunks(p.batch * q_blocks, [&](int64_t, int64_t first, int64_t stride) {
    Tile probs = make_tile(p, blk.tile_elems);
    Tile mixed = make_tile(p, p.heads * kMixChunk * blk.query_rows);
    Tile acc = make_tile(p, p.heads * blk.query_rows * p.dim);
    for (int64_t item = first; item < p.batch * q_blocks; item += stride) {
      const int64_t b = item / q_blocks, i0 = (item % q_blocks) * blk.query_rows;
      const int64_t i1 = std::min(p.n_q, i0 + blk.query_rows), rows = i1 - i0, keys = p.key_end(i1);
      at::Tensor o = acc.view(p.heads, rows, p.dim).zero_();
      at::Tensor row_lse, sums;
      if (keys <= blk.key_block) {  // one pass: the whole key row is in the tile
        at::Tensor s = probs.view(p.heads, keys, rows);
        scores(p, b, i0, i1, 0, keys, s);
        row_lse = exp_and_lse(s, sums);
        at::Tensor inv_sums = sums.reciprocal();
        inv_sums.masked_fill_(sums == 0, 0);  // an empty row keeps probabilities 0
        s.mul_(inv_sums);
        mix_and_accumulate(p, b, 0, s, mixed, o);
      } else {  // pass 1: L by log-add-exp over key blocks; pass 2: P = exp(S − L) again, mixed
        row_lse = at::full({p.heads, 1, rows}, -kInf, p.q.options());
        for (int64_t j0 = 0; j0 < keys; j0 += blk.key_block) {
          const int64_t j1 = std::min(keys, j0 + blk.key_block);
          at::Tensor s = probs.view(p.heads, j1 - j0, rows);
          scores(p, b, i0, i1, j0, j1, s);
          row_lse = at::logaddexp(row_lse, exp_and_lse(s, sums));
        }
        row_lse.masked_fill_(row_lse == -kInf, kInf);
        for (int64_t j0 = 0; j0 < keys; j0 += blk.key_block) {
          const int64_t j1 = std::min(keys, j0 + blk.key_block);
          at::Tensor s = probs.view(p.heads, j1 - j0, rows);
          scores(p, b, i0, i1, j0, j1, s);
          s.sub_(row_lse).exp_();
          mix_and_accumulate(p, b, j0, s, mixed, o);
        }
      }
      row_lse.masked_fill_(row_lse == -kInf, kInf);  // fully masked row: exp(s − (+inf)) = 0 later
      out[b].slice(1, i0, i1).copy_(o);
      lse[b].slice(1, i0, i1).copy_(row_lse.squeeze(1));
    }
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_mixing_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mix,
    const std::optional<at::Tensor>& mask, const at::Tensor& lse, bool is_causal, double scale) {
  const Problem p = make_problem(q, k, v, mix, mask, is_causal, scale);
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "grad_out must have q's shape ", q.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == p.batch && lse.size(1) == p.heads && lse.size(2) == p.n_q,
              "lse must be [B, H, Nq], got ", lse.sizes());
  const at::Tensor d_out = grad_out.detach().to(p.q.scalar_type()).contiguous();
  const at::Tensor row_lse = lse.detach().to(p.q.scalar_type()).contiguous();
  const Blocking blk = blocking(p);
  const int64_t q_blocks = (p.n_q + blk.query_rows - 1) / blk.query_rows;

  at::Tensor dq = at::empty_like(p.q), dk = at::empty_like(p.k), dv = at::empty_like(p.v);
  at::Tensor row_d = at::empty({p.batch, p.heads, p.n_q}, p.q.options());  // D_g[i]

  // probs ← P, dots ← T = dO Vᵀ, mixed ← E = mixᵀ T, as [H, keys, rows] tiles.
  const auto tile_products = [&](int64_t b, int64_t i0, int64_t i1, int64_t j0, int64_t j1, const at::Tensor& s,
                                 at::Tensor t, const at::Tensor& e) {
    scores(p, b, i0, i1, j0, j1, s);
    s.sub_(row_stat(row_lse, b, i0, i1)).exp_();
    at::bmm_out(t, p.v[b].slice(1, j0, j1), d_out[b].slice(1, i0, i1).transpose(1, 2));
    mm_into(flat2d(e), p.mix_t, flat2d(t));
  };

  // Phase 1, per query block: D, dmix and dQ.
  std::vector<at::Tensor> dmix_parts(std::max<int64_t>(1, at::get_num_threads()));
  const int64_t chunks = parallel_chunks(p.batch * q_blocks, [&](int64_t chunk, int64_t first, int64_t stride) {
    Tile probs = make_tile(p, blk.tile_elems), dots = make_tile(p, blk.tile_elems);
    Tile mixed = make_tile(p, blk.tile_elems), acc = make_tile(p, p.heads * blk.query_rows * p.dim);
    at::Tensor dmix = at::zeros({p.heads, p.heads}, p.q.options());
    for (int64_t item = first; item < p.batch * q_blocks; item += stride) {
      const int64_t b = item / q_blocks, i0 = (item % q_blocks) * blk.query_rows;
      const int64_t i1 = std::min(p.n_q, i0 + blk.query_rows), rows = i1 - i0, keys = p.key_end(i1);
      at::Tensor d = row_stat(row_d, b, i0, i1).zero_();
      at::Tensor dq_rows = acc.view(p.heads, rows, p.dim).zero_();
      const bool one_pass = keys <= blk.key_block;
      for (int pass = 0; pass < (one_pass ? 1 : 2); ++pass) {
        for (int64_t j0 = 0; j0 < keys; j0 += blk.key_block) {
          const int64_t j1 = std::min(keys, j0 + blk.key_block), cols = j1 - j0;
          at::Tensor s = probs.view(p.heads, cols, rows), t = dots.view(p.heads, cols, rows);
          at::Tensor e = mixed.view(p.heads, cols, rows);
          tile_products(b, i0, i1, j0, j1, s, t, e);
          if (pass == 0) {  // dmix[h, g] += Σ T_h ⊙ P_g ; D_g += rowsum(P_g ⊙ E_g)
            dmix.addmm_(flat2d(t), flat2d(s).t());
            d.add_(at::mul_out(t, e, s).sum(1, /*keepdim=*/true));
          }
          if (one_pass || pass == 1) {  // dS = P ⊙ (E − D); dQ += scale · dS K
            e.sub_(d).mul_(s);
            dq_rows.baddbmm_(e.transpose(1, 2), p.k[b].slice(1, j0, j1), /*beta=*/1, /*alpha=*/p.scale);
          }
        }
      }
      dq[b].slice(1, i0, i1).copy_(dq_rows);
    }
    dmix_parts[chunk] = dmix;
  });

  // Phase 2, per key block: dK and dV, every key row owned by one item.
  const int64_t k_blocks = (p.n_k + kKeyBlock - 1) / kKeyBlock;
  const int64_t query_chunk = std::max<int64_t>(1, blk.tile_elems / (p.heads * kKeyBlock));
  parallel_chunks(p.batch * k_blocks, [&](int64_t, int64_t first, int64_t stride) {
    Tile probs = make_tile(p, blk.tile_elems), dots = make_tile(p, blk.tile_elems);
    Tile mixed = make_tile(p, blk.tile_elems);
    Tile dk_acc = make_tile(p, p.heads * kKeyBlock * p.dim), dv_acc = make_tile(p, p.heads * kKeyBlock * p.dim);
    for (int64_t item = first; item < p.batch * k_blocks; item += stride) {
      const int64_t b = item / k_blocks, j0 = (item % k_blocks) * kKeyBlock;
      const int64_t j1 = std::min(p.n_k, j0 + kKeyBlock), cols = j1 - j0;
      at::Tensor dk_rows = dk_acc.view(p.heads, cols, p.dim).zero_();
      at::Tensor dv_rows = dv_acc.view(p.heads, cols, p.dim).zero_();
      for (int64_t i0 = p.query_begin(j0); i0 < p.n_q; i0 += query_chunk) {
        const int64_t i1 = std::min(p.n_q, i0 + query_chunk), rows = i1 - i0;
        at::Tensor s = probs.view(p.heads, cols, rows), t = dots.view(p.heads, cols, rows);
        at::Tensor e = mixed.view(p.heads, cols, rows);
        tile_products(b, i0, i1, j0, j1, s, t, e);
        e.sub_(row_stat(row_d, b, i0, i1)).mul_(s);  // dS
        const at::Tensor d_out_rows = d_out[b].slice(1, i0, i1);
        dk_rows.baddbmm_(e, p.q[b].slice(1, i0, i1), /*beta=*/1, /*alpha=*/p.scale);  // dK += scale dSᵀ Q
        // M = mix @ P into T's buffer (T is no longer needed): dV_h += M_hᵀ dO_h
        mm_into(flat2d(t), p.mix, flat2d(s));
        dv_rows.baddbmm_(t, d_out_rows);
      }
      dk[b].slice(1, j0, j1).copy_(dk_rows);
      dv[b].slice(1, j0, j1).copy_(dv_rows);
    }
  });

  at::Tensor dmix = dmix_parts[0];
  for (int64_t c = 1; c < chunks; ++c) dmix.add_(dmix_parts[c]);
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()), dmix};
}

}  // namespace subspace_ops
