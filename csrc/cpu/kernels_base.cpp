// The CPU block kernels for the baseline instruction set of the build, and the run-time choice between
// them and the AVX2/FMA build of the same code (kernels_avx2.cpp).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "vector_math.h"

#define ORCAL_ISA base
#include "kernels_impl.h"
#undef ORCAL_ISA

#include <cstdlib>
#include <cstring>

namespace orcal {
namespace cpu {

const KernelSet kBaseKernels{&base::loss_entry, &base::stats_entry, &base::readout_entry, "baseline"};

namespace {
const KernelSet& choose() {
  // ORCAL_CPU_ISA=baseline forces the portable kernels (to compare, or to rule out a vector-math issue).
  const char* forced = std::getenv("ORCAL_CPU_ISA");
  const bool want_base = forced != nullptr && std::strcmp(forced, "baseline") == 0;
#ifdef ORCAL_CPU_AVX2
  if (!want_base && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2Kernels;
#endif
  (void)want_base;
  return kBaseKernels;
}
}  // namespace

const KernelSet& kernels() {
  static const KernelSet& chosen = choose();
  return chosen;
}

}  // namespace cpu
}  // namespace orcal
