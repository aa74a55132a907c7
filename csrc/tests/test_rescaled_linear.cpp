// C++ test of the rescaled-linear CPU kernels (METHODS.md §1) against the naive ATen formula, which
// materializes W' = W ⊙ (c + S_l S_rᵀ) and G = gyᵀ x in float64. Covers the forward and every backward
// output, shapes with several (and thin) blocks that are not multiples of the block size, a large batch
// whose W' and G are one block (block_budget), r = 1 and 4,
// residual on/off, bias on/off, weight and x as non-contiguous views, the need_* flags, and the
// argument checks. float64 is checked tightly, float32/bfloat16/float16 with dtype tolerances.
// Plain executable: prints each failure and exits non-zero if there was one.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>

#include "rescaled_linear.h"

namespace {

int checks = 0, failures = 0;

void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    std::printf("FAIL %s\n", what.c_str());
    ++failures;
  }
}

// max |actual - expected| <= tol * max(1, max |expected|), and the same dtype and shape as `like`.
void expect_close(const std::string& what, const at::Tensor& actual, const at::Tensor& expected,
                  const at::Tensor& like, double tol) {
  if (!actual.defined() || actual.sizes() != expected.sizes() || actual.scalar_type() != like.scalar_type()) {
    expect(false, what + ": undefined, or wrong shape/dtype");
    return;
  }
  if (expected.numel() == 0) return expect(true, what);
  const double error = (actual.to(at::kDouble) - expected).abs().max().item<double>();
  const double bound = tol * std::max(1.0, expected.abs().max().item<double>());
  expect(error <= bound, what + ": max abs error " + std::to_string(error) + " > " + std::to_string(bound));
}

enum class Layout { kContiguous, kTransposed, kColumnSlice, kStrided };

// `t` ([R, C]) as a view with the given memory layout (same values).
at::Tensor with_layout(const at::Tensor& t, Layout layout) {
  switch (layout) {
    case Layout::kContiguous:
      return t.contiguous();
    case Layout::kTransposed:  // unit stride along dim 0
      return t.t().contiguous().t();
    case Layout::kColumnSlice:  // unit stride along dim 1, row stride > C
      return at::zeros({t.size(0), t.size(1) + 3}, t.options()).narrow(1, 2, t.size(1)).copy_(t);
    case Layout::kStrided:  // no unit stride at all
      return at::zeros({t.size(0) * 2, t.size(1) * 2}, t.options()).slice(0, 0, t.size(0) * 2, 2)
          .slice(1, 0, t.size(1) * 2, 2).copy_(t);
  }
  return t;
}

const char* name(Layout layout) {
  const char* names[] = {"contiguous", "transposed", "column-slice", "strided"};
  return names[static_cast<int>(layout)];
}

struct Case {
  int64_t m, k, n, r;
  bool residual, bias;
  Layout w_layout, x_layout;
};

