// C++ test of the rescaled-linear CPU kernels against the naive ATen formula (METHODS.md §1):
// forward and every backward output, float64 (tight) and float32, odd shapes, rank 1 and 4,
// residual on/off, bias on/off, non-contiguous weight. Exits non-zero on the first failure.
#include <ATen/ATen.h>

#include <cstdio>
#include <optional>
#include <string>

#include "rescaled_linear.h"

namespace {

int failures = 0;

void expect_close(const std::string& what, const at::Tensor& actual, const at::Tensor& expected, double tol) {
  const double error = (actual.to(at::kDouble) - expected.to(at::kDouble)).abs().max().item<double>();
  const double scale = std::max(1.0, expected.abs().max().item<double>());
  if (!(error <= tol * scale)) {
    std::printf("FAIL %s: max abs error %.3e > %.3e\n", what.c_str(), error, tol * scale);
    ++failures;
  }
}

void run_case(int64_t m, int64_t k, int64_t n, int64_t r, bool residual, bool with_bias, bool transposed_weight,
              at::ScalarType dtype, double tol) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor x = at::randn({m, k}, opts);
  at::Tensor weight = transposed_weight ? at::randn({k, n}, opts).t() : at::randn({n, k}, opts);
  at::Tensor s_l = at::randn({n, r}, opts), s_r = at::randn({k, r}, opts), grad_y = at::randn({m, n}, opts);
  at::Tensor bias = at::randn({n}, opts);
  const double c = residual ? 1.0 : 0.0;

  // Ground truth in float64: W' = W ⊙ (c + S_l S_rᵀ) materialized, and G = gyᵀ x.
  const at::Tensor modulation = at::mm(s_l, s_r.t()) + c;
  const at::Tensor w_mod = weight * modulation;
  at::Tensor y_ref = at::mm(x, w_mod.t());
  if (with_bias) y_ref = y_ref + bias;
  const at::Tensor g = at::mm(grad_y.t(), x);
  const at::Tensor gx_ref = at::mm(grad_y, w_mod);
  const at::Tensor gs_l_ref = at::mm(g * weight, s_r);
  const at::Tensor gs_r_ref = at::mm((g * weight).t(), s_l);
  const at::Tensor gw_ref = g * modulation;

  auto cast = [&](const at::Tensor& t) { return t.to(dtype); };
  const std::optional<at::Tensor> b = with_bias ? std::optional<at::Tensor>(cast(bias)) : std::nullopt;
  at::Tensor w_in = transposed_weight ? cast(weight.t().contiguous()).t() : cast(weight);
  const std::string name = "m" + std::to_string(m) + " k" + std::to_string(k) + " n" + std::to_string(n) + " r" +
                           std::to_string(r) + (residual ? " residual" : "") + (with_bias ? " bias" : "") +
                           (transposed_weight ? " W^T-view" : "") + " " + std::string(c10::toString(dtype));

  const at::Tensor y = subspace_ops::rescaled_linear_forward(cast(x), w_in, cast(s_l), cast(s_r), b, residual);
  expect_close(name + " y", y, y_ref, tol);
  auto [gx, gw, gs_l, gs_r] = subspace_ops::rescaled_linear_backward(cast(grad_y), cast(x), w_in, cast(s_l),
                                                                     cast(s_r), residual, true, true, true);
  expect_close(name + " gx", gx, gx_ref, tol);
  expect_close(name + " gw", gw, gw_ref, tol);
  expect_close(name + " gs_l", gs_l, gs_l_ref, tol);
  expect_close(name + " gs_r", gs_r, gs_r_ref, tol);

  // Gradients that were not asked for come back undefined.
  auto [gx2, gw2, gs_l2, gs_r2] = subspace_ops::rescaled_linear_backward(cast(grad_y), cast(x), w_in, cast(s_l),
                                                                         cast(s_r), residual, false, false, true);
  if (gx2.defined() || gw2.defined() || !gs_l2.defined()) {
    std::printf("FAIL %s: need_* flags not honoured\n", name.c_str());
    ++failures;
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  const int64_t shapes[][3] = {{1, 33, 40}, {7, 40, 33}, {197, 24, 40}, {5, 300, 290}, {3, 17, 513}};
  int cases = 0;
  for (const auto& s : shapes) {
    for (int64_t r : {1, 4}) {
      for (bool residual : {true, false}) {
        const bool bias = (r == 1) == residual;
        const bool transposed = s[0] == 7 || s[0] == 5;
        run_case(s[0], s[1], s[2], r, residual, bias, transposed, at::kDouble, 1e-10);
        run_case(s[0], s[1], s[2], r, residual, !bias, transposed, at::kFloat, 1e-4);
        cases += 2;
      }
    }
  }
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
