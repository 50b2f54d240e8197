// The floating-point input types of the ops, shared by the CPU and CUDA code (no ATen type in it, so the
// per-ISA CPU kernel files can use it).
#pragma once

namespace orcal {

enum class Dtype : int { f32, f16, bf16, f64 };

}  // namespace orcal
