// orc_targets on the CPU: one read of the masks, one write of k.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>

#include "../common/votes.h"

namespace orcal {
namespace {

at::Tensor orc_targets_cpu(const at::Tensor& masks_in) {
  TORCH_CHECK_VALUE(masks_in.dim() >= 3, "masks must be (B, R, *S), got ", masks_in.sizes());
  TORCH_CHECK_TYPE(masks_in.scalar_type() == at::kByte || masks_in.scalar_type() == at::kBool,
                   "masks must be bool or uint8, got ", masks_in.scalar_type());
  const at::Tensor masks = masks_in.contiguous();
  const int64_t B = masks.size(0), R = masks.size(1);
  const int64_t V = B == 0 || R == 0 ? 0 : masks.numel() / (B * R);
  std::vector<int64_t> out_shape{B};
  for (int64_t d = 2; d < masks.dim(); ++d) out_shape.push_back(masks.size(d));
  at::Tensor k = at::empty(out_shape, masks.options().dtype(at::kByte));
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
