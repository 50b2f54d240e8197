// Column layout of the packed per-image statistics returned by orcal::calibration_stats (SPEC §4).
// orcal/ops/_schema.py (StatsLayout) mirrors it; tests/test_schema.py checks that the two agree.
//
//   counts (B, 2*n_bins + 3 + 2*auc_bins) int64:
//     [0, n_bins)                      n[b]   voxel-rater pairs per ECE bin
//     [n_bins, 2*n_bins)               a[b]   positive pairs per ECE bin
//     2*n_bins + 0, +1, +2             TP, FP, FN at p >= 0.5 against [k >= m]
//     [2*n_bins + 3, ... + auc_bins)   pos[t] positive pairs per score bin
//     [..., ... + auc_bins)            neg[t] negative pairs per score bin
//   sums (B, n_bins + 2) float64:
//     [0, n_bins)                      s[b]   confidence mass R * p per ECE bin
//     n_bins, n_bins + 1               Brier sum, NLL sum
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace orcal {

struct StatsLayout {
  int64_t n_bins, auc_bins;
  C10_HOST_DEVICE int64_t n() const { return 0; }
  C10_HOST_DEVICE int64_t a() const { return n_bins; }
  C10_HOST_DEVICE int64_t tp() const { return 2 * n_bins; }
  C10_HOST_DEVICE int64_t fp() const { return 2 * n_bins + 1; }
  C10_HOST_DEVICE int64_t fn() const { return 2 * n_bins + 2; }
  C10_HOST_DEVICE int64_t pos() const { return 2 * n_bins + 3; }
  C10_HOST_DEVICE int64_t neg() const { return 2 * n_bins + 3 + auc_bins; }
  C10_HOST_DEVICE int64_t count_cols() const { return 2 * n_bins + 3 + 2 * auc_bins; }
  C10_HOST_DEVICE int64_t s() const { return 0; }
  C10_HOST_DEVICE int64_t brier() const { return n_bins; }
  C10_HOST_DEVICE int64_t nll() const { return n_bins + 1; }
  C10_HOST_DEVICE int64_t sum_cols() const { return n_bins + 2; }
};

}  // namespace orcal
