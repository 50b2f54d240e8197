// Interface between the CPU ops (ordinal_loss.cpp, calibration_stats.cpp, foreground_probability.cpp) and
// the block kernels of kernels_impl.h, which are compiled once per instruction set (kernels_base.cpp,
// kernels_avx2.cpp) and picked at run time. Plain pointers only: no ATen type crosses this line, so the
// per-ISA translation units do not instantiate any ATen code with a non-baseline target.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../common/dtype.h"

namespace orcal {
namespace cpu {

using orcal::Dtype;

// Voxels per SoA block: every inner loop runs over this many voxels of one channel plane.
constexpr int64_t kBlock = 128;
// Voxels per statistics chunk (a fixed partition: float sums are reduced per chunk, in chunk order).
constexpr int64_t kChunk = 16384;

struct LossArgs {
  Dtype dtype;
  const void* logits;  // (B, R+1, V) contiguous
  const uint8_t* k;    // (B, V)
  const bool* valid;   // (B, V) or null
  void* grad;          // (B, R+1, V) in the logits' dtype, or null
  void* loss_map;      // (B, V) float (double for f64), or null
  double* partials;    // one loss sum per block
  int64_t B, V, R, m, blocks_per_image;
  double rps_weight, grad_scale;  // grad_scale: 1/count for the mean, else 1
};

struct StatsArgs {
  Dtype dtype;
  int kind;          // 0 prob, 1 logit, 2 ordinal
  int readout;       // 0 majority, 1 expected (ordinal only)
  const void* pred;  // (B, V) or (B, R+1, V) contiguous
  const uint8_t* target;  // masks (B, R, V) or votes (B, V)
  bool target_is_masks;
  const bool* valid;
  int64_t B, V, R, m, n_bins, auc_bins, chunks_per_image, count_cols, sum_cols;
};

// Errors found during a statistics pass (merged over threads after it).
struct StatsErrors {
  int64_t first_bad_index = INT64_MAX;  // flat voxel index of the first probability outside [0, 1]
  double first_bad_value = 0;
  int64_t bad_count = 0;
  bool k_too_large = false, mask_not_binary = false;
};

struct ReadoutArgs {
  Dtype dtype;
  const void* logits;  // (B, R+1, V) contiguous
  void* out;           // (B, V) in the logits' dtype
  int64_t B, V, R, m, blocks_per_image;
  int readout;
};

// Each kernel set handles a range of blocks (loss, readout) or chunks (statistics).
struct KernelSet {
  // Returns true when a vote count k > R was seen.
  bool (*loss)(const LossArgs&, int64_t block_begin, int64_t block_end);
  // counts: this thread's (B, count_cols) histogram; chunk_sums: (chunks, sum_cols) float sums per chunk.
  void (*stats)(const StatsArgs&, int64_t chunk_begin, int64_t chunk_end, int64_t* counts, double* chunk_sums,
                StatsErrors* errors);
  void (*readout)(const ReadoutArgs&, int64_t block_begin, int64_t block_end);
  const char* isa;
};

extern const KernelSet kBaseKernels;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ORCAL_CPU_AVX2 1
extern const KernelSet kAvx2Kernels;
extern const KernelSet kAvx512Kernels;
#endif

// Ask the kernel to back a large, freshly allocated output with transparent huge pages: its first touch
// then costs one fault per 2 MiB instead of one per 4 KiB (a no-op where unsupported).
void advise_huge_pages(void* data, int64_t bytes);

// 64-byte aligned scratch memory for the kernels (free with std::free); throws c10::OutOfMemoryError (a
// MemoryError in Python) instead of returning null. Defined once, in kernels_base.cpp.
void* aligned_or_throw(size_t bytes);

// The best kernel set for this CPU (chosen once).
const KernelSet& kernels();

}  // namespace cpu
}  // namespace orcal
