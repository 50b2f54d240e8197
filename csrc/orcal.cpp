// The one place where every orcal op schema is declared. Kernels register per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu with TORCH_LIBRARY_IMPL(orcal, <Device>, m). The host emulation of the
// CUDA kernels (tests only) compiles this file with -DORCAL_OPS_NAMESPACE=orcal_emu.
#include <torch/library.h>

#ifndef ORCAL_OPS_NAMESPACE
#define ORCAL_OPS_NAMESPACE orcal
#endif
#define ORCAL_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)  // expands ORCAL_OPS_NAMESPACE first

ORCAL_TORCH_LIBRARY(ORCAL_OPS_NAMESPACE, m) {
  // (B, R, *S) bool/uint8 masks -> (B, *S) uint8 vote counts. Non-binary values raise ValueError.
  m.def("orc_targets(Tensor masks) -> Tensor");
  // (B, R+1, *S) logits -> (B, *S) foreground probability in the logits' dtype.
  // readout: "majority" | "expected"; majority: threshold m in 1..R.
  m.def("foreground_probability(Tensor logits, str readout, int majority) -> Tensor");
  // Fused SPEC §3 loss. reduction: 0 none, 1 mean, 2 sum. Returns (loss, grad): loss is float32
  // (float64 for float64 logits), grad is d(loss)/d(logits) for an upstream gradient of 1 in the logits'
  // dtype when need_grad, else an empty tensor.
  m.def("ordinal_loss(Tensor logits, Tensor k, Tensor? valid, float rps_weight, int majority, "
        "int reduction, bool need_grad) -> (Tensor, Tensor)");
  // Fused SPEC §4 statistics, one row per image: (counts int64, sums float64), column layout in
  // csrc/common/stats_layout.h. kind: "prob" | "logit" | "ordinal"; target: masks (B, R, *S) when
  // target_is_masks, else vote counts (B, *S) uint8.
  m.def("calibration_stats(Tensor pred, Tensor target, Tensor? valid, int num_raters, bool target_is_masks, "
        "str kind, str readout, int majority, int n_bins, int auc_bins) -> (Tensor, Tensor)");
}
