// ordinal_loss on the CPU (SPEC §3): one pass over the logits computes the loss and, when asked, the
// gradient (written once; backward only scales it). Work is split into fixed blocks of kBlock voxels; each
// block's loss sum is kept apart and the blocks are reduced in order, so the result does not depend on the
// number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <atomic>
#include <tuple>
#include <vector>

#include "kernels.h"
#include "../common/op_checks.h"

namespace orcal {
namespace {

std::tuple<at::Tensor, at::Tensor> ordinal_loss_cpu(const at::Tensor& logits_in, const at::Tensor& k_in,
                                                    const std::optional<at::Tensor>& valid_in, double rps_weight,
                                                    int64_t majority, int64_t reduction, bool need_grad) {
  const int64_t R = check_loss_args(logits_in, k_in, valid_in, majority);
  const cpu::Dtype dtype = float_dtype(logits_in, "logits");
  const std::vector<int64_t> spatial = drop_channels(logits_in);
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, "reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
                    reduction);

  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor k = k_in.contiguous();
  const std::optional<at::Tensor> valid =
      valid_in.has_value() ? std::optional<at::Tensor>(valid_in->contiguous()) : std::nullopt;
  const int64_t B = logits.size(0), V = B == 0 ? 0 : logits.numel() / (B * (R + 1));
  const at::ScalarType loss_type = dtype == cpu::Dtype::f64 ? at::kDouble : at::kFloat;
  const auto loss_opts = logits.options().dtype(loss_type);

  const int64_t count = valid.has_value() ? at::sum(*valid).item<int64_t>() : B * V;
  const double scale = reduction == 1 ? 1.0 / static_cast<double>(count > 0 ? count : 1) : 1.0;
  at::Tensor grad = need_grad ? at::empty(logits.sizes(), logits.options()) : at::empty({0}, logits.options());
  at::Tensor loss_map = reduction == 0 ? at::empty(spatial, loss_opts) : at::Tensor();
  if (need_grad) cpu::advise_huge_pages(grad.data_ptr(), grad.nbytes());

  const int64_t per_image = (V + cpu::kBlock - 1) / cpu::kBlock;
  const int64_t blocks = B * per_image;
  std::vector<double> partials(static_cast<size_t>(blocks));
  cpu::LossArgs args{dtype,
                     logits.data_ptr(),
                     k.data_ptr<uint8_t>(),
                     valid.has_value() ? valid->data_ptr<bool>() : nullptr,
                     need_grad ? grad.data_ptr() : nullptr,
                     reduction == 0 ? loss_map.data_ptr() : nullptr,
                     partials.data(),
                     B,
                     V,
                     R,
                     majority,
                     per_image,
                     rps_weight,
                     scale};
  const cpu::KernelSet& kern = cpu::kernels();
  std::atomic<bool> k_too_large{false};
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    if (kern.loss(args, begin, end)) k_too_large = true;
  });
  TORCH_CHECK_VALUE(!k_too_large.load(), "k must lie in 0..R = 0..", R, "; found a larger vote count");
  if (reduction == 0) return {loss_map, grad};
  double total = 0;
  for (const double x : partials) total += x;  // block order: independent of the thread count
  if (reduction == 1) total = count > 0 ? total / static_cast<double>(count) : 0.0;
  return {at::scalar_tensor(total, loss_opts), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(orcal, CPU, m) { m.impl("ordinal_loss", &ordinal_loss_cpu); }

}  // namespace orcal
