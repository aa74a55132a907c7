// Which vector instruction set the float32 CPU kernels' own loops run with; see cpu_simd.h.
#include "cpu_simd.h"

#include <algorithm>
#include <atomic>

namespace subspace_ops::simd {

#if SUBSPACE_OPS_X86_SIMD

namespace {

Isa widest() {
  static const Isa best = __builtin_cpu_supports("avx512f")                                    ? Isa::kAvx512
                          : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::kAvx2
                                                                                              : Isa::kNone;
  return best;
}

// 0: the widest this CPU runs; else a forced Isa + 1 (set_isa), never wider than the CPU runs.
std::atomic<int> forced_isa{0};

}  // namespace

Isa isa() {
  const int forced = forced_isa.load(std::memory_order_relaxed);
  return forced == 0 ? widest() : std::min(widest(), static_cast<Isa>(forced - 1));
}

void set_isa(std::optional<Isa> choice) { forced_isa.store(choice ? static_cast<int>(*choice) + 1 : 0); }

#else  // not x86-64 GCC/Clang: the kernels' own loops are not compiled

Isa isa() { return Isa::kNone; }
void set_isa(std::optional<Isa>) {}

#endif

}  // namespace subspace_ops::simd
