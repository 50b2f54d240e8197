// The CPU block kernels compiled for AVX-512 (F/DQ/VL/BW, 512-bit vectors, libmvec's AVX-512 exp/log), used
// when the CPU has them. As in kernels_avx2.cpp, every header with code of its own is included before the
// target switch, so nothing but this file's kernels is compiled for AVX-512.
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
#include <immintrin.h>  // streaming stores of the loss gradient (kernels_impl.h)

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,prefer-vector-width=512")
#define ORCAL_ISA avx512
#define ORCAL_ISA_AVX512 1
#include "kernels_impl.h"
#undef ORCAL_ISA
#undef ORCAL_ISA_AVX512
#pragma GCC pop_options

namespace orcal {
namespace cpu {
const KernelSet kAvx512Kernels{&avx512::loss_entry, &avx512::stats_entry, &avx512::readout_entry, "avx512"};
}  // namespace cpu
}  // namespace orcal
#endif
