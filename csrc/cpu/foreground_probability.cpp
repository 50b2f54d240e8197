// foreground_probability on the CPU (SPEC §2): one read of the logits, one write of p in their dtype.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "kernels.h"
#include "../common/op_checks.h"

namespace orcal {
namespace {

at::Tensor foreground_probability_cpu(const at::Tensor& logits_in, c10::string_view readout, int64_t majority) {
  const int64_t R = check_ordinal_logits(logits_in, "logits");
  const int mode = readout_code(readout);
  TORCH_CHECK_VALUE(majority >= 1 && majority <= R, "majority must lie in 1..R = 1..", R, ", got ", majority);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), V = B == 0 ? 0 : logits.numel() / (B * (R + 1));
  at::Tensor out = at::empty(drop_channels(logits), logits.options());
  const int64_t per_image = (V + cpu::kBlock - 1) / cpu::kBlock;
  const cpu::ReadoutArgs args{float_dtype(logits, "logits"), logits.data_ptr(), out.data_ptr(), B, V, R, majority,
                              per_image, mode};
  const cpu::KernelSet& kern = cpu::kernels();
  at::parallel_for(0, B * per_image, 16, [&](int64_t begin, int64_t end) { kern.readout(args, begin, end); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(orcal, CPU, m) { m.impl("foreground_probability", &foreground_probability_cpu); }

}  // namespace orcal