void run_case(const Case& t, at::ScalarType dtype, double tol) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  // Inputs are rounded to dtype first, so the float64 reference sees exactly what the kernel sees.
  auto make = [&](at::IntArrayRef sizes, double scale) { return (at::randn(sizes, f64) * scale).to(dtype).to(at::kDouble); };
  const at::Tensor x = make({t.m, t.k}, 1.0), weight = make({t.n, t.k}, 1.0 / std::sqrt(double(t.k)));
  const at::Tensor s_l = make({t.n, t.r}, 1.0), s_r = make({t.k, t.r}, 1.0), bias = make({t.n}, 1.0);
  const at::Tensor grad_y = make({t.m, t.n}, 1.0);

  const double c = t.residual ? 1.0 : 0.0;
  const at::Tensor modulation = at::mm(s_l, s_r.t()) + c;
  const at::Tensor w_mod = weight * modulation;  // W'
  const at::Tensor g = at::mm(grad_y.t(), x);     // G
  at::Tensor y_ref = at::mm(x, w_mod.t());
  if (t.bias) y_ref = y_ref + bias;
  const at::Tensor gx_ref = at::mm(grad_y, w_mod), gw_ref = g * modulation;
  const at::Tensor gs_l_ref = at::mm(g * weight, s_r), gs_r_ref = at::mm((g * weight).t(), s_l);

  const std::string label = "m=" + std::to_string(t.m) + " k=" + std::to_string(t.k) + " n=" + std::to_string(t.n) +
                            " r=" + std::to_string(t.r) + (t.residual ? " residual" : "") + (t.bias ? " bias" : "") +
                            " W " + name(t.w_layout) + " x " + name(t.x_layout) + " " + c10::toString(dtype);
  auto in = [&](const at::Tensor& v) { return v.to(dtype); };
  const at::Tensor x_in = with_layout(in(x), t.x_layout), w_in = with_layout(in(weight), t.w_layout);
  const at::Tensor gy_in = with_layout(in(grad_y), t.x_layout);
  const std::optional<at::Tensor> bias_in = t.bias ? std::optional<at::Tensor>(in(bias)) : std::nullopt;

  const at::Tensor y = subspace_ops::rescaled_linear_forward(x_in, w_in, in(s_l), in(s_r), bias_in, t.residual);
  expect_close(label + " y", y, y_ref, x_in, tol);
  const auto [gx, gw, gs_l, gs_r] = subspace_ops::rescaled_linear_backward(gy_in, x_in, w_in, in(s_l), in(s_r),
                                                                           t.residual, true, true, true);
  expect_close(label + " gx", gx, gx_ref, x_in, tol);
  expect_close(label + " gw", gw, gw_ref, x_in, tol);
  expect_close(label + " gs_l", gs_l, gs_l_ref, x_in, tol);
  expect_close(label + " gs_r", gs_r, gs_r_ref, x_in, tol);

  // Each gradient alone: the others come back undefined, and the requested one is unchanged.
  const auto [gx1, gw1, gs_l1, gs_r1] = subspace_ops::rescaled_linear_backward(gy_in, x_in, w_in, in(s_l), in(s_r),
                                                                               t.residual, true, false, false);
  expect(gx1.defined() && !gw1.defined() && !gs_l1.defined() && !gs_r1.defined(), label + " need_x only");
  expect_close(label + " gx alone", gx1, gx_ref, x_in, tol);
  const auto [gx2, gw2, gs_l2, gs_r2] = subspace_ops::rescaled_linear_backward(gy_in, x_in, w_in, in(s_l), in(s_r),
                                                                               t.residual, false, false, true);
  expect(!gx2.defined() && !gw2.defined() && gs_l2.defined() && gs_r2.defined(), label + " need_scales only");
  expect_close(label + " gs_r alone", gs_r2, gs_r_ref, x_in, tol);
  const auto [gx3, gw3, gs_l3, gs_r3] = subspace_ops::rescaled_linear_backward(gy_in, x_in, w_in, in(s_l), in(s_r),
                                                                               t.residual, false, false, false);
  expect(!gx3.defined() && !gw3.defined() && !gs_l3.defined() && !gs_r3.defined(), label + " nothing requested");
}

// `call` must throw a c10::Error whose message contains `needle`.
template <typename F>
void expect_error(const std::string& what, const std::string& needle, F call) {
  try {
    call();
    expect(false, what + ": no error");
  } catch (const c10::Error& e) {
    expect(std::string(e.what_without_backtrace()).find(needle) != std::string::npos,
           what + ": message does not name " + needle + ": " + e.what_without_backtrace());
  }
}

