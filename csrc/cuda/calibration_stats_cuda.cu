// calibration_stats on CUDA (SPEC §4). Grid (x: slices of an image's voxels, y: images). Integer histograms
// live in shared memory (block-private uint32 counters: a block's counts stay below 2^32, see kMaxBlockVoxels),
// filled with one atomic per distinct bin per warp (warp aggregation: on a confident image a whole warp hits one
// bin), and added to the int64 output with one atomic per non-zero bin per block: exact. TP/FP/FN (and the count
// of bad probabilities) are per-thread registers, summed over the block by shuffles and shared memory, and
// added with one atomic each per block. A block sees at least kBlockVoxels voxels where the image has them, so
// that its flush of up to 2 x (n_bins + auc_bins) bins is amortised.
// Float sums are deterministic: each thread keeps its confidence mass for up to 16 or 32 ECE bins at a
// time, blocks reduce them in a fixed tree into a per-block buffer, and at::sum adds the blocks. More ECE
// bins take more passes over the input (never the case for the usual 10-20 bins).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "../common/op_checks.h"
#include "../common/ordinal_math.h"
#include "../common/stats_layout.h"
#include "cuda_utils.cuh"

namespace orcal {
namespace {

// ECE bins a thread keeps in registers per pass: 16 (the usual 10-15 bins in one pass, half the registers)
// or 32; the kernel is built for both.
constexpr int kFewLocalBins = 16;
constexpr int kManyLocalBins = 32;
constexpr size_t kSharedLimit = 48 * 1024;

// Blocks per image (grid x), from the image's voxel count V only (never the device), so that every sum is the
// same on any GPU: ceil(V / kBlockVoxels) blocks, at most kMaxBlocksPerImage (a 512 x 512 x 300 CT volume:
// 1024 blocks of 76,800 voxels), and at least ceil(V / kMaxBlockVoxels). With gx >= V / 2^24 a thread of the
// grid-stride loop sees at most ceil(V / (gx * 256)) <= 2^16 voxels and a block at most 2^24; each voxel adds at
// most R <= 255 to a counter, so a block's counters stay below 2^24 * 255 < 2^32 and a thread's below 2^16:
// uint32 in shared memory and registers (64-bit shared atomics are compare-and-swap loops); the output is int64.
constexpr int64_t kBlockVoxels = int64_t(1) << 15;
constexpr int64_t kMaxBlocksPerImage = 1024;
constexpr int64_t kMaxBlockVoxels = int64_t(1) << 24;
constexpr int64_t kMaxRaters = 255;  // check_stats_args
static_assert(kMaxBlockVoxels * kMaxRaters < (int64_t(1) << 32), "a block's uint32 counters could overflow");

int64_t stats_blocks_per_image(int64_t V) {
  const int64_t per_block = cuda::test_override(kBlockVoxels, "ORCAL_CUDA_EMULATION_BLOCK_VOXELS");
  int64_t gx = (V + per_block - 1) / per_block;
  if (gx > kMaxBlocksPerImage) gx = kMaxBlocksPerImage;
  const int64_t min_gx = (V + kMaxBlockVoxels - 1) / kMaxBlockVoxels;
  return gx > min_gx ? gx : (min_gx > 1 ? min_gx : 1);
}

struct StatsParams {
  const void* pred;
  const uint8_t* target;
  const bool* valid;
  int64_t* counts;     // (B, count_cols)
  double* partials;    // (B, gx, sum_cols)
  unsigned long long* first_bad;
  unsigned long long* bad_count;
  int* flags;          // [0] k > R, [1] mask not binary
  int64_t V, n_bins, auc_bins, count_cols, sum_cols, image_offset;
  int R, m, kind, readout;
  bool masks, shared_ece, shared_auc;
};

template <typename scalar_t, typename T>
__device__ inline T voxel_probability(const StatsParams& P, int64_t b, int64_t v) {
  const scalar_t* pred = static_cast<const scalar_t*>(P.pred);
  if (P.kind == 2) {
    const scalar_t* z = pred + b * (P.R + 1) * P.V + v;
    auto load = [&](int c) { return static_cast<T>(z[c * P.V]); };
    return voxel_readout<T>(load, P.R, P.m, P.readout);
  }
  const T x = static_cast<T>(pred[b * P.V + v]);
  return P.kind == 1 ? sigmoid(x) : x;
}

template <typename scalar_t, typename T, int kLocalBins>
__global__ void __launch_bounds__(cuda::kThreads) stats_kernel(StatsParams P) {
  ORCAL_DYNAMIC_SHARED(unsigned long long, smem_ull);
  const StatsLayout lay{P.n_bins, P.auc_bins};
  const int64_t nb = P.n_bins, tb = P.auc_bins;
  double* red = reinterpret_cast<double*>(smem_ull);                         // blockDim doubles
  unsigned int* ece = reinterpret_cast<unsigned int*>(smem_ull + blockDim.x);  // n[nb], a[nb]
  unsigned int* auc = ece + (P.shared_ece ? 2 * nb : 0);                     // pos[tb], neg[tb]
  const int64_t b = blockIdx.y + P.image_offset;
  int64_t* row = P.counts + b * P.count_cols;
  if (P.shared_ece)
    for (int64_t j = threadIdx.x; j < 2 * nb; j += blockDim.x) ece[j] = 0;
  if (P.shared_auc)
    for (int64_t j = threadIdx.x; j < 2 * tb; j += blockDim.x) auc[j] = 0;
  __syncthreads();
  const T Rf = static_cast<T>(P.R);
  // TP, FP, FN and bad probabilities of this thread's voxels (< 2^16 each: kMaxBlockVoxels)
  unsigned counts[4] = {0, 0, 0, 0};
  double* out = P.partials + (b * gridDim.x + blockIdx.x) * P.sum_cols;
  for (int64_t lo = 0; lo < nb; lo += kLocalBins) {
    const bool first = lo == 0;
    double s_loc[kLocalBins];
    for (int j = 0; j < kLocalBins; ++j) s_loc[j] = 0;
    double brier = 0, nll = 0;
    for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < P.V; v += int64_t(gridDim.x) * blockDim.x) {
      int kk = 0;
      if (P.masks) {
        int any = 0;
        for (int r = 0; r < P.R; ++r) {
          const int x = P.target[(b * P.R + r) * P.V + v];
          kk += x;
          any |= x;
        }
        if (first && any > 1) P.flags[1] = 1;
      } else {
        kk = P.target[b * P.V + v];
        if (first && kk > P.R) P.flags[0] = 1;
      }
      if (P.valid != nullptr && !P.valid[b * P.V + v]) continue;
      const T p = voxel_probability<scalar_t, T>(P, b, v);
      if (!(p >= T(0) && p <= T(1))) {
        if (first) {  // the error path: the op raises
          ++counts[3];
          atomicMin(P.first_bad, static_cast<unsigned long long>(b * P.V + v));
        }
        continue;
      }
      const int64_t bi = bin_index(p, nb);
      // constant indices only, so s_loc stays in registers (a run-time index would put it in local memory);
      // adding 0 elsewhere leaves every sum bit-identical
      const int64_t local = bi - lo;
      const double mass = static_cast<double>(P.R) * static_cast<double>(p);
#pragma unroll
      for (int j = 0; j < kLocalBins; ++j) s_loc[j] += local == j ? mass : 0.0;
      if (!first) continue;
      const T kv = static_cast<T>(kk);
      brier += static_cast<double>(brier_voxel(p, kv, Rf));
      nll += static_cast<double>(nll_voxel(p, kv, Rf));
      const bool fg = p >= T(0.5), y = kk >= P.m;
      counts[0] += fg && y;
      counts[1] += fg && !y;
      counts[2] += !fg && y;
      const int64_t ti = bin_index(p, tb);
      if (P.shared_ece) {
        cuda::warp_aggregated_add(ece, ece + nb, static_cast<unsigned>(bi), static_cast<unsigned>(P.R),
                                  static_cast<unsigned>(kk));
      } else {
        atomicAdd(reinterpret_cast<unsigned long long*>(row + lay.n() + bi), static_cast<unsigned long long>(P.R));
        atomicAdd(reinterpret_cast<unsigned long long*>(row + lay.a() + bi), static_cast<unsigned long long>(kk));
      }
      if (P.shared_auc) {
        cuda::warp_aggregated_add(auc, auc + tb, static_cast<unsigned>(ti), static_cast<unsigned>(kk),
                                  static_cast<unsigned>(P.R - kk));
      } else {
        atomicAdd(reinterpret_cast<unsigned long long*>(row + lay.pos() + ti), static_cast<unsigned long long>(kk));
        atomicAdd(reinterpret_cast<unsigned long long*>(row + lay.neg() + ti),
                  static_cast<unsigned long long>(P.R - kk));
      }
    }
#pragma unroll
    for (int j = 0; j < kLocalBins; ++j) {
      if (lo + j >= nb) break;  // the same for the whole block: block_sum's barriers stay uniform
      const double total = cuda::block_sum(s_loc[j], red);
      if (threadIdx.x == 0) out[lay.s() + lo + j] = total;
    }
    if (first) {
      const double bt = cuda::block_sum(brier, red);
      const double nt = cuda::block_sum(nll, red);
      if (threadIdx.x == 0) {
        out[lay.brier()] = bt;
        out[lay.nll()] = nt;
      }
    }
  }
  auto add = [&](int64_t col, unsigned long long x) {
    if (x != 0) atomicAdd(reinterpret_cast<unsigned long long*>(row + col), x);
  };
  // `red` is free (block_sum ends with a barrier); block_counts' barrier also ends the histogram atomics.
  const unsigned total = cuda::block_counts(counts, reinterpret_cast<unsigned*>(red));
  if (threadIdx.x < 3) add(threadIdx.x == 0 ? lay.tp() : threadIdx.x == 1 ? lay.fp() : lay.fn(), total);
  else if (threadIdx.x == 3 && total != 0) atomicAdd(P.bad_count, static_cast<unsigned long long>(total));
  if (P.shared_ece)
    for (int64_t j = threadIdx.x; j < nb; j += blockDim.x) {
      add(lay.n() + j, ece[j]);
      add(lay.a() + j, ece[nb + j]);
    }
  if (P.shared_auc)
    for (int64_t j = threadIdx.x; j < tb; j += blockDim.x) {
      add(lay.pos() + j, auc[j]);
      add(lay.neg() + j, auc[tb + j]);
    }
}

std::tuple<at::Tensor, at::Tensor> calibration_stats_cuda(const at::Tensor& pred_in, const at::Tensor& target_in,
                                                          const std::optional<at::Tensor>& valid_in,
                                                          int64_t num_raters, bool target_is_masks,
                                                          c10::string_view kind_s, c10::string_view readout_s,
                                                          int64_t majority, int64_t n_bins, int64_t auc_bins) {
  const int kind = kind_code(kind_s);
  const int readout = readout_code(readout_s);
  const Dtype dtype = float_dtype(pred_in, "pred");
  const int64_t R = num_raters;
  const std::vector<int64_t> spatial = check_stats_args(pred_in, target_in, valid_in, R, target_is_masks, kind,
                                                        majority, n_bins, auc_bins);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const std::optional<at::Tensor> valid =
      valid_in.has_value() ? std::optional<at::Tensor>(valid_in->contiguous()) : std::nullopt;
  const int64_t B = spatial[0];
  int64_t V = 1;
  for (size_t d = 1; d < spatial.size(); ++d) V *= spatial[d];
  const StatsLayout lay{n_bins, auc_bins};
  at::Tensor counts = at::zeros({B, lay.count_cols()}, pred.options().dtype(at::kLong));
  if (B == 0 || V == 0) return {counts, at::zeros({B, lay.sum_cols()}, pred.options().dtype(at::kDouble))};

  const int64_t gx = stats_blocks_per_image(V);
  at::Tensor partials = at::zeros({B, gx, lay.sum_cols()}, pred.options().dtype(at::kDouble));
  at::Tensor bad = at::full({2}, 0, pred.options().dtype(at::kLong));
  bad[0].fill_(std::numeric_limits<int64_t>::max());
  at::Tensor flags = at::zeros({2}, pred.options().dtype(at::kInt));

  size_t shared = cuda::kThreads * sizeof(double);
  const bool shared_ece = shared + 2 * n_bins * sizeof(unsigned int) <= kSharedLimit;
  if (shared_ece) shared += 2 * n_bins * sizeof(unsigned int);
  const bool shared_auc = shared + 2 * auc_bins * sizeof(unsigned int) <= kSharedLimit;
  if (shared_auc) shared += 2 * auc_bins * sizeof(unsigned int);

  StatsParams P{pred.data_ptr(),
                static_cast<const uint8_t*>(target.data_ptr()),
                valid.has_value() ? valid->data_ptr<bool>() : nullptr,
                counts.data_ptr<int64_t>(),
                partials.data_ptr<double>(),
                reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>()),
                reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>() + 1),
                flags.data_ptr<int>(),
                V,
                n_bins,
                auc_bins,
                lay.count_cols(),
                lay.sum_cols(),
                0,
                static_cast<int>(R),
                static_cast<int>(majority),
                kind,
                readout,
                target_is_masks,
                shared_ece,
                shared_auc};
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t b0 = 0; b0 < B; b0 += 65535) {  // gridDim.y limit
    P.image_offset = b0;
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(B - b0 < 65535 ? B - b0 : 65535));
    auto launch = [&](auto scalar_tag, auto opmath_tag) {
      using scalar_t = decltype(scalar_tag);
      using T = decltype(opmath_tag);
      if (n_bins <= kFewLocalBins)
        ORCAL_LAUNCH(grid, cuda::kThreads, shared, stream, stats_kernel<scalar_t, T, kFewLocalBins>)(P);
      else
        ORCAL_LAUNCH(grid, cuda::kThreads, shared, stream, stats_kernel<scalar_t, T, kManyLocalBins>)(P);
    };
    switch (dtype) {
      case Dtype::f32: launch(float{}, float{}); break;
      case Dtype::f16: launch(c10::Half{}, float{}); break;
      case Dtype::bf16: launch(c10::BFloat16{}, float{}); break;
      case Dtype::f64: launch(double{}, double{}); break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (cuda::async_checks()) {
    cuda::assert_flags_clear(flags, "orcal::calibration_stats: target must be binary masks or vote counts in 0..R");
    cuda::assert_flags_clear(bad[1], "orcal::calibration_stats: pred must give probabilities in [0, 1]");
    return {counts, at::sum(partials, 1)};
  }
  // One synchronisation for the errors found in the pass.
  const at::Tensor flags_host = flags.cpu();
  TORCH_CHECK_VALUE(flags_host[1].item<int>() == 0, "target must be binary (0/1); found a value > 1");
  TORCH_CHECK_VALUE(flags_host[0].item<int>() == 0, "target vote counts must lie in 0..R = 0..", R,
                    "; found a larger value");
  const at::Tensor bad_host = bad.cpu();
  const int64_t bad_count = bad_host[1].item<int64_t>();
  if (bad_count > 0) {
    const int64_t index = bad_host[0].item<int64_t>();
    if (kind == 0) {
      const double value = pred.reshape({-1})[index].item<double>();
      TORCH_CHECK_VALUE(false, "pred must hold probabilities in [0, 1]; found ", value, " (", bad_count,
                        " bad values). Pass kind='logit' for logits.");
    }
    TORCH_CHECK_VALUE(false, "pred (kind='", kind_s, "') gives ", bad_count,
                      " probabilities that are NaN or outside [0, 1]: the logits hold NaN or infinite values");
  }
  return {counts, at::sum(partials, 1)};
}

}  // namespace

ORCAL_CUDA_LIBRARY_IMPL(m) { m.impl("calibration_stats", &calibration_stats_cuda); }

}  // namespace orcal
