// orc_targets on CUDA: the per-voxel math of csrc/common/votes.h, one thread per voxel.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../common/op_checks.h"
#include "../common/votes.h"
#include "cuda_utils.cuh"

namespace orcal {
namespace {

__global__ void orc_targets_kernel(const uint8_t* __restrict__ masks, uint8_t* __restrict__ k, int64_t R,
                                   int64_t V, int64_t total, int* __restrict__ bad_flag) {
  bool bad = false;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / V, v = i % V;
    k[i] = count_votes(masks + b * R * V + v, R, V, &bad);
  }
  if (bad) atomicExch(bad_flag, 1);
}

at::Tensor orc_targets_cuda(const at::Tensor& masks_in) {
  check_masks(masks_in);
  const c10::cuda::CUDAGuard guard(masks_in.device());
  const at::Tensor masks = masks_in.contiguous();
  const int64_t B = masks.size(0), R = masks.size(1);
  const int64_t V = B == 0 || R == 0 ? 0 : masks.numel() / (B * R);
  at::Tensor k = at::empty(drop_channels(masks), masks.options().dtype(at::kByte));
  if (B * V == 0) return k;
  at::Tensor bad = at::zeros({1}, masks.options().dtype(at::kInt));
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((B * V + threads - 1) / threads, 65535LL * 8);
  ORCAL_LAUNCH(blocks, threads, 0, c10::cuda::getCurrentCUDAStream(), orc_targets_kernel)(
      static_cast<const uint8_t*>(masks.data_ptr()), k.data_ptr<uint8_t>(), R, V, B * V, bad.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (cuda::async_checks()) {
    cuda::assert_flags_clear(bad, "orcal::orc_targets: masks must be binary (0/1)");
    return k;
  }
  TORCH_CHECK_VALUE(bad.item<int>() == 0, "masks must be binary (0/1); found a value > 1");
  return k;
}

}  // namespace

ORCAL_CUDA_LIBRARY_IMPL(m) { m.impl("orc_targets", &orc_targets_cuda); }

}  // namespace orcal
