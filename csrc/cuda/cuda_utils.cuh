// Small helpers shared by the orcal CUDA kernels.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace orcal {
namespace cuda {

constexpr int kThreads = 256;

// Deterministic block sum (fixed tree over thread ids) of one double per thread; valid in thread 0.
__device__ inline double block_sum(double x, double* shared) {
  shared[threadIdx.x] = x;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();
  return total;
}

// A grid size that depends on the problem size only (never on the device), so that the assignment of
// voxels to blocks, hence every floating-point sum, is the same on any GPU.
inline int64_t grid_for(int64_t work, int64_t per_thread = 4, int64_t cap = 4096) {
  int64_t g = (work + kThreads * per_thread - 1) / (kThreads * per_thread);
  if (g < 1) g = 1;
  return g < cap ? g : cap;
}

}  // namespace cuda
}  // namespace orcal
