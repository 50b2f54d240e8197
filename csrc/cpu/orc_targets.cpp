// orc_targets on the CPU: one read of the masks, one write of k.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>

#include "../common/op_checks.h"
#include "../common/votes.h"

namespace orcal {
namespace {

at::Tensor orc_targets_cpu(const at::Tensor& masks_in) {
  check_masks(masks_in);
  const at::Tensor masks = masks_in.contiguous();
  const int64_t B = masks.size(0), R = masks.size(1);
  const int64_t V = B == 0 || R == 0 ? 0 : masks.numel() / (B * R);
  at::Tensor k = at::empty(drop_channels(masks), masks.options().dtype(at::kByte));
  const uint8_t* src = static_cast<const uint8_t*>(masks.data_ptr());
  uint8_t* dst = k.data_ptr<uint8_t>();
  std::atomic<bool> any_bad{false};
  at::parallel_for(0, B * V, 1 << 14, [&](int64_t begin, int64_t end) {
    bool bad = false;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / V, v = i % V;
      dst[i] = count_votes(src + b * R * V + v, R, V, &bad);
    }
    if (bad) any_bad = true;
  });
  TORCH_CHECK_VALUE(!any_bad.load(), "masks must be binary (0/1); found a value > 1");
  return k;
}

}  // namespace

TORCH_LIBRARY_IMPL(orcal, CPU, m) { m.impl("orc_targets", &orc_targets_cpu); }

}  // namespace orcal
