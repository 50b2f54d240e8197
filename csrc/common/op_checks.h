// Shared argument checks of the CPU and CUDA op entry points (the Python layer checks first; these keep the
// ops safe when called directly through torch.ops.orcal).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

#include "dtype.h"

namespace orcal {

inline Dtype float_dtype(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return Dtype::f32;
    case at::kHalf: return Dtype::f16;
    case at::kBFloat16: return Dtype::bf16;
    case at::kDouble: return Dtype::f64;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  }
  return Dtype::f32;
}

// Logits (B, R+1, *S): returns R.
inline int64_t check_ordinal_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK_VALUE(logits.dim() >= 3, name, " must be (B, R+1, *S), got shape ", logits.sizes());
  float_dtype(logits, name);
  const int64_t R = logits.size(1) - 1;
  TORCH_CHECK_VALUE(R >= 1 && R <= 255, name, " must have R + 1 channels with R in 1..255, got ", logits.size(1));
  return R;
}

// The shape (B, *S) of a (B, C, *S) tensor.
inline std::vector<int64_t> drop_channels(const at::Tensor& x) {
  std::vector<int64_t> shape{x.size(0)};
  for (int64_t d = 2; d < x.dim(); ++d) shape.push_back(x.size(d));
  return shape;
}

// Rater masks (B, R, *S), bool or uint8, 1..255 raters; their values are checked by the kernels in their pass.
inline void check_masks(const at::Tensor& masks) {
  TORCH_CHECK_VALUE(masks.dim() >= 3, "masks must be (B, R, *S), got ", masks.sizes());
  TORCH_CHECK_TYPE(masks.scalar_type() == at::kByte || masks.scalar_type() == at::kBool,
                   "masks must be bool or uint8, got ", masks.scalar_type());
  TORCH_CHECK_VALUE(masks.size(1) >= 1 && masks.size(1) <= 255, "masks must have 1..255 raters along dim 1, got ",
                    masks.size(1));
}

inline void check_votes(const at::Tensor& k, at::IntArrayRef spatial, const char* name) {
  TORCH_CHECK_TYPE(k.scalar_type() == at::kByte, name, " (vote counts) must be uint8, got ", k.scalar_type());
  TORCH_CHECK_VALUE(k.sizes() == spatial, name, " must have shape ", spatial, ", got ", k.sizes());
}

inline void check_valid(const std::optional<at::Tensor>& valid, at::IntArrayRef spatial,
                        const at::Tensor& like) {
  if (!valid.has_value()) return;
  TORCH_CHECK_TYPE(valid->scalar_type() == at::kBool, "valid must be a bool tensor, got ", valid->scalar_type());
  TORCH_CHECK_VALUE(valid->sizes() == spatial, "valid must have shape ", spatial, ", got ", valid->sizes());
  TORCH_CHECK_VALUE(valid->device() == like.device(), "valid must be on ", like.device(), ", got ",
                    valid->device());
}

// Arguments of ordinal_loss, for the CPU and CUDA entry points alike; returns R.
inline int64_t check_loss_args(const at::Tensor& logits, const at::Tensor& k, const std::optional<at::Tensor>& valid,
                               int64_t majority) {
  const int64_t R = check_ordinal_logits(logits, "logits");
  const std::vector<int64_t> spatial = drop_channels(logits);
  check_votes(k, spatial, "k");
  check_valid(valid, spatial, logits);
  TORCH_CHECK_VALUE(k.device() == logits.device(), "k must be on ", logits.device());
  TORCH_CHECK_VALUE(majority >= 1 && majority <= R, "majority must lie in 1..R = 1..", R, ", got ", majority);
  return R;
}

// Arguments of calibration_stats (kind: 0 prob, 1 logit, 2 ordinal); returns the images' shape (B, *S).
inline std::vector<int64_t> check_stats_args(const at::Tensor& pred, const at::Tensor& target,
                                             const std::optional<at::Tensor>& valid, int64_t R,
                                             bool target_is_masks, int kind, int64_t majority, int64_t n_bins,
                                             int64_t auc_bins) {
  TORCH_CHECK_VALUE(R >= 1 && R <= 255, "num_raters must lie in 1..255, got ", R);
  TORCH_CHECK_VALUE(majority >= 1 && majority <= R, "majority must lie in 1..R = 1..", R, ", got ", majority);
  // The bounds of orcal.ops.MAX_ECE_BINS and MAX_AUC_BINS (SPEC §8).
  TORCH_CHECK_VALUE(n_bins >= 1 && n_bins <= 1024, "n_bins must lie in 1..1024, got ", n_bins);
  TORCH_CHECK_VALUE(auc_bins >= 2 && auc_bins <= (1 << 20), "auc_bins must lie in 2..1048576, got ", auc_bins);
  std::vector<int64_t> spatial;
  if (kind == 2) {
    TORCH_CHECK_VALUE(check_ordinal_logits(pred, "pred") == R, "ordinal pred has ", pred.size(1),
                      " channels but the target has R = ", R, " raters");
    spatial = drop_channels(pred);
  } else {
    spatial = pred.sizes().vec();
  }
  if (target_is_masks) {
    TORCH_CHECK_TYPE(target.scalar_type() == at::kByte || target.scalar_type() == at::kBool,
                     "target masks must be bool or uint8, got ", target.scalar_type());
    TORCH_CHECK_VALUE(target.dim() >= 2 && target.size(1) == R && drop_channels(target) == spatial,
                      "target masks must be (B, R, *S) = (", spatial[0], ", ", R, ", *S) with S of pred, got ",
                      target.sizes());
  } else {
    check_votes(target, spatial, "target");
  }
  check_valid(valid, spatial, pred);
  TORCH_CHECK_VALUE(target.device() == pred.device(), "target must be on ", pred.device());
  return spatial;
}

inline int readout_code(c10::string_view readout) {
  if (readout == "majority") return 0;
  TORCH_CHECK_VALUE(readout == "expected", "readout must be 'majority' or 'expected', got '", readout, "'");
  return 1;
}

inline int kind_code(c10::string_view kind) {
  if (kind == "prob") return 0;
  if (kind == "logit") return 1;
  TORCH_CHECK_VALUE(kind == "ordinal", "kind must be 'prob', 'logit' or 'ordinal', got '", kind, "'");
  return 2;
}

}  // namespace orcal
