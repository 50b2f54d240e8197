// The CPU block kernels compiled for AVX2 + FMA (256-bit vectors, libmvec's AVX2 exp/log), used when the
// CPU has them. Every header with code of its own is included before the target switch, so nothing but
// this file's kernels is compiled for AVX2.
#include "kernels.h"

#ifdef ORCAL_CPU_AVX2
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../common/stats_layout.h"
#include "vector_math.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define ORCAL_ISA avx2
#include "kernels_impl.h"
#undef ORCAL_ISA
#pragma GCC pop_options

namespace orcal {
namespace cpu {
const KernelSet kAvx2Kernels{&avx2::loss_entry, &avx2::stats_entry, &avx2::readout_entry, "avx2"};
}  // namespace cpu
}  // namespace orcal
#endif
