// Per-voxel vote counting, shared by the CPU and CUDA orc_targets kernels.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace orcal {

// Sum of R binary votes spaced `stride` bytes apart. Sets `*bad` when a vote is neither 0 nor 1
// (the caller reports it once, after the pass).
C10_HOST_DEVICE inline uint8_t count_votes(const uint8_t* votes, int64_t R, int64_t stride, bool* bad) {
  uint32_t k = 0;
  uint8_t any_high = 0;
  for (int64_t r = 0; r < R; ++r) {
    const uint8_t v = votes[r * stride];
    k += v;
    any_high |= v;
  }
  if (any_high > 1) *bad = true;
  return static_cast<uint8_t>(k);
}

}  // namespace orcal
