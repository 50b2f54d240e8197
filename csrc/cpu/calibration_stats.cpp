// calibration_stats on the CPU (SPEC §4): one pass over the prediction and the target fills the packed
// per-image statistics of csrc/common/stats_layout.h. Integer histograms are thread-private (exact, order
// free); float sums are kept per fixed chunk of kChunk voxels and reduced in chunk order, so the result does
// not depend on the number of threads. Extra memory: one histogram set per thread plus sum_cols doubles
// per chunk.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../common/stats_layout.h"
#include "kernels.h"
#include "../common/op_checks.h"

namespace orcal {
namespace {

std::tuple<at::Tensor, at::Tensor> calibration_stats_cpu(const at::Tensor& pred_in, const at::Tensor& target_in,
                                                         const std::optional<at::Tensor>& valid_in,
                                                         int64_t num_raters, bool target_is_masks,
                                                         c10::string_view kind_s, c10::string_view readout_s,
                                                         int64_t majority, int64_t n_bins, int64_t auc_bins) {
  const int kind = kind_code(kind_s);
  const int readout = readout_code(readout_s);
  const cpu::Dtype dtype = float_dtype(pred_in, "pred");
  const int64_t R = num_raters;
  const std::vector<int64_t> spatial = check_stats_args(pred_in, target_in, valid_in, R, target_is_masks, kind,
                                                        majority, n_bins, auc_bins);

  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const std::optional<at::Tensor> valid =
      valid_in.has_value() ? std::optional<at::Tensor>(valid_in->contiguous()) : std::nullopt;
  const int64_t B = spatial[0];
  int64_t V = 1;
  for (size_t d = 1; d < spatial.size(); ++d) V *= spatial[d];
  const StatsLayout lay{n_bins, auc_bins};
  const int64_t per_image = (V + cpu::kChunk - 1) / cpu::kChunk;
  const int64_t chunks = B * per_image;
  const cpu::StatsArgs args{dtype,
                            kind,
                            readout,
                            pred.data_ptr(),
                            static_cast<const uint8_t*>(target.data_ptr()),
                            target_is_masks,
                            valid.has_value() ? valid->data_ptr<bool>() : nullptr,
                            B,
                            V,
                            R,
                            majority,
                            n_bins,
                            auc_bins,
                            per_image,
                            lay.count_cols(),
                            lay.sum_cols()};

  const int threads = at::get_num_threads();
  const int64_t hist_size = B * lay.count_cols();
  std::vector<int64_t> hist(static_cast<size_t>(threads > 1 ? threads - 1 : 0) * hist_size);
  at::Tensor counts = at::zeros({B, lay.count_cols()}, pred.options().dtype(at::kLong));
  std::vector<double> chunk_sums(static_cast<size_t>(chunks * lay.sum_cols()));
  std::vector<cpu::StatsErrors> errors(static_cast<size_t>(threads));
  const cpu::KernelSet& kern = cpu::kernels();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const int t = at::get_thread_num();
    // Thread 0 fills the output directly; the others their own histogram, added below.
    int64_t* h = t == 0 ? counts.data_ptr<int64_t>() : hist.data() + (t - 1) * hist_size;
    kern.stats(args, begin, end, h, chunk_sums.data(), &errors[static_cast<size_t>(t)]);
  });

  cpu::StatsErrors err;
  for (const cpu::StatsErrors& e : errors) {
    err.bad_count += e.bad_count;
    if (e.first_bad_index < err.first_bad_index) {
      err.first_bad_index = e.first_bad_index;
      err.first_bad_value = e.first_bad_value;
    }
    err.k_too_large |= e.k_too_large;
    err.mask_not_binary |= e.mask_not_binary;
  }
  TORCH_CHECK_VALUE(!err.mask_not_binary, "target must be binary (0/1); found a value > 1");
  TORCH_CHECK_VALUE(!err.k_too_large, "target vote counts must lie in 0..R = 0..", R, "; found a larger value");
  if (err.bad_count > 0) {
    if (kind == 0) {
      TORCH_CHECK_VALUE(false, "pred must hold probabilities in [0, 1]; found ", err.first_bad_value, " (",
                        err.bad_count, " bad values). Pass kind='logit' for logits.");
    }
    TORCH_CHECK_VALUE(false, "pred (kind='", kind_s, "') gives ", err.bad_count,
                      " probabilities that are NaN or outside [0, 1], the first ", err.first_bad_value,
                      ": the logits hold NaN or infinite values");
  }

  int64_t* out = counts.data_ptr<int64_t>();
  for (size_t t = 0; t + 1 < static_cast<size_t>(threads); ++t) {
    const int64_t* h = hist.data() + t * hist_size;
    for (int64_t j = 0; j < hist_size; ++j) out[j] += h[j];
  }
  at::Tensor sums = at::zeros({B, lay.sum_cols()}, pred.options().dtype(at::kDouble));
  double* s = sums.data_ptr<double>();
  for (int64_t c = 0; c < chunks; ++c) {  // chunk order: independent of the thread count
    const double* cs = chunk_sums.data() + c * lay.sum_cols();
    double* row = s + (c / per_image) * lay.sum_cols();
    for (int64_t j = 0; j < lay.sum_cols(); ++j) row[j] += cs[j];
  }
  return {counts, sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(orcal, CPU, m) { m.impl("calibration_stats", &calibration_stats_cpu); }

}  // namespace orcal
