// The CPU block kernels for the baseline instruction set of the build, and the run-time choice between
// them and the AVX2/FMA build of the same code (kernels_avx2.cpp).
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "vector_math.h"

#define ORCAL_ISA base
#include "kernels_impl.h"
#undef ORCAL_ISA

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace orcal {
namespace cpu {

const KernelSet kBaseKernels{&base::loss_entry, &base::stats_entry, &base::readout_entry, "baseline"};

namespace {
const KernelSet& choose() {
  // ORCAL_CPU_ISA=baseline|avx2 caps the instruction set (to compare, or to rule out a vector-math issue).
  const char* forced = std::getenv("ORCAL_CPU_ISA");
  const bool cap_base = forced != nullptr && std::strcmp(forced, "baseline") == 0;
  const bool cap_avx2 = forced != nullptr && std::strcmp(forced, "avx2") == 0;
#ifdef ORCAL_CPU_AVX2
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  if (!cap_base && !cap_avx2 && avx512) return kAvx512Kernels;
  if (!cap_base && avx2) return kAvx2Kernels;
#endif
  (void)cap_base;
  (void)cap_avx2;
  return kBaseKernels;
}
}  // namespace

void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (bytes < int64_t(4 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only
#else
  (void)data;
  (void)bytes;
#endif
}

void* aligned_or_throw(size_t bytes) {
  void* mem = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (mem == nullptr) {
    C10_THROW_ERROR(OutOfMemoryError, "orcal: could not allocate " + std::to_string(bytes) +
                                          " bytes of CPU scratch memory");
  }
  return mem;
}

const KernelSet& kernels() {
  static const KernelSet& chosen = choose();
  return chosen;
}

}  // namespace cpu
}  // namespace orcal
