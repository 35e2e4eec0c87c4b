// The CPU implementation of the se_fused ops: the binding's checks and packing, then the kernel
// built for the best instruction set this CPU has (ATen's own choice: at::get_cpu_capability(),
// which honours ATEN_CPU_CAPABILITY).
#include <ATen/Version.h>
#include <torch/library.h>

#include "se_cpu.h"

namespace se_fused::cpu {
namespace {

enum class Isa { kDefault, kAvx2, kAvx512 };

Isa isa() {
  static const Isa chosen = [] {
#ifdef SE_FUSED_CPU_X86_VARIANTS
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return Isa::kAvx512;
    if (capability == "AVX2") return Isa::kAvx2;
#endif
    return Isa::kDefault;
  }();
  return chosen;
}

ForwardResult forward_cpu(const Tensor& x, const Tensor& fc1_weight, const c10::optional<Tensor>& fc1_bias,
                          const Tensor& fc2_weight, const c10::optional<Tensor>& fc2_bias, c10::string_view act,
                          c10::string_view gate, const c10::optional<Tensor>& residual, c10::string_view out_act) {
  const ForwardCall call = forward_call(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, residual, out_act);
  if (call.args.n == 0) return call.result();
  const Parameters params(fc1_weight, fc1_bias, fc2_weight, fc2_bias);
  switch (isa()) {
#ifdef SE_FUSED_CPU_X86_VARIANTS
    case Isa::kAvx512: AVX512::forward(call, params); break;
    case Isa::kAvx2: AVX2::forward(call, params); break;
#endif
    default: DEFAULT::forward(call, params);
  }
  return call.result();
}

BackwardResult backward_cpu(const Tensor& grad_y, const Tensor& x, const Tensor& fc1_weight,
                            const Tensor& fc2_weight, const Tensor& z, const Tensor& a, const Tensor& e,
                            c10::string_view act, c10::string_view gate, bool has_fc1_bias, bool has_fc2_bias,
                            bool need_dx, bool need_weight_grads, const c10::optional<Tensor>& y,
                            const c10::optional<Tensor>& residual, c10::string_view out_act,
                            bool need_residual_grad) {
  const BackwardCall call = backward_call(grad_y, x, fc1_weight, fc2_weight, z, a, e, act, gate, has_fc1_bias,
                                          has_fc2_bias, need_dx, need_weight_grads, y, residual, out_act,
                                          need_residual_grad);
  if (call.args.n == 0) return call.result();
  const Parameters params(fc1_weight, c10::nullopt, fc2_weight, c10::nullopt);
  switch (isa()) {
#ifdef SE_FUSED_CPU_X86_VARIANTS
    case Isa::kAvx512: AVX512::backward(call, params, z, a, e); break;
    case Isa::kAvx2: AVX2::backward(call, params, z, a, e); break;
#endif
    default: DEFAULT::backward(call, params, z, a, e);
  }
  return call.result();
}

}  // namespace

const char* kernel_isa() {
  switch (isa()) {
    case Isa::kAvx512: return "AVX512";
    case Isa::kAvx2: return "AVX2";
    default: return "DEFAULT";
  }
}

TORCH_LIBRARY_IMPL(se_fused, CPU, m) {
  m.impl("se_forward", &forward_cpu);
  m.impl("se_backward", &backward_cpu);
}

}  // namespace se_fused::cpu
