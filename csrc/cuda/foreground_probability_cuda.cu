// foreground_probability on CUDA (SPEC §2): one thread per voxel, voxel_readout() of ordinal_math.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common/op_checks.h"
#include "../common/ordinal_math.h"
#include "cuda_utils.cuh"

namespace orcal {
namespace {

template <typename scalar_t, typename T>
__global__ void __launch_bounds__(cuda::kThreads)
    readout_kernel(const scalar_t* __restrict__ logits, scalar_t* __restrict__ out, int64_t total, int64_t V, int R,
                   int m, int readout) {
  const int C = R + 1;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / V, v = i - b * V;
    const scalar_t* z = logits + b * C * V + v;
    auto load = [&](int c) { return static_cast<T>(z[c * V]); };
    out[i] = static_cast<scalar_t>(voxel_readout<T>(load, R, m, readout));
  }
}

at::Tensor foreground_probability_cuda(const at::Tensor& logits_in, c10::string_view readout, int64_t majority) {
  const int64_t R = check_ordinal_logits(logits_in, "logits");
  const int mode = readout_code(readout);
  TORCH_CHECK_VALUE(majority >= 1 && majority <= R, "majority must lie in 1..R = 1..", R, ", got ", majority);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), V = B == 0 ? 0 : logits.numel() / (B * (R + 1));
  at::Tensor out = at::empty(drop_channels(logits), logits.options());
  const int64_t total = B * V;
  if (total == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = cuda::grid_for(total, 1, 1 << 20);
  auto launch = [&](auto scalar_tag, auto opmath_tag) {
    using scalar_t = decltype(scalar_tag);
    using T = decltype(opmath_tag);
    ORCAL_LAUNCH(blocks, cuda::kThreads, 0, stream, readout_kernel<scalar_t, T>)(
        static_cast<const scalar_t*>(logits.data_ptr()), static_cast<scalar_t*>(out.data_ptr()), total, V,
        static_cast<int>(R), static_cast<int>(majority), mode);
  };
  switch (float_dtype(logits, "logits")) {
    case Dtype::f32: launch(float{}, float{}); break;
    case Dtype::f16: launch(c10::Half{}, float{}); break;
    case Dtype::bf16: launch(c10::BFloat16{}, float{}); break;
    case Dtype::f64: launch(double{}, double{}); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

ORCAL_CUDA_LIBRARY_IMPL(m) { m.impl("foreground_probability", &foreground_probability_cuda); }

}  // namespace orcal
