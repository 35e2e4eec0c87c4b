// Between the CPU registration (se_cpu.cpp) and the kernel, which is compiled once per
// instruction set (se_cpu_isa_*.cpp from se_cpu_kernel.h) and chosen at run time.
#pragma once

#include <ATen/ATen.h>

#include "../se_binding.h"

// The AVX2 and AVX-512 builds need GCC's target pragma on x86-64; elsewhere only the baseline build
// (whatever SIMD the compiler targets by default, e.g. NEON on aarch64) exists.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SE_FUSED_CPU_X86_VARIANTS 1
#endif

namespace se_fused::cpu {

// The parameters as contiguous 2-D (R, C) / (C, R) tensors in their own dtype (views of the module's
// weights; the kernel converts on load).
struct Parameters {
  Tensor w1, w2;
  c10::optional<Tensor> b1, b2;

  Parameters(const Tensor& fc1_weight, const c10::optional<Tensor>& fc1_bias, const Tensor& fc2_weight,
             const c10::optional<Tensor>& fc2_bias) {
    const int64_t r = fc1_weight.size(0), c = fc1_weight.size(1);
    w1 = fc1_weight.reshape({r, c}).contiguous();
    w2 = fc2_weight.reshape({c, r}).contiguous();
    if (fc1_bias) b1 = fc1_bias->contiguous();
    if (fc2_bias) b2 = fc2_bias->contiguous();
  }
};

#define SE_FUSED_CPU_KERNEL_DECLARATIONS                                                              \
  void forward(const ForwardCall& call, const Parameters& params);                                     \
  void backward(const BackwardCall& call, const Parameters& params, const Tensor& z, const Tensor& a, \
                const Tensor& e);

namespace DEFAULT {
SE_FUSED_CPU_KERNEL_DECLARATIONS
}
#ifdef SE_FUSED_CPU_X86_VARIANTS
namespace AVX2 {
SE_FUSED_CPU_KERNEL_DECLARATIONS
}
namespace AVX512 {
SE_FUSED_CPU_KERNEL_DECLARATIONS
}
#endif
#undef SE_FUSED_CPU_KERNEL_DECLARATIONS

}  // namespace se_fused::cpu
