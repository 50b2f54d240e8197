// Small helpers shared by the orcal CUDA kernels, and the switch to the host emulation of the tests
// (ORCAL_CUDA_EMULATION, csrc/cuda/emulation.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/all.h>
#include <ATen/ops/eq.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#ifdef ORCAL_CUDA_EMULATION
#include "emulation.h"
// The emulated kernels register under their own namespace, for the CPU: orcal.cpp declares the schemas there.
#define ORCAL_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(orcal_emu, CPU, m)
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
// kernel<<<grid, block, shared, stream>>>, written so that a C++ compiler can read it too.
#define ORCAL_LAUNCH(grid, block, shared, stream, ...) __VA_ARGS__<<<grid, block, shared, stream>>>
#define ORCAL_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#define ORCAL_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(orcal, CUDA, m)
#endif

#include <cstdint>
#include <cstdlib>
#include <cstring>

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

constexpr unsigned kWarpSize = 32;

// Sum of one 32-bit count per lane over a warp, in lane 0 (a fixed shuffle tree). Every lane of the warp must
// call it. Shuffles rather than __reduce_add_sync (sm_80 and newer): one code path for every architecture, and it
// runs once per thread per kernel, outside the voxel loops.
__device__ inline unsigned warp_sum(unsigned x) {
  for (unsigned d = kWarpSize / 2; d > 0; d >>= 1) x += __shfl_down_sync(0xffffffffu, x, d);
  return x;
}

// Block totals of N 32-bit counts per thread: thread c < N returns the block's total of x[c] (0 elsewhere), so
// that a block adds its counts to global memory with N atomics instead of N per thread. Warps sum by shuffles,
// then thread c adds the warps' sums in a fixed order. Every thread of the block must call it (blockDim.x a
// multiple of 32); `shared` (N * blockDim.x / 32 unsigned) must be free, as after a barrier, and stays in use
// by threads < N after the return. Contains a barrier. The caller bounds a block's counts below 2^32.
template <int N>
__device__ inline unsigned block_counts(const unsigned (&x)[N], unsigned* shared) {
  const unsigned warps = blockDim.x / kWarpSize, warp = threadIdx.x / kWarpSize;
  for (int c = 0; c < N; ++c) {
    const unsigned total = warp_sum(x[c]);
    if (threadIdx.x % kWarpSize == 0) shared[c * warps + warp] = total;
  }
  __syncthreads();
  unsigned total = 0;
  if (threadIdx.x < static_cast<unsigned>(N))
    for (unsigned w = 0; w < warps; ++w) total += shared[threadIdx.x * warps + w];
  return total;
}

// A grid size that depends on the problem size only (never on the device), so that the assignment of
// voxels to blocks, hence every floating-point sum, is the same on any GPU.
inline int64_t grid_for(int64_t work, int64_t per_thread = 4, int64_t cap = 4096) {
  int64_t g = (work + kThreads * per_thread - 1) / (kThreads * per_thread);
  if (g < 1) g = 1;
  return g < cap ? g : cap;
}

// A launcher's constant, which the emulated tests may lower through the environment variable `env` (so that a
// few hundred voxels span several blocks); always the constant in the CUDA build.
inline int64_t test_override(int64_t value, const char* env) {
#ifdef ORCAL_CUDA_EMULATION
  const char* v = std::getenv(env);
  if (v != nullptr && std::atoll(v) > 0) return std::atoll(v);
#else
  static_cast<void>(env);
#endif
  return value;
}

// hist_a[key] += a and hist_b[key] += b for every lane of a warp, with one atomic pair per distinct key: the
// lanes that share a key (a whole warp on a confident image, whose voxels all fall into one bin) are summed in
// registers first (sm_80 and newer; plain per-lane atomics before). A warp's sum is at most 32 x 255.
// Always inlined: lanes of a warp meet in its intrinsics at one call site per histogram. Out of line, lanes that
// update two histograms through it (the ECE and the AUC bins, one after the other, while some lanes run ahead)
// could meet in the same instructions and be summed into one lane's histogram.
template <typename Counter>
__device__ __forceinline__ void warp_aggregated_add(Counter* hist_a, Counter* hist_b, unsigned key, unsigned a,
                                           unsigned b) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(ORCAL_CUDA_EMULATION)
  const unsigned peers = __match_any_sync(__activemask(), key);
  const unsigned total_a = __reduce_add_sync(peers, a);
  const unsigned total_b = __reduce_add_sync(peers, b);
  if (static_cast<int>(threadIdx.x & 31u) == __ffs(peers) - 1) {
    atomicAdd(hist_a + key, static_cast<Counter>(total_a));
    atomicAdd(hist_b + key, static_cast<Counter>(total_b));
  }
#else
  atomicAdd(hist_a + key, static_cast<Counter>(a));
  atomicAdd(hist_b + key, static_cast<Counter>(b));
#endif
}

// Whether an op must not wait for the host to read its error flags: while the current stream is captured
// into a CUDA graph (a synchronisation is illegal there: torch.compile(mode="reduce-overhead"),
// torch.cuda.graph), or always with ORCAL_ASYNC_CHECKS=1. The same conditions are then checked by a device-side
// assertion (at::_assert_async), which fails the stream instead of raising a Python error with the details.
inline bool async_checks() {
  static const bool forced = [] {
    const char* v = std::getenv("ORCAL_ASYNC_CHECKS");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return forced || c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// Device-side form of "every entry of `flags` is 0" (no synchronisation).
inline void assert_flags_clear(const at::Tensor& flags, const char* what) {
  at::_assert_async(at::all(at::eq(flags, 0)), what);
}

}  // namespace cuda
}  // namespace orcal
