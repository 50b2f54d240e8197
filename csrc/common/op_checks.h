// Shared argument checks of the CPU and CUDA op entry points (the Python layer checks first; these keep the
// ops safe when called directly through torch.ops.orcal).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

#include "../cpu/kernels.h"

namespace orcal {

inline cpu::Dtype float_dtype(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return cpu::Dtype::f32;
    case at::kHalf: return cpu::Dtype::f16;
    case at::kBFloat16: return cpu::Dtype::bf16;
    case at::kDouble: return cpu::Dtype::f64;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  }
  return cpu::Dtype::f32;
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
