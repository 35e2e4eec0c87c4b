#pragma once

#include "../se_params.h"

namespace se_fused {

// Fused SE on the CPU: one pass over x for the squeeze, one for the rescale,
// multi-threaded with at::parallel_for, float32 (float64) accumulation, each
// sum taken in a fixed order (deterministic).
void se_forward_cpu(const ForwardArgs& args);
void se_backward_cpu(const BackwardArgs& args);

}  // namespace se_fused
