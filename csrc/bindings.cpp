// Python bindings of the C++ CPU kernels: the module subspace_ops._C.
#include <torch/extension.h>

#include <algorithm>
#include <iterator>
#include <sstream>
#include <utility>

#include "cpu_simd.h"
#include "few_rows_matmul.h"
#include "head_mixing_attention.h"
#include "lowrank_linear.h"
#include "rescaled_linear.h"
#include "rescaled_linear_autograd.h"
#include "rescaled_linear_gemm.h"
#include "svd_delta_linear.h"

namespace {

namespace simd = subspace_ops::simd;

// The names cpu_isa() takes and returns, one per simd::Isa.
constexpr std::pair<const char*, simd::Isa> kIsaNames[] = {
    {"avx512", simd::Isa::kAvx512}, {"avx2", simd::Isa::kAvx2}, {"none", simd::Isa::kNone}};

const char* isa_name(simd::Isa isa) {
  for (const auto& [name, value] : kIsaNames) {
    if (value == isa) return name;
  }
  return "none";
}

std::string build_info() {
  std::ostringstream out;
  out << "subspace_ops._C built with "
#if defined(__clang__)
      << "clang " << __clang_version__
#elif defined(__GNUC__)
      << "gcc " << __GNUC__ << "." << __GNUC_MINOR__
#else
      << "an unknown compiler"
#endif
#ifdef _OPENMP
      << ", OpenMP " << _OPENMP
#else
      << ", no OpenMP (at::parallel_for runs serially)"
#endif
      << ", torch " << TORCH_VERSION << "; block budget " << (subspace_ops::kMaxBlockBytes >> 10) << " KiB"
      << "; float32 kernel loops: " << isa_name(simd::isa())
      << "; rescaled_linear float32 own-GEMM rows: " << subspace_ops::rescaled_gemm::max_rows()
      << " (0: ATen's only)\n"
      << at::get_parallel_info();
  return out.str();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "subspace_ops C++ CPU kernels";
  m.def("rescaled_linear_forward", &subspace_ops::rescaled_linear_forward, py::arg("x2d"), py::arg("weight"),
        py::arg("s_l"), py::arg("s_r"), py::arg("bias"), py::arg("residual"));
  m.def("rescaled_linear_backward", &subspace_ops::rescaled_linear_backward, py::arg("grad_y"), py::arg("x2d"),
        py::arg("weight"), py::arg("s_l"), py::arg("s_r"), py::arg("residual"), py::arg("need_x"),
        py::arg("need_weight"), py::arg("need_scales"));
  m.def("rescaled_linear_autograd", &subspace_ops::rescaled_linear_autograd, py::arg("x"), py::arg("weight"),
        py::arg("s_l"), py::arg("s_r"), py::arg("bias"), py::arg("residual"),
        "rescaled_linear's modulated path with its autograd node in C++ (the cpu backend's eager path).");
  m.def("svd_basis_weight", &subspace_ops::svd_basis_weight, py::arg("weight"), py::arg("u"), py::arg("v"),
        py::arg("d"));
  m.def("svd_delta_linear_forward", &subspace_ops::svd_delta_linear_forward, py::arg("x2d"), py::arg("weight"),
        py::arg("u"), py::arg("v"), py::arg("d"), py::arg("bias"));
  m.def("svd_delta_linear_backward", &subspace_ops::svd_delta_linear_backward, py::arg("grad_y"), py::arg("x2d"),
        py::arg("weight"), py::arg("u"), py::arg("v"), py::arg("d"), py::arg("need_x"), py::arg("need_d"));
  m.def("head_mixing_attention_forward", &subspace_ops::head_mixing_attention_forward, py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("mix"), py::arg("mask"), py::arg("is_causal"), py::arg("scale"),
        py::arg("dropout_p") = 0.0, py::arg("seed") = py::none());
  m.def("head_mixing_attention_backward", &subspace_ops::head_mixing_attention_backward, py::arg("grad_out"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mix"), py::arg("mask"), py::arg("lse"),
        py::arg("is_causal"), py::arg("scale"), py::arg("dropout_p") = 0.0, py::arg("seed") = py::none());
  m.def("lowrank_linear_forward", &subspace_ops::lowrank_linear_forward, py::arg("x2d"), py::arg("x_dropped2d"),
        py::arg("weight"), py::arg("a"), py::arg("g"), py::arg("b"), py::arg("bias"), py::arg("scaling"));
  m.def("lowrank_linear_backward", &subspace_ops::lowrank_linear_backward, py::arg("grad_y"), py::arg("x2d"),
        py::arg("x_dropped2d"), py::arg("weight"), py::arg("a"), py::arg("g"), py::arg("b"), py::arg("h0"),
        py::arg("scaling"), py::arg("need_x"), py::arg("need_x_dropped"), py::arg("need_weight"), py::arg("need_a"),
        py::arg("need_b"), py::arg("need_g"));
  m.def("few_rows_matmul", &subspace_ops::few_rows::matmul, py::arg("a"), py::arg("weight"),
        py::arg("transpose_weight"),
        "a · weightᵀ (transpose_weight) or a · weight for float32 a of at most 16 rows, reading the weight once "
        "(csrc/few_rows_matmul.h).");
  m.def("few_rows_prefers", &subspace_ops::few_rows::prefers, py::arg("rows"), py::arg("transpose_weight"),
        "Whether a float32 product of this many rows with a weight runs faster on few_rows_matmul than on "
        "ATen's GEMM on this CPU (csrc/few_rows_matmul.h).");
  m.def("rescaled_linear_gemm_rows", &subspace_ops::rescaled_gemm::max_rows,
        "The most rows (tokens) float32 rescaled_linear runs on its own GEMMs (AVX-512 or AVX2 + FMA) here; "
        "0 where neither runs (ATen's GEMMs then).");
  m.def(
      "cpu_isa",
      [](std::optional<std::string> choice) {
        if (choice == "auto") {
          simd::set_isa(std::nullopt);
        } else if (choice) {
          const auto named = std::find_if(std::begin(kIsaNames), std::end(kIsaNames),
                                          [&](const auto& entry) { return *choice == entry.first; });
          TORCH_CHECK(named != std::end(kIsaNames), "isa must be 'avx512', 'avx2', 'none' or 'auto', got '", *choice,
                      "'");
          simd::set_isa(named->second);
        }
        return std::string(isa_name(simd::isa()));
      },
      py::arg("choice") = py::none(),
      "The vector instruction set of the float32 CPU kernels' own loops (head mixing's GEMMs and exp, "
      "rescaled_linear's GEMMs): 'avx512', 'avx2' or 'none' (ATen's GEMMs, portable loops). With choice, caps it "
      "first ('auto': this CPU's widest; never wider than the CPU runs). For tests and benchmarks; not "
      "thread-safe against running kernels.");
  m.def("build_info", &build_info);
}
