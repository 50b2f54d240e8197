// ordinal_loss on CUDA (SPEC §3): one thread per voxel runs voxel_loss() of csrc/common/ordinal_math.h,
// writing the gradient once. Each block writes its loss sum to a buffer, summed afterwards by at::sum:
// deterministic (no floating-point atomics), and the grid depends on the problem size only.
#include <ATen/core/Tensor.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

#include "../common/op_checks.h"
#include "../common/ordinal_math.h"
#include "cuda_utils.cuh"

namespace orcal {
namespace {

template <typename scalar_t, typename T>
__global__ void __launch_bounds__(cuda::kThreads)
    ordinal_loss_kernel(const scalar_t* __restrict__ logits, const uint8_t* __restrict__ k,
                        const bool* __restrict__ valid, scalar_t* __restrict__ grad, T* __restrict__ loss_map,
                        double* __restrict__ partials, int* __restrict__ k_too_large,
                        const int64_t* __restrict__ count, int64_t total, int64_t V, int R, int m, T rps_weight,
                        int reduction) {
  __shared__ double shared[cuda::kThreads];
  const int C = R + 1;
  const T scale = reduction == 1 ? T(1) / static_cast<T>(*count > 0 ? *count : 1) : T(1);
  double acc = 0;
  bool bad = false;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / V, v = i - b * V;
    const scalar_t* z = logits + b * C * V + v;
    scalar_t* g = grad == nullptr ? nullptr : grad + b * C * V + v;
    const int kk = k[i];
    const bool ok = (valid == nullptr || valid[i]) && kk <= R;
    bad |= kk > R;
    T loss = T(0);
    if (ok) {
      auto load = [&](int c) { return static_cast<T>(z[c * V]); };
      auto store = [&](int c, T value) { g[c * V] = static_cast<scalar_t>(value); };
      loss = voxel_loss<T>(load, R, m, kk, rps_weight, scale, g != nullptr, store);
    } else if (g != nullptr) {
      for (int c = 0; c < C; ++c) g[c * V] = static_cast<scalar_t>(0);
    }
    if (loss_map != nullptr) loss_map[i] = loss;
    acc += static_cast<double>(loss);
  }
  if (bad) atomicExch(k_too_large, 1);
  const double block_total = cuda::block_sum(acc, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = block_total;
}

std::tuple<at::Tensor, at::Tensor> ordinal_loss_cuda(const at::Tensor& logits_in, const at::Tensor& k_in,
                                                     const std::optional<at::Tensor>& valid_in, double rps_weight,
                                                     int64_t majority, int64_t reduction, bool need_grad) {
  const int64_t R = check_loss_args(logits_in, k_in, valid_in, majority);
  const Dtype dtype = float_dtype(logits_in, "logits");
  const std::vector<int64_t> spatial = drop_channels(logits_in);
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, "reduction must be 0, 1 or 2, got ", reduction);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor k = k_in.contiguous();
  const std::optional<at::Tensor> valid =
      valid_in.has_value() ? std::optional<at::Tensor>(valid_in->contiguous()) : std::nullopt;
  const int64_t B = logits.size(0), V = B == 0 ? 0 : logits.numel() / (B * (R + 1));
  const auto loss_opts = logits.options().dtype(dtype == Dtype::f64 ? at::kDouble : at::kFloat);
  const auto long_opts = logits.options().dtype(at::kLong);
  const at::Tensor count = valid.has_value() ? at::sum(*valid).to(at::kLong) : at::full({}, B * V, long_opts);
  at::Tensor grad = need_grad ? at::empty(logits.sizes(), logits.options()) : at::empty({0}, logits.options());
  at::Tensor loss_map = reduction == 0 ? at::empty(spatial, loss_opts) : at::Tensor();
  const int64_t total = B * V;
  const int64_t blocks = cuda::grid_for(total);
  at::Tensor partials = at::zeros({blocks}, logits.options().dtype(at::kDouble));
  at::Tensor flag = at::zeros({1}, logits.options().dtype(at::kInt));
  if (total > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    auto launch = [&](auto scalar_tag, auto opmath_tag) {
      using scalar_t = decltype(scalar_tag);
      using T = decltype(opmath_tag);
      ORCAL_LAUNCH(blocks, cuda::kThreads, 0, stream, ordinal_loss_kernel<scalar_t, T>)(
          static_cast<const scalar_t*>(logits.data_ptr()), k.data_ptr<uint8_t>(),
          valid.has_value() ? valid->data_ptr<bool>() : nullptr,
          need_grad ? static_cast<scalar_t*>(grad.data_ptr()) : nullptr,
          reduction == 0 ? static_cast<T*>(loss_map.data_ptr()) : nullptr, partials.data_ptr<double>(),
          flag.data_ptr<int>(), count.data_ptr<int64_t>(), total, V, static_cast<int>(R), static_cast<int>(majority),
          static_cast<T>(rps_weight), static_cast<int>(reduction));
    };
    switch (dtype) {
      case Dtype::f32: launch(float{}, float{}); break;
      case Dtype::f16: launch(c10::Half{}, float{}); break;
      case Dtype::bf16: launch(c10::BFloat16{}, float{}); break;
      case Dtype::f64: launch(double{}, double{}); break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // One synchronisation: a vote count above R must raise, as on the CPU.
    if (cuda::async_checks()) {
      cuda::assert_flags_clear(flag, "orcal::ordinal_loss: k must lie in 0..R");
    } else {
      TORCH_CHECK_VALUE(flag.item<int>() == 0, "k must lie in 0..R = 0..", R, "; found a larger vote count");
    }
  }
  if (reduction == 0) return {loss_map, grad};
  at::Tensor loss = at::sum(partials);
  if (reduction == 1) loss = at::div(loss, at::clamp_min(count, 1).to(at::kDouble));
  return {loss.to(loss_opts.dtype()), grad};
}

}  // namespace

ORCAL_CUDA_LIBRARY_IMPL(m) { m.impl("ordinal_loss", &ordinal_loss_cuda); }

}  // namespace orcal