void check_argument_errors() {
  const at::Tensor x = at::randn({4, 6}), w = at::randn({5, 6}), s_l = at::randn({5, 1}), s_r = at::randn({6, 1});
  const at::Tensor gy = at::randn({4, 5});
  using subspace_ops::rescaled_linear_backward;
  using subspace_ops::rescaled_linear_forward;
  expect_error("K mismatch", "weight", [&] { rescaled_linear_forward(at::randn({4, 7}), w, s_l, s_r, {}, true); });
  expect_error("s_l shape", "s_l", [&] { rescaled_linear_forward(x, w, at::randn({4, 1}), s_r, {}, true); });
  expect_error("s_r shape", "s_r", [&] { rescaled_linear_forward(x, w, s_l, at::randn({5, 1}), {}, true); });
  expect_error("rank mismatch", "rank", [&] { rescaled_linear_forward(x, w, s_l, at::randn({6, 2}), {}, true); });
  expect_error("bias shape", "bias", [&] { rescaled_linear_forward(x, w, s_l, s_r, at::randn({4}), true); });
  expect_error("weight dtype", "weight", [&] { rescaled_linear_forward(x, w.to(at::kDouble), s_l, s_r, {}, true); });
  expect_error("bias dtype", "bias", [&] { rescaled_linear_forward(x, w, s_l, s_r, at::randn({5}, at::kDouble), true); });
  expect_error("integer x", "x2d", [&] { rescaled_linear_forward(x.to(at::kInt), w.to(at::kInt), s_l.to(at::kInt), s_r.to(at::kInt), {}, true); });
  expect_error("x not 2-D", "x2d", [&] { rescaled_linear_forward(at::randn({6}), w, s_l, s_r, {}, true); });
  expect_error("grad_y shape", "grad_y", [&] { rescaled_linear_backward(at::randn({4, 4}), x, w, s_l, s_r, true, true, false, true); });
  expect_error("grad_y dtype", "grad_y", [&] { rescaled_linear_backward(gy.to(at::kDouble), x, w, s_l, s_r, true, true, false, true); });
}

}  // namespace

int main() {
  at::manual_seed(0);
  // Shapes (with the 1.5 MiB budget of rescaled_linear.h): k = n = 1100 and 600 x 520 give several
  // blocks that divide neither K nor N; n = 3000 (forward) and k = 3000 (gx) give blocks too thin to
  // accumulate, so the write-once paths run in every dtype; small shapes are one block; M = 0 is empty.
  const int64_t shapes[][3] = {{1, 1100, 1030}, {7, 33, 40}, {197, 600, 520}, {7, 300, 3000}, {1, 3000, 300},
                               {197, 40, 33}, {0, 17, 9}};
  const Layout layouts[] = {Layout::kContiguous, Layout::kTransposed, Layout::kColumnSlice, Layout::kStrided};
  int cases = 0;
  for (const auto& s : shapes) {
    for (const int64_t r : {1, 4}) {
      for (const bool residual : {true, false}) {
        const bool bias = residual == (r == 1);
        const Layout w_layout = layouts[(cases / 2) % 4];
        const Layout x_layout = (cases / 2) % 3 == 1 ? Layout::kTransposed : Layout::kContiguous;
        const Case t{s[0], s[1], s[2], r, residual, bias, w_layout, x_layout};
        run_case(t, at::kDouble, 1e-10);
        run_case({t.m, t.k, t.n, t.r, t.residual, !t.bias, t.w_layout, t.x_layout}, at::kFloat, 1e-4);
        cases += 2;
      }
    }
  }
  // A large batch (M >= 4·N): W' [520, 600] in float64 (2.5 MB) is over kMaxBlockBytes but a quarter of
  // x's size at most, so block_budget lets it be one block; a batch one token smaller keeps two.
  using subspace_ops::block_budget, subspace_ops::block_rows;
  expect(block_rows(520, 600, 8, block_budget(2080, 520, 600, 8)) == 520, "block_budget: one block at M = 4·N");
  expect(block_rows(520, 600, 8, block_budget(2079, 520, 600, 8)) == 260, "block_budget: two blocks at M < 4·N");
  for (const Layout w_layout : {Layout::kContiguous, Layout::kTransposed}) {
    run_case({2080, 600, 520, 1, true, true, w_layout, Layout::kContiguous}, at::kDouble, 1e-10);
    run_case({2080, 600, 520, 4, false, false, w_layout, Layout::kContiguous}, at::kFloat, 1e-4);
    cases += 2;
  }
  // Reduced precision (accumulated in float32): one multi-block shape per dtype and weight layout.
  for (const Layout w_layout : {Layout::kContiguous, Layout::kTransposed}) {
    run_case({197, 1100, 1030, 1, true, true, w_layout, Layout::kContiguous}, at::kBFloat16, 3e-2);
    run_case({7, 600, 520, 4, false, false, w_layout, Layout::kContiguous}, at::kHalf, 5e-3);
    cases += 2;
  }
  check_argument_errors();
  std::printf("%d cases, %d checks, %d failures\n", cases, checks, failures);
  return failures == 0 ? 0 : 1;
}
