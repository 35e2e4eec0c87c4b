// What the device implementations (cpu/, cuda/) take from the binding (se_fused.cpp): argument
// checks that name the argument, output allocation and the packing of plain kernel structs, plus
// the process-wide switches tests set from Python. Torch types here; kernels see se_params.h only.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "se_params.h"

namespace se_fused {

using at::Tensor;

using ForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor>;               // y, z, a, e
using BackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;  // dx, dw1, db1, dw2, db2, d_residual

// One forward call: x as the kernels read it (a copy if its H and W did not flatten into one axis),
// the outputs, allocated with x's strides (NaN-filled under poisoning), and the struct the kernels
// read. Every argument is checked before anything is allocated. Weights may be (R, C) or
// (R, C, 1, 1); messages match se_fused/spec.py.
struct ForwardCall {
  Tensor x, residual;
  Tensor y, z, a, e;
  ForwardArgs args;
  ForwardResult result() const { return {y, z, a, e}; }
};

ForwardCall forward_call(const Tensor& x, const Tensor& fc1_weight, const c10::optional<Tensor>& fc1_bias,
                         const Tensor& fc2_weight, const c10::optional<Tensor>& fc2_bias, c10::string_view act,
                         c10::string_view gate, const c10::optional<Tensor>& residual, c10::string_view out_act);

// One backward call: x and grad_y as the kernels read them, outputs (empty where not needed; weight
// gradients in the weights' shapes), scratch vectors de, da, dz/P and the kernel struct. For an
// empty batch the weight gradients are already zero and no kernel must run.
struct BackwardCall {
  Tensor x, g, y, residual;
  Tensor dx, dw1, db1, dw2, db2, d_residual;
  Tensor de, da, dzp;
  BackwardArgs args;
  BackwardResult result() const { return {dx, dw1, db1, dw2, db2, d_residual}; }
};

BackwardCall backward_call(const Tensor& grad_y, const Tensor& x, const Tensor& fc1_weight, const Tensor& fc2_weight,
                           const Tensor& z, const Tensor& a, const Tensor& e, c10::string_view act,
                           c10::string_view gate, bool has_fc1_bias, bool has_fc2_bias, bool need_dx,
                           bool need_weight_grads, const c10::optional<Tensor>& y,
                           const c10::optional<Tensor>& residual, c10::string_view out_act, bool need_residual_grad);

at::ScalarType compute_dtype(const Tensor& x);

// Schedule override set by se_fused.debug.force_schedule: split -1 = heuristic, 0/1 = forced;
// group_size, num_programs 0 = heuristic.
struct ForcedSchedule {
  int split = -1;
  int64_t group_size = 0;
  int64_t num_programs = 0;
};
ForcedSchedule forced_schedule();

// The instruction set the C++ CPU kernel runs with on this CPU, "DEFAULT", "AVX2" or "AVX512"
// (cpu/se_cpu.cpp).
namespace cpu {
const char* kernel_isa();
}

// The CUDA kernels' schedule for a problem, for CPU-side tests (se_fused.debug.cuda_schedule): the
// plan's fields, then each ticket's work (cuda/se_cuda_ops.cpp says which, in what order).
using CudaScheduleDescriber = std::vector<int64_t> (*)(const std::vector<int64_t>& problem);

// Called once at load time by cuda/se_cuda_ops.cpp when the CUDA kernels are linked in.
void register_cuda_build(const char* arch_list, CudaScheduleDescriber describe);

}  // namespace se_fused
